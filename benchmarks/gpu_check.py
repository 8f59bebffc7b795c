"""The GPU check: one script, one JSON file, under a time budget (issue #17, item 5).

Run on a machine with a CUDA GPU (`benchmarks/gpu_check.sh` is the one command there):

    python benchmarks/gpu_check.py --out DIR [--device cuda] [--budget-s 450]

Checks, in order, each in its own subprocess (a hang or crash costs that check, not the rest):

1. `environment`   torch/CUDA/GPU, package versions, which optional packages are missing;
2. `gpu_tests`     `pytest -m gpu tests/gpu` (bf16/fp16 autocast, eager/sdpa, eval and merge
                   on cuda against the CPU, the lab's `dtm run` on cuda), per-test outcomes;
3. `lab_pretrain`  a scaled-up lab base (a ~27M-parameter lab-style Llama) pretrained briefly
                   on the lab world on the device: seconds, loss, fact accuracy;
4. `lab_dtm`       `dtm run` on the lab with that base, K=4 against vanilla, one seed: wall time
                   per stage, per-model training seconds, every model's scores;
5. `EXTRA_CHECKS`  optional scripts of other branches (listed once, below), when present.

Everything goes to `DIR/gpu_check.json`, rewritten atomically after every check, so a run
killed at any point leaves the checks done so far. A check that would not fit in what is
left of `--budget-s` is skipped and the JSON says so; a running one is stopped at the
budget. `--device cpu --budget-s 120` runs the same path at tiny sizes (a dry run on a
machine without a GPU: the gpu tests are skipped there, with their reason).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Extra:
    """An optional check: a script of this repository run with `args` ({device} is filled in)."""

    name: str
    script: str  # relative to the repository root; skipped (and said so) when absent
    args: tuple[str, ...]  # {device} and {out} (the --out directory) are filled in
    min_s: float  # do not start it with less time left than this
    cap_s: float  # stop it after this long


# The one place to add checks from other branches (each runs only if its script exists).
EXTRA_CHECKS: tuple[Extra, ...] = (
    Extra("bench_joint", "benchmarks/bench_joint.py", ("--device", "{device}", "--quick", "--out", "{out}"), min_s=60, cap_s=240),
)

# Sizes: the scaled-up lab model on a GPU; the shipped shape and a few steps for the CPU dry run.
SIZES = {
    "cuda": {"shape": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
                       "intermediate_size": 1536},
             "pretrain_steps": 2000, "pretrain_batch": 64, "pretrain_lr": 1e-3,
             "sft_lr": 3e-4, "run_overrides": []},
    "cpu": {"shape": {}, "pretrain_steps": 20, "pretrain_batch": 16, "pretrain_lr": 3e-3,
            "sft_lr": 1e-3, "run_overrides": ["train.max_steps=8", "eval.limit=4"]},
}


class Recorder:
    """The JSON result, rewritten (temp file + rename) after every change."""

    def __init__(self, out: Path, budget_s: float):
        self.path = out / "gpu_check.json"
        self.out = str(out)
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.data: dict = {"budget_s": budget_s, "finished": False, "checks": {}}
        self.save()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def check(self, name: str, result: dict) -> None:
        self.data["checks"][name] = result
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = self.elapsed()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".gpu_check.", suffix=".json")
        text = json.dumps(self.data, indent=2, default=str)
        with os.fdopen(fd, "w") as f:  # paths under --out as $OUT/...: the file names no machine's directory
            f.write(text.replace(self.out, "$OUT"))
        os.replace(tmp, self.path)


def say(rec: Recorder, text: str) -> None:
    print(f"[gpu_check {rec.elapsed():6.1f}s, {max(rec.left(), 0):5.0f}s left] {text}", flush=True)


def run_process(rec: Recorder, name: str, argv: list[str], cap_s: float, log_dir: Path, env: dict) -> dict:
    """Run one check's subprocess under min(cap, budget left); its output goes to `logs/<name>.log`."""
    timeout = max(1.0, min(cap_s, rec.left() - 5))
    log = log_dir / f"{name}.log"
    started = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the check's whole process group (its own session)
            rc, timed_out = proc.wait(), True
    tail = log.read_text(errors="replace").splitlines()[-25:]
    result = {"rc": rc, "seconds": round(time.monotonic() - started, 1), "timed_out": timed_out, "timeout_s": round(timeout, 1),
              "log": str(log)}
    if rc != 0:
        result["log_tail"] = tail
        say(rec, f"{name}: exit {rc}{' (stopped at its time limit)' if timed_out else ''}; last lines:")
        print("\n".join("    " + line for line in tail[-12:]), flush=True)
    return result


