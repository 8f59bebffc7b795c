"""Weight penalties towards the base model: the L2 and EWC baselines of the paper's Table 1.

Both penalise how far fine-tuning moves the weights from the base weights theta_0:

    L2:   coef * sum_i (theta_i - theta0_i)^2
    EWC:  coef * sum_i F_i (theta_i - theta0_i)^2      (Kirkpatrick et al. 2017)

with F the diagonal (empirical) Fisher of the base model on base-model text (`dtm.fisher`,
the estimator Fisher merging uses too), normalised to mean 1 so that `ewc_coef` and
`l2_coef` are on the same scale: EWC only redistributes the penalty towards the weights the
base model's text depends on. For LoRA the moved weight is the adapter's delta (B A alpha/r,
from PEFT's `get_delta_weight`), so the penalty acts on what the adapter changes, not on A
and B separately.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from dtm.errors import TrainingError
from dtm.fisher import diagonal_fisher
from dtm.training.batches import text_examples

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the math (pure functions)


def l2_penalty(deltas: Iterable[torch.Tensor], coef: float) -> torch.Tensor:
    """coef * sum of squared entries of every delta."""
    terms = [d.float().pow(2).sum() for d in deltas]
    return coef * torch.stack(terms).sum() if terms else torch.zeros(())


def ewc_penalty(deltas: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor], coef: float) -> torch.Tensor:
    """coef * sum F * delta^2, entry by entry; every delta needs its Fisher tensor."""
    terms = [(fisher[name].to(d.device) * d.float().pow(2)).sum() for name, d in deltas.items()]
    return coef * torch.stack(terms).sum() if terms else torch.zeros(())


def normalise_fisher(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scale all Fisher tensors by one factor so that their mean entry is 1."""
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    if total <= 0:
        raise ValueError("the Fisher estimate is all zeros (no gradient reached the weights)")
    return {k: f * (count / total) for k, f in fisher.items()}


# ---------------------------------------------------------------- the penalty used in training


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(base-model weight name, LoRA layer) for every LoRA-wrapped layer of a PEFT model."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return [
        (name.removeprefix(prefix) + ".weight", m)
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and hasattr(m, "base_layer")
    ]


class WeightPenalty:
    """L2 (no Fisher) or EWC (with Fisher) distance of the trained weights from the base.

    Full fine-tuning: the trainable parameters against a copy of their initial values.
    LoRA: each adapter's weight delta (which is zero at the start).
    """

    def __init__(self, model: torch.nn.Module, coef: float, fisher: dict[str, torch.Tensor] | None = None):
        self.coef = coef
        self.fisher = fisher
        self.lora = _lora_layers(model)
        self.anchored: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []
        if not self.lora:
            self.anchored = [(n, p, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad]

    @property
    def kind(self) -> str:
        """What the training summary records as its `regularizer`."""
        return "l2" if self.fisher is None else "ewc"

    def deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, layer in self.lora:
            for adapter in layer.active_adapters:
                yield name, layer.get_delta_weight(adapter)
        for name, p, p0 in self.anchored:
            yield name, p - p0

    def __call__(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        deltas = dict(self.deltas())
        if self.fisher is None:
            return l2_penalty(deltas.values(), self.coef)
        return ewc_penalty(deltas, self.fisher, self.coef)

    def target_params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The base weights the penalty constrains (what the Fisher is needed for)."""
        if self.lora:
            return {name: layer.base_layer.weight for name, layer in self.lora}
        return {name: p for name, p, _ in self.anchored}


def fisher_texts(config: Any, conversations: Sequence[Any], replay_texts: Sequence[str] | None) -> list[str]:
    """Base-model text for the Fisher: the replay corpus if there is one, else the SFT text."""
    if replay_texts is not None:
        texts = list(replay_texts)
    else:
        log.warning("EWC: no baselines.replay_path (base-model text) given; estimating the Fisher on the SFT texts instead")
        texts = [f"{c.instruction}\n{c.response}" for c in conversations]
    rng = random.Random(config.seed)
    return rng.sample(texts, min(len(texts), config.baselines.ewc_samples))


def build_penalty(kind: str, model: torch.nn.Module, tokenizer: Any, config: Any,
                  conversations: Sequence[Any], replay_texts: Sequence[str] | None = None) -> WeightPenalty:
    """The penalty for `kind` ("l2" or "ewc") on a model already wrapped for training.

    `replay_texts`: the base-model text EWC's Fisher is estimated on (the replay corpus);
    None falls back to the SFT texts.
    """
    if kind == "l2":
        return WeightPenalty(model, config.baselines.l2_coef)
    if kind != "ewc":
        raise TrainingError(f"regularizer {kind!r}: expected 'l2' or 'ewc'")
    penalty = WeightPenalty(model, config.baselines.ewc_coef)
    examples = text_examples(fisher_texts(config, conversations, replay_texts), tokenizer, config.data.cutoff_len)
    if not examples:
        raise TrainingError("EWC: no base-model text to estimate the Fisher on (baselines.replay_path is empty)")
    try:
        penalty.fisher = normalise_fisher(diagonal_fisher(model, examples, penalty.target_params(model)))
    except ValueError as e:
        raise TrainingError(f"EWC: {e}") from None
    log.info("EWC: diagonal Fisher from %d base-model texts over %d tensors", len(examples), len(penalty.fisher))
    return penalty
