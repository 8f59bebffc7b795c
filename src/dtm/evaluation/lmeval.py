"""Optional backend: run any lm-evaluation-harness task on our model directories.

For users who have the dataset hub (or a local lm-eval task YAML): `run_lm_eval` calls
`lm_eval.simple_evaluate` with the `hf` model on the same `save_pretrained` directory and
folds its numbers into our results shape (`metrics` with `<name>_stderr`, counts, seconds),
so reports read both alike. Install with `pip install 'disperse-then-merge[lmeval]'`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from dtm.errors import DtmError


def fold_metrics(raw: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's {"acc,none": x, "acc_stderr,none": s, "exact_match,strict-match": y} ->
    {"acc": x, "acc_stderr": s, "exact_match_strict-match": y}; non-numbers dropped."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, filt = key.split(",", 1)
        stderr = name.endswith("_stderr")
        base = name[: -len("_stderr")] if stderr else name
        label = base if filt == "none" else f"{base}_{filt}"
        out[f"{label}_stderr" if stderr else label] = value
    return out


def run_lm_eval(
    model: str | os.PathLike,
    tasks: list[str],
    out: str | os.PathLike | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    num_fewshot: int | None = None,
    device: str = "cpu",
    include_path: str | os.PathLike | None = None,
    dtype: str = "float32",
    model_args: str = "",
) -> dict[str, Any]:
    """Evaluate `model` on lm-eval tasks (names, or tasks defined in YAMLs under `include_path`);
    returns {task: result} in our shape and writes it like `evaluate` does."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DtmError("the lm-eval backend needs lm-evaluation-harness: pip install 'disperse-then-merge[lmeval]'") from None
    path = Path(model)
    if not (path / "config.json").is_file():
        raise DtmError(f"{path}: not a model directory (no config.json)")
    from dtm.evaluation.harness import resolve_device

    device = str(resolve_device(device))  # "auto" as our own evaluation means it
    args = f"pretrained={path},dtype={dtype}" + (f",{model_args}" if model_args else "")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    start = time.perf_counter()
    try:
        raw = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(tasks), batch_size=batch_size, limit=limit,
                                      num_fewshot=num_fewshot, device=device, task_manager=manager)
    except Exception as e:  # lm-eval raises plain exceptions for unknown tasks / missing data
        raise DtmError(f"lm-eval failed on {tasks}: {type(e).__name__}: {e}") from None
    seconds = time.perf_counter() - start
    samples = raw.get("n-samples", {})
    results = {}
    for task, metrics in raw["results"].items():
        n = samples.get(task, {}).get("effective")
        results[task] = {
            "task": task, "type": "lm-eval", "backend": f"lm-eval {getattr(lm_eval, '__version__', '')}".strip(),
            "model": str(path), "ensemble": False, "metrics": fold_metrics(metrics), "groups": {},
            "counts": {"items": n, "truncated": None}, "num_fewshot": num_fewshot, "limit": limit,
            "seconds": round(seconds, 4),  # the whole lm-eval call (all its tasks)
        }
    if out is not None:
        from dtm.evaluation.results import ResultStore

        store = ResultStore(out)
        for task, result in results.items():
            store.save(task, result, None)
    return results
