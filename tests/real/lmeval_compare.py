"""What the real tier's two lm-eval comparisons share: lm-eval's logged samples and dtm's on the
same converted model (CPU, float32, the same batch size), and the context of a logged request."""

from __future__ import annotations

from pathlib import Path

from dtm.evaluation.harness import load_scorer
from dtm.evaluation.runner import run_task
from dtm.evaluation.tasks import Task

BATCH = 8


def lm_eval_samples(model: Path, task_names: list[str], include: Path) -> dict[str, list[dict]]:
    """lm-eval's logged samples of `task_names` (task YAMLs under `include`), by task name."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model), batch_size=BATCH, device="cpu", dtype="float32")
    return lm_eval.simple_evaluate(model=lm, tasks=task_names, task_manager=TaskManager(include_path=str(include)),
                                   log_samples=True)["samples"]


def dtm_samples(model: Path, tasks: dict[str, Task]) -> dict[str, list[dict]]:
    """dtm's per-row samples of each task, by task name (loaded after lm-eval's model is gone)."""
    scorer = load_scorer(model, device="cpu")
    return {name: run_task(scorer, task, batch_size=BATCH, progress=False)[1] for name, task in tasks.items()}


def request_contexts(sample: dict) -> list[str]:
    """The context of each of a sample's requests (lm-eval logs request args as tuples or as {arg_0, arg_1})."""
    return [a[0] if isinstance(a, (list, tuple)) else a["arg_0"] for a in sample["arguments"]]
