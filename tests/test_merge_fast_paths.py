"""The float-only fast paths of TIES (`Trim.apply`, `_agreeing_mean`) against the plain bool-mask
formulation they replace, bit for bit: ties at the threshold (kept all, none, or split by
position), zeros and negative zeros, bf16-valued inputs, chunked application, unit and other
weights, normalised or not."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtm.merging import methods as M

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def deltas_from(seed: int, n: int, k: int, kind: str) -> list[torch.Tensor]:
    """K task vectors of n entries: continuous, coarse (many equal magnitudes and exact zeros,
    including -0.0), or bf16-valued (ties as a bf16 model's deltas have them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        d = torch.randn(n, generator=g) * 0.02
        if kind == "coarse":
            d = torch.round(d * 200) / 4  # values in steps of 0.25, a third of them 0 or -0
            d[torch.rand(n, generator=g) < 0.1] = -0.0
        elif kind == "bf16":
            d = d.to(torch.bfloat16).float()
        out.append(d)
    return out


def reference_ties(deltas: list[torch.Tensor], weights: list[float], densities: list[float], normalize: bool,
                   chunks: list[int]) -> torch.Tensor:
    """TIES with bool masks, as the engine computed it before the fast paths (`mask`, then
    `elect_sign` and `disjoint_mean`)."""
    trims = [M.magnitude_trim(d.abs(), dens) for d, dens in zip(deltas, densities)]
    out = []
    for part in zip(*(d.split(chunks) for d in deltas)):
        ws = [(x * t.mask(x)) * w for x, t, w in zip(part, trims, weights)]
        out.append(M.disjoint_mean(ws, weights, M.elect_sign(ws), normalize))
    return torch.cat(out)


def fast_ties(deltas: list[torch.Tensor], weights: list[float], densities: list[float], normalize: bool,
              chunks: list[int]) -> torch.Tensor:
    trims = [M.magnitude_trim(d.abs(), dens) for d, dens in zip(deltas, densities)]
    out = []
    for part in zip(*(d.split(chunks) for d in deltas)):
        ws = [t.apply(x.clone()) * w for x, t, w in zip(part, trims, weights)]
        out.append(M._agreeing_mean(ws, weights, normalize))
    return torch.cat(out)


def split_sizes(n: int, pieces: int) -> list[int]:
    step = max(1, n // pieces)
    sizes = [step] * (n // step)
    if n % step:
        sizes.append(n % step)
    return sizes


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 400), st.integers(1, 5), st.sampled_from(["continuous", "coarse", "bf16"]),
       st.lists(st.sampled_from([0.0, 0.01, 0.3, 0.5, 0.77, 1.0]), min_size=5, max_size=5), st.booleans(),
       st.sampled_from([[1.0] * 5, [0.5, 2.0, 1.0, 0.3, 1.7]]), st.integers(1, 7))
def test_fast_ties_is_the_bool_mask_ties_bitwise(seed, n, k, kind, densities, normalize, weights, pieces):
    deltas = deltas_from(seed, n, k, kind)
    chunks = split_sizes(n, pieces)
    ref = reference_ties(deltas, weights[:k], densities[:k], normalize, chunks)
    got = fast_ties(deltas, weights[:k], densities[:k], normalize, chunks)
    assert torch.equal(ref.view(torch.int32), got.view(torch.int32))  # same bits, signs of zeros included


def test_apply_splits_ties_by_position_like_mask():
    """Four entries tie at the threshold and three are kept: `apply` must keep the first three in
    flat order across chunk boundaries, as `mask` does (its exact path)."""
    d = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0, -0.0, 3.0])
    t = M.magnitude_trim(d.abs(), 0.5)  # k = 4: 3.0 and three of the four 2.0s
    assert (t.ties, t.equal) == (3, 4)
    ref = copy.deepcopy(t)
    got = torch.cat([t.apply(c) for c in d.split([2, 3, 3])])
    want = torch.cat([c * ref.mask(c) for c in d.split([2, 3, 3])])
    assert torch.equal(got, want)
    assert torch.equal(got, torch.tensor([0.0, -2.0, 2.0, 0.0, -2.0, 0.0, -0.0, 3.0]))


def test_negative_weight_takes_the_general_path():
    """A weight <= 0 can cancel the divisor: TIES then uses elect_sign/disjoint_mean unchanged."""
    deltas = deltas_from(3, 50, 3, "coarse")
    weights = [1.0, -1.0, 1.0]
    base = torch.zeros(50)
    got = M.ties([base + d for d in deltas], weights, base=base, density=0.6)
    trims = [M.magnitude_trim(d.abs(), 0.6) for d in deltas]
    ws = [(d * t.mask(d)) * w for d, t, w in zip(deltas, trims, weights)]
    assert torch.equal(got, M.disjoint_mean(ws, weights, M.elect_sign(ws), True) + base)


@FAST
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.01, 0.1, 0.3, 0.5, 0.9, 0.999, 1 / 3]), st.booleans())
def test_dare_float_mask_is_the_bool_mask_bitwise(seed, density, rescale):
    """`dare_drop` builds its keep mask in float ops; it is `rand < density` exactly."""
    delta = torch.randn(4099, generator=torch.Generator().manual_seed(seed))
    u = torch.rand(delta.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float32)
    want = delta * (u < density).to(delta.dtype)
    if rescale:
        want = want.div_(density)
    got = M.dare_drop(delta, density, torch.Generator().manual_seed(seed + 1), rescale=rescale)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
