"""Sweeps: `dtm run` over a grid of configs (the `sweep:` section), every cell an ordinary run.

    sweep:                                  cells under <output_dir>/sweep/ (`rundir.sweep_cell_name`)
      mode: one_at_a_time                   `center` (the main config), then each axis value alone
      disperse.k: [1, 2, 4, 8]              -> disperse.k=1, disperse.k=2, disperse.k=8 (4 is `center`)
      merge.method: [average, ties]         -> merge.method=ties

A cell is a plain run directory (`dtm status`, `dtm report` read it as any run). Cells share
work through the manifests' stage hashes (`pipeline.stage_hashes`): before a cell's seed run
does a stage, a sibling cell's run of the same seed whose manifest has the same hash is linked
in (hard links, a copy across file systems: the files are never written again, only replaced
by atomic renames), and in the train stage each model whose training job is the same (same data
bytes, train and baselines sections, seed, base) is linked from the sibling that trained it. So
a merge-method axis trains nothing new, and a K axis trains vanilla once. In the eval stage,
each model's result file is linked from a sibling whose result for that model is current here
(every task's run key, `evaluation.runner.run_keys`: the same model files and task contents,
so the evaluator skips it): a merge-method cell evaluates only its merge. What was linked is recorded in each
seed run's `reused.json`, which the sweep report counts.

`run`, `status` and `write_report` here take plain runs too (and hand them to `dtm.pipeline`):
the CLI calls these.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm import plan
from dtm import rundir as rd
from dtm.config import ExperimentConfig, load_config, with_settings
from dtm.errors import ConfigError
from dtm.io import atomic_directory, atomic_write_json, make_dirs, temp_prefix
from dtm.pipeline import Run, check_runnable, load_run_config, seed_runs, stage_hashes, status_of, task_list
from dtm.pipeline import run as run_plain
from dtm.pipeline import write_report as write_plain_report

LINKED_STAGES = ("data", "disperse", "train", "merge")  # whole stages; eval results are linked model by model
EVAL = "eval:"  # `reused.json` key prefix of a linked evaluation result (then the model's name)
STAGE = "stage:"  # ... of a linked stage (then the stage's name); a bare model name: a linked trained model


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: its settings (dotted key -> value; none for `center`) and config."""

    name: str
    settings: dict[str, Any]
    cfg: ExperimentConfig


@dataclass(frozen=True)
class Axis:
    """One swept key and, for each of its values, the cell that holds it."""

    key: str
    points: list[tuple[Any, str]]  # (value, cell name)


@dataclass(frozen=True)
class Sweep:
    cfg: ExperimentConfig  # the main config (with its `sweep` section)
    cells: list[Cell]
    axes: list[Axis]

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


# ---------------------------------------------------------------- the cells


def _identity(cfg: ExperimentConfig) -> str:
    """What makes two cells the same run: the whole config but where it is written."""
    dump = cfg.model_dump(mode="json")
    dump.pop("output_dir")
    return json.dumps(dump, sort_keys=True)


def plan_sweep(cfg: ExperimentConfig) -> Sweep:
    """The cells of `cfg`'s sweep, in run order, and each axis's cells. Settings that give the
    same config share one cell (one_at_a_time: the main config's own value of each axis is `center`)."""
    root = rd.RunDir(Path(cfg.output_dir))
    keys = list(cfg.sweep.axes)
    if cfg.sweep.mode == "grid":
        combos = [dict(zip(keys, values)) for values in itertools.product(*(cfg.sweep.axes[k] for k in keys))]
    else:
        combos = [{}] + [{k: v} for k in keys for v in cfg.sweep.axes[k]]
    cells: list[Cell] = []
    by_identity: dict[str, str] = {}
    cell_of: list[str] = []
    main = _identity(with_settings(cfg, {}))
    for settings in combos:
        cell_cfg = with_settings(cfg, settings)
        if _identity(cell_cfg) != main:  # the cuts `sweep.center_only` (docs/architecture.md, "Sweeps")
            if "baselines" in cfg.sweep.center_only:
                cell_cfg.baselines.methods = []
            if "sub_models" in cfg.sweep.center_only:
                cell_cfg.eval.sub_models = False
        identity = _identity(cell_cfg)
        if identity not in by_identity:
            name = rd.sweep_cell_name(settings)
            cell_cfg.output_dir = str(root.sweep_cell(name).root)
            cells.append(Cell(name, settings, cell_cfg))
            by_identity[identity] = name
        cell_of.append(by_identity[identity])
    if cfg.sweep.mode == "grid":
        points = {k: [(v, next(n for s, n in zip(combos, cell_of) if s[k] == v)) for v in cfg.sweep.axes[k]] for k in keys}
    else:
        points = {k: [(s[k], n) for s, n in zip(combos, cell_of) if k in s] for k in keys}
    return Sweep(cfg, cells, [Axis(k, points[k]) for k in keys])


