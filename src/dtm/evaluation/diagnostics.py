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


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target ids, cross-entropies) of every labelled position of a batch, in reading order.

    Position t predicts labels[t + 1], as training's loss does (`labels` are the inputs with
    -100 outside the response), so summing these losses gives training's summed loss.
    """
    from dtm.data.template import IGNORE_INDEX

    logits, target = logits[:, :-1].float(), labels[:, 1:]
    mask = target != IGNORE_INDEX
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.clamp_min(0).reshape(-1),
                                               reduction="none").reshape(target.shape)
    return target[mask], losses[mask]


@torch.inference_mode()
def example_token_losses(scorer: Any, examples: Sequence[dict[str, list[int]]], batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example (in the given order): (target ids, losses) of its response tokens under the
    scorer's first model (an ensemble has no single training loss)."""
    from dtm.data.template import IGNORE_INDEX
    from dtm.evaluation.harness import batches_by_length

    out: list[Any] = [None] * len(examples)
    model = scorer.models[0]
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
        logits = model(input_ids=ids.to(scorer.device), attention_mask=attn.to(scorer.device), use_cache=False).logits.cpu()
        for b, i in enumerate(batch):
            out[i] = per_token_losses(logits[b:b + 1], labels[b:b + 1])
    return out


def response_loss(scorer: Any, conversations: Sequence[Any], template: str = "alpaca", cutoff_len: int = 1024, batch_size: int = 16) -> float:
    """Mean cross-entropy over response tokens, exactly as training computes it (same
    tokenisation and labels, `dtm.data.template`), averaged over tokens."""
    from dtm.data.template import tokenize_conversations

    examples, _ = tokenize_conversations(list(conversations), scorer.tokenizer, template, min(cutoff_len, scorer.max_length))
    if not examples:
        raise DtmError("no examples left to measure the loss on (all empty after tokenisation)")
    per_example = example_token_losses(scorer, examples, batch_size)
    count = sum(len(losses) for _, losses in per_example)
    return sum(float(losses.sum()) for _, losses in per_example) / max(count, 1)


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


# ---------------------------------------------------------------- which tokens' loss fell (the paper's Sec. 2)
#
# The paper's evidence that late SFT fits data-specific bias: early in training the tokens whose
# loss falls most are common words (format, function words); late, they are rare, data-specific
# tokens. We measure it on vanilla's snapshots: the per-token loss on a fixed sample of the
# training data at each snapshot, the drop since the previous snapshot aggregated by token id,
# and each token's frequency rank among the response tokens of the whole training split.


