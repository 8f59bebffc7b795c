"""The GPU paths on a CUDA device: mixed precision, attention kernels, placement, eval, merge, the lab.

Marked `gpu` and skipped (with the reason) where torch sees no CUDA device; run them with
`pytest -m gpu tests/gpu` (`benchmarks/gpu_check.py` does, on the GPU machine). What they check
is what the CPU suite cannot: that training really runs on the device under bf16/fp16 autocast
(observed inside the forward pass, not assumed from the config), that the attention kernels and
the device give the CPU's numbers within float tolerance, and that the lab's DTM run completes
on the GPU. (No conftest.py here: `tests/conftest.py` is imported as `conftest`.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_llama, make_tokenizer
from safetensors.torch import load_file
from transformers import TrainerCallback

from dtm.config import ExperimentConfig, load_config
from dtm.data.template import conversation
from dtm.rundir import DTM, VANILLA
from dtm.training import train_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def tiny_config(**train) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=7)
    cfg.data.cutoff_len = 64
    settings = {"finetuning_type": "full", "max_steps": 6, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                "warmup_steps": 0, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100, "group_by_length": False}
    for k, v in (settings | train).items():
        setattr(cfg.train, k, v)
    return cfg


def qa_data(n: int = 32) -> list:
    return [conversation(f"What is {i} + {i}?", f"{2 * i} is the sum of {i} and {i}.", id=str(i)) for i in range(n)]


@pytest.fixture
def base(base_dir: Path) -> Path:
    """The suite's pico Llama with the tiny tokenizer (`conftest.base_dir`)."""
    return base_dir


