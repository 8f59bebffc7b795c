"""Train the K sub-models: one after another, side by side in processes, or as Ray tasks.

Every executor runs the same job, `train_model(base, portion-k.jsonl, models_dir/sub-k)`,
with the same seed for every sub-model (the paper's recipe: only the data differs). A
finished sub-model (with its completion marker) is skipped, an unfinished one resumes
from its last checkpoint, and a failed one is retried `train.retries` times before the
failure is reported by name; the others are finished first, never silently lost.

On CPU, side-by-side processes get one thread each: with more threads than cores, the
small matrix products of a training step slow down many times over (docs/architecture.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtm import plan
from dtm.config import ExperimentConfig
from dtm.dispersal import portion_path
from dtm.errors import DtmError, TrainingError
from dtm.rundir import RunDir, attempts_file, is_complete, sub_model_name, train_log, training_summary

if TYPE_CHECKING:
    from dtm.cluster import Resources

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One model to train: its data, output dir, seed, `train` overrides and baseline method."""

    name: str
    data: str | Path
    out: Path
    seed: int
    train_overrides: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    val_data: str | Path | None = None  # for the losses recorded at save_fractions


@dataclass
class JointGroup:
    """Jobs of one shape trained together in one process (`dtm.training.joint`)."""

    name: str
    jobs: list[Job]


def sub_model_dir(models_dir: str | Path, index: int) -> Path:
    """models_dir/sub-1 .. sub-K (index is 0-based, like `portion_path`)."""
    return Path(models_dir) / sub_model_name(index)


def plan_sub_models(config: ExperimentConfig, portions_dir: str | Path, models_dir: str | Path) -> list[Job]:
    """One job per portion file, all with the experiment seed (only the data differs) and a
    sub-model's share of the compute as `dtm run` gives it (`plan.sub_model_recipe`: with
    `train.max_steps`, that is DTM's total, split over the portions found)."""
    portions_dir = Path(portions_dir)
    k = 0
    while portion_path(portions_dir, k).is_file():
        k += 1
    if not k:
        raise TrainingError(f"{portions_dir}: no portion-1.jsonl; run `dtm disperse` first")
    split = config.model_copy(deep=True)
    split.disperse.k = k
    recipe = plan.sub_model_recipe(split)
    return [Job(sub_model_name(i), portion_path(portions_dir, i), sub_model_dir(models_dir, i), config.seed, dict(recipe))
            for i in range(k)]


