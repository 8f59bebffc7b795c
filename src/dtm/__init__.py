"""disperse-then-merge: instruction tuning without the alignment tax.

The Python API mirrors the CLI, one function per pipeline stage:

    import dtm
    cfg = dtm.load_config("examples/lab.yaml")
    portions = dtm.disperse("data.jsonl", k=4, strategy="random", out="portions/")

Stage functions are imported lazily so that `import dtm` stays cheap (no torch import).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"; modules are imported on first use.
_API = {
    "load_config": "dtm.config:load_config",
    "ExperimentConfig": "dtm.config:ExperimentConfig",
    "load_conversations": "dtm.data.formats:load_conversations",
    "Conversation": "dtm.data.formats:Conversation",
    "disperse": "dtm.dispersal:disperse",
    "train": "dtm.training:train",
    "train_model": "dtm.training:train_model",
    "train_baseline": "dtm.training:train_baseline",
    "compute_fisher": "dtm.fisher:compute_fisher",
    "merge": "dtm.merging:merge",
    "evaluate": "dtm.evaluation:evaluate",
    "evaluate_many": "dtm.evaluation:evaluate_many",
    "tax_curve": "dtm.evaluation.diagnostics:tax_curve",
    "run": "dtm.sweep:run",  # a plain run or a sweep (which hands plain runs to dtm.pipeline)
    "status": "dtm.sweep:status",
    "write_report": "dtm.sweep:write_report",
    "render_report": "dtm.report:render_report",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name].split(":")
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dtm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))
