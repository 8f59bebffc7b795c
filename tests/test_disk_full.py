"""A full disk while writing: each command stops with one line naming the path, saying the disk is full and that
nothing was marked complete (exit 2, no traceback). Simulated in-process: a real file size limit (RLIMIT_FSIZE,
SIGXFSZ ignored, so writes fail with EFBIG), or temporary files opened on /dev/full (ENOSPC)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal

import pytest

import dtm.io
from dtm.cli import main

GOOD = [{"instruction": f"Say {i} " + "word " * 40, "output": f"{i}."} for i in range(600)]


@contextlib.contextmanager
def file_size_limit(n: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def run(argv, capsys) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err, (code, err)
    return err[err.index(f"dtm {argv[0]}: error: "):]


def assert_disk_full(msg: str, path) -> None:
    assert str(path) in msg and "disk is full" in msg and "nothing was marked complete" in msg, msg


def test_disperse_file_size_limit(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))  # about 150 KB
    with file_size_limit(20_000):
        msg = run(["disperse", data, "--k", "2", "--out", tmp_path / "out"], capsys)
    assert_disk_full(msg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_merge_file_size_limit(base_dir, tmp_path, capsys):
    with file_size_limit(20_000):  # the pico model's weights are about 200 KB
        msg = run(["merge", base_dir, base_dir, "--out", tmp_path / "m"], capsys)
    assert_disk_full(msg, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_train_file_size_limit_is_the_disk_full_message(base_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:8]))
    with file_size_limit(20_000):  # checkpoints and model.safetensors: a SafetensorError from the Rust writer
        msg = run(["train", "--base", base_dir, "--data", data, "--out", tmp_path / "o", "--max-steps", "1", "--no-progress",
                   "train.save_fractions=[]"], capsys)
    assert str(tmp_path / "o") in msg and "the disk is full or the file size limit was hit" in msg, msg
    assert "nothing was marked complete" in msg and not (tmp_path / "o" / "training_complete.json").exists()


def test_eval_out_disk_full(base_dir, tmp_path, capsys, monkeypatch):
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1}) + "\n")
    real = dtm.io.tempfile.mkstemp

    def on_dev_full(dir=None, prefix=None, **kw):  # the atomic write's temporary file sits on a full disk
        fd, name = real(dir=dir, prefix=prefix, **kw)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(dtm.io.tempfile, "mkstemp", on_dev_full)
    msg = run(["eval", base_dir, "--task", task, "--out", tmp_path / "r.json", "--device", "cpu"], capsys)
    assert_disk_full(msg, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("errno_", ["ENOSPC", "EFBIG", "EDQUOT"])
def test_output_error_names_the_path(tmp_path, errno_):
    import errno

    e = dtm.io.output_error(OSError(getattr(errno, errno_), os.strerror(getattr(errno, errno_))), tmp_path / "x")
    assert_disk_full(str(e), tmp_path / "x")