def job_config(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """The config with `train` keys overridden (validated like the YAML)."""
    if not overrides:
        return config
    from pydantic import ValidationError

    from dtm.config import TrainConfig
    from dtm.errors import ConfigError

    cfg = config.model_copy(deep=True)
    try:
        cfg.train = TrainConfig.model_validate(config.train.model_dump() | overrides)
    except ValidationError as e:
        raise ConfigError(f"train overrides {overrides}: {e}") from None
    return cfg


# A joint group's cost relative to its longest member: each extra stacked model adds this
# fraction of one model's step time (the lab, one thread, busy machine: 198 ms for a joint step of 4 against 57 ms for one).
JOINT_EXTRA_MODEL_COST = 0.8


def expected_cost(job: Job | JointGroup, config: ExperimentConfig) -> float:
    """A job's relative cost: bytes of training data x epochs (or its max_steps). Only the
    order matters: `run_local` starts the longest jobs first, so that a long vanilla run does
    not start last and leave the other workers idle (longest-processing-time-first)."""
    if isinstance(job, JointGroup):
        costs = [expected_cost(j, config) for j in job.jobs]
        return max(costs) * (1 + JOINT_EXTRA_MODEL_COST * (len(costs) - 1))
    train = config.train.model_dump() | job.train_overrides
    if train.get("max_steps", -1) > 0:
        return float(train["max_steps"] * train["per_device_train_batch_size"] * 100)
    try:
        size = os.path.getsize(job.data)
    except (OSError, TypeError):
        size = 0
    return float(size * train["num_train_epochs"])


def run_job(job: Job | JointGroup, config: ExperimentConfig, base: str, threads: int | None = None, progress: bool = True) -> float:
    """Train one model, or a joint group (in whatever process or Ray worker this runs in); returns its seconds.

    With `train.workers_per_model` > 1 the model trains data-parallel on that many Ray Train
    workers, each running `train_job_here` (`dtm.training.raytrain`)."""
    if isinstance(job, JointGroup):
        from dtm.training.joint import JointJob, train_joint

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        for j in job.jobs:
            record_resumed_attempt(j.out, joint=True)
        train_joint(base, [JointJob(j.name, j.data, j.out, j.seed, job_config(config, j.train_overrides), j.val_data, j.baseline)
                           for j in job.jobs], progress=progress)
        return sum(training_seconds(j.out) for j in job.jobs)
    if config.train.workers_per_model > 1:
        from dtm.training.raytrain import train_data_parallel

        train_data_parallel(train_job_here, job, config, base, threads)
        return training_seconds(job.out)
    train_job_here(job, config, base, threads, progress)
    return training_seconds(job.out)


def train_job_here(job: Job, config: ExperimentConfig, base: str, threads: int | None = None, progress: bool = True) -> None:
    """Train one model in this process (one worker of a data-parallel group calls it too)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from dtm.training.baselines import train_baseline

    record_resumed_attempt(job.out)
    cfg = job_config(config, job.train_overrides)
    train_baseline(job.baseline or "vanilla", cfg, job.data, job.out, base=base, seed=job.seed, progress=progress,
                   name=job.name, val_data=job.val_data)


def steps_to_redo(out: Path, joint: bool = False) -> tuple[int, int]:
    """(checkpoint step this attempt resumes from, steps an interrupted earlier attempt trained past
    it): those steps are lost and trained again. Read from the train log before the trainer drops
    its rows past the checkpoint, so exact to within `train.logging_steps`. `joint`: the attempt
    trains in a joint job, which resumes from its own checkpoints (`checkpoints/joint-<step>/`)."""
    if joint:
        from dtm.training.joint import last_joint_checkpoint

        found = last_joint_checkpoint(out)
        resume = found[0] if found else 0
    else:
        from dtm.training.sft import last_checkpoint

        checkpoint = last_checkpoint(out)
        resume = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    try:
        lines = train_log(out).read_text(encoding="utf-8").splitlines()
        reached = max((int(json.loads(line).get("step", 0)) for line in lines if line.strip()), default=0)
    except (OSError, ValueError, AttributeError):  # no log yet, or a row cut off by the kill
        reached = resume
    return resume, max(0, reached - resume)


def record_resumed_attempt(out: Path, joint: bool = False) -> None:
    """Append this attempt to the model's attempts file if it resumes an interrupted one (its node
    lost, its run killed), with the steps it redoes, so the run can report the work lost.
    `joint`: the attempt trains in a joint job (`steps_to_redo`)."""
    if is_complete(out):
        return
    resume, redo = steps_to_redo(out, joint)
    if resume or redo:
        import socket

        from dtm.io import atomic_write_jsonl

        row = {"resumed_from_step": resume, "redone_steps": redo, "host": socket.gethostname(), "time": time.time()}
        atomic_write_jsonl(attempts_file(out), [*attempt_rows(out), row])
        log.warning("%s: resuming from step %d; %d steps of an interrupted attempt are trained again", out.name, resume, redo)


def redone_steps(outs: list[Path]) -> dict[str, int]:
    """Model name -> steps trained again after interrupted attempts (only models that had any)."""
    return {out.name: sum(int(r.get("redone_steps", 0)) for r in attempt_rows(out)) for out in outs if attempts_file(out).is_file()}


def attempt_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of a model's attempts file (none if it was never interrupted)."""
    path = attempts_file(out)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def training_seconds(out: Path) -> float:
    """The seconds a finished model's training took (0 if it has no readable summary)."""
    try:
        return float((training_summary(out) or {}).get("seconds", 0.0))
    except (OSError, ValueError):
        return 0.0


