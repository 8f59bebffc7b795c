"""`dtm merge` on the command line and the mergekit-style YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from dtm.cli import main
from dtm.merging import MergeError
from dtm.merging.recipe import read_recipe

torch.set_num_threads(1)


def tensor(d: Path, name: str) -> torch.Tensor:
    with safe_open(d / "model.safetensors", "pt") as f:
        return f.get_tensor(name)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("cli")
    out = []
    for i in range(3):
        torch.manual_seed(i)
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / f"m{i}")
        out.append(root / f"m{i}")
    return out


W = "model.layers.0.mlp.up_proj.weight"


def test_cli_average_with_weights(models, tmp_path, capsys):
    rc = main(["merge", "--method", "average", "--weights", "1,3", "--out", str(tmp_path / "o"), str(models[0]), str(models[1])])
    assert rc == 0 and f"merged into {tmp_path / 'o'}" in capsys.readouterr().out
    record = json.loads((tmp_path / "o" / "dtm_merge.json").read_text())
    assert record["method"] == "average" and record["weights"] == [1.0, 3.0] and len(record["models"]) == 2
    expected = (tensor(models[0], W) + 3 * tensor(models[1], W)) / 4
    assert torch.allclose(tensor(tmp_path / "o", W), expected, atol=1e-7)


def test_cli_params_and_base(models, tmp_path):
    rc = main(["merge", "--method", "ties", "--base", str(models[0]), "--param", "density=0.5", "--param", "lambda=0.5",
               "--out", str(tmp_path / "t"), str(models[1]), str(models[2])])
    assert rc == 0
    rec = json.loads((tmp_path / "t" / "dtm_merge.json").read_text())
    assert rec["parameters"] == {"density": 0.5, "lambda": 0.5} and rec["base"] == str(models[0])


def test_yaml_recipe_mergekit_style(models, tmp_path):
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {models[0]}\n"
        "models:\n"
        f"  - model: {models[0]}\n"  # mergekit lists the base among the models: dropped
        f"  - model: {models[1]}\n"
        "    parameters: {weight: 0.5}\n"
        f"  - model: {models[2]}\n"
        "    parameters: {weight: 0.25}\n"
        "parameters: {lambda: 2.0}\n"
        "dtype: float32\n"
    )
    kw = read_recipe(recipe)
    assert kw["models"] == [models[1], models[2]] and kw["weights"] == [0.5, 0.25] and kw["base"] == models[0]
    assert main(["merge", "--config", str(recipe), "--out", str(tmp_path / "y")]) == 0
    b, x1, x2 = (tensor(m, W) for m in models)
    expected = b + 2.0 * (0.5 * (x1 - b) + 0.25 * (x2 - b))
    assert torch.allclose(tensor(tmp_path / "y", W), expected, atol=1e-6)
    # a flag overrides the file
    assert main(["merge", "--config", str(recipe), "--param", "lambda=1.0", "--out", str(tmp_path / "y2")]) == 0
    assert torch.allclose(tensor(tmp_path / "y2", W), b + 0.5 * (x1 - b) + 0.25 * (x2 - b), atol=1e-6)


def test_yaml_relative_paths_and_linear(models, tmp_path):
    recipe = models[0].parent / "rel.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: m0\n  - model: m1\nparameters: {normalize: true}\n")
    assert main(["merge", "--config", str(recipe), "--out", str(tmp_path / "r")]) == 0
    assert torch.allclose(tensor(tmp_path / "r", W), (tensor(models[0], W) + tensor(models[1], W)) / 2, atol=1e-7)


@pytest.mark.parametrize("text,match", [
    ("merge_method: linear\nslices: []\nmodels: [m0]\n", r"rel.yaml:2: 'slices' is a mergekit key dtm does not support: .*whole models"),
    ("merge_method: linear\nmodels: [m0]\ntokenizer_source: union\n", r"rel.yaml:3: 'tokenizer_source' is a mergekit key dtm does not support"),
    ("merge_method: linear\nmodels: [m0]\nfrobnicate: 1\n", r"rel.yaml:3: unknown key 'frobnicate'"),
    ("merge_method: ties\nmodels:\n  - model: m0\n  - model: m1\n    parameters: {weight: 1, gamma: 0.5}\n",
     r"rel.yaml:5: models\[1\].parameters.gamma: dtm takes a per-model 'weight' and 'density'"),
    ("merge_method: ties\nmodels:\n  - model: m0\n    parameters:\n      density: [0.1, 0.5]\n",
     r"rel.yaml:5: models.0.parameters.density: \[0.1, 0.5\]: dtm takes one value per parameter .*gradients"),
    ("merge_method: ties\nmodels: [m0]\nparameters:\n  density: {filter: mlp, value: 0.5}\n", r"rel.yaml:4: parameters.density: .*filtered"),
    ("merge_method: linear\nmodels:\n  - model: m0+some/lora\n", r"rel.yaml:3: .*'model\+lora' syntax is not supported"),
    ("merge_method: linear\nmodels: [m0]\ndtype: float8\n", r"rel.yaml:3: dtype: unknown dtype 'float8'"),
    ("merge_method: linear\nmodels:\n  - model: m0\n    parameters: {weight: 1}\n  - model: m1\n", "give a weight to every model or to none"),
    ("models: 3\n", "models: expected a list"),
    ("merge_method: [oops\n", "not valid YAML"),
])
def test_bad_yaml(models, text, match):
    recipe = models[0].parent / "rel.yaml"
    recipe.write_text(text)
    with pytest.raises(MergeError, match=match):
        read_recipe(recipe)


def test_cli_bad_param_syntax(models, tmp_path, capsys):
    assert main(["merge", "--param", "density", "--out", str(tmp_path / "p"), str(models[0])]) == 2
    assert "--param 'density': expected KEY=VALUE" in capsys.readouterr().err
    assert main(["merge", "--out", str(tmp_path / "p")]) == 2
    assert "no models" in capsys.readouterr().err
