"""LoRA-MoE: the paper's Table 1 baseline (after LoRAMoE, Dou et al. 2023): K LoRA experts on
each linear layer of the MLP, mixed per token by a learned router; the base stays frozen.

    y = W x + alpha/r * sum_k g_k(x) B_k A_k x,      g(x) = softmax(R x)

It is not a plain Hugging Face model and cannot be merged (the router's weights depend on the
token), so it is saved as its own directory, never pickled:

    lora_moe_config.json     base model path, experts, r, alpha, the wrapped module names
    lora_moe.safetensors     the experts' A, B and the routers, nothing of the base
    tokenizer files

There is no `config.json`, so plain transformers refuses the directory instead of silently
loading the bare base; the evaluation harness loads it with `load_lora_moe` (the base, wrapped,
then these tensors). PEFT has no mixture of LoRA experts with a learned router, hence this
module. Routing is dense (every expert, softmax weights) as in LoRAMoE; its load-balancing
constraint is left out. Nothing here imports the training or evaluation packages.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtm.errors import DtmError

CONFIG_FILE = "lora_moe_config.json"
WEIGHTS_FILE = "lora_moe.safetensors"
FORMAT = "dtm-lora-moe/1"


class LoraMoeLinear(nn.Module):
    """A frozen linear layer plus `experts` LoRA experts of rank `r` and a per-token router.

    The router starts at zero (uniform weights) and each B at zero, so the wrapped model starts
    exactly as the base; the experts' A start as PEFT's (Kaiming uniform), each differently."""

    def __init__(self, base: nn.Linear, experts: int, r: int, alpha: float):
        super().__init__()
        self.base = base
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.router = nn.Parameter(torch.zeros(experts, base.in_features, **kw))
        self.lora_A = nn.Parameter(torch.empty(experts, r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(experts, base.out_features, r, **kw))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.softmax(x @ self.router.T, dim=-1)  # (..., experts)
        h = torch.einsum("...i,eri->...er", x, self.lora_A) * gates.unsqueeze(-1)
        return self.base(x) + self.scaling * torch.einsum("...er,eor->...o", h, self.lora_B)


def mlp_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the model's MLP blocks (modules named `mlp`)."""
    return [f"{name}.{child}" for name, module in model.named_modules() if name.split(".")[-1] == "mlp"
            for child, sub in module.named_children() if isinstance(sub, nn.Linear)]


def add_experts(model: nn.Module, experts: int, r: int, alpha: float, targets: list[str] | None = None) -> list[str]:
    """Replace each MLP linear layer (or each of `targets`) by a `LoraMoeLinear`, freeze everything
    else; -> the wrapped names. The model stays the same class (the Trainer saves and resumes it
    as any model)."""
    targets = mlp_linears(model) if targets is None else targets
    if not targets:
        raise DtmError(f"LoRA-MoE: {type(model).__name__} has no MLP block (a module named `mlp` with linear layers) to put experts on")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if not isinstance(layer, nn.Linear):
            raise DtmError(f"LoRA-MoE: {name} is a {type(layer).__name__}, not a linear layer")
        setattr(parent, child, LoraMoeLinear(layer, experts, r, alpha))
    return targets


def expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The experts' and routers' tensors (what `save_lora_moe` writes), by parameter name."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("router", "lora_A", "lora_B")}


def save_lora_moe(model: nn.Module, out: str | os.PathLike, base: str | os.PathLike, experts: int, r: int, alpha: float) -> Path:
    """Write `model`'s experts and routers, and the config that rebuilds it on `base`, into `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    targets = sorted(n.rsplit(".", 1)[0] for n in expert_state(model) if n.endswith(".router"))
    save_file(expert_state(model), out / WEIGHTS_FILE, metadata={"format": FORMAT})
    config = {"format": FORMAT, "base_model_name_or_path": str(base), "experts": experts, "r": r, "lora_alpha": alpha,
              "target_modules": targets}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def is_lora_moe(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The directory's `lora_moe_config.json`, checked: a clear error names the file and what is wrong."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DtmError(f"{path}: cannot read the LoRA-MoE config ({e}); it is written by training the lora_moe baseline") from None
    missing = [k for k in ("base_model_name_or_path", "experts", "r", "lora_alpha", "target_modules") if k not in config]
    if missing or config.get("format") != FORMAT:
        raise DtmError(f"{path}: not a {FORMAT} config (missing {missing or 'the format key'}); retrain the lora_moe baseline")
    return config


def load_lora_moe(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """`base_model` (already loaded from the config's base) with the directory's experts and routers."""
    from safetensors.torch import load_file

    from dtm.io import bad_safetensors

    directory = Path(directory)
    config = read_config(directory)
    add_experts(base_model, config["experts"], config["r"], config["lora_alpha"], config["target_modules"])
    try:
        tensors = load_file(directory / WEIGHTS_FILE)
    except Exception:  # noqa: BLE001 - safetensors raises several types for a missing or damaged file
        raise DtmError(bad_safetensors(directory) or f"{directory / WEIGHTS_FILE}: missing or unreadable; retrain the lora_moe baseline") from None
    expected = expert_state(base_model)
    if set(tensors) != set(expected):
        raise DtmError(f"{directory / WEIGHTS_FILE}: its tensors do not match {CONFIG_FILE} (missing {sorted(set(expected) - set(tensors))[:3]}, "
                       f"unexpected {sorted(set(tensors) - set(expected))[:3]}); retrain the lora_moe baseline")
    with torch.no_grad():
        params = dict(base_model.named_parameters())
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise DtmError(f"{directory / WEIGHTS_FILE}: {name} has shape {tuple(tensor.shape)}, the model wants {tuple(params[name].shape)}")
            params[name].copy_(tensor.to(params[name].dtype))
    return base_model
