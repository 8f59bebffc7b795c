"""`train.fsdp` on GPUs: a model sharded over 2 Ray Train workers (FSDP2 via the Trainer and
accelerate) equals one worker's training with the same global batch, and is saved as an ordinary
`save_pretrained` directory (the shards gathered by every worker, written by the first).

Marked `gpu`; needs two CUDA devices (NCCL puts one rank on each), so it is skipped on CPU and on a
one-GPU machine, with the reason. On CPU, FSDP is refused instead (tests/test_raytrain.py):
accelerate builds FSDP only for GPU devices.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dtm.config import ExperimentConfig
from dtm.rundir import COMPLETE_FILE
from dtm.training import train_model
from dtm.training.executors import Job, run_job

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"needs 2 CUDA GPUs (one per FSDP worker); {torch.cuda.device_count()} seen"),
]
pytest.importorskip("ray.train.torch")


def config(per_device: int, workers: int, fsdp: str | bool) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=3)
    cfg.data.cutoff_len = 64
    for k, v in {"finetuning_type": "full", "max_steps": 3, "per_device_train_batch_size": per_device, "gradient_accumulation_steps": 1,
                 "warmup_steps": 0, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 2, "group_by_length": False,
                 "bf16": False, "workers_per_model": workers, "num_gpus_per_model": 1, "fsdp": fsdp}.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.mark.parametrize("fsdp", ["full_shard", "shard_grad_op"])
def test_fsdp_on_two_gpus_equals_one_worker_and_saves_whole_weights(base_dir, tmp_path, fsdp):
    """fp32, 16 examples, global batch 16 (1 x 16 against 2 x 8), as the DDP test on CPU. A
    checkpoint at step 2 exercises FSDP's collective checkpoint save. Tolerance rtol 1e-3: GPU
    reductions (cuBLAS, NCCL) reassociate sums more than gloo on CPU."""
    import ray

    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps({"instruction": f"What is {i} + {i}?", "output": f"{2 * i} is the sum of {i} and {i}."}) + "\n"
                                 for i in range(16)))
    cfg = config(16, 1, False)
    single = train_model(base_dir, data_file, tmp_path / "one", cfg, progress=False)
    job = Job("two", data_file, tmp_path / "two", seed=3)
    ray.init(num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_job(job, config(8, 2, fsdp), str(base_dir))
    finally:
        ray.shutdown()

    a, b = load_file(single / "model.safetensors"), load_file(job.out / "model.safetensors")  # one file, whole tensors
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].shape == a[k].shape, k
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
    summary = json.loads((job.out / COMPLETE_FILE).read_text())
    assert summary["workers"] == 2 and summary["steps"] == 3 and summary["device"].startswith("cuda")
