"""CPU milliseconds per lab model-step, old code against new, alternating (issues #16, #15).

One lab model-step is one optimizer step of one of the demo's sub-models (`lab.SFT_RECIPE`:
packed rows, 16 examples a step, full fine-tuning of the 0.24M-parameter lab Llama). Each
measurement is a fresh one-thread process (`OMP_NUM_THREADS=1`) that trains on the demo's
data (seed 1, a quarter of the 2,600 training examples per model) for `--warmup` + `--steps`
steps, and reads its process CPU time (`time.process_time`) at the end of step `--warmup`
and at the last step: loading, compiling and saving are outside the window (compile time is
reported separately: the warm-up window's CPU time). Modes:

  joint4   `training.joint.train_joint`, K=4 sub-models stacked (the demo's joint groups)
  joint1   the same with K=1
  trainer  `training.sft.train_model` (the HF Trainer: vanilla and l2 in the demo)

Code versions are source trees (`--src NAME=PATH`, e.g. an old commit's `src` from
`git archive`); runs alternate old, new, old, new..., and the best (lowest) of `--repeats`
is reported (load only ever slows a run down), with the load average around each run.

    git archive <old-commit> src | tar -x -C /tmp/old
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lab_step.py --src old=/tmp/old/src --src new=src \
        --modes joint4 trainer --repeats 3 [--out benchmarks/results/bench_lab_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

K = 4


def child(mode: str, work: Path, warmup: int, steps: int) -> None:
    """One measured run in this process (its `sys.path` already points at the code under test)."""
    import torch
    from transformers import TrainerCallback

    from dtm import lab
    from dtm.config import ExperimentConfig
    from dtm.dispersal import portion_path

    torch.set_num_threads(1)
    cfg = ExperimentConfig(seed=1)
    base = lab.base_model_dir()
    cfg.model.model_name_or_path = str(base)
    for key, value in lab.DATA_RECIPE.items():
        setattr(cfg.data, key, value)
    for key, value in (lab.SFT_RECIPE | {"max_steps": warmup + steps, "logging_steps": 50, "save_steps": 100_000}).items():
        setattr(cfg.train, key, value)
    marks: dict[int, float] = {}
    started = time.process_time()
    out = Path(tempfile.mkdtemp(prefix=f"step-{mode}-", dir=work))
    if mode.startswith("joint"):
        from dtm.training.joint import JointJob, train_joint

        k = int(mode.removeprefix("joint"))

        def on_step(name: str, step: int) -> None:
            if name == f"sub-{k}":  # the last model of the step: the whole step is done
                marks[step] = time.process_time()

        jobs = [JointJob(f"sub-{i + 1}", portion_path(work / "portions", i), out / f"sub-{i + 1}", cfg.seed, cfg) for i in range(k)]
        train_joint(base, jobs, progress=False, on_step=on_step)
    else:
        from dtm.training.sft import train_model

        k = 1

        class Mark(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
                marks[state.global_step] = time.process_time()

        train_model(base, portion_path(work / "portions", 0), out / "sub-1", cfg, progress=False, callbacks=[Mark()])
    cpu = marks[warmup + steps] - marks[warmup]
    print(json.dumps({"ms_per_model_step": round(1000 * cpu / (steps * k), 2), "k": k, "steps": steps,
                      "warmup_cpu_s": round(marks[warmup] - started, 2)}))


def run(src: str, mode: str, work: Path, warmup: int, steps: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(src).resolve())}
    load = os.getloadavg()[0]
    res = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work), "--warmup", str(warmup),
                          "--steps", str(steps)], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{mode} with {src} failed:\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    return row | {"load_avg": [round(load, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", action="append", default=[], help="NAME=PATH of a source tree (repeat: they alternate)")
    p.add_argument("--modes", nargs="+", default=["joint4", "trainer"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", type=Path, default=None, help="a JSON file under benchmarks/results/ to add the result to")
    p.add_argument("--label", default="run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.work, a.warmup, a.steps)
    srcs = dict(s.split("=", 1) for s in a.src) or {"here": str(Path(__file__).resolve().parents[1] / "src")}
    sys.path.insert(0, next(iter(srcs.values())))
    from dtm import lab
    from dtm.data.formats import load_conversations
    from dtm.dispersal import disperse

    work = Path(tempfile.mkdtemp(prefix="bench-lab-step-"))
    path = lab.write_sft_data(work / "sft.jsonl", seed=1)
    convs = load_conversations(path, format="auto", source_field="source").conversations[:2600]
    disperse(convs, k=K, out=work / "portions", seed=0, progress=False)
    runs: dict[str, dict[str, list[dict]]] = {m: {s: [] for s in srcs} for m in a.modes}
    for r in range(a.repeats):
        for mode in a.modes:
            for name, src in srcs.items():
                row = run(src, mode, work, a.warmup, a.steps)
                runs[mode][name].append(row)
                print(f"repeat {r} {mode} {name}: {row}", flush=True)
    best = {m: {s: min(x["ms_per_model_step"] for x in v) for s, v in by.items()} for m, by in runs.items()}
    result = {"label": a.label, "srcs": srcs, "warmup": a.warmup, "steps": a.steps, "repeats": a.repeats,
              "cpu": os.cpu_count(), "runs": runs, "best_ms_per_model_step": best}
    print(json.dumps(best, indent=1))
    if a.out:
        old = json.loads(a.out.read_text()) if a.out.is_file() else {}
        a.out.write_text(json.dumps(old | {a.label: result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
