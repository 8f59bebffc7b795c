"""Crash safety, measured: `kill -9` at random moments of a one-seed lab run, resumed each time.

First an uninterrupted reference run of `dtm run src/dtm/configs/lab.yaml` (one seed, no
control, settings reduced so that it is short but still has every stage: data, disperse,
training with fraction snapshots and baselines, merges, evaluation, report). Then the same
run from scratch in another directory, killed with SIGKILL (the whole process group: the
`dtm run` process and its training/eval workers, as an OOM killer or a lost node would) at
`--kills` random moments, resumed after each kill, and finally run to the end. Reported:

- identical: every evaluation metric (every `eval/*.json`, compared exactly, timing fields
  aside and the run directory's path written as <run>) and every `*.safetensors` file
  (bitwise) equal to the reference run's;
- steps_redone: training steps done twice (after each kill, per unfinished model, the last
  logged step minus the step of the checkpoint it resumes from; `train.logging_steps: 1`);
- false_done: stages whose manifest said done while one of their outputs was missing or
  unfinished, checked after every kill and at the end (must be 0);
- temporaries_left: `*.tmp-*` files and directories and `checkpoints/` left in the run
  directory at the end (must be 0);
- wall time of both runs, and the stage each kill landed in.

Kill moments (`--seed`): one in every stage (data, disperse, train, merge, eval, report), the
rest drawn uniformly over the reference run's stage time, so busy stages get more; each is
a stage and an offset into it (the reference's stage seconds, from its manifests). An attempt
waits until the run is in that stage and has written something there (a training log row, an
evaluation result: the stage's start-up, imports and worker processes, is paid again by every
attempt and would otherwise take every short kill), then for the offset less the previous
kill's offset in the same stage (the work before it is kept), and kills. A stage that ends
first takes the kill into the next one; the stage each kill landed in is reported.

    .venv/bin/python benchmarks/chaos.py [--kills 20] [--seed 0] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_train_common import RESULTS, machine

import dtm
from dtm import rundir as rd
from dtm.io import TMP_MARK, atomic_write_json
from dtm.pipeline import LAB_CONFIG, STAGES
from dtm.training.sft import last_checkpoint

# One seed, no control, fewer epochs and evaluation items: every stage, in minutes on 2 CPU cores.
REDUCED = [
    "seeds=[1]", "lab.control=false", "lab.scale=0.5", "train.num_train_epochs=3", "train.logging_steps=1",
    "baselines.methods=[short,soup,wise_ft]", "baselines.soup_size=2", "baselines.wise_ft_alphas=[0.5]", "eval.limit=60",
]
# fields of a result that are not results: timings, and `run_key` (a hash of the task and model paths)
NOT_RESULTS = {"seconds", "time", "duration", "elapsed", "date", "finished", "tokens_per_second", "items_per_second", "run_key"}


def dtm_run(out: Path, log: Path) -> subprocess.Popen:
    """`dtm run` on the reduced lab into `out`, in a process group of its own (so its workers die with it)."""
    src = str(Path(dtm.__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "dtm.cli", "run", str(LAB_CONFIG), f"output_dir={out}", *REDUCED]
    return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run_to_end(out: Path, log: Path) -> float:
    t0 = time.perf_counter()
    proc = dtm_run(out, log)
    if proc.wait() != 0:
        raise SystemExit(f"dtm run failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def seed_run(out: Path) -> rd.SeedRun:
    return rd.RunDir(out).seed_run(1)


def current_stage(out: Path) -> str:
    """The first stage without a manifest (what a kill interrupted)."""
    run = seed_run(out)
    for stage in STAGES:
        if run.manifest(stage) is None:
            return stage
    return "report" if rd.RunDir(out).manifest("report") is None else "finished"


def false_done(out: Path) -> list[str]:
    """Stages a manifest says are done, with an output missing or unfinished."""
    run, bad = seed_run(out), []
    for stage in STAGES:
        outputs = run.outputs(stage) if run.manifest(stage) else None
        if outputs is None:
            continue
        if stage == "data" and not (run.root / outputs["train_data"]).exists():
            bad.append("data: train data missing")
        if stage == "disperse" and not all(run.portion(i).is_file() for i in range(len(outputs["sizes"]))):
            bad.append("disperse: a portion missing")
        if stage in ("train", "merge"):
            names = outputs["models"]
            missing = set(names) - set(run.finished(stage, names))
            missing |= {n for n in names if not list(run.model(n).glob("*.safetensors"))}
            bad += [f"{stage}: {n}" for n in sorted(missing)]
        if stage == "eval":
            tasks = len(outputs["tasks"])
            bad += [f"eval: {n}" for n in sorted(set(outputs["models"]) - set(run.finished("eval", outputs["models"], tasks)))]
    report = rd.RunDir(out).manifest("report")
    if report and not Path(report["outputs"]["markdown"]).is_file():
        bad.append("report: report.md missing")
    return bad


def steps_redone(out: Path) -> int:
    """Per unfinished model: the last logged step minus the step it will resume from."""
    total = 0
    models = seed_run(out).models
    for model in sorted(models.glob("*")) if models.is_dir() else []:
        log = model / rd.LOG_FILE
        if rd.is_complete(model) or not log.is_file():
            continue
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()]
        checkpoint = last_checkpoint(model)
        resume = int(checkpoint.name.split("-")[1]) if checkpoint else 0
        total += max(0, max(steps, default=0) - resume)
    return total


def temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if TMP_MARK in p.name or p.name == rd.CHECKPOINT_DIR)


def results_only(obj: Any, root: Path) -> Any:
    """A result file's content without its timings, with the run directory's path as `<run>`."""
    if isinstance(obj, dict):
        return {k: results_only(v, root) for k, v in obj.items() if k not in NOT_RESULTS}
    if isinstance(obj, list):
        return [results_only(v, root) for v in obj]
    return obj.replace(str(root), "<run>") if isinstance(obj, str) else obj


def compare(reference: Path, chaos: Path) -> dict[str, Any]:
    """Every eval JSON metric and every safetensors file of the two runs."""
    ref_run, run = seed_run(reference), seed_run(chaos)
    evals = sorted(p.name for p in ref_run.eval_dir.glob("*.json"))
    eval_diff = [n for n in evals if (run.eval_dir / n).is_file() and results_only(json.loads((ref_run.eval_dir / n).read_text()), reference)
                 != results_only(json.loads((run.eval_dir / n).read_text()), chaos)]
    eval_missing = [n for n in evals if not (run.eval_dir / n).is_file()]
    tensors = sorted(str(p.relative_to(reference)) for p in reference.rglob("*.safetensors"))
    extra = sorted(set(str(p.relative_to(chaos)) for p in chaos.rglob("*.safetensors")) - set(tensors))

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    differ = [t for t in tensors if not (chaos / t).is_file() or digest(reference / t) != digest(chaos / t)]
    return {"eval_compared": "every field but timings and run_key, the run directory's path written as <run>",
            "safetensors_compared": "sha256 of the whole file",
            "eval_files": len(evals), "eval_files_differing": eval_diff, "eval_files_missing": eval_missing,
            "safetensors_files": len(tensors), "safetensors_differing_or_missing": differ, "safetensors_extra": extra,
            "identical": not (eval_diff or eval_missing or differ or extra)}


def stage_seconds(out: Path) -> dict[str, float]:
    """Each stage's seconds in a finished run (from its manifests), the report's last."""
    run = seed_run(out)
    seconds = {stage: float(run.manifest(stage)["seconds"]) for stage in STAGES}
    return seconds | {"report": float(rd.RunDir(out).manifest("report")["seconds"])}


def kill_plan(seconds: dict[str, float], kills: int, rng: random.Random) -> list[tuple[str, float]]:
    """(stage, offset) of each kill: one per stage, the rest where the time is; in run order."""
    stages = list(seconds)
    total = sum(seconds.values())
    plan = [(s, rng.uniform(0, seconds[s])) for s in stages[:kills]]
    for _ in range(kills - len(plan)):
        t = rng.uniform(0, total)
        for s in stages:
            if t < seconds[s] or s == stages[-1]:
                plan.append((s, min(t, seconds[s])))
                break
            t -= seconds[s]
    return sorted(plan, key=lambda p: (stages.index(p[0]), p[1]))


def entered(printed: str, stage: str) -> bool:
    """Whether an attempt whose output so far is `printed` has begun `stage` (or a later one), by
    what `dtm run` prints as each stage starts or is skipped (the report follows the eval stage)."""
    later = [*STAGES, "report"][[*STAGES, "report"].index(stage):]
    marks = [f": {s} ..." for s in later if s != "report"] + [f": {s} up to date" for s in later if s != "report"]
    return any(m in printed for m in marks + ["eval done in", "eval up to date"] * ("report" in later))


def wrote_since(out: Path, since: float, cap: float, proc: subprocess.Popen) -> None:
    """Wait until a file in the seed run (its manifests aside) is newer than `since` (a wall-clock
    time), the run ends, or `cap` seconds pass."""
    root, deadline = seed_run(out).root, time.monotonic() + cap

    def fresh() -> bool:
        for parent, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != rd.MANIFEST_DIR]
            for f in files:
                try:
                    if os.stat(os.path.join(parent, f)).st_mtime > since:
                        return True
                except FileNotFoundError:
                    continue
        return False

    while proc.poll() is None and time.monotonic() < deadline and not fresh():
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new one under the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the two run directories")
    ap.add_argument("--compare-only", action="store_true", help="recompute the comparison of the runs kept in --work (--keep) into the result")
    ap.add_argument("--reuse-reference", action="store_true", help="reuse a finished reference run in --work (its wall time is then not measured)")
    args = ap.parse_args()
    work = args.work or Path(__import__("tempfile").mkdtemp(prefix="dtm-chaos-"))
    reference, chaos, log = work / "reference", work / "chaos", work / "log.txt"
    if args.compare_only:
        result = json.loads((RESULTS / "chaos.json").read_text())
        result["comparison"] = compare(reference, chaos)
        result["identical"] = result["comparison"]["identical"]
        atomic_write_json(RESULTS / "chaos.json", result)
        print(json.dumps(result["comparison"], indent=2))
        return
    reuse = args.reuse_reference and rd.RunDir(reference).manifest("report") is not None
    for d in (chaos,) if reuse else (reference, chaos):
        shutil.rmtree(d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    reference_seconds = None if reuse else run_to_end(reference, log)
    print(f"reference: {f'{reference_seconds:.0f}s' if reference_seconds else 'reused'}, stages {stage_seconds(reference)}", flush=True)

    reference_stages = stage_seconds(reference)
    plan = kill_plan(reference_stages, args.kills, random.Random(args.seed))
    kills, redone, bad = [], 0, []
    t1 = time.perf_counter()
    previous: tuple[str, float] = ("", 0.0)
    for i, (target, offset) in enumerate(plan):
        delay = offset - previous[1] if previous[0] == target else offset
        previous = (target, offset)
        mark = log.stat().st_size
        proc = dtm_run(chaos, log)
        started = time.perf_counter()
        while proc.poll() is None and not entered(log.read_bytes()[mark:].decode(errors="replace"), target):
            time.sleep(0.02)
        if target in ("train", "eval"):
            wrote_since(chaos, time.time(), reference_stages[target], proc)
        in_target = time.perf_counter()
        try:
            proc.wait(timeout=delay)
            kills.append({"kill": i + 1, "target": target, "stage": "finished before the kill"})
            print(f"kill {i + 1}/{len(plan)}: the run finished first", flush=True)
            continue
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stage, lost = current_stage(chaos), steps_redone(chaos)
        redone += lost
        found = false_done(chaos)
        bad += [f"after kill {i + 1}: {b}" for b in found]
        kills.append({"kill": i + 1, "target": target, "offset_seconds": round(delay, 2), "stage": stage,
                      "attempt_seconds": round(time.perf_counter() - started, 1), "steps_redone": lost,
                      "false_done": found, "working_in_target_after": round(in_target - started, 1)})
        print(f"kill {i + 1}/{len(plan)} {delay:.1f}s into {target}: landed in {stage}, {lost} steps to redo", flush=True)
    run_to_end(chaos, log)
    chaos_seconds = time.perf_counter() - t1
    bad += [f"at the end: {b}" for b in false_done(chaos)]
    left = temporaries(chaos)
    result = {
        "machine": machine(),
        "config": {"file": "src/dtm/configs/lab.yaml", "overrides": REDUCED, "kills": args.kills, "seed": args.seed,
                   "kill": "SIGKILL to the process group (dtm run and its workers)"},
        "reference_seconds": round(reference_seconds, 1) if reference_seconds else None,
        "reference_stage_seconds": stage_seconds(reference),
        "chaos_stage_seconds_all_attempts": stage_seconds(chaos),
        "chaos_seconds": round(chaos_seconds, 1),
        "kills_landed": sum(1 for k in kills if k["stage"] != "finished before the kill"),
        "kills_per_stage": {s: sum(1 for k in kills if k["stage"] == s) for s in (*STAGES, "report")},
        "steps_total": sum((rd.training_summary(m) or {}).get("steps", 0) for m in seed_run(chaos).models.glob("*")),
        "steps_redone": redone,
        "false_done": len(bad),
        "false_done_detail": bad,
        "temporaries_left": len(left),
        "temporaries_left_detail": left[:20],
        "comparison": compare(reference, chaos),
        "kills": kills,
    }
    result["identical"] = result["comparison"]["identical"]
    atomic_write_json(RESULTS / "chaos.json", result)
    print(json.dumps({k: result[k] for k in ("identical", "kills_landed", "steps_redone", "steps_total", "false_done",
                                             "temporaries_left", "reference_seconds", "chaos_seconds")}, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
