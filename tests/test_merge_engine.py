"""The streaming engine on real tiny transformers models saved as (sharded) safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_all
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import dtm
from dtm.merging import MergeError
from dtm.merging import engine as E
from dtm.merging import methods as M

torch.set_num_threads(1)


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **kw})


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(60)} | {"<unk>": 60}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def make_model(path: Path, seed: int, shard: str = "1GB", **cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**cfg))
    model.generation_config.max_new_tokens = 7 + seed  # something to recognise in the copy
    model.save_pretrained(path, max_shard_size=shard)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("models")
    dirs, states = [], []
    for i, shard in enumerate(["1GB", "20KB", "45KB"]):  # one file, and two different shardings
        d = root / f"m{i}"
        states.append(make_model(d, i, shard))
        dirs.append(d)
    save_tokenizer(dirs[0])
    return dirs, states


def test_average_matches_dense_average_and_loads(three, tmp_path):
    dirs, states = three
    out = dtm.merge(dirs, tmp_path / "avg", parameters={"max_shard_size": "30KB"}, progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    merged = read_all(out)
    assert merged.keys() == states[0].keys()
    for name in states[0]:
        expected = (states[0][name] + states[1][name] + states[2][name]) / 3
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, v in model.state_dict().items():
        assert torch.equal(v, merged[name]), name
    # config, generation config and tokenizer come from the first model
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    record = json.loads((out / "dtm_merge.json").read_text())
    assert record["method"] == "average" and record["weights"] == [1.0, 1.0, 1.0]
    # no temporary directory left beside the output
    assert [p.name for p in tmp_path.iterdir()] == ["avg"]


def test_weighted_average_and_out_dtype(three, tmp_path):
    dirs, states = three
    out = dtm.merge(dirs[:2], tmp_path / "w", weights=[3, 1], out_dtype="bfloat16", progress=False)
    merged = read_all(out)
    name = "model.layers.0.mlp.up_proj.weight"
    assert merged[name].dtype == torch.bfloat16
    assert torch.equal(merged[name], ((3 * states[0][name] + states[1][name]) / 4).to(torch.bfloat16))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight.shape == (64, 32)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("dare_linear", {"density": [0.3, 0.6], "seed": 1, "lambda": 0.5}),
    ("ties", {"density": [0.2, 0.9], "normalize": False}),
])
def test_base_methods_through_engine_equal_per_tensor_functions(three, tmp_path, method, params):
    dirs, states = three
    base_dir, base = dirs[0], states[0]
    out = dtm.merge(dirs[1:], tmp_path / "out", method=method, base=base_dir, parameters=params, progress=False)
    merged = read_all(out)
    spec = M.get_method(method)
    kw = M.resolve_params(spec, {k: v for k, v in params.items() if k != "seed"})
    for name in ["model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]:
        if spec.random:
            kw["generators"] = M.model_generators(params["seed"], name, 2)
        expected = spec.fn([states[1][name], states[2][name]], [1.0, 1.0], base=base[name], **kw)
        assert torch.equal(merged[name], expected), name
    if spec.random:  # the same seed gives the same merge
        again = dtm.merge(dirs[1:], tmp_path / "again", method=method, base=base_dir, parameters=params, progress=False)
        assert all(torch.equal(v, read_all(again)[k]) for k, v in merged.items())


def test_wise_ft_endpoints(three, tmp_path):
    dirs, states = three
    out = dtm.merge([dirs[1]], tmp_path / "wise", method="wise_ft", base=dirs[0], parameters={"alpha": 0.25}, progress=False)
    name = "model.norm.weight"
    got = read_all(out)["lm_head.weight"]
    assert torch.allclose(got, 0.75 * states[0]["lm_head.weight"] + 0.25 * states[1]["lm_head.weight"], atol=1e-7)
    assert name in read_all(out)
    with pytest.raises(MergeError, match="takes 1 model"):
        dtm.merge(dirs[1:], tmp_path / "wise2", method="wise_ft", base=dirs[0], progress=False)


def test_tied_and_untied_models_merge_with_lm_head(tmp_path):
    tied = tmp_path / "tied"
    untied = tmp_path / "untied"
    s_tied = make_model(tied, 0, tie_word_embeddings=True)
    s_untied = make_model(untied, 1)
    with safe_open(tied / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # save_pretrained drops the tied copy
    out = dtm.merge([tied, untied], tmp_path / "mixed", progress=False)
    merged = read_all(out)
    expected = (s_tied["model.embed_tokens.weight"] + s_untied["lm_head.weight"]) / 2
    assert torch.allclose(merged["lm_head.weight"], expected, atol=1e-7)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, merged["lm_head.weight"])
    # two tied models stay tied (no lm_head written)
    make_model(tmp_path / "tied2", 2, tie_word_embeddings=True)
    out2 = dtm.merge([tied, tmp_path / "tied2"], tmp_path / "both", progress=False)
    assert "lm_head.weight" not in read_all(out2)
    assert AutoModelForCausalLM.from_pretrained(out2).config.tie_word_embeddings


def test_bf16_inputs_are_averaged_in_fp32(tmp_path):
    states = []
    for i in range(2):
        torch.manual_seed(i)
        m = LlamaForCausalLM(tiny_config()).to(torch.bfloat16)
        m.save_pretrained(tmp_path / f"b{i}")
        states.append(m.state_dict())
    out = dtm.merge([tmp_path / "b0", tmp_path / "b1"], tmp_path / "avg", progress=False)
    merged = read_all(out)
    for name, v in merged.items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, ((states[0][name].float() + states[1][name].float()) / 2).to(torch.bfloat16)), name


def test_base_is_ignored_when_nothing_needs_it(three, tmp_path):
    dirs, _ = three
    # the pipeline always passes its base model, which may be a hub id, not a directory
    out = dtm.merge(dirs[:2], tmp_path / "avg", base="meta-llama/Llama-2-7b-hf", progress=False)
    assert json.loads((out / "dtm_merge.json").read_text())["base"] is None
    with pytest.raises(MergeError, match="not a local directory"):
        dtm.merge(dirs[:2], tmp_path / "ta", method="task_arithmetic", base="meta-llama/Llama-2-7b-hf", progress=False)


def test_interrupted_merge_leaves_no_output(three, tmp_path, monkeypatch):
    dirs, _ = three
    calls = {"n": 0}

    def dies_at_fifth_tensor(real):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return real(*a, **k)
        return wrapped

    for name in ("merge_tensor", "merge_tensor_chunks"):  # whole-tensor and chunked paths
        monkeypatch.setattr(E, name, dies_at_fifth_tensor(getattr(E, name)))
    with pytest.raises(KeyboardInterrupt):
        dtm.merge(dirs, tmp_path / "out", progress=False)
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert dtm.merge(dirs, tmp_path / "out", progress=False).is_dir()  # a rerun completes


@pytest.mark.parametrize("method,params", [
    ("average", {}), ("ties", {"density": 0.3}), ("dare_ties", {"density": 0.4, "seed": 2}),
])
def test_chunked_and_whole_tensor_paths_agree_bitwise(three, tmp_path, monkeypatch, method, params):
    dirs, states = three
    kw = dict(method=method, parameters=params, progress=False)
    if method == "average":
        kw.update(models=dirs, weights=[0.2, 0.3, 0.5])
    else:
        kw.update(models=dirs[1:], weights=[0.3, 0.5], base=dirs[0])
    monkeypatch.setattr(E, "CHUNK_ELEMENTS", 100)  # many ragged chunks per tensor
    chunked = read_all(dtm.merge(out=tmp_path / "chunked", **kw))
    monkeypatch.setattr(E, "chunkable", lambda *a, **k: False)  # whole tensors, sliced
    whole = read_all(dtm.merge(out=tmp_path / "whole", **kw))
    monkeypatch.setattr(E, "CHUNK_ELEMENTS", 1 << 30)  # one chunk: the per-tensor function on whole tensors
    single = read_all(dtm.merge(out=tmp_path / "single", **kw))
    assert chunked.keys() == whole.keys() == single.keys()
    assert all(torch.equal(chunked[k], whole[k]) and torch.equal(chunked[k], single[k]) for k in whole)


def test_overwrite(three, tmp_path):
    dirs, _ = three
    out = tmp_path / "o"
    dtm.merge(dirs[:2], out, progress=False)
    with pytest.raises(MergeError, match="exists; pass --overwrite"):
        dtm.merge(dirs[:2], out, progress=False)
    dtm.merge(dirs, out, overwrite=True, progress=False)
    assert len(json.loads((out / "dtm_merge.json").read_text())["models"]) == 3
    with pytest.raises(MergeError, match="one of the inputs"):
        dtm.merge(dirs, dirs[0], overwrite=True, progress=False)


def test_fisher_merge_through_engine(three, tmp_path):
    from safetensors.torch import save_file

    dirs, states = three
    fishers = []
    for i, s in enumerate(states[:2]):
        f = tmp_path / f"f{i}.safetensors"
        save_file({k: torch.full_like(v, float(i + 1)) for k, v in s.items()}, f)
        fishers.append(str(f))
    out = dtm.merge(dirs[:2], tmp_path / "fisher", method="fisher", parameters={"fisher_files": fishers}, progress=False)
    name = "model.layers.0.mlp.down_proj.weight"
    # constant Fishers 1 and 2 -> weights 1:2
    assert torch.allclose(read_all(out)[name], (states[0][name] + 2 * states[1][name]) / 3, atol=1e-6)
    with pytest.raises(MergeError, match="no Fisher file"):
        dtm.merge(dirs[:2], tmp_path / "nofisher", method="fisher", progress=False)
