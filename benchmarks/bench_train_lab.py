"""Padded against padding-free (packed) batches on the lab's real recipe and data.

The lab's sources have fixed lengths (14 to 41 tokens): a random batch of 16 is padded to
its longest example, so about a third of what a padded step computes is padding. Packed
batches (`train.packing`, `dtm.training.batches.pack_batch`) put the examples into rows of at
most twice the longest example with restarting positions; the loss is the padded batch's
(same labelled tokens, block-diagonal attention), so the arms differ only in speed and in
float rounding. Each arm is `dtm.train_model` on one seed's lab SFT data with the demo's
recipe (`examples/lab.yaml`) for `--steps` steps, one thread, arms interleaved, best kept.

    .venv/bin/python benchmarks/bench_train_lab.py [--steps 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_train_common import RESULTS, machine

from dtm import lab
from dtm.config import load_config
from dtm.io import atomic_write_json
from dtm.training import train_model

torch.set_num_threads(1)
CONFIG = Path(__file__).resolve().parents[1] / "examples" / "lab.yaml"


def run_arm(data: Path, out: Path, steps: int, packing: bool) -> dict:
    cfg = load_config(CONFIG, [f"train.max_steps={steps}", f"train.packing={str(packing).lower()}",
                               "train.save_fractions=[]", "train.save_steps=100000"])
    started = time.perf_counter()
    train_model(lab.base_model_dir(), data, out, cfg, progress=False)
    seconds = time.perf_counter() - started
    done = json.loads((out / "training_complete.json").read_text())
    losses = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    last = [r["loss"] for r in losses if "loss" in r][-5:]
    return {"seconds": round(seconds, 2), "trained_tokens": done.get("trained_tokens"),
            "final_loss_mean_last_5_logs": round(sum(last) / len(last), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-lab-"))
    try:
        data = lab.write_sft_data(work / "sft.jsonl", seed=1)
        runs: dict[str, list[dict]] = {"padded": [], "packed": []}
        for r in range(a.repeats):
            for arm in runs:
                out = work / f"{arm}-{r}"
                runs[arm].append(run_arm(data, out, a.steps, packing=arm == "packed"))
                shutil.rmtree(out)
                print(arm, runs[arm][-1], flush=True)
        best = {arm: min(x["seconds"] for x in rs) for arm, rs in runs.items()}
        result = {
            "machine": machine(),
            "steps": a.steps,
            "recipe": str(CONFIG.name),
            "runs": runs,
            "best_seconds": best,
            "ms_per_step": {arm: round(1000 * s / a.steps, 2) for arm, s in best.items()},
            "speedup_packed_over_padded": round(best["padded"] / best["packed"], 3),
            "note": "whole train_model wall time (load, tokenise, train, save); the losses differ only by float rounding",
        }
        atomic_write_json(RESULTS / "bench_train_lab.json", result)
        print(json.dumps({k: result[k] for k in ("ms_per_step", "speedup_packed_over_padded")}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
