"""`dtm run`: the whole experiment as stages over one run directory.

    data -> disperse -> train -> merge -> eval        (once per seed: <out>/seed-<s>/)
    report                                             (over all seeds: <out>/report.{md,html})

Each stage writes its outputs into the run directory and then a manifest
(`manifests/<stage>.json`: the hash of the config slice it depends on, chained with the
hashes of the stages before it; outputs; wall time). A rerun skips every stage whose
manifest matches; `from_stage` redoes that stage and all later ones; a crash resumes at the
first unfinished stage, and inside a stage the trainer, merger and evaluator skip or resume
their own finished work.

Models, by name (every one is a `save_pretrained` directory under `models/`):
  sub-1..sub-K    one per portion                 DTM          the merge of the sub-models
  vanilla         all data, K=1                   vanilla@f    its checkpoints at fraction f
  short           all data, 1/K of the epochs     soup         uniform soup of `short`-like models
  wise_ft-a       base/vanilla interpolation      l2, ewc, ... training baselines
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtm.config import ExperimentConfig, load_config
from dtm.errors import DtmError
from dtm.io import atomic_write_json

log = logging.getLogger(__name__)

LAB_CONFIG = Path(__file__).parent / "configs" / "lab.yaml"  # the demo: `dtm demo` = `dtm run` on it
STAGES = ("data", "disperse", "train", "merge", "eval")
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
    """One seed's run directory and what the stages have recorded in it."""

    cfg: ExperimentConfig
    root: Path
    control: bool = False  # the no-bias lab control
    info: dict[str, Any] = field(default_factory=dict)  # from the data stage: paths, base, suites

    def manifest_path(self, stage: str) -> Path:
        return manifest_path(self.root, stage)

    def manifest(self, stage: str) -> dict[str, Any] | None:
        return read_manifest(self.root, stage)

    @property
    def models(self) -> Path:
        return self.root / "models"


def base_fingerprint(cfg: ExperimentConfig) -> str:
    """What identifies the base model's weights cheaply: a run made on other weights is stale."""
    name = cfg.model.model_name_or_path
    if name == "lab":
        from dtm.lab import base_model_dir

        name = str(base_model_dir())
    path = Path(name)
    if not path.is_dir():
        return name  # a hub id (with its revision in the model section)
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    return hashlib.sha256("".join(f"{p.name}:{p.stat().st_size}:{p.read_text()[:4096] if p.suffix == '.json' else ''}"
                                  for p in files).encode()).hexdigest()[:16]


