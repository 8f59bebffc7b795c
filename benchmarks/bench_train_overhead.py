"""Per-step overhead of the Hugging Face Trainer on the lab's tiny model.

The lab demo (`examples/lab.yaml`) trains 35 full fine-tuning runs, 27,432 optimizer steps
in all, of a 0.24M-parameter Llama (hidden 64, 4 layers, 453-token vocabulary, tied
embeddings frozen, batch 16, examples of 14-41 tokens in the lab's chat template, packed
padding-free) on 2 cores (two one-thread processes), with a 5-minute target. At that size a
step is milliseconds of maths, so per-step bookkeeping matters, and the bare loop's time
per step sets a floor on the demo. Three arms on identical batches, one thread, interleaved
and repeated (best time kept):

- `plain`: a bare PyTorch loop (AdamW, grad-norm clipping, cosine schedule, the packed batches);
- `trainer`: the Hugging Face Trainer with the same collator, no callbacks, no logging;
- `dtm`: `dtm.train_model` (Trainer + loss check, token counting, JSONL/TensorBoard logs
  every 10 steps, checkpoints every 500 steps), timed from train begin to train end.

    .venv/bin/python benchmarks/bench_train_overhead.py [--steps 400] [--repeats 3] [--lab-data SFT.jsonl]
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_train_common import RESULTS, TrainTimer, machine
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from dtm import lab
from dtm.config import ExperimentConfig
from dtm.data.formats import load_conversations
from dtm.data.template import tokenize_conversations
from dtm.io import atomic_write_json
from dtm.training.batches import REAL_TOKENS, ExampleDataset, make_collator
from dtm.training.sft import freeze_modules, load_base, train_model

BATCH = 16
DEMO_STEPS = 27_432  # the demo's optimizer steps: 3 seeds x 7,836 + the one-seed control's 3,924
COLLATE = make_collator(True, 0, "sdpa")  # the lab recipe's packed rows


def model_inputs(examples: list[dict]) -> dict:
    batch = COLLATE(examples)
    batch.pop(REAL_TOKENS)  # the trainer's token count, not a model input
    return batch


def lab_config(steps: int) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=0)
    cfg.data.cutoff_len = 64
    cfg.data.template = "chat"
    t = cfg.train
    t.finetuning_type, t.freeze_modules = "full", ["embed_tokens"]
    t.max_steps, t.per_device_train_batch_size, t.gradient_accumulation_steps = steps, BATCH, 1
    t.learning_rate, t.warmup_steps, t.logging_steps, t.save_steps = 1e-3, 0, 10, 500
    t.group_by_length, t.packing = False, True
    return cfg


def plain_loop(base: Path, examples: list[dict], steps: int, cfg: ExperimentConfig) -> float:
    model = AutoModelForCausalLM.from_pretrained(base)
    model.config.use_cache = False
    freeze_modules(model, ["embed_tokens"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(examples), generator=g).tolist()
    start = time.perf_counter()
    for s in range(steps):
        idx = [order[(s * BATCH + j) % len(order)] for j in range(BATCH)]
        batch = model_inputs([examples[i] for i in idx])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def plain_trainer(base: Path, examples: list[dict], steps: int, cfg: ExperimentConfig, out: Path) -> float:
    model = AutoModelForCausalLM.from_pretrained(base)
    model.config.use_cache = False
    freeze_modules(model, ["embed_tokens"])
    t = cfg.train
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=t.learning_rate,
        lr_scheduler_type="cosine", adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm,
        save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    timer = TrainTimer()
    trainer = Trainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                      data_collator=model_inputs, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    return timer.seconds


def dtm_run(base: Path, data: list, steps: int, cfg: ExperimentConfig, out: Path) -> float:
    timer = TrainTimer()
    train_model(base, data, out, cfg, progress=False, callbacks=[timer])
    return timer.seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lab-data", help="an SFT JSONL in the lab's format (default: the lab's seed-1 SFT data, generated)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    base = lab.base_model_dir()  # shipped in the package
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    cfg = lab_config(a.steps)
    _, tokenizer = load_base(base, cfg)
    data = load_conversations(a.lab_data or lab.write_sft_data(tmp / "sft.jsonl", seed=1)).conversations
    examples, _ = tokenize_conversations(data, tokenizer, cfg.data.template, cfg.data.cutoff_len)
    lengths = sorted(len(e["input_ids"]) for e in examples)
    print(f"model {n_params / 1e6:.2f}M parameters; lengths min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}")
    seconds: dict[str, list[float]] = {"plain": [], "trainer": [], "dtm": []}
    for r in range(a.repeats):
        seconds["plain"].append(plain_loop(base, examples, a.steps, cfg))
        seconds["trainer"].append(plain_trainer(base, examples, a.steps, cfg, tmp / f"trainer-{r}"))
        seconds["dtm"].append(dtm_run(base, data, a.steps, cfg, tmp / f"dtm-{r}"))
        print(f"repeat {r}: " + "  ".join(f"{k} {v[-1] / a.steps * 1000:.2f} ms/step" for k, v in seconds.items()))
    ms = {k: round(min(v) / a.steps * 1000, 3) for k, v in seconds.items()}
    result = {
        "machine": machine(),
        "data": a.lab_data or "the lab's seed-1 SFT data (dtm.lab.write_sft_data), the shipped lab base",
        "model_parameters": n_params,
        "batch_size": BATCH,
        "steps": a.steps,
        "length_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
        "seconds_per_repeat": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "ms_per_step_best": ms,
        "ms_per_step_median": {k: round(statistics.median(v) / a.steps * 1000, 3) for k, v in seconds.items()},
        "trainer_overhead_ms_per_step": round(ms["trainer"] - ms["plain"], 3),
        "dtm_overhead_ms_per_step": round(ms["dtm"] - ms["plain"], 3),
        "dtm_overhead_share_of_step": round((ms["dtm"] - ms["plain"]) / ms["dtm"], 3),
        "demo_steps": DEMO_STEPS,
        "demo_training_floor_seconds_two_processes": {k: round(DEMO_STEPS * v / 1000 / 2, 1) for k, v in ms.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "bench_train_overhead.json", result)
    shutil.rmtree(tmp, ignore_errors=True)  # trained models: hundreds of MB
    for k in ("ms_per_step_best", "trainer_overhead_ms_per_step", "dtm_overhead_ms_per_step", "dtm_overhead_share_of_step",
              "demo_training_floor_seconds_two_processes"):
        print(f"{k}: {result[k]}")


if __name__ == "__main__":
    main()
