"""The chunked loss (LM head only at labelled positions, a chunk of rows at a time) equals the
model's own loss and gradients, for full fine-tuning, LoRA and tied embeddings, and training
with it ends at the weights the plain path reaches."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_llama
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_train_sft import qa_data, tiny_config

from dtm.training import train_model
from dtm.training.batches import pack_batch, pad_batch
from dtm.training.chunked_loss import ENV_SWITCH, Parts, causal_lm_loss, model_parts

torch.set_num_threads(1)


def batches() -> list[dict[str, torch.Tensor]]:
    """A padded and a packed batch with response-only labels (prompt and padding -100)."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (9, 14, 5, 12):
        ids = torch.randint(3, 400, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :], "attention_mask": [1] * n})
    return [pad_batch(examples, 0), pack_batch(examples, 0, row_tokens=24)]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def lora(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"))
    for n, p in peft.named_parameters():  # B starts at zero: move it so the adapters change the loss
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
    return peft


@pytest.mark.parametrize("form", ["full", "tied", "lora_mlp", "lora_head"])
@pytest.mark.parametrize("items", [None, 23])
def test_chunked_loss_and_gradients_equal_the_models_own(form, items):
    model = make_llama(tie=form == "tied").double()  # float64: equality limited by the maths, not rounding
    if form.startswith("lora"):
        model = lora(model, ["gate_proj", "up_proj", "down_proj"] + (["lm_head"] if form == "lora_head" else []))
    parts = model_parts(model)
    assert isinstance(parts, Parts)
    for batch in batches():
        plain = model(**batch, num_items_in_batch=items).loss
        plain.backward()
        want = grads(model)
        chunked = causal_lm_loss(parts, batch, items, chunk_rows=5)  # several chunks, the last one short
        chunked.backward()
        got = grads(model)
        torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
        assert got.keys() == want.keys() and want
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-12)


def test_no_labelled_position_gives_the_plain_paths_zero_with_a_graph():
    model = make_llama()
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100] * 3, "attention_mask": [1] * 3}], 0)
    loss = causal_lm_loss(model_parts(model), batch, num_items_in_batch=4)
    assert float(loss.detach()) == float(model(**batch, num_items_in_batch=4).loss.detach()) == 0.0
    loss.backward()  # a micro-batch without labels must not break gradient accumulation


def test_unknown_structures_keep_the_plain_path_with_a_reason():
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    assert "model type 'gpt2'" in model_parts(gpt2)
    gemma = Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=8, vocab_size=50))
    assert "model type 'gemma2'" in model_parts(gemma)


def trained(base_dir, tmp_path, name: str, finetuning_type: str, monkeypatch, caplog, chunked: bool) -> dict[str, torch.Tensor]:
    monkeypatch.setenv(ENV_SWITCH, "1" if chunked else "0")
    cfg = tiny_config(max_steps=3, save_steps=100, group_by_length=False, finetuning_type=finetuning_type,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2)
    cfg.train.lora.lora_dropout = 0.0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dtm.training.sft"):
        out = train_model(base_dir, qa_data(), tmp_path / name, cfg, progress=False)
    plain_logged = any("the plain path" in r.getMessage() for r in caplog.records)
    assert plain_logged == (not chunked)  # the switch really chose the path
    f = out / ("adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors")
    return load_file(f)


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_training_with_the_chunked_loss_reaches_the_plain_paths_weights(base_dir, tmp_path, monkeypatch, caplog, finetuning_type):
    """Gradient accumulation included (2 micro-batches a step: the num_items_in_batch normalisation)."""
    plain = trained(base_dir, tmp_path, "plain", finetuning_type, monkeypatch, caplog, chunked=False)
    chunked = trained(base_dir, tmp_path, "chunked", finetuning_type, monkeypatch, caplog, chunked=True)
    assert plain.keys() == chunked.keys()
    for k in plain:
        torch.testing.assert_close(chunked[k], plain[k], rtol=1e-4, atol=1e-6)
