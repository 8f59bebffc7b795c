"""Merge methods on hand-computed small tensors (every expected number is worked out by hand)."""

from __future__ import annotations

import pytest
import torch

from dtm.merging import methods as M

t = torch.tensor


def test_weighted_average_uniform_and_weighted():
    a, b = t([1.0, 2.0, -4.0]), t([3.0, 0.0, 4.0])
    assert torch.equal(M.average([a, b], [1.0, 1.0]), t([2.0, 1.0, 0.0]))
    # weights 3:1 -> (3a + b) / 4
    assert torch.equal(M.average([a, b], [3.0, 1.0]), t([1.5, 1.5, -2.0]))
    # only the ratio matters
    assert torch.equal(M.average([a, b], [0.75, 0.25]), M.average([a, b], [3.0, 1.0]))


def test_average_does_not_touch_inputs():
    a, b = t([1.0, 2.0]), t([3.0, 4.0])
    M.average([a, b], [1.0, 1.0])
    assert torch.equal(a, t([1.0, 2.0])) and torch.equal(b, t([3.0, 4.0]))


def test_task_arithmetic():
    base = t([1.0, 1.0, 1.0])
    x1, x2 = t([2.0, 1.0, 0.0]), t([1.0, 3.0, 0.0])  # deltas (1,0,-1) and (0,2,-1)
    # base + 0.5 * (d1 + d2) = 1 + 0.5 * (1, 2, -2)
    assert torch.equal(M.task_arithmetic([x1, x2], [1.0, 1.0], base, scaling=0.5), t([1.5, 2.0, 0.0]))
    # weights scale each task vector: base + 1 * (2 d1 + 0 d2)
    assert torch.equal(M.task_arithmetic([x1, x2], [2.0, 0.0], base), t([3.0, 1.0, -1.0]))


def test_wise_ft_interpolates():
    base, tuned = t([0.0, 2.0]), t([4.0, -2.0])
    assert torch.equal(M.wise_ft([tuned], [1.0], base, alpha=0.25), t([1.0, 1.0]))
    assert torch.equal(M.wise_ft([tuned], [1.0], base, alpha=0.0), base)
    assert torch.equal(M.wise_ft([tuned], [1.0], base, alpha=1.0), tuned)


def test_trim_keeps_largest_magnitudes():
    d = t([0.1, -3.0, 0.5, 2.0, -0.2, 1.0])
    assert torch.equal(M.trim(d, 0.5), t([0.0, -3.0, 0.0, 2.0, 0.0, 1.0]))  # top 3 of 6 by |x|
    assert torch.equal(M.trim(d, 1.0), d)
    assert torch.equal(M.trim(d, 0.0), torch.zeros(6))
    assert torch.equal(M.trim(d, 0.01), t([0.0, -3.0, 0.0, 0.0, 0.0, 0.0]))  # at least one survives


def test_elect_sign_by_total_mass_not_by_count():
    # entry 0: two small positives (0.1 + 0.1) lose to one large negative (-1): sign is -1
    # entry 1: all positive; entry 2: sum exactly 0 elects +1
    deltas = t([[0.1, 1.0, 1.0], [0.1, 2.0, -1.0], [-1.0, 0.5, 0.0]])
    assert torch.equal(M.elect_sign(deltas), t([-1.0, 1.0, 1.0]))


def test_disjoint_mean_averages_only_agreeing_models():
    deltas = t([[0.1, 1.0, 0.0], [0.1, 2.0, 0.0], [-1.0, 0.0, 0.0]])
    w = t([1.0, 1.0, 1.0]).reshape(3, 1)
    sign = t([-1.0, 1.0, 1.0])
    # entry 0: only model 3 agrees -> -1; entry 1: models 1,2 agree (model 3 is 0) -> 1.5; entry 2: nobody -> 0
    assert torch.equal(M.disjoint_mean(deltas, w, sign), t([-1.0, 1.5, 0.0]))


