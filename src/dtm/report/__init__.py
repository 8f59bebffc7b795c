"""The report: the alignment tax and its cure at a glance.

    collect_run(cfg) -> ReportData         read a whole run (`collect`: through `dtm.rundir` only)
    render_report(data, out_dir)           write report.md (+ PNGs) and report.html (`render`, `plots`)
    write_run_report(cfg, console)         both, and print the headline (what `dtm run` calls)

The math lives in `stats` (pure functions, tested on hand-computed numbers), the report model in
`model`, and the sections both files show, in order, in `render.SECTIONS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtm.report.collect import collect_run
from dtm.report.model import GroupTable, ReportData
from dtm.report.render import SECTIONS, headline_markdown, render_report
from dtm.report.stats import (
    best_per_column,
    fmt,
    frontier_gap,
    mean_std,
    method_costs,
    pareto_frontier,
    tradeoff_summary,
    training_cost,
)

__all__ = [
    "SECTIONS", "GroupTable", "ReportData", "best_per_column", "collect_run", "fmt", "frontier_gap", "headline_markdown",
    "mean_std", "method_costs", "pareto_frontier", "render_report", "tradeoff_summary", "training_cost", "write_run_report",
]


def write_run_report(cfg: Any, console: Any = None, warning: str = "") -> tuple[Path, Path]:
    """The report of a whole `dtm run` (all seeds; the no-bias control as a section) into its
    run directory; prints the headline table and the trade-off sentence to `console`.
    `warning` (e.g. "PARTIAL REPORT: missing ...") is shown at the top of both files."""
    data = collect_run(cfg)
    data.warning = warning
    out = render_report(data, cfg.output_dir)
    if console is not None:
        if warning:
            console.print(warning, style="bold red", markup=False)
        console.print(headline_markdown(data))
        summary = tradeoff_summary(data)
        if summary:
            console.print(summary)
    return out
