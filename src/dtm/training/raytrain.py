"""One model trained data-parallel over several Ray Train workers (`train.workers_per_model` > 1).

For a sub-model too large or too slow for one device. Ray Train's `TorchTrainer` starts
`workers_per_model` worker processes (one GPU each where the cluster has GPUs, else CPUs),
sets up `torch.distributed` among them (NCCL on GPUs, gloo on CPUs) and the variables the
Hugging Face Trainer reads (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`). Each worker then runs the
very same job function as a single-process run (`executors.train_job_here`, hence
`sft.train_model`): the Trainer sees the process group and wraps the model in DDP, shards
each global batch over the workers and averages the gradients; only the first worker writes
the model directory (`train_model`). With `train.fsdp` (GPUs only) the Trainer shards the model
over the workers instead (FSDP2 via accelerate), and every worker takes part in gathering the
whole weights that the first one saves. So there is no second training loop here, only the
launch. The global batch is `workers_per_model x per_device_train_batch_size x
gradient_accumulation_steps`.

Why Ray Train and not `torchrun`: the Ray executor already places jobs on a Ray cluster;
Ray Train places the workers of one job (a placement group, spread over nodes as needed) and
reports a worker's failure as an exception of the `fit()` call, which our one retry policy
(`executors.Retries`) handles like any other failed job (resuming from the last checkpoint).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtm.errors import DtmError, TrainingError
from dtm.rundir import RAY_TRAIN_DIR

log = logging.getLogger(__name__)


def _worker_loop(spec: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the single-process job, under the process group Ray set up."""
    spec["train_here"](spec["job"], spec["config"], spec["base"], threads=spec["threads"], progress=False)


def first_cause(error: BaseException) -> BaseException:
    """The workers' own exception inside Ray Train's wrapper (the lowest-ranked worker's), so a
    user error (`DtmError`) stays one and is not retried."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        inner = failures[min(failures)]
        return getattr(inner, "cause", None) or inner
    return getattr(error, "controller_failure", None) or error


def worker_resources(cpus: float, memory_gib: float) -> dict[str, float]:
    """What each Ray Train worker declares besides its GPU: its CPUs, and `train.memory_per_model`
    (each DDP worker holds a whole copy of the model; the task that launched them declares nothing)."""
    return {"CPU": cpus} | ({"memory": memory_gib * 2**30} if memory_gib else {})


def check_fsdp_has_gpus(config: Any, gpu: bool) -> None:
    """Refuse `train.fsdp` where the workers get no GPU. accelerate builds FSDP only for GPU-type
    devices: on CPU its Trainer would quietly fall back to DDP (every worker holding the whole
    model), so a model sized for sharding would not fit where the config says it does."""
    if config.train.fsdp and not gpu:
        raise TrainingError(
            f"{config.where('train.fsdp')}: train.fsdp: {config.train.fsdp} needs GPUs (one per worker) and this Ray cluster "
            "gives the workers none (no GPU, or train.num_gpus_per_model: 0); accelerate runs FSDP on GPUs only. "
            "Use train.fsdp: false to train data-parallel (DDP) on CPUs"
        )


def train_data_parallel(train_here: Callable[..., None], job: Any, config: Any, base: str, threads: int | None = None) -> None:
    """Run `train_here(job, config, base, threads=, progress=)` (`executors.train_job_here`, given
    by the caller so that this module needs nothing from the executors) on each of
    `config.train.workers_per_model` Ray Train workers: one model, trained data-parallel.

    Starts a local Ray instance when none is running (as the Ray executor does), and uses GPUs
    only where the cluster has them. A workers' `DtmError` is raised as itself (a user error:
    final); any other failure as Ray Train's exception, which the caller's `Retries` retries.
    """
    try:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise TrainingError("train.workers_per_model > 1 trains with Ray Train: pip install 'disperse-then-merge[ray]'") from None
    t = config.train
    storage = Path(job.out) / RAY_TRAIN_DIR
    from dtm import cluster

    with cluster.connected(t.ray_address):  # the run's session, else a local Ray started (and stopped) here
        gpu = t.num_gpus_per_model > 0 and cluster.cluster_has_gpus()
        check_fsdp_has_gpus(config, gpu)
        cpus = max(1.0, t.num_cpus_per_model / t.workers_per_model) if not gpu else t.num_cpus_per_model
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"train_here": train_here, "job": job, "config": config, "base": base, "threads": threads or max(1, int(cpus))},
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=t.workers_per_model, use_gpu=gpu, resources_per_worker=worker_resources(cpus, t.memory_per_model)),
            # max_failures=0: `executors.Retries` is the only retry loop, as for Ray tasks
            run_config=RunConfig(name=job.name, storage_path=str(storage.resolve()), failure_config=FailureConfig(max_failures=0)),
        )
        try:
            trainer.fit()
        except DtmError:
            raise
        except Exception as e:
            cause = first_cause(e)
            if isinstance(cause, DtmError):
                raise cause from None
            raise
        finally:
            shutil.rmtree(storage, ignore_errors=True)  # Ray Train's run records; the model has its own checkpoints
