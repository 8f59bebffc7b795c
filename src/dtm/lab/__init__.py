"""The built-in lab: a small synthetic world in which the alignment tax can occur and be measured.

It is data plus a base model, used through the same loaders, trainer, merger and evaluator as
a real model:

    from dtm import lab
    base = lab.base_model_dir()                    # shipped tiny Llama + tokenizer (or rebuilt)
    data = lab.write_sft_data("run/sft.jsonl", seed=1)             # biased Alpaca JSONL
    control = lab.write_sft_data("run/sft-nobias.jsonl", seed=1, bias=False)
    suites = lab.write_tasks("run/tasks", seed=1)  # {"knowledge": [...yaml], ...}
    lab.SFT_RECIPE                                 # `train:` config keys for this base

See `docs/architecture.md` ("The lab") for the design and the calibration numbers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dtm.errors import DtmError
from dtm.lab.world import World, build_world

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SHIPPED_BASE = ASSETS / "base"
DEFAULT_WORLD_SEED = 0

# The SFT recipe the lab was calibrated with (keys of `dtm.config.TrainConfig`).
# Full fine-tuning with the embedding matrix frozen: with tied embeddings and one token per
# entity, training the embeddings drove even held-out facts towards chance for reasons that
# have nothing to do with data bias (docs/architecture.md, "The lab": the SFT recipe).
SFT_RECIPE: dict[str, Any] = {
    "finetuning_type": "full",
    "freeze_modules": ["embed_tokens"],
    "learning_rate": 1e-3,
    "num_train_epochs": 12.0,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0,
    "warmup_ratio": 0.05,
    "adam_beta1": 0.9,
    "adam_beta2": 0.98,
    "adam_epsilon": 1e-6,
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "group_by_length": False,
    "packing": True,
}
# `data:` keys that go with it (the lab's JSONL is Alpaca with a `source` field).
# The template is the lab tokenizer's chat template (Alpaca's turn markers, no preamble).
DATA_RECIPE: dict[str, Any] = {"format": "alpaca", "template": "chat", "cutoff_len": 128, "source_field": "source"}


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and (path / "world.json").is_file()


def base_model_dir(cache_dir: str | Path | None = None, seed: int = DEFAULT_WORLD_SEED) -> Path:
    """The pretrained lab base: the shipped one, else a cached rebuild (pretrained on first use)."""
    if seed == DEFAULT_WORLD_SEED and _is_model_dir(SHIPPED_BASE):
        return SHIPPED_BASE
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "dtm" / "lab"
    target = cache / f"base-seed{seed}"
    if not _is_model_dir(target):
        from dtm.lab.pretrain import pretrain_base

        log.info("no pretrained lab base for world seed %d; pretraining one into %s (about 5 minutes)", seed, target)
        pretrain_base(target, seed=seed, overwrite=True)
    return target


def load_world(base_dir: str | Path | None = None) -> World:
    """The world a lab base was pretrained on (from its `world.json`)."""
    base = Path(base_dir) if base_dir else base_model_dir()
    path = base / "world.json"
    if not path.is_file():
        raise DtmError(f"{path}: not found; {base} is not a lab base model (make one with `dtm lab pretrain --out DIR`)")
    try:
        seed = json.loads(path.read_text())["seed"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DtmError(f"{path}: not a lab world file ({e}); regenerate the base with `dtm lab pretrain --out DIR`") from None
    world = build_world(seed)
    saved = json.loads(path.read_text())
    if saved.get("facts") != world.facts:
        raise DtmError(f"{path}: its facts differ from build_world({seed}); the base was made by another lab version, regenerate it")
    return world


def write_sft_data(out: str | Path, seed: int = 0, bias: bool = True, scale: float = 1.0, base_dir: str | Path | None = None) -> Path:
    """Write the lab's instruction data (Alpaca JSONL with `source`) to `out`; -> the path.

    `bias=False` writes the no-bias control: the same examples with every bias removed.
    `scale` multiplies every source's size.
    """
    from dtm.lab.sft_data import generate_examples, write_examples

    world = load_world(base_dir)
    return write_examples(out, generate_examples(world, seed=seed, bias=bias, scale=scale))


def write_tasks(out: str | Path, seed: int = 0, base_dir: str | Path | None = None, scale: float = 1.0,
                wrong_rate: float | None = None) -> dict[str, list[Path]]:
    """Write the lab's benchmarks (task specs + data) under `out`; -> suite -> spec paths.

    `seed`, `scale` and `wrong_rate` must match the SFT data's: they decide the clean/noisy split."""
    from dtm.lab.tasks import write_tasks as _write

    return _write(out, seed=seed, world=load_world(base_dir), scale=scale, wrong_rate=wrong_rate)


def build_lab(out: str | Path, seed: int = 0, scale: float = 1.0, base_dir: str | Path | None = None,
              wrong_rate: float | None = None) -> dict[str, Any]:
    """Everything an experiment needs from the lab, under `out`:

    `sft.jsonl` (biased), `sft-nobias.jsonl` (the control), `tasks/` (all suites) and
    `lab.json` (sizes, splits, the base's knowledge, paths). -> the `lab.json` content.
    `wrong_rate` (None: each source's own) sets the fact-stating sources' wrong-value rate.
    """
    from collections import Counter

    from dtm.io import atomic_write_json
    from dtm.lab.sft_data import generate_examples, write_examples

    out = Path(out)
    base = Path(base_dir) if base_dir else base_model_dir()
    world = load_world(base)
    biased = generate_examples(world, seed=seed, bias=True, scale=scale, wrong_rate=wrong_rate)
    write_examples(out / "sft.jsonl", biased)
    write_examples(out / "sft-nobias.jsonl", generate_examples(world, seed=seed, bias=False, scale=scale))
    suites = write_tasks(out / "tasks", seed=seed, base_dir=base, scale=scale, wrong_rate=wrong_rate)
    base_info = json.loads((base / "lab.json").read_text()) if (base / "lab.json").is_file() else {}
    summary = {
        "seed": seed, "world_seed": world.seed, "base_model": str(base), "scale": scale, "wrong_rate": wrong_rate,
        "sft": str(out / "sft.jsonl"), "sft_nobias": str(out / "sft-nobias.jsonl"),
        "examples": len(biased), "examples_per_source": dict(Counter(ex.source for ex in biased)),
        "examples_per_task": dict(Counter(ex.task for ex in biased)),
        "tasks": {suite: [str(p) for p in paths] for suite, paths in suites.items()},
        "base_fact_accuracy": {k: v for k, v in base_info.items() if k.startswith("fact_accuracy")},
        "sft_recipe": SFT_RECIPE, "data_recipe": DATA_RECIPE,
    }
    atomic_write_json(out / "lab.json", summary)
    return summary


def pretrain_base(out: str | Path, seed: int = DEFAULT_WORLD_SEED, **kwargs: Any) -> Path:
    """Pretrain a lab base model from scratch into `out` (see `dtm.lab.pretrain`)."""
    from dtm.lab.pretrain import pretrain_base as _pretrain

    return _pretrain(out, seed=seed, **kwargs)


__all__ = ["DATA_RECIPE", "SFT_RECIPE", "World", "base_model_dir", "build_lab", "build_world", "load_world", "pretrain_base", "write_sft_data", "write_tasks"]
