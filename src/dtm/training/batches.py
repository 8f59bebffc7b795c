"""Tokenised examples and the batches built from them: plain-text LM examples, right-padded
and padding-free (packed) batches, the collator the trainer uses, and a held-out mean loss.

Kept apart from `sft.py` (the trainer) so that the baselines, the EWC penalty and the
curation scorer can build examples without importing the training entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dtm.data.template import IGNORE_INDEX, special_prefix

Example = dict[str, list[int]]


def text_examples(texts: Sequence[str], tokenizer: Any, cutoff_len: int) -> list[Example]:
    """Plain-text LM examples (replay, Fisher estimation): loss on every token, EOS at the end."""
    prefix = special_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for text in texts:
        ids = (prefix + tokenizer(text, add_special_tokens=False)["input_ids"] + eos)[:cutoff_len]
        if len(ids) > len(prefix) + 1:
            out.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids)})
    return out


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding has label -100 and attention 0."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def pack_batch(examples: Sequence[Example], pad_id: int, row_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Padding-free batch: the examples packed into rows, positions restarting at 0 for each.

    transformers builds a block-diagonal causal mask from the restarting `position_ids`
    (sdpa/eager: `masking_utils.find_packed_sequence_indices`; flash-attention natively), so
    no example attends to another, but only when the model runs without a KV cache
    (`use_cache=False`, which `load_base` sets; `test_padding_free_loss_equals_padded_loss`).
    The first label of each example is set to -100: it would otherwise be predicted from the
    previous example's last token. The loss is the padded batch's (same labelled tokens).

    Rows hold at most `row_tokens` tokens (first fit, longest example first; None: one row).
    One row suits flash-attention's variable-length kernels. Under sdpa/eager the mask is
    dense, so attention costs row² per row: rows of at most twice the longest example drop
    most padding while attention costs at most twice the padded batch's (the worst case: all
    examples of one length, where packing saves nothing); `benchmarks/bench_train_lab.py`
    measures packed against padded steps (`packed_row_tokens`).
    Shorter rows are right-padded; the padding is a segment of its own with label -100.
    """
    capacity = sum(len(e["input_ids"]) for e in examples) if row_tokens is None else row_tokens
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(e["input_ids"])
        fits = next((r for r in range(len(rows)) if room[r] >= n), None)
        if fits is None:
            rows.append([])
            room.append(max(capacity, n))
            fits = len(rows) - 1
        rows[fits].append(e)
        room[fits] -= n
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    input_ids, labels, positions = [], [], []
    for row in rows:
        ids, labs, pos = [], [], []
        for e in row:
            ids += e["input_ids"]
            labs += [IGNORE_INDEX, *e["labels"][1:]]
            pos += range(len(e["input_ids"]))
        padding = width - len(ids)
        input_ids.append(ids + [pad_id] * padding)
        labels.append(labs + [IGNORE_INDEX] * padding)
        positions.append(pos + list(range(padding)))
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def packed_row_tokens(attn_implementation: str | None, examples: Sequence[Example]) -> int | None:
    """Row length for `pack_batch`: one row for flash-attention, else twice the longest example."""
    if attn_implementation and "flash" in attn_implementation:
        return None
    return 2 * max(len(e["input_ids"]) for e in examples)


# A batch's real token count (padding excluded), a plain int counted while collating, so the
# trainer's tokens/s needs no device sync; DtmTrainer removes it before the model sees the batch.
REAL_TOKENS = "num_real_tokens"


def make_collator(packing: bool, pad_id: int, attn_implementation: str | None = None) -> Callable[[Sequence[Example]], dict[str, Any]]:
    def collate(batch: Sequence[Example]) -> dict[str, Any]:
        out: dict[str, Any] = (pack_batch(batch, pad_id, packed_row_tokens(attn_implementation, batch)) if packing
                               else pad_batch(batch, pad_id))
        out[REAL_TOKENS] = sum(len(e["input_ids"]) for e in batch)
        return out

    return collate


class ExampleDataset(torch.utils.data.Dataset):
    """A list of tokenised examples (a plain list keeps per-step overhead minimal)."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean loss over `examples` (labelled tokens only), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(examples[i : i + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(loss)
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)
