"""`dtm run` end to end on a pico Llama (LoRA), two seeds, with baselines.

One run is made per module; every test that changes a run works on its own copy of it, so
the tests do not depend on their order.
"""

import json
import shutil

import pytest
from conftest import compute_table, make_llama, make_tokenizer

from dtm.cli import main
from dtm.config import load_config
from dtm.errors import ConfigError
from dtm.pipeline import STAGES, report_hash, run, seed_runs, status


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


@pytest.fixture(scope="module")
def finished(experiment):
    """A finished run, made once; read it, never change it (copy it with `own_copy`)."""
    return run(load_config(experiment / "exp.yaml"))


def own_copy(finished, tmp_path):
    """A test's own copy of the finished run, and the config pointed at it."""
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    return root, [f"output_dir={root}"]


def mtimes(paths):
    return [p.stat().st_mtime_ns for p in paths]


def test_run_writes_every_model_result_and_the_report(finished, experiment, monkeypatch):
    for seed in (1, 2):
        seed_dir = finished / f"seed-{seed}"
        names = {p.stem for p in (seed_dir / "eval").glob("*.json")}
        assert {"base", "vanilla", "vanilla@0.50", "sub-1", "sub-2", "DTM", "short", "soup", "wise_ft-0.5"} <= names
        assert (seed_dir / "models" / "DTM" / "config.json").is_file()
        manifest = json.loads((seed_dir / "manifests" / "data.json").read_text())
        assert manifest["outputs"]["train_data"] == "./data/train.jsonl"  # inside the run: relative, so the run can move
    report = (finished / "report.md").read_text()
    assert "| DTM |" in report and "| vanilla |" in report and "seeds: [1, 2]" in report
    assert all(row["state"] == "done" for row in status(finished))
    report_manifest = json.loads((finished / "manifests" / "report.json").read_text())
    assert report_manifest["hash"] == report_hash(load_config(experiment / "exp.yaml"))
    assert report_manifest["outputs"]["html"].endswith("report.html") and report_manifest["seconds"] > 0


def test_the_cost_table_is_compute_matched_with_max_steps(finished):
    """max_steps 4 is DTM's total: 2 steps per sub-model (K=2), vanilla 4, short 2, the soup 2 x 2."""
    table = compute_table((finished / "report.md").read_text())
    steps = {model: float(row["optimizer steps"]) for model, row in table.items()}
    assert steps["vanilla"] == steps["DTM"] == steps["soup"] == 4.0 and steps["short"] == 2.0
    assert table["DTM"]["sums"] == "sub-1, sub-2 + merge"


