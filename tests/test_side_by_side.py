"""A run's seed runs side by side on one worker pool (`pipeline.run_side_by_side`, `dtm.turns`):
the same bytes as one after another, a failure that stops the others and names its seed run,
and a rerun (after a failure or `kill -9`) that resumes to the same bytes.

The runs are the built-in lab at a twentieth of its size: three seeds and the no-bias control,
full fine-tuning in joint jobs on two workers, K=2, the ensemble, and two suites cut to 16
questions. Not a Fisher merge: the Fishers, computed on two threads here, differ in their last
bits from one run to the next even one after another (two sequential runs, measured), so no
comparison of bytes could hold for them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dtm import pipeline
from dtm.config import load_config
from dtm.errors import TrainingError
from dtm.io import TMP_MARK
from dtm.pipeline import SEQUENTIAL_ENV, run, seed_runs, side_by_side

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from same_outputs import outputs  # noqa: E402 - what a run computed, by path (weights, portions, scores)

CONFIG = """\
output_dir: {out}
seeds: [1, 2, 3]
model: {{model_name_or_path: lab}}
data: {{path: lab, format: alpaca, template: chat, cutoff_len: 128, source_field: source, val_size: 20}}
disperse: {{k: 2, strategy: random}}
train:
  finetuning_type: full
  freeze_modules: [embed_tokens]
  learning_rate: 1.0e-3
  num_train_epochs: 1
  per_device_train_batch_size: 16
  warmup_steps: 0
  save_fractions: []
  num_workers: 2
merge: {{method: average}}
eval: {{suites: [knowledge, instruction], batch_size: 64, limit: 16}}
baselines: {{methods: [ensemble]}}
lab: {{scale: 0.05, control: true, control_seeds: 1}}
"""


def lab_config(tmp: Path, out: Path) -> Path:
    path = tmp / f"{out.name}.yaml"
    path.write_text(CONFIG.format(out=out))
    return path


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The lab run with DTM_SEEDS_SEQUENTIAL=1: the seed runs one after another (the reference)."""
    tmp = tmp_path_factory.mktemp("seq")
    before = os.environ.get(SEQUENTIAL_ENV)
    os.environ[SEQUENTIAL_ENV] = "1"
    try:
        root = run(load_config(lab_config(tmp, tmp / "run")))
    finally:
        if before is None:
            del os.environ[SEQUENTIAL_ENV]
        else:
            os.environ[SEQUENTIAL_ENV] = before
    found = outputs(root)
    assert sum(k.endswith(".safetensors") for k in found) >= 4 * 3 and sum("/eval/" in k for k in found) >= 4 * 5
    return found


def timed_stages(monkeypatch) -> list[tuple[str, str, float, float]]:
    """Record (seed run, stage, start, end) of every stage that runs."""
    spans: list[tuple[str, str, float, float]] = []
    for stage, fn in list(pipeline.STAGE_FUNCTIONS.items()):
        def timed(r, fn=fn, stage=stage):
            t0 = time.monotonic()
            out = fn(r)
            spans.append((r.dir.label, stage, t0, time.monotonic()))
            return out

        monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, stage, timed)
    return spans


def overlapping(spans: list[tuple[str, str, float, float]]) -> list[tuple[str, str]]:
    return [(f"{a[0]} {a[1]}", f"{b[0]} {b[1]}") for a in spans for b in spans
            if a[0] < b[0] and a[2] < b[3] and b[2] < a[3]]


def debris(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TMP_MARK in p.name]


def no_seed_threads_left() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("dtm-seed") or t.name.startswith("dtm-control")]


def test_side_by_side_seed_runs_give_the_sequential_runs_bytes(sequential, tmp_path, monkeypatch):
    monkeypatch.delenv(SEQUENTIAL_ENV, raising=False)
    cfg = load_config(lab_config(tmp_path, tmp_path / "run"))
    assert side_by_side(cfg, seed_runs(cfg))
    spans = timed_stages(monkeypatch)
    root = run(cfg)
    assert overlapping(spans), "the seed runs never ran side by side"
    assert outputs(root) == sequential
    assert no_seed_threads_left() and not debris(root)


def test_the_switch_and_the_configs_that_keep_seed_runs_one_after_another(tmp_path, monkeypatch):
    cfg = load_config(lab_config(tmp_path, tmp_path / "run"))
    runs = seed_runs(cfg)
    monkeypatch.delenv(SEQUENTIAL_ENV, raising=False)
    assert side_by_side(cfg, runs) and not side_by_side(cfg, runs[:1])
    for override in ("train.num_workers=1", "train.executor=ray"):
        other = load_config(lab_config(tmp_path, tmp_path / "run"), [override])
        assert not side_by_side(other, seed_runs(other)), override
    monkeypatch.setenv(SEQUENTIAL_ENV, "1")
    assert not side_by_side(cfg, runs)


def test_a_failing_seed_run_stops_the_others_names_itself_and_a_rerun_resumes(sequential, tmp_path, monkeypatch):
    monkeypatch.delenv(SEQUENTIAL_ENV, raising=False)
    cfg_path = lab_config(tmp_path, tmp_path / "run")
    merge_stage = pipeline.STAGE_FUNCTIONS["merge"]

    def fail_in_seed_2(r):
        if r.dir.label == "seed-2":
            raise TrainingError("sub-1: out of memory")
        return merge_stage(r)

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "merge", fail_in_seed_2)
    with pytest.raises(TrainingError, match=r"^seed-2: sub-1: out of memory$"):
        run(load_config(cfg_path))
    assert no_seed_threads_left()
    root = tmp_path / "run"
    assert not (root / "seed-2" / "manifests" / "merge.json").exists() and not debris(root)
    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "merge", merge_stage)
    spans = timed_stages(monkeypatch)
    run(load_config(cfg_path))
    assert {(label, stage) for label, stage, *_ in spans if stage in ("data", "disperse")} == set()  # resumed, not redone
    assert outputs(root) == sequential


def test_a_run_killed_while_its_seed_runs_train_side_by_side_resumes_to_the_same_bytes(sequential, tmp_path):
    cfg_path = lab_config(tmp_path, tmp_path / "run")
    root = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != SEQUENTIAL_ENV} | {"OMP_NUM_THREADS": "1"}
    src = str(Path(pipeline.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "dtm.cli", "run", str(cfg_path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        # killed once two seed runs train side by side (each has a model directory begun)
        while time.monotonic() < deadline and proc.poll() is None:
            if len([d for d in root.glob("**/seed-*/models") if any(d.iterdir())]) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert len(list(root.glob("**/manifests/eval.json"))) < 4  # interrupted
    run(load_config(cfg_path))
    assert outputs(root) == sequential and not debris(root)
