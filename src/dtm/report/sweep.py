"""The sweep report: a table per compared model across a sweep's cells and one plot per swept key.

Each cell is an ordinary run read by `collect_seeds` (so a cell's numbers are the ones its own
report shows); this page tabulates DTM of every cell (the headline: one column a task, so it
fits a page), then the ensemble (where run) and vanilla in tables of the same shape (mean ±
sample std over seeds; bold by the run report's rule: a lead beyond the evaluation's standard
error, never a tie), draws each axis (every headline task against the key's values, seed spread as error
bars), and says in one sentence per axis what the numbers show, "no clear effect" where the
seed spread covers the differences. The sweep (`dtm.sweep.Sweep`: cells, axes) is read by attribute: this package
does not import the module that runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtm import rundir
from dtm.io import atomic_write_bytes, atomic_write_text
from dtm.report.collect import collect_seeds
from dtm.report.render import Block, Cell, Page, Plot, Table, _slug, html, markdown
from dtm.report.stats import best_per_column, fmt, mean_std

# the models each cell contributes (the ensemble where `baselines.methods` has it: merge vs ensemble)
COMPARED = (rundir.DTM, rundir.ENSEMBLE, rundir.VANILLA)
PLOT_PREFIX = "sweep-"


@dataclass
class SweepScores:
    """Per cell: model (DTM, ensemble, vanilla) -> headline column -> one value per seed; cells whose
    evaluation has not finished are listed in `missing`."""

    def models(self) -> list[str]:
        """The compared models some cell has, in `COMPARED` order."""
        return [m for m in COMPARED if any(m in cell for cell in self.cells.values())]

    columns: list[str]
    cells: dict[str, dict[str, dict[str, list[float]]]]
    missing: list[str]
    # per cell: model -> column -> each seed's standard error of the evaluation (what bold is judged by)
    stderr: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)


def collect_sweep(sweep: Any) -> SweepScores:
    """Every cell's DTM, ensemble and vanilla scores over its seeds (the no-bias control left out)."""
    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    stderr: dict[str, dict[str, dict[str, list[float]]]] = {}
    columns: list[str] = []
    missing = []
    for cell in sweep.cells:
        runs = [r for r in rundir.RunDir(Path(cell.cfg.output_dir)).seed_runs(cell.cfg) if not r.control]
        if not all(r.eval_result(rundir.DTM).is_file() and r.manifest("eval") for r in runs):
            missing.append(cell.name)
            continue
        data = collect_seeds(cell.cfg, runs, cell.name)
        cells[cell.name] = {m: data.scores[m] for m in COMPARED if m in data.scores}
        stderr[cell.name] = {m: data.stderr[m] for m in COMPARED if m in data.stderr}
        columns += [c for c in data.columns if "/" not in c and c not in columns]
    return SweepScores(columns, cells, missing, stderr)


def point_label(key: str, value: Any) -> str:
    """How an axis value is written on its plot: `4`, `strategy=kmeans,embed_on=both`."""
    name = rundir.sweep_cell_name({key: value})
    return ",".join(part.split("=", 1)[1] if not isinstance(value, dict) else part.removeprefix(key + ".")
                    for part in name.split(","))


def column_verdict(points: list[tuple[str, list[float]]]) -> tuple[str, str, float, str, float, float] | None:
    """(verdict, highest label, its mean, lowest label, its mean, seed spread) of one column along an
    axis; verdict "flat" where the difference is within the larger of the two points' seed spreads
    (or there is none), "one seed" where a point has a single seed, else "clear"; None below two points."""
    stats = [(label, *mean_std(values), len(values)) for label, values in points if values]
    if len(stats) < 2:
        return None
    hi, lo = max(stats, key=lambda s: s[1]), min(stats, key=lambda s: s[1])
    spread = max(hi[2], lo[2])
    if hi[1] == lo[1]:
        verdict = "flat"
    elif min(hi[3], lo[3]) < 2:
        verdict = "one seed"
    else:
        verdict = "flat" if hi[1] - lo[1] <= spread else "clear"
    return verdict, hi[0], hi[1], lo[0], lo[1], spread


def axis_summary(key: str, points: list[tuple[str, dict[str, list[float]]]], columns: list[str]) -> str:
    """One sentence on what DTM's numbers show along an axis: for each column where the highest
    and lowest values differ by more than the seed spread, where they are; the columns where the
    spread covers the difference together as "no clear effect"."""
    verdicts = {c: column_verdict([(label, scores.get(c, [])) for label, scores in points]) for c in columns}
    verdicts = {c: v for c, v in verdicts.items() if v is not None}
    one_seed = bool(verdicts) and all(v[0] == "one seed" for v in verdicts.values())  # said once, not per column
    clauses, flat = [], []
    for column, (verdict, hi, hi_mean, lo, lo_mean, spread) in verdicts.items():
        if verdict == "flat":
            flat.append(column)
            continue
        judge = "" if one_seed else ("; one seed, no spread to judge by" if verdict == "one seed"
                                     else f"; {hi_mean - lo_mean:.3f} apart, seed spread {spread:.3f}")
        clauses.append(f"DTM's {column} is highest at {hi} ({hi_mean:.3f}) and lowest at {lo} ({lo_mean:.3f}{judge})")
    if flat:
        clauses.append(f"no clear effect on DTM's {', '.join(flat)} (the differences are within the seed spread)")
    if not clauses:
        return f"Along {key}: fewer than two finished values."
    return f"Along {key}{' (one seed, so no spread to judge by)' if one_seed else ''}: " + "; ".join(clauses) + "."


