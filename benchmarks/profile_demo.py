"""Where the demo's time goes: wall and CPU seconds of every stage of `dtm demo`.

Runs `dtm demo` in a child process, with the config overrides given (e.g. `seeds=[1]` for
one seed), reads its console output line by line and stamps each
stage's start and end, and at each stamp reads the CPU seconds of the whole process tree
(the driver and its pool workers, with psutil). CPU seconds are what load affects least on a
shared machine: a stage's wall time under load 4 says little, its CPU time nearly as much as
on an idle machine. The load average is recorded at the start and the end.

Optionally (`--py-spy`) the run is sampled by py-spy (all processes) and the top frames of
the training and evaluation workers are written next to the JSON (collapsed stacks).

    .venv/bin/python benchmarks/profile_demo.py                       # the whole demo (~5-10 min)
    .venv/bin/python benchmarks/profile_demo.py 'seeds=[1]' lab.control=false --py-spy --label one-seed
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"
STAGE_LINE = re.compile(r"^\s*(?P<run>[\w.-]+): (?:\[bold\])?(?P<stage>\w+)(?:\[/\])? (?P<what>\.\.\.|done in)")


def tree_cpu(root: psutil.Process) -> float:
    """User + system seconds of `root` and every live descendant, plus what their reaped
    children used (a pool worker that ended is counted by its parent)."""
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # ended between the listing and the read
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def profile(overrides: list[str], out_dir: Path, py_spy: bool) -> dict:
    """Run the demo once into `out_dir`; -> per-stage wall and CPU seconds, the total, the load."""
    cmd = [sys.executable, "-m", "dtm.cli", "demo", "--out", str(out_dir), *overrides]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    if py_spy:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [spy, "record", "--subprocesses", "-r", "25", "-f", "raw", "-o", str(out_dir.parent / "demo.spy.txt"), "--", *cmd]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    root = psutil.Process(proc.pid)
    events: list[tuple[float, float, str, str, str]] = []  # (t, cpu, run, stage, start|end)
    log_lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log_lines.append(line)
        for part in line.split("\r"):
            m = STAGE_LINE.match(part)
            if m:
                events.append((time.perf_counter() - t0, tree_cpu(root), m["run"], m["stage"],
                               "start" if m["what"] == "..." else "end"))
    rc = proc.wait()
    wall = time.perf_counter() - t0
    # the child's own and its reaped workers' time; at least what the last stamp saw (a worker
    # ended by the child's exit without being waited for is not in the child's counters)
    cpu_total = max(sum(getattr(os.times(), f) for f in ("children_user", "children_system")), max((e[1] for e in events), default=0.0))
    if rc:
        sys.exit("".join(log_lines[-30:]) + f"\nthe demo failed (exit {rc})")
    stages: dict[str, dict[str, float]] = {}
    open_: dict[tuple[str, str], tuple[float, float]] = {}
    for t, cpu, run, stage, kind in events:
        if kind == "start":
            open_[(run, stage)] = (t, cpu)
        elif (run, stage) in open_:
            ts, cs = open_.pop((run, stage))
            stages[f"{run}/{stage}"] = {"wall_s": round(t - ts, 2), "cpu_s": round(cpu - cs, 2)}
    per_stage = collections.defaultdict(lambda: {"wall_s": 0.0, "cpu_s": 0.0})
    for key, v in stages.items():
        for f in v:
            per_stage[key.split("/")[1]][f] = round(per_stage[key.split("/")[1]][f] + v[f], 2)
    report = next((ln for ln in log_lines if ln.startswith("report:")), "")
    report_s = float(re.search(r"\((\d+)s in all\)", report)[1]) if report else None
    return {"overrides": overrides, "wall_s": round(wall, 1), "cpu_s": round(cpu_total, 1), "pipeline_s": report_s,
            "load_avg_start": [round(x, 2) for x in load0], "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "stages_total": dict(per_stage), "stages": stages,
            "outside_stages_wall_s": round(wall - sum(v["wall_s"] for v in stages.values()), 1)}


def top_frames(spy_file: Path, top: int = 30) -> list[tuple[float, str]]:
    """The frames with the largest share of samples (inclusive), from py-spy's collapsed output."""
    total, incl = 0, collections.Counter()
    for line in spy_file.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        for frame in set(stack.split(";")):
            incl[frame] += int(n)
    return [(round(100 * c / max(total, 1), 1), f) for f, c in incl.most_common(top)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as `dtm demo` takes them")
    ap.add_argument("--py-spy", action="store_true", help="sample every process with py-spy (slows the run a little)")
    ap.add_argument("--label", default="demo", help="the result's key in benchmarks/results/profile_demo.json")
    ap.add_argument("--keep", help="run directory to keep (default: a temporary one)")
    a = ap.parse_args()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="dtm-profile-"))
    result = profile(a.overrides, work / "run", a.py_spy)
    if a.py_spy and (work / "demo.spy.txt").is_file():
        result["py_spy_top"] = top_frames(work / "demo.spy.txt")
    import torch
    import transformers

    result["machine"] = {"cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__}
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = RESULTS / "profile_demo.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[a.label] = result
    path.write_text(json.dumps(saved, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "py_spy_top"}, indent=1))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
