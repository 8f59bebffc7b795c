"""Few-shot prefix caching: a shared prefix run once from a KV cache scores and generates
exactly what scoring every prompt whole does (pico Llamas; the real model in tests/real/)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_llama, make_tokenizer

from dtm.evaluation.harness import (
    encode_prefix,
    generate_greedy,
    load_scorer,
    prefix_groups,
    score_choices,
    score_packed,
    score_separate,
)


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """One pico Llama (sharpened so greedy outputs vary), an ensemble of two, each with and without the cache."""
    root = tmp_path_factory.mktemp("prefix")
    tok = make_tokenizer()
    for seed in (0, 1):
        model = make_llama(seed=seed)
        with torch.no_grad():
            model.lm_head.weight.mul_(20)
        model.save_pretrained(root / f"m{seed}")
        tok.save_pretrained(root / f"m{seed}")
    single = load_scorer(root / "m0", device="cpu")
    ensemble = load_scorer([root / "m0", root / "m1"], device="cpu")
    return {"single": single, "ensemble": ensemble}


def few_shot_items(seed: int, groups: int = 3, per_group: int = 5) -> list[tuple[list[int], list[list[int]]]]:
    """Questions whose contexts share one prefix per group (40-60 tokens), with 1-4 choices of 1-5 tokens."""
    g = torch.Generator().manual_seed(seed)

    def rand(lo: int, hi: int) -> list[int]:
        return torch.randint(4, 380, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    items = []
    for _ in range(groups):
        shared = rand(40, 60)
        for _ in range(per_group):
            choices = [rand(1, 6) for _ in range(int(torch.randint(1, 5, (1,), generator=g)))]
            items.append((shared + rand(1, 12), choices))
    items.append((rand(5, 20), [rand(1, 4), rand(1, 4)]))  # one question with no shared prefix
    return items


def test_prefix_groups_share_a_prefix_and_leave_every_member_a_token():
    a = list(range(100, 140))
    seqs = [a + [1, 2], a + [3], [9] * 50, a + [1], a[:20] + [7] * 30]
    groups = prefix_groups(seqs, min_prefix=32)
    assert sorted(i for _, m in groups for i in m) == list(range(len(seqs)))  # a partition
    shared = {tuple(m): n for n, m in groups}
    assert shared[(0, 1, 3)] == 40  # a + [1] keeps its 41st token of its own
    assert shared[(2, 4)] == 0  # no long shared prefix: scored without a cache
    assert prefix_groups([a, a], min_prefix=32) == [(39, [0, 1])]  # identical prompts keep one token each


@pytest.mark.parametrize("kind", ["single", "ensemble"])
def test_cached_prefix_scores_equal_whole_contexts(scorers, kind):
    on = scorers[kind]
    off = dataclasses.replace(on, prefix_cache=False)
    items = few_shot_items(seed=1)
    assert {n > 0 for n, _ in prefix_groups([c for c, _ in items])} == {True, False}  # both paths run
    cached = score_choices(on, items, batch_size=4)
    whole = score_choices(off, items, batch_size=4)
    for got, want in zip(cached, whole, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    if kind == "single":  # and both equal lm-eval's layout, one row per (context, choice)
        for (ctx, choices), got in zip(items, cached, strict=True):
            assert got == pytest.approx(score_separate(off, [(ctx, c) for c in choices]), abs=1e-4)


def test_a_choice_without_tokens_scores_zero_and_leaves_the_others_alone(scorers):
    scorer = scorers["single"]
    ctx, choices = [5, 6, 7, 8], [[9, 10], [11]]
    got = score_packed(scorer, [(ctx, [[], *choices]), (ctx + [12, 13, 14], choices)])
    assert got[0][0] == 0.0
    assert got[0][1:] == pytest.approx(score_packed(scorer, [(ctx, choices)])[0], abs=1e-5)


def test_score_packed_with_a_prefix_continues_it(scorers):
    scorer = scorers["single"]
    items = few_shot_items(seed=2, groups=1, per_group=4)[:4]
    prefix = encode_prefix(scorer, items[0][0][:40])
    assert prefix is not None and prefix.length == 40
    got = score_packed(scorer, [(c[40:], ch) for c, ch in items], prefix)
    for row, want in zip(got, score_packed(scorer, items), strict=True):
        assert row == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("kind", ["single", "ensemble"])
def test_cached_prefix_generation_equals_whole_prompts(scorers, kind):
    on = scorers[kind]
    off = dataclasses.replace(on, prefix_cache=False, stop_token_ids=set())
    on = dataclasses.replace(on, stop_token_ids=set())  # no early stop: compare full continuations
    prompts = [ctx for ctx, _ in few_shot_items(seed=3)]
    cached = generate_greedy(on, prompts, max_new_tokens=8, batch_size=4)
    whole = generate_greedy(off, prompts, max_new_tokens=8, batch_size=4)
    assert cached == whole
    assert len(set(cached)) > 3  # the outputs differ between prompts: the comparison can fail
