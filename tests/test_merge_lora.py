"""LoRA merging against PEFT's own merge_and_unload(), on real tiny PEFT adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_all
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import dtm
from dtm.merging import MergeError
from dtm.merging.lora import concat_adapters, lora_delta, lora_scale, svd_truncate

torch.set_num_threads(1)
TARGETS = ["gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int, r: int = 4, alpha: float = 8, targets=TARGETS, **kw) -> None:
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base)
    # init_lora_weights=False: B is random too, so every adapter changes the model
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **kw)
    get_peft_model(model, cfg).save_pretrained(out)


def dense(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own answer: the base with this adapter merged in."""
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    adapters = []
    for i in range(3):
        make_adapter(root / "base", root / f"a{i}", seed=10 + i, r=4 if i < 2 else 8)  # one with another rank
        adapters.append(root / f"a{i}")
    return root / "base", adapters


def test_math_by_hand():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])  # r = 1
    assert torch.equal(lora_delta(a, b, 0.5), torch.tensor([[1.5, 3.0], [2.0, 4.0]]))
    assert lora_scale(16, 16) == 1.0 and lora_scale(16, 4, use_rslora=True) == 8.0
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0], [0.0]])
    ac, bc = concat_adapters([a, a2], [b, b2], [0.5, 0.25])
    assert ac.shape == (2, 2) and bc.shape == (2, 2)
    assert torch.equal(bc @ ac, 0.5 * (b @ a) + 0.25 * (b2 @ a2))


def test_svd_truncation_error_is_exact_frobenius():
    torch.manual_seed(0)
    a, b = torch.randn(6, 20), torch.randn(30, 6)
    na, nb, err = svd_truncate(a, b, 6)
    assert err < 1e-6 and torch.allclose(nb @ na, b @ a, atol=1e-4)
    na, nb, err = svd_truncate(a, b, 2)
    d = (b @ a).double()
    s = torch.linalg.svdvals(d)
    assert err == pytest.approx(float((s[2:] ** 2).sum().sqrt() / (s**2).sum().sqrt()), rel=1e-6)
    assert float(torch.linalg.norm(d - (nb @ na).double()) / torch.linalg.norm(d)) == pytest.approx(err, rel=1e-4)


def test_full_merge_matches_average_of_peft_merged_models(lora, tmp_path):
    base, adapters = lora
    out = dtm.merge(adapters, tmp_path / "full", progress=False)  # base from adapter_config.json
    merged = read_all(out)
    denses = [dense(base, a) for a in adapters]
    for name in denses[0]:
        expected = sum(d[name] for d in denses) / 3
        assert torch.allclose(merged[name], expected, atol=1e-6, rtol=0), name
    AutoModelForCausalLM.from_pretrained(out)  # a normal model directory
    assert json.loads((out / "dtm_merge.json").read_text())["lora_merge"] == "full"


def test_averaging_A_and_B_separately_is_wrong(lora):
    """The paper's code's bug: mean(B) @ mean(A) != mean(B @ A)."""
    base, adapters = lora
    name = "base_model.model.model.layers.0.mlp.up_proj"
    As, Bs = [], []
    for a in adapters[:2]:  # same rank, so the naive average is even possible
        with safe_open(a / "adapter_model.safetensors", "pt") as f:
            As.append(f.get_tensor(f"{name}.lora_A.weight"))
            Bs.append(f.get_tensor(f"{name}.lora_B.weight"))
    scale = 8 / 4
    right = (lora_delta(As[0], Bs[0], scale) + lora_delta(As[1], Bs[1], scale)) / 2
    wrong = lora_delta((As[0] + As[1]) / 2, (Bs[0] + Bs[1]) / 2, scale)
    assert float((right - wrong).abs().max()) > 0.1 * float(right.abs().max())
    d0, d1 = dense(base, adapters[0]), dense(base, adapters[1])
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(d0[w] / 2 + d1[w] / 2 - read_all(base)[w], right, atol=1e-5)


