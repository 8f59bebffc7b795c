"""Alignment-tax diagnostics: the benchmark curve over training, and the bias ratio.

- `tax_curve`: evaluate checkpoints saved at fractions of the data (10%, 20%, ...) and return,
  per task and metric, the values against the fraction (plain data; the report plots it).
- `loss_reduction_ratios`: between consecutive checkpoints, how much the training loss fell
  per unit of validation-loss fall. The paper reads a rising ratio late in training as the
  model memorising data-specific biases rather than learning what generalises.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dtm.errors import DtmError


def curve_from_results(results: Mapping[float, Mapping[str, Any]]) -> dict[str, Any]:
    """{fraction: {task: result}} -> {"fractions": [...], "tasks": {task: {metric: [value per fraction]}}}.

    Standard errors are kept as their own series (`acc_stderr`); a task missing at some
    fraction gets None there.
    """
    fractions = sorted(results)
    tasks: dict[str, dict[str, list[Any]]] = {}
    names = sorted({t for f in fractions for t in results[f]})
    for name in names:
        metric_names: list[str] = []
        for f in fractions:
            for m, v in (results[f].get(name, {}).get("metrics", {})).items():
                if m not in metric_names and (v is None or isinstance(v, (int, float))):
                    metric_names.append(m)
        tasks[name] = {m: [results[f].get(name, {}).get("metrics", {}).get(m) for f in fractions] for m in metric_names}
    return {"fractions": fractions, "tasks": tasks}


def tax_curve(
    checkpoints: Mapping[float, str | os.PathLike] | Sequence[tuple[float, str | os.PathLike]],
    tasks: list[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate each checkpoint (data fraction -> model dir) on `tasks`; the curve per benchmark.

    A fraction of 0 is the base model. Keyword arguments go to `evaluate_many` (batch_size,
    limit, suites, adapter-free options...). Results per checkpoint land in
    `out_dir/frac-<fraction>.json`, so an interrupted curve resumes.
    """
    from dtm.evaluation.runner import evaluate_many

    pairs = sorted(checkpoints.items() if isinstance(checkpoints, Mapping) else checkpoints)
    for frac, _ in pairs:
        if not 0 <= frac <= 1:
            raise DtmError(f"checkpoint fraction {frac} is outside [0, 1]")
    named = {f"frac-{frac:g}": path for frac, path in pairs}
    by_name = evaluate_many(named, tasks, out_dir, **kwargs)
    curve = curve_from_results({frac: by_name[f"frac-{frac:g}"] for frac, _ in pairs})
    curve["checkpoints"] = [str(p) for _, p in pairs]
    return curve


def loss_reduction_ratios(train_losses: Sequence[float], val_losses: Sequence[float]) -> list[float | None]:
    """(train[i-1] - train[i]) / (val[i-1] - val[i]) for consecutive checkpoints.

    None where the validation loss did not change (the ratio is undefined); a negative value
    means the validation loss rose while the training loss fell, the clearest sign of bias.
    """
    if len(train_losses) != len(val_losses):
        raise ValueError(f"{len(train_losses)} training losses but {len(val_losses)} validation losses")
    out: list[float | None] = []
    for i in range(1, len(train_losses)):
        d_train = train_losses[i - 1] - train_losses[i]
        d_val = val_losses[i - 1] - val_losses[i]
        out.append(None if abs(d_val) < 1e-12 else d_train / d_val)
    return out


@torch.inference_mode()
def response_loss(scorer: Any, conversations: Sequence[Any], template: str = "alpaca", cutoff_len: int = 1024, batch_size: int = 16) -> float:
    """Mean cross-entropy over response tokens, exactly as training computes it (same
    tokenisation and labels, `dtm.data.template`), averaged over tokens."""
    from dtm.data.template import IGNORE_INDEX, tokenize_conversations
    from dtm.evaluation.harness import batches_by_length

    examples, _ = tokenize_conversations(list(conversations), scorer.tokenizer, template, min(cutoff_len, scorer.max_length))
    if not examples:
        raise DtmError("no examples left to measure the loss on (all empty after tokenisation)")
    total, count = 0.0, 0
    for batch in batches_by_length([len(e["input_ids"]) for e in examples], batch_size):
        T = max(len(examples[i]["input_ids"]) for i in batch)
        ids = torch.full((len(batch), T), scorer.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(batch), T), dtype=torch.long)
        for b, i in enumerate(batch):
            n = len(examples[i]["input_ids"])
            ids[b, :n] = torch.tensor(examples[i]["input_ids"])
            labels[b, :n] = torch.tensor(examples[i]["labels"])
            attn[b, :n] = 1
        ids, labels, attn = ids.to(scorer.device), labels.to(scorer.device), attn.to(scorer.device)
        for model in scorer.models[:1]:  # the loss of one model (ensembles have no single training loss)
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((target != IGNORE_INDEX).sum())
    return total / max(count, 1)


def bias_diagnostic(
    checkpoints: Mapping[float, str | os.PathLike] | Sequence[tuple[float, str | os.PathLike]],
    train_data: str | os.PathLike | Sequence[Any],
    val_data: str | os.PathLike | Sequence[Any],
    template: str = "alpaca",
    cutoff_len: int = 1024,
    batch_size: int = 16,
    max_samples: int | None = 1000,
    device: str | None = "auto",
) -> dict[str, Any]:
    """Train and validation response losses at each checkpoint, and the ratios of their
    reductions between consecutive checkpoints (`loss_reduction_ratios`)."""
    from dtm.data.formats import load_conversations
    from dtm.evaluation.harness import load_scorer

    def convs(data: Any) -> list[Any]:
        if isinstance(data, (str, os.PathLike)):
            return load_conversations(data, max_samples=max_samples).conversations
        return list(data)[:max_samples] if max_samples else list(data)

    train, val = convs(train_data), convs(val_data)
    pairs = sorted(checkpoints.items() if isinstance(checkpoints, Mapping) else checkpoints)
    train_losses, val_losses = [], []
    for _, path in pairs:
        scorer = load_scorer(Path(path), device=device, share_context=False)
        train_losses.append(response_loss(scorer, train, template, cutoff_len, batch_size))
        val_losses.append(response_loss(scorer, val, template, cutoff_len, batch_size))
    ratios = loss_reduction_ratios(train_losses, val_losses)
    return {
        "fractions": [f for f, _ in pairs],
        "checkpoints": [str(p) for _, p in pairs],
        "train_loss": train_losses,
        "val_loss": val_losses,
        "ratio": ratios,
        "ratio_fractions": [f for f, _ in pairs[1:]],
        "finite": [r is not None and math.isfinite(r) for r in ratios],
    }
