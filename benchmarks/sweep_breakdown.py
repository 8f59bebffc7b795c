"""Where a sweep's time went: per cell and stage, from the run's own manifests and results.

    python benchmarks/sweep_breakdown.py runs/lab-analyses [--out benchmarks/results/lab_analyses/breakdown.md]

Per cell (summed over its seed runs): each stage's wall seconds as its manifest recorded them
(a stage linked from a sibling counts 0 here: its manifest is the sibling's, so it is counted
once, where it ran), the models the train stage trained and linked with the trained ones'
seconds, and the results the eval stage scored and linked with the scored ones' seconds (each
task's `seconds` in the result file; an ensemble's is its K models' passes). Reads only what a
finished (or partial) `dtm run` wrote; trains nothing. Under load the seconds are proportions,
not the idle machine's costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dtm.pipeline import STAGES, load_run_config, seed_runs  # noqa: E402
from dtm.sweep import EVAL, STAGE, plan_sweep  # noqa: E402


def _own_manifest(run: Any, stage: str, reused: dict[str, str]) -> dict[str, Any] | None:
    """The stage's manifest where this run did the stage (None where it was linked from a sibling)."""
    return None if STAGE + stage in reused else run.dir.manifest(stage)


def _eval_seconds(path: Path) -> float:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return 0.0
    return sum(float(r.get("seconds", 0.0)) for r in result.values() if isinstance(r, dict))


def cell_row(cfg: Any) -> dict[str, Any]:
    """One cell's seconds and counts, summed over its seed runs."""
    row: dict[str, Any] = dict.fromkeys(STAGES, 0.0) | {"trained": 0, "linked": 0, "train_model_s": 0.0,
                                                           "scored": 0, "results_linked": 0, "eval_model_s": 0.0, "seeds": 0}
    for run in seed_runs(cfg):
        reused = run.dir.reused()
        row["seeds"] += 1
        for stage in STAGES:
            manifest = _own_manifest(run, stage, reused)
            row[stage] += float(manifest["seconds"]) if manifest else 0.0
        train = run.dir.manifest("train")
        if train:
            seconds = train["outputs"].get("seconds", {})
            for model in train["outputs"].get("models", []):
                if model in reused or STAGE + "train" in reused:
                    row["linked"] += 1
                else:
                    row["trained"] += 1
                    row["train_model_s"] += float(seconds.get(model, 0.0))
        ev = run.dir.manifest("eval")
        for model in (ev or {}).get("outputs", {}).get("models", []):
            ours, theirs = run.dir.eval_result(model), reused.get(EVAL + model)
            if theirs and ours.is_file() and Path(theirs).is_file() and os.path.samefile(ours, theirs):
                row["results_linked"] += 1
            else:
                row["scored"] += 1
                row["eval_model_s"] += _eval_seconds(ours)
    return row


def table(root: Path) -> str:
    cfg = load_run_config(root)
    cells = plan_sweep(cfg).cells if cfg.sweep.axes else []
    rows = {c.name: cell_row(c.cfg) for c in cells} if cells else {".": cell_row(cfg)}
    head = ("| cell | seeds | data s | disperse s | train s | merge s | eval s | trained (linked) | trained models' s "
            "| scored (linked) | scored results' s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    total = dict.fromkeys(next(iter(rows.values())), 0.0)
    for name, r in rows.items():
        lines.append(f"| {name} | {r['seeds']} | " + " | ".join(f"{r[s]:.1f}" for s in STAGES)
                     + f" | {r['trained']} ({r['linked']}) | {r['train_model_s']:.1f} | {r['scored']} ({r['results_linked']}) "
                     f"| {r['eval_model_s']:.1f} |")
        total = {k: total[k] + v for k, v in r.items()}
    lines.append("| **all** | | " + " | ".join(f"{total[s]:.1f}" for s in STAGES)
                 + f" | {total['trained']:.0f} ({total['linked']:.0f}) | {total['train_model_s']:.1f} "
                 f"| {total['scored']:.0f} ({total['results_linked']:.0f}) | {total['eval_model_s']:.1f} |")
    stages = sum(total[s] for s in STAGES)
    lines.append("")
    lines.append(f"Stage seconds in all: {stages:.0f} (" + ", ".join(f"{s} {100 * total[s] / stages:.0f}%" for s in STAGES)
                 + "); the rest of the wall time is start-up, the cells' reports and the sweep report.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--out", help="also write the table here")
    a = p.parse_args()
    text = table(Path(a.run_dir))
    print(text, end="")
    if a.out:
        from dtm.io import atomic_write_text

        atomic_write_text(Path(a.out), text)


if __name__ == "__main__":
    main()
