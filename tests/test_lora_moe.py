"""The LoRA-MoE baseline (the paper's Table 1): K LoRA experts on the MLP with a learned router.
On a pico Llama: it starts as the base, trains, saves (no pickle, no config.json), reloads to
the trained model's logits exactly, and evaluates through the harness."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama
from test_train_baselines import qa_data, tiny_config
from transformers import TrainerCallback

from dtm.errors import DtmError
from dtm.lora_moe import CONFIG_FILE, WEIGHTS_FILE, LoraMoeLinear, add_experts, mlp_linears

torch.set_num_threads(1)
PROBE = torch.tensor([[1, 5, 9, 33, 70, 2]])


def test_experts_wrap_every_mlp_linear_and_start_as_the_base():
    model = make_llama(seed=1)
    with torch.no_grad():
        before = model(PROBE).logits
    names = add_experts(model, experts=3, r=4, alpha=8)
    assert names == mlp_linears(make_llama()) and len(names) == 6  # gate, up, down x 2 layers
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LoraMoeLinear) and layer.lora_A.shape == (3, 4, 32) and layer.lora_B.shape == (3, 64, 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("router", "lora_A", "lora_B") for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(PROBE).logits, before)  # B = 0: the experts add nothing yet
        # with B set, each token's output is the base plus the router-weighted sum of the experts
        layer.lora_B.normal_()
        layer.router.normal_()
        x = torch.randn(5, 32)
        gates = torch.softmax(x @ layer.router.T, -1)
        expected = layer.base(x) + layer.scaling * sum(gates[:, e:e + 1] * (x @ layer.lora_A[e].T @ layer.lora_B[e].T) for e in range(3))
        assert torch.allclose(layer(x), expected, atol=1e-5)


class KeepLogits(TrainerCallback):
    """The trained model's logits on PROBE, at the end of training (what the reload must give)."""

    logits = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            KeepLogits.logits = model(PROBE.to(model.device)).logits.cpu()


def test_lora_moe_trains_saves_reloads_to_identical_logits_and_evaluates(tmp_path, base_dir):
    from dtm.evaluation import evaluate
    from dtm.evaluation.harness import load_scorer
    from dtm.training import train_baseline

    cfg = tiny_config()
    cfg.disperse.k, cfg.train.lora.r, cfg.train.lora.lora_alpha = 2, 4, 8
    out = train_baseline("lora_moe", cfg, qa_data(), tmp_path / "moe", base=base_dir, progress=False, callbacks=[KeepLogits()])
    assert (out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file() and (out / "training_complete.json").is_file()
    assert not (out / "config.json").exists() and not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    config = json.loads((out / CONFIG_FILE).read_text())
    assert (config["experts"], config["r"], config["lora_alpha"]) == (2, 4, 8) and config["base_model_name_or_path"] == str(base_dir.resolve())
    assert json.loads((out / "training_complete.json").read_text())["steps"] == 6

    scorer = load_scorer(out, device="cpu")
    with torch.no_grad():
        reloaded = scorer.models[0](PROBE).logits
        base = load_scorer(base_dir, device="cpu").models[0](PROBE).logits
    assert torch.equal(reloaded, KeepLogits.logits)
    assert not torch.allclose(reloaded, base, atol=1e-4)  # the experts learned something
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps({"id": str(i), "question": f"What is {i} + {i}?", "choices": [f"{2 * i}", f"{2 * i + 1}"], "answer": 0}) + "\n"
                            for i in range(6)))
    result = evaluate(out, [task], progress=False)["mc"]
    assert result["counts"]["items"] == 6 and 0.0 <= result["metrics"]["acc"] <= 1.0

    (out / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(DtmError, match=WEIGHTS_FILE):
        load_scorer(out, device="cpu")
    (out / CONFIG_FILE).write_text("{}")
    with pytest.raises(DtmError, match=CONFIG_FILE):
        load_scorer(out, device="cpu")


class KillAtStep4(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise RuntimeError("killed")


@pytest.mark.slow
def test_an_interrupted_lora_moe_resumes_to_the_same_weights(tmp_path, base_dir):
    """The wrapped model keeps its class, so the Trainer's checkpoints and resume are the usual ones."""
    from dtm.evaluation.harness import load_scorer
    from dtm.training import train_baseline

    cfg = tiny_config(save_steps=2)
    cfg.disperse.k, cfg.train.lora.r, cfg.train.lora.lora_alpha = 2, 4, 8
    with pytest.raises(RuntimeError, match="killed"):
        train_baseline("lora_moe", cfg, qa_data(), tmp_path / "a", base=base_dir, progress=False, callbacks=[KillAtStep4()])
    assert (tmp_path / "a" / "checkpoints" / "checkpoint-4").is_dir()
    for name in ("a", "b"):  # a resumes from step 4, b trains in one go
        train_baseline("lora_moe", cfg, qa_data(), tmp_path / name, base=base_dir, progress=False)
    with torch.no_grad():
        a, b = (load_scorer(tmp_path / n, device="cpu").models[0](PROBE).logits for n in "ab")
    assert torch.equal(a, b)
