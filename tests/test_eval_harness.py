"""The scoring engine on real tiny Llamas: packed scoring is exact, ensembles average
probabilities, cached batched greedy decoding equals the naive loop, truncation counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_llama, make_tokenizer

from dtm.data.template import prompt_ids
from dtm.evaluation.harness import (
    Scorer,
    generate_greedy,
    load_scorer,
    pack_rows,
    packed_length,
    packed_mask,
    rolling_windows,
    score_choices,
    score_packed,
    score_separate,
    score_texts,
    truncate_mc,
)
from dtm.evaluation.runner import encode_mc, run_task
from dtm.evaluation.tasks import load_task


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two tiny Llamas with different weights (and one with 32 positions), saved with a tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tok = make_tokenizer()
    dirs = {}
    for name, kwargs in {"a": dict(seed=0), "b": dict(seed=1)}.items():
        model = make_llama(**kwargs)
        with torch.no_grad():  # sharper distributions than the default init, so choices differ clearly
            model.lm_head.weight.mul_(20)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    short = make_llama(seed=2)
    short.config.max_position_embeddings = 32
    short.save_pretrained(root / "short")
    tok.save_pretrained(root / "short")
    dirs["short"] = root / "short"
    return dirs


@pytest.fixture(scope="module")
def scorer_a(model_dirs):
    return load_scorer(model_dirs["a"], device="cpu")


def naive_logprob(model, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx) from one plain forward over ctx + cont."""
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    return float(sum(logits[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def questions(seed: int = 0, n: int = 5) -> list[tuple[list[int], list[list[int]]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(2, 12, (1,), generator=g))
        ctx = torch.randint(4, 380, (L,), generator=g).tolist()
        choices = [torch.randint(4, 380, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(int(torch.randint(1, 5, (1,), generator=g)))]
        out.append((ctx, choices))
    return out


def test_packed_mask_by_hand():
    # context of 2, choice 1 of 2 tokens, choice 2 of 1 token, one pad
    mask = packed_mask(torch.tensor([[0, 0, 1, 1, 2, -1]]), torch.float32)[0, 0] == 0
    expect = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expect)


def test_packed_and_per_choice_scoring_equal_a_plain_forward(scorer_a):
    items = questions()
    assert scorer_a.share_context  # the probe accepted Llama's 4D masks
    packed = score_packed(scorer_a, items)
    model = scorer_a.models[0]
    for (ctx, choices), got in zip(items, packed, strict=True):
        want = [naive_logprob(model, ctx, c) for c in choices]
        assert got == pytest.approx(want, abs=1e-4)
        assert score_separate(scorer_a, [(ctx, c) for c in choices]) == pytest.approx(want, abs=1e-4)


def test_pack_rows_fills_rows_first_fit_decreasing():
    lengths = [5, 9, 2, 4, 9, 1, 12]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # every item once
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows if len(r) > 1)
    assert rows == [[6], [1, 5], [4], [0, 3], [2]]  # by hand: 12 alone (too long), 9+1, 9, 5+4, 2
    assert pack_rows(lengths, 10) == rows  # deterministic


def test_several_questions_in_one_row_score_as_one_row_each(scorer_a):
    """Padding-free packing: questions sharing a row see only themselves; and score_choices
    with packing on gives the per-question scores of packing off (and of a plain forward)."""
    items = questions(seed=5, n=7)
    alone = score_packed(scorer_a, items)
    together = score_packed(scorer_a, items, rows_of=[[0, 3, 6], [1, 2], [4, 5]])
    for a, b in zip(alone, together, strict=True):
        assert b == pytest.approx(a, abs=1e-5)
    model = scorer_a.models[0]
    ctx, choices = items[3]
    assert together[3] == pytest.approx([naive_logprob(model, ctx, c) for c in choices], abs=1e-4)
    lengths = [packed_length(c, ch) for c, ch in items]
    assert len(pack_rows(lengths, max(lengths))) < len(items)  # rows really are shared here
    scorer_a.pack_questions = False
    try:
        unpacked = score_choices(scorer_a, items, batch_size=3)
    finally:
        scorer_a.pack_questions = True
    for a, b in zip(unpacked, score_choices(scorer_a, items, batch_size=3), strict=True):
        assert b == pytest.approx(a, abs=1e-5)


def test_ensemble_averages_probabilities(model_dirs, scorer_a):
    ens = load_scorer([model_dirs["a"], model_dirs["b"]], device="cpu")
    single_b = load_scorer(model_dirs["b"], device="cpu")
    ctx, choices = questions(seed=3, n=1)[0]
    got = score_packed(ens, [(ctx, choices)])[0]
    for choice, value in zip(choices, got, strict=True):
        want = 0.0
        for i, t in enumerate(choice):  # per token: log((p_a + p_b) / 2)
            prefix = ctx + choice[:i]
            pa = score_separate(scorer_a, [(prefix, [t])])[0]
            pb = score_separate(single_b, [(prefix, [t])])[0]
            want += float(torch.logsumexp(torch.tensor([pa, pb]), 0)) - float(torch.log(torch.tensor(2.0)))
        assert value == pytest.approx(want, abs=1e-4)
    same = load_scorer([model_dirs["a"], model_dirs["a"]], device="cpu")
    assert score_packed(same, [(ctx, choices)])[0] == pytest.approx(score_packed(scorer_a, [(ctx, choices)])[0], abs=1e-5)


def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_batched_cached_greedy_equals_naive_loop(scorer_a):
    tok = scorer_a.tokenizer
    prompts = [tok("the cat")["input_ids"], tok("What is the capital of France?")["input_ids"], tok("1 2")["input_ids"]]
    scorer_a.stop_token_ids = set()  # no early stop: compare full continuations
    try:
        outs = generate_greedy(scorer_a, prompts, max_new_tokens=6, batch_size=3)
    finally:
        scorer_a.stop_token_ids = {tok.eos_token_id}
    for p, out in zip(prompts, outs, strict=True):
        assert out == tok.decode(naive_greedy(scorer_a.models[0], p, 6), skip_special_tokens=True)


def test_generation_stops_at_eos_and_stop_strings(scorer_a):
    tok = scorer_a.tokenizer
    prompt = tok("the cat")["input_ids"]
    first = naive_greedy(scorer_a.models[0], prompt, 4)
    scorer_a.stop_token_ids = {first[0]}  # the model's first greedy token plays EOS
    try:
        assert generate_greedy(scorer_a, [prompt], max_new_tokens=4) == [""]
    finally:
        scorer_a.stop_token_ids = {tok.eos_token_id}
    scorer_a.stop_token_ids = set()
    try:
        full = generate_greedy(scorer_a, [prompt], max_new_tokens=4)[0]
        stop = full[2:4]
        if stop:
            cut = generate_greedy(scorer_a, [prompt], max_new_tokens=4, stop=[stop])[0]
            assert cut == full[: full.find(stop)]
    finally:
        scorer_a.stop_token_ids = {tok.eos_token_id}


def test_encoding_follows_lm_eval_and_training(tmp_path, scorer_a):
    tok = scorer_a.tokenizer
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "1", "question": "the cat", "choices": ["sat", "mat"], "answer": 0}) + "\n")
    plain = load_task(tmp_path / "d.jsonl")
    ctx, choices = encode_mc(plain, tok, plain.rows)[0]
    # lm-eval: context = tok("Question: the cat\nAnswer:") with the tokenizer's BOS; choice = rest of the whole
    assert ctx == tok("Question: the cat\nAnswer:")["input_ids"] and ctx[0] == tok.bos_token_id
    assert choices[0] == tok("Question: the cat\nAnswer: sat")["input_ids"][len(ctx):]
    (tmp_path / "a.yaml").write_text("name: a\ndata: d.jsonl\nprompt_format: alpaca\n")
    alpaca = load_task(tmp_path / "a.yaml")
    ctx, choices = encode_mc(alpaca, tok, alpaca.rows)[0]
    assert ctx == prompt_ids(tok, "the cat", "alpaca")
    assert choices == [tok("sat", add_special_tokens=False)["input_ids"], tok("mat", add_special_tokens=False)["input_ids"]]
    (tmp_path / "c.yaml").write_text("name: c\ndata: d.jsonl\nprompt_format: chat\n")
    chat = load_task(tmp_path / "c.yaml")
    assert encode_mc(chat, tok, chat.rows)[0][0] == prompt_ids(tok, "the cat", "chat")


