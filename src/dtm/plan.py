"""What a run makes: every model the train, merge and eval stages produce, by name.

DTM itself is the K sub-models and their merge; vanilla SFT is the same training job on all
the data. Every other method the report compares with is one registered `Baseline`: what it
trains, what it merges, what it evaluates. `baselines.methods` in the config accepts exactly
the names registered here, and adding a baseline means adding one entry below.

The functions here only plan (names, data, settings); the pipeline runs the plan. Nothing
here imports torch or the config module (a config is read by attribute).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm import rundir as rd

# A `dtm.config.ExperimentConfig`, read by attribute. Not imported, not even for type checking:
# the config imports this module (its registry of baselines are the allowed values).
Config = Any

# name -> {"data": path, "seed": int, "train": {train-section overrides}, "baseline": str?, "val_data": path?}
TrainJobs = dict[str, dict[str, Any]]
# name -> dtm.merge(...) arguments: models, method, weights, parameters, base
MergeSpecs = dict[str, dict[str, Any]]

NO_SNAPSHOTS = {"save_fractions": []}  # only vanilla draws the tax curve


@dataclass(frozen=True)
class Inputs:
    """What the data stage resolved: the base model and the data the models train on."""

    base: str
    train_data: str
    val_data: str | None = None


@dataclass(frozen=True)
class Baseline:
    """One method the report compares DTM with; each part returns the models it adds."""

    name: str
    help: str
    train: Callable[[Config, Inputs], TrainJobs] | None = None
    merge: Callable[[Config, rd.SeedRun, Inputs], MergeSpecs] | None = None
    evaluate: Callable[[Config, rd.SeedRun], dict[str, Any]] | None = None


BASELINES: dict[str, Baseline] = {}


def register(baseline: Baseline) -> Baseline:
    BASELINES[baseline.name] = baseline
    return baseline


# ---------------------------------------------------------------- the baselines


# ---------------------------------------------------------------- compute matching
#
# DTM is compared at equal training compute, however the length is given:
# - epochs (`train.num_train_epochs`): each sub-model trains that many epochs on its 1/K of the
#   data, vanilla on all of it, so both see every example that many times; `short` gets
#   epochs / K on all the data (the compute of one sub-model).
# - steps (`train.max_steps` > 0): the config's number is the *total* optimizer steps of DTM,
#   its K sub-models together. Each sub-model trains max_steps // K steps (at least 1), and
#   every model trained on all the data (vanilla, the trained baselines) K times that, so
#   vanilla's steps equal DTM's summed steps exactly even when K does not divide max_steps
#   (max_steps=10, K=4: sub-models 2 steps each, vanilla 8). `short` and each soup
#   ingredient train the steps of one sub-model.


def sub_model_steps(cfg: Config) -> int | None:
    """Optimizer steps of each sub-model when training is given in steps (None: in epochs)."""
    return max(1, cfg.train.max_steps // cfg.disperse.k) if cfg.train.max_steps > 0 else None


def sub_model_recipe(cfg: Config) -> dict[str, Any]:
    """A sub-model's `train` overrides: its 1/K of the steps (see above), no snapshots."""
    steps = sub_model_steps(cfg)
    return NO_SNAPSHOTS | ({} if steps is None else {"max_steps": steps})


def full_data_recipe(cfg: Config) -> dict[str, Any]:
    """`train` overrides of a model trained on all the data for DTM's compute (vanilla, l2, ...):
    K x a sub-model's steps when training is given in steps, the config's epochs otherwise."""
    steps = sub_model_steps(cfg)
    return {} if steps is None else {"max_steps": cfg.disperse.k * steps}


def short_recipe(cfg: Config) -> dict[str, Any]:
    """All the data for 1/K of the training: the compute of one sub-model."""
    short: dict[str, Any] = {"num_train_epochs": cfg.train.num_train_epochs / cfg.disperse.k, **NO_SNAPSHOTS}
    steps = sub_model_steps(cfg)
    if steps is not None:
        short["max_steps"] = steps
    return short


def soup_recipes(cfg: Config) -> list[tuple[str, int, float]]:
    """(name, seed, learning rate) of each soup ingredient: seeds seed + 1000 j, learning rates
    cycled through `baselines.soup_learning_rates` (default: train.learning_rate). The first
    ingredient is the `short` model itself when its learning rate is the recipe's."""
    rates = cfg.baselines.soup_learning_rates or [cfg.train.learning_rate]
    recipes = [(rd.soup_ingredient_name(j), cfg.seed + 1000 * j, rates[j % len(rates)]) for j in range(cfg.baselines.soup_size)]
    if recipes and recipes[0][2] != cfg.train.learning_rate:
        recipes[0] = (rd.SOUP_PREFIX + "1", *recipes[0][1:])  # not the `short` baseline: a model of its own
    return recipes


def _short_jobs(cfg: Config, inputs: Inputs) -> TrainJobs:
    return {rd.SHORT: {"data": inputs.train_data, "train": short_recipe(cfg), "seed": cfg.seed}}


def _soup_jobs(cfg: Config, inputs: Inputs) -> TrainJobs:
    jobs = {}
    for name, seed, lr in soup_recipes(cfg):
        train = short_recipe(cfg) | ({} if lr == cfg.train.learning_rate else {"learning_rate": lr})
        jobs[name] = {"data": inputs.train_data, "train": train, "seed": seed}
    return jobs


def _soup_merge(cfg: Config, run: rd.SeedRun, inputs: Inputs) -> MergeSpecs:
    return {rd.SOUP: {"models": [run.model(name) for name, _, _ in soup_recipes(cfg)], "method": "average",
                      "weights": None, "parameters": {}, "base": inputs.base}}


