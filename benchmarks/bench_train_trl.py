"""LoRA training speed and memory on a real model: `dtm train` (chunked loss on and off, activation checkpointing
off, whole layers, selective) against TRL's `SFTTrainer`.

    .venv/bin/python benchmarks/bench_train_trl.py                          # the idle run (see --help; about 36 min)
    .venv/bin/python benchmarks/bench_train_trl.py --examples 8 --batch 4 --repeats 1 --no-save   # a quick check

SmolLM2-135M-Instruct converted by `benchmarks/real_model.py` (float32, CPU, one thread), LoRA
r=16 (alpha 32, no dropout) on gate/up/down_proj, the first --examples conversations of
data/real/instructions_messages.jsonl in the model's chat template, cut at --cutoff tokens.
Both tools train on the same batches:

  * the examples are tokenised once, by dtm (`sft_examples`: the chat template, labels on the
    assistant's tokens only); TRL gets those token ids with `completion_mask` = the labelled
    positions (`completion_only_loss`), so both compute the same assistant-only loss;
  * no packing in either (dtm's default `packing: false`; TRL `packing=False, padding_free=False`):
    batches are right-padded to their longest example;
  * --batch examples per step, one pass over the examples in the order the `Trainer`'s seeded
    random sampler gives (both are `transformers.Trainer`s with the same seed and data length);
    the first step's loss of every run is recorded: equal losses show equal first batches;
  * the same optimizer settings (dtm's defaults: AdamW, beta2 0.98, eps 1e-6, clip 0.3, cosine,
    lr 1e-4, no warmup), float32 (TRL's SFTConfig defaults to bf16 autocast: set off), activation
    checkpointing only in the "-gc" and "-selective" modes, no checkpoints written during the run (dtm's `checkpoint_minutes`
    off; TRL `save_strategy="no"`).

Modes: dtm with the chunked loss (`training/chunked_loss.py`, the default), the same with
activation checkpointing of every layer (`dtm-chunked-gc`: `train.gradient_checkpointing: true`)
and with selective checkpointing (`dtm-chunked-selective`: `"selective"`, which keeps the
projections' outputs and recomputes only cheap operations; `training/checkpointing.py`), dtm with
the plain loss (`DTM_CHUNKED_LOSS=0`), TRL as above (the target's peer), and TRL with its own
default of gradient checkpointing on (`trl-gc`: less memory for more time, what a TRL user gets).
The "target" block holds every dtm mode against `trl`; "like_for_like" pairs each dtm mode with
the TRL mode of the same checkpointing choice (dtm-chunked-gc vs trl-gc; TRL has no selective
mode). Each run is its own child process (peak RSS is per process,
model load included); the modes alternate within each of --repeats rounds, their order rotating.
tokens/s = the examples' real (non-pad) tokens over the training loop's wall time (train begin to
end), best of the repeats, with each run's CPU time (user + system over the same loop: on a shared
machine it moves less with other jobs than wall time); peak RSS = the child's maximum resident set.
The load average is recorded after every run. TRL lives in its own venv ($DTM_TRL_VENV, default
~/.cache/dtm/venvs/trl: torch==2.13.0, then trl 1.16.0 and peft 0.21.2 from PyPI), created if missing; it is
never a dependency of dtm. Results: stdout and benchmarks/results/bench_train_trl.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train_common import RESULTS, TrainTimer, bench_config, machine

from dtm.io import atomic_write_json
from dtm.training.chunked_loss import ENV_SWITCH

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "real" / "instructions_messages.jsonl"
# A venv of its own for the peer (its pins differ from ours): $DTM_TRL_VENV, else the user's cache dir.
TRL_VENV = Path(os.environ.get("DTM_TRL_VENV", Path.home() / ".cache" / "dtm" / "venvs" / "trl"))
MLP = ["gate_proj", "up_proj", "down_proj"]
# "-gc": gradient (activation) checkpointing on (TRL's SFTConfig default; dtm's train.gradient_checkpointing)
MODES = ("dtm-chunked", "dtm-chunked-gc", "dtm-chunked-selective", "dtm-plain", "trl", "trl-gc")
# each dtm mode's train.gradient_checkpointing
CHECKPOINTING = {"dtm-chunked": False, "dtm-chunked-gc": True, "dtm-chunked-selective": "selective", "dtm-plain": False}
# like for like: each dtm mode against the TRL mode with the same checkpointing choice
PEER = {"dtm-chunked": "trl", "dtm-plain": "trl", "dtm-chunked-gc": "trl-gc"}
GC_ARG = {"false": False, "true": True, "selective": "selective"}  # a dtm child's --gc

TRL_CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
import trl
from trl import SFTConfig, SFTTrainer
model_dir, examples, out, p = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
rows = [json.loads(line) for line in open(examples)]
data = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]} for r in rows])
class Timer(TrainerCallback):
    start = seconds = cpu_start = cpu_seconds = 0.0
    first_loss = None
    def on_train_begin(self, *a, **k): self.start, self.cpu_start = time.perf_counter(), time.process_time()
    def on_train_end(self, *a, **k): self.seconds, self.cpu_seconds = time.perf_counter() - self.start, time.process_time() - self.cpu_start
    def on_log(self, args, state, control, logs=None, **k):
        if logs and "loss" in logs and self.first_loss is None: self.first_loss = float(logs["loss"])
timer = Timer()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
args = SFTConfig(output_dir=out, per_device_train_batch_size=p["batch"], gradient_accumulation_steps=1, max_steps=p["steps"],
                 learning_rate=p["lr"], lr_scheduler_type=p["scheduler"], warmup_steps=0, adam_beta1=p["beta1"], adam_beta2=p["beta2"],
                 adam_epsilon=p["eps"], max_grad_norm=p["clip"], weight_decay=p["weight_decay"], seed=p["seed"], data_seed=p["seed"],
                 logging_steps=1, logging_first_step=True, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                 bf16=False, gradient_checkpointing=p["gc"], completion_only_loss=True, packing=False, padding_free=False, max_length=None,
                 dataloader_num_workers=0)
lora = LoraConfig(r=p["r"], lora_alpha=p["alpha"], lora_dropout=0.0, target_modules=p["modules"], task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir),
                     peft_config=lora, callbacks=[timer])
trainer.train()
print(json.dumps({"seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds, "first_loss": timer.first_loss, "steps": trainer.state.global_step,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "version": trl.__version__}))
"""