def plot_axis(key: str, labels: list[str], cells: list[dict[str, dict[str, list[float]]] | None], columns: list[str],
              models: list[str]) -> bytes:
    """Each column against the axis's values: each compared model, mean with the seed std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtm.report.plots import _png

    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.4), squeeze=False)
    xs = list(range(len(labels)))
    for ax, column in zip(axes[0], columns):
        for model in models:
            style = {rundir.DTM: "o-", rundir.ENSEMBLE: "^:", rundir.VANILLA: "s--"}[model]
            values = [mean_std(((c or {}).get(model) or {}).get(column, [])) for c in cells]
            ax.errorbar(xs, [m for m, _ in values], yerr=[s for _, s in values], fmt=style, capsize=3, label=model)
        ax.set_title(column, fontsize=9)
        ax.set_xticks(xs, labels, rotation=30 if max(map(len, labels)) > 6 else 0, ha="right" if max(map(len, labels)) > 6 else "center", fontsize=8)
        ax.set_xlabel(key, fontsize=8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


TABLE_NOTE = ("Mean ± sample std over seeds, one column per task. Bold: the cell that leads its column by more than "
              "the standard error of its lead over the runner-up (the evaluation's, mean over seeds; in each cell's own "
              "report); a tie is not a best, "
              "so a column whose top is shared (a model linked into several cells) has none.")
TABLE_TITLES = {rundir.DTM: "DTM in every cell", rundir.ENSEMBLE: "The K-model ensemble in every cell (where run)",
                rundir.VANILLA: "Vanilla in every cell"}


def cell_table(scores: SweepScores, model: str) -> Block:
    """One compared model's table, cell x task: the headline (DTM) fits a page with one column a
    task; the ensemble and vanilla get tables of their own of the same shape (the details)."""
    rows = {name: vals.get(model, {}) for name, vals in scores.cells.items() if model in vals}
    stderr = {name: by_model.get(model, {}) for name, by_model in scores.stderr.items()}
    best = best_per_column(rows, scores.columns, stderr)  # judged by the standard errors, not printed: narrow cells
    table = Table(["cell", *scores.columns], [[Cell(name), *(Cell(fmt(s.get(c, [])), best.get(c) == name) for c in scores.columns)]
                                              for name, s in rows.items()])
    block_id = "sweep-table" if model == rundir.DTM else f"sweep-table-{_slug(model)}"
    return Block("scores", "sweep", block_id, TABLE_TITLES.get(model, model), TABLE_NOTE, table)


def sweep_page(sweep: Any, scores: SweepScores, trainings: dict[str, int], plots: dict[str, Plot]) -> Page:
    """The sweep report as the report templates walk it."""
    cfg = sweep.cfg
    seeds = list(cfg.seeds or [cfg.seed])
    notes = [
        f"{cfg.sweep.mode} sweep over {', '.join(a.key for a in sweep.axes)}: {len(sweep.cells)} cells under "
        f"{rundir.SWEEP_DIR}/ (each an ordinary run with its own report), seeds {seeds}; mean ± sample std over seeds",
        f"trainings: the cells' train stages list {trainings['planned']} models; {trainings['linked']} were linked from a "
        f"sibling cell that had trained the same job, {trainings['trained']} were trained",
    ]
    if "evaluations" in trainings:
        ev = trainings["evaluations"]
        notes.append(f"evaluations: the cells' eval stages list {ev['planned']} results; {ev['linked']} are a sibling cell's "
                     f"result for the same model files and tasks, linked, {ev['scored']} were scored")
    warning = f"PARTIAL: cells not finished: {', '.join(scores.missing)}" if scores.missing else ""
    page = Page(f"Sweep: {', '.join(a.key for a in sweep.axes)}", notes, 1, warning=warning)
    for model in scores.models():
        page.blocks.append(cell_table(scores, model))
    for axis in sweep.axes:
        if axis.key not in plots:
            continue
        points = [(point_label(axis.key, v), scores.cells.get(name, {}).get(rundir.DTM, {})) for v, name in axis.points]
        said = axis_summary(axis.key, points, scores.columns)
        page.blocks.append(Block("plot", "sweep-axis", PLOT_PREFIX + _slug(axis.key), f"Sweep over {axis.key}",
                                 "DTM (solid), the ensemble (dotted, where run) and vanilla (dashed) at each value; "
                                 "error bars: seed std.", plots[axis.key], said))
    return page


def write_sweep_report(sweep: Any, trainings: dict[str, int]) -> tuple[Path, Path]:
    """report.md (+ a PNG per axis) and report.html in the sweep's output directory."""
    scores = collect_sweep(sweep)
    out = rundir.RunDir(Path(sweep.cfg.output_dir))
    plots = {}
    if scores.columns:
        for axis in sweep.axes:
            labels = [point_label(axis.key, v) for v, _ in axis.points]
            png = plot_axis(axis.key, labels, [scores.cells.get(name) for _, name in axis.points], scores.columns, scores.models())
            path = atomic_write_bytes(out.report_plot(PLOT_PREFIX + _slug(axis.key)), png)
            plots[axis.key] = Plot(path.name, png)
    page = sweep_page(sweep, scores, trainings, plots)
    return atomic_write_text(out.report_md, markdown(page)), atomic_write_text(out.report_html, html(page))
