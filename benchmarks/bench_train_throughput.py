"""Training throughput: dtm's trainer against TRL's SFTTrainer, and padding-free batches against padded.

A ~25M-parameter Llama built from a config; identical tokenised data (dtm's response-only
labels, handed to TRL as a pre-tokenised `labels` column), batch size, optimizer settings
and sampler seed; one thread per process. Each arm trains exactly one epoch, so both see
the same tokens; only the training loop is timed (train begin to train end). Arms are
interleaved and repeated, and the best time of each is compared (a shared machine's load
only ever slows a run down).

    .venv/bin/python benchmarks/bench_train_throughput.py [--steps 12] [--repeats 2] [--no-trl]

TRL runs in this process, so it must be importable here (`pip install trl`); the project's venv
does not carry it. `--no-trl` keeps only dtm's arms (padding-free against padded batches).
`bench_train_trl.py` is the comparison with TRL on the real model, in TRL's own venv.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from bench_train_common import (
    RESULTS,
    TrainTimer,
    bench_config,
    machine,
    save_base,
    synthetic_data,
)

from dtm.data.template import tokenize_conversations
from dtm.io import atomic_write_json
from dtm.training.sft import load_base, train_model


def run_dtm(base: Path, data: list, out: Path, kind: str, steps: int, **train) -> TrainTimer:
    timer = TrainTimer()
    cfg = bench_config(finetuning_type=kind, max_steps=steps, **train)
    train_model(base, data, out, cfg, progress=False, callbacks=[timer])
    return timer


def run_trl(base: Path, examples: list[dict], out: Path, kind: str, steps: int) -> TrainTimer:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cfg = bench_config(finetuning_type=kind, max_steps=steps)
    t = cfg.train
    timer = TrainTimer()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=1, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=0, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm, weight_decay=0.0, logging_steps=t.logging_steps, logging_first_step=True,
        save_strategy="no", report_to=[], use_cpu=True, seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=True,
        max_length=None, packing=False, padding_free=False, dataset_kwargs={"skip_prepare_dataset": True},
        # TRL's defaults are bf16 autocast and gradient checkpointing; dtm trains in fp32 on CPU
        # without checkpointing, so both are turned off here for like-for-like work.
        bf16=False, gradient_checkpointing=False,
    )
    peft_config = None
    if kind == "lora":
        lora = t.lora
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(base),
                         peft_config=peft_config, callbacks=[timer])
    trainer.train()
    return timer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-trl", action="store_true", help="skip TRL's arms (TRL is not installed here)")
    a = ap.parse_args()
    if not a.no_trl and importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed in this Python: `pip install trl` here, or run with --no-trl "
                         "(dtm's arms only); benchmarks/bench_train_trl.py compares with TRL in TRL's own venv.")
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base, n_params = save_base(tmp / "base", hidden=512, layers=6, vocab=4096, intermediate=1536, heads=8)
    cfg = bench_config()
    _, tokenizer = load_base(base, cfg)
    data = synthetic_data(a.steps * cfg.train.per_device_train_batch_size, seed=0)
    examples, _ = tokenize_conversations(data, tokenizer, "alpaca", cfg.data.cutoff_len)
    assert len(examples) == len(data)
    tokens = sum(len(e["input_ids"]) for e in examples)
    lengths = sorted(len(e["input_ids"]) for e in examples)
    print(f"model: {n_params / 1e6:.1f}M parameters; {len(examples)} examples, {tokens} tokens, lengths "
          f"min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}")

    arms = {
        "dtm_lora": lambda out: run_dtm(base, data, out, "lora", a.steps),
        "trl_lora": lambda out: run_trl(base, examples, out, "lora", a.steps),
        "dtm_full": lambda out: run_dtm(base, data, out, "full", a.steps),
        "trl_full": lambda out: run_trl(base, examples, out, "full", a.steps),
        "dtm_full_padded_random": lambda out: run_dtm(base, data, out, "full", a.steps, group_by_length=False, packing=False),
        "dtm_full_length_grouped": lambda out: run_dtm(base, data, out, "full", a.steps, group_by_length=True, packing=False),
        "dtm_full_padding_free": lambda out: run_dtm(base, data, out, "full", a.steps, group_by_length=False, packing=True),
    }
    if a.no_trl:
        arms = {k: v for k, v in arms.items() if not k.startswith("trl_")}
    seconds: dict[str, list[float]] = {k: [] for k in arms}
    first_loss: dict[str, float | None] = {}
    for r in range(a.repeats):
        for name, arm in arms.items():
            timer = arm(tmp / f"{name}-{r}")
            seconds[name].append(round(timer.seconds, 3))
            first_loss[name] = timer.first_loss
            print(f"repeat {r}: {name:26s} {timer.seconds:7.2f}s  {tokens / timer.seconds:8.1f} tokens/s  first loss {timer.first_loss}")
    best = {k: min(v) for k, v in seconds.items()}
    tps = {k: round(tokens / v, 1) for k, v in best.items()}
    result = {
        "machine": machine(),
        "model_parameters": n_params,
        "steps": a.steps,
        "batch_size": cfg.train.per_device_train_batch_size,
        "examples": len(examples),
        "tokens_per_epoch": tokens,
        "length_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
        "seconds_per_repeat": seconds,
        "seconds_median": {k: statistics.median(v) for k, v in seconds.items()},
        "tokens_per_second_best": tps,
        "first_logged_loss": first_loss,
        **({} if a.no_trl else {
            "ratio_dtm_over_trl_lora": round(tps["dtm_lora"] / tps["trl_lora"], 3),
            "ratio_dtm_over_trl_full": round(tps["dtm_full"] / tps["trl_full"], 3)}),
        "padding_free_gain_over_padded": round(tps["dtm_full_padding_free"] / tps["dtm_full_padded_random"], 3),
        "length_grouped_gain_over_padded": round(tps["dtm_full_length_grouped"] / tps["dtm_full_padded_random"], 3),
        "note": ("tokens/s counts real (non-padding) tokens; the same tokens in every arm (one epoch of the same data). "
                 "TRL runs with bf16=False and gradient_checkpointing=False (its defaults are True) to match dtm's fp32 CPU recipe; "
                 "TRL also computes entropy and token accuracy every step (its default logging)."),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "bench_train_throughput.json", result)
    shutil.rmtree(tmp, ignore_errors=True)  # trained models: hundreds of MB
    for k in ("ratio_dtm_over_trl_lora", "ratio_dtm_over_trl_full", "padding_free_gain_over_padded", "length_grouped_gain_over_padded"):
        if k in result:
            print(f"{k}: {result[k]}")


if __name__ == "__main__":
    main()