def test_ties_end_to_end_by_hand():
    base = t([0.0, 0.0, 0.0, 0.0])
    x1 = t([2.0, -0.1, 1.0, 0.0])
    x2 = t([-3.0, 0.2, 0.0, 1.0])
    x3 = t([2.0, 0.0, -0.5, 3.0])
    # density 0.5 keeps the 2 largest |delta| per model:
    #   d1 -> (2, 0, 1, 0), d2 -> (-3, 0, 0, 1), d3 -> (2, 0, 0, 3)
    # sign by sum: (1, +0 -> +1, 1, 4) -> (+, +, +, +)
    # disjoint mean: e0 (2 + 2) / 2 = 2; e1 none -> 0; e2 1 / 1 = 1; e3 (1 + 3) / 2 = 2
    out = M.ties([x1, x2, x3], [1.0, 1.0, 1.0], base, density=0.5)
    assert torch.equal(out, t([2.0, 0.0, 1.0, 2.0]))
    # lambda scales the merged task vector
    assert torch.equal(M.ties([x1, x2, x3], [1.0, 1.0, 1.0], base, density=0.5, scaling=0.5), t([1.0, 0.0, 0.5, 1.0]))


def test_ties_weighted_matches_mergekit_convention():
    # weighted deltas (w=3,1): d1=3*(1,-1), d2=1*(-1,-1); signs: e0 sum 2 -> +, e1 sum -4 -> -
    # e0: only model 1 agrees: 3 / 3 = 1; e1: both agree: (-3 - 1) / (3 + 1) = -1
    out = M.ties([t([1.0, -1.0]), t([-1.0, -1.0])], [3.0, 1.0], torch.zeros(2), density=1.0)
    assert torch.equal(out, t([1.0, -1.0]))


def test_dare_drop_rescales_survivors():
    g = torch.Generator().manual_seed(0)
    d = torch.full((1000,), 0.5)
    out = M.dare_drop(d, 0.25, g)  # keep 1/4, survivors * 4
    kept = out != 0
    assert torch.all(out[kept] == 2.0)
    assert 150 < int(kept.sum()) < 350  # ~250 of 1000 kept
    # same generator seed -> same mask (a merge is reproducible)
    assert torch.equal(M.dare_drop(d, 0.25, torch.Generator().manual_seed(0)), out)
    assert torch.equal(M.dare_drop(d, 0.25, torch.Generator().manual_seed(0), rescale=False)[kept], d[kept])
    assert torch.equal(M.dare_drop(d, 1.0, g), d)


def test_dare_linear_and_ties_with_full_density_reduce_to_task_arithmetic_and_ties():
    base = t([1.0, -1.0, 0.5])
    xs = [t([2.0, -1.5, 0.5]), t([0.0, -0.5, 1.5])]
    assert torch.allclose(M.dare_linear(xs, [1.0, 1.0], base, density=1.0), M.task_arithmetic(xs, [1.0, 1.0], base))
    assert torch.allclose(M.dare_ties(xs, [1.0, 1.0], base, density=1.0, normalize=True), M.ties(xs, [1.0, 1.0], base, density=1.0))
    # mergekit's default for dare_ties is the sum of the agreeing deltas, not their mean
    assert torch.allclose(M.dare_ties(xs, [1.0, 1.0], base, density=1.0), M.ties(xs, [1.0, 1.0], base, density=1.0, normalize=False))


def test_dare_linear_is_unbiased_on_average():
    base = torch.zeros(20000)
    x = torch.full((20000,), 0.1)
    out = M.dare_linear([x], [1.0], base, density=0.1, generators=[torch.Generator().manual_seed(1)])
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(1.0)))
    assert abs(float(out.mean()) - 0.1) < 0.01


def test_fisher_weighted_average_by_hand():
    x1, x2 = t([1.0, 1.0, 4.0]), t([3.0, 5.0, 0.0])
    f1, f2 = t([1.0, 3.0, 0.0]), t([1.0, 1.0, 0.0])
    # e0: (1*1 + 1*3)/2 = 2; e1: (3*1 + 1*5)/4 = 2; e2: both floored to eps -> plain mean 2
    out = M.fisher([x1, x2], [1.0, 1.0], fishers=[f1, f2])
    assert torch.allclose(out, t([2.0, 2.0, 2.0]))
    # model weights multiply the Fishers: e0 (3*1*1 + 1*1*3) / (3 + 1) = 1.5
    assert torch.allclose(M.fisher([x1, x2], [3.0, 1.0], fishers=[f1, f2])[0], t(1.5))