def environment(device: str) -> dict:
    """Versions and the device, read in this process (torch only; dtm's own imports are checked too)."""
    import importlib
    import importlib.metadata as md

    info: dict = {"python": platform.python_version(), "requested_device": device}
    try:
        import torch

        info |= {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "bf16_supported": torch.cuda.is_bf16_supported(), "device_count": torch.cuda.device_count()}
    except Exception as e:  # noqa: BLE001 - reported, not raised: the JSON must be written
        info["torch_error"] = repr(e)
    versions = {}
    for pkg in ("transformers", "peft", "accelerate", "safetensors", "tokenizers", "huggingface_hub", "pydantic", "pydantic_core",
                "datasets", "ray", "mergekit", "lm_eval", "pytest", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info["versions"] = versions
    modules = ["dtm", "dtm.config", "dtm.pipeline", "dtm.training.sft", "dtm.training.executors", "dtm.merging.engine",
               "dtm.evaluation.runner", "dtm.lab.pretrain", "dtm.report.render", "dtm.cli"]
    info["dtm_imports"] = {}
    for m in modules:
        try:
            importlib.import_module(m)
            info["dtm_imports"][m] = "ok"
        except Exception as e:  # noqa: BLE001
            info["dtm_imports"][m] = f"{type(e).__name__}: {e}"
    return info


def junit_summary(path: Path) -> dict:
    """Per-test outcome and seconds from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {"error": f"{path} not written"}
    tests = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:500]
                break
        tests[case.get("name")] = {"outcome": outcome, "seconds": round(float(case.get("time") or 0), 2)} | (
            {"message": message} if message else {})
    counts: dict[str, int] = {}
    for t in tests.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


PRETRAIN = """
import json, sys
from dtm.lab import pretrain_base
a = json.loads(sys.argv[1])
pretrain_base(a["out"], seed=0, steps=a["steps"], batch_size=a["batch"], lr=a["lr"], shape=a["shape"], device=a["device"],
              progress=False, overwrite=True)
"""


def lab_run_summary(run_dir: Path) -> dict:
    """Per-stage seconds (the run's manifests), per-model training seconds and scores."""
    from dtm.pipeline import load_run_config, status
    from dtm.rundir import RunDir, training_summary

    cfg = load_run_config(run_dir)
    out: dict = {"stages": status(run_dir), "models": {}}
    for seed_run in RunDir(run_dir).seed_runs(cfg):
        for name, results in seed_run.eval_results().items():
            trained = training_summary(seed_run.model(name)) or {}
            out["models"][name] = {
                "train_seconds": trained.get("seconds"), "steps": trained.get("steps"), "train_loss": trained.get("train_loss"),
                "scores": {task: r.get("metrics") for task, r in results.items()},
            }
    return out


def head_to_head(dtm: dict, vanilla: dict) -> dict:
    """Per task, each model's first metric (accuracy or exact match) and DTM minus vanilla."""
    rows = {}
    for task in sorted(dtm.keys() & vanilla.keys()):
        metric = next((k for k in (dtm[task] or {}) if not k.endswith("_stderr")), None)
        if metric is not None and isinstance(dtm[task][metric], (int, float)) and metric in (vanilla[task] or {}):
            d, v = dtm[task][metric], vanilla[task][metric]
            rows[task] = {"metric": metric, "dtm": round(d, 4), "vanilla": round(v, 4), "dtm_minus_vanilla": round(d - v, 4)}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for gpu_check.json, logs/ and work/")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a tiny dry run without a GPU")
    ap.add_argument("--budget-s", type=float, default=450, help="stop everything by then (default 450 s)")
    ap.add_argument("--only", nargs="*", help="run only these checks (names as in the JSON)")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    rec = Recorder(out, a.budget_s)
    rec.data |= {"device": a.device, "argv": sys.argv, "sizes": SIZES[a.device]}

    def on_term(signum, frame):  # the JSON says how far it got, whoever stops us
        rec.data["stopped_by_signal"] = signum
        rec.save()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    if a.device == "cpu":
        env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    size = SIZES[a.device]
    base = work / "lab-base"

    def wanted(name: str) -> bool:
        return not a.only or name in a.only

    def fits(name: str, min_s: float) -> bool:
        if rec.left() >= min_s:
            return True
        rec.check(name, {"skipped": f"needs at least {min_s:.0f}s, {max(rec.left(), 0):.0f}s of the budget left"})
        say(rec, f"{name}: skipped (would not fit in the budget)")
        return False

    try:
        say(rec, f"environment (device {a.device}, budget {a.budget_s:.0f}s, out {out})")
        rec.check("environment", environment(a.device))
        if a.device == "cuda" and not rec.data["checks"]["environment"].get("cuda_available"):
            rec.data["warning"] = "--device cuda but torch sees no CUDA device: the gpu tests will be skipped and training runs on the CPU"
            say(rec, rec.data["warning"])

        if wanted("gpu_tests") and fits("gpu_tests", 30):
            say(rec, "gpu_tests: pytest -m gpu tests/gpu ...")
            xml = out / "gpu_tests.xml"
            argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    "--timeout=300", "tests/gpu"]
            result = run_process(rec, "gpu_tests", argv, cap_s=240, log_dir=out / "logs", env=env) | junit_summary(xml)
            rec.check("gpu_tests", result)
            say(rec, f"gpu_tests: {result.get('counts')} in {result['seconds']}s")

        if wanted("lab_pretrain") and fits("lab_pretrain", 20):
            say(rec, f"lab_pretrain: shape {size['shape'] or 'shipped'}, {size['pretrain_steps']} steps ...")
            args = {"out": str(base), "steps": size["pretrain_steps"], "batch": size["pretrain_batch"], "lr": size["pretrain_lr"],
                    "shape": size["shape"], "device": a.device}
            result = run_process(rec, "lab_pretrain", [sys.executable, "-c", PRETRAIN, json.dumps(args)], cap_s=150,
                                 log_dir=out / "logs", env=env)
            if (base / "lab.json").is_file():
                result["base"] = json.loads((base / "lab.json").read_text())
            rec.check("lab_pretrain", result)
            say(rec, f"lab_pretrain: exit {result['rc']} in {result['seconds']}s: {result.get('base', {}).get('parameters')} parameters, "
                     f"fact accuracy {result.get('base', {}).get('fact_accuracy_raw')}")

        if wanted("lab_dtm") and (base / "lab.json").is_file() and fits("lab_dtm", 40):
            run_dir = work / "lab-run"
            overrides = [f"output_dir={run_dir}", "seeds=[1]", f"lab.base={base}", "lab.control=false", "baselines.methods=[]",
                         "disperse.k=4", "train.save_fractions=[]", f"train.learning_rate={size['sft_lr']}", *size["run_overrides"]]
            say(rec, f"lab_dtm: dtm run (K=4 vs vanilla, one seed) {' '.join(overrides[4:])} ...")
            argv = [sys.executable, "-m", "dtm.cli", "run", str(ROOT / "src" / "dtm" / "configs" / "lab.yaml"), *overrides]
            result = run_process(rec, "lab_dtm", argv, cap_s=1e9, log_dir=out / "logs", env=env)
            result["overrides"] = overrides
            try:
                result |= lab_run_summary(run_dir)
            except Exception as e:  # noqa: BLE001 - an unfinished run has no summary; say why
                result["summary_error"] = f"{type(e).__name__}: {e}"
            from dtm.rundir import DTM, VANILLA

            models = result.get("models", {})
            if DTM in models and VANILLA in models:
                result["dtm_vs_vanilla"] = head_to_head(models[DTM]["scores"], models[VANILLA]["scores"])
            rec.check("lab_dtm", result)
            say(rec, f"lab_dtm: exit {result['rc']} in {result['seconds']}s; models scored: {sorted(models)}")
            for task, row in result.get("dtm_vs_vanilla", {}).items():
                say(rec, f"  {task}: {row}")
        elif wanted("lab_dtm") and "lab_dtm" not in rec.data["checks"]:
            rec.check("lab_dtm", {"skipped": "no lab base (lab_pretrain did not finish)"})

        for extra in EXTRA_CHECKS:
            if not wanted(extra.name):
                continue
            if not (ROOT / extra.script).is_file():
                rec.check(extra.name, {"skipped": f"{extra.script} is not in this checkout"})
                continue
            if fits(extra.name, extra.min_s):
                say(rec, f"{extra.name}: {extra.script} ...")
                argv = [sys.executable, str(ROOT / extra.script), *(x.format(device=a.device, out=out) for x in extra.args)]
                rec.check(extra.name, run_process(rec, extra.name, argv, cap_s=extra.cap_s, log_dir=out / "logs", env=env))
        rec.data["finished"] = True
    except Exception as e:  # noqa: BLE001 - never end without the JSON
        rec.data["error"] = f"{type(e).__name__}: {e}"
        rec.data["traceback"] = traceback.format_exc()
        say(rec, f"error: {rec.data['error']}")
    finally:
        rec.save()
    failed = [n for n, c in rec.data["checks"].items() if isinstance(c, dict) and c.get("rc") not in (None, 0)]
    say(rec, f"done: {rec.path} (failed: {failed or 'none'})")
    return 1 if failed or "error" in rec.data else 0


if __name__ == "__main__":
    sys.exit(main())
