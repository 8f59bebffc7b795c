"""The fused merge kernels (`kernels.py`, numba) against the torch formulation in `methods.py`,
bit for bit: TIES (trimmed, threshold ties kept, dropped or split by position, zeros and -0,
bf16-valued deltas, weights,
normalised or not, lambda), DARE-TIES and DARE-linear (densities 0, 1 and between, per model,
rescaled or not, any chunk offset), TIES' bracket count; non-finite inputs leave the kernel
non-finite (so the engine's torch path gives the exact error); whole merges write the same bytes
with and without the kernels, and without numba. And DARE's new positional draws: uniform, the
kept fraction binomial per block, no correlation between neighbours or between models."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from conftest import merged_files, pico_finetunes
from conftest import task_vector as values_from
from hypothesis import given, settings
from hypothesis import strategies as st

import dtm
from dtm.merging import MergeError
from dtm.merging import engine as E
from dtm.merging import kernels as K
from dtm.merging import methods as M

FAST = settings(max_examples=60, deadline=None)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def test_the_kernels_run_here():
    """numba is a dependency: without it every test below would compare torch with itself."""
    assert K.available()


def inputs(seed: int, n: int, k: int, kind: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    base = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.05
    if kind == "coarse":
        base = torch.round(base * 64) / 64  # exact sums, so deltas tie and cancel
        base[::7] = -0.0
    return [base + values_from(seed + 1 + i, n, kind) for i in range(k)], base


def chunk_sizes(n: int, pieces: int) -> list[int]:
    step = max(1, -(-n // pieces))
    return [min(step, n - s) for s in range(0, n, step)]


WEIGHTS = st.sampled_from([[1.0] * 5, [0.5, 2.0, 1.0, 0.3, 1.7], [1.0, -0.5, 2.0, 0.25, 1.0], [1e-39, 1.0, 1.0, 1.0, 1.0]])


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 1500), st.integers(1, 5), st.sampled_from(["continuous", "coarse", "bf16"]),
       st.lists(st.sampled_from([0.0, 0.01, 0.3, 0.5, 0.77, 1.0]), min_size=5, max_size=5), st.booleans(), WEIGHTS,
       st.sampled_from([1.0, 0.7, 2.5]), st.integers(1, 4))
def test_ties_kernel_is_the_torch_ties_bitwise(seed, n, k, kind, densities, normalize, weights, scaling, pieces):
    xs, base = inputs(seed, n, k, kind)
    weights, densities = weights[:k], densities[:k]
    wholes = [M.magnitude_trim((x - base).abs(), d) for x, d in zip(xs, densities)]
    sizes = chunk_sizes(n, pieces)
    starts = np.cumsum([0, *sizes[:-1]])
    equal = [[int(((x - base).abs()[s:s + m] == t.threshold).sum()) for s, m in zip(starts, sizes)] for x, t in zip(xs, wholes)]
    chunked = [M.ChunkedTrim.of(t, e) for t, e in zip(wholes, equal)]
    for j, (s, m) in enumerate(zip(starts, sizes)):
        parts, b = [x[s:s + m] for x in xs], base[s:s + m]
        kw = dict(scaling=scaling, normalize=normalize)
        got = M.ties_fused(parts, weights, b, trims=[t.chunk(j) for t in chunked], **kw)
        want = M.ties(parts, weights, b, trims=[t.chunk(j) for t in chunked], **kw)
        assert (got is not None) == M._agreeing_weights(weights, normalize)
        if got is not None:
            assert torch.equal(bits(got), bits(want)), j  # same bits, signs of zeros included
    if pieces == 1:  # one chunk without trims: the kernel's own whole-tensor thresholds
        got = M.ties_fused(xs, weights, base, density=densities, scaling=scaling, normalize=normalize)
        want = M.ties(xs, weights, base, density=densities, scaling=scaling, normalize=normalize)
        assert (got is not None) == M._agreeing_weights(weights, normalize)
        assert got is None or torch.equal(bits(got), bits(want))


def test_ties_kernel_splits_threshold_ties_by_position():
    """Four entries tie at the threshold and three are kept: the second chunk holds two of them
    and keeps only the first (as `Trim.mask` does), with nothing carried between chunks."""
    d = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0, -0.0, 3.0])
    t = M.magnitude_trim(d.abs(), 0.5)  # k = 4: 3.0 and three of the four 2.0s
    chunked = M.ChunkedTrim.of(t, [2, 2])
    assert chunked.chunk(1).kernel_trim(torch.float32) == (2.0, 1)
    parts = [M.ties_fused([c], [1.0], torch.zeros(len(c)), trims=[chunked.chunk(j)]) for j, c in enumerate(d.split([3, 5]))]
    assert torch.equal(torch.cat(parts), torch.tensor([0.0, -2.0, 2.0, 0.0, -2.0, 0.0, 0.0, 3.0]))



def test_a_split_tie_across_blocks_keeps_the_first_ties_in_order():
    """Every entry of a 3-block chunk ties at the threshold and 700 are kept: the kernel keeps all
    of block 0's, the first 188 of block 1's (the one block walked tie by tie) and none of block
    2's, as `Trim.mask` does; signs alternate so a dropped entry's zero keeps its sign."""
    n, keep = 3 * 512, 700
    d = torch.full((n,), 2.0)
    d[1::2] = -2.0
    t = M.magnitude_trim(d.abs(), keep / n)
    assert (t.ties, t.equal) == (keep, n)
    trims = [M.ChunkedTrim.of(t, [n]).chunk(0)]
    got = M.ties_fused([d], [1.0], torch.zeros(n), trims=trims)
    want = M.ties([d], [1.0], torch.zeros(n), trims=[M.ChunkedTrim.of(t, [n]).chunk(0)])
    assert torch.equal(bits(got), bits(want))
    assert torch.equal(got[:keep], d[:keep]) and not got[keep:].any()


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 1500), st.integers(1, 5), st.sampled_from(["continuous", "coarse", "bf16"]),
       st.lists(st.sampled_from([0.0, 0.01, 0.3, 0.5, 1 / 3, 0.9, 1.0]), min_size=5, max_size=5), st.booleans(), st.booleans(),
       WEIGHTS, st.sampled_from([1.0, 0.7]), st.integers(0, 2**40), st.sampled_from(["dare_ties", "dare_linear"]))
def test_dare_kernel_is_the_torch_dare_bitwise(seed, n, k, kind, densities, rescale, normalize, weights, scaling, offset,
                                               method):
    xs, base = inputs(seed, n, k, kind)
    weights, densities = weights[:k], densities[:k]
    kw = dict(density=densities, scaling=scaling, rescale=rescale, normalize=normalize,
              generators=M.model_generators(seed, "t", k), offset=offset)
    fused, plain = (M.dare_ties_fused, M.dare_ties) if method == "dare_ties" else (M.dare_linear_fused, M.dare_linear)
    got = fused(xs, weights, base, **kw)
    want = plain(xs, weights, base, **kw)
    assert (got is not None) == (method == "dare_linear" or M._agreeing_weights(weights, normalize))
    if got is not None:
        assert torch.equal(bits(got), bits(want))


def test_dare_kernel_masks_are_the_streams_draws():
    """One model, density 0.3, no rescale, unit weight, zero base: the kernel's output is the
    delta where the stream's draw is < 0.3 and +0 elsewhere, at any offset."""
    n, start = 5000, 123_456_789
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) + 3.0  # no zeros of its own
    stream = M.model_generators(5, "w", 1)[0]
    got = M.dare_linear_fused([x], [1.0], torch.zeros(n), density=0.3, rescale=False, generators=[stream], offset=start)
    kept = stream.uniform(start, n) < 0.3
    assert got is not None and torch.equal(got, torch.where(kept, x, 0.0))
    assert 0.27 < kept.float().mean() < 0.33


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(2, 4000), st.integers(1, 5), st.sampled_from(["continuous", "coarse", "bf16"]),
       st.sampled_from([0.01, 0.3, 0.5, 0.9]), st.sampled_from(["sample", "equal", "open", "none"]))
