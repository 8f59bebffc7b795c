"""`dtm run`: the whole experiment as stages over one run directory.

    data -> disperse -> train -> merge -> eval        (once per seed: `rundir.SeedRun`)
    report                                             (over all seeds: `rundir.RunDir`)

Each stage writes its outputs into the run directory and then a manifest (the hash of the
config slice it depends on, chained with the hashes of the stages before it; outputs; wall
time). A rerun skips every stage whose manifest matches; `from_stage` redoes that stage and
all later ones; a crash resumes at the first unfinished stage, and inside a stage the
trainer, merger and evaluator skip or resume their own finished work.

On CPU with `train.num_workers` > 1, the seed runs' train, merge and eval stages run side by
side, sharing the worker pool and taking turns here (`run_side_by_side`, `dtm.turns`), with
the sequential run's results; DTM_SEEDS_SEQUENTIAL=1 runs them one after another.

What each stage makes, by name, is `dtm.plan`'s; where it goes is `dtm.rundir`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dtm import cluster, plan, turns
from dtm import rundir as rd
from dtm.config import ExperimentConfig, load_config
from dtm.envflags import SEEDS_SEQUENTIAL, env_flag
from dtm.errors import ConfigError, DtmError
from dtm.io import atomic_write_json, make_dirs, remove_stale_temporaries

log = logging.getLogger(__name__)

LAB_CONFIG = Path(__file__).parent / "configs" / "lab.yaml"  # the demo: `dtm demo` = `dtm run` on it
STAGES = ("data", "disperse", "train", "merge", "eval")
# Seed runs side by side (`run_side_by_side`): the stages done here alone, in turn, before the
# stages whose jobs share the worker pool.
EARLY_STAGES, POOLED_STAGES = STAGES[:2], STAGES[2:]
SEQUENTIAL_ENV = SEEDS_SEQUENTIAL  # =1: a run's seed runs one after another, never side by side
# Config sections each stage depends on (besides the stages before it).
STAGE_SECTIONS = {
    "data": ("model", "data", "lab"),
    "disperse": ("disperse",),
    "train": ("train", "baselines"),
    "merge": ("merge",),
    "eval": ("eval",),
}


@dataclass
class Run:
    """One seed's run: its config, its directory and what the data stage resolved."""

    cfg: ExperimentConfig
    dir: rd.SeedRun
    info: dict[str, Any] = field(default_factory=dict)  # the data stage's outputs: base, data paths, suites

    @property
    def inputs(self) -> plan.Inputs:
        val = self.info.get("val_data")
        return plan.Inputs(base=self.path(self.info["base_model"]), train_data=self.path(self.info["train_data"]),
                           val_data=self.path(val) if val else None)

    def path(self, recorded: str) -> str:
        """A path the data stage recorded: relative to the seed run's directory when it lies inside
        it (so a moved or copied run directory still works), else as given."""
        return str(self.dir.root / recorded) if recorded.startswith(INSIDE) else recorded

    def record(self, path: str | Path) -> str:
        """How the data stage records `path`: `./...` inside the run's directory."""
        try:
            return INSIDE + str(Path(path).resolve().relative_to(self.dir.root.resolve()))
        except ValueError:
            return str(path)


INSIDE = "./"  # marks a recorded path as relative to the seed run's directory


def seed_config(cfg: ExperimentConfig, seed_run: rd.SeedRun) -> ExperimentConfig:
    """The config of one seed's run. The no-bias control answers one question (do the tax and
    DTM's gain vanish without the biases?): vanilla and DTM suffice, so it has no baselines."""
    seed_cfg = cfg.model_copy(deep=True)
    seed_cfg.seed = seed_run.seed
    if seed_run.control:
        seed_cfg.baselines.methods = []
    return seed_cfg


def seed_runs(cfg: ExperimentConfig) -> list[Run]:
    """Every seed's run (and the lab's no-bias control), not yet started."""
    return [Run(seed_config(cfg, s), s) for s in rd.RunDir(Path(cfg.output_dir)).seed_runs(cfg)]


# ---------------------------------------------------------------- hashes


def base_fingerprint(cfg: ExperimentConfig) -> str:
    """What identifies the base model's weights cheaply: a run made on other weights is stale."""
    name = cfg.base_model()
    path = Path(name)
    if not path.is_dir():
        return name  # a hub id (with its revision in the model section)
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    return hashlib.sha256("".join(f"{p.name}:{p.stat().st_size}:{p.read_text()[:4096] if p.suffix == '.json' else ''}"
                                  for p in files).encode()).hexdigest()[:16]


# Keys added after runs were made with their default behaviour: hashed only when set otherwise,
# so those runs' finished stages stay up to date (a changed hash clears a stage's outputs).
HASHED_ONLY_OFF_DEFAULT = (("eval", "sub_models", True),)


