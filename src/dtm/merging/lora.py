"""LoRA adapters merged exactly.

A LoRA adapter k changes a weight W by the delta  D_k = scale_k * B_k @ A_k  with
scale_k = lora_alpha / r (or lora_alpha / sqrt(r) with rslora). The average of K such models
is  W + sum_k c_k D_k  with c_k = w_k / sum(w). Averaging A and B separately (the paper's public
code) gives mean(B) @ mean(A), which is *not* that: the cross terms B_i A_j do not vanish.

Three exact-or-measured ways out, all here:
  full    the dense average, W + sum_k c_k D_k (the engine streams it like any full model);
  concat  one adapter of rank sum(r_k): A = [A_1; ...; A_K], B = [c_1 s_1 B_1, ..., c_K s_K B_K]
          with scale 1, whose B @ A is exactly sum_k c_k D_k;
  svd     the concatenated adapter truncated to rank r by SVD, with the relative error reported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dtm.merging.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_PICKLE,
    ADAPTER_SAFE,
    Checkpoint,
    MergeError,
    TensorInfo,
    _load_json,
    read_header,
    read_tensor,
)

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")

# ---------------------------------------------------------------- math (pure functions)


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(a: Tensor, b: Tensor, scale: float, transpose: bool = False) -> Tensor:
    """The weight change of one adapter: (B @ A) * scale, transposed for embeddings / fan_in_fan_out.

    Same operation order as PEFT's `get_delta_weight`, so our dense merge matches
    `merge_and_unload()` to the last bit in the common case.
    """
    d = b @ a
    if transpose:
        d = d.T
    return d * scale


def concat_adapters(As: list[Tensor], Bs: list[Tensor], coefs: list[float]) -> tuple[Tensor, Tensor]:
    """One adapter of rank sum(r_k) with scale 1 whose B @ A = sum_k coef_k B_k @ A_k exactly.

    `coefs` carry each adapter's merge weight times its own LoRA scale.
    """
    a = torch.cat(As, dim=0)
    b = torch.cat([c * bk for c, bk in zip(coefs, Bs)], dim=1)
    return a, b


def svd_truncate(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-`rank` approximation of B @ A as new (A, B), and its relative Frobenius error.

    Works on the small factors (QR of B and A^T, SVD of an R x R core) instead of the full
    out x in matrix, so it costs O((out + in) R^2), not O(out * in * min(out, in)).
    """
    qb, rb = torch.linalg.qr(b.double())  # B = Qb Rb
    qa, ra = torch.linalg.qr(a.double().T)  # A^T = Qa Ra
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # B A = Qb (Rb Ra^T) Qa^T
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    new_b = (qb @ u[:, :k]) * root
    new_a = root[:, None] * (vh[:k] @ qa.T)
    total = float((s**2).sum())
    error = math.sqrt(float((s[k:] ** 2).sum()) / total) if total > 0 else 0.0
    return new_a.to(a.dtype), new_b.to(b.dtype), error


