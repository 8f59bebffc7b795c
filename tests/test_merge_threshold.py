"""TIES' threshold without a whole-tensor selection (`methods.bracket`, `count_bracket`,
`select_in_bracket`, the engine's `tensor_trims`), DARE's positional streams, and the merge's
compute threads: exact against `torch.kthvalue` and the whole-tensor trim whatever the sample
(a sample that misses says so and the exact fallback takes over), and the same bytes on any
number of compute threads as on one."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import merged_files, pico_finetunes
from conftest import task_vector as values_from
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dtm
from dtm.merging import engine as E
from dtm.merging import methods as M
from dtm.merging.overlap import Workers

FAST = settings(max_examples=80, deadline=None)


def stable_trimmed(d: torch.Tensor, density: float) -> torch.Tensor:
    """The reference trim: the keep_count largest |d|, ties by position (a stable sort)."""
    keep = M.keep_count(d.numel(), density)
    order = torch.sort(d.abs(), descending=True, stable=True).indices[:keep]
    out = torch.zeros_like(d)
    out[order] = d[order]
    return out


def chunk_apply(d: torch.Tensor, trim: M.ChunkedTrim, chunk: int) -> torch.Tensor:
    """Each chunk trimmed on its own, in reverse order (no state may pass between chunks)."""
    parts = list(d.split(chunk))
    done = {j: trim.chunk(j).apply(parts[j].clone()) for j in reversed(range(len(parts)))}
    return torch.cat([done[j] for j in range(len(parts))])


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(2, 3000), st.sampled_from(["continuous", "coarse", "bf16"]),
       st.sampled_from([0.001, 0.01, 0.3, 0.5, 0.77, 0.999]), st.integers(1, 700),
       st.sampled_from(["ranges", "few", "scaled"]))
def test_bracket_selection_is_kthvalue_or_says_it_missed(seed, n, kind, density, chunk, sample_kind):
    d = values_from(seed, n, kind)
    a = d.abs()
    keep = M.keep_count(n, density)
    assume(0 < keep < n)
    if sample_kind == "ranges":  # what the engine reads
        sample = torch.cat([a[s:s + m] for s, m in M.sample_ranges(n)])
    elif sample_kind == "few":  # a small random sample: wide brackets, sometimes off
        sample = a[torch.randint(n, (5,), generator=torch.Generator().manual_seed(seed))]
    else:  # values that are not the data's: the bracket often misses the threshold
        sample = torch.cat([a[s:s + m] for s, m in M.sample_ranges(n)]) * 1.7
    lo, hi = M.bracket(sample.numpy().copy(), n, keep)
    got = M.select_in_bracket([M.count_bracket(c.numpy(), lo, hi) for c in a.split(chunk)], keep, lo, hi)
    t = float(torch.kthvalue(a, n - keep + 1).values)  # the keep-th largest
    if got is None:
        assert not lo <= t <= hi  # it says it missed only when the threshold is outside the bracket
        return
    assert got.threshold == t
    assert torch.equal(chunk_apply(d, got, chunk), stable_trimmed(d, density))


def test_count_bracket_of_equal_bounds_counts_without_keeping_values():
    a = torch.tensor([0.0, 1.0, 1.0, 2.0, 1.0, 0.5]).numpy()
    c = M.count_bracket(a, a[1], a[1])
    assert (c.above, c.size, c.values) == (1, 3, None)
    got = M.select_in_bracket([c], 3, a[1], a[1])  # 2.0 and two of the three 1.0s
    assert got is not None and got.threshold == 1.0 and (got.ties, got.equal) == (2, 3)


def whole_inputs(n: int, k: int, kind: str, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    base = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return [base + values_from(seed + 1 + i, n, kind) for i in range(k)], base


@pytest.mark.parametrize("kind,n,sigmas,threads,must_hit", [
    ("continuous", 200_000, M.BRACKET_SIGMAS, 2, True),  # the engine's settings: every bracket holds
    ("continuous", 200_000, M.BRACKET_SIGMAS, 0, True),
    ("bf16", 60_000, M.BRACKET_SIGMAS, 2, False),
    ("coarse", 60_000, M.BRACKET_SIGMAS, 2, False),  # a mass of equal values: the bracket may be too full
    ("continuous", 5_000, 0.0, 2, False),  # a bracket of no width: mostly misses, exact fallback
])
def test_tensor_trims_are_the_whole_tensor_trims(monkeypatch, kind, n, sigmas, threads, must_hit):
    """The engine's per-tensor thresholds, densities 0 and 1 included, against the stable-sort trim
    of each whole task vector, chunk by chunk; `must_hit`: no model needed the exact fallback."""
    monkeypatch.setattr(M, "BRACKET_SIGMAS", sigmas)
    monkeypatch.setattr(E, "CHUNK_ELEMENTS", 4099)
    fallbacks = []
    real_exact = E.exact_trim

    def counted(i, *a, **kw):
        fallbacks.append(i)
        return real_exact(i, *a, **kw)

    monkeypatch.setattr(E, "exact_trim", counted)
    densities = [0.0, 0.3, 1.0, 0.61, 0.5]
    xs, base = whole_inputs(n, len(densities), kind)
    wholes = [*xs, base]
    released = []

    def take(key, which, start, m):
        return [wholes[i][start:start + m] for i in which], lambda: released.append(key)

    ranges = E.InputRanges("t", [None] * len(wholes), wholes, None, torch.float32)
    with Workers(threads) as w:
        trims = E.tensor_trims("t", densities, n, len(xs), take, ranges, w, E.Scratch(), torch.float32)
    assert len(released) == -(-n // 4099)  # every chunk group of the trim pass handed back
    for i, (x, dens, trim) in enumerate(zip(xs, densities, trims)):
        d = x - base
        assert torch.equal(chunk_apply(d, trim, 4099), stable_trimmed(d, dens)), i
    assert not (must_hit and fallbacks)
    if sigmas == 0.0:
        assert fallbacks  # the fallback ran


def test_dare_stream_draws_by_position():
    """A DARE stream's draws for a range are those of the whole tensor there, whichever range is asked
    for first (the compute threads ask out of order)."""
    s = M.DareStream(7)
    whole = s.uniform(0, 1000)
    for start, m in [(999, 1), (100, 333), (64, 64), (60, 10), (5, 10), (0, 1000)]:
        assert torch.equal(s.uniform(start, m), whole[start:start + m])
    assert not torch.equal(M.DareStream(8).uniform(0, 1000), whole)


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    return pico_finetunes(tmp_path_factory, first_seed=10)


files_bytes = merged_files


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.4}),
    ("ties", {"density": [0.2, 0.9, 0.5], "normalize": False}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("dare_linear", {"density": 0.3, "seed": 1}),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compute_threads_write_the_bytes_of_one_thread(pico, tmp_path, monkeypatch, method, params, dtype):
    """TIES and DARE on 1, 2 and 3 compute threads (chunks merged out of order, written in order)
    give the bytes of the one-thread merge; with brackets narrow enough to hit and to miss."""
    base, dirs = pico[dtype]
    monkeypatch.setattr(E, "CHUNK_ELEMENTS", 300)
    monkeypatch.setattr(M, "BRACKET_SIGMAS", 1.0)  # pico tensors: a bracket the engine's width would overfill
    monkeypatch.setattr(M, "BRACKET_ROOM", 1)
    kw = dict(method=method, base=base, parameters=params, progress=False)
    one = files_bytes(dtm.merge(dirs, tmp_path / "one", overlap=False, **kw))
    seen = set()
    real_finite = E.all_finite  # every merged chunk's check, fused or not

    def noted(*a, **k):
        seen.add(threading.current_thread().name.split("_")[0])
        return real_finite(*a, **k)

    monkeypatch.setattr(E, "all_finite", noted)
    for threads in (1, 2, 3):
        monkeypatch.setattr(E, "COMPUTE_THREADS", threads)
        assert files_bytes(dtm.merge(dirs, tmp_path / f"t{threads}", overlap=True, **kw)) == one, threads
    assert seen == {"dtm-merge-compute"}  # every chunk was merged on a compute thread
    assert not any(t.name.startswith("dtm-merge-") for t in threading.enumerate())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_sample_pieces_are_the_ranges_read_one_by_one(tmp_path, dtype):
    """`InputRanges.gather` (the threshold sample: one buffer, one read per piece) gives the pieces
    `read` gives, in order, in the compute dtype, from files and from whole tensors alike."""
    from safetensors.torch import save_file

    from dtm.merging.checkpoint import ChunkReader, open_checkpoint

    n = 1 << 19
    values = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
    (tmp_path / "m").mkdir()
    save_file({"pad": torch.zeros(3, dtype=torch.int8), "w": values}, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    pieces = M.sample_ranges(n)
    assert len(pieces) == M.SAMPLE_PIECES and pieces[-1][0] + pieces[-1][1] == n
    reader = ChunkReader()
    try:
        files = E.InputRanges("w", [open_checkpoint(tmp_path / "m")], None, reader, torch.float32)
        wholes = E.InputRanges("w", [None], [values.float()], None, torch.float32)
        expected = torch.cat([values[s:s + m] for s, m in pieces]).float()
        for ranges in (files, wholes):
            got = ranges.gather(0, pieces)
            assert got.dtype == torch.float32 and torch.equal(got, expected)
            assert torch.equal(got, torch.cat([ranges.read(0, s, m) for s, m in pieces]))
    finally:
        reader.close()