class Observe(TrainerCallback):
    """Records, inside the model's forward pass, a Linear layer's device and the autocast state in
    force there (the Trainer enters autocast inside the top module's wrapped forward, so a hook
    on the top module would run before it)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool, torch.dtype]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs):
            self.seen.append((str(module.weight.device), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))

        next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_pre_hook(hook)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines() if "loss" in json.loads(line)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_training_runs_on_the_gpu_under_autocast(base, tmp_path, precision, finetuning_type):
    cfg = tiny_config(finetuning_type=finetuning_type, learning_rate=1e-2, **{precision: True})
    seen = Observe()
    out = train_model(base, qa_data(), tmp_path / "m", cfg, progress=False, callbacks=[seen])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen.seen and all(d.startswith("cuda") and on and dt == dtype for d, on, dt in seen.seen), seen.seen[:3]
    trained = losses(out)
    assert all(torch.isfinite(torch.tensor(trained))) and trained[-1] < trained[0], trained
    saved = load_file(out / ("adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"))
    # full fine-tuning keeps fp32 master weights under autocast; LoRA adapters train in fp32 too
    assert {t.dtype for t in saved.values()} == {torch.float32}


CPU_TRAIN = """
import sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]  # this module and tests/conftest.py
import test_gpu_paths as t
from dtm.training import train_model
train_model(Path(sys.argv[2]), t.qa_data(), Path(sys.argv[3]), t.tiny_config(), progress=False)
"""


def test_gpu_fp32_training_equals_cpu_and_attention_kernels_agree(base, tmp_path):
    """The same 6 fp32 steps on the CPU (a process that sees no GPU: the Trainer's device is
    fixed per process), on CUDA with eager attention and with sdpa: the weights agree within
    float tolerance. Kernels sum in different orders (TF32 is off for fp32 matmuls by default),
    and Adam divides by the gradient's running RMS, so a weight whose gradient is near zero can
    move by up to ~lr on reassociation alone: hence atol 1e-4 with lr 1e-3, rtol 1e-3."""
    import os
    import subprocess
    import sys

    results = {}
    for name, attn in (("cuda-eager", "eager"), ("cuda-sdpa", "sdpa")):
        cfg = tiny_config(bf16=False)
        cfg.model.attn_implementation = attn
        seen = Observe()
        results[name] = load_file(train_model(base, qa_data(), tmp_path / name, cfg, progress=False, callbacks=[seen]) / "model.safetensors")
        assert seen.seen and all(d.startswith("cuda") and not on for d, on, _ in seen.seen), seen.seen[:3]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", CPU_TRAIN, str(Path(__file__).parent), str(base), str(tmp_path / "cpu")], env=env, check=True)
    results["cpu"] = load_file(tmp_path / "cpu" / "model.safetensors")
    base_w = load_file(base / "model.safetensors")
    assert sum(not torch.equal(results["cpu"][k], base_w[k]) for k in base_w) > len(base_w) // 2  # it trained
    for k in results["cpu"]:
        torch.testing.assert_close(results["cuda-eager"][k], results["cpu"][k], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(results["cuda-sdpa"][k], results["cpu"][k], rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mc")
    with open(d / "mc.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"id": str(i), "question": f"What is {i} + 1?", "choices": [f"{i + 1}.", f"{i + 2}.", f"{i}."], "answer": i % 3}) + "\n")
    return d / "mc.jsonl"


def test_eval_on_the_gpu_equals_the_cpu(base, mc_task, tmp_path):
    from dtm.evaluation import evaluate

    model = make_llama(seed=3)
    with torch.no_grad():  # sharper distributions than the default init, so the choices differ clearly
        model.lm_head.weight.mul_(20)
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    runs = {}
    for device in ("cuda", "cpu"):
        evaluate(tmp_path / "m", [str(mc_task)], out=tmp_path / device, device=device, progress=False, log_samples=True)
        runs[device] = [json.loads(line) for line in (tmp_path / device / "mc.samples.jsonl").read_text().splitlines()]
    assert len(runs["cuda"]) == len(runs["cpu"]) == 24
    for g, c in zip(runs["cuda"], runs["cpu"]):  # fp32 on both: log-likelihoods to 1e-4, the same choices
        assert g["id"] == c["id"] and g["loglikelihoods"] == pytest.approx(c["loglikelihoods"], abs=1e-3)
        assert g["acc"] == c["acc"] or min(abs(a - b) for i, a in enumerate(c["loglikelihoods"]) for b in c["loglikelihoods"][i + 1:]) < 1e-3


def test_merged_bf16_models_load_and_score_on_the_gpu(tmp_path):
    """Two bf16 models merge to the bf16 rounding of their fp32 mean, and the merged model's logits
    on CUDA equal those on the CPU (bf16 matmuls: within bf16 tolerance)."""
    from dtm.merging import merge

    dirs = []
    for seed in (0, 1):
        m = make_llama(seed=seed).to(torch.bfloat16)
        m.save_pretrained(tmp_path / f"m{seed}")
        make_tokenizer().save_pretrained(tmp_path / f"m{seed}")
        dirs.append(tmp_path / f"m{seed}")
    out = merge(dirs, tmp_path / "merged", method="average", progress=False)
    a, b, merged = (load_file(d / "model.safetensors") for d in (*dirs, out))
    for k in merged:
        assert merged[k].dtype == torch.bfloat16
        torch.testing.assert_close(merged[k], ((a[k].float() + b[k].float()) / 2).to(torch.bfloat16), rtol=0, atol=0)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(4, 380, (2, 16), generator=torch.Generator().manual_seed(0))
    on_cpu = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)(ids).logits.float()
    on_gpu = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda()(ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=2e-2, atol=2e-2)


def test_lab_dtm_run_on_the_gpu(tmp_path):
    """`dtm run` on a reduced lab (K=2, few steps, one seed, no control): every stage runs on the
    GPU and writes its results; the sub-models and vanilla trained under bf16 on cuda (as their
    training summaries record)."""
    from dtm.pipeline import run, status

    cfg = load_config(None, [
        "data.path=lab", "model.model_name_or_path=lab", f"output_dir={tmp_path / 'run'}", "seeds=[1]", "disperse.k=2",
        "lab.control=false", "train.finetuning_type=full", "train.freeze_modules=[embed_tokens]", "train.max_steps=40",
        "train.per_device_train_batch_size=16", "train.gradient_accumulation_steps=1", "train.warmup_steps=0",
        "train.learning_rate=1e-3", "train.packing=true", "train.group_by_length=false", "data.template=chat",
        "data.format=alpaca", "data.source_field=source", "eval.limit=32", "eval.batch_size=64", "baselines.methods=[]",
    ], check_paths=False)
    root = run(cfg)
    assert all(row["state"] == "done" for row in status(root)), status(root)
    seed_dir = next(Path(root).glob("seed-*"))
    results = sorted(p.stem for p in (seed_dir / "eval").glob("*.json"))
    assert {DTM, VANILLA, "sub-1", "sub-2"} <= set(results), results
    for name in ("sub-1", VANILLA):
        summary = json.loads((seed_dir / "models" / name / "training_complete.json").read_text())
        assert summary["steps"] > 0 and summary["device"].startswith("cuda") and summary["precision"] == "bf16", summary