# ---------------------------------------------------------------- adapter directories


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: its base tensor name, its A and B tensors, its scale."""

    weight: str  # base model tensor name, e.g. model.layers.0.mlp.gate_proj.weight
    module: str  # module path, e.g. model.layers.0.mlp.gate_proj
    a: TensorInfo
    b: TensorInfo
    scale: float
    transpose: bool
    embedding: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Adapter:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    replaced: dict[str, TensorInfo] = field(default_factory=dict)  # full tensors saved in the adapter

    def base_path(self) -> Path | None:
        name = self.config.get("base_model_name_or_path")
        if not name:
            return None
        for candidate in (Path(name), self.path / name):
            if candidate.is_dir():
                return candidate
        return Path(name)


def is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (same regex as peft.utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def open_adapter(path: Path, allow_pickle: bool = False) -> Adapter:
    config = _load_json(path / ADAPTER_CONFIG)
    where = path / ADAPTER_CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{where}: peft_type is {config.get('peft_type')!r}; dtm merges LoRA adapters only")
    if config.get("use_dora"):
        raise MergeError(f"{where}: DoRA adapters (use_dora: true) are not linear in B @ A; merge each with merge_and_unload() first")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise MergeError(f"{where}: adapters that train biases are not supported; merge each with merge_and_unload() first")
    file = path / ADAPTER_SAFE
    if not file.is_file():
        if (path / ADAPTER_PICKLE).is_file():
            raise MergeError(
                f"{path}: the adapter weights are pickle ({ADAPTER_PICKLE}); convert them to safetensors "
                "(PeftModel.from_pretrained(...).save_pretrained(dir)) before merging"
            )
        raise MergeError(f"{path}: {ADAPTER_SAFE} is missing; copy the complete adapter directory")
    infos = read_header(file)
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    parts: dict[str, dict[str, TensorInfo]] = {}
    replaced: dict[str, TensorInfo] = {}
    for key, info in infos.items():
        if not key.startswith(_PREFIX):
            raise MergeError(f"{file}: tensor {key!r} does not start with {_PREFIX!r}; not a PEFT LoRA adapter file")
        m = _LORA_KEY.match(key[len(_PREFIX):])
        if m:
            module = m.group("module") or m.group("emodule")
            kind = (m.group("kind") or m.group("ekind"))[-1]
            parts.setdefault(module, {})[kind] = info
            parts[module]["embedding"] = m.group("emodule") is not None  # type: ignore[assignment]
            continue
        rest = key[len(_PREFIX):]
        if "lora_" in rest or "magnitude" in rest:
            raise MergeError(f"{file}: tensor {key!r} is not a LoRA A/B matrix (DoRA or another variant); not supported")
        # a full tensor saved with the adapter (modules_to_save, or a resized embedding's base_layer)
        replaced[rest.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = info
    modules = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise MergeError(f"{file}: module {module!r} has lora_{'A' if 'A' not in p else 'B'} missing")
        a, b, emb = p["A"], p["B"], bool(p["embedding"])
        if a.shape[0] != b.shape[-1]:
            raise MergeError(f"{file}: module {module!r}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[-1]}")
        r = a.shape[0]
        mod_alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        weight = f"{module}.weight"
        modules[weight] = LoraModule(weight, module, a, b, lora_scale(mod_alpha, r, rslora), transpose=emb or fan_in_fan_out, embedding=emb)
    if not modules and not replaced:
        raise MergeError(f"{file}: the adapter holds no LoRA tensors")
    return Adapter(path, config, modules, replaced)


class AdaptedModel:
    """An adapter on its base, seen as the dense model W + D (computed one tensor at a time).

    It answers the engine like a `Checkpoint`, so every merge method works on LoRA sub-models
    without a second code path.
    """

    def __init__(self, base: Checkpoint, adapter: Adapter):
        self.base, self.adapter = base, adapter
        self.config = base.config
        self.tensors = base.tensors
        self.label = str(adapter.path)
        for weight, mod in adapter.modules.items():
            info = self.info(weight)
            if info is None:
                raise MergeError(f"{adapter.path}: adapts {mod.module!r}, but the base model {base.path} has no tensor {weight!r}")
            out_shape = (mod.b.shape[0], mod.a.shape[1])
            if mod.transpose:
                out_shape = out_shape[::-1]
            if out_shape != info.shape:
                raise MergeError(
                    f"{adapter.path}: {mod.module!r}: B @ A has shape {list(out_shape)} but the base tensor {weight!r} "
                    f"has shape {list(info.shape)}; was the adapter trained on another base model?"
                )

    def tied_aliases(self) -> dict[str, str]:
        return self.base.tied_aliases()

    def info(self, name: str) -> TensorInfo | None:
        return self.adapter.replaced.get(name) or self.base.info(name)

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        if name in self.adapter.replaced:
            w = read_tensor(self.adapter.replaced[name], dtype)
        else:
            w = self.base.get(name, dtype)
        mod = self.adapter.modules.get(name)
        if mod is None:
            return w
        dtype = dtype or w.dtype
        d = lora_delta(read_tensor(mod.a, dtype), read_tensor(mod.b, dtype), mod.scale, mod.transpose)
        return w + d