def test_concat_adapter_reproduces_full_merge_exactly(lora, tmp_path):
    base, adapters = lora
    full = read_all(dtm.merge(adapters, tmp_path / "full", weights=[1, 2, 1], progress=False))
    cat = dtm.merge(adapters, tmp_path / "cat", weights=[1, 2, 1], lora_merge="concat", progress=False)
    cfg = json.loads((cat / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 4 + 8 and cfg["lora_alpha"] == cfg["r"]
    via_peft = dense(base, cat)  # PEFT loads our adapter and merges it
    for name, v in via_peft.items():
        assert torch.allclose(v, full[name], atol=2e-6, rtol=0), name


def test_svd_back_to_rank_r_reports_error(lora, tmp_path):
    base, adapters = lora
    out = dtm.merge(adapters, tmp_path / "svd", lora_merge="svd", parameters={"rank": 4}, progress=False)
    rec = json.loads((out / "dtm_merge.json").read_text())
    errors = rec["svd_relative_error"]["per_module"]
    assert len(errors) == 6 and 0 < rec["svd_relative_error"]["max"] < 1
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    # full rank keeps it exact
    exact = dtm.merge(adapters, tmp_path / "svd16", lora_merge="svd", parameters={"rank": 16}, progress=False)
    assert json.loads((exact / "dtm_merge.json").read_text())["svd_relative_error"]["max"] < 1e-6
    full = read_all(dtm.merge(adapters, tmp_path / "full", progress=False))
    w = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(dense(base, exact)[w], full[w], atol=1e-5)
    # the reported error is the real one
    d_full = full[w] - read_all(base)[w]
    d_svd = dense(base, out)[w] - read_all(base)[w]
    measured = float(torch.linalg.norm(d_full - d_svd) / torch.linalg.norm(d_full))
    assert measured == pytest.approx(errors["model.layers.1.mlp.down_proj"], rel=1e-2, abs=1e-5)


def test_different_target_modules_and_rslora(lora, tmp_path):
    base, adapters = lora
    odd = tmp_path / "odd"
    make_adapter(base, odd, seed=99, r=2, alpha=4, targets=["q_proj", "up_proj"], use_rslora=True)
    full = read_all(dtm.merge([adapters[0], odd], tmp_path / "full", progress=False))
    d0, d1 = dense(base, adapters[0]), dense(base, odd)
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"]:
        assert torch.allclose(full[name], (d0[name] + d1[name]) / 2, atol=1e-6), name
    cat = dtm.merge([adapters[0], odd], tmp_path / "cat", lora_merge="concat", progress=False)
    via_peft = dense(base, cat)
    for name, v in via_peft.items():
        assert torch.allclose(v, full[name], atol=2e-6), name


def test_bad_adapters_are_refused(lora, tmp_path):
    base, adapters = lora
    dora = tmp_path / "dora"
    make_adapter(base, dora, seed=5, use_dora=True)
    with pytest.raises(MergeError, match="DoRA"):
        dtm.merge([adapters[0], dora], tmp_path / "x", progress=False)
    with pytest.raises(MergeError, match="exact only for a .weighted. average"):
        dtm.merge(adapters, tmp_path / "x", method="ties", lora_merge="concat", base=base, progress=False)
    # an adapter trained on another base (other hidden size) names the module and both shapes
    other = tmp_path / "other_base"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    with pytest.raises(MergeError, match=r"mlp\.\w+_proj.: B @ A has shape \[\d+, \d+\] but the base tensor .* has shape \[\d+, \d+\]; was the adapter trained on another base"):
        dtm.merge(adapters[:1], tmp_path / "x", base=other, progress=False)
    cfg = json.loads((adapters[0] / "adapter_config.json").read_text())
    lost = tmp_path / "lost"
    lost.mkdir()
    (lost / "adapter_model.safetensors").write_bytes((adapters[0] / "adapter_model.safetensors").read_bytes())
    (lost / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    with pytest.raises(MergeError, match="not a local directory; pass the base model"):
        dtm.merge([lost], tmp_path / "x", progress=False)


def peft_weighted(base: Path, adapters: list[Path], weights: list[float], combination: str, **kw) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter on the same adapters, merged into the base (dense weights)."""
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(a, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kw)
    model.set_adapter("merged")
    for n in names:
        model.delete_adapter(n)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_concat_equals_peft_cat(lora, tmp_path):
    """PEFT `cat` is sum_k w_k s_k B_k A_k (weights not normalised); dtm's `concat` is the weighted
    average, sum_k (w_k / sum w) s_k B_k A_k: equal dense deltas for weights that sum to 1."""
    base, adapters = lora
    weights = [0.25, 0.5, 0.25]
    ours = dense(base, dtm.merge(adapters, tmp_path / "cat", weights=weights, lora_merge="concat", progress=False))
    theirs = peft_weighted(base, adapters, weights, "cat")
    for name, v in theirs.items():
        assert torch.allclose(ours[name], v, atol=2e-6, rtol=0), name


def test_ties_equals_peft_ties_svd_at_full_rank_with_unit_weights(lora, tmp_path):
    """PEFT `ties_svd` runs TIES on the dense deltas s_k B_k A_k (top-k by magnitude, sign by summed
    mass) then truncates by SVD; its disjoint mean divides by the *count* of agreeing models,
    dtm's (and mergekit's) by their summed *weights*: the same for unit weights. At a rank that
    keeps every singular value, the SVD is exact, so PEFT's dense model equals dtm's `ties` on the
    adapted models to float tolerance. (PEFT's plain `ties`/`dare_*` merge A and B separately,
    which is not a merge of the deltas B A; and its DARE draws from torch's global RNG.)"""
    base, adapters = lora
    ours = read_all(dtm.merge(adapters, tmp_path / "ties", method="ties", base=base,
                              parameters={"density": 0.4}, progress=False))
    theirs = peft_weighted(base, adapters, [1.0, 1.0, 1.0], "ties_svd", density=0.4, svd_rank=32)
    changed = 0
    for name, v in theirs.items():
        assert torch.allclose(ours[name], v, atol=1e-5, rtol=0), name
        changed += not torch.equal(v, read_all(base)[name])
    assert changed == 6  # the adapted modules