def one_thread_worker() -> None:
    """Process-pool initializer: one BLAS/OpenMP thread per process (more threads than cores slows small steps badly).

    The environment variables alone are not enough: torch may already be imported (its thread
    pool sized to every core) by the time the initializer runs, so set torch's count too."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _die_with_parent()
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # a worker's bars ("Loading weights" per model) would interleave; the pool shows one


def _die_with_parent() -> None:
    """End this worker when the `dtm` process that started it ends (also on SIGKILL): an idle
    pool worker otherwise outlives a killed run, holding its memory. A daemon thread watches the
    parent's pid (twice a second). Not Linux's PR_SET_PDEATHSIG: it fires when the parent
    *thread* ends, and seed runs side by side (`dtm.turns`) start workers from their threads,
    which end before the run does: their workers were killed mid-job (BrokenProcessPool)."""
    import signal
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="dtm-parent-watch", daemon=True).start()


_POOLS: dict[int, Any] = {}


def worker_pool(workers: int):
    """A `ProcessPoolExecutor` of `workers` one-thread processes, kept for the life of this process.

    A fresh worker pays for a Python start and the torch/transformers imports (seconds);
    `dtm run` trains and evaluates several stages per seed, so one pool for
    the whole run saves that at every stage. Every job seeds itself, so a reused worker trains
    exactly as a fresh one. A pool broken by a killed worker is replaced: here, where a broken
    pool refuses new work at once, and in `run_local`, which sees its futures fail with
    `BrokenProcessPool`.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = _POOLS.get(workers)
    if pool is not None:
        try:
            pool.submit(int)  # a no-op for a healthy pool; a broken or shut-down one raises here
        except (BrokenProcessPool, RuntimeError):
            discard_pool(workers)
            pool = None
    if pool is None:
        pool = _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=one_thread_worker)
    return pool


_IN_FLIGHT: set[Future] = set()  # jobs submitted to the shared pools (`submit`) and not finished


def submit(pool: Any, fn: Callable[..., Any], *args: Any) -> Future:
    """`pool.submit(fn, *args)`, counted in flight until it finishes (`wait_for_idle_pool`)."""
    future = pool.submit(fn, *args)
    _IN_FLIGHT.add(future)
    future.add_done_callback(_IN_FLIGHT.discard)
    return future


def wait_for_idle_pool() -> None:
    """Wait until every job submitted to the pools has finished (seed runs side by side: work
    here that takes the pool's cores waits for them, holding its turn, so that no job starts)."""
    wait(list(_IN_FLIGHT))


def finished_in_turn(futures: dict[Future, str], what: str):
    """Yield futures as they finish, with one progress bar over them (the names done so far).
    Beside other seed runs (`dtm.turns`), the bar names this one, and its turn is given away
    while it waits."""
    from tqdm.auto import tqdm

    from dtm import turns

    label = turns.label()
    pending = set(futures)
    with tqdm(total=len(futures), desc=f"{label} {what}" if label else what, unit="model") as bar:
        while pending:
            done, pending = turns.wait_any(pending)
            for future in done:
                bar.set_postfix_str(futures[future])
                bar.update()
                yield future


