"""CPU and wall seconds per joint LoRA step (K=4 adapters on SmolLM2-135M, the setting of
`bench_joint.py lora`), steps 2-4 of a run, for the code on PYTHONPATH; alternate code versions
by running it with each (results/bench_joint_lora_session8.md).

    cd benchmarks && OMP_NUM_THREADS=2 PYTHONPATH=/tmp/old/src ../.venv/bin/python bench_joint_step.py 2
    cd benchmarks && OMP_NUM_THREADS=2 PYTHONPATH=../src ../.venv/bin/python bench_joint_step.py 2
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_joint import SMOLLM, K, lora_config
from bench_train_common import synthetic_data

from dtm.dispersal import disperse, portion_path
from dtm.training.joint import JointJob, train_joint


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    warmup, steps = 1, 3
    work = Path(tempfile.mkdtemp(prefix="bench-joint-step-"))
    disperse(synthetic_data(K * 8 * 2, seed=1, mean_words=12, spread=0.5, max_words=60), k=K, out=work / "portions", seed=0,
             progress=False)
    cfg = lora_config(SMOLLM, warmup + steps)
    marks: dict[int, tuple[float, float]] = {}

    def on_step(name: str, step: int) -> None:
        if name == f"sub-{K}":  # the last model of the step: the whole step is done
            marks[step] = (time.process_time(), time.perf_counter())

    jobs = [JointJob(f"sub-{i + 1}", portion_path(work / "portions", i), work / f"sub-{i + 1}", cfg.seed, cfg) for i in range(K)]
    train_joint(SMOLLM, jobs, progress=False, on_step=on_step)
    a, b = marks[warmup], marks[warmup + steps]
    print(json.dumps({"threads": torch.get_num_threads(), "cpu_s_per_step": round((b[0] - a[0]) / steps, 2),
                      "wall_s_per_step": round((b[1] - a[1]) / steps, 2)}))


if __name__ == "__main__":
    main()