def stage_hashes(cfg: ExperimentConfig, control: bool = False) -> dict[str, str]:
    """Each stage's hash covers its own config sections and every earlier stage's (and the base weights)."""
    out, sections = {}, ["seed"]
    dump = cfg.model_dump(mode="json")
    base = base_fingerprint(cfg)
    for stage in STAGES:
        sections += STAGE_SECTIONS[stage]
        blob = json.dumps({"control": control, "base": base, **{s: dump[s] for s in sections}}, sort_keys=True)
        out[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return out


def report_hash(cfg: ExperimentConfig) -> str:
    """The report reads every seed run's evaluation: its hash covers theirs and the report section."""
    evals = [stage_hashes(seed_cfg, control)["eval"] for seed_cfg, _, control in seed_runs(cfg)]
    blob = json.dumps({"evals": evals, "report": cfg.report.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def manifest_path(root: Path, stage: str) -> Path:
    """Where a stage records what it did: a seed run's stages in its dir, the report in the run's."""
    return root / "manifests" / f"{stage}.json"


def read_manifest(root: Path, stage: str) -> dict[str, Any] | None:
    path = manifest_path(root, stage)
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- stages


def stage_data(run: Run) -> dict[str, Any]:
    """Resolve the base model, the training data and the benchmark suites (the lab writes its own);
    hold out the validation split."""
    cfg = run.cfg
    if cfg.data.path == "lab" or cfg.model.model_name_or_path == "lab":
        from dtm import lab

        if not (cfg.data.path == "lab" and cfg.model.model_name_or_path == "lab"):
            raise DtmError("the lab is a data set and a base model together: set both data.path and model.model_name_or_path to 'lab'")
        base = lab.base_model_dir()
        summary = lab.build_lab(run.root / "lab", seed=cfg.seed, scale=cfg.lab.scale, base_dir=base)
        info = {
            "base_model": str(base),
            "train_data": summary["sft_nobias" if run.control else "sft"],
            "suites": summary["tasks"],
            "lab": {k: summary[k] for k in ("examples", "examples_per_source", "examples_per_task", "base_fact_accuracy")},
        }
    else:
        info = {"base_model": cfg.model.model_name_or_path, "train_data": cfg.data.path, "suites": {}}
    if cfg.data.val_size:
        info |= split_validation(run, info["train_data"])
    return info


def split_validation(run: Run, data: str) -> dict[str, Any]:
    """Write data/train.jsonl and data/validation.jsonl (a seeded random hold-out)."""
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
    out = run.root / "data"
    atomic_write_jsonl(out / "train.jsonl", train)
    atomic_write_jsonl(out / "validation.jsonl", val)
    return {"train_data": str(out / "train.jsonl"), "val_data": str(out / "validation.jsonl"),
            "split": {"train": len(train), "validation": len(val), "skipped": len(loaded.skipped)}}


def stage_disperse(run: Run) -> dict[str, Any]:
    from dtm.dispersal import disperse

    cfg = run.cfg
    result = disperse(
        run.info["train_data"], k=cfg.disperse.k, strategy=cfg.disperse.strategy, out=run.root / "portions",
        seed=cfg.dispersal_seed, format="auto" if "val_data" in run.info else cfg.data.format, source_field=cfg.data.source_field,
        embed_on=cfg.disperse.embed_on, encoder=cfg.disperse.encoder, balance=cfg.disperse.balance,
        on_bad_example=cfg.data.on_bad_example, overwrite=True, embed_batch_size=cfg.disperse.embed_batch_size,
    )
    return {"portions": str(result.out), "sizes": [len(p) for p in result.portions], "stats": result.stats["portions"]}


def training_jobs(run: Run) -> dict[str, dict[str, Any]]:
    """name -> {data, config overrides, seed}: every model the train stage must produce."""
    cfg = run.cfg
    k = cfg.disperse.k
    data = run.info["train_data"]
    jobs: dict[str, dict[str, Any]] = {}
    no_snapshots = {"save_fractions": []}  # only vanilla draws the tax curve
    for i in range(k):
        jobs[f"sub-{i + 1}"] = {"data": str(run.root / "portions" / f"portion-{i + 1}.jsonl"), "train": no_snapshots, "seed": cfg.seed}
    fractions = sorted(set(cfg.train.save_fractions))
    jobs["vanilla"] = {"data": data, "train": {"save_fractions": fractions}, "seed": cfg.seed, "val_data": run.info.get("val_data")}
    methods = set(cfg.baselines.methods)
    # "short": all data for 1/K of the training, i.e. the steps of one sub-model.
    short = {"num_train_epochs": cfg.train.num_train_epochs / k, **no_snapshots}
    if cfg.train.max_steps > 0:
        short["max_steps"] = max(1, cfg.train.max_steps // k)
    if "short" in methods or "soup" in methods:
        jobs["short"] = {"data": data, "train": short, "seed": cfg.seed}
    if "soup" in methods:
        for j in range(1, cfg.baselines.soup_size):
            jobs[f"soup-{j + 1}"] = {"data": data, "train": short, "seed": cfg.seed + 1000 * j}
    for name in ("l2", "ewc", "replay", "curation"):
        if name in methods:
            jobs[name] = {"data": data, "train": no_snapshots, "seed": cfg.seed, "baseline": name}
    return jobs


def stage_train(run: Run) -> dict[str, Any]:
    from dtm.training import train_jobs

    jobs = training_jobs(run)
    timings = train_jobs(run.cfg, run.info["base_model"], jobs, run.models)
    return {"models": sorted(jobs), "seconds": timings}


def merge_plan(run: Run) -> dict[str, dict[str, Any]]:
    """name -> merge(...) arguments for every merged model."""
    cfg = run.cfg
    models = run.models
    plan: dict[str, dict[str, Any]] = {
        "DTM": {"models": [models / f"sub-{i + 1}" for i in range(cfg.disperse.k)], "method": cfg.merge.method,
                "weights": cfg.merge.weights, "parameters": cfg.merge.parameters, "base": run.info["base_model"]},
    }
    methods = set(cfg.baselines.methods)
    if "soup" in methods:
        plan["soup"] = {"models": [models / "short"] + [models / f"soup-{j + 1}" for j in range(1, cfg.baselines.soup_size)],
                        "method": "average", "weights": None, "parameters": {}, "base": run.info["base_model"]}
    if "wise_ft" in methods:
        for alpha in cfg.baselines.wise_ft_alphas:
            plan[f"wise_ft-{alpha:g}"] = {"models": [models / "vanilla"], "method": "wise_ft", "weights": None,
                                          "parameters": {"alpha": alpha}, "base": run.info["base_model"]}
    return plan


def stage_merge(run: Run) -> dict[str, Any]:
    from dtm.merging import merge

    cfg = run.cfg
    seconds = {}
    for name, args in merge_plan(run).items():
        out = run.models / name
        if (out / "config.json").is_file() or (out / "adapter_config.json").is_file():
            continue  # merges are written atomically: a directory that exists is complete
        t0 = time.perf_counter()
        merge(args["models"], out, method=args["method"], weights=args["weights"], base=args["base"],
              parameters=args["parameters"], dtype=cfg.merge.dtype, out_dtype=cfg.merge.out_dtype,
              lora_merge=cfg.merge.lora_merge, overwrite=False)
        seconds[name] = round(time.perf_counter() - t0, 2)
    return {"models": sorted(merge_plan(run)), "seconds": seconds}


def evaluated_models(run: Run) -> dict[str, Any]:
    """name -> model dir (or list of dirs for an ensemble) for every model the report shows."""
    cfg = run.cfg
    base = run.info["base_model"]

    def ref(path: Path) -> Any:  # a LoRA adapter is evaluated on top of the base
        return {"model": base, "adapter": str(path)} if (path / "adapter_config.json").is_file() else str(path)

    models: dict[str, Any] = {"base": base}
    for name in ["vanilla", *training_jobs(run), *merge_plan(run)]:
        if name.startswith("soup-"):
            continue  # soup ingredients are shown through the soup
        models[name] = ref(run.models / name)
    for frac_dir in sorted((run.models / "vanilla" / "fractions").glob("frac-*")):
        models[f"vanilla@{frac_dir.name.removeprefix('frac-')}"] = ref(frac_dir)
    if "ensemble" in cfg.baselines.methods:
        models["ensemble"] = [str(run.models / f"sub-{i + 1}") for i in range(cfg.disperse.k)]
    return models


def task_list(run: Run) -> list[str]:
    cfg = run.cfg
    suites = run.info.get("suites") or {}
    tasks: list[str] = []
    for suite in cfg.eval.suites:
        tasks += [str(p) for p in suites[suite]] if suite in suites else [suite]
    return tasks + list(cfg.eval.tasks)


def stage_eval(run: Run) -> dict[str, Any]:
    """Evaluate every model; on CPU with `train.num_workers` > 1, models are shared among that many
    one-thread processes (the same rule as training: one process per core, one thread each)."""
    cfg = run.cfg
    models = evaluated_models(run)
    tasks = task_list(run)
    kwargs = dict(batch_size=cfg.eval.batch_size, limit=cfg.eval.limit, max_new_tokens=cfg.eval.max_new_tokens,
                  data_dir=cfg.eval.data_dir, allow_code_execution=cfg.eval.allow_code_execution,
                  log_samples=cfg.eval.log_samples, trust_remote_code=cfg.model.trust_remote_code)
    import torch

    workers = 1 if torch.cuda.is_available() else min(cfg.train.num_workers, len(models))
    if workers <= 1:
        _evaluate_group(models, tasks, str(run.root / "eval"), kwargs)
    else:
        from dtm.training.executors import finished_in_turn, worker_pool

        pool = worker_pool(cfg.train.num_workers)  # the training workers, already started
        futures = {pool.submit(_evaluate_group, {name: spec}, tasks, str(run.root / "eval"), kwargs | {"progress": False}): name
                   for name, spec in models.items()}
        for future in finished_in_turn(futures, "eval"):
            future.result()
    return {"models": sorted(models), "tasks": tasks}


def _evaluate_group(models: dict[str, Any], tasks: list[str], out_dir: str, kwargs: dict[str, Any]) -> None:
    from dtm.evaluation import evaluate_many

    evaluate_many(models, tasks, out_dir=out_dir, **kwargs)


STAGE_FUNCTIONS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "data": stage_data,
    "disperse": stage_disperse,
    "train": stage_train,
    "merge": stage_merge,
    "eval": stage_eval,
}


# ---------------------------------------------------------------- driving


def run_seed(cfg: ExperimentConfig, root: Path, from_stage: str | None = None, control: bool = False,
             console: Any = None) -> Run:
    """Run (or resume) every stage of one seed's experiment in `root`."""
    run = Run(cfg=cfg, root=root, control=control)
    hashes = stage_hashes(cfg, control)
    forced = STAGES[STAGES.index(from_stage):] if from_stage else ()
    for stage in STAGES:
        manifest = run.manifest(stage)
        if manifest and manifest["hash"] == hashes[stage] and stage not in forced:
            if stage == "data":
                run.info = manifest["outputs"]
            _say(console, f"  [dim]{root.name}: {stage} up to date[/]")
            continue
        if manifest or stage in forced:
            # Finished under another config (or redone on request): its outputs are stale. A stage
            # without a manifest was interrupted and keeps its outputs, so that it resumes.
            clear_stage_outputs(run, stage)
        forced = STAGES[STAGES.index(stage):]  # a stage that reruns invalidates the ones after it
        _say(console, f"  {root.name}: [bold]{stage}[/] ...")
        t0 = time.perf_counter()
        outputs = STAGE_FUNCTIONS[stage](run)
        if stage == "data":
            run.info = outputs
        seconds = round(time.perf_counter() - t0, 2)
        atomic_write_json(run.manifest_path(stage), {"stage": stage, "hash": hashes[stage], "seconds": seconds,
                                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": outputs})
        _say(console, f"  {root.name}: {stage} done in {seconds:.1f}s")
    return run


def clear_stage_outputs(run: Run, stage: str) -> None:
    """Remove what `stage` wrote, and its manifest, before it is redone."""
    import shutil

    paths = {"data": [run.root / "lab", run.root / "data"], "disperse": [run.root / "portions"], "train": [run.models], "eval": [run.root / "eval"]}.get(stage, [])
    if stage == "merge" and run.info:
        paths = [run.models / name for name in merge_plan(run)]
    for path in [*paths, run.manifest_path(stage)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _say(console: Any, text: str) -> None:
    if console is not None:
        console.print(text)


def seed_runs(cfg: ExperimentConfig) -> list[tuple[ExperimentConfig, Path, bool]]:
    """(config, run dir, is_control) for every seed, and the no-bias control where it applies."""
    root = Path(cfg.output_dir)
    seeds = cfg.seeds or [cfg.seed]
    out = []
    controls = [False, True] if cfg.data.path == "lab" and cfg.lab.control else [False]
    for control in controls:
        for seed in seeds[: cfg.lab.control_seeds] if control else seeds:
            seed_cfg = cfg.model_copy(deep=True)
            seed_cfg.seed = seed
            if control:  # the control answers one question (do the tax and DTM's gain vanish?): vanilla and DTM suffice
                seed_cfg.baselines.methods = []
            out.append((seed_cfg, root / ("control-nobias" if control else "") / f"seed-{seed}", control))
    return out


def run(config: ExperimentConfig | str | Path, overrides: list[str] | None = None, from_stage: str | None = None,
        report: bool = True) -> Path:
    """Run the experiment (all seeds, and the lab's no-bias control) and write the report; -> output dir."""
    from rich.console import Console

    if from_stage is not None and from_stage not in (*STAGES, "report"):
        raise DtmError(f"unknown stage {from_stage!r}; stages: {', '.join((*STAGES, 'report'))}")
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    console = Console()
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "config.json", cfg.model_dump(mode="json"))
    t0 = time.perf_counter()
    for seed_cfg, seed_root, control in seed_runs(cfg):
        console.print(f"[bold]{'no-bias control, ' if control else ''}seed {seed_cfg.seed}[/] -> {seed_root}")
        run_seed(seed_cfg, seed_root, None if from_stage == "report" else from_stage, control, console)
    if report:
        md, page = stage_report(cfg, console)
        console.print(f"report: {md}  {page}  ({time.perf_counter() - t0:.0f}s in all)")
    return root


def stage_report(cfg: ExperimentConfig, console: Any = None) -> tuple[Path, Path]:
    """Write report.md/report.html over every seed run, and the report's manifest."""
    from dtm.report import write_run_report

    t0 = time.perf_counter()
    md, page = write_run_report(cfg, console=console)
    atomic_write_json(manifest_path(Path(cfg.output_dir), "report"), {
        "stage": "report", "hash": report_hash(cfg), "seconds": round(time.perf_counter() - t0, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": {"markdown": str(md), "html": str(page)}})
    return md, page


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The config a run directory was made with, pointed at where the directory is now."""
    root = Path(run_dir)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise DtmError(f"{root}: not a run directory (no config.json); start one with `dtm run CONFIG`")
    cfg = ExperimentConfig.model_validate(json.loads(cfg_path.read_text()))
    cfg.output_dir = str(root)  # however it was given (relative) or wherever it was moved
    return cfg


def status(run_dir: str | Path) -> list[dict[str, Any]]:
    """Where a run stands: one row per seed run and stage (done / stale / pending)."""
    root = Path(run_dir)
    cfg = load_run_config(root)
    rows = []
    for seed_cfg, seed_root, control in seed_runs(cfg):
        run_ = Run(seed_cfg, seed_root, control)
        hashes = stage_hashes(seed_cfg, control)
        for stage in STAGES:
            m = run_.manifest(stage)
            state = "pending" if m is None else ("done" if m["hash"] == hashes[stage] else "stale")
            rows.append({"run": str(seed_root.relative_to(root)), "stage": stage, "state": state,
                         "seconds": m.get("seconds") if m else None, "finished": m.get("finished") if m else None})
    m = read_manifest(root, "report")
    state = "pending" if m is None else ("done" if m["hash"] == report_hash(cfg) else "stale")
    rows.append({"run": ".", "stage": "report", "state": state, "seconds": m.get("seconds") if m else None,
                 "finished": m.get("finished") if m else None})
    return rows
