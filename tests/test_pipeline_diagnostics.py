"""`dtm run` with the diagnostics and the LoRA-MoE baseline, end to end on a pico Llama (LoRA):
the token-level diagnostic runs in the eval stage, every result has per-question scores, the
LoRA-MoE model is trained, evaluated and shown, and the report has both diagnostics."""

import json

import pytest
from test_pipeline import experiment  # noqa: F401 - the module's pico experiment (a fixture)

from dtm.config import load_config
from dtm.pipeline import run


@pytest.mark.slow
def test_run_with_token_losses_error_sets_and_lora_moe(experiment, tmp_path):  # noqa: F811
    overrides = [f"output_dir={tmp_path / 'run'}", "seeds=[1]", "eval.token_losses=true", "eval.token_loss_min_count=1",
                 "baselines.methods=[lora_moe]"]
    root = run(load_config(experiment / "exp.yaml", overrides))
    seed = root / "seed-1"
    token = json.loads((seed / "diagnostics" / "token_losses.json").read_text())
    assert token["fractions"] == [0.0, 0.5, 1.0] and len(token["intervals"]) == 2  # base, vanilla@0.50, vanilla
    assert json.loads((seed / "manifests" / "eval.json").read_text())["outputs"]["token_losses"]["file"] == "diagnostics/token_losses.json"
    moe = seed / "models" / "lora_moe"
    assert (moe / "lora_moe_config.json").is_file() and not (moe / "config.json").exists()
    results = json.loads((seed / "eval" / "lora_moe.json").read_text())
    assert results["mc"]["counts"]["items"] == 12 and len(results["mc"]["per_item"]["acc"]) == 12
    steps = json.loads((moe / "training_complete.json").read_text())["steps"]
    assert steps == json.loads((seed / "models" / "vanilla" / "training_complete.json").read_text())["steps"] == 4  # DTM's compute
    report = (root / "report.md").read_text()
    assert "| lora_moe |" in report
    assert "## Which tokens' training loss fell most (vanilla SFT, early vs late)" in report
    assert "## Error sets: the questions the sub-models get wrong, and the merge" in report and "| mc | acc | 12 |" in report


@pytest.mark.slow
def test_token_losses_run_while_the_worker_pool_evaluates(experiment, tmp_path):  # noqa: F811
    """With `train.num_workers` 2 the diagnostic runs in the driver while the pool evaluates:
    the same file and manifest entry, and every model still evaluated."""
    overrides = [f"output_dir={tmp_path / 'run'}", "seeds=[1]", "eval.token_losses=true", "eval.token_loss_min_count=1",
                 "train.num_workers=2"]
    root = run(load_config(experiment / "exp.yaml", overrides))
    seed = root / "seed-1"
    token = json.loads((seed / "diagnostics" / "token_losses.json").read_text())
    assert token["fractions"] == [0.0, 0.5, 1.0]
    manifest = json.loads((seed / "manifests" / "eval.json").read_text())["outputs"]
    assert manifest["token_losses"]["file"] == "diagnostics/token_losses.json"
    assert all((seed / "eval" / f"{name}.json").is_file() for name in manifest["models"])