def _wise_ft_merge(cfg: Config, run: rd.SeedRun, inputs: Inputs) -> MergeSpecs:
    return {rd.wise_ft_name(alpha): {"models": [run.model(rd.VANILLA)], "method": "wise_ft", "weights": None,
                                     "parameters": {"alpha": alpha}, "base": inputs.base}
            for alpha in cfg.baselines.wise_ft_alphas}


def _ensemble(cfg: Config, run: rd.SeedRun) -> dict[str, Any]:
    return {rd.ENSEMBLE: [str(run.sub_model(i)) for i in range(cfg.disperse.k)]}


def _trained_baseline(name: str) -> Callable[[Config, Inputs], TrainJobs]:
    def jobs(cfg: Config, inputs: Inputs) -> TrainJobs:
        return {name: {"data": inputs.train_data, "train": NO_SNAPSHOTS | full_data_recipe(cfg), "seed": cfg.seed, "baseline": name}}

    return jobs


# Registration order is the order models are planned, trained and listed in.
register(Baseline("short", "vanilla SFT for 1/K of the training (the compute of one sub-model)", train=_short_jobs))
register(Baseline("soup", "uniform soup of `baselines.soup_size` short runs with other seeds (compute-matched to DTM)",
                  train=_soup_jobs, merge=_soup_merge))
register(Baseline("wise_ft", "WiSE-FT: base/vanilla weight interpolations at `baselines.wise_ft_alphas`", merge=_wise_ft_merge))
register(Baseline("ensemble", "the K sub-models' averaged next-token probabilities (K times the inference cost)", evaluate=_ensemble))
TRAINED_HELP = {
    "l2": "L2 penalty towards the base weights (`baselines.l2_coef`)",
    "ewc": "EWC: Fisher-weighted penalty towards the base (`baselines.ewc_coef`)",
    "replay": "replay of plain text (`baselines.replay_path`) mixed into the SFT data",
    "curation": "the top `baselines.curation_fraction` of the data by a quality score",
    "lora_moe": "LoRA-MoE: K LoRA experts on the MLP with a learned router, the base frozen (`dtm.lora_moe`)",
}
for _name in rd.TRAINING_BASELINES:  # trained by `dtm.training.train_baseline` on all the data
    register(Baseline(_name, TRAINED_HELP[_name], train=_trained_baseline(_name)))


def _chosen(cfg: Config) -> list[Baseline]:
    return [b for name, b in BASELINES.items() if name in cfg.baselines.methods]


# ---------------------------------------------------------------- the plan of one seed's run


def training_jobs(cfg: Config, run: rd.SeedRun, inputs: Inputs) -> TrainJobs:
    """Every model the train stage produces: the K sub-models, vanilla, the trained baselines,
    each with the `train` overrides that match their compute to DTM's (see "compute matching")."""
    jobs: TrainJobs = {rd.sub_model_name(i): {"data": str(run.portion(i)), "train": sub_model_recipe(cfg), "seed": cfg.seed}
                       for i in range(cfg.disperse.k)}
    fractions = sorted(set(cfg.train.save_fractions))
    jobs[rd.VANILLA] = {"data": inputs.train_data, "train": {"save_fractions": fractions, **full_data_recipe(cfg)}, "seed": cfg.seed}
    if fractions and inputs.val_data:
        # the validation split feeds only the snapshots' losses: without snapshots vanilla's job is
        # the data alone, so K=1's one sub-model (the same data) is the same job and a sweep links it
        jobs[rd.VANILLA]["val_data"] = inputs.val_data
    for baseline in _chosen(cfg):
        if baseline.train is not None:
            jobs |= baseline.train(cfg, inputs)
    return jobs


def merge_plan(cfg: Config, run: rd.SeedRun, inputs: Inputs) -> MergeSpecs:
    """Every merged model: DTM (the sub-models, `merge` section) and the merging baselines."""
    plan: MergeSpecs = {rd.DTM: {"models": [run.sub_model(i) for i in range(cfg.disperse.k)], "method": cfg.merge.method,
                                 "weights": cfg.merge.weights, "parameters": cfg.merge.parameters, "base": inputs.base}}
    for baseline in _chosen(cfg):
        if baseline.merge is not None:
            plan |= baseline.merge(cfg, run, inputs)
    return plan


def evaluated_models(cfg: Config, run: rd.SeedRun, inputs: Inputs) -> dict[str, Any]:
    """name -> model reference (a dir, {"model": base, "adapter": dir}, or a list: an ensemble)
    for every model the report shows."""

    def ref(path: Path) -> Any:  # a LoRA adapter is evaluated on top of the base
        return {"model": inputs.base, "adapter": str(path)} if (path / "adapter_config.json").is_file() else str(path)

    models: dict[str, Any] = {rd.BASE: inputs.base}
    for name in [rd.VANILLA, *training_jobs(cfg, run, inputs), *merge_plan(cfg, run, inputs)]:
        # soup ingredients are shown through the soup; sub-models through their merge where `eval.sub_models` is off
        if not rd.is_soup_ingredient(name) and (cfg.eval.sub_models or not rd.is_sub_model(name)):
            models[name] = ref(run.model(name))
    for label, directory in rd.fraction_dirs(run.model(rd.VANILLA)):
        models[rd.snapshot_name(label)] = ref(directory)
    for baseline in _chosen(cfg):
        if baseline.evaluate is not None:
            models |= baseline.evaluate(cfg, run)
    return models