def loss_drop_by_token(ids: torch.Tensor, before: torch.Tensor, after: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss drop `before - after`, occurrences) per token id, over aligned positions
    (the same sample's response tokens under two snapshots)."""
    if not ids.shape == before.shape == after.shape:
        raise ValueError(f"positions do not align: ids {tuple(ids.shape)}, before {tuple(before.shape)}, after {tuple(after.shape)}")
    drop = torch.zeros(vocab_size, dtype=torch.float64).index_add_(0, ids, (before - after).double())
    return drop, torch.bincount(ids, minlength=vocab_size)


def token_counts(examples: Sequence[dict[str, list[int]]], vocab_size: int) -> torch.Tensor:
    """How often each token id is a training target (a labelled response token after the first position)."""
    from dtm.data.template import IGNORE_INDEX

    targets = [t for e in examples for t in e["labels"][1:] if t != IGNORE_INDEX]
    return torch.bincount(torch.tensor(targets, dtype=torch.long), minlength=vocab_size)


def frequency_ranks(counts: torch.Tensor) -> torch.Tensor:
    """Rank 1 = the most frequent token; tied tokens share the best rank (1 + how many are
    strictly more frequent), so a rank does not depend on token ids."""
    ascending = counts.sort().values
    return len(counts) - torch.searchsorted(ascending, counts, right=True) + 1


def top_dropping(drop: torch.Tensor, count: torch.Tensor, n: int, min_count: int = 1) -> list[int]:
    """The `n` token ids with the largest *mean* loss drop per occurrence, among tokens seen at
    least `min_count` times (ties: lower id first).

    Mean, not summed: a sum grows with a token's frequency, so ranking by it would make the
    most-dropping tokens frequent by construction, the very thing this diagnostic asks about."""
    seen = (count >= max(min_count, 1)).nonzero().flatten().tolist()
    mean = drop / count.clamp_min(1)
    return sorted(seen, key=lambda i: (-float(mean[i]), i))[:n]


def _median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def interval_summary(drop: torch.Tensor, count: torch.Tensor, ranks: torch.Tensor, freq: torch.Tensor, top: int,
                     min_count: int, decode: Any = str) -> dict[str, Any]:
    """One interval between snapshots: its top tokens (id, text, mean drop, occurrences in the
    sample, frequency in the training data and its rank), their median frequency rank, and every
    token seen `min_count` times as [id, mean drop, occurrences, rank] (the plot's points)."""
    mean = drop / count.clamp_min(1)
    ids = top_dropping(drop, count, top, min_count)
    seen = (count >= max(min_count, 1)).nonzero().flatten().tolist()
    return {
        "top": [{"id": i, "token": decode(i), "mean_drop": round(float(mean[i]), 6), "count": int(count[i]),
                 "frequency": int(freq[i]), "rank": int(ranks[i])} for i in ids],
        "median_rank_top": _median([int(ranks[i]) for i in ids]),
        "median_rank_all": _median([int(ranks[i]) for i in seen]),
        "mean_drop": round(float(drop.sum() / max(int(count.sum()), 1)), 6),
        "tokens": [[i, round(float(mean[i]), 6), int(count[i]), int(ranks[i])] for i in seen],
    }


def _load_ref(ref: Any, device: str | None) -> Any:
    """A model reference as the plan writes it: a directory, or {"model": base, "adapter": dir}."""
    from dtm.evaluation.harness import load_scorer

    if isinstance(ref, Mapping):
        return load_scorer(ref["model"], adapter=ref.get("adapter"), device=device, share_context=False)
    return load_scorer(ref, device=device, share_context=False)


def token_loss_diagnostic(
    snapshots: Sequence[tuple[float, Any]],
    sample: Sequence[Any],
    train: Sequence[Any],
    template: str = "alpaca",
    cutoff_len: int = 1024,
    first_turn_only: bool = True,
    top: int = 10,
    min_count: int = 3,
    batch_size: int = 16,
    device: str | None = "auto",
) -> dict[str, Any]:
    """For each pair of consecutive snapshots (fraction, model reference; the base at 0), the
    tokens whose loss on `sample` (training conversations) fell most, with their frequency among
    the response tokens of `train` (the whole training split): `interval_summary` per interval."""
    from dtm.data.template import tokenize_conversations

    snapshots = sorted(snapshots, key=lambda s: s[0])
    if len(snapshots) < 2:
        raise DtmError(f"the token-loss diagnostic needs at least two snapshots (the base and one more), got {len(snapshots)}")
    per_snapshot: list[tuple[torch.Tensor, torch.Tensor]] = []
    examples: list[dict[str, list[int]]] = []
    counts = vocab = decode = None
    for _, ref in snapshots:
        scorer = _load_ref(ref, device)
        if counts is None:
            tok, cut = scorer.tokenizer, min(cutoff_len, scorer.max_length)
            examples, _ = tokenize_conversations(list(sample), tok, template, cut, first_turn_only)
            if not examples:
                raise DtmError("token-loss diagnostic: no sampled training example has a response token left after tokenisation")
            vocab = int(scorer.models[0].get_output_embeddings().weight.shape[0])
            counts = token_counts(tokenize_conversations(list(train), tok, template, cut, first_turn_only)[0], vocab)
            decode = lambda i, tok=tok: tok.decode([i])  # noqa: E731
        pairs = example_token_losses(scorer, examples, batch_size)
        per_snapshot.append((torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])))
        del scorer
    ranks = frequency_ranks(counts)
    intervals = []
    for (f0, _), (f1, _), (ids, before), (_, after) in zip(snapshots, snapshots[1:], per_snapshot, per_snapshot[1:]):
        drop, count = loss_drop_by_token(ids, before, after, vocab)
        intervals.append({"from": f0, "to": f1, **interval_summary(drop, count, ranks, counts, top, min_count, decode)})
    return {"fractions": [f for f, _ in snapshots], "sample_examples": len(examples), "sample_tokens": int(per_snapshot[0][0].numel()),
            "train_tokens": int(counts.sum()), "distinct_train_tokens": int((counts > 0).sum()), "top": top, "min_count": min_count,
            "mean_loss": [round(float(losses.mean()), 6) for _, losses in per_snapshot], "intervals": intervals}