def stage_hashes(cfg: ExperimentConfig, control: bool = False) -> dict[str, str]:
    """Each stage's hash covers its own config sections and every earlier stage's (and the base weights)."""
    out, sections = {}, ["seed"]
    dump = cfg.model_dump(mode="json")
    for section, key, default in HASHED_ONLY_OFF_DEFAULT:
        if dump[section].get(key) == default:
            del dump[section][key]
    base = base_fingerprint(cfg)
    for stage in STAGES:
        sections += STAGE_SECTIONS[stage]
        blob = json.dumps({"control": control, "base": base, **{s: dump[s] for s in sections}}, sort_keys=True)
        out[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return out


def report_hash(cfg: ExperimentConfig) -> str:
    """The report reads every seed run's evaluation: its hash covers theirs and the report section."""
    evals = [stage_hashes(run.cfg, run.dir.control)["eval"] for run in seed_runs(cfg)]
    blob = json.dumps({"evals": evals, "report": cfg.report.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- can this config run?


def check_runnable(cfg: ExperimentConfig) -> None:
    """Refuse, before any stage starts, a config whose run would fail only after training
    (naming each key and where it was set)."""
    problems = runnable_problems(cfg)
    if problems:
        raise ConfigError("this config cannot run:\n  " + "\n  ".join(f"{cfg.where(key)}: {key}: {msg}" for key, msg in problems))


def runnable_problems(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(dotted key, what is wrong) for everything `dtm run` would fail on only after training
    has started: checked when the config is loaded, so a run never dies at the merge stage."""
    problems: list[tuple[str, str]] = []
    lab_data, lab_model = cfg.data.path == "lab", cfg.model.model_name_or_path == "lab"
    if lab_data != lab_model:
        problems.append(("model.model_name_or_path" if lab_model else "data.path",
                         "the lab is a data set and a base model together: set both data.path and model.model_name_or_path to 'lab'"))
    if cfg.merge.method == "greedy_soup" and not cfg.data.val_size:
        problems.append(("merge.method", "greedy_soup scores soups on held-out training data: set data.val_size (e.g. 0.05)"))
    if cfg.merge.method != "greedy_soup":
        from dtm.merging.engine import check_merge_args

        try:
            check_merge_args(cfg.merge.method, cfg.disperse.k, cfg.merge.weights, cfg.merge.parameters)
        except DtmError as e:  # a MergeError
            problems.append(("merge.weights" if "weights" in str(e) else "merge.parameters", str(e)))
    for key, value in (("merge.parameters.fisher_files", "fisher_files"),):
        if value in cfg.merge.parameters:
            problems.append((key, "the run computes each sub-model's Fisher itself (merge.fisher_samples); remove fisher_files"))
    methods = set(cfg.baselines.methods)
    if "replay" in methods and not cfg.baselines.replay_path:
        problems.append(("baselines.methods", "replay needs baselines.replay_path (a plain-text corpus: .txt lines or JSONL with `text`)"))
    if "curation" in methods:
        from dtm.training.baselines import SCORERS

        if cfg.baselines.curation_scorer not in SCORERS:
            problems.append(("baselines.curation_scorer", f"unknown scorer {cfg.baselines.curation_scorer!r}; choose one of {', '.join(SCORERS)}"))
    if cfg.eval.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        problems.append(("eval.lm_eval_tasks", "needs lm-evaluation-harness: pip install 'disperse-then-merge[lmeval]'"))
    if cfg.train.executor == "ray" and importlib.util.find_spec("ray") is None:
        problems.append(("train.executor", "ray needs the ray package: pip install 'disperse-then-merge[ray]'"))
    if cfg.disperse.strategy == "kmeans" and importlib.util.find_spec("sentence_transformers") is None:
        problems.append(("disperse.strategy", "kmeans embeds with sentence-transformers: pip install 'disperse-then-merge[embed]'"))
    if not (cfg.eval.suites or cfg.eval.tasks or cfg.eval.lm_eval_tasks):
        problems.append(("eval", "nothing to evaluate: give eval.suites, eval.tasks or eval.lm_eval_tasks"))
    problems += [("eval.suites", p) for p in unknown_suites(cfg)]
    return problems


def unknown_suites(cfg: ExperimentConfig) -> list[str]:
    """Suite and benchmark names in `eval.suites` that the run cannot resolve."""
    from dtm.evaluation.tasks import BUILTIN_SUITES, PAPER_TASKS

    known = set(BUILTIN_SUITES) | set(PAPER_TASKS)
    if cfg.data.path == "lab":
        from dtm.lab.tasks import SUITES

        known = set(SUITES)
    return [f"{name!r} is not a suite or benchmark here ({', '.join(sorted(known))}) nor a file"
            for name in cfg.eval.suites if name not in known and not Path(name).exists()]



# ---------------------------------------------------------------- stages


def stage_data(run: Run) -> dict[str, Any]:
    """Resolve the base model, the training data and the benchmark suites (the lab writes its own);
    hold out the validation split."""
    cfg = run.cfg
    if cfg.data.path == "lab":
        from dtm import lab

        summary = lab.build_lab(run.dir.lab, seed=cfg.seed, scale=cfg.lab.scale, base_dir=cfg.base_model(),
                                wrong_rate=cfg.lab.wrong_rate)
        info = {
            "base_model": cfg.base_model(),
            "train_data": run.record(summary["sft_nobias" if run.dir.control else "sft"]),
            "suites": {suite: [run.record(p) for p in paths] for suite, paths in summary["tasks"].items()},
            "lab": {k: summary[k] for k in ("examples", "examples_per_source", "examples_per_task", "base_fact_accuracy")},
        }
    else:
        info = {"base_model": cfg.base_model(), "train_data": cfg.data.path, "suites": {}}
    if cfg.data.val_size:
        info |= split_validation(run, run.path(info["train_data"]))
    return info


def split_validation(run: Run, data: str) -> dict[str, Any]:
    """Write the train and validation splits (a seeded random hold-out)."""
    import numpy as np

    from dtm.data.formats import load_conversations
    from dtm.io import atomic_write_jsonl

    cfg = run.cfg
    loaded = load_conversations(data, format=cfg.data.format, on_bad_example=cfg.data.on_bad_example,
                                source_field=cfg.data.source_field, max_samples=cfg.data.max_samples)
    n = len(loaded)
    n_val = int(cfg.data.val_size) if cfg.data.val_size >= 1 else int(round(cfg.data.val_size * n))
    if not 1 <= n_val < n:
        raise DtmError(f"data.val_size = {cfg.data.val_size} leaves {n - n_val} of {n} examples for training; choose a smaller hold-out")
    held = set(np.random.default_rng(cfg.seed).permutation(n)[:n_val].tolist())
    train = [c.to_record() for i, c in enumerate(loaded.conversations) if i not in held]
    val = [c.to_record() for i, c in enumerate(loaded.conversations) if i in held]
    atomic_write_jsonl(run.dir.train_split, train)
    atomic_write_jsonl(run.dir.validation_split, val)
    return {"train_data": run.record(run.dir.train_split), "val_data": run.record(run.dir.validation_split),
            "split": {"train": len(train), "validation": len(val), "skipped": len(loaded.skipped)}}


def stage_disperse(run: Run) -> dict[str, Any]:
    from dtm.dispersal import disperse

    cfg = run.cfg
    with pool_cores(cfg.train.num_workers if cfg.disperse.strategy == "kmeans" else 1):
        result = disperse(
            run.inputs.train_data, k=cfg.disperse.k, strategy=cfg.disperse.strategy, out=run.dir.portions,
            seed=cfg.dispersal_seed, format="auto" if "val_data" in run.info else cfg.data.format, source_field=cfg.data.source_field,
            embed_on=cfg.disperse.embed_on, encoder=cfg.disperse.encoder, balance=cfg.disperse.balance,
            on_bad_example=cfg.data.on_bad_example, overwrite=True, embed_batch_size=cfg.disperse.embed_batch_size,
        )
    return {"portions": run.record(result.out), "sizes": [len(p) for p in result.portions], "stats": result.stats["portions"]}


@contextlib.contextmanager
def pool_cores(workers: int, computes: bool = True) -> Iterator[None]:
    """Torch threads for work done here while the worker pool waits (the k-means dispersal's
    MiniLM embeddings, the Fishers and merges): on CPU, the pool's `workers` cores instead of the
    one thread `make` gives this process (OMP_NUM_THREADS=1), which left the other core idle;
    restored after.

    Beside other seed runs (`dtm.turns`) the pool may be busy with their jobs: work that
    `computes` on those threads first waits, holding its turn so that no job starts, until the
    pool's jobs have finished, instead of sharing the cores with them. The thread count is the
    sequential run's either way (one that followed the pool's load would make the numbers depend
    on timing). A merge of full weights passes `computes=False`: the merge engine computes
    elementwise on one thread of its own whatever the count here (`merging.engine.torch_threads`)."""
    import torch

    before = torch.get_num_threads()
    if workers > before and not torch.cuda.is_available():
        if computes and turns.active():
            from dtm.training.executors import wait_for_idle_pool

            wait_for_idle_pool()
        torch.set_num_threads(workers)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stage_train(run: Run) -> dict[str, Any]:
    from dtm.training import train_jobs
    from dtm.training.executors import redone_steps

    jobs = plan.training_jobs(run.cfg, run.dir, run.inputs)
    timings = train_jobs(run.cfg, run.inputs.base, jobs, run.dir.models)
    redone = redone_steps([run.dir.model(name) for name in jobs])
    if redone:
        log.warning("%s: training steps redone after interrupted attempts (lost nodes, killed runs): %s", run.dir.label, redone)
    return {"models": sorted(jobs), "seconds": timings, "redone_steps": redone}


def stage_merge(run: Run) -> dict[str, Any]:
    """Every merge of the plan not yet written; the Fishers a `fisher` merge needs first. On the
    cluster, the Fishers are tasks side by side, then the merges. Beside other seed runs, in the
    driver's thread (`turns.in_main_thread`: the sequential run's numbers)."""
    return turns.in_main_thread(_merge_stage_here, run)


def _merge_stage_here(run: Run) -> dict[str, Any]:
    from dtm.merging.methods import MODEL_LEVEL_METHODS, get_method

    cfg = run.cfg
    merges = plan.merge_plan(cfg, run.dir, run.inputs)
    todo = {name: spec for name, spec in merges.items() if not rd.is_merged(run.dir.model(name))}
    # matrix products here: the Fishers, a greedy soup's scoring, LoRA's B·A; else elementwise merges
    computes = cfg.train.finetuning_type == "lora" or any(
        spec["method"] in MODEL_LEVEL_METHODS or get_method(spec["method"]).uses_fisher for spec in todo.values())
    with pool_cores(cfg.train.num_workers, computes):  # Fishers and merges run here (locally) while the workers wait
        for spec in todo.values():
            if spec["method"] not in MODEL_LEVEL_METHODS and get_method(spec["method"]).uses_fisher:
                fisher_files(run, spec["models"])
        seconds = each(cfg, "merge", merge_one, {name: (run, name, spec) for name, spec in todo.items()})
    return {"models": sorted(merges), "seconds": seconds}


def merge_one(run: Run, name: str, spec: dict[str, Any]) -> float:
    """One merge of the plan into its model directory (a task of its own on the cluster); -> seconds."""
    from dtm.merging import merge
    from dtm.merging.methods import MODEL_LEVEL_METHODS, get_method

    cfg = run.cfg
    t0 = time.perf_counter()
    parameters = dict(spec["parameters"])
    score_fn = None
    if spec["method"] in MODEL_LEVEL_METHODS:  # the greedy soup: a loop over candidate soups
        score_fn = validation_score(run)
    elif get_method(spec["method"]).uses_fisher:
        parameters["fisher_files"] = [str(run.dir.fisher_file(m.name)) for m in spec["models"]]  # written by fisher_files
    merge(spec["models"], run.dir.model(name), method=spec["method"], weights=spec["weights"], base=spec["base"],
          parameters=parameters, dtype=cfg.merge.dtype, out_dtype=cfg.merge.out_dtype,
          lora_merge=cfg.merge.lora_merge, overwrite=False, score_fn=score_fn)
    return round(time.perf_counter() - t0, 2)


def each(cfg: ExperimentConfig, stage: str, fn: Callable[..., Any], calls: dict[str, tuple]) -> dict[str, Any]:
    """`fn(*args)` for every named call: Ray tasks placed across the cluster with `train.executor:
    ray` (`dtm.cluster`), else here in turn. -> name -> result; raises naming every failed call."""
    if cluster.enabled(cfg) and calls:
        from dtm.training.executors import Retries

        return cluster.run_all(fn, calls, cluster.stage_resources(cfg, stage), Retries(cfg.train.retries), stage)
    return {name: fn(*args) for name, args in calls.items()}


def fisher_files(run: Run, models: list[Path]) -> list[Path]:
    """The diagonal Fisher of each sub-model on its own portion (`merge.fisher_samples` examples,
    the prompt template of training), for `merge.method: fisher`; computed once, kept in the run."""
    missing = {model.name: (run, i, model) for i, model in enumerate(models) if not run.dir.fisher_file(model.name).is_file()}
    each(run.cfg, "fisher", fisher_one, missing)
    return [run.dir.fisher_file(model.name) for model in models]


def fisher_one(run: Run, index: int, model: Path) -> Path:
    """The Fisher of sub-model `index` on its portion (a task of its own on the cluster)."""
    from transformers import AutoTokenizer

    from dtm.data.formats import load_conversations
    from dtm.data.template import tokenize_conversations
    from dtm.fisher import compute_fisher

    cfg = run.cfg
    out = run.dir.fisher_file(model.name)
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=cfg.model.trust_remote_code)
    conversations = load_conversations(run.dir.portion(index), format="auto").conversations
    examples, _ = tokenize_conversations(conversations, tokenizer, cfg.data.template, cfg.data.cutoff_len, cfg.data.first_turn_only)
    out.parent.mkdir(parents=True, exist_ok=True)
    return compute_fisher(model, examples[: cfg.merge.fisher_samples], out=out, trust_remote_code=cfg.model.trust_remote_code,
                          progress=not cluster.enabled(cfg))


def validation_score(run: Run) -> Callable[[Path], float]:
    """Greedy soup's score: minus the mean loss on the held-out validation split of the training
    data (never a test benchmark: the soup would be picked on what it is judged on)."""
    from dtm.data.formats import load_conversations
    from dtm.data.template import tokenize_conversations
    from dtm.training.batches import mean_loss
    from dtm.training.sft import load_base

    cfg = run.cfg
    conversations = load_conversations(run.inputs.val_data, format="auto").conversations

    def score(model_dir: Path) -> float:
        model, tokenizer = load_base(model_dir, cfg)  # the trainer's loader: its checks, its pad token
        examples, _ = tokenize_conversations(conversations, tokenizer, cfg.data.template, cfg.data.cutoff_len, cfg.data.first_turn_only)
        return -mean_loss(model, examples, tokenizer.pad_token_id)

    return score


def task_list(run: Run) -> list[str]:
    suites = run.info.get("suites") or {}
    tasks: list[str] = []
    for suite in run.cfg.eval.suites:
        tasks += [run.path(p) for p in suites[suite]] if suite in suites else [suite]
    return tasks + list(run.cfg.eval.tasks)


def stage_eval(run: Run) -> dict[str, Any]:
    """Evaluate every model; on CPU with `train.num_workers` > 1, models are shared among that many
    one-thread processes (the same rule as training: one process per core, one thread each)."""
    cfg = run.cfg
    models = plan.evaluated_models(cfg, run.dir, run.inputs)
    tasks = task_list(run)
    kwargs = dict(batch_size=cfg.eval.batch_size, limit=cfg.eval.limit, max_new_tokens=cfg.eval.max_new_tokens,
                  data_dir=cfg.eval.data_dir, allow_code_execution=cfg.eval.allow_code_execution,
                  log_samples=cfg.eval.log_samples, trust_remote_code=cfg.model.trust_remote_code)
    import torch

    # beside other seed runs (`dtm.turns`) even one model goes to the pool their jobs share
    wanted = cfg.train.num_workers if turns.active() else min(cfg.train.num_workers, len(models))
    workers = 1 if torch.cuda.is_available() else wanted
    diagnostic = None  # the token-loss diagnostic, when computed while the pool evaluates
    if tasks and cluster.enabled(cfg):  # each model a task on the cluster
        each(cfg, "eval", _evaluate_group, {name: ({name: spec}, tasks, str(run.dir.eval_dir), kwargs | {"progress": False})
                                           for name, spec in models.items()})
    elif tasks and workers <= 1:
        _evaluate_group(models, tasks, str(run.dir.eval_dir), kwargs)
    elif tasks:
        from dtm.training.executors import finished_in_turn, submit, worker_pool

        pool = worker_pool(cfg.train.num_workers)  # the training workers, already started
        futures = {submit(pool, _evaluate_group, {name: models[name]}, tasks, str(run.dir.eval_dir), kwargs | {"progress": False}): name
                   for name in longest_first(models)}
        if cfg.eval.token_losses:
            # here while the workers evaluate: after them, it ran on one core with the other idle
            # (7 s a lab seed; benchmarks/results/profile_demo.md), on one thread, since the
            # workers hold the other cores
            diagnostic = turns.in_main_thread(token_losses_one_thread, run, models)
        for future in finished_in_turn(futures, "eval"):
            future.result()
    if cfg.eval.lm_eval_tasks:
        lm_eval_models(run, models)
    outputs = {"models": sorted(models), "tasks": tasks, "lm_eval_tasks": list(cfg.eval.lm_eval_tasks)}
    if cfg.eval.token_losses:
        outputs["token_losses"] = diagnostic if diagnostic is not None else token_losses(run, models)
    return outputs


def longest_first(models: dict[str, Any]) -> list[str]:
    """The models in the order the eval pool gets them: an ensemble of K first (it costs K models'
    forward passes), the rest as planned. Planned order put the ensemble last, so one worker
    scored it alone while the other idled (longest-processing-time-first, as `run_local` trains)."""
    return sorted(models, key=lambda name: -len(models[name]) if isinstance(models[name], list) else -1)


def token_losses_one_thread(run: Run, models: dict[str, Any]) -> dict[str, Any]:
    """`token_losses` on one torch thread (the pool's workers hold the other cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return token_losses(run, models)
    finally:
        torch.set_num_threads(threads)


def token_losses(run: Run, models: dict[str, Any]) -> dict[str, Any]:
    """The token-level diagnostic on the base, vanilla's snapshots and vanilla (`eval.token_losses`),
    on a seeded sample of the train split; written once (a resumed stage keeps it). -> its file and seconds."""
    import random

    from dtm.data.formats import load_conversations
    from dtm.evaluation.diagnostics import token_loss_diagnostic

    out = run.dir.token_losses_file
    if out.is_file():
        return {"file": str(out.relative_to(run.dir.root))}
    cfg, t0 = run.cfg, time.perf_counter()
    train = load_conversations(run.inputs.train_data, format="auto").conversations
    sample = random.Random(cfg.seed).sample(train, min(cfg.eval.token_loss_samples, len(train)))
    snapshots = [(rd.snapshot_fraction(name), ref) for name, ref in models.items()
                 if name in (rd.BASE, rd.VANILLA) or rd.is_snapshot(name)]
    result = token_loss_diagnostic(snapshots, sample, train, cfg.data.template, cfg.data.cutoff_len, cfg.data.first_turn_only,
                                   top=cfg.eval.token_loss_top, min_count=cfg.eval.token_loss_min_count,
                                   batch_size=cfg.eval.batch_size)
    seconds = round(time.perf_counter() - t0, 2)
    atomic_write_json(out, result | {"seconds": seconds})
    return {"file": str(out.relative_to(run.dir.root)), "seconds": seconds}


def _evaluate_group(models: dict[str, Any], tasks: list[str], out_dir: str, kwargs: dict[str, Any]) -> None:
    from dtm.evaluation import evaluate_many

    evaluate_many(models, tasks, out_dir=out_dir, **kwargs)


def lm_eval_models(run: Run, models: dict[str, Any]) -> None:
    """`eval.lm_eval_tasks` through lm-evaluation-harness, into the same `eval/<model>.json` files
    (an ensemble and a LoRA-MoE have no lm-eval model and are skipped; an adapter runs as lm-eval's `peft=`)."""
    from dtm.lora_moe import is_lora_moe

    each(run.cfg, "lm_eval", lm_eval_one, {name: (run, name, ref) for name, ref in models.items()
                                            if not isinstance(ref, list) and not (isinstance(ref, str) and is_lora_moe(ref))})


def lm_eval_one(run: Run, name: str, ref: str | dict[str, str]) -> None:
    """lm-eval's tasks on one model (a task of its own on the cluster)."""
    from dtm.evaluation.lmeval import run_lm_eval

    cfg = run.cfg
    model, extra = (ref["model"], f"peft={ref['adapter']}") if isinstance(ref, dict) else (ref, "")
    run_lm_eval(model, list(cfg.eval.lm_eval_tasks), run.dir.eval_result(name), batch_size=cfg.eval.batch_size,
                limit=cfg.eval.limit, device="auto",
                include_path=cfg.eval.lm_eval_include, model_args=extra)


STAGE_FUNCTIONS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "data": stage_data,
    "disperse": stage_disperse,
    "train": stage_train,
    "merge": stage_merge,
    "eval": stage_eval,
}


# ---------------------------------------------------------------- driving


# (run, stage, its hash) -> True when the stage's finished outputs and manifest were put in place
# from elsewhere (a sweep's sibling cell); called after a stale stage is cleared, before it runs.
Reuse = Callable[[Run, str, str], bool]


def run_seed(run: Run, from_stage: str | None = None, console: Any = None, reuse: Reuse | None = None) -> Run:
    """Run (or resume) every stage of one seed's experiment."""
    run_stages(run, STAGES, redone(from_stage), console, reuse)
    return run


def redone(from_stage: str | None) -> tuple[str, ...]:
    """The stages `from_stage` asks to redo: it and every later one."""
    return STAGES[STAGES.index(from_stage):] if from_stage else ()


def run_stages(run: Run, stages: tuple[str, ...], forced: tuple[str, ...], console: Any = None,
               reuse: Reuse | None = None) -> tuple[str, ...]:
    """Run (or resume) `stages` of one seed's run, redoing the `forced` ones even where up to date.
    -> the stages to redo after these (a stage that reruns invalidates every later one)."""
    hashes = stage_hashes(run.cfg, run.dir.control)
    for stage in stages:
        turns.check()  # beside other seed runs: stop here once one of them has failed
        manifest = run.dir.manifest(stage)
        if manifest and manifest["hash"] == hashes[stage] and stage not in forced:
            if stage == "data":
                run.info = manifest["outputs"]
            _say(console, f"  [dim]{run.dir.label}: {stage} up to date[/]")
            continue
        if manifest or stage in forced:
            # Finished under another config (or redone on request): its outputs are stale. A stage
            # without a manifest was interrupted and keeps its outputs, so that it resumes.
            clear_stage_outputs(run, stage)
        forced = STAGES[STAGES.index(stage):]  # a stage that reruns invalidates the ones after it
        if reuse is not None and reuse(run, stage, hashes[stage]):
            if stage == "data":
                run.info = run.dir.outputs("data")
            _say(console, f"  {run.dir.label}: {stage} linked from an identical sibling")
            continue
        _say(console, f"  {run.dir.label}: [bold]{stage}[/] ...")
        with run.dir.attempt(stage) as clock:
            outputs = STAGE_FUNCTIONS[stage](run)
        if stage == "data":
            run.info = outputs
        seconds, attempts = clock()
        run.dir.write_manifest(stage, hashes[stage], seconds, outputs, attempts)
        run.dir.attempts_path(stage).unlink(missing_ok=True)
        _say(console, f"  {run.dir.label}: {stage} done in {seconds:.1f}s" + (f" ({attempts} attempts)" if attempts > 1 else ""))
    return forced


def clear_stage_outputs(run: Run, stage: str) -> None:
    """Remove what `stage` wrote, and its manifest, before it is redone."""
    paths = run.dir.stage_outputs_on_disk(stage)
    if stage == "merge" and run.info:
        paths = [run.dir.model(name) for name in plan.merge_plan(run.cfg, run.dir, run.inputs)] + [run.dir.fisher_dir]
    for path in [*paths, run.dir.manifest_path(stage), run.dir.attempts_path(stage)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _say(console: Any, text: str) -> None:
    if console is not None:
        console.print(text)


def run(config: ExperimentConfig | str | Path, overrides: list[str] | None = None, from_stage: str | None = None,
        report: bool = True, reuse: Reuse | None = None) -> Path:
    """Run the experiment (all seeds, and the lab's no-bias control) and write the report; -> output dir."""
    from rich.console import Console

    if from_stage is not None and from_stage not in (*STAGES, "report"):
        raise DtmError(f"unknown stage {from_stage!r}; stages: {', '.join((*STAGES, 'report'))}")
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    if cfg.sweep.axes:
        raise DtmError(f"{cfg.where('sweep')}: this config is a sweep; run it with `dtm run` (`dtm.sweep.run`), which runs its cells")
    check_runnable(cfg)
    if cluster.enabled(cfg):  # Ray tasks run in their node's working directory, not the driver's
        cfg.output_dir = str(Path(cfg.output_dir).resolve())
    console = Console()
    run_dir = rd.RunDir(Path(cfg.output_dir))
    make_dirs(run_dir.root, "creating the run directory (output_dir)")
    for stale in remove_stale_temporaries(run_dir.root):  # a killed run's half-written files (a live writer's are kept)
        log.info("removed %s, left by a writer that was killed", stale)
    atomic_write_json(run_dir.config_file, cfg.model_dump(mode="json"))
    t0 = time.perf_counter()
    first = None if from_stage == "report" else from_stage
    with cluster.session(cfg, run_dir.root):  # train.executor ray: connected once, the run directory seen by every node
        runs = seed_runs(cfg)
        if side_by_side(cfg, runs):
            run_side_by_side(runs, first, console, reuse)
        else:
            for seed_run in runs:
                _say(console, _heading(seed_run))
                run_seed(seed_run, first, console, reuse)
    if report:
        md, page = stage_report(cfg, console)
        console.print(f"report: {md}  {page}  ({time.perf_counter() - t0:.0f}s in all)")
    return run_dir.root


def _heading(seed_run: Run) -> str:
    return f"[bold]{'no-bias control, ' if seed_run.dir.control else ''}seed {seed_run.cfg.seed}[/] -> {seed_run.dir.root}"


def side_by_side(cfg: ExperimentConfig, runs: list[Run]) -> bool:
    """Whether the seed runs share the worker pool side by side (`run_side_by_side`): on a CPU
    machine with `train.num_workers` > 1 and the joint or local executor, two or more seed runs,
    unless DTM_SEEDS_SEQUENTIAL=1. Not on Ray: its stages' work is Ray tasks placed by Ray
    (`each`, `cluster.run_tasks`), whose waits do not give a turn away; not with
    `train.workers_per_model` > 1 (each model is a Ray Train group started from here) or
    `eval.lm_eval_tasks` (lm-eval runs here, on this process's threads, as long as an evaluation)."""
    if env_flag(SEQUENTIAL_ENV, default=False) or len(runs) < 2:
        return False
    train = cfg.train
    if cluster.enabled(cfg) or train.num_workers < 2 or train.workers_per_model > 1 or cfg.eval.lm_eval_tasks:
        return False
    import torch

    return not torch.cuda.is_available()


def run_side_by_side(runs: list[Run], from_stage: str | None, console: Any, reuse: Reuse | None) -> None:
    """The seed runs' data and disperse stages one after another (work done here, the pool idle:
    the k-means embeddings take its cores), then their train, merge and eval stages side by side,
    a thread each, taking turns (`dtm.turns`) and sharing the worker pool: one seed run's jobs
    fill the workers another leaves idle. Every model and result is the sequential run's, byte
    for byte (each job and stage seeds itself; tests/test_side_by_side.py).

    A failed seed run stops the others (each finishes the pool jobs it started, so a rerun
    resumes without them) and its error is raised, naming it; of several, the first seed run's
    in run order, as the sequential run would raise it. Ctrl-C returns at once."""
    import torch

    forced = {}
    for seed_run in runs:
        _say(console, _heading(seed_run))
        forced[seed_run.dir.label] = run_stages(seed_run, EARLY_STAGES, redone(from_stage), console, reuse)
    group, threads_here = turns.Turns(), torch.get_num_threads()
    errors: dict[int, BaseException] = {}

    def one(index: int, seed_run: Run) -> None:
        try:
            with turns.taking_turns(group, seed_run.dir.label):
                torch.set_num_threads(threads_here)  # a new thread starts with torch's default count, not this one's
                run_stages(seed_run, POOLED_STAGES, forced[seed_run.dir.label], console, reuse)
        except BaseException as e:  # handed to the driver below
            errors[index] = e
            group.stop.set()

    threads = [threading.Thread(target=one, args=(i, r), name=f"dtm-{r.dir.label}", daemon=True) for i, r in enumerate(runs)]
    for thread in threads:
        thread.start()
    try:
        turns.serve(group, threads)  # their merges and token diagnostics, here (`turns.in_main_thread`)
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C: tell the seed runs to stop; they are daemons, so this process ends now
        group.stop.set()
        raise
    failed = sorted(((i, e) for i, e in errors.items() if not isinstance(e, turns.Stopped)), key=lambda f: f[0])
    if failed or errors:
        index, error = (failed or sorted(errors.items(), key=lambda f: f[0]))[0]
        raise _naming(error, runs[index].dir.label)


def _naming(error: BaseException, label: str) -> BaseException:
    """`error` with the seed run it happened in: in its message for a `DtmError` (the CLI prints
    only the message), as a note otherwise (under the traceback)."""
    where = f"in seed run {label} (seed runs side by side; {SEQUENTIAL_ENV}=1 runs them one after another)"
    if isinstance(error, DtmError) and len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"{label}: {error.args[0]}",)
    elif hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(where)
    else:
        log.error("the error below happened %s", where)
    return error


def demo(out: str | Path = "runs/demo", overrides: list[str] | None = None) -> Path:
    """`dtm demo`: the built-in lab end to end (`dtm run` on `LAB_CONFIG`) into `out`."""
    return run(LAB_CONFIG, [f"output_dir={Path(out).resolve()}", *(overrides or [])])


def report_missing(cfg: ExperimentConfig) -> list[str]:
    """What the report would lack: each seed run whose eval stage is not done (under this config),
    and each model its finished eval stage lists whose result file is gone."""
    missing = []
    for run in seed_runs(cfg):
        manifest = run.dir.manifest("eval")
        if manifest is None or manifest["hash"] != stage_hashes(run.cfg, run.dir.control)["eval"]:
            missing.append(f"{run.dir.label}: eval stage not done")
            continue
        absent = [m for m in manifest.get("outputs", {}).get("models", []) if not run.dir.eval_result(m).is_file()]
        if absent:
            missing.append(f"{run.dir.label}: no evaluation result for {', '.join(absent)}")
    return missing


def stage_report(cfg: ExperimentConfig, console: Any = None, partial: bool = False) -> tuple[Path, Path]:
    """Write report.md/report.html over every seed run, and the report's manifest.

    A run whose evaluation is unfinished is refused (its report would lack rows, or average
    fewer than K sub-models, without a word), unless `partial`: then the report says at its top
    what is missing, and its manifest records it."""
    from dtm.report import write_run_report

    missing = report_missing(cfg)
    if missing and not partial:
        raise DtmError(f"{cfg.output_dir}: the run is not finished (" + "; ".join(missing) + "), so its report would lack rows "
                       "or average fewer models; finish it with `dtm run CONFIG` (it resumes), or pass --partial "
                       "(partial=True) for a report marked partial")
    t0 = time.perf_counter()
    warning = f"PARTIAL REPORT: missing {'; '.join(missing)}" if missing else ""
    md, page = write_run_report(cfg, console=console, warning=warning)
    rd.RunDir(Path(cfg.output_dir)).write_manifest("report", report_hash(cfg), time.perf_counter() - t0,
                                                    {"markdown": str(md), "html": str(page), "partial": missing})
    return md, page


def write_report(run_dir: str | Path, console: Any = None, partial: bool = False) -> tuple[Path, Path]:
    """(Re)write the report of a run directory and its manifest: `dtm report RUN_DIR [--partial]`."""
    return stage_report(load_run_config(run_dir), console, partial)


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The config a run directory was made with, pointed at where the directory is now."""
    root = rd.RunDir(Path(run_dir))
    if not root.config_file.is_file():
        raise DtmError(f"{root.root}: not a run directory (no config.json); start one with `dtm run CONFIG`")
    try:
        cfg = ExperimentConfig.model_validate(json.loads(root.config_file.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, ValidationError) as e:
        first = str(e).strip().splitlines()
        raise DtmError(f"{root.config_file}: not a valid run config ({' '.join(first[:3])}); it is written by `dtm run`: "
                       "restore it, or rerun `dtm run CONFIG` with the experiment's config to write it again") from None
    cfg.output_dir = str(root.root)  # however it was given (relative) or wherever it was moved
    return cfg


def stage_progress(run: Run, stage: str) -> tuple[int, int] | None:
    """(finished, planned) models of a model stage (train, merge, eval), once the data stage has
    said what the run's inputs are; None for the other stages."""
    if stage not in ("train", "merge", "eval") or not run.info:
        return None
    try:
        planned = {"train": plan.training_jobs, "merge": plan.merge_plan, "eval": plan.evaluated_models}[stage](run.cfg, run.dir, run.inputs)
        tasks = len(task_list(run)) + len(run.cfg.eval.lm_eval_tasks) if stage == "eval" else 0
    except (KeyError, TypeError, ValueError):  # a data manifest not written by this version: no progress, the state stands
        return None
    return len(run.dir.finished(stage, planned, tasks)), len(planned)


def redone_so_far(models: Path) -> dict[str, int]:
    """Model -> training steps redone after interrupted attempts (only models with any), from the
    models' attempts files: so `dtm status` shows them while the stage still runs, too."""
    from dtm.training.executors import redone_steps

    outs = sorted(p for p in models.iterdir() if p.is_dir()) if models.is_dir() else []
    return {name: steps for name, steps in redone_steps(outs).items() if steps}


def status(run_dir: str | Path) -> list[dict[str, Any]]:
    """Where a run stands: one row per seed run and stage (done / stale / pending, or partial with
    its progress, e.g. `6/10 models`, for a stage that has begun; the report is partial when it
    was written with --partial and its inputs are still unfinished)."""
    return status_of(load_run_config(run_dir))


def status_of(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """`status` of the run `cfg` makes in its output_dir (started or not)."""

    def row(label: str, stage: str, manifest: dict[str, Any] | None, current: str, progress: tuple[int, int] | None = None) -> dict[str, Any]:
        state = "pending" if manifest is None else ("done" if manifest.get("hash") == current else "stale")
        if state == "pending" and progress and progress[0]:
            state = "partial"
        return {"run": label, "stage": stage, "state": state, "seconds": manifest.get("seconds") if manifest else None,
                "finished": manifest.get("finished") if manifest else None,
                "progress": f"{progress[0]}/{progress[1]} models" if state == "partial" else None}

    rows = []
    for seed_run in seed_runs(cfg):
        hashes = stage_hashes(seed_run.cfg, seed_run.dir.control)
        data = seed_run.dir.manifest("data")
        if data and data.get("hash") == hashes["data"]:
            seed_run.info = data.get("outputs", {})
        rows += [row(seed_run.dir.label, stage, seed_run.dir.manifest(stage), hashes[stage], stage_progress(seed_run, stage))
                 | ({"redone": redone_so_far(seed_run.dir.models)} if stage == "train" else {})
                 for stage in STAGES]
    report = rd.RunDir(Path(cfg.output_dir)).manifest("report")
    rows.append(row(".", "report", report, report_hash(cfg)))
    if rows[-1]["state"] == "done":
        # the hash follows the config only: a report is not done while its inputs are not
        partial = (report or {}).get("outputs", {}).get("partial")
        if report_missing(cfg):
            rows[-1]["state"] = "partial" if partial else "stale"
        elif partial:
            rows[-1]["state"] = "stale"  # written partial, the inputs have finished since
    return rows
