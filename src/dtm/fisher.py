"""The diagonal empirical Fisher of a causal LM: one estimator for EWC and for Fisher merging.

    F_i = mean over examples x of (d log p(labelled tokens of x) / d theta_i)^2

`log p` is the example's summed log-likelihood (the mean loss times the number of predicted
tokens), so this is the Fisher of the model's distribution over whole examples, as Matena &
Raffel (2022) use for merging. One backward pass per example: squaring a batch gradient
would give the square of summed gradients, a different and worse estimate.

Users: `dtm.training.regularizers` (EWC, which normalises it to mean 1, so its scale does
not matter there) and `compute_fisher` (`dtm fisher`, the pipeline), which writes
`fisher.safetensors` where the merge engine's `fisher` method reads it. This module imports
neither `dtm.training` nor `dtm.merging`, so both can depend on it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from dtm.data.template import IGNORE_INDEX
from dtm.errors import DataError, DtmError

log = logging.getLogger(__name__)

FISHER_FILE = "fisher.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name for a LoRA adapter directory's config

Example = Mapping[str, Sequence[int]]  # input_ids and labels (IGNORE_INDEX: not predicted)


def predicted_tokens(example: Example) -> int:
    """How many tokens the example's log-likelihood sums over (labels after the first)."""
    return sum(1 for t in list(example["labels"])[1:] if t != IGNORE_INDEX)


def _fisher_sums(model: torch.nn.Module, examples: Iterable[Example],
                 params: Mapping[str, torch.nn.Parameter]) -> tuple[dict[str, torch.Tensor], int]:
    """Summed squared per-example gradients, and how many examples had a token to predict."""
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is used
    previous = {k: p.requires_grad for k, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    sums = {k: torch.zeros(p.shape, dtype=torch.float32, device=device) for k, p in params.items()}
    used = 0
    try:
        for e in examples:
            n = predicted_tokens(e)
            if n == 0:
                continue
            ids = torch.tensor([list(e["input_ids"])], device=device)
            labels = torch.tensor([list(e["labels"])], device=device)
            # the model's loss is the mean over predicted tokens; times their number: -log p
            nll = model(input_ids=ids, labels=labels).loss * n
            grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
            for k, g in zip(params, grads, strict=True):
                if g is not None:
                    sums[k] += g.float().pow(2)
            used += 1
    finally:
        for k, p in params.items():
            p.requires_grad_(previous[k])
        model.train(was_training)
    return sums, used


def diagonal_fisher(model: torch.nn.Module, examples: Iterable[Example],
                    params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of `params` (name -> parameter) over tokenised examples.

    Examples with no labelled token to predict are skipped (and not counted). Runs in eval
    mode; `requires_grad` of the parameters and the model's mode are restored after.
    """
    sums, used = _fisher_sums(model, examples, params)
    return {k: s / max(used, 1) for k, s in sums.items()}


# ---------------------------------------------------------------- a model directory's Fisher file


def adapter_base(adapter_dir: Path) -> str:
    """The base model a LoRA adapter directory names (absolute, or relative to the adapter)."""
    name = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not name:
        raise DtmError(f"{adapter_dir}: {ADAPTER_CONFIG} names no base_model_name_or_path; pass base=")
    for candidate in (Path(name), adapter_dir / name):
        if candidate.is_dir():
            return str(candidate)
    return name


def load_dense(model_dir: Path, base: str | Path | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model in `model_dir` in fp32; a LoRA adapter is loaded on its base and merged in,
    so its parameters carry the base model's tensor names (as the merge engine sees it)."""
    from transformers import AutoModelForCausalLM

    if not (model_dir / ADAPTER_CONFIG).is_file():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    from peft import PeftModel

    base = str(base) if base is not None else adapter_base(model_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, model_dir).merge_and_unload()


def _examples_from(data: Sequence[str] | Sequence[Example], model_dir: Path, base: str | Path | None,
                   max_length: int, trust_remote_code: bool) -> list[Example]:
    """Tokenised examples as given, or plain texts tokenised with the model's tokenizer (its
    special tokens, truncated to `max_length`) with every token labelled."""
    if all(not isinstance(d, str) for d in data):
        bad = [i for i, d in enumerate(data) if not (isinstance(d, Mapping) and "input_ids" in d and "labels" in d)]
        if bad:
            raise DataError(f"Fisher examples: example {bad[0]} has no input_ids and labels")
        return list(data)  # type: ignore[arg-type]
    if not all(isinstance(d, str) for d in data):
        raise DataError("Fisher data: give plain texts or tokenised examples (input_ids, labels), not a mix")
    from transformers import AutoTokenizer

    source: str | Path = model_dir  # training saves the tokenizer beside an adapter too
    has_tokenizer = any((model_dir / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
    if not has_tokenizer and (model_dir / ADAPTER_CONFIG).is_file():
        source = base if base is not None else adapter_base(model_dir)
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    out = []
    for text in data:
        ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def compute_fisher(
    model_dir: str | Path, examples_or_texts: Sequence[str] | Sequence[Example], out: str | Path | None = None,
    max_length: int = 512, trust_remote_code: bool = False, base: str | Path | None = None,
    device: str | torch.device | None = None, progress: bool = True,
) -> Path:
    """Write the diagonal empirical Fisher of the model in `model_dir` to `out` (default
    `model_dir/fisher.safetensors`), under the model's own tensor names; return the path.

    `model_dir`: a full model, or a LoRA adapter directory (its base from `adapter_config.json`,
    or `base`): the adapter is merged into its base and the Fisher taken on the dense weights,
    under the base's names, which is how the merge engine presents an adapter.
    `examples_or_texts`: plain texts (every token predicted), or tokenised examples with
    labels (e.g. a portion's SFT examples, response tokens only), so each sub-model's Fisher
    can come from its own data. The file is written whole, then renamed into place.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DtmError(f"{model_dir}: model directory not found")
    if not examples_or_texts:
        raise DataError("no texts or examples to compute the Fisher on")
    examples = _examples_from(examples_or_texts, model_dir, base, max_length, trust_remote_code)
    out = Path(out) if out is not None else model_dir / FISHER_FILE
    model = load_dense(model_dir, base, trust_remote_code)
    if device is not None:
        model.to(device)
    params = dict(model.named_parameters())
    sums, used = _fisher_sums(model, tqdm(examples, desc="fisher", unit="example", disable=not progress), params)
    if used == 0:
        raise DataError("no example has a token to predict (texts shorter than 2 tokens, or every label masked)")
    state = {n: (s / used).cpu().contiguous() for n, s in sums.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # never a partial Fisher file under the real name
    save_file(state, str(tmp), metadata={"format": "pt", "examples": str(used)})
    tmp.replace(out)
    log.info("fisher of %s over %d examples -> %s", model_dir, used, out)
    return out
