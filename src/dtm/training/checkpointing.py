"""Activation checkpointing (`train.gradient_checkpointing`): off, every layer recomputed (`true`),
or `"selective"`: keep what is expensive to recompute, recompute what is cheap.

Why a selective mode: with LoRA on a frozen base, backward computes no weight gradients for
the base, so it costs about one forward, and recomputing each decoder layer in backward (`true`)
adds a forward to a step of about two. Yet most of what a layer keeps for backward without
checkpointing is cheap to recompute: the norms' products, RoPE, the SiLU and the gated product of
the MLP, residual sums, LoRA's rank-r products, GQA's repeated keys and values. `"selective"`
checkpoints each decoder layer (as `true` does) under torch's selective activation checkpointing
(`torch.utils.checkpoint.create_selective_checkpoint_contexts`): the forward keeps the outputs of
the operations that are expensive per element (the attention kernels, and matrix products over
at least half the model's hidden size: the frozen projections), and backward reruns the layer
with those outputs replayed, so it recomputes only the cheap operations. The rule is by
computation per element kept, not by name, so it holds for full fine-tuning, any LoRA targets
and eager attention too (whose [T, T] scores, a product over the head size, are recomputed).

Checkpointing never changes the maths: backward sees the same values (random ops such as
dropout are replayed with the forward's RNG state), `tests/test_train_sft.py` checks the weights
after training equal the uncheckpointed run's and measures what each mode keeps and recomputes.
Measured on the real model in docs/architecture.md ("Activation checkpointing", "Against TRL on
the real model"): on a small model on a CPU the cheap operations are not free, and `true` can be
the better trade.

dtm turns checkpointing on itself (the model's `activation_checkpointing_enable`, which the
Trainer would call) rather than through `TrainingArguments`: the selective policy is a function,
and the arguments are written out as JSON.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from dtm.errors import TrainingError

SELECTIVE = "selective"
# the values of `train.gradient_checkpointing` (config.py declares them as this Literal's members)
MODES = (False, True, SELECTIVE)

_aten = torch.ops.aten
# matrix products: (op, index of the left factor among the op's arguments); the product's inner size is its last dim
_PRODUCTS = {_aten.mm: 0, _aten.bmm: 0, _aten.addmm: 1, _aten.baddbmm: 1}
# fused attention kernels (CPU and GPU): cost grows with the sequence per element of output, always kept
_ATTENTION = {_aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_flash_attention,
              _aten._scaled_dot_product_efficient_attention, _aten._scaled_dot_product_cudnn_attention,
              _aten._flash_attention_forward, _aten._efficient_attention_forward}


def keep_expensive(min_inner: int, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The selective policy: keep an op's output when recomputing it costs at least `min_inner`
    multiply-adds per element (attention kernels; matrix products over >= `min_inner` terms),
    recompute everything else (elementwise ops, norms, views and copies, rank-r products)."""
    packet = getattr(op, "overloadpacket", None)  # None: a higher-order operator (compiled code), recomputed
    if packet in _ATTENTION:
        return CheckpointPolicy.MUST_SAVE
    left = _PRODUCTS.get(packet)
    if left is not None and args[left].shape[-1] >= min_inner:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def hidden_size(model: torch.nn.Module) -> int:
    """The model's hidden size (a PEFT wrapper's forwards to its model's config), or a clear error."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if not isinstance(size, int):
        raise TrainingError(f"train.gradient_checkpointing: {SELECTIVE!r} needs the model's hidden_size, which "
                            f"{type(model).__name__}'s config does not give; use true (every layer recomputed) instead")
    return size


def selective_contexts(min_inner: int) -> tuple[Any, Any]:
    """The context managers `torch.utils.checkpoint.checkpoint(context_fn=...)` wants, for `keep_expensive`."""
    return create_selective_checkpoint_contexts(partial(keep_expensive, min_inner))


def checkpoint_kwargs(model: torch.nn.Module, mode: bool | str) -> dict[str, Any] | None:
    """The keyword arguments of `torch.utils.checkpoint.checkpoint` for `mode`, None when off.
    Non-reentrant in both modes: LoRA then needs no gradient on the layers' inputs."""
    if mode is False:
        return None
    if mode is True:
        return {"use_reentrant": False}
    if mode == SELECTIVE:
        return {"use_reentrant": False, "context_fn": partial(selective_contexts, max(1, hidden_size(model) // 2))}
    raise TrainingError(f"train.gradient_checkpointing: {mode!r} is not one of false, true, {SELECTIVE!r}")


def enable(model: torch.nn.Module, mode: bool | str) -> None:
    """Turn `train.gradient_checkpointing`'s mode on in `model`'s decoder layers (nothing when off)."""
    kwargs = checkpoint_kwargs(model, mode)
    if kwargs is None:
        return
    if not hasattr(model, "activation_checkpointing_enable"):
        raise TrainingError(f"train.gradient_checkpointing: {type(model).__name__} has no activation checkpointing; "
                            "set it to false")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    # transformers also makes the embeddings' output require a gradient, which only reentrant
    # checkpointing needs; with LoRA it costs a backward through the first layer to the frozen
    # embeddings in every step (the first layer's attention and MLP input gradients), for nothing
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
