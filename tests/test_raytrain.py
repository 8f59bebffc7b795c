"""A model trained data-parallel on 2 Ray Train workers (gloo, CPU) equals one worker's training.

Real Ray, real `TorchTrainer`, real DDP: `train.workers_per_model: 2` runs the same job
function (`executors.train_job_here` -> `sft.train_model`) in two worker processes.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dtm.config import ExperimentConfig
from dtm.rundir import COMPLETE_FILE, LOG_FILE, RAY_TRAIN_DIR
from dtm.training import train_model
from dtm.training.executors import Job, run_job

pytest.importorskip("ray.train.torch")


def config(per_device: int, workers: int) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=3)
    cfg.data.cutoff_len = 64
    for k, v in {"finetuning_type": "full", "max_steps": 3, "per_device_train_batch_size": per_device, "gradient_accumulation_steps": 1,
                 "warmup_steps": 0, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100, "group_by_length": False,
                 "workers_per_model": workers, "num_cpus_per_model": 2}.items():
        setattr(cfg.train, k, v)
    return cfg


def test_a_workers_user_error_is_raised_as_itself():
    """Ray Train reports the workers' exceptions by rank (`WorkerGroupError.worker_failures`,
    unwrapped from their traceback holder); the lowest rank's is raised, so a `DtmError` stays
    one (final for `Retries`) and anything else is the crash that gets retried."""
    from ray.train import ControllerError, WorkerGroupError

    from dtm.errors import TrainingError
    from dtm.training.raytrain import first_cause

    bad_data = TrainingError("portion-1.jsonl: no example left to train on")
    assert first_cause(WorkerGroupError("2 workers failed", {1: RuntimeError("gloo: connection reset"), 0: bad_data})) is bad_data
    crash = RuntimeError("placement group timed out")
    assert first_cause(ControllerError(crash)) is crash
    assert isinstance(first_cause(WorkerGroupError("1 worker failed", {1: crash})), RuntimeError)


@pytest.mark.slow  # starts Ray and two training processes: 1.5-2 minutes on 2 busy cores
def test_two_workers_equal_one_worker_with_the_same_global_batch(base_dir, tmp_path):
    """16 examples, global batch 16 (1 x 16 against 2 x 8): every step sees the whole data set
    in both runs, whatever order each sampler draws (DDP's DistributedSampler and the single
    run's RandomSampler use different permutations, so a smaller batch would compare different
    batches). The loss is the mean over the global batch's tokens in both (the Trainer counts
    tokens across workers), so the runs differ only in float summation order: each worker sums
    its half and gloo adds the halves. After 3 Adam steps the largest difference measured was
    2e-8 (absolute, on weights of order 0.02-1); we allow rtol 1e-4, atol 1e-6 (Adam's
    normalisation can amplify reassociation for gradients near zero; the tolerance is the one
    the gradient-accumulation test uses)."""
    import ray

    data_file = tmp_path / "data.jsonl"  # lengths differ, so the workers' halves hold different token counts
    data_file.write_text("".join(json.dumps({"instruction": f"What is {i} + {i}?", "output": f"{2 * i} is the sum of {i} and {i}." + " Indeed." * (i % 4)}) + "\n"
                                 for i in range(16)))
    single = train_model(base_dir, data_file, tmp_path / "one", config(16, 1), progress=False)
    job = Job("two", data_file, tmp_path / "two", seed=3)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # run_job uses a running instance
    try:
        run_job(job, config(8, 2), str(base_dir))
    finally:
        ray.shutdown()

    a, b = load_file(single / "model.safetensors"), load_file(job.out / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    assert a.keys() == b.keys()
    assert sum(not torch.equal(a[k], base[k]) for k in a) == len(a)  # every tensor trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    summary = json.loads((job.out / COMPLETE_FILE).read_text())
    assert summary["workers"] == 2 and summary["steps"] == 3 and summary["examples"] == 16 and summary["device"] == "cpu"
    one_log = [json.loads(line) for line in (single / LOG_FILE).read_text().splitlines()]
    two_log = [json.loads(line) for line in (job.out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in two_log] == [r["step"] for r in one_log] == [1, 2, 3]  # written once, by the first worker
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-4)
    assert not (job.out / RAY_TRAIN_DIR).exists() and not (job.out / "checkpoints").exists()
