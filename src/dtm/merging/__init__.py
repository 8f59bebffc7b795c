"""Merging K sub-models into one: per-tensor methods, a streaming safetensors engine, exact LoRA merges.

    import dtm
    dtm.merge(["sub-1", "sub-2", "sub-3", "sub-4"], "merged")           # the paper's uniform average
    dtm.merge(["sft"], "wise", method="wise_ft", base="base", parameters={"alpha": 0.5})
"""

from dtm.merging.checkpoint import MergeError
from dtm.merging.engine import greedy_soup, merge
from dtm.merging.methods import METHODS, method_names

__all__ = ["METHODS", "MergeError", "greedy_soup", "merge", "method_names"]