def test_truncation_from_the_left_is_counted(tmp_path, model_dirs):
    short = load_scorer(model_dirs["short"], device="cpu")
    assert short.max_length == 32
    ctx, choices, cut = truncate_mc(list(range(40)), [[1, 2, 3], [4]], 32)
    assert cut and ctx == list(range(11, 40)) and len(ctx) + 3 == 32
    rows = [{"id": str(i), "question": "the cat sat on the mat. " * (i * 4), "choices": ["Paris", "mat"], "answer": 1} for i in range(4)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, _ = run_task(short, load_task(tmp_path / "long.jsonl"), progress=False)
    assert result["counts"]["items"] == 4 and 1 <= result["counts"]["truncated"] <= 3
    gen_rows = [{"id": str(i), "prompt": "What is the capital of France? " * (i * 3), "answer": "Paris"} for i in range(3)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen_rows))
    (tmp_path / "g.yaml").write_text("name: g\ntype: generate\ndata: g.jsonl\nmax_new_tokens: 8\n")
    result, samples = run_task(short, load_task(tmp_path / "g.yaml"), progress=False)
    assert result["counts"]["truncated"] >= 1 and len(samples) == 3


def test_rolling_windows_and_perplexity(scorer_a):
    assert rolling_windows([5, 6, 7, 8, 9], prefix_id=1, max_length=2) == [([1, 5], [5, 6]), ([6, 7], [7, 8]), ([8], [9])]
    toks = list(range(10, 20))
    total = score_texts(scorer_a, [toks], batch_size=4)[0]
    assert total == pytest.approx(naive_logprob(scorer_a.models[0], [scorer_a.prefix_id], toks), abs=1e-4)