def test_a_moved_run_reports_and_resumes_where_it_is(finished, tmp_path, monkeypatch, experiment):
    root, _ = own_copy(finished, tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative run dir, as typed after `make demo`
    assert [row["state"] for row in status("run")] == ["done"] * len(status(finished))
    (root / "report.md").unlink()
    assert main(["report", "run"]) == 0  # rewrites the report (and its manifest) where the run is
    assert (root / "report.md").is_file() and status("run")[-1]["state"] == "done"
    train = root / "seed-1" / "manifests" / "train.json"
    before = mtimes([train])
    run(load_config(experiment / "exp.yaml", [f"output_dir={root}"]), report=False)
    assert mtimes([train]) == before  # nothing redone in the copy, which reads its own data split


def test_from_eval_redoes_evaluation_but_not_training_or_merging(finished, experiment, tmp_path):
    root, overrides = own_copy(finished, tmp_path)
    seed = root / "seed-1"
    kept = [seed / "manifests" / "train.json", seed / "manifests" / "merge.json", seed / "models" / "DTM" / "model.safetensors",
            seed / "models" / "sub-1" / "adapter_model.safetensors"]
    redone = [seed / "manifests" / "eval.json", seed / "eval" / "DTM.json", seed / "eval" / "base.json"]
    kept_before, redone_before = mtimes(kept), mtimes(redone)
    assert main(["run", str(experiment / "exp.yaml"), *overrides, "--from", "eval"]) == 0
    assert mtimes(kept) == kept_before
    assert all(after > before for after, before in zip(mtimes(redone), redone_before))


def test_status_follows_the_config_a_run_was_made_with(finished, tmp_path):
    root, _ = own_copy(finished, tmp_path)
    assert {row["state"] for row in status(root)} == {"done"}
    config = json.loads((root / "config.json").read_text())
    config["merge"] |= {"method": "task_arithmetic", "parameters": {"lambda": 0.5}}
    (root / "config.json").write_text(json.dumps(config))  # as if `dtm run` were started with a changed merge
    rows = {(r["run"], r["stage"]): r["state"] for r in status(root)}
    for seed in ("seed-1", "seed-2"):
        assert [rows[(seed, stage)] for stage in STAGES] == ["done", "done", "done", "stale", "stale"]
    assert rows[(".", "report")] == "stale"
    shutil.rmtree(root / "seed-2" / "manifests")
    assert {r["state"] for r in status(root) if r["run"] == "seed-2"} == {"pending"}


def test_status_shows_the_progress_of_a_half_finished_stage(finished, tmp_path, capsys):
    root, _ = own_copy(finished, tmp_path)
    trained = sorted(p.parent.name for p in (root / "seed-1" / "models").glob("*/training_complete.json"))
    evaluated = sorted((root / "seed-1" / "eval").glob("*.json"))
    for stage in ("train", "merge", "eval"):
        (root / "seed-1" / "manifests" / f"{stage}.json").unlink()  # killed in the train stage
    (root / "seed-1" / "models" / "vanilla" / "training_complete.json").unlink()
    for f in evaluated[:2]:
        f.unlink()
    rows = {r["stage"]: r for r in status(root) if r["run"] == "seed-1"}
    assert (rows["train"]["state"], rows["train"]["progress"]) == ("partial", f"{len(trained) - 1}/{len(trained)} models")
    assert (rows["merge"]["state"], rows["merge"]["progress"]) == ("partial", "3/3 models")  # DTM, soup, wise_ft-0.5
    assert rows["eval"]["progress"] == f"{len(evaluated) - 2}/{len(evaluated)} models"
    assert rows["data"]["progress"] is None and rows["data"]["state"] == "done"
    assert main(["status", str(root)]) == 0
    assert f"partial {len(trained) - 1}/{len(trained)} models" in capsys.readouterr().out
    manifest = json.loads((root / "seed-2" / "manifests" / "train.json").read_text())
    assert manifest["attempts"] == 1 and not (root / "seed-2" / "manifests" / "train.attempts.json").exists()


@pytest.mark.parametrize("method", ["fisher", "greedy_soup"])
def test_every_merge_method_the_config_accepts_runs(finished, experiment, tmp_path, method):
    root, overrides = own_copy(finished, tmp_path)
    seed = root / "seed-1"
    trained = mtimes([seed / "manifests" / "train.json"])
    run(load_config(experiment / "exp.yaml", [*overrides, f"merge.method={method}"]))
    assert mtimes([seed / "manifests" / "train.json"]) == trained  # a new merge reuses the sub-models
    record = json.loads((seed / "models" / "DTM" / "dtm_merge.json").read_text())
    assert record["method"] == method
    if method == "fisher":
        assert [p.name for p in sorted((seed / "fisher").iterdir())] == ["sub-1.safetensors", "sub-2.safetensors"]
        assert record["parameters"]["fisher_files"] == [str(seed / "fisher" / "sub-1.safetensors"), str(seed / "fisher" / "sub-2.safetensors")]
    else:
        assert len(record["trace"]) == 2 and {t["model"] for t in record["trace"]} == {str(seed / "models" / "sub-1"), str(seed / "models" / "sub-2")}
    assert (seed / "eval" / "DTM.json").is_file() and "| DTM |" in (root / "report.md").read_text()


def test_a_config_the_run_cannot_execute_fails_before_training(experiment, tmp_path):
    out = tmp_path / "never"
    bad = experiment / "bad.yaml"  # beside its data
    bad.write_text((experiment / "exp.yaml").read_text().replace("val_size: 4", "val_size: 0") + "merge:\n  method: greedy_soup\n")
    line = bad.read_text().splitlines().index("  method: greedy_soup") + 1
    with pytest.raises(ConfigError, match=rf"bad\.yaml:{line}: merge\.method: greedy_soup scores soups on held-out"):
        run(load_config(bad, [f"output_dir={out}"]))
    with pytest.raises(ConfigError, match=r"override 'merge.parameters=\{alpha: 1\}': merge\.parameters: method 'ties' has no parameter 'alpha'"):
        run(experiment / "exp.yaml", [f"output_dir={out}", "merge.method=ties", "merge.parameters={alpha: 1}"])
    assert main(["run", str(experiment / "exp.yaml"), f"output_dir={out}", "merge.method=ties", "merge.parameters={alpha: 1}"]) == 2
    assert main(["run", str(experiment / "exp.yaml"), f"output_dir={out}", "baselines.methods=[replay]"]) == 2
    assert not out.exists()


def test_lab_control_runs_on_the_first_control_seeds():
    cfg = load_config(None, ["data.path=lab", "model.model_name_or_path=lab", "seeds=[1, 2, 3]", "lab.control_seeds=2"], check_paths=False)
    runs = seed_runs(cfg)
    assert [(r.cfg.seed, r.dir.control) for r in runs] == [(1, False), (2, False), (3, False), (1, True), (2, True)]
    assert all(r.dir.root.parent.name == "control-nobias" and r.cfg.baselines.methods == [] for r in runs if r.dir.control)


def test_lm_eval_tasks_run_on_every_model_beside_ours(finished, experiment, tmp_path):
    pytest.importorskip("lm_eval")
    root, overrides = own_copy(finished, tmp_path)
    tasks = tmp_path / "lm_eval_tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(
        f"task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {experiment / 'mc.jsonl'}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    run(load_config(experiment / "exp.yaml", [*overrides, "seeds=[1]", "eval.lm_eval_tasks=[local_mc]", f"eval.lm_eval_include={tasks}",
                                              "baselines.methods=[]", "train.save_fractions=[]"]))  # 5 models: lm-eval is slow to start
    for name in ("base", "sub-1", "DTM"):  # a full model, a LoRA adapter (lm-eval's peft=), a merge
        results = json.loads((root / "seed-1" / "eval" / f"{name}.json").read_text())
        assert results["local_mc"]["type"] == "lm-eval" and 0 <= results["local_mc"]["metrics"]["acc"] <= 1
        assert "mc" in results  # ours, beside it
    assert "| model | mc | local_mc |" in (root / "report.md").read_text()  # a column of the report


