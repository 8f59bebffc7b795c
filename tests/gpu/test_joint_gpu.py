"""The joint executor on a CUDA device: K=3 models stepped together equal three `train_model`
runs on the same GPU in fp32, and mixed precision is refused (the joint step has no autocast path).

Marked `gpu` and skipped where torch sees no CUDA device (`pytest -m gpu tests/gpu`, which
`benchmarks/gpu_check.py` runs). Tolerance 1e-4 per weight, as `bench_joint.gpu_check`: on
CPU the two paths differ by about 1e-7 (tests/test_train_joint.py holds them to 1e-5); cuBLAS
picks kernels by shape (a batched matmul over K models against one model's matmul), whose
summation orders differ more, while a semantic slip (a wrong batch, rate, clipping) moves some
weight by up to a learning rate, 1e-2 here, per step; the test also checks that training moved
the weights by more than 100x the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtm.config import ExperimentConfig
from dtm.data.template import conversation
from dtm.errors import TrainingError
from dtm.rundir import COMPLETE_FILE
from dtm.training.joint import JointJob, train_joint
from dtm.training.sft import train_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

TOLERANCE = 1e-4


def pico_config(finetuning_type: str) -> ExperimentConfig:
    """Padded batches, gradient accumulation, warmup, clipping, fp32 (`train.bf16: false`)."""
    cfg = ExperimentConfig(seed=7)
    cfg.data.cutoff_len = 64
    settings = {"finetuning_type": finetuning_type, "num_train_epochs": 2, "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2, "warmup_steps": 1, "learning_rate": 1e-2, "max_grad_norm": 0.5,
                "weight_decay": 0.1 if finetuning_type == "full" else 0.0, "group_by_length": False, "logging_steps": 1,
                "save_steps": 100, "bf16": False}
    for k, v in settings.items():
        setattr(cfg.train, k, v)
    cfg.train.lora.r, cfg.train.lora.lora_dropout = 4, 0.0
    cfg.train.lora.target_modules = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    return cfg


def qa(n: int, offset: int) -> list:
    return [conversation(f"What is {i} + {i}?", f"{2 * i} is the sum of {i} and {i}.", id=str(i)) for i in range(offset, offset + n)]


@pytest.fixture
def base(base_dir: Path) -> Path:
    """The suite's pico Llama with the tiny tokenizer (`conftest.base_dir`)."""
    return base_dir


def weights(d: Path) -> dict[str, torch.Tensor]:
    adapter = d / "adapter_model.safetensors"
    return load_file(adapter if adapter.exists() else d / "model.safetensors")


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_joint_training_equals_separate_training_on_the_gpu(base, tmp_path, finetuning_type):
    cfg = pico_config(finetuning_type)
    portions = [qa(24, 0), qa(20, 30), qa(14, 60)]
    separate = [train_model(base, p, tmp_path / f"separate-{i}", cfg, progress=False) for i, p in enumerate(portions)]
    joint = train_joint(base, [JointJob(f"m-{i}", p, tmp_path / f"joint-{i}", cfg.seed, cfg) for i, p in enumerate(portions)],
                        progress=False)
    start = load_file(base / "model.safetensors")
    for s, j in zip(separate, joint, strict=True):
        summary = json.loads((j / COMPLETE_FILE).read_text())
        assert summary["device"].startswith("cuda") and summary["precision"] == "fp32"
        assert summary["steps"] == json.loads((s / COMPLETE_FILE).read_text())["steps"]
        ws, wj = weights(s), weights(j)
        assert ws.keys() == wj.keys()
        assert max(float((ws[n] - wj[n]).abs().max()) for n in ws) < TOLERANCE
        moved = (max(float(v.abs().max()) for n, v in wj.items() if "lora_B" in n) if finetuning_type == "lora"
                 else max(float((wj[n] - start[n]).abs().max()) for n in wj))
        assert moved > 100 * TOLERANCE


def test_a_joint_job_refuses_mixed_precision_on_the_gpu(base, tmp_path):
    """The Trainer's default on a GPU is bf16 autocast, which the joint step does not have:
    refused by name with the key to set, not trained in fp32 unasked."""
    cfg = pico_config("lora")
    cfg.train.bf16 = None
    with pytest.raises(TrainingError, match=r"joint job m-0: train.bf16 unset .*fp32 only; set train.bf16: false"):
        train_joint(base, [JointJob("m-0", qa(8, 0), tmp_path / "m-0", cfg.seed, cfg)], progress=False)
