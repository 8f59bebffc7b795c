"""Merge methods: small pure functions on one tensor name across K models, and their registry.

Every method takes the K models' tensors for one name (already in the compute dtype), one
weight per model and, where the method needs it, the base model's tensor, and returns the
merged tensor. The streaming engine (`engine.py`) calls them one tensor name at a time, so
a method never sees a whole model and memory stays bounded by a few tensors times K.

Names and parameters follow mergekit where it has the method (`linear`, `task_arithmetic`,
`ties`, `dare_linear`, `dare_ties`; `weight`, `density`, `lambda`), so a mergekit user's YAML
reads the same. References:
  task arithmetic  Ilharco et al. 2023, "Editing models with task arithmetic"
  WiSE-FT          Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"
  TIES             Yadav et al. 2023, "TIES-Merging"
  DARE             Yu et al. 2024, "Language models are Super Mario"
  Fisher merging   Matena & Raffel 2022, "Merging models with Fisher-weighted averaging"
  model soups      Wortsman et al. 2022, "Model soups"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# ---------------------------------------------------------------- building blocks


def weighted_average(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k w_k x_k / sum_k w_k, accumulated in place (one output buffer, no stacking).

    The accumulation order and rounding (x_0 w_0, then `addcmul_` of each next model, then one
    division by the weight sum) are the same as mergekit's `linear`, so results agree bitwise.
    """
    total = float(sum(weights))
    out = torch.mul(tensors[0], weights[0])
    for x, w in zip(tensors[1:], weights[1:]):
        out.addcmul_(x, torch.tensor(w, dtype=out.dtype))
    return out.div_(total)