def test_probe_falls_back_when_4d_masks_are_ignored(scorer_a):
    class IgnoresMask(torch.nn.Module):  # a real model whose forward drops custom masks and positions
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
            if attention_mask is not None and attention_mask.dim() == 4:
                attention_mask = None
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

    from dtm.evaluation.harness import probe_packing

    wrapped = Scorer([IgnoresMask(scorer_a.models[0])], scorer_a.tokenizer, scorer_a.device, scorer_a.max_length, ["x"])
    assert probe_packing(wrapped) is False
    assert probe_packing(scorer_a) is True


def test_scorer_rejects_mismatched_ensembles(tmp_path, model_dirs):
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    make_llama(vocab_size=500).save_pretrained(other)
    tok = make_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    assert isinstance(tok, PreTrainedTokenizerFast)
    from dtm.errors import DtmError

    with pytest.raises(DtmError, match="tokenizer differs"):
        load_scorer([model_dirs["a"], other])
    with pytest.raises(DtmError, match="not a model directory"):
        load_scorer(Path(tmp_path / "nothing"))


def test_bulk_encoding_equals_the_tokenizer_call(scorer_a):
    from dtm.evaluation.runner import _encode

    tok = scorer_a.tokenizer
    texts = ["the cat sat", " What is the capital of France?\n", "1 2 3 ###", "é ü 字"]
    for special in (True, False):
        assert _encode(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]


# ---------------------------------------------------------------- refused models


def _broken_model(root: Path, kind: str) -> Path:
    """A pico Llama with one NaN weight, all weights NaN, or one inf weight."""
    model = make_llama(seed=0)
    with torch.no_grad():
        if kind == "one_nan":
            model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
        elif kind == "all_nan":
            for p in model.parameters():
                p.fill_(float("nan"))
        else:
            model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    d = root / kind
    model.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["one_nan", "all_nan", "one_inf"])
def test_non_finite_model_is_never_an_accuracy(tmp_path, kind):
    from dtm.errors import DtmError
    from dtm.evaluation import evaluate

    d = _broken_model(tmp_path, kind)
    rows = [{"id": f"q{i}", "question": f"the cat sat {i}", "choices": ["on the mat", "Paris", "1 2"], "answer": 0} for i in range(4)]
    (tmp_path / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DtmError, match=rf"{kind}.*task 'quiz'.*non-finite.*item 'q\d'"):
        evaluate(d, [tmp_path / "quiz.jsonl"], progress=False, device="cpu")
    gen = [{"id": f"g{i}", "prompt": "the cat", "answer": "sat"} for i in range(2)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (tmp_path / "gen.yaml").write_text("name: gen\ntype: generate\ndata: g.jsonl\nprompt_format: alpaca\nmax_new_tokens: 3\n")
    with pytest.raises(DtmError, match=rf"{kind}.*task 'gen'.*non-finite.*item 'g\d'.*step 1"):
        evaluate(d, [tmp_path / "gen.yaml"], progress=False, device="cpu")


def test_a_tokenizer_larger_than_the_embedding_is_refused_at_load(tmp_path):
    from dtm.errors import DtmError

    d = tmp_path / "small-vocab"
    make_llama(vocab_size=256).save_pretrained(d)
    make_tokenizer().save_pretrained(d)  # 373 tokens
    with pytest.raises(DtmError, match=r"small-vocab.*tokenizer has \d+ tokens.*256 embedding rows"):
        load_scorer(d, device="cpu")
