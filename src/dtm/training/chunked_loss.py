"""The causal-LM loss without the logits of every position: LM head and cross-entropy only where
a label is not -100, a chunk of rows at a time, each chunk's logits recomputed in backward.

Why: with a real vocabulary (49k tokens for SmolLM2, 128k for Llama 3) the [positions, vocab]
logits, their fp32 copy and their gradient dominate training memory, while response-only
labels use a fraction of the positions. This is the idea of Liger-style fused/chunked
cross-entropy, written here in plain PyTorch (`torch.utils.checkpoint`) because the kernels
need a GPU and Triton; the loss is transformers' `ForCausalLMLoss` (summed token loss over
`num_items_in_batch`, else the mean), so values and gradients equal the plain path's within
float rounding (`tests/test_chunked_loss.py`); `benchmarks/bench_train_memory.py` measures it.

Only model structures known to be `logits = lm_head(decoder(...).last_hidden_state)` are
handled (`model_parts`); anything else keeps the plain path, and says why once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dtm.data.template import IGNORE_INDEX
from dtm.envflags import CHUNKED_LOSS, env_flag

CHUNK_ROWS = 256  # labelled positions per chunk: their logits are [CHUNK_ROWS, vocab] at most (50 MB fp32 at 49k);
# on SmolLM2 LoRA, 256 saved 3.6x (batch 4 x 256) and 1.3x (8 x 512) the peak RSS 1024 saved, at the same speed
# within the noise (benchmarks/results/bench_train_memory.json)
ENV_SWITCH = CHUNKED_LOSS  # "0": always the plain (transformers) loss, for comparison and as an escape hatch

# model types whose causal-LM head is a plain `lm_head(last_hidden_state)`: no logit scaling or
# soft-capping (Gemma 2, Cohere, Granite have them and keep the plain path)
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"})


@dataclass(frozen=True)
class Parts:
    """The two halves of a causal LM: the decoder (hidden states) and the output layer."""

    decoder: torch.nn.Module
    lm_head: torch.nn.Module


def chunked_loss_enabled() -> bool:
    return env_flag(ENV_SWITCH, default=True)


def model_parts(model: torch.nn.Module) -> Parts | str:
    """The decoder and LM head of `model` (a PEFT wrapper is looked through), or why not."""
    inner = model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in PLAIN_HEAD_TYPES:
        return f"model type {kind!r} is not one whose logits are a plain lm_head(hidden states) ({', '.join(sorted(PLAIN_HEAD_TYPES))})"
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({key}={getattr(config, key)})"
    decoder, head = getattr(inner, "model", None), inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(decoder, torch.nn.Module) or head is None or head is not getattr(inner, "lm_head", None):
        return f"{type(inner).__name__} has no `model` decoder and `lm_head` output layer"
    return Parts(decoder, head)


def _chunk_ce(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # fp32 logits, as transformers' ForCausalLMLoss upcasts them
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def labelled_hidden(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states [n, H] of the positions that predict a label, and those labels [n]
    (position t predicts label t+1, transformers' shift)."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


def summed_ce(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
              chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets` (rows with a label only), `chunk_rows` rows at a time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, max(hidden.shape[0], 1), chunk_rows):  # once at least: no label still gives a loss with a graph
        h, t = hidden[i : i + chunk_rows], targets[i : i + chunk_rows]
        # non-reentrant checkpoint: backward recomputes this chunk's logits instead of keeping them
        total = total + (checkpoint(_chunk_ce, head, h, t, use_reentrant=False) if torch.is_grad_enabled() else _chunk_ce(head, h, t))
    return total


def chunked_ce(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
               num_items_in_batch: torch.Tensor | int | None = None, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """`summed_ce` normalised as `ForCausalLMLoss`: over `num_items_in_batch`, else the mean."""
    total = summed_ce(head, hidden, targets, chunk_rows)
    if num_items_in_batch is None:
        return total / hidden.shape[0]  # nan for no labelled position, as cross_entropy's mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_loss(parts: Parts, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None,
                   chunk_rows: int | None = None) -> torch.Tensor:
    """The model's training loss on a batch (`inputs` with `labels`), as its own forward would give it
    (`chunk_rows` None: `CHUNK_ROWS`, read at call time so a benchmark can vary it)."""
    batch = dict(inputs)
    labels = batch.pop("labels")
    hidden = parts.decoder(**batch).last_hidden_state
    h, targets = labelled_hidden(hidden, labels.to(hidden.device))
    return chunked_ce(parts.lm_head, h, targets, num_items_in_batch, chunk_rows or CHUNK_ROWS)
