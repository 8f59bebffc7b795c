"""Shards written past the page cache (`checkpoint.DirectFile`, O_DIRECT): the same bytes as a
buffered write at every size around the block and buffer edges, the same merged model, a full
disk reported as such, and a file system or device that refuses O_DIRECT written buffered."""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np
import pytest
import torch
from conftest import merged_files, pico_finetunes
from test_disk_full import file_size_limit
from test_merge_overlap import no_merge_threads

import dtm
from dtm.errors import OutputError
from dtm.merging import checkpoint as C

BUF = C.DirectFile.BUFFER
SIZES = [[1], [4095], [4096], [4097], [BUF - 1], [BUF], [BUF + 1], [123, BUF * 2 + 4096 * 3, 1], [5, 7, 11] * 20, [3 * BUF]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return pico_finetunes(tmp_path_factory, first_seed=30)


def written(tmp_path, parts: list[np.ndarray], name: str = "f") -> tuple[bytes, bool]:
    f = C.DirectFile(tmp_path / name)
    opened_direct = f.direct
    if opened_direct:  # what it says it is
        assert fcntl.fcntl(f._fd, fcntl.F_GETFL) & os.O_DIRECT
    for p in parts:
        f.write(p)
    f.close()
    return (tmp_path / name).read_bytes(), opened_direct


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "+".join(map(str, s)) if len(s) < 4 else f"{len(s)}-parts")
def test_direct_file_writes_exactly_the_bytes_given(tmp_path, sizes):
    rng = np.random.default_rng(len(sizes))
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    data, _ = written(tmp_path, parts)
    assert data == b"".join(p.tobytes() for p in parts)
    assert no_merge_threads()  # the writing thread ended with the file


def test_direct_file_takes_bytes_and_arrays_of_any_dtype(tmp_path):
    floats = np.arange(3000, dtype=np.float32)
    halves = torch.arange(5000, dtype=torch.bfloat16).view(torch.uint8).numpy()
    data, _ = written(tmp_path, [b"header", floats, halves])
    assert data == b"header" + floats.tobytes() + halves.tobytes()


def test_a_file_system_without_o_direct_gets_buffered_writes(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this OS: DirectFile always writes buffered")
    real_open = os.open

    def refuse_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", refuse_direct)
    parts = [np.full(BUF + 5000, 7, np.uint8)]
    data, opened_direct = written(tmp_path, parts)
    assert not opened_direct and data == parts[0].tobytes()


def test_a_device_refusing_a_direct_write_gets_the_rest_buffered(tmp_path, monkeypatch):
    """EINVAL on a direct write (another alignment wanted): O_DIRECT is cleared and the write
    goes on; every byte lands once, in place."""
    real_write = os.write
    refused = []

    def refuse_first(fd, data):
        if not refused:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refuse_first)
    parts = [np.arange(3 * BUF + 100, dtype=np.uint64).view(np.uint8)[: 3 * BUF + 100]]
    data, _ = written(tmp_path, parts)
    assert refused and data == parts[0].tobytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_direct_and_buffered_shards_are_the_same_model(models, tmp_path, monkeypatch, dtype):
    """TIES: compute threads, and bursts of writes (none during a trim pass); the writer does not
    see the method otherwise."""
    base, dirs = models[dtype]
    kw = dict(method="ties", base=base, parameters={"density": 0.4, "max_shard_size": "40KB"}, out_dtype=dtype, progress=False)
    monkeypatch.setattr(C, "DIRECT_MIN_BYTES", 1 << 62)
    buffered = dtm.merge(dirs, tmp_path / "buffered", **kw)
    monkeypatch.setattr(C, "DIRECT_MIN_BYTES", 0)  # every shard direct
    direct = dtm.merge(dirs, tmp_path / "direct", **kw)
    a, b = merged_files(buffered), merged_files(direct)
    assert len([n for n in a if n.endswith(".safetensors")]) > 1
    assert a == b
    assert no_merge_threads()


@pytest.mark.parametrize("overlap", [True, False])
def test_a_full_disk_under_direct_writes_is_an_output_error(models, tmp_path, monkeypatch, overlap):
    _, dirs = models["float32"]
    monkeypatch.setattr(C, "DIRECT_MIN_BYTES", 0)
    with file_size_limit(20_000), pytest.raises(OutputError, match="disk is full") as e:  # the model is about 130 KB
        dtm.merge(dirs, tmp_path / "m", overlap=overlap, progress=False)
    assert str(tmp_path / "m") in str(e.value)
    assert list(tmp_path.iterdir()) == []
    assert no_merge_threads()