def discard_pool(workers: int, pool: Any = None) -> None:
    """Drop (and shut down) the shared pool of this size, e.g. after one of its workers died;
    given `pool`, only if that is still the one kept (beside other seed runs, another run may
    have replaced the broken pool already: the new one is not shut down)."""
    if pool is not None and _POOLS.get(workers) is not pool:
        return
    kept = _POOLS.pop(workers, None)
    if kept is not None:
        kept.shutdown(wait=False, cancel_futures=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def train(config: ExperimentConfig, portions_dir: str | Path | None = None, models_dir: str | Path | None = None) -> list[Path]:
    """Train every portion's sub-model into models_dir/sub-1..K with the configured executor
    (by default the portions and models of the config's seed in its run directory, where `dtm run` has them)."""
    seed_run = RunDir(Path(config.output_dir)).seed_run(config.seed)
    jobs = plan_sub_models(config, portions_dir or seed_run.portions, models_dir or seed_run.models)
    run_jobs(jobs, config, config.base_model())
    return [j.out for j in jobs]


def train_jobs(config: ExperimentConfig, base: str | Path, jobs: dict[str, dict[str, Any]], models_dir: str | Path) -> dict[str, float]:
    """Train named models (the pipeline's sub-models and baselines) into models_dir/<name>.

    `jobs`: name -> {"data": path, "seed": int, "train": {overrides}, "baseline": method?, "val_data": path?}.
    Returns name -> training seconds (as recorded when each model finished).
    """
    planned = [
        Job(name, spec["data"], Path(models_dir) / name, int(spec.get("seed", config.seed)),
            dict(spec.get("train") or {}), spec.get("baseline"), spec.get("val_data"))
        for name, spec in jobs.items()
    ]
    run_jobs(planned, config, str(base))
    return {j.name: training_seconds(j.out) for j in planned}


def run_jobs(jobs: list[Job], config: ExperimentConfig, base: str | Path) -> None:
    """Run the unfinished jobs with the configured executor; raise naming every failed one."""
    todo = [j for j in jobs if not is_complete(j.out)]
    for j in jobs:
        if j not in todo:
            log.info("%s: already trained, skipping", j.name)
    if not todo:
        return
    run = {"local": run_local, "ray": run_ray, "joint": run_joint}[config.train.executor]
    failures = run(todo, config, str(base))
    if failures:
        lines = "\n  ".join(f"{name}: {err}" for name, err in failures.items())
        raise TrainingError(
            f"{len(failures)} of {len(jobs)} models failed (retried up to {config.train.retries} times):\n  {lines}\n"
            "finished models are kept; rerun to resume the failed ones from their last checkpoint"
        )


class Retries:
    """The one retry policy, for every executor: a job gets 1 + `retries` attempts; a user
    error (`DtmError`: bad data, bad config) is final at once, since a rerun would fail the
    same way; the last failure of each job is kept under its model's name."""

    def __init__(self, retries: int):
        self.retries = retries
        self.attempts: Counter[str] = Counter()
        self.failures: dict[str, str] = {}

    def failed(self, name: str, error: BaseException) -> bool:
        """Record a failed attempt of `name`; True if it should be tried again."""
        self.attempts[name] += 1
        if isinstance(error, DtmError):
            self.failures[name] = str(error)
            return False
        self.failures[name] = f"{type(error).__name__}: {error}"
        again = self.attempts[name] <= self.retries
        from dtm import turns

        where = f"{turns.label()}: " if turns.active() else ""  # which seed run's model, beside others
        log.warning("%s%s: attempt %d failed (%s)%s", where, name, self.attempts[name], self.failures[name], "; retrying" if again else "")
        return again

    def succeeded(self, name: str) -> None:
        self.failures.pop(name, None)
        log.info("%s: done", name)

    def run(self, name: str, attempt: Callable[[], object]) -> str | None:
        """Run `attempt` in this process until it succeeds or may not be retried; the error or None."""
        while True:
            try:
                attempt()
            except Exception as e:
                if not self.failed(name, e):
                    return self.failures[name]
            else:
                self.succeeded(name)
                return None


def run_local(jobs: list[Job | JointGroup], config: ExperimentConfig, base: str) -> dict[str, str]:
    """One after another; or, on CPU with `train.num_workers` > 1, that many one-thread processes."""
    from dtm import turns

    retries = Retries(config.train.retries)
    workers = min(config.train.num_workers, len(jobs))
    # one at a time on a GPU, and when each job is a data-parallel group of Ray Train workers;
    # a lone job here too, except beside other seed runs (`dtm.turns`): there it shares their pool
    alone_here = workers <= 1 and not (turns.active() and config.train.num_workers > 1)
    if alone_here or _cuda() or config.train.workers_per_model > 1:
        for job in jobs:
            retries.run(job.name, lambda job=job: run_job(job, config, base))
        return retries.failures
    pending = {j.name: j for j in jobs}
    while pending:  # rounds: every unfinished job that may still be retried, longest first
        pool = worker_pool(config.train.num_workers)
        longest_first = sorted(pending.items(), key=lambda item: -expected_cost(item[1], config))
        futures = {submit(pool, run_job, job, config, base, 1, False): name for name, job in longest_first}
        broken = False
        for future in finished_in_turn(futures, "train"):
            name = futures[future]
            try:
                future.result()
            except Exception as e:
                broken |= isinstance(e, BrokenProcessPool)
                if not retries.failed(name, e):
                    del pending[name]
            else:
                retries.succeeded(name)
                del pending[name]
        if broken:  # a worker killed by the OS breaks the whole pool: the next round gets a fresh one
            discard_pool(config.train.num_workers, pool)
    return retries.failures


def joint_groups(jobs: list[Job], config: ExperimentConfig, workers: int, on_gpu: bool | None = None,
                 most: int | None = None, lone_joins: bool = False) -> list[Job | JointGroup]:
    """The jobs as a joint job runs them: joinable jobs (`joint.joinable`) of one shape and of
    similar length (at least half the longest: vanilla does not hold up the quarter-length jobs)
    in groups of `train.models_per_job`, or (None) split evenly over the `workers` that run at
    once, never more than `most` (what one node's memory holds, `cluster.models_per_node`); the
    others alone. `lone_joins`: a joinable job left alone is a joint group of one
    (`run_joint` on a CPU: the joint step of one lab model costs less CPU than the Trainer's,
    `benchmarks/bench_lab_step.py`; else it trains with the Trainer, as `executor: local`
    does, so that Ray's models equal local ones bitwise). `on_gpu`: whether the groups train
    on a GPU (None: this machine's)."""
    from dtm.training.joint import joinable, mixed_precision, shape_key

    per_job = config.train.models_per_job
    runs: dict[tuple, list[Job]] = {}
    units: list[Job | JointGroup] = []
    mixed: dict[str, str] = {}  # jobs that would join in fp32: kept out by mixed precision alone
    for job in jobs:
        cfg = job_config(config, job.train_overrides)
        if per_job != 1 and joinable(cfg, job.baseline, on_gpu):
            runs.setdefault(shape_key(cfg), []).append(job)
        else:
            if per_job != 1 and joinable(cfg, job.baseline, on_gpu=False):
                mixed[job.name] = mixed_precision(cfg, on_gpu) or ""
            if per_job != 1 and cfg.train.gradient_checkpointing:  # say why the setting costs the joint step
                log.info("%s: trains alone with the Trainer: train.gradient_checkpointing is on and the joint step "
                         "does not checkpoint activations (turn it off to train models in joint jobs)", job.name)
            units.append(job)
    if mixed:
        log.warning("%s: %s", ", ".join(mixed), next(iter(mixed.values())))
    for same_shape in runs.values():
        same_shape.sort(key=lambda j: -expected_cost(j, config))
        while same_shape:
            longest = expected_cost(same_shape[0], config)
            similar = [j for j in same_shape if expected_cost(j, config) * 2 >= longest]
            same_shape = same_shape[len(similar):]
            size = min(per_job or -(-len(similar) // max(1, workers)), most or len(similar))
            for c in range(0, len(similar), size):
                chunk = similar[c : c + size]
                alone = len(chunk) == 1 and not lone_joins
                units.append(chunk[0] if alone else JointGroup("+".join(j.name for j in chunk), chunk))
    return units


def run_joint(jobs: list[Job], config: ExperimentConfig, base: str) -> dict[str, str]:
    """Joinable jobs in joint groups, the rest alone, all scheduled as `run_local` does."""
    workers = 1 if _cuda() else min(config.train.num_workers, len(jobs))
    return run_local(joint_groups(jobs, config, workers, lone_joins=not _cuda()), config, base)


def run_ray(jobs: list[Job], config: ExperimentConfig, base: str) -> dict[str, str]:
    """Each model, or joint group of models (`joint_groups`, `train.models_per_job`), a Ray task
    with `num_cpus_per_model` / `num_gpus_per_model` (`dtm.cluster`), longest first. Within `dtm run` the run's Ray session is used (its storage already
    checked); alone (`dtm train`), Ray is connected here and the models directory checked to be
    visible on every node. A task lost with its node is rerun by Ray on another node and resumes
    from its last checkpoint; an exception it raised is judged by `Retries`."""
    from dtm import cluster

    with cluster.connected(config.train.ray_address) as started_here:
        if started_here:
            cluster.check_shared_storage(Path(jobs[0].out).parent)
        resources = cluster.stage_resources(config, "train")
        retries = Retries(config.train.retries)
        # models of one shape as joint jobs, one per task slot (a GPU, or num_cpus_per_model CPUs): K=8 on 2 GPUs is 2 jobs of 4
        units = joint_groups(jobs, config, cluster.task_slots(resources), on_gpu=bool(resources.gpus),
                             most=cluster.models_per_node(resources))
        longest_first = sorted(units, key=lambda j: -expected_cost(j, config))
        calls = {j.name: (j, config, base, None, False) for j in longest_first}
        cluster.run_tasks(run_job, calls, {j.name: task_resources(j, resources) for j in units}, retries, "train")
        return retries.failures


def task_resources(unit: Job | JointGroup, per_model: Resources) -> Resources:
    """What the Ray task of one model, or of a joint group of n models, declares (`cluster.for_models`)."""
    from dtm import cluster

    return cluster.for_models(per_model, len(unit.jobs) if isinstance(unit, JointGroup) else 1)
