"""Evaluation: task files, the scoring harness, ensembles, suites, tax diagnostics.

    import dtm
    dtm.evaluate("runs/x/models/merged", ["knowledge.yaml", "mc.jsonl"], out="eval/merged.json")

- `tasks.py`: the task format (YAML spec + JSONL), validation, suites, the paper's benchmarks;
- `harness.py`: model loading and scoring (packed multiple choice, KV-cached greedy generation,
  rolling perplexity), ensembles;
- `metrics.py`: acc/acc_norm, exact/pattern match, extractors, standard errors;
- `runner.py`: `evaluate`, `evaluate_many`, per-task result files, resume;
- `diagnostics.py`: the tax curve and the train/validation loss-reduction ratio;
- `convert.py`: hub-format rows of the paper's benchmarks -> our task rows;
- `lmeval.py`: the optional lm-evaluation-harness backend; `codeexec.py`: sandboxed code tasks.
"""

from dtm.evaluation.convert import convert_rows
from dtm.evaluation.diagnostics import bias_diagnostic, curve_from_results, loss_reduction_ratios, tax_curve
from dtm.evaluation.runner import evaluate, evaluate_many, evaluate_models
from dtm.evaluation.tasks import BUILTIN_SUITES, PAPER_TASKS, Task, TaskSpec, load_task, resolve_tasks

__all__ = [
    "BUILTIN_SUITES", "PAPER_TASKS", "Task", "TaskSpec", "bias_diagnostic", "convert_rows", "curve_from_results", "evaluate",
    "evaluate_many", "evaluate_models", "load_task", "loss_reduction_ratios", "resolve_tasks", "tax_curve",
]
