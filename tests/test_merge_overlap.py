"""The merge's reader and writer threads (`dtm.merging.overlap`): the same bytes as one thread,
errors raised as before, no hang, no thread or file left behind."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from safetensors.torch import save_file
from test_disk_full import file_size_limit

import dtm
from dtm.errors import OutputError
from dtm.merging import MergeError
from dtm.merging import engine as E
from dtm.merging import methods as M
from dtm.merging.checkpoint import ChunkReader
from dtm.merging.overlap import Ahead, Behind

torch.set_num_threads(1)

PARAMS = {  # a parameter set for every registered method that makes it do real work
    "average": {}, "task_arithmetic": {"lambda": 0.7}, "wise_ft": {"alpha": 0.3}, "ties": {"density": 0.4},
    "dare_linear": {"density": 0.5, "seed": 3}, "dare_ties": {"density": 0.5, "seed": 3}, "fisher": {},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, list[Path], list[str]]]:
    """Per dtype: a base, three fine-tunes of it (differently sharded) and a Fisher file for each."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        root = tmp_path_factory.mktemp(str(dtype).removeprefix("torch."))
        base_model = make_llama(vocab_size=96, seed=0)
        base_model.to(dtype).save_pretrained(root / "base")
        dirs, fishers = [], []
        for i, shard in enumerate(["1GB", "30KB", "50KB"]):
            m = make_llama(vocab_size=96, seed=i + 1).to(dtype)
            m.save_pretrained(root / f"m{i}", max_shard_size=shard)
            g = torch.Generator().manual_seed(i)
            fisher = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in m.state_dict().items()}
            save_file(fisher, root / f"f{i}.safetensors")
            dirs.append(root / f"m{i}")
            fishers.append(str(root / f"f{i}.safetensors"))
        out[str(dtype).removeprefix("torch.")] = (root / "base", dirs, fishers)
    return out


def files_bytes(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.name != E.RECORD}


def no_merge_threads() -> bool:
    return not any(t.name.startswith("dtm-merge-") for t in threading.enumerate())