def real_model_dir() -> Path:
    spec = importlib.util.spec_from_file_location("dtm_real_model", ROOT / "benchmarks" / "real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.default_dir()
    if not module.is_ready(model):
        raise SystemExit(f"{model}: no converted model; run `python benchmarks/real_model.py` first")
    return model


def ensure_trl() -> Path:
    """The TRL venv's python, the venv made first if missing (torch pinned to ours, so both run the same kernels)."""
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        subprocess.run([str(TRL_VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(TRL_VENV / "bin" / "pip"), "install", "-q", "trl==1.16.0", "peft==0.21.2"], check=True)
    return python


def config(args: argparse.Namespace, steps: int):
    """dtm's settings for the run; TRL gets the same numbers (`trl_params`)."""
    cfg = bench_config(finetuning_type="lora", per_device_train_batch_size=args.batch, max_steps=steps, logging_steps=1,
                       learning_rate=1e-4, checkpoint_minutes=None, save_steps=10**6, gradient_checkpointing=GC_ARG[args.gc])
    cfg.data.template, cfg.data.cutoff_len = "chat", args.cutoff
    cfg.train.lora.r, cfg.train.lora.lora_alpha, cfg.train.lora.lora_dropout = 16, 32, 0.0
    cfg.train.lora.target_modules = list(MLP)
    return cfg


def trl_params(cfg, steps: int) -> dict:
    t = cfg.train
    return {"batch": t.per_device_train_batch_size, "steps": steps, "lr": t.learning_rate, "scheduler": t.lr_scheduler_type,
            "beta1": t.adam_beta1, "beta2": t.adam_beta2, "eps": t.adam_epsilon, "clip": t.max_grad_norm,
            "weight_decay": t.weight_decay, "seed": cfg.seed, "r": t.lora.r, "alpha": t.lora.lora_alpha, "modules": t.lora.target_modules}


def conversations(n: int) -> list:
    from dtm.data.formats import load_conversations

    convs = load_conversations(DATA, format="auto").conversations
    if n > len(convs):
        raise SystemExit(f"--examples {n}: {DATA} has {len(convs)} conversations")
    return convs[:n]


def dtm_run(args: argparse.Namespace, steps: int) -> dict:
    """Train with dtm in this process (the chunked loss or not, by $DTM_CHUNKED_LOSS); its numbers."""
    from dtm.training import train_model

    timer = TrainTimer()
    with tempfile.TemporaryDirectory(prefix="bench_train_trl_") as tmp:
        out = train_model(args.model, conversations(args.examples), Path(tmp) / "dtm", config(args, steps), progress=False,
                          callbacks=[timer])
        done = json.loads((out / "training_complete.json").read_text())
    import resource

    return {"seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds, "first_loss": timer.first_loss, "steps": done["steps"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def tokenise(args: argparse.Namespace, path: Path) -> int:
    """dtm's examples (ids and assistant-only labels) written for TRL; their real tokens in all."""
    from transformers import AutoTokenizer

    from dtm.training.sft import sft_examples

    examples = sft_examples(conversations(args.examples), AutoTokenizer.from_pretrained(args.model), config(args, 1))
    if len(examples) != args.examples:
        raise SystemExit(f"{len(examples)} of {args.examples} examples kept after cutting at {args.cutoff} tokens; raise --cutoff")
    path.write_text("".join(json.dumps({"input_ids": e["input_ids"], "labels": e["labels"]}) + "\n" for e in examples))
    return sum(len(e["input_ids"]) for e in examples)


def child_env(mode: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    if mode.startswith("dtm"):
        env[ENV_SWITCH] = "1" if mode.startswith("dtm-chunked") else "0"
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    else:
        env.pop("PYTHONPATH", None)  # TRL's venv sees none of dtm
    return env


def run_child(mode: str, args: argparse.Namespace, steps: int, work: Path, trl_python: Path) -> dict:
    if mode.startswith("trl"):
        cmd = [str(trl_python), "-c", TRL_CHILD, str(args.model), str(work / "examples.jsonl"), str(work / "trl"),
               json.dumps(trl_params(config(args, steps), steps) | {"gc": mode == "trl-gc"})]
    else:
        cmd = [sys.executable, __file__, "--child", "--model", str(args.model), "--examples", str(args.examples),
               "--batch", str(args.batch), "--cutoff", str(args.cutoff), "--gc", str(CHECKPOINTING[mode]).lower()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(mode))
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(runs: list[dict], tokens: int) -> dict:
    best = min(r["seconds"] for r in runs)
    return {"tokens_per_s_best": round(tokens / best, 1), "seconds_best": round(best, 2), "seconds_all": [round(r["seconds"], 2) for r in runs],
            "cpu_seconds_all": [round(r["cpu_seconds"], 2) for r in runs],
            "peak_rss_mb_max": round(max(r["peak_rss_mb"] for r in runs)), "peak_rss_mb_all": [round(r["peak_rss_mb"]) for r in runs],
            "first_step_loss": runs[0]["first_loss"], "steps": runs[0]["steps"],
            "loadavg_1min_after_each": [r["loadavg"] for r in runs]}


def target_row(ours: dict, peer: dict) -> dict:
    """tokens/s and peak RSS as multiples of the peer's, and the issue's target (>= 1x tokens/s at <= 0.5x RSS)."""
    return {"tokens_per_s_vs_peer": round(ours["tokens_per_s_best"] / peer["tokens_per_s_best"], 2),
            "peak_rss_vs_peer": round(ours["peak_rss_mb_max"] / peer["peak_rss_mb_max"], 2),
            "met (>= 1x tokens/s, <= 0.5x RSS)": ours["tokens_per_s_best"] >= peer["tokens_per_s_best"]
            and ours["peak_rss_mb_max"] <= 0.5 * peer["peak_rss_mb_max"]}


def losses_agree(losses: list[float | None]) -> bool:
    """Every run's first loss logged and all within 1e-4: the same first batch and labels in every mode."""
    return None not in losses and max(losses) - min(losses) < 1e-4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=64, help="conversations trained on, one pass (a multiple of --batch)")
    ap.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    ap.add_argument("--cutoff", type=int, default=512, help="tokens per example at most (data.cutoff_len)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="default: the converted SmolLM2-135M (benchmarks/real_model.py)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_train_trl.json")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gc", choices=list(GC_ARG), default="false", help=argparse.SUPPRESS)  # a dtm child: train.gradient_checkpointing
    args = ap.parse_args()
    args.model = args.model or real_model_dir()
    if args.examples % args.batch:
        raise SystemExit(f"--examples {args.examples} is not a multiple of --batch {args.batch}: every step must be a full batch")
    steps = args.examples // args.batch
    missing = sorted({PEER[m] for m in args.modes if m in PEER} - set(args.modes))
    if not args.child and ("trl" not in args.modes or missing):
        raise SystemExit(f"--modes must include trl and each dtm mode's TRL peer ({', '.join(missing) or 'trl'}): the targets are measured against them")
    if args.child:
        print(json.dumps(dtm_run(args, steps)))
        return
    trl_python = ensure_trl()
    started, load_before = time.time(), os.getloadavg()
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory(prefix="bench-train-trl-") as tmp:
        work = Path(tmp)
        tokens = tokenise(args, work / "examples.jsonl")
        for rep in range(args.repeats):
            for mode in args.modes[rep % len(args.modes):] + args.modes[:rep % len(args.modes)]:  # rotate the order each round
                out = run_child(mode, args, steps, work, trl_python)
                out["loadavg"] = round(os.getloadavg()[0], 2)
                runs[mode].append(out)
                print(f"round {rep + 1} {mode}: {tokens / out['seconds']:.0f} tokens/s ({out['cpu_seconds']:.1f} CPU s), {out['peak_rss_mb']:.0f} MB, "
                      f"first loss {out['first_loss']:.5f}, load {out['loadavg']}", flush=True)
    table = {m: summary(rs, tokens) for m, rs in runs.items()}
    trl = table["trl"]  # TRL without gradient checkpointing: the target is stated against it
    result = {
        "benchmark": "LoRA training, dtm train vs TRL SFTTrainer: same tokenised examples, batches, assistant-only loss, no packing",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": f"{args.model.name} (fp32, CPU, 1 thread), LoRA r=16 alpha=32 on {'/'.join(MLP)}",
        "data": f"{DATA.relative_to(ROOT)}: first {args.examples} conversations, chat template, cutoff {args.cutoff}; {tokens} real tokens",
        "batch": args.batch, "steps": steps, "repeats": args.repeats, "trl_version": runs["trl"][0].get("version"),
        "note": "-gc: gradient (activation) checkpointing on (TRL's SFTConfig default; dtm's train.gradient_checkpointing: "
                "true); -selective: dtm's train.gradient_checkpointing: selective; otherwise both off. target: each dtm mode against trl (no checkpointing, the issue's target); "
                "like_for_like: against the TRL mode with the same checkpointing choice",
        "modes": table,
        "target": {m: target_row(table[m], trl) for m in table if m.startswith("dtm")},
        "like_for_like": {f"{m} vs {PEER[m]}": target_row(table[m], table[PEER[m]]) for m in table if m in PEER},
        "first_step_losses_agree": losses_agree([t["first_step_loss"] for t in table.values()]),
        "machine": machine() | {"loadavg_before": [round(x, 2) for x in load_before], "minutes": round((time.time() - started) / 60, 1)},
    }
    print(json.dumps(result, indent=1))
    if not args.no_save:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