def test_registry_and_parameters():
    # (the config accepts exactly these names: tests/test_config.py)
    assert M.get_method("linear") is M.METHODS["average"]
    assert {"average", "task_arithmetic", "wise_ft", "ties", "dare_linear", "dare_ties", "fisher", "greedy_soup"} <= set(M.method_names())
    ties = M.get_method("ties")
    assert M.resolve_params(ties, {"density": 0.3, "lambda": 2}) == {"density": 0.3, "scaling": 2.0, "normalize": True}
    assert M.resolve_params(ties, {}) == {"density": 1.0, "scaling": 1.0, "normalize": True}
    assert M.resolve_params(ties, {"density": [0.3, 1]})["density"] == [0.3, 1.0]  # per model, as mergekit allows
    with pytest.raises(ValueError):
        M.resolve_params(ties, {"lambda": [1.0, 2.0]})
    with pytest.raises(KeyError):
        M.resolve_params(ties, {"alpha": 0.5})
    with pytest.raises(ValueError):
        M.resolve_params(M.get_method("dare_linear"), {"rescale": "no"})
    assert M.tensor_seed(0, "a.weight") == M.tensor_seed(0, "a.weight") != M.tensor_seed(0, "b.weight")


def test_trim_ties_at_threshold_keep_exactly_k_first_in_order():
    d = t([1.0, -2.0, 2.0, 0.5, -2.0, 2.0])  # top 3 by |d|: four entries tie at 2
    assert torch.equal(M.trim(d, 0.5), t([0.0, -2.0, 2.0, 0.0, -2.0, 0.0]))
    # the same threshold applied chunk by chunk, in order, keeps the same entries
    thr = M.magnitude_trim(d.abs(), 0.5)
    assert (thr.threshold, thr.ties) == (2.0, 3)
    masks = [thr.mask(c) for c in d.split([2, 1, 3])]
    assert torch.equal(torch.cat(masks), t([0, 1, 1, 0, 1, 0]).bool())


@pytest.mark.parametrize("density", [0.0, 0.003, 0.1, 0.5, 0.97, 1.0])
def test_magnitude_trim_equals_a_stable_descending_sort(density):
    g = torch.Generator().manual_seed(0)
    d = torch.randint(-20, 21, (3001,), generator=g).float() / 4  # many ties
    k = M.keep_count(d.numel(), density)
    order = torch.sort(d.abs(), descending=True, stable=True).indices[:k]
    expected = torch.zeros_like(d)
    expected[order] = d[order]
    assert torch.equal(M.trim(d, density), expected)
    assert int((M.trim(d, density) != 0).sum()) <= k


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_methods_on_chunks_equal_whole_tensor(method):
    """The engine's chunked evaluation (per-model state first) is the whole-tensor function, bitwise."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(999, generator=g)
    xs = [base + torch.randn(999, generator=g) * s for s in (0.1, 0.3, 0.2)]
    spec = M.get_method(method)
    params = M.resolve_params(spec, {k: v for k, v in {"density": [0.3, 0.5, 0.4], "lambda": 0.7}.items() if k in spec.params})
    whole_kw = dict(params)
    if spec.random:
        whole_kw["generators"] = M.model_generators(5, "w", 3)
    whole = spec.fn(xs, [1.0, 2.0, 0.5], base=base, **whole_kw)
    state = {}
    if spec.random:
        state["generators"] = M.model_generators(5, "w", 3)
    if spec.trims:
        state["trims"] = M.ties_trims(xs, base, params["density"])
    cuts = [100, 1, 400, 498]
    starts = [sum(cuts[:i]) for i in range(len(cuts))]
    parts = [spec.fn([x for x in xc], [1.0, 2.0, 0.5], base=bc, **params, **state, **({"offset": s} if spec.random else {}))
             for s, (*xc, bc) in zip(starts, zip(*(x.split(cuts) for x in xs), base.split(cuts)))]
    assert torch.equal(torch.cat(parts), whole)
