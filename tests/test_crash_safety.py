"""Crash safety: timed and fraction checkpoints, totals over resumed segments, stale temporaries,
stage seconds over attempts and partial progress in `dtm status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train_sft import qa_data, tiny_config, weights
from transformers import TrainerCallback

from dtm.io import remove_stale_temporaries, stale_temporaries, temp_prefix
from dtm.rundir import COMPLETE_FILE, SeedRun
from dtm.training import train_model
from dtm.training.sft import Totals, last_checkpoint

torch.set_num_threads(1)


class Crash(Exception):
    pass


class CrashAt(TrainerCallback):
    """Raise at the end of step `step` (after that step's checkpoint, if it makes one): a kill, in process."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise Crash(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step and not control.should_save:
            raise Crash(state.global_step)


def summary(out: Path) -> dict:
    return json.loads((out / COMPLETE_FILE).read_text())


# ---------------------------------------------------------------- timed and fraction checkpoints


def test_a_model_shorter_than_save_steps_resumes_from_its_timed_checkpoint(base_dir, tmp_path):
    cfg = tiny_config(max_steps=6, save_steps=1000, checkpoint_minutes=1e-6)  # a checkpoint after every step
    out = tmp_path / "short"
    with pytest.raises(Crash):
        train_model(base_dir, qa_data(), out, cfg, progress=False, callbacks=[CrashAt(4)])
    assert last_checkpoint(out).name == "checkpoint-4"
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) == cfg.train.save_total_limit  # old ones pruned
    train_model(base_dir, qa_data(), out, cfg, progress=False)
    assert summary(out)["resumed_from_step"] == 4


def test_resumed_training_sums_loss_and_seconds_over_its_segments(base_dir, tmp_path):
    """A crash at step 7 of 8 resumes from the checkpoint at the 0.5 fraction (save_steps is far off, no
    timed ones): the summary covers all 8 steps, as the uninterrupted run's does."""
    cfg = tiny_config(max_steps=8, save_steps=1000, checkpoint_minutes=None, save_fractions=[0.5])
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        train_model(base_dir, qa_data(), out, cfg, progress=False, callbacks=[CrashAt(7)])
    checkpoint = last_checkpoint(out)
    assert checkpoint.name == "checkpoint-4"
    first = Totals.of_checkpoint(checkpoint)
    assert first.segments == 1 and first.seconds > 0 and first.loss_sum > 0
    stale = out / (temp_prefix("model.safetensors").replace(f".tmp-{os.getpid()}.", ".tmp-999999999.") + "x")
    stale.write_bytes(b"half a file")  # as a killed writer (a pid no process has) leaves it
    train_model(base_dir, qa_data(), out, cfg, progress=False)
    straight = train_model(base_dir, qa_data(), tmp_path / "straight", cfg, progress=False)
    resumed, whole = summary(out), summary(straight)
    assert not stale.exists()
    assert resumed["resumed_from_step"] == 4 and resumed["segments"] == 2 and whole["segments"] == 1
    assert resumed["steps"] == whole["steps"] == 8
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)
    assert resumed["seconds"] > first.seconds
    a, b = weights(out), weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- stale temporaries

KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dtm.io import atomic_directory
    with atomic_directory(Path(sys.argv[1])) as tmp:
        (tmp / "weights.bin").write_bytes(b"0" * 1000)
        print("writing", flush=True)
        time.sleep(120)
    """
)


def test_a_later_run_removes_only_the_temporaries_of_writers_that_are_gone(tmp_path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "run" / name)], stdout=subprocess.PIPE,
                                env=env, text=True) for name in ("killed", "alive")]
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "writing"
        os.kill(writers[0].pid, signal.SIGKILL)
        writers[0].wait()
        ours = tmp_path / "run" / "eval" / (temp_prefix("x.json") + "abc")  # this process's, being written
        other_host = tmp_path / "run" / ".y.json.tmp-999999999.0@another-host-abc"
        for p in (ours, other_host):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("{")
        temporaries = sorted(p.name for p in (tmp_path / "run").rglob("*.tmp-*"))
        assert len(temporaries) == 4
        assert [p.name for p in stale_temporaries(tmp_path)] == [n for n in temporaries if n.startswith(".killed.")]
        removed = remove_stale_temporaries(tmp_path)
        assert len(removed) == 1 and not removed[0].exists()
        left = sorted(p.name for p in (tmp_path / "run").rglob("*.tmp-*"))
        assert left == [n for n in temporaries if not n.startswith(".killed.")]
    finally:
        for w in writers:
            w.kill()
            w.wait()


# ---------------------------------------------------------------- stage seconds over attempts

KILLED_STAGE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dtm.rundir import SeedRun
    with SeedRun(Path(sys.argv[1]), 1).attempt("train", interval=0.05):
        time.sleep(120)
    """
)


def test_a_stage_killed_and_resumed_counts_the_seconds_of_both_attempts(tmp_path):
    records = SeedRun(tmp_path, 1)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, str(tmp_path)], env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.time() + 60
        while records.earlier_attempts("train")[0] < 0.5:  # the killed attempt has run half a second
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    killed, attempts = records.earlier_attempts("train")
    assert attempts == 1
    with records.attempt("train", interval=0.05) as clock:
        time.sleep(0.2)
    seconds, attempts = clock()
    assert attempts == 2 and seconds >= killed + 0.2
    before, n = records.earlier_attempts("train")  # (the pipeline removes the record when a stage finishes)
    with pytest.raises(Crash), records.attempt("train", interval=10):  # a failure is an attempt too
        raise Crash
    assert records.earlier_attempts("train") == (pytest.approx(before, abs=0.05), n + 1)
