"""The environment switches dtm reads, in one place, parsed one way.

They are escape hatches and scheduling choices, not settings of an experiment: none may change
a stage's result or its hash, so they live outside the config (docs/architecture.md).

    DTM_CHUNKED_LOSS=0       training: transformers' plain loss instead of the chunked one
    DTM_MERGE_KERNELS=0      merging: torch's ops instead of the fused numba kernels
    DTM_SEEDS_SEQUENTIAL=1   pipeline: a run's seed runs one after another, not side by side

Each is a yes/no: 1, true, yes, on or 0, false, no, off (any case); unset or empty means the
default. Anything else is an error naming the variable, not a guess.
"""

from __future__ import annotations

import os

from dtm.errors import ConfigError

CHUNKED_LOSS = "DTM_CHUNKED_LOSS"
MERGE_KERNELS = "DTM_MERGE_KERNELS"
SEEDS_SEQUENTIAL = "DTM_SEEDS_SEQUENTIAL"

_YES = {"1", "true", "yes", "on"}
_NO = {"0", "false", "no", "off"}


def env_flag(name: str, default: bool) -> bool:
    """The yes/no environment variable `name`, or `default` when it is unset or empty."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _YES:
        return True
    if raw in _NO:
        return False
    raise ConfigError(f"environment variable {name}={os.environ[name]!r}: say 1 or 0 (or true/false, yes/no, on/off)")
