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

import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtm import plan
from dtm.config import ExperimentConfig
from dtm.dispersal import portion_path
from dtm.errors import DtmError, TrainingError
from dtm.rundir import RunDir, is_complete, sub_model_name, training_summary

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


def expected_cost(job: Job, config: ExperimentConfig) -> float:
    """A job's relative cost: bytes of training data x epochs (or its max_steps). Only the
    order matters: `run_local` starts the longest jobs first, so that a long vanilla run does
    not start last and leave the other workers idle (longest-processing-time-first)."""
    train = config.train.model_dump() | job.train_overrides
    if train.get("max_steps", -1) > 0:
        return float(train["max_steps"] * train["per_device_train_batch_size"] * 100)
    try:
        size = os.path.getsize(job.data)
    except (OSError, TypeError):
        size = 0
    return float(size * train["num_train_epochs"])


def run_job(job: Job, config: ExperimentConfig, base: str, threads: int | None = None, progress: bool = True) -> float:
    """Train one model (in whatever process or Ray worker this runs in); returns its seconds.

    With `train.workers_per_model` > 1 the model trains data-parallel on that many Ray Train
    workers, each running `train_job_here` (`dtm.training.raytrain`)."""
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

    cfg = job_config(config, job.train_overrides)
    train_baseline(job.baseline or "vanilla", cfg, job.data, job.out, base=base, seed=job.seed, progress=progress,
                   name=job.name, val_data=job.val_data)


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
    """On Linux, end this worker when the `dtm` process that started it ends (also on SIGKILL):
    an idle pool worker otherwise outlives a killed run, holding its memory."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


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


def finished_in_turn(futures: dict[Any, str], what: str):
    """Yield futures as they finish, with one progress bar over them (the names done so far)."""
    from concurrent.futures import as_completed

    from tqdm.auto import tqdm

    with tqdm(total=len(futures), desc=what, unit="model") as bar:
        for future in as_completed(futures):
            bar.set_postfix_str(futures[future])
            bar.update()
            yield future


def discard_pool(workers: int) -> None:
    """Drop (and shut down) the shared pool of this size, e.g. after one of its workers died."""
    pool = _POOLS.pop(workers, None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


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
    run = {"local": run_local, "ray": run_ray}[config.train.executor]
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
        log.warning("%s: attempt %d failed (%s)%s", name, self.attempts[name], self.failures[name], "; retrying" if again else "")
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


def run_local(jobs: list[Job], config: ExperimentConfig, base: str) -> dict[str, str]:
    """One after another; or, on CPU with `train.num_workers` > 1, that many one-thread processes."""
    retries = Retries(config.train.retries)
    workers = min(config.train.num_workers, len(jobs))
    # one at a time on a GPU, and when each job is a data-parallel group of Ray Train workers
    if workers <= 1 or _cuda() or config.train.workers_per_model > 1:
        for job in jobs:
            retries.run(job.name, lambda job=job: run_job(job, config, base))
        return retries.failures
    pending = {j.name: j for j in jobs}
    while pending:  # rounds: every unfinished job that may still be retried, longest first
        pool = worker_pool(config.train.num_workers)
        longest_first = sorted(pending.items(), key=lambda item: -expected_cost(item[1], config))
        futures = {pool.submit(run_job, job, config, base, 1, False): name for name, job in longest_first}
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
            discard_pool(config.train.num_workers)
    return retries.failures


def run_ray(jobs: list[Job], config: ExperimentConfig, base: str) -> dict[str, str]:
    """Each sub-model a Ray task with `num_cpus_per_model` / `num_gpus_per_model`.

    Uses the running Ray instance, else `ray.init(address=train.ray_address)` (None starts a
    local one, which is shut down again at the end). Outputs go to the models directory,
    which must be on a path every worker sees (a shared filesystem on a cluster).
    """
    try:
        import ray
    except ImportError:
        raise TrainingError("train.executor: ray needs the ray package: pip install 'disperse-then-merge[ray]'") from None
    t = config.train
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=t.ray_address, log_to_driver=True)
    try:
        gpus = t.num_gpus_per_model if ray.cluster_resources().get("GPU", 0) > 0 else 0
        if gpus == 0 and t.num_gpus_per_model > 0:
            log.info("ray: the cluster has no GPU; sub-models train on CPU")
        # max_retries=0: `Retries` below is the only retry loop (Ray's own retries would
        # multiply with it: up to (1 + retries)^2 runs of a job)
        task = ray.remote(num_cpus=t.num_cpus_per_model, num_gpus=gpus, max_retries=0)(run_job)
        threads = max(1, int(t.num_cpus_per_model))
        retries = Retries(t.retries)
        pending = {j.name: j for j in jobs}
        while pending:
            refs = {name: task.remote(job, config, base, threads, False) for name, job in pending.items()}
            for name, ref in refs.items():
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the job raised: judge its own exception
                    if not retries.failed(name, getattr(e, "cause", None) or e):
                        del pending[name]
                except ray.exceptions.RayError as e:  # worker died, node lost
                    if not retries.failed(name, e):
                        del pending[name]
                else:
                    retries.succeeded(name)
                    del pending[name]
        return retries.failures
    finally:
        if started_here:
            ray.shutdown()
