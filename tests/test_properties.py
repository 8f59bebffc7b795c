"""Property-based tests (hypothesis): the merge maths and the loss masks, on random inputs.

Tensors are drawn from a seed and a shape (cheaper to shrink than arrays of floats); equality
is exact where the maths is exact (a mask, a sign, a count) and to float64 rounding where a
sum is reordered (a permutation of the models).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CHAT_TEMPLATE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtm.data.formats import Conversation, Message
from dtm.data.template import ALPACA_PROMPT, ALPACA_TURN, IGNORE_INDEX, tokenize_conversation
from dtm.merging.lora import concat_adapters, lora_delta, lora_scale, svd_truncate
from dtm.merging.methods import (
    average,
    dare_drop,
    dare_linear,
    elect_sign,
    fisher,
    keep_count,
    magnitude_trim,
    task_arithmetic,
    ties,
    trim,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
seeds = st.integers(0, 2**31 - 1)
weight_lists = st.lists(st.floats(0.1, 4.0), min_size=2, max_size=5)


def draw(seed: int, shape: tuple[int, ...], k: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(k)]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- averages


@FAST
@given(seeds, shapes, weight_lists)
def test_merging_identical_models_gives_the_model(seed, shape, weights):
    x, base = draw(seed, shape, 2)
    models = [x.clone() for _ in weights]
    assert close(average(models, weights), x)
    assert close(task_arithmetic(models, weights, base, normalize=True), x)
    assert close(ties([m.clone() for m in models], weights, base, density=1.0, normalize=True), x)
    assert close(dare_linear(models, weights, base, density=1.0, normalize=True), x)
    fishers = [t.abs() + 0.1 for t in draw(seed + 1, shape, len(weights))]
    assert close(fisher(models, weights, fishers=fishers), x)


@FAST
@given(seeds, shapes, weight_lists, st.randoms(use_true_random=False), st.floats(0.2, 1.0))
def test_merges_do_not_depend_on_the_order_of_the_models(seed, shape, weights, rnd, density):
    k = len(weights)
    models, base = draw(seed, shape, k), draw(seed + 1, shape)[0]
    fishers = [t.abs() + 0.1 for t in draw(seed + 2, shape, k)]
    order = list(range(k))
    rnd.shuffle(order)

    def perm(xs):
        return [xs[i].clone() if isinstance(xs[i], torch.Tensor) else xs[i] for i in order]

    assert close(average(perm(models), perm(weights)), average(models, weights))
    assert close(task_arithmetic(perm(models), perm(weights), base, scaling=0.7),
                 task_arithmetic(models, weights, base, scaling=0.7))
    assert close(fisher(perm(models), perm(weights), fishers=perm(fishers)), fisher(models, weights, fishers=fishers))
    assert close(ties(perm(models), perm(weights), base, density=density), ties([m.clone() for m in models], weights, base, density=density))


# ---------------------------------------------------------------- TIES


@FAST
@given(seeds, shapes, st.floats(0.0, 1.0), st.booleans())
def test_trim_keeps_exactly_the_largest_fraction(seed, shape, density, with_ties):
    (delta,) = draw(seed, shape)
    if with_ties:
        delta = torch.round(delta * 2) / 2  # equal magnitudes at the threshold: broken by position
    mask = magnitude_trim(delta.abs().reshape(-1), density).mask(delta.reshape(-1)).reshape(delta.shape)
    kept = trim(delta, density)
    assert kept.shape == delta.shape
    assert int(mask.sum()) == keep_count(delta.numel(), density)
    assert torch.equal(kept, torch.where(mask, delta, torch.zeros_like(delta)))
    if mask.any() and (~mask).any():
        assert delta[mask].abs().min() >= delta[~mask].abs().max()  # nothing dropped is larger than what is kept


@FAST
@given(seeds, shapes, st.integers(2, 5), st.floats(0.1, 1.0))
def test_ties_moves_each_entry_only_in_its_elected_sign(seed, shape, k, density):
    models, base = draw(seed, shape, k), draw(seed + 1, shape)[0]
    weights = [1.0] * k
    trimmed = [trim(m - base, density) for m, density in zip(models, [density] * k)]
    sign = elect_sign(trimmed)
    assert torch.equal(sign, torch.where(sum(trimmed) >= 0, 1.0, -1.0).to(sign.dtype))
    merged = ties([m.clone() for m in models], weights, base, density=density) - base
    assert merged.shape == base.shape
    assert bool((merged * sign >= 0).all())  # zero or the elected sign, never against it
    agreeing = [torch.where(torch.sign(t) == sign, t, torch.zeros_like(t)) for t in trimmed]
    lo = torch.stack(agreeing).abs().max(0).values
    assert bool((merged.abs() <= lo + 1e-12).all())  # a mean of agreeing deltas: no larger than the largest


# ---------------------------------------------------------------- DARE


@FAST
@given(seeds, st.floats(0.05, 0.95), st.booleans())
def test_dare_keeps_about_density_and_rescales_the_survivors(seed, density, rescale):
    (delta,) = draw(seed, (4000,))
    out = dare_drop(delta, density, torch.Generator().manual_seed(seed), rescale=rescale)
    kept = out != 0
    n = delta.numel()
    sd = math.sqrt(n * density * (1 - density))
    assert abs(int(kept.sum()) - n * density) <= 6 * sd  # a binomial draw: six sigma
    expected = delta / density if rescale else delta
    assert torch.equal(out[kept], expected[kept])
    again = dare_drop(delta, density, torch.Generator().manual_seed(seed), rescale=rescale)
    assert torch.equal(out, again)  # the mask is the generator's


# ---------------------------------------------------------------- LoRA


@FAST
@given(seeds, st.integers(1, 3), st.integers(2, 7), st.integers(2, 7), st.lists(st.integers(1, 4), min_size=1, max_size=4),
       st.data())
def test_concatenated_adapters_equal_the_dense_sum_of_deltas(seed, _, out_dim, in_dim, ranks, data):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, in_dim, generator=g, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(out_dim, r, generator=g, dtype=torch.float64) for r in ranks]
    weights = data.draw(st.lists(st.floats(0.1, 2.0), min_size=len(ranks), max_size=len(ranks)))
    alphas = data.draw(st.lists(st.integers(1, 32), min_size=len(ranks), max_size=len(ranks)))
    scales = [lora_scale(a, r) for a, r in zip(alphas, ranks)]
    dense = sum(w * lora_delta(a, b, s) for w, a, b, s in zip(weights, As, Bs, scales))
    a, b = concat_adapters(As, Bs, [w * s for w, s in zip(weights, scales)])
    assert a.shape == (sum(ranks), in_dim) and b.shape == (out_dim, sum(ranks))
    assert close(lora_delta(a, b, 1.0), dense)
    na, nb, error = svd_truncate(a, b, sum(ranks))  # a rank that loses nothing
    assert error == pytest.approx(0.0, abs=1e-6) and close(nb @ na, dense)


# ---------------------------------------------------------------- loss masks

# letters, digits, punctuation, whitespace, accents, CJK and an emoji: what BPE merges and byte fallback meet
ALPHABET = "abcdefxyz ABZ0129.,:?!-#'\"\n\t\u00e9\u00fc\u00df\u4e2d\u6587\U0001f600"
texts = st.text(ALPHABET, min_size=1, max_size=24).filter(lambda t: t.strip())
turns = st.lists(st.tuples(texts, texts), min_size=1, max_size=3)


def conv(pairs, system=None) -> Conversation:
    msgs = [Message("system", system)] if system else []
    for user, assistant in pairs:
        msgs += [Message("user", user), Message("assistant", assistant)]
    return Conversation(msgs, id="x")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@FAST
@given(turns, st.booleans())
def test_alpaca_labels_are_exactly_the_response_tokens(tokenizer, pairs, first_turn_only):
    example, _ = tokenize_conversation(conv(pairs), tokenizer, "alpaca", cutoff_len=10_000, first_turn_only=first_turn_only)
    used = pairs[:1] if first_turn_only else pairs
    check_mask(example, [encode(tokenizer, a) + [tokenizer.eos_token_id] for _, a in used],
               [[tokenizer.bos_token_id] + encode(tokenizer, ALPACA_PROMPT.format(instruction=used[0][0]))]
               + [encode(tokenizer, "\n\n" + ALPACA_TURN.format(instruction=u)) for u, _ in used[1:]])


@FAST
@given(turns, st.booleans(), st.one_of(st.none(), texts))
def test_chat_labels_are_exactly_the_response_tokens(tokenizer, pairs, first_turn_only, system):
    assert tokenizer.chat_template == CHAT_TEMPLATE  # the oracle below spells this template's turns
    example, _ = tokenize_conversation(conv(pairs, system), tokenizer, "chat", cutoff_len=10_000, first_turn_only=first_turn_only)
    used = pairs[:1] if first_turn_only else pairs
    head = "<s>" + (f"<|system|>\n{system}<|end|>\n" if system else "")
    prompts = [encode(tokenizer, (head if i == 0 else "") + f"<|user|>\n{u}<|end|>\n<|assistant|>\n") for i, (u, _) in enumerate(used)]
    check_mask(example, [encode(tokenizer, f"{a}<|end|>\n") for _, a in used], prompts)


def check_mask(example, responses: list[list[int]], prompts: list[list[int]]) -> None:
    """The example is prompt_1 response_1 prompt_2 response_2 ..., labelled -100 exactly on the prompts."""
    expected_ids = [t for p, r in zip(prompts, responses) for t in p + r]
    expected_labels = [t for p, r in zip(prompts, responses) for t in [IGNORE_INDEX] * len(p) + r]
    assert example["input_ids"] == expected_ids
    assert example["labels"] == expected_labels
    assert example["attention_mask"] == [1] * len(expected_ids)


@FAST
@given(turns, st.integers(1, 60))
def test_truncation_cuts_ids_and_labels_together(tokenizer, pairs, cutoff):
    whole, _ = tokenize_conversation(conv(pairs), tokenizer, "alpaca", cutoff_len=10_000, first_turn_only=False)
    cut, truncated = tokenize_conversation(conv(pairs), tokenizer, "alpaca", cutoff_len=cutoff, first_turn_only=False)
    assert truncated == (len(whole["input_ids"]) > cutoff)
    if cut is None:  # nothing to train on is left: every kept label was -100
        assert all(label == IGNORE_INDEX for label in whole["labels"][:cutoff])
    else:
        assert cut["input_ids"] == whole["input_ids"][:cutoff] and cut["labels"] == whole["labels"][:cutoff]
