"""The joint executor's memory model (`joint.memory_plan`) against the measured peak.

Each case trains a joint job of K models for a few steps in a fresh process and records the
process's resident memory just before `train_joint` (torch, transformers and the data loaded)
and its peak (`VmHWM`) after; the difference is what the job itself took, which the memory
model printed before training estimates (`estimate_mib`, the sum of its terms). Cases:

  small-lora   a Llama config (hidden 256, 4 layers, vocab 8,000; random weights), LoRA r=16 on
               gate/up/down, K=4, batch 4 x up to 256 tokens
  small-full   the same model, full fine-tuning, K=4
  lab          the built-in lab model (full fine-tuning, frozen tied embeddings, packed), K=4
  smollm-lora  SmolLM2-135M (`~/.cache/dtm/smollm2-135m`, made by benchmarks/real_model.py;
               skipped without it), LoRA r=16 on gate/up/down, K=4, batch 2 x up to 256 tokens

RSS is a coarse instrument (the allocator keeps freed pages, the page cache of the mapped
weights counts), so the ratio estimate / measured is what to read; on a machine with other work
the numbers move little (memory, unlike time, is not shared).

    .venv/bin/python benchmarks/bench_joint_memory.py [cases...] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_train_common import RESULTS, bench_config, machine, save_base, synthetic_data

from dtm import lab
from dtm.io import atomic_write_json

K = 4
SMOLLM = Path.home() / ".cache" / "dtm" / "smollm2-135m"
CASES = ("small-lora", "small-full", "lab", "smollm-lora")


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


SMALL = {"hidden": 256, "layers": 4, "intermediate": 688, "vocab": 8000, "batch": 4}  # the small Llama's shape (flags change it)


def case_setup(case: str, work: Path, steps: int, small: dict):
    """(base model dir, config, K portions of conversations) of a case."""
    if case == "lab":
        cfg = bench_config()
        cfg.model.model_name_or_path = str(lab.base_model_dir())
        for key, value in lab.DATA_RECIPE.items():
            setattr(cfg.data, key, value)
        for key, value in (lab.SFT_RECIPE | {"max_steps": steps, "logging_steps": 1}).items():
            setattr(cfg.train, key, value)
        base = lab.base_model_dir()
        from dtm.data.formats import load_conversations

        convs = load_conversations(lab.write_sft_data(work / "sft.jsonl", seed=1, scale=0.1), format="auto",
                                   source_field="source").conversations
    else:
        lora = case.endswith("lora")
        batch = 2 if case.startswith("smollm") else small["batch"]
        cfg = bench_config(max_steps=steps, per_device_train_batch_size=batch, logging_steps=1,
                           finetuning_type="lora" if lora else "full", packing=False)
        cfg.data.cutoff_len = 256
        cfg.train.lora.r, cfg.train.lora.lora_alpha = 16, 32
        if case.startswith("smollm"):
            base = SMOLLM
        else:
            base, _ = save_base(work / "base", hidden=small["hidden"], layers=small["layers"], vocab=small["vocab"],
                                intermediate=small["intermediate"], heads=4)
        convs = synthetic_data(K * steps * batch * 2, seed=1, mean_words=60, spread=0.3, max_words=150)
    cfg.model.model_name_or_path = str(base)
    n = len(convs) // K
    return base, cfg, [convs[i * n : (i + 1) * n] for i in range(K)]


def child(case: str, steps: int, small: dict) -> None:
    """One case in this fresh process: prints the plan, RSS before and peak (MiB)."""
    from dtm.training import joint

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-joint-mem-"))
    base, cfg, portions = case_setup(case, work, steps, small)
    plans = []
    check = joint.check_memory

    def recording(plan, *args, **kwargs):  # the plan train_joint computes and prints
        plans.append(plan)
        return check(plan, *args, **kwargs)

    joint.check_memory = recording
    jobs = [joint.JointJob(f"m-{i}", p, work / f"m-{i}", cfg.seed, cfg) for i, p in enumerate(portions)]
    before = _status_mib("VmRSS")
    joint.train_joint(base, jobs, progress=False)
    peak = _status_mib("VmHWM")
    plan = {k: round(v / 2**20, 1) for k, v in plans[0].items()}
    print(json.dumps({"plan_mib": plan, "estimate_mib": round(sum(plan.values()), 1), "rss_before_mib": round(before, 1),
                      "peak_rss_mib": round(peak, 1), "measured_mib": round(peak - before, 1)}))


def run_case(case: str, steps: int, small: dict) -> dict:
    flags = [x for k, v in small.items() for x in (f"--{k}", str(v))]
    res = subprocess.run([sys.executable, __file__, "--child", case, "--steps", str(steps), *flags], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{case} failed:\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["estimate_over_measured"] = round(row["estimate_mib"] / max(row["measured_mib"], 1e-9), 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help=f"some of {', '.join(CASES)} (default: all)")
    ap.add_argument("--steps", type=int, default=2)
    for key, value in SMALL.items():
        ap.add_argument(f"--{key}", type=int, default=value, help="the small Llama's shape")
    ap.add_argument("--child")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_joint_memory.json")
    a = ap.parse_args()
    small = {key: getattr(a, key) for key in SMALL}
    if a.child:
        return child(a.child, a.steps, small)
    unknown = [c for c in a.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    result = {"k": K, "steps": a.steps, "small": small, "cases": {}}
    for case in a.cases or CASES:
        if case.startswith("smollm") and not (SMOLLM / "config.json").is_file():
            print(f"{case}: skipped ({SMOLLM} not found; run benchmarks/real_model.py)", flush=True)
            continue
        result["cases"][case] = run_case(case, a.steps, small)
        print(case, json.dumps(result["cases"][case]), flush=True)
    result["machine"] = machine()
    atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()
