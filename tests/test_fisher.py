"""The one diagonal-Fisher estimator (`dtm.fisher`): against log-likelihoods computed by hand,
on response-only labels, and on a LoRA adapter directory (merged into its base)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama
from safetensors import safe_open

from dtm.data.template import IGNORE_INDEX
from dtm.errors import DataError
from dtm.fisher import FISHER_FILE, compute_fisher, diagonal_fisher

torch.set_num_threads(1)


def log_likelihood(model: torch.nn.Module, example: dict) -> torch.Tensor:
    """sum over labelled positions t >= 1 of log p(x_t | x_<t), from the logits directly."""
    ids = torch.tensor([example["input_ids"]])
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    labels = torch.tensor(example["labels"][1:])
    keep = labels != IGNORE_INDEX
    return logp[keep].gather(1, labels[keep, None]).sum()


def response_only(ids: list[int], prompt: int) -> dict:
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


EXAMPLES = [
    response_only([1, 5, 9, 13, 17, 21, 2], 3),
    response_only([1, 40, 41, 42, 2], 2),
    response_only([1, 7, 8], 3),  # nothing to predict: skipped, not counted
    {"input_ids": [1, 30, 31, 32, 33, 2], "labels": [1, 30, 31, 32, 33, 2]},  # plain text: every token
]


def test_diagonal_fisher_is_the_mean_squared_gradient_of_each_examples_log_likelihood():
    model = make_llama(seed=4)
    model.train()
    params = {n: p for n, p in model.named_parameters() if "layers.1" in n or n == "lm_head.weight"}
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # restored as it was
    got = diagonal_fisher(model, EXAMPLES, params)
    assert model.training and not model.model.layers[1].mlp.up_proj.weight.requires_grad
    used = [e for e in EXAMPLES if any(t != IGNORE_INDEX for t in e["labels"][1:])]
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for p in params.values():
        p.requires_grad_(True)
    for e in used:
        grads = torch.autograd.grad(log_likelihood(model, e), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            expected[n] += g.pow(2) / len(used)
    assert set(got) == set(params)
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-10)
    assert float(got["lm_head.weight"].sum()) > 0


def lora_world(tmp_path, tokenizer):
    """A saved base and a LoRA adapter on it (B non-zero), plus the merged dense model saved apart."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tmp_path / "base"
    make_llama(seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = get_peft_model(make_llama(seed=0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], lora_dropout=0.0))
    torch.manual_seed(9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.peft_config["default"].base_model_name_or_path = str(base)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    dense = tmp_path / "dense"
    PeftModel.from_pretrained(make_llama(seed=0), adapter).merge_and_unload().save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    return base, adapter, dense


def read(path):
    with safe_open(path, "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}, h.metadata()


def test_a_lora_adapter_gets_the_fisher_of_its_merged_dense_model_under_the_base_names(tmp_path, tokenizer):
    base, adapter, dense = lora_world(tmp_path, tokenizer)
    examples = EXAMPLES  # tokenised SFT-style examples (response-only labels)
    f_adapter = compute_fisher(adapter, examples, progress=False)
    f_dense = compute_fisher(dense, examples, progress=False)
    assert f_adapter == adapter / FISHER_FILE and not list(adapter.glob(".*tmp"))
    got, meta = read(f_adapter)
    want, _ = read(f_dense)
    with safe_open(base / "model.safetensors", "pt") as h:
        base_names = set(h.keys())
    assert set(got) == set(want) == base_names and meta["examples"] == "3"
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-12)
    # and it is the adapter's Fisher, not the base's
    f_base, _ = read(compute_fisher(base, examples, out=tmp_path / "base.safetensors", progress=False))
    assert not torch.allclose(f_base["model.layers.0.self_attn.q_proj.weight"], got["model.layers.0.self_attn.q_proj.weight"])


def test_plain_texts_use_the_adapters_tokenizer_or_its_bases(tmp_path, tokenizer):
    base, adapter, dense = lora_world(tmp_path, tokenizer)
    texts = ["the cat sat on the mat.", "What is the capital of France? Paris."]
    got, meta = read(compute_fisher(adapter, texts, out=tmp_path / "a.safetensors", progress=False))  # no tokenizer beside it
    want, _ = read(compute_fisher(dense, texts, out=tmp_path / "d.safetensors", progress=False))
    assert meta["examples"] == "2"
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-12)
    with pytest.raises(DataError, match="not a mix"):
        compute_fisher(dense, [texts[0], EXAMPLES[0]], progress=False)
    with pytest.raises(DataError, match="no example has a token to predict"):
        compute_fisher(dense, [EXAMPLES[2]], progress=False)
