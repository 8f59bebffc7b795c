"""Training baselines: L2/EWC penalties (hand-computed), Fisher, replay mixing, curation, soup recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file

from dtm.config import ExperimentConfig
from dtm.data.template import conversation
from dtm.errors import DataError
from dtm.fisher import diagonal_fisher
from dtm.plan import soup_recipes
from dtm.rundir import COMPLETE_FILE
from dtm.training import TrainingError, curate, train_baseline
from dtm.training.baselines import load_replay_texts, mix_replay
from dtm.training.batches import text_examples
from dtm.training.regularizers import WeightPenalty, ewc_penalty, l2_penalty, normalise_fisher

torch.set_num_threads(1)


def tiny_config(**train) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=3)
    cfg.data.cutoff_len = 64
    settings = {"max_steps": 6, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "warmup_steps": 0, "learning_rate": 3e-2, "logging_steps": 2, "save_steps": 100}
    for k, v in (settings | train).items():
        setattr(cfg.train, k, v)
    return cfg


def qa_data(n: int = 24) -> list:
    return [conversation(f"What is {i} + {i}?", f"{2 * i} is the sum" + " of it" * (i % 4), id=str(i)) for i in range(n)]


# ---------------------------------------------------------------- the math


def test_l2_and_ewc_penalties_on_hand_computed_tensors():
    deltas = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[3.0]])}
    assert float(l2_penalty(deltas.values(), 0.5)) == pytest.approx(0.5 * (1 + 4 + 9))
    fisher = {"a": torch.tensor([2.0, 0.5]), "b": torch.tensor([[0.0]])}
    assert float(ewc_penalty(deltas, fisher, 0.1)) == pytest.approx(0.1 * (2 * 1 + 0.5 * 4 + 0))
    norm = normalise_fisher({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.0, 0.0])})
    assert norm["a"].tolist() == [1.0, 3.0] and norm["b"].tolist() == [0.0, 0.0]  # mean 1 over 4 entries
    with pytest.raises(ValueError, match="all zeros"):
        normalise_fisher({"a": torch.zeros(3)})


def test_diagonal_fisher_is_the_mean_of_per_example_squared_gradients(tokenizer):
    model = make_llama(seed=2)
    examples = text_examples(["the cat sat on the mat.", "1 2 3 4 5"], tokenizer, 32)
    target = {"model.layers.0.mlp.up_proj.weight": model.model.layers[0].mlp.up_proj.weight}
    got = diagonal_fisher(model, examples, target)["model.layers.0.mlp.up_proj.weight"]
    expected = torch.zeros_like(got)
    for e in examples:  # the gradient of each example's summed log-likelihood (mean loss x predicted tokens)
        model.zero_grad()
        ids = torch.tensor([e["input_ids"]])
        (model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1)).backward()
        expected += model.model.layers[0].mlp.up_proj.weight.grad.pow(2)
    torch.testing.assert_close(got, expected / 2)
    assert float(got.sum()) > 0


def test_lora_penalty_acts_on_the_weight_delta():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_llama(seed=0), LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"], lora_dropout=0.0))
    penalty = WeightPenalty(model, coef=1.0)
    assert float(penalty()) == 0.0  # B starts at zero
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    expected = 0.0
    for layer in model.base_model.model.model.layers:
        m = layer.mlp.up_proj
        expected += float(((m.lora_B["default"].weight @ m.lora_A["default"].weight) * 2.0).pow(2).sum())  # alpha/r = 2
    assert float(penalty()) == pytest.approx(expected, rel=1e-5)
    assert sorted(penalty.target_params(model)) == ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]


# ---------------------------------------------------------------- penalties in training


def test_l2_keeps_full_finetuning_closer_to_the_base(base_dir, tmp_path):
    base = load_file(base_dir / "model.safetensors")

    def distance(out: Path) -> float:
        trained = load_file(out / "model.safetensors")
        return sum(float((trained[k] - base[k]).pow(2).sum()) for k in base)

    cfg = tiny_config(finetuning_type="full")
    cfg.baselines.l2_coef = 50.0
    vanilla = train_baseline("vanilla", cfg, qa_data(), tmp_path / "vanilla", base=base_dir, progress=False)
    l2 = train_baseline("l2", cfg, qa_data(), tmp_path / "l2", base=base_dir, progress=False)
    assert distance(l2) < 0.8 * distance(vanilla)
    rows = [json.loads(line) for line in (l2 / "train_log.jsonl").read_text().splitlines()]
    assert all(r["penalty"] >= 0 for r in rows) and rows[-1]["penalty"] > 0


def test_ewc_lora_trains_with_a_fisher_from_replay_text(base_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n\nWhat is the capital of France? Paris.\n1 2 3 4 5\n")
    cfg = tiny_config()
    cfg.baselines.replay_path = str(corpus)
    cfg.baselines.ewc_coef = 10.0
    out = train_baseline("ewc", cfg, qa_data(), tmp_path / "ewc", base=base_dir, progress=False)
    summary = json.loads((out / COMPLETE_FILE).read_text())
    assert summary["regularizer"] == "ewc" and summary["penalty_coef"] == 10.0
    assert (out / "adapter_config.json").exists()


# ---------------------------------------------------------------- replay


def test_replay_texts_from_txt_and_jsonl_with_errors_naming_the_line(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("one doc\n\n two doc \n")
    assert load_replay_texts(txt) == ["one doc", "two doc"]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert load_replay_texts(jl) == ["a", "b"]
    jl.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: expected a record with a string field `text`"):
        load_replay_texts(jl)
    with pytest.raises(DataError, match="replay corpus not found"):
        load_replay_texts(tmp_path / "missing.txt")


def test_mix_replay_adds_ratio_times_sft_examples():
    sft = [{"input_ids": [i], "kind": "sft"} for i in range(10)]
    replay = [{"input_ids": [100 + i], "kind": "replay"} for i in range(4)]
    mixed = mix_replay(sft, replay, ratio=1.0, seed=0)
    assert len(mixed) == 20 and sum(e["kind"] == "replay" for e in mixed) == 10
    assert {e["input_ids"][0] for e in mixed if e["kind"] == "replay"} == {100, 101, 102, 103}  # cycled
    assert mixed == mix_replay(sft, replay, ratio=1.0, seed=0)  # seeded
    assert len(mix_replay(sft, replay, ratio=0.5, seed=0)) == 15


def test_replay_baseline_trains_on_mixed_data(base_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the cat sat on the mat {i} times."}) + "\n" for i in range(5)))
    cfg = tiny_config()
    with pytest.raises(TrainingError, match="baselines.replay_path"):
        train_baseline("replay", cfg, qa_data(), tmp_path / "r0", base=base_dir, progress=False)
    cfg.baselines.replay_path = str(corpus)
    cfg.baselines.replay_ratio = 0.5
    out = train_baseline("replay", cfg, qa_data(), tmp_path / "r", base=base_dir, progress=False)
    summary = json.loads((out / COMPLETE_FILE).read_text())
    assert summary["examples"] == 24 and summary["replay_examples"] == 12


# ---------------------------------------------------------------- curation and soups


def test_curate_keeps_the_top_fraction_in_original_order():
    data = qa_data(8)  # response lengths cycle through 3, 5, 7, 9 words
    kept = curate(data, 0.5, "response_length")
    assert [c.id for c in kept] == ["2", "3", "6", "7"]
    kept = curate(data, 0.25, lambda convs, ctx: [float(c.id) for c in convs])  # a custom scorer
    assert [c.id for c in kept] == ["6", "7"]
    with pytest.raises(DataError, match="unknown scorer 'deita'"):
        curate(data, 0.5, "deita")


def test_base_loss_scorer_prefers_responses_the_base_model_finds_likely(base_dir, tmp_path):
    from dtm.training.baselines import score_base_loss

    cfg = tiny_config()
    data = qa_data(4)
    scores = score_base_loss(data, {"config": cfg, "base": base_dir})
    assert len(scores) == 4 and all(s < 0 for s in scores) and len(set(scores)) == 4
    best = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [c.id for c in curate(data, 0.5, "base_loss", {"config": cfg, "base": base_dir})] == [str(i) for i in sorted(best)]
    out = train_baseline("curation", cfg, data, tmp_path / "cur", base=base_dir, progress=False)
    assert json.loads((out / COMPLETE_FILE).read_text())["examples"] == 2


def test_soup_recipes_vary_seed_and_cycle_learning_rates():
    cfg = tiny_config()
    cfg.baselines.soup_size = 3
    assert soup_recipes(cfg) == [("short", 3, 3e-2), ("soup-2", 1003, 3e-2), ("soup-3", 2003, 3e-2)]
    cfg.baselines.soup_learning_rates = [1e-3, 2e-3]  # the first ingredient is no longer the `short` baseline
    assert soup_recipes(cfg) == [("soup-1", 3, 1e-3), ("soup-2", 1003, 2e-3), ("soup-3", 2003, 1e-3)]
    with pytest.raises(TrainingError, match="'ensemble' is not trained here"):
        train_baseline("ensemble", cfg, qa_data(), "unused")
