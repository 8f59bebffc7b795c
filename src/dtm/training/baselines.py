"""The training baselines of the paper's Table 1, all through `train_model`.

- vanilla SFT: one model on all data (K=1, the same code path as a sub-model);
- L2 / EWC: a weight penalty towards the base (`regularizers.py`), passed to `train_model`
  as its `penalty` hook;
- replay: plain-text LM examples (loss on every token) mixed into the SFT data at
  `baselines.replay_ratio` replay examples per SFT example (1:1 in the paper), through
  `train_model`'s `mix_in` hook;
- uniform soup ingredients: full-data models with different seeds (and learning rates),
  averaged later by the merge stage;
- LoRA-MoE: K LoRA experts on the MLP with a learned per-token router, the base frozen
  (`dtm.lora_moe`; K = `disperse.k`, rank and alpha from `train.lora`), through
  `train_model`'s `form` hook (how the model is wrapped and saved);
- data curation: keep the top `curation_fraction` of the data by a quality score. The
  paper used Deita (LLM-judged complexity and quality), which needs a large scorer model
  online; the scorers here are offline, reference-free stand-ins: `base_loss` (how likely
  the base model finds the response: keeps responses consistent with what it knows) and
  `response_length` (longer responses score higher, after Zhao et al. 2024). Register
  another with `@scorer("name")`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtm import rundir
from dtm.config import ExperimentConfig
from dtm.data.formats import Conversation, load_texts
from dtm.errors import DataError, TrainingError
from dtm.plan import soup_recipes
from dtm.training.batches import Example, mean_loss, text_examples
from dtm.training.regularizers import build_penalty
from dtm.training.sft import MixIn, ModelForm, Penalty, PenaltyFactory, as_conversations, load_base, train_model

log = logging.getLogger(__name__)

TRAINING_BASELINES = ("vanilla", *rundir.TRAINING_BASELINES, "soup")

# ---------------------------------------------------------------- replay


def load_replay_texts(path: str | Path) -> list[str]:
    """The replay corpus (`baselines.replay_path`): see `dtm.data.formats.load_texts`."""
    return load_texts(path, missing="replay corpus not found (baselines.replay_path)")


def mix_replay(sft: list[dict], replay: list[dict], ratio: float, seed: int) -> list[dict]:
    """SFT examples plus round(ratio * len(sft)) replay examples, drawn without replacement
    while they last (then cycled), in a seeded shuffled order."""
    want = round(ratio * len(sft))
    if want and not replay:
        raise DataError("replay: the replay corpus gave no example after tokenisation")
    rng = random.Random(seed)
    order: list[dict] = []
    while len(order) < want:
        batch = list(replay)
        rng.shuffle(batch)
        order += batch[: want - len(order)]
    mixed = list(sft) + order
    rng.shuffle(mixed)
    return mixed


# ---------------------------------------------------------------- curation

Scorer = Callable[[list[Conversation], dict[str, Any]], list[float]]
SCORERS: dict[str, Scorer] = {}


def scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Register a quality scorer: (conversations, context) -> one score per conversation."""

    def register(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn

    return register


@scorer("response_length")
def score_response_length(conversations: list[Conversation], context: dict[str, Any]) -> list[float]:
    return [float(len(c.response.split())) for c in conversations]


@scorer("base_loss")
def score_base_loss(conversations: list[Conversation], context: dict[str, Any]) -> list[float]:
    """Minus the base model's mean loss on each response (higher = more plausible to it)."""
    from dtm.data.template import tokenize_conversations

    config: ExperimentConfig = context["config"]
    model, tokenizer = load_base(context["base"], config)
    scores = []
    for c in conversations:
        examples, _ = tokenize_conversations([c], tokenizer, config.data.template, config.data.cutoff_len, config.data.first_turn_only)
        scores.append(-mean_loss(model, examples, tokenizer.pad_token_id) if examples else float("-inf"))
    return scores


def curate(conversations: list[Conversation], fraction: float, score: str | Scorer = "base_loss",
           context: dict[str, Any] | None = None) -> list[Conversation]:
    """The top `fraction` of the data by score (ties broken by original order), in original order."""
    fn = SCORERS.get(score) if isinstance(score, str) else score
    if fn is None:
        raise DataError(f"baselines.curation_scorer: unknown scorer {score!r}; known: {sorted(SCORERS)}")
    scores = fn(conversations, context or {})
    keep = max(1, round(fraction * len(conversations)))
    ranked = sorted(range(len(conversations)), key=lambda i: (-scores[i], i))[:keep]
    return [conversations[i] for i in sorted(ranked)]


# ---------------------------------------------------------------- the entry point


def replay_mix_in(config: ExperimentConfig, seed: int) -> MixIn:
    """`train_model`'s `mix_in` for replay: the corpus as plain-text examples, mixed into the
    SFT examples at `baselines.replay_ratio` in a seeded order."""

    def mix_in(sft: list[Example], tokenizer: Any) -> list[Example]:
        texts = load_replay_texts(config.baselines.replay_path)
        return mix_replay(sft, text_examples(texts, tokenizer, config.data.cutoff_len), config.baselines.replay_ratio, seed)

    return mix_in


# The baselines that change only the training data, not the training step: they can join a joint
# job (`dtm.training.joint`), which applies the same `data_hooks` as `train_baseline` does.
DATA_BASELINES = ("replay", "curation")
Select = Callable[[list[Conversation]], list[Conversation]]


def data_hooks(method: str, config: ExperimentConfig, base: str | Path, seed: int) -> tuple[Select | None, MixIn | None]:
    """What a data baseline does to the training data: (a selection of the conversations, applied
    before tokenising; a mix-in of other examples, applied after), each None when it does not."""
    b = config.baselines
    if method == "replay":
        if b.replay_path is None:
            raise TrainingError("baseline replay: set baselines.replay_path to a plain-text corpus (.txt lines or JSONL with `text`)")
        return None, replay_mix_in(config, seed)
    if method == "curation":
        def select(conversations: list[Conversation]) -> list[Conversation]:
            kept = curate(conversations, b.curation_fraction, b.curation_scorer, {"config": config, "base": base})
            log.info("curation: kept %d of %d examples by %s", len(kept), len(conversations), b.curation_scorer)
            return kept

        return select, None
    return None, None


def penalty_factory(kind: str, config: ExperimentConfig) -> PenaltyFactory:
    """`train_model`'s `penalty` for L2 or EWC; EWC's Fisher is estimated on the replay corpus
    when there is one (base-model text), else on the SFT texts."""

    def build(model: Any, tokenizer: Any, conversations: list[Conversation]) -> Penalty:
        replay = config.baselines.replay_path
        replay_texts = load_replay_texts(replay) if kind == "ewc" and replay is not None else None
        return build_penalty(kind, model, tokenizer, config, conversations, replay_texts)

    return build


def lora_moe_form(config: ExperimentConfig, base: str | Path) -> ModelForm:
    """`train_model`'s `form` for LoRA-MoE: `disperse.k` experts of `train.lora`'s rank and alpha on
    every MLP linear layer, saved as a `dtm.lora_moe` directory that names `base`."""
    from dtm import lora_moe

    k, r, alpha = config.disperse.k, config.train.lora.r, config.train.lora.lora_alpha
    base = str(Path(base).resolve()) if Path(base).exists() else str(base)
    return ModelForm(wrap=lambda model: lora_moe.add_experts(model, k, r, alpha),
                     save=lambda model, out: lora_moe.save_lora_moe(model, out, base, k, r, alpha))


def train_baseline(method: str, config: ExperimentConfig, data: str | Path | list[Conversation], out: str | Path,
                   base: str | Path | None = None, **kwargs: Any) -> Path | list[Path]:
    """Train the baseline `method` on all of `data` into `out` (a list of dirs for `soup`).

    `kwargs` go to `train_model` (seed, val_data, progress, callbacks, name). The baselines
    reach into training only through `train_model`'s `mix_in` (replay) and `penalty` (L2,
    EWC) hooks, so the trainer imports nothing from here.
    """
    base = base or config.base_model()
    out = Path(out)
    if method == "vanilla":
        return train_model(base, data, out, config, **kwargs)
    if method in ("l2", "ewc"):
        return train_model(base, data, out, config, penalty=penalty_factory(method, config), **kwargs)
    if method == "lora_moe":
        return train_model(base, data, out, config, form=lora_moe_form(config, base), **kwargs)
    if method in DATA_BASELINES:
        seed = kwargs.get("seed")
        select, mix_in = data_hooks(method, config, base, config.seed if seed is None else seed)
        return train_model(base, select(as_conversations(data, config)) if select else data, out, config, mix_in=mix_in, **kwargs)
    if method == "soup":
        first_seed = kwargs.pop("seed", None)
        kwargs.pop("name", None)
        paths = []
        recipe_cfg = config if first_seed is None else config.model_copy(update={"seed": first_seed})
        for i, (_, seed, lr) in enumerate(soup_recipes(recipe_cfg), 1):
            cfg = config.model_copy(deep=True)
            cfg.train.learning_rate = lr
            paths.append(train_model(base, data, out / f"soup-{i}", cfg, seed=seed, name=f"soup-{i}", **kwargs))
        return paths
    raise TrainingError(f"baseline {method!r} is not trained here; training baselines are {list(TRAINING_BASELINES)}")
