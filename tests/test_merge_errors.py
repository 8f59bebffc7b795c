"""Bad merge input: each one stops with a message naming the file/tensor and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import dtm
from dtm.cli import main
from dtm.merging import MergeError

torch.set_num_threads(1)
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def llama(path: Path, seed: int = 0, shard: str = "1GB", **kw) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**SMALL, **kw})).save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("good")
    return llama(root / "a", 0), llama(root / "b", 1)


def test_mismatched_architecture(good, tmp_path):
    MistralForCausalLM(MistralConfig(**SMALL)).save_pretrained(tmp_path / "mistral")
    with pytest.raises(MergeError, match="architectures differ: .* is LlamaForCausalLM, .* is MistralForCausalLM"):
        dtm.merge([good[0], tmp_path / "mistral"], tmp_path / "out", progress=False)


def test_different_depth_names_the_missing_tensor(good, tmp_path):
    deep = llama(tmp_path / "deep", num_hidden_layers=3)
    with pytest.raises(MergeError, match=r"tensor 'model\.layers\.2\..*' is in .*deep but not in .*/a"):
        dtm.merge([good[0], deep], tmp_path / "out", progress=False)


def test_mismatched_shapes_name_tensor_and_both_shapes(good, tmp_path):
    wide = llama(tmp_path / "wide", intermediate_size=64)
    with pytest.raises(MergeError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \[\d+, \d+\] in .* but \[\d+, \d+\] in .*wide"):
        dtm.merge([good[0], wide], tmp_path / "out", progress=False)


def test_vocab_size_mismatch(good, tmp_path):
    big = llama(tmp_path / "bigvocab", vocab_size=80)
    with pytest.raises(MergeError, match=r"'(model\.embed_tokens|lm_head)\.weight' has shape \[64, 32\] .* \[80, 32\] .*vocabulary sizes 64 vs 80"):
        dtm.merge([good[0], big], tmp_path / "out", progress=False)


def test_missing_shard(tmp_path):
    m = llama(tmp_path / "sharded", shard="20KB")
    index = json.loads((m / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (m / victim).unlink()
    with pytest.raises(MergeError, match=f"shard {victim} is missing .*copy the complete model directory"):
        dtm.merge([m, m], tmp_path / "out", progress=False)


@pytest.mark.parametrize("damage", ["header", "truncated", "garbage"])
def test_corrupt_safetensors(good, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(good[1], bad)
    f = bad / "model.safetensors"
    raw = f.read_bytes()
    if damage == "header":
        raw = raw[:8] + b"{not json" + raw[17:]
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw = b"\xff" * 64
    f.write_bytes(raw)
    with pytest.raises(MergeError, match=r"bad/model.safetensors: not a readable safetensors file .*corrupt"):
        dtm.merge([good[0], bad], tmp_path / "out", progress=False)


def test_pickle_weights_refused_unless_allowed(good, tmp_path):
    pkl = tmp_path / "pkl"
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    pkl.mkdir()
    model.config.save_pretrained(pkl)
    torch.save(model.state_dict(), pkl / "pytorch_model.bin")
    with pytest.raises(MergeError, match="only pickle weights .*pass --allow-pickle"):
        dtm.merge([good[0], pkl], tmp_path / "out", progress=False)
    out = dtm.merge([good[0], pkl], tmp_path / "out", allow_pickle=True, progress=False)
    merged = LlamaForCausalLM.from_pretrained(out)
    a = LlamaForCausalLM.from_pretrained(good[0])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(merged.state_dict()[name], (a.state_dict()[name] + model.state_dict()[name]) / 2, atol=1e-7)


@pytest.mark.parametrize("weights,match", [
    ([1.0, -1.0], "sum to 0; average divides by their sum, which must be positive"),
    ([-1.0, -2.0], "sum to -3"),
    ([1.0], "got 1 weights for 2 models"),
    ([1.0, float("nan")], "non-finite"),
])
def test_bad_weights(good, tmp_path, weights, match):
    with pytest.raises(MergeError, match=match):
        dtm.merge(list(good), tmp_path / "out", weights=weights, progress=False)


def test_method_and_parameter_errors(good, tmp_path):
    with pytest.raises(MergeError, match="unknown merge method 'avg'; choose one of .*average"):
        dtm.merge(list(good), tmp_path / "out", method="avg", progress=False)
    with pytest.raises(MergeError, match="method 'ties' has no parameter 'densty'"):
        dtm.merge(list(good), tmp_path / "out", method="ties", base=good[0], parameters={"densty": 0.5}, progress=False)
    with pytest.raises(MergeError, match="works on differences to the base model: pass --base"):
        dtm.merge(list(good), tmp_path / "out", method="task_arithmetic", progress=False)
    with pytest.raises(MergeError, match="greedy_soup needs a score function"):
        dtm.merge(list(good), tmp_path / "out", method="greedy_soup", progress=False)
    with pytest.raises(MergeError, match="model directory not found"):
        dtm.merge([good[0], tmp_path / "nope"], tmp_path / "out", progress=False)
    with pytest.raises(MergeError, match="no model weights found"):
        (tmp_path / "empty").mkdir()
        dtm.merge([good[0], tmp_path / "empty"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_prints_error_without_traceback(good, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    rc = main(["merge", "--out", str(tmp_path / "out"), str(good[0]), str(good[1])])
    err = capsys.readouterr().err
    assert rc == 2 and "output directory exists; pass --overwrite" in err and "Traceback" not in err
    rc = main(["merge", "--out", str(tmp_path / "o2"), "--weights", "1,x", str(good[0]), str(good[1])])
    assert rc == 2 and "--weights '1,x': expected comma-separated numbers" in capsys.readouterr().err


def test_a_non_finite_input_tensor_is_refused_by_name(good, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(good[1], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    for method, extra in (("average", {}), ("ties", {"base": good[0], "parameters": {"density": 0.5}})):
        with pytest.raises(MergeError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight'.*inf/nan"):
            dtm.merge([good[0], bad], tmp_path / "out", method=method, progress=False, **extra)
    assert not (tmp_path / "out").exists()


def test_a_merge_that_overflows_the_output_dtype_is_refused(good, tmp_path):
    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(good[1], big)
    tensors = load_file(big / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6  # finite in fp32, inf in fp16
    save_file(tensors, big / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight'.*float16"):
        dtm.merge([good[0], big], tmp_path / "out", out_dtype="float16", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_first_input_without_config_is_refused_before_writing(good, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(good[0], bare)
    (bare / "config.json").unlink()
    with pytest.raises(MergeError, match=r"bare: no config\.json.*first input"):
        dtm.merge([bare, good[1]], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_same_model_twice_is_a_warning(good, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dtm.merging"):
        dtm.merge([good[0], good[0], good[1]], tmp_path / "out", progress=False)
    assert "given more than once" in caplog.text and str(good[0]) in caplog.text