def trim(delta: Tensor, density: float) -> Tensor:
    """TIES step 1: keep the `density` fraction of entries with the largest magnitude, zero the rest.

    At least one entry survives in a non-empty tensor when density > 0 (as in mergekit).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def elect_sign(deltas: Tensor) -> Tensor:
    """TIES step 2: per entry, the sign (+1/-1) of the summed deltas: the sign with more total mass.

    `deltas` is stacked [K, ...] (already weighted). A zero sum elects +1 (as mergekit does).
    """
    return torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_mean(deltas: Tensor, weights: Tensor, sign: Tensor) -> Tensor:
    """TIES step 3: mean over only the models whose delta agrees with the elected sign.

    `deltas` are the weighted deltas [K, ...], `weights` has shape [K, 1, ...]. Entries where
    no model agrees (all zero after trimming) stay 0. Accumulates model by model, so the extra
    memory is two tensors, not K.
    """
    total = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign)
    for d, w in zip(deltas, weights):
        agree = (torch.sign(d) == sign).to(d.dtype)
        total.addcmul_(d, agree)
        divisor.add_(agree.mul_(w))
    divisor[divisor == 0] = 1
    return total.div_(divisor)


def stacked_deltas(tensors: Sequence[Tensor], base: Tensor, weights: Sequence[float], sparsify: Callable[[Tensor], Tensor]) -> Tensor:
    """[K, ...] weighted, sparsified task vectors, filled one model at a time (one K-sized buffer)."""
    out = torch.empty((len(tensors), *base.shape), dtype=base.dtype)
    for i, (x, w) in enumerate(zip(tensors, weights)):
        out[i] = sparsify(x - base).mul_(w)
    return out


def dare_drop(delta: Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: drop each entry with probability p = 1 - density, rescale survivors by 1 / (1 - p).

    The rescale keeps the expected delta unchanged (the DARE paper's choice; mergekit instead
    rescales to the L1 norm).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    out = delta * keep.to(delta.dtype)
    return out.div_(density) if rescale else out


def _weights_like(weights: Sequence[float], like: Tensor) -> Tensor:
    """Weights as a [K, 1, 1, ...] tensor that broadcasts against stacked [K, ...] tensors."""
    return torch.tensor(list(weights), dtype=like.dtype).reshape(-1, *([1] * like.dim()))


# ---------------------------------------------------------------- methods (per tensor)


def average(tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None = None) -> Tensor:
    """Uniform or weighted average (the paper's merge; also the uniform model soup)."""
    return weighted_average(tensors, weights)


def task_arithmetic(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, scaling: float = 1.0
) -> Tensor:
    """base + lambda * sum_k w_k (x_k - base): add the scaled task vectors back to the base."""
    out = base.clone()
    for x, w in zip(tensors, weights):
        out.add_(x - base, alpha=scaling * w)
    return out


def wise_ft(tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, alpha: float = 0.5) -> Tensor:
    """(1 - alpha) * base + alpha * fine-tuned: the WiSE-FT interpolation (one fine-tuned model)."""
    (tuned,) = tensors
    return torch.lerp(base, tuned, alpha)


def ties(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, density: float = 1.0, scaling: float = 1.0
) -> Tensor:
    """TIES: trim each task vector to `density`, elect a sign per entry, average the agreeing ones."""
    deltas = stacked_deltas(tensors, base, weights, lambda d: trim(d, density))
    merged = disjoint_mean(deltas, _weights_like(weights, base), elect_sign(deltas))
    return merged.mul_(scaling).add_(base)


def dare_linear(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, density: float = 1.0,
    scaling: float = 1.0, rescale: bool = True, generator: torch.Generator | None = None,
) -> Tensor:
    """DARE then task arithmetic: base + lambda * sum_k w_k dare(x_k - base)."""
    generator = generator or torch.Generator().manual_seed(0)
    out = base.clone()
    for x, w in zip(tensors, weights):
        out.add_(dare_drop(x - base, density, generator, rescale), alpha=scaling * w)
    return out


def dare_ties(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, density: float = 1.0,
    scaling: float = 1.0, rescale: bool = True, generator: torch.Generator | None = None,
) -> Tensor:
    """DARE sparsification, then TIES sign election and disjoint mean."""
    generator = generator or torch.Generator().manual_seed(0)
    deltas = stacked_deltas(tensors, base, weights, lambda d: dare_drop(d, density, generator, rescale))
    merged = disjoint_mean(deltas, _weights_like(weights, base), elect_sign(deltas))
    return merged.mul_(scaling).add_(base)


def fisher(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None = None,
    fishers: Sequence[Tensor] = (), fisher_floor: float = 1e-6,
) -> Tensor:
    """Fisher-weighted average: sum_k w_k F_k x_k / sum_k w_k F_k with diagonal Fishers F_k.

    F_k is floored at `fisher_floor` (as Matena & Raffel do), so a parameter no data touched
    falls back to the plain weighted average instead of 0/0.
    """
    if len(fishers) != len(tensors):
        raise ValueError(f"fisher merge needs one Fisher tensor per model, got {len(fishers)} for {len(tensors)}")
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for x, f, w in zip(tensors, fishers, weights):
        fw = f.to(x.dtype).clamp(min=fisher_floor).mul_(w)
        num.addcmul_(fw, x)
        den.add_(fw)
    return num.div_(den)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its per-tensor function and what the engine must hand it."""

    name: str
    fn: Callable[..., Tensor]
    summary: str
    needs_base: bool = False
    # user-facing parameter name -> (function keyword, default); mergekit spells scaling `lambda`
    params: dict[str, tuple[str, Any]] = field(default_factory=dict)
    random: bool = False  # gets a per-tensor seeded `generator`
    uses_fisher: bool = False  # gets `fishers`, one tensor per model
    max_models: int | None = None
    normalizes_weights: bool = False  # weights are relative (only their ratios matter)
    # output element i depends only on input elements i: the engine may merge in cache-sized chunks
    elementwise: bool = False


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod("average", average, "uniform or weighted average (the paper's merge; the uniform soup)",
                    normalizes_weights=True, elementwise=True),
        MergeMethod("task_arithmetic", task_arithmetic, "base + lambda * sum_k w_k (model_k - base)",
                    needs_base=True, params={"lambda": ("scaling", 1.0)}, elementwise=True),
        MergeMethod("wise_ft", wise_ft, "(1 - alpha) * base + alpha * model (WiSE-FT; one model)",
                    needs_base=True, params={"alpha": ("alpha", 0.5)}, max_models=1, elementwise=True),
        MergeMethod("ties", ties, "TIES: trim to density, elect sign, disjoint mean",
                    needs_base=True, params={"density": ("density", 1.0), "lambda": ("scaling", 1.0)}),
        MergeMethod("dare_linear", dare_linear, "DARE (drop 1-density, rescale) + task arithmetic",
                    needs_base=True, random=True,
                    params={"density": ("density", 1.0), "lambda": ("scaling", 1.0), "rescale": ("rescale", True)}),
        MergeMethod("dare_ties", dare_ties, "DARE (drop 1-density, rescale) + TIES sign election",
                    needs_base=True, random=True,
                    params={"density": ("density", 1.0), "lambda": ("scaling", 1.0), "rescale": ("rescale", True)}),
        MergeMethod("fisher", fisher, "Fisher-weighted average (diagonal Fisher per model, see `dtm fisher`)",
                    uses_fisher=True, params={"fisher_floor": ("fisher_floor", 1e-6)}, normalizes_weights=True,
                    elementwise=True),
    ]
}
# mergekit's name for the weighted average (the uniform model soup is `average` too); the greedy
# soup is a model-level loop in engine.py.
ALIASES = {"linear": "average"}
MODEL_LEVEL_METHODS = {"greedy_soup": "greedy soup: add a model (best score first) only if the soup's score improves"}


def method_names() -> list[str]:
    return sorted([*METHODS, *ALIASES, *MODEL_LEVEL_METHODS])


def get_method(name: str) -> MergeMethod:
    key = ALIASES.get(name, name)
    if key not in METHODS:
        raise KeyError(name)
    return METHODS[key]


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, independent of processing order (so a merge is reproducible)."""
    h = 0
    for ch in f"{seed}:{name}".encode():
        h = (h * 1_000_003 + ch) % (2**61 - 1)
    return h


def resolve_params(method: MergeMethod, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """Map user parameters (mergekit names) to function keywords, with defaults; unknown keys raise KeyError."""
    out = {kw: default for kw, default in method.params.values()}
    for key, value in (parameters or {}).items():
        if key not in method.params:
            raise KeyError(key)
        kw, default = method.params[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{key}: expected true or false, got {value!r}")
        elif isinstance(default, float):
            value = float(value)
        out[kw] = value
    return out


__all__ = [
    "ALIASES", "METHODS", "MergeMethod", "average", "dare_drop", "dare_linear", "dare_ties", "disjoint_mean",
    "elect_sign", "fisher", "get_method", "method_names", "resolve_params", "task_arithmetic", "stacked_deltas",
    "ties", "trim", "weighted_average", "wise_ft",
]