@pytest.mark.parametrize("path", ["chunked", "whole"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_threads_write_the_same_bytes_for_every_method(models, tmp_path, monkeypatch, dtype, path):
    base, dirs, fishers = models[dtype]
    if path == "chunked":
        monkeypatch.setattr(E, "CHUNK_ELEMENTS", 300)  # many ragged chunks, so reads run ahead across tensors
    else:
        monkeypatch.setattr(E, "chunkable", lambda *a, **k: False)  # whole tensors, computed in the compute thread
    assert set(PARAMS) == set(M.METHODS)  # a new method gets a line here
    for method, params in PARAMS.items():
        models_ = dirs[:1] if method == "wise_ft" else dirs
        params = {**params, "max_shard_size": "40KB", **({"fisher_files": fishers} if method == "fisher" else {})}
        kw = dict(method=method, base=base, parameters=params, out_dtype=dtype, progress=False)
        one = dtm.merge(models_, tmp_path / f"{method}-one", overlap=False, **kw)
        two = dtm.merge(models_, tmp_path / f"{method}-two", overlap=True, **kw)
        a, b = files_bytes(one), files_bytes(two)
        assert len([n for n in a if n.endswith(".safetensors")]) > 1  # sharded output: the writer crosses files
        assert a == b, method
    assert no_merge_threads()


@pytest.mark.parametrize("overlap", [True, False])
def test_an_input_truncated_during_the_merge_names_the_file(models, tmp_path, monkeypatch, overlap):
    """A file that shrinks after it was opened (copied over while merging): the reader thread's
    error reaches the caller as the one-thread engine's, and nothing is left under the output."""
    base, dirs, _ = models["float32"]
    victim = tmp_path / "victim"
    victim.mkdir()
    for f in dirs[0].iterdir():
        (victim / f.name).write_bytes(f.read_bytes())
    real_open = E.open_inputs

    def open_then_truncate(*a, **k):
        opened = real_open(*a, **k)
        data = victim / "model.safetensors"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        return opened

    monkeypatch.setattr(E, "open_inputs", open_then_truncate)
    monkeypatch.setattr(E, "CHUNK_ELEMENTS", 300)
    with pytest.raises(MergeError, match=r"victim/model.safetensors: tensor .* ends early"):
        dtm.merge([victim, *dirs[1:]], tmp_path / "out", overlap=overlap, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]
    assert no_merge_threads()


@pytest.mark.parametrize("overlap", [True, False])
def test_file_size_limit_in_the_writer_thread_is_an_output_error(models, tmp_path, overlap):
    _, dirs, _ = models["float32"]
    with file_size_limit(20_000), pytest.raises(OutputError, match="disk is full") as e:  # the model is about 130 KB
        dtm.merge(dirs, tmp_path / "m", overlap=overlap, progress=False)
    assert str(tmp_path / "m") in str(e.value)
    assert list(tmp_path.iterdir()) == []
    assert no_merge_threads()


def test_a_compute_error_stops_both_threads(models, tmp_path):
    """The compute fails mid-merge (an input holds inf): the threads end, the message is the usual one."""
    base, dirs, _ = models["float32"]
    bad = tmp_path / "bad"
    state = make_llama(vocab_size=96, seed=5).state_dict()
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("inf")
    make_llama(vocab_size=96, seed=5).save_pretrained(bad, state_dict=state)
    with pytest.raises(MergeError, match="model.layers.1.mlp.up_proj.weight.*inf/nan"):
        dtm.merge([*dirs, bad], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_merge_threads()


def test_ahead_keeps_order_bounds_memory_and_passes_errors_on():
    made = []

    def items():
        for i in range(50):
            made.append(i)
            yield i
        raise ValueError("item 50 is corrupt")

    got = []
    with Ahead(items(), depth=3) as ahead, pytest.raises(ValueError, match="item 50 is corrupt"):
        for x in ahead:
            got.append(x)
            assert len(made) - len(got) <= 3 + 1  # queued + the one being made
    assert got == list(range(50))


def test_ahead_closed_early_stops_its_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    with Ahead(endless(), depth=2) as ahead:
        assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert no_merge_threads()


def test_behind_runs_in_order_and_drops_the_calls_after_a_failure():
    done = []

    def fail():
        raise OSError(28, "No space left on device")

    behind = Behind(depth=2)
    for i in range(20):
        behind.submit(done.append, i)
    behind.submit(fail)
    with pytest.raises(OSError, match="No space"):
        for i in range(20, 1000):  # never blocks: the failed writer keeps draining its queue
            behind.submit(done.append, i)
        behind.finish()
    behind.abort()
    assert done[:20] == list(range(20)) and len(done) == 20
    assert no_merge_threads()


def test_cli_no_overlap_writes_the_same_model(models, tmp_path):
    from dtm.cli import main

    base, dirs, _ = models["bfloat16"]
    args = ["merge", *map(str, dirs), "--base", str(base), "--method", "ties", "--param", "density=0.5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--no-overlap", "--out", str(tmp_path / "b")]) == 0
    assert files_bytes(tmp_path / "a") == files_bytes(tmp_path / "b")


@pytest.mark.parametrize("overlap", [True, False])
def test_every_pooled_buffer_group_is_handed_back_once(models, tmp_path, monkeypatch, overlap):
    """The reader's reused buffer groups (`ChunkFeed`): however many chunks a merge reads (here
    thousands, TIES' threshold pass included), it uses only the pool's groups, and by the end
    each has come back exactly once (a lost one would starve the reader; one handed back twice
    could be filled while still being written), those the trim pass kept for the merge pass too."""
    base, dirs, _ = models["float32"]
    monkeypatch.setattr(E, "CHUNK_ELEMENTS", 300)
    made, free_at_close, holds = [], [], []
    real_group, real_close, real_hold = E.BufferGroup, E.ChunkFeed.close, E.hold_groups

    def counted_group():
        made.append(real_group())
        return made[-1]

    def close(self):
        free_at_close.append(self._free.qsize())
        real_close(self)

    monkeypatch.setattr(E, "BufferGroup", counted_group)
    monkeypatch.setattr(E.ChunkFeed, "close", close)
    monkeypatch.setattr(E, "hold_groups", lambda *a: holds.append(real_hold(*a)) or holds[-1])
    dtm.merge(dirs, tmp_path / "m", method="ties", base=base, parameters={"density": 0.4}, overlap=overlap, progress=False)
    assert len(holds) == 1 and holds[0] > 1  # the trim passes kept groups (every chunk of these small tensors)
    groups = E.pool_groups(E.compute_threads(M.get_method("ties")) if overlap else 0, holds[0])
    assert groups == E.POOL_GROUPS + (E.COMPUTE_AHEAD if overlap else 0) + holds[0]
    assert len(made) == groups and free_at_close == [groups]
    assert no_merge_threads()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ties_merge_pass_takes_the_trim_pass_groups_instead_of_reading_again(models, tmp_path, monkeypatch, dtype):
    """TIES' trim pass keeps a tensor's chunk groups, up to `HOLD_BYTES`, for the merge pass: no
    budget (the old schedule: every chunk read twice), room for 3 groups of a tensor (the rest
    read again) and room for all write the same bytes, and with room for all the reader thread
    reads each chunk of each input exactly once."""
    base, dirs, _ = models[dtype]
    monkeypatch.setattr(E, "CHUNK_ELEMENTS", 300)
    reads: Counter[tuple[str, str, int, int]] = Counter()
    real_read = ChunkReader.read

    def counted(self, info, start, out):
        if threading.current_thread().name == "dtm-merge-reader":  # the schedule's reads, not the threshold sample
            reads[(str(info.file), info.name, start, out.numel())] += 1
        return real_read(self, info, start, out)

    monkeypatch.setattr(ChunkReader, "read", counted)
    holds = []
    real_hold = E.hold_groups
    monkeypatch.setattr(E, "hold_groups", lambda *a: holds.append(real_hold(*a)) or holds[-1])
    group = 4 * 300 * (4 if dtype == "float32" else 2 + 4)  # 3 models + base, stored (+ fp32 copy for bf16)
    budgets = {"none": 0, "three": 3 * group, "all": 1 << 30}
    out, counts = {}, {}
    for label, budget in budgets.items():
        monkeypatch.setattr(E, "HOLD_BYTES", budget)
        reads.clear()
        out[label] = files_bytes(dtm.merge(dirs, tmp_path / label, method="ties", base=base,
                                           parameters={"density": 0.4}, progress=False))
        counts[label] = dict(reads)
    assert out["none"] == out["three"] == out["all"]
    longest = -(-96 * 32 // 300)  # the embeddings' chunks: the longest trim pass
    assert holds == [0, 3, longest]
    assert set(counts["none"]) == set(counts["three"]) == set(counts["all"])  # the same ranges, each read...
    assert set(counts["all"].values()) == {1}  # ... once with room for every group,
    twice = {r for r, c in counts["none"].items() if c == 2}
    assert twice and set(counts["none"].values()) == {1, 2}  # ... twice without (the trim pass's ranges),
    partly = {r for r, c in counts["three"].items() if c == 2}
    assert partly and partly < twice  # ... and past a tensor's third chunk with room for 3
    assert all(start >= 3 * 300 for _, _, start, _ in partly)
    assert no_merge_threads()



@pytest.mark.parametrize("overlap", [True, False])
def test_ties_thresholds_are_sampled_ahead_on_their_own_thread(models, tmp_path, monkeypatch, overlap):
    """With the threads on, every trimmed tensor's threshold sample is taken on the sampling
    thread (`BracketsAhead`), in plan order, none in the merge's own thread; without them, all in
    the caller's thread. The bytes are the same either way (the test above)."""
    base, dirs, _ = models["float32"]
    monkeypatch.setattr(E, "CHUNK_ELEMENTS", 300)
    calls: list[tuple[str, int]] = []
    real = E.threshold_brackets

    def recorded(ranges, n, k, densities):
        calls.append((threading.current_thread().name, ranges.name))
        return real(ranges, n, k, densities)

    monkeypatch.setattr(E, "threshold_brackets", recorded)
    dtm.merge(dirs, tmp_path / "m", method="ties", base=base, parameters={"density": 0.4}, overlap=overlap, progress=False)
    threads = {t for t, _ in calls}
    assert threads == ({"dtm-merge-sample_0"} if overlap else {threading.current_thread().name})
    names = [n for _, n in calls]
    assert len(names) == len(set(names)) > 3  # each trimmed tensor once
    assert no_merge_threads()
