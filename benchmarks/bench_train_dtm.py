"""DTM's training cost: K=4 sub-models against one vanilla SFT, peak memory against K, Ray against local.

1. Compute: `dtm.train` on K=4 portions (local executor, one after another) against
   `train_model` on all the data, same recipe (each sub-model gets 1/K of the steps).
   Whole wall time, model loading and saving included. Target: within 10%.
2. Memory: peak RSS of a process training one model, and of a process training K=4
   sub-models in turn (full fine-tuning, so weights + Adam state dominate); each in a fresh
   child process. It must not grow with K: sub-models are trained and freed one at a time.
3. Ray: K=2 sub-models as Ray tasks with 1 CPU each (local `ray.init(num_cpus=2)`), against
   the local executor: identical weights (same seeds), and the wall times.

    .venv/bin/python benchmarks/bench_train_dtm.py [--steps 400] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_train_common import RESULTS, bench_config, machine, save_base, synthetic_data
from safetensors.torch import load_file

from dtm.dispersal import disperse
from dtm.io import atomic_write_json
from dtm.training import train, train_model

BATCH = 8


def config(base: Path, steps: int, **train_keys):
    cfg = bench_config(max_steps=steps, per_device_train_batch_size=BATCH, logging_steps=10, **train_keys)
    cfg.data.cutoff_len = 128
    cfg.model.model_name_or_path = str(base)
    return cfg


def child(mode: str, base: Path, work: Path, k: int, steps: int) -> None:
    """Train in this (fresh) process and print its peak RSS."""
    torch.set_num_threads(1)
    cfg = config(base, steps, finetuning_type="full")
    if mode == "one":
        train_model(base, work / "portions" / "portion-1.jsonl", work / "one", cfg, progress=False)
    else:
        train(cfg, work / "portions", work / "models")
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(mode: str, base: Path, work: Path, k: int, steps: int) -> float:
    cmd = [sys.executable, __file__, "--child", mode, "--base", str(base), "--work", str(work), "--k", str(k), "--steps", str(steps)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--base")
    ap.add_argument("--work")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    if a.child:
        return child(a.child, Path(a.base), Path(a.work), a.k, a.steps)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dtm-"))
    k, steps = a.k, a.steps
    data = synthetic_data(steps * BATCH, seed=1, mean_words=8, spread=0.5, max_words=40)

    # 1. compute: K sub-models on 1/K of the data each vs one vanilla run on all of it
    base, n_small = save_base(tmp / "base-small", hidden=128, layers=4, vocab=1024, heads=4)
    disperse(data, k=k, out=tmp / "c" / "portions", seed=0, progress=False)
    vanilla_runs, dtm_runs = [], []
    for r in range(a.repeats):  # interleaved; the best of each (load only ever slows a run down)
        started = time.perf_counter()
        train_model(base, data, tmp / "c" / f"vanilla-{r}", config(base, steps), progress=False)
        vanilla_runs.append(time.perf_counter() - started)
        started = time.perf_counter()
        train(config(base, steps // k), tmp / "c" / "portions", tmp / "c" / f"models-{r}")
        dtm_runs.append(time.perf_counter() - started)
        print(f"compute repeat {r}: vanilla {vanilla_runs[-1]:.1f}s ({steps} steps), DTM K={k} {dtm_runs[-1]:.1f}s ({k} x {steps // k} steps)")
    vanilla_s, dtm_s = min(vanilla_runs), min(dtm_runs)
    print(f"compute: best vanilla {vanilla_s:.1f}s, best DTM {dtm_s:.1f}s: ratio {dtm_s / vanilla_s:.3f}")

    # 2. memory: one model vs K in turn, full fine-tuning of a bigger model, fresh processes
    big, n_big = save_base(tmp / "base-big", hidden=256, layers=4, vocab=4096, heads=4)
    mem_steps = 8
    disperse(data[: mem_steps * BATCH * k], k=k, out=tmp / "m" / "portions", seed=0, progress=False)
    rss_one = peak_rss("one", big, tmp / "m", k, mem_steps)
    rss_k = peak_rss("k", big, tmp / "m", k, mem_steps)
    print(f"memory: peak RSS one model {rss_one:.0f} MiB, K={k} in turn {rss_k:.0f} MiB")

    # 3. Ray: K=2 with 1 CPU each vs local
    import ray

    disperse(data[: 2 * 20 * BATCH], k=2, out=tmp / "r" / "portions", seed=0, progress=False)
    started = time.perf_counter()
    local = train(config(base, 20), tmp / "r" / "portions", tmp / "r" / "local")
    local_s = time.perf_counter() - started
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = train(config(base, 20, executor="ray", num_cpus_per_model=1, num_gpus_per_model=0), tmp / "r" / "portions", tmp / "r" / "ray")
    finally:
        ray.shutdown()
    ray_s = time.perf_counter() - started
    identical = all(same_weights(x, y) for x, y in zip(local, remote, strict=True))
    print(f"ray: K=2 local {local_s:.1f}s, ray (1 CPU each, start-up included) {ray_s:.1f}s, identical weights: {identical}")

    result = {
        "machine": machine(),
        "compute": {"model_parameters": n_small, "k": k, "vanilla_steps": steps, "sub_model_steps": steps // k,
                    "vanilla_seconds_per_repeat": [round(x, 2) for x in vanilla_runs], "dtm_seconds_per_repeat": [round(x, 2) for x in dtm_runs],
                    "vanilla_seconds": round(vanilla_s, 2), "dtm_seconds": round(dtm_s, 2), "ratio_dtm_over_vanilla": round(dtm_s / vanilla_s, 3),
                    "note": "whole wall time incl. model load, tokenisation and saving; best of the interleaved repeats"},
        "memory": {"model_parameters": n_big, "finetuning_type": "full", "peak_rss_mib_one_model": round(rss_one, 1),
                   f"peak_rss_mib_k{k}_in_turn": round(rss_k, 1), "ratio": round(rss_k / rss_one, 3)},
        "ray": {"k": 2, "cpus_per_model": 1, "local_seconds": round(local_s, 2), "ray_seconds_incl_startup": round(ray_s, 2),
                "identical_weights": identical},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "bench_train_dtm.json", result)
    shutil.rmtree(tmp, ignore_errors=True)  # trained models: hundreds of MB
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