# ---------------------------------------------------------------- reuse across cells


def _link(a: str | Path, b: str | Path) -> None:
    """`b` becomes a hard link to `a` (a copy with its mtime across file systems)."""
    try:
        os.link(a, b)
    except OSError:  # another file system: a copy
        shutil.copy2(a, b)


def _link_tree(src: Path, dst: Path) -> None:
    """`dst` becomes a copy of `src` made of hard links (copies where links fail), atomically;
    whatever was at `dst` (an unfinished attempt) is replaced."""
    with atomic_directory(dst, overwrite=True) as tmp:
        shutil.copytree(src, tmp, copy_function=_link, dirs_exist_ok=True)


def _link_file(src: Path, dst: Path) -> None:
    """`dst` becomes a hard link to `src`, atomically (linked beside it under a temporary name,
    then renamed over it): a reader never sees a half-copied manifest or result."""
    make_dirs(dst.parent, f"linking {dst.name}")
    tmp = dst.with_name(temp_prefix(dst.name) + "link")
    tmp.unlink(missing_ok=True)
    _link(src, tmp)
    os.replace(tmp, dst)


def _file_digest(path: str, cache: dict[str, str]) -> str:
    if path not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        cache[path] = h.hexdigest()
    return cache[path]


def job_key(run: Run, job: dict[str, Any], digests: dict[str, str]) -> str:
    """What a trained model depends on: the data stage's hash (base, model, data and lab sections,
    seed), the train section, the baselines section for a trained baseline (the only jobs that read
    it: a cell without the ensemble still links the center's sub-models), and the job (its data
    files by content)."""
    dump = run.cfg.model_dump(mode="json")
    spec = {k: (_file_digest(v, digests) if k in ("data", "val_data") and v else v) for k, v in job.items()}
    blob = {"data": stage_hashes(run.cfg, run.dir.control)["data"], "train": dump["train"],
            "baselines": dump["baselines"] if job.get("baseline") else None, "job": spec}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _with_info(run: Run) -> Run | None:
    """`run` with its data stage's outputs, or None before that stage has finished."""
    info = run.dir.outputs("data")
    return Run(run.cfg, run.dir, info) if info else None


def _record(run: Run, linked: dict[str, str]) -> None:
    if linked:
        atomic_write_json(run.dir.reused_file, run.dir.reused() | linked)


