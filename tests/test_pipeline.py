"""`dtm run` end to end on a pico Llama (LoRA), two seeds, with baselines; rerun and --from."""

import json

import pytest
from conftest import make_llama, make_tokenizer

from dtm.cli import main
from dtm.config import load_config
from dtm.pipeline import run, status


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    base = tmp / "base"
    make_llama(seed=0).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    with open(tmp / "data.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"instruction": f"What is {i} + 1?", "input": "", "output": f"{i + 1}.", "source": "math" if i % 2 else "chat"}) + "\n")
    with open(tmp / "mc.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"id": str(i), "question": f"What is {i} + 1?", "choices": [f"{i + 1}.", f"{i + 2}.", f"{i}."], "answer": 0}) + "\n")
    (tmp / "exp.yaml").write_text(
        f"""
output_dir: {tmp / 'run'}
seeds: [1, 2]
model: {{model_name_or_path: {base}}}
data: {{path: data.jsonl, cutoff_len: 64, val_size: 4}}
disperse: {{k: 2}}
train:
  max_steps: 4
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 1
  warmup_steps: 0
  learning_rate: 0.01
  save_fractions: [0.5]
  save_steps: 2
eval: {{suites: [], tasks: [mc.jsonl], batch_size: 8}}
baselines: {{methods: [short, soup, wise_ft], soup_size: 2, wise_ft_alphas: [0.5]}}
"""
    )
    return tmp


def test_run_writes_every_model_result_and_the_report(experiment, monkeypatch):
    cfg = load_config(experiment / "exp.yaml")
    root = run(cfg)
    for seed in (1, 2):
        seed_dir = root / f"seed-{seed}"
        names = {p.stem for p in (seed_dir / "eval").glob("*.json")}
        assert {"base", "vanilla", "vanilla@0.50", "sub-1", "sub-2", "DTM", "short", "soup", "wise_ft-0.5"} <= names
        assert (seed_dir / "models" / "DTM" / "config.json").is_file()
    report = (root / "report.md").read_text()
    assert "| DTM |" in report and "| vanilla |" in report and "seeds: [1, 2]" in report
    assert all(row["state"] == "done" for row in status(root))
    monkeypatch.chdir(experiment)  # a relative run dir, as typed after `make demo`
    assert [row["state"] for row in status("run")] == [row["state"] for row in status(root)]
    (root / "report.md").unlink()
    assert main(["report", "run"]) == 0  # rewrites the report (and its manifest) where the run is
    assert (root / "report.md").is_file() and status("run")[-1]["state"] == "done"


def test_rerun_skips_finished_stages_and_from_redoes(experiment, capsys):
    cfg = load_config(experiment / "exp.yaml")
    manifest = experiment / "run" / "seed-1" / "manifests" / "train.json"
    before = json.loads(manifest.read_text())["finished"]
    merge_manifest = experiment / "run" / "seed-1" / "manifests" / "merge.json"
    run(cfg, report=False)
    assert json.loads(manifest.read_text())["finished"] == before
    assert main(["run", str(experiment / "exp.yaml"), "--from", "eval"]) == 0
    assert json.loads(manifest.read_text())["finished"] == before  # training was not redone
    # a changed merge method invalidates merge and eval only
    changed = load_config(experiment / "exp.yaml", ["merge.method=task_arithmetic", "merge.parameters={lambda: 0.5}"])
    rows = {(r["run"], r["stage"]): r["state"] for r in status_for(changed)}
    assert rows[("seed-1", "train")] == "done" and rows[("seed-1", "merge")] == "stale"
    assert merge_manifest.is_file()
    # the report has a manifest too: its hash follows every seed's evaluation
    from dtm.pipeline import report_hash

    report_manifest = json.loads((experiment / "run" / "manifests" / "report.json").read_text())
    assert report_manifest["hash"] == report_hash(cfg) != report_hash(changed)
    assert report_manifest["outputs"]["html"].endswith("report.html") and report_manifest["seconds"] > 0


def status_for(cfg):
    from dtm.pipeline import STAGES, Run, seed_runs, stage_hashes

    for seed_cfg, root, control in seed_runs(cfg):
        hashes = stage_hashes(seed_cfg, control)
        for stage in STAGES:
            m = Run(seed_cfg, root, control).manifest(stage)
            yield {"run": root.name, "stage": stage, "state": "done" if m and m["hash"] == hashes[stage] else "stale"}


def test_lab_control_runs_on_the_first_control_seeds():
    from dtm.pipeline import seed_runs

    cfg = load_config(None, ["data.path=lab", "model.model_name_or_path=lab", "seeds=[1, 2, 3]", "lab.control_seeds=2"], check_paths=False)
    runs = seed_runs(cfg)
    assert [(c.seed, control) for c, _, control in runs] == [(1, False), (2, False), (3, False), (1, True), (2, True)]
    assert all(root.parent.name == "control-nobias" and c.baselines.methods == [] for c, root, control in runs if control)
