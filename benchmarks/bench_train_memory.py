"""Training memory and speed of the chunked loss (#14 item 7) against the plain (Trainer) loss.

LoRA r=16 on the MLP of the real SmolLM2-135M (49k-token vocabulary), batch 4, sequences of
about 256 tokens with response-only labels, a few steps of `dtm.training.train_model`. Each
mode runs in its own process (peak RSS is per process); `DTM_CHUNKED_LOSS=0` forces the plain
path. The modes alternate over `--repeats` rounds. Records peak RSS, tokens/s (real tokens over
the training loop's wall time), the training loss of each (they must agree) and the load average.

Needs the converted model (`python benchmarks/real_model.py`, cached under ~/.cache/dtm/).

    python benchmarks/bench_train_memory.py [--steps 3] [--repeats 1] [--shapes 4x256 8x512] [--chunk-rows 256 1024]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_train_common import RESULTS, TrainTimer, bench_config, machine, synthetic_data

from dtm.io import atomic_write_json
from dtm.training.chunked_loss import CHUNK_ROWS, ENV_SWITCH

MODEL = Path.home() / ".cache" / "dtm" / "smollm2-135m"


def one_run(mode: str, steps: int, model: Path, batch: int, cutoff: int) -> dict:
    """Train in this process with the given loss path ("plain", or "chunked-<rows per chunk>"); its numbers."""
    from dtm.training import chunked_loss, train_model

    if mode != "plain":
        chunked_loss.CHUNK_ROWS = int(mode.split("-")[1])

    cfg = bench_config(finetuning_type="lora", per_device_train_batch_size=batch, max_steps=steps, logging_steps=1,
                       learning_rate=1e-4)
    cfg.data.cutoff_len = cutoff
    cfg.train.lora.r, cfg.train.lora.lora_alpha, cfg.train.lora.lora_dropout = 16, 32, 0.0
    cfg.train.lora.target_modules = ["gate_proj", "up_proj", "down_proj"]
    data = synthetic_data(batch * steps, seed=0, mean_words=cutoff, spread=0.2, max_words=2 * cutoff)  # cut at `cutoff` tokens
    timer = TrainTimer()
    with tempfile.TemporaryDirectory(prefix="bench_train_memory_") as tmp:
        out = train_model(model, data, Path(tmp) / mode, cfg, progress=False, callbacks=[timer])
        summary = json.loads((out / "training_complete.json").read_text())
    return {
        "mode": mode,
        "batch": batch,
        "cutoff_len": cutoff,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tokens": summary["trained_tokens"],
        "seconds": round(timer.seconds, 2),
        "tokens_per_s": round(summary["trained_tokens"] / timer.seconds, 1),
        "train_loss": summary["train_loss"],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_train_memory.json")
    p.add_argument("--chunk-rows", type=int, nargs="+", default=[CHUNK_ROWS], help="chunk sizes to measure (rows per chunk)")
    p.add_argument("--shapes", nargs="+", default=["4x256"], help="batch x cutoff_len of the runs (e.g. 4x256 8x512)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        batch, cutoff = map(int, a.shapes[0].split("x"))
        print(json.dumps(one_run(a.child, a.steps, a.model, batch, cutoff)))
        return
    if not (a.model / "config.json").exists():
        sys.exit(f"{a.model}: no converted SmolLM2-135M here; run `python benchmarks/real_model.py` first")
    runs = []
    modes = ["plain"] + [f"chunked-{n}" for n in a.chunk_rows]
    for shape, _, mode in itertools.product(a.shapes, range(a.repeats), modes):  # modes alternate within a repeat
        env = os.environ | {ENV_SWITCH: "0" if mode == "plain" else "1"}
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(a.steps), "--model", str(a.model),
                               "--shapes", shape], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    result = {
        "benchmark": "training memory: LM head and loss at labelled positions in chunks vs at every position",
        "model": "SmolLM2-135M (vocab 49152), LoRA r=16 on gate/up/down_proj, fp32 CPU, response-only labels",
        "shapes_batch_x_cutoff": a.shapes,
        "default_chunk_rows": CHUNK_ROWS,
        "steps": a.steps,
        "machine": machine(),
        "caveat": "shared machine (other jobs running, see load averages): tokens/s is noisy; peak RSS is per process",
        "runs": runs,
    }
    atomic_write_json(a.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