class Reuser:
    """The `pipeline.Reuse` hook of one cell: links finished work of its siblings (see the module doc)."""

    def __init__(self, sweep: Sweep, cell: Cell, among: list[Cell] | None = None) -> None:
        """`among`: the only cells to link from (default: every other cell)."""
        self.siblings = [c for c in (sweep.cells if among is None else among) if c.name != cell.name]
        self.digests: dict[str, str] = {}

    def sibling_runs(self, run: Run) -> list[Run]:
        """The siblings' runs of the same seed (and control)."""
        return [r for c in self.siblings for r in seed_runs(c.cfg) if r.dir.label == run.dir.label]

    def __call__(self, run: Run, stage: str, hash: str) -> bool:
        if stage in ("train", "eval"):
            self.forget(run, stage)
        if stage == "eval":
            self.link_evaluations(run)
            return False  # the stage runs: the evaluator skips the linked results as current
        if stage not in LINKED_STAGES:
            return False
        for sibling in self.sibling_runs(run):
            manifest = sibling.dir.manifest(stage)
            if manifest and manifest["hash"] == hash:
                self.link_stage(sibling, run, stage)
                return True
        if stage == "train":
            self.link_models(run)
        return False

    def forget(self, run: Run, stage: str) -> None:
        """Drop the records of what `stage` linked: it is about to be done (again) and records
        what it links now. A train stage's records are its models'; an eval stage's, its results'."""
        def kept(key: str) -> bool:
            if stage == "eval":
                return not key.startswith(EVAL)
            return key.startswith((STAGE, EVAL)) and key != STAGE + "train"

        if run.dir.reused_file.is_file():
            atomic_write_json(run.dir.reused_file, {k: v for k, v in run.dir.reused().items() if kept(k)})

    def stage_paths(self, run: Run, stage: str) -> list[Path]:
        """What `stage` made in `run` (models by the plan's names: `models/` holds every stage's)."""
        full = _with_info(run)
        if stage == "train" and full is not None:
            return [run.dir.model(n) for n in plan.training_jobs(full.cfg, full.dir, full.inputs)]
        if stage == "merge" and full is not None:
            return [run.dir.model(n) for n in plan.merge_plan(full.cfg, full.dir, full.inputs)] + [run.dir.fisher_dir]
        return run.dir.stage_outputs_on_disk(stage)

    def link_stage(self, sibling: Run, run: Run, stage: str) -> None:
        """The sibling's finished `stage` (same hash), then its manifest, written last."""
        for src in self.stage_paths(sibling, stage):
            if src.is_dir():
                _link_tree(src, run.dir.root / src.relative_to(sibling.dir.root))
        _link_file(sibling.dir.manifest_path(stage), run.dir.manifest_path(stage))
        linked = {STAGE + stage: str(sibling.dir.root)}
        if stage == "train":
            linked |= {p.name: str(p) for p in self.stage_paths(sibling, stage)}
        _record(run, linked)

    def link_models(self, run: Run) -> None:
        """Each model of this run's train stage that a sibling finished from the same job."""
        full = _with_info(run)
        if full is None:
            return
        finished: dict[str, Path] = {}
        for sibling in filter(None, map(_with_info, self.sibling_runs(run))):
            for name, job in plan.training_jobs(sibling.cfg, sibling.dir, sibling.inputs).items():
                if rd.is_complete(sibling.dir.model(name)):
                    finished.setdefault(job_key(sibling, job, self.digests), sibling.dir.model(name))
        linked = {}
        for name, job in plan.training_jobs(full.cfg, full.dir, full.inputs).items():
            src, dst = finished.get(job_key(full, job, self.digests)), run.dir.model(name)
            if src is None:
                continue
            if not rd.is_complete(dst):
                _link_tree(src, dst)
            if (src / rd.COMPLETE_FILE).read_bytes() == (dst / rd.COMPLETE_FILE).read_bytes():
                linked[name] = str(src)  # linked now or by an attempt the sweep resumes (not trained here)
        _record(run, linked)


    def link_evaluations(self, run: Run) -> None:
        """Each of this run's evaluation results that a sibling (same seed) has and that is current
        here (the same model files and task contents), so the evaluator does not score it again.
        The sibling's result for the same model name is taken first; else any sibling result
        whose run keys are this model's (the same files under another name: K=1's sub-model is
        vanilla's job, a k-means cell's `sub-3` another cell's `sub-2`, an ensemble of one its model)."""
        from dtm.evaluation.runner import run_keys
        from dtm.evaluation.tasks import resolve_tasks

        full, cfg = _with_info(run), run.cfg
        if full is None or cfg.eval.lm_eval_tasks:  # lm-eval's results go into the same files
            return
        tasks = resolve_tasks(task_list(full), data_dir=cfg.eval.data_dir)
        by_keys: dict[tuple[tuple[str, str], ...], Path] | None = None  # built when a name lookup fails
        linked = {}
        for name, ref in plan.evaluated_models(full.cfg, full.dir, full.inputs).items():
            dst = run.dir.eval_result(name)
            wanted = run_keys(ref, tasks, cfg.eval.limit, cfg.eval.max_new_tokens)
            same_name = [p for s in self.sibling_runs(run) if (p := s.dir.eval_result(name)).is_file()]
            src = next((p for p in same_name if _current(p, wanted)), None)
            if src is None:
                by_keys = self.results_by_keys(run, [t.name for t in tasks]) if by_keys is None else by_keys
                src = by_keys.get(_signature(wanted))
            if src is None or (dst.is_file() and _current(dst, wanted) and not os.path.samefile(src, dst)):
                continue  # nothing to link, or evaluated here already
            for task in tasks:  # the per-question samples (`eval.log_samples`) first, under this name; the result last
                samples = src.with_name(f"{src.stem}.{task.name}.samples.jsonl")
                if samples.is_file():
                    _link_file(samples, dst.with_name(f"{name}.{task.name}.samples.jsonl"))
            if not (dst.is_file() and os.path.samefile(src, dst)):
                _link_file(src, dst)
            linked[EVAL + name] = str(src)
        _record(run, linked)

    def results_by_keys(self, run: Run, tasks: list[str]) -> dict[tuple[tuple[str, str], ...], Path]:
        """Every sibling result file (same seed) that has all of `tasks`, by its tasks' run keys."""
        found: dict[tuple[tuple[str, str], ...], Path] = {}
        for sibling in self.sibling_runs(run):
            for path in sorted(sibling.dir.eval_dir.glob("*.json")) if sibling.dir.eval_dir.is_dir() else []:
                stored = _stored_keys(path)
                if all(t in stored for t in tasks):
                    found.setdefault(_signature({t: stored[t] for t in tasks}), path)
        return found


