"""Diagonal Fisher information of a model, for Fisher-weighted merging (`method="fisher"`).

F_i = E_x[(d log p(x) / d theta_i)^2], the empirical Fisher over the given texts, one backward
pass per text (Matena & Raffel 2022 use per-example gradients; batching would give the square
of summed gradients instead, which is a different and worse estimate). Saved as
`fisher.safetensors` in the model directory with the model's own tensor names, where the merge
engine looks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dtm.merging.checkpoint import FISHER_FILE, MergeError
from dtm.merging.lora import is_adapter

log = logging.getLogger("dtm.merging")


def compute_fisher(
    model_dir: str | Path, texts: Sequence[str], out: str | Path | None = None, max_length: int = 512,
    trust_remote_code: bool = False,
) -> Path:
    """Write the diagonal empirical Fisher of the full model in `model_dir` to `out`
    (default `model_dir/fisher.safetensors`); return the path."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if is_adapter(model_dir):
        raise MergeError(f"{model_dir}: is a LoRA adapter; the Fisher is computed on full weights: merge it first (dtm merge)")
    if not texts:
        raise MergeError("no texts to compute the Fisher on")
    out = Path(out) if out is not None else model_dir / FISHER_FILE
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()  # no dropout: the Fisher of the model as it will be used
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    used = 0
    for text in tqdm(texts, desc="fisher", unit="text"):
        ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        if ids.shape[1] < 2:
            continue
        model.zero_grad(set_to_none=True)
        # loss is the mean over predicted tokens; times their number = -log p(x)
        loss = model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n].add_(p.grad.detach() ** 2)
        used += 1
    if used == 0:
        raise MergeError("every text was shorter than 2 tokens; give longer texts")
    state = {n: (f / used).contiguous() for n, f in fisher.items()}
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: never a partial Fisher file
    save_file(state, tmp, metadata={"format": "pt", "examples": str(used)})
    tmp.replace(out)
    log.info("fisher of %s over %d texts -> %s", model_dir, used, out)
    return out
