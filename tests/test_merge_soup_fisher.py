"""Greedy soup with a real score (a tiny model's loss on fixed tokens) and the Fisher computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import dtm
from dtm.cli import main
from dtm.data.formats import load_texts
from dtm.errors import DataError
from dtm.fisher import compute_fisher

torch.set_num_threads(1)
CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def soup_world(tmp_path_factory):
    """A peaked 'true' model T, tokens sampled from it, and candidates T + noise (one very noisy)."""
    root = tmp_path_factory.mktemp("soup")
    torch.manual_seed(0)
    truth = LlamaForCausalLM(LlamaConfig(**CFG))
    with torch.no_grad():
        truth.lm_head.weight.mul_(40)  # confident predictions, so the data says something
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 64, (8, 1), generator=g)]
    with torch.no_grad():
        for _ in range(24):
            probs = truth(torch.cat(seqs, 1)).logits[:, -1].softmax(-1)
            seqs.append(torch.multinomial(probs, 1, generator=g))
    tokens = torch.cat(seqs, 1)
    state = truth.state_dict()
    dirs = []
    for i, sigma in enumerate([0.02, 0.02, 0.4, 0.02]):  # candidate 2 is ruined
        noisy = LlamaForCausalLM(LlamaConfig(**CFG))
        gen = torch.Generator().manual_seed(100 + i)
        noisy.load_state_dict({k: v + sigma * torch.randn(v.shape, generator=gen) * (v.std() if v.numel() > 1 else 1) for k, v in state.items()})
        noisy.save_pretrained(root / f"c{i}")
        dirs.append(root / f"c{i}")
    return dirs, tokens


def neg_loss(tokens: torch.Tensor):
    calls = []

    def score(path: Path) -> float:
        calls.append(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            return -float(model(input_ids=tokens, labels=tokens).loss)

    return score, calls


def test_greedy_soup_skips_the_bad_ingredient(soup_world, tmp_path):
    dirs, tokens = soup_world
    score, calls = neg_loss(tokens)
    out = dtm.merge(dirs, tmp_path / "soup", method="greedy_soup", score_fn=score, progress=False)
    rec = json.loads((out / "dtm_merge.json").read_text())
    assert rec["method"] == "greedy_soup"
    assert str(dirs[2]) not in rec["soup"] and len(rec["soup"]) >= 2
    singles = {t["model"]: t["score_alone"] for t in rec["trace"]}
    assert rec["score"] >= max(singles.values())
    # the recorded score is the final model's real score
    assert score(out) == pytest.approx(rec["score"], abs=1e-6)
    # the trace is greedy: sorted by single score, a model is added iff the soup did not get worse
    assert [t["model"] for t in rec["trace"]] == sorted(singles, key=singles.get, reverse=True)
    best = rec["trace"][0]["soup_score"]
    for t in rec["trace"][1:]:
        assert t["added"] == (t["soup_score"] >= best)
        best = max(best, t["soup_score"]) if t["added"] else best
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # candidate soups cleaned up


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(63)} | {"<unk>": 63}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def test_fisher_is_mean_squared_gradient(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**CFG, "tie_word_embeddings": True}))
    model.save_pretrained(tmp_path / "m")
    save_tokenizer(tmp_path / "m")
    texts = ["w1 w2 w3 w4 w5", "w9 w8 w7 w6 w5 w4 w3"]
    f = compute_fisher(tmp_path / "m", texts)
    assert f == tmp_path / "m" / "fisher.safetensors"
    # by hand: the mean over texts of the squared gradient of -log p(text)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "m")
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        model.zero_grad()
        logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum()
        (-logp).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad**2 / len(texts)
    with safe_open(f, "pt") as h:
        assert set(h.keys()) == set(expected) and h.metadata()["examples"] == "2"
        for n in expected:
            assert torch.allclose(h.get_tensor(n), expected[n], rtol=1e-4, atol=1e-12), n
    # and it plugs into the Fisher merge (tied lm_head resolves to the embedding's Fisher)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**{**CFG, "tie_word_embeddings": True})).save_pretrained(tmp_path / "m2")
    save_tokenizer(tmp_path / "m2")
    (tmp_path / "data.txt").write_text("\n".join(texts) + "\n")
    assert main(["fisher", str(tmp_path / "m2"), "--data", str(tmp_path / "data.txt")]) == 0
    out = dtm.merge([tmp_path / "m", tmp_path / "m2"], tmp_path / "fm", method="fisher", progress=False)
    a, b, m = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (tmp_path / "m", tmp_path / "m2", out))
    w = "model.layers.0.mlp.up_proj.weight"
    lo, hi = torch.minimum(a[w], b[w]), torch.maximum(a[w], b[w])
    assert torch.all((m[w] >= lo - 1e-6) & (m[w] <= hi + 1e-6)) and not torch.allclose(m[w], (a[w] + b[w]) / 2)


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n{"instruction": "do", "output": "done"}\n'
                                      '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    assert load_texts(tmp_path / "a.jsonl") == ["hello", "do\ndone", "q\na"]
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: expected a record with a string field `text`"):
        load_texts(tmp_path / "b.jsonl")