def _stored_keys(result_file: Path) -> dict[str, str]:
    """Task name -> the run key a result file stores (none where it is unreadable: then it is not reused)."""
    try:
        st = result_file.stat()
    except OSError:
        return {}
    return dict(_keys_of(str(result_file), st.st_ino, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=4096)
def _keys_of(path: str, inode: int, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    """`_stored_keys` of one version of a file (results are replaced by atomic renames: a new
    version is a new inode), parsed once per sweep: each cell looks through every sibling's
    results, ~125 KB each with their per-question scores."""
    try:
        done = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return ()
    if not isinstance(done, dict):
        return ()
    return tuple((t, r["run_key"]) for t, r in done.items() if isinstance(r, dict) and isinstance(r.get("run_key"), str))


def _current(result_file: Path, wanted: dict[str, str]) -> bool:
    """Whether the file holds every wanted task under its wanted run key (what the evaluator checks before it skips a task)."""
    stored = _stored_keys(result_file)
    return all(stored.get(task) == key for task, key in wanted.items())


def _signature(keys: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(keys.items()))


# ---------------------------------------------------------------- running, status, report


def run(config: ExperimentConfig | str | Path, overrides: list[str] | None = None, from_stage: str | None = None,
        report: bool = True) -> Path:
    """`dtm run`: a plain run (`pipeline.run`), or every cell of a sweep (resuming, reusing what
    siblings finished) and the sweep's report; -> the output directory."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    if not cfg.sweep.axes:
        return run_plain(cfg, from_stage=from_stage, report=report)
    sweep = plan_sweep(cfg)
    for cell in sweep.cells:  # every cell runnable before any starts
        try:
            check_runnable(cell.cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep cell {cell.name}: {e}") from None
    root = rd.RunDir(Path(cfg.output_dir))
    make_dirs(root.root, "creating the run directory (output_dir)")
    atomic_write_json(root.config_file, cfg.model_dump(mode="json"))
    for i, cell in enumerate(sweep.cells):
        print(f"== sweep cell {cell.name} ({i + 1}/{len(sweep.cells)})", flush=True)
        # A stage redone on request (`from_stage`) is linked only from cells that redid it in this
        # call: a sibling not yet redone holds exactly the outputs the request discards.
        among = sweep.cells[:i] if from_stage else None
        run_plain(cell.cfg, from_stage=from_stage, report=report, reuse=Reuser(sweep, cell, among))
    if report:
        write_sweep_report(sweep)
    return root.root


def write_sweep_report(sweep: Sweep) -> tuple[Path, Path]:
    """The sweep's report.md/report.html over every cell, then its manifest (`status` reads it)."""
    from dtm.report.sweep import write_sweep_report as write

    t0 = time.perf_counter()
    md, page = write(sweep, trainings(sweep) | {"evaluations": evaluations(sweep)})
    rd.RunDir(Path(sweep.cfg.output_dir)).write_manifest("report", sweep_report_hash(sweep), time.perf_counter() - t0,
                                                         {"markdown": str(md), "html": str(page), "cells": [c.name for c in sweep.cells]})
    print(f"sweep report: {md}  {page}")
    return md, page


def status(run_dir: str | Path) -> list[dict[str, Any]]:
    """`dtm status`: a plain run's rows, or every cell's (run = `<cell>/seed-<s>`, the cell's
    report as `<cell>`), then the sweep report's row."""
    cfg = load_run_config(run_dir)
    if not cfg.sweep.axes:
        return status_of(cfg)
    sweep = plan_sweep(cfg)
    rows = []
    for cell in sweep.cells:
        rows += [r | {"run": cell.name if r["run"] == "." else f"{cell.name}/{r['run']}"} for r in status_of(cell.cfg)]
    report = rd.RunDir(Path(cfg.output_dir)).manifest("report")
    done = report is not None and report.get("hash") == sweep_report_hash(sweep)
    rows.append({"run": ".", "stage": "sweep report", "state": "done" if done else ("stale" if report else "pending"),
                 "seconds": report.get("seconds") if report else None, "finished": report.get("finished") if report else None})
    return rows


def sweep_report_hash(sweep: Sweep) -> str:
    """The sweep report reads every cell's evaluation: its hash covers every cell's report hash."""
    from dtm.pipeline import report_hash

    blob = json.dumps({c.name: report_hash(c.cfg) for c in sweep.cells}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_report(run_dir: str | Path, console: Any = None, partial: bool = False) -> tuple[Path, Path]:
    """`dtm report`: a plain run's report, or (for a sweep) every cell's and the sweep's."""
    cfg = load_run_config(run_dir)
    if not cfg.sweep.axes:
        return write_plain_report(run_dir, console, partial)
    sweep = plan_sweep(cfg)
    for cell in sweep.cells:
        write_plain_report(cell.cfg.output_dir, None, partial)
    return write_sweep_report(sweep)


def _linked_counts(sweep: Sweep, stage: str, linked_in: Callable[[Any, str, dict[str, str]], bool]) -> tuple[int, int]:
    """(models `stage`'s finished manifests list, how many of them `linked_in(seed_run, model,
    reused)` says were linked from a sibling), over every cell and seed run."""
    planned = linked = 0
    for cell in sweep.cells:
        for seed_run in seed_runs(cell.cfg):
            models = seed_run.dir.outputs(stage).get("models", [])
            reused = seed_run.dir.reused()
            planned += len(models)
            linked += sum(1 for m in models if linked_in(seed_run, m, reused))
    return planned, linked


def trainings(sweep: Sweep) -> dict[str, int]:
    """How many models the cells' train stages list, and how many of them were linked from a sibling
    (the rest were trained), over every cell and seed run that finished its train stage."""
    planned, linked = _linked_counts(sweep, "train", lambda seed_run, m, reused: m in reused)
    return {"planned": planned, "linked": linked, "trained": planned - linked}


def _eval_result_linked(seed_run: Any, model: str, reused: dict[str, str]) -> bool:
    """Whether the model's result file is still the sibling's it was linked from (the same file on disk)."""
    ours, theirs = seed_run.dir.eval_result(model), reused.get(EVAL + model)
    return theirs is not None and ours.is_file() and Path(theirs).is_file() and os.path.samefile(theirs, ours)


def evaluations(sweep: Sweep) -> dict[str, int]:
    """How many evaluation results the cells' finished eval stages list, and how many of them are
    a sibling's result file linked in (checked on disk: still the same file), the rest scored."""
    planned, linked = _linked_counts(sweep, "eval", _eval_result_linked)
    return {"planned": planned, "linked": linked, "scored": planned - linked}