def test_report_on_an_unfinished_run_is_refused_unless_partial(finished, tmp_path, capsys):
    from dtm.errors import DtmError
    from dtm.pipeline import write_report

    root, _ = own_copy(finished, tmp_path)
    (root / "seed-2" / "manifests" / "eval.json").unlink()  # seed 2's evaluation did not finish
    (root / "seed-2" / "eval" / "DTM.json").unlink()
    rows = {(r["run"], r["stage"]): r["state"] for r in status(root)}
    assert rows[("seed-2", "eval")] == "partial" and rows[(".", "report")] != "done"  # the other models' results are there
    with pytest.raises(DtmError, match=r"seed-2: eval stage not done.*--partial"):
        write_report(root)
    assert main(["report", str(root)]) == 2
    assert "seed-2: eval stage not done" in capsys.readouterr().err
    md, page = write_report(root, partial=True)
    assert md.read_text().startswith("**PARTIAL REPORT: missing seed-2: eval stage not done")
    assert "PARTIAL REPORT: missing" in page.read_text().split("<body>")[1][:300]
    assert {(r["run"], r["stage"]): r["state"] for r in status(root)}[(".", "report")] == "partial"


def test_report_names_a_missing_result_file_of_a_finished_eval(finished, tmp_path):
    from dtm.errors import DtmError
    from dtm.pipeline import write_report

    root, _ = own_copy(finished, tmp_path)
    (root / "seed-1" / "eval" / "sub-2.json").unlink()
    with pytest.raises(DtmError, match=r"seed-1: no evaluation result for sub-2"):
        write_report(root)
    assert main(["report", "--partial", str(root)]) == 0
    assert (root / "report.md").read_text().startswith("**PARTIAL REPORT: missing seed-1: no evaluation result for sub-2")


def test_redone_steps_are_shown_in_status_and_the_report_only_when_some(finished, tmp_path, capsys, monkeypatch):
    """A run with nothing redone shows no `redone` column and no line; one whose vanilla (seed 1)
    resumed from step 4 after an interrupted attempt had reached step 7 (its attempts file, and the
    train manifest's sum, as `stage_train` writes them) shows 3 steps on that stage's row and one
    line under the report's compute table."""
    from dtm.io import atomic_write_json, atomic_write_jsonl
    from dtm.pipeline import write_report
    from dtm.rundir import attempts_file

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps a table to 80 columns when not on a terminal
    root, _ = own_copy(finished, tmp_path)
    assert all(not r.get("redone") for r in status(root))
    assert main(["status", str(root)]) == 0
    assert "redone" not in next(line for line in capsys.readouterr().out.splitlines() if "┃ run" in line)  # the header
    assert "Redone" not in write_report(root)[0].read_text()

    atomic_write_jsonl(attempts_file(root / "seed-1" / "models" / "vanilla"),
                       [{"resumed_from_step": 4, "redone_steps": 3, "host": "node-2", "time": 0.0}])
    manifest_file = root / "seed-1" / "manifests" / "train.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["outputs"]["redone_steps"] = {"vanilla": 3}
    atomic_write_json(manifest_file, manifest)
    rows = {(r["run"], r["stage"]): r for r in status(root)}
    assert rows[("seed-1", "train")]["redone"] == {"vanilla": 3} and rows[("seed-2", "train")]["redone"] == {}
    assert rows[("seed-1", "train")]["state"] == "done"
    assert main(["status", str(root)]) == 0 and "3 steps (vanilla 3)" in capsys.readouterr().out
    md, page = write_report(root)
    lines = [line for line in md.read_text().splitlines() if line.startswith("Redone")]
    assert lines == ["Redone after interrupted attempts (lost nodes, killed runs), seed 1, train: 3 steps (vanilla 3)."]
    assert "seed 1, train: 3 steps (vanilla 3)" in page.read_text()
