"""Where a joint LoRA step's time goes, against one adapter's Trainer step (issue #16).

The setting of `bench_joint.py lora` (SmolLM2-135M, K=4 adapters r=16 on gate/up/down, batch
2 each, 2 threads): torch's profiler records `--steps` steps after `--warmup` steps of
  joint    one `train_joint` step of the 4 adapters,
  trainer  `train_model` of the first adapter (the Trainer's step, as `turn` and `procs` run it),
and sums the ops' own CPU time by kind (matmuls, attention, the copies and indexing that lay
tokens out, elementwise, loss, optimizer, the rest), per real token trained. The profiler
slows small ops down, so the split matters here, not the absolute times (`bench_joint.py`
measures those). Results: benchmarks/results/profile_joint_lora.json.

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src ../.venv/bin/python profile_joint_lora.py [--steps 3] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_joint import SMOLLM, K, lora_batches, lora_config
from bench_train_common import RESULTS, machine, synthetic_data
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from dtm.dispersal import disperse, portion_path

# op name fragments -> kind (first match wins)
KINDS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "_log_softmax")),
    ("optimizer", ("adam", "foreach", "clip", "norm")),
    ("layout (copy, index, cat, pad)", ("copy_", "index", "cat", "stack", "zeros", "fill_", "pad", "contiguous", "clone",
                                         "unbind", "slice", "select", "repeat", "expand", "to_copy", "empty")),
    ("elementwise", ("mul", "add", "sub", "div", "silu", "rsqrt", "pow", "mean", "neg", "cos", "sin", "sum", "where", "dropout")),
]


def kind(name: str) -> str:
    low = name.lower()
    for k, parts in KINDS:
        if any(p in low for p in parts):
            return k
    return "other"


def summarise(prof: profile, tokens: int, seconds: float) -> dict:
    """Own CPU ms per kind and the top ops, per 1,000 real tokens."""
    by_kind: dict[str, float] = {}
    ops = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1000
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + ms
        ops.append((ms, e.key, e.count))
    total = sum(by_kind.values())
    per_k = 1000 / max(tokens, 1)
    top = sorted(ops, reverse=True)[:15]
    return {"tokens": tokens, "wall_s_profiled": round(seconds, 2), "self_cpu_ms_per_1k_tokens": round(total * per_k, 1),
            "by_kind_share": {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "by_kind_ms_per_1k_tokens": {k: round(v * per_k, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": name, "calls": n, "ms_per_1k_tokens": round(ms * per_k, 1)} for ms, name, n in top]}


def run(mode: str, base: Path, work: Path, warmup: int, steps: int) -> dict:
    from dtm.training.joint import JointJob, train_joint
    from dtm.training.sft import train_model

    cfg = lora_config(base, warmup + steps)
    prof = profile(activities=[ProfilerActivity.CPU])
    marks: dict[str, float] = {}

    def begin() -> None:
        marks["start"] = time.perf_counter()
        prof.start()

    def end() -> None:
        prof.stop()
        marks["seconds"] = time.perf_counter() - marks["start"]

    out = work / mode
    if mode == "joint":
        def on_step(name: str, step: int) -> None:
            if name == f"sub-{K}" and step == warmup:
                begin()
            elif name == f"sub-{K}" and step == warmup + steps:
                end()

        jobs = [JointJob(f"sub-{i + 1}", portion_path(work / "portions", i), out / f"sub-{i + 1}", cfg.seed, cfg) for i in range(K)]
        train_joint(base, jobs, progress=False, on_step=on_step)
        models = range(K)
    else:
        class Window(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
                if state.global_step == warmup:
                    begin()

            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
                if state.global_step == warmup + steps:
                    end()

        train_model(base, portion_path(work / "portions", 0), out / "sub-1", cfg, progress=False, callbacks=[Window()])
        models = range(1)
    lengths, _ = lora_batches(base, work, warmup + steps)
    tokens = sum(sum(lengths[m][s]) for m in models for s in range(warmup, warmup + steps))
    shutil.rmtree(out, ignore_errors=True)
    return summarise(prof, tokens, marks["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not (SMOLLM / "dtm_source.json").is_file():
        raise SystemExit(f"{SMOLLM}: not found; make it with benchmarks/real_model.py")
    work = Path(tempfile.mkdtemp(prefix="profile-joint-lora-"))
    total = a.warmup + a.steps
    disperse(synthetic_data(K * total * 2, seed=1, mean_words=12, spread=0.5, max_words=60), k=K, out=work / "portions",
             seed=0, progress=False)
    load = [round(x, 2) for x in os.getloadavg()]
    result = {"model": "SmolLM2-135M", "k": K, "warmup": a.warmup, "steps": a.steps, "threads": a.threads, "load_avg_before": load}
    for mode in ("joint", "trainer"):
        result[mode] = run(mode, SMOLLM, work, a.warmup, a.steps)
        print(mode, json.dumps(result[mode], indent=1), flush=True)
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["machine"] = machine()
    shutil.rmtree(work, ignore_errors=True)
    (RESULTS / "profile_joint_lora.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