def test_count_kernel_is_the_numpy_count(seed, n, k, kind, density, bracket_kind):
    xs, base = inputs(seed, n, k, kind)
    brackets = []
    for i, x in enumerate(xs):
        a = (x - base).abs().numpy()
        sample = a[:: max(1, n // 64)].copy()
        lo, hi = M.bracket(sample, n, M.keep_count(n, density))
        if bracket_kind == "equal":
            lo = hi = a[n // 2]
        elif bracket_kind == "open":
            lo, hi = np.float32(0), np.float32(np.inf)
        brackets.append(None if bracket_kind == "none" and i % 2 else (lo, hi))
    got = M.count_brackets(xs, base, brackets)
    assert K.count_brackets(xs, base, brackets) is not None
    for x, br, c in zip(xs, brackets, got):
        if br is None:
            assert c is None
            continue
        want = M.count_bracket((x - base).abs().numpy(), *br)
        assert (c.above, c.size) == (want.above, want.size)
        assert (c.values is None) == (want.values is None)
        if c.values is not None:
            assert c.values.dtype == want.values.dtype and np.array_equal(c.values.view(np.int32), want.values.view(np.int32))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_non_finite_input_leaves_the_kernels_output_non_finite(bad):
    """The engine takes the torch path (and its exact error) when a fused chunk is not finite: a
    non-finite input must never come out finite, whichever model holds it and however trimmed."""
    xs, base = inputs(0, 600, 3, "continuous")
    for i in range(3):
        ys = [x.clone() for x in xs]
        ys[i][17] = bad
        got = M.ties_fused(ys, [1.0, 0.5, 2.0], base, trims=[M.Trim(0.0, keep_all=True)] * 3)
        assert got is not None and not bool(torch.isfinite(got).all())
        got = M.ties_fused(ys, [1.0, 0.5, 2.0], base, trims=[M.magnitude_trim((y - base).abs(), 0.3) for y in ys])
        assert got is not None and not bool(torch.isfinite(got).all())
        gens = M.model_generators(1, "t", 3)
        got = M.dare_ties_fused(ys, [1.0] * 3, base, density=1.0, generators=gens)
        assert got is not None and not bool(torch.isfinite(got).all())


# ---------------------------------------------------------------- DARE's draws


def test_draws_match_splitmix64_by_hand():
    s = M.DareStream(12345)
    u = s.uniform(10, 3)
    for j, pos in enumerate(range(10, 13)):
        z = M.mix64(s.key + (pos + 1) * M.GOLDEN)
        assert float(u[j]) == (z >> 40) / 2**24


def test_draws_are_uniform_and_the_kept_fraction_is_binomial_per_block():
    n, block, density = 1 << 20, 1 << 14, 0.3
    u = M.DareStream(M.tensor_seed(0, "model.layers.0.mlp.up_proj.weight")).uniform(0, n).double()
    counts = torch.histc(u, bins=256, min=0.0, max=1.0)
    chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
    assert abs(chi2 - 255) < 6 * math.sqrt(2 * 255)  # chi-square, 255 degrees of freedom
    kept = (u < density).double().reshape(-1, block).sum(1)
    sd = math.sqrt(block * density * (1 - density))
    assert float((kept - block * density).abs().max()) < 5 * sd


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_draws_are_uncorrelated_between_neighbours_models_and_tensors():
    n = 1 << 20
    bound = 5 / math.sqrt(n)
    streams = M.model_generators(3, "model.layers.0.self_attn.q_proj.weight", 3)
    other = M.model_generators(3, "model.layers.0.self_attn.k_proj.weight", 1)[0]
    u = [s.uniform(0, n).double() for s in streams]
    assert abs(corr(u[0][1:], u[0][:-1])) < bound  # neighbouring positions
    assert abs(corr(u[0][2:], u[0][:-2])) < bound
    assert abs(corr(u[0], u[1])) < bound and abs(corr(u[1], u[2])) < bound  # models of one tensor
    assert abs(corr(u[0], other.uniform(0, n).double())) < bound  # another tensor
    both = float(((u[0] < 0.5) & (u[1] < 0.5)).double().mean())  # two models' masks are independent
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)


# ---------------------------------------------------------------- whole merges


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    return pico_finetunes(tmp_path_factory, first_seed=20)


files_bytes = merged_files


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.4}),
    ("ties", {"density": [0.2, 0.9, 0.5], "normalize": False, "lambda": 0.8}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("dare_linear", {"density": [0.3, 1.0, 0.0], "seed": 1, "normalize": True}),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merges_write_the_same_bytes_with_and_without_kernels(pico, tmp_path, monkeypatch, method, params, dtype):
    base, dirs = pico[dtype]
    monkeypatch.setattr(E, "CHUNK_ELEMENTS", 3000)  # several chunks per tensor, a trim pass on most
    monkeypatch.setattr(M, "BRACKET_SIGMAS", 2.0)  # pico tensors: a bracket the engine's width would overfill
    ran: list[str] = []
    real_run = K._run

    def counted(kernel, *a):
        ok = real_run(kernel, *a)
        if ok:
            ran.append(kernel)
        return ok

    monkeypatch.setattr(K, "_run", counted)
    kw = dict(method=method, base=base, parameters=params, weights=[0.5, 1.0, 2.0], progress=False)
    fused = files_bytes(dtm.merge(dirs, tmp_path / "fused", **kw))
    assert ("ties_merge" if method == "ties" else "dare_merge") in ran
    assert method != "ties" or "count_brackets" in ran
    monkeypatch.setattr(K, "_load", lambda: None)  # numba missing: torch's ops
    ran.clear()
    plain = files_bytes(dtm.merge(dirs, tmp_path / "plain", **kw))
    assert not ran
    assert fused == plain


def test_a_kernel_that_fails_turns_the_kernels_off_with_a_warning(pico, tmp_path, monkeypatch, caplog):
    base, dirs = pico["float32"]
    kw = dict(method="ties", base=base, parameters={"density": 0.5}, progress=False)
    want = files_bytes(dtm.merge(dirs, tmp_path / "ok", **kw))

    class Broken:
        def __getattr__(self, name):
            def fail(*a):
                raise RuntimeError("no LLVM here")
            return fail

    monkeypatch.setattr(K, "_load", lambda: Broken())
    monkeypatch.setattr(K, "_failed", [])
    with caplog.at_level(logging.WARNING, logger="dtm.merging"):
        got = files_bytes(dtm.merge(dirs, tmp_path / "broken", **kw))
    assert got == want
    assert "no LLVM here" in caplog.text and not K.available()


def test_kernels_off_by_environment(monkeypatch):
    monkeypatch.setenv(K.KERNELS_ENV, "0")
    assert K._load.__wrapped__() is None


def test_a_non_finite_dare_input_is_refused_by_name(pico, tmp_path):
    from safetensors.torch import load_file, save_file

    base, dirs = pico["float32"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in dirs[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    name = next(n for n in tensors if n.endswith("mlp.up_proj.weight"))
    tensors[name][0, 1] = math.nan
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=rf"tensor '{name}'.*inf/nan"):
        dtm.merge([bad, dirs[1]], tmp_path / "out", method="dare_ties", base=base, parameters={"density": 1.0},
                  progress=False)
