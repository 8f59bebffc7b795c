"""The plan of a run: which models each stage makes, by name, from the config alone."""

from pathlib import Path

from dtm import plan
from dtm.config import load_config
from dtm.rundir import RunDir

INPUTS = plan.Inputs(base="/base", train_data="/data/train.jsonl", val_data="/data/validation.jsonl")


def config(*overrides):
    return load_config(None, ["data.path=lab", "model.model_name_or_path=lab", "disperse.k=3", "train.num_train_epochs=6",
                              "train.save_fractions=[0.5]", *overrides], check_paths=False)


def test_dtm_and_vanilla_are_always_planned():
    cfg = config()
    run = RunDir(Path("/runs/x")).seed_run(cfg.seed)
    jobs = plan.training_jobs(cfg, run, INPUTS)
    assert list(jobs) == ["sub-1", "sub-2", "sub-3", "vanilla"]
    assert jobs["sub-2"]["data"] == str(run.portions / "portion-2.jsonl") and jobs["sub-2"]["train"] == {"save_fractions": []}
    assert jobs["vanilla"] == {"data": INPUTS.train_data, "train": {"save_fractions": [0.5]}, "seed": cfg.seed, "val_data": INPUTS.val_data}
    merges = plan.merge_plan(cfg, run, INPUTS)
    assert list(merges) == ["DTM"] and merges["DTM"]["models"] == [run.model(f"sub-{i}") for i in (1, 2, 3)]
    assert list(plan.evaluated_models(cfg, run, INPUTS)) == ["base", "vanilla", "sub-1", "sub-2", "sub-3", "DTM"]


def test_every_registered_baseline_adds_its_models():
    cfg = config(f"baselines.methods={list(plan.BASELINES)}", "baselines.soup_size=3", "baselines.wise_ft_alphas=[0.5]",
                 "baselines.soup_learning_rates=[0.1, 0.2]")
    run = RunDir(Path("/runs/x")).seed_run(cfg.seed)
    jobs = plan.training_jobs(cfg, run, INPUTS)
    assert list(jobs) == ["sub-1", "sub-2", "sub-3", "vanilla", "short", "soup-1", "soup-2", "soup-3", "l2", "ewc", "replay", "curation",
                          "lora_moe"]
    assert jobs["lora_moe"] == {"data": INPUTS.train_data, "train": {"save_fractions": []}, "seed": cfg.seed, "baseline": "lora_moe"}
    assert jobs["short"]["train"] == {"num_train_epochs": 2.0, "save_fractions": []}  # the compute of one sub-model
    assert [jobs[f"soup-{j}"]["train"].get("learning_rate") for j in (1, 2, 3)] == [0.1, 0.2, 0.1]
    assert [jobs[f"soup-{j}"]["seed"] for j in (1, 2, 3)] == [cfg.seed, cfg.seed + 1000, cfg.seed + 2000]
    assert jobs["ewc"]["baseline"] == "ewc"
    merges = plan.merge_plan(cfg, run, INPUTS)
    assert list(merges) == ["DTM", "soup", "wise_ft-0.5"]
    assert merges["soup"]["models"] == [run.model(f"soup-{j}") for j in (1, 2, 3)]
    assert merges["wise_ft-0.5"]["parameters"] == {"alpha": 0.5}
    models = plan.evaluated_models(cfg, run, INPUTS)
    assert "soup-2" not in models and models["ensemble"] == [str(run.model(f"sub-{i}")) for i in (1, 2, 3)]


def test_the_soup_reuses_short_when_its_recipe_is_vanillas():
    cfg = config("baselines.methods=[soup]", "baselines.soup_size=2")
    run = RunDir(Path("/runs/x")).seed_run(cfg.seed)
    assert list(plan.training_jobs(cfg, run, INPUTS))[-2:] == ["short", "soup-2"]
    assert plan.merge_plan(cfg, run, INPUTS)["soup"]["models"] == [run.model("short"), run.model("soup-2")]


def steps_of(jobs):
    return {name: job["train"].get("max_steps") for name, job in jobs.items()}


def test_max_steps_is_dtms_total_compute_and_vanilla_gets_the_same():
    cfg = config("train.max_steps=10", "disperse.k=4", "baselines.methods=[short, soup, l2, ewc]", "baselines.soup_size=2",
                 "baselines.soup_learning_rates=[0.1]")
    jobs = plan.training_jobs(cfg, RunDir(Path("/runs/x")).seed_run(cfg.seed), INPUTS)
    steps = steps_of(jobs)
    assert [steps[f"sub-{i}"] for i in (1, 2, 3, 4)] == [2, 2, 2, 2]  # 10 // 4, rounded down
    assert steps["vanilla"] == steps["l2"] == steps["ewc"] == 8 == sum(steps[f"sub-{i}"] for i in (1, 2, 3, 4))
    assert steps["short"] == steps["soup-2"] == 2  # one sub-model's compute
    assert steps["soup-1"] == 2 and jobs["soup-1"]["train"]["learning_rate"] == 0.1
    assert jobs["vanilla"]["train"]["save_fractions"] == [0.5] and jobs["sub-1"]["train"]["save_fractions"] == []
    assert sum(steps[n] for n in ("soup-1", "soup-2")) == plan.sub_model_steps(cfg) * cfg.baselines.soup_size


def test_max_steps_below_k_gives_every_sub_model_one_step():
    cfg = config("train.max_steps=2", "baselines.methods=[short]")  # K = 3
    steps = steps_of(plan.training_jobs(cfg, RunDir(Path("/runs/x")).seed_run(cfg.seed), INPUTS))
    assert steps == {"sub-1": 1, "sub-2": 1, "sub-3": 1, "vanilla": 3, "short": 1}


def test_epochs_leave_every_length_to_the_config():
    cfg = config(f"baselines.methods={list(plan.BASELINES)}", "baselines.soup_size=3")  # 6 epochs, K = 3
    jobs = plan.training_jobs(cfg, RunDir(Path("/runs/x")).seed_run(cfg.seed), INPUTS)
    assert all("max_steps" not in job["train"] for job in jobs.values())
    assert {name: job["train"].get("num_train_epochs") for name, job in jobs.items() if "num_train_epochs" in job["train"]} == \
        {"short": 2.0, "soup-2": 2.0, "soup-3": 2.0}  # 1/K of the epochs; the soup's first ingredient is short


def test_the_eval_pool_gets_the_ensemble_first_and_vanilla_keeps_the_validation_split_only_for_its_snapshots():
    """The ensemble of K costs K models' passes: submitted last (the plan's order), one worker scored
    it alone at the end of the stage; longest first, the other worker shares out the rest."""
    from dtm.pipeline import longest_first

    cfg = config("baselines.methods=[ensemble]")
    run = RunDir(Path("/runs/x")).seed_run(cfg.seed)
    models = plan.evaluated_models(cfg, run, INPUTS)
    assert list(models)[-1] == "ensemble"
    order = longest_first(models)
    assert order[0] == "ensemble" and sorted(order) == sorted(models) and order[1:] == [m for m in models if m != "ensemble"]
    # without snapshots the validation split is read by nothing: vanilla's job is then the data alone
    assert "val_data" not in plan.training_jobs(config("train.save_fractions=[]"), run, INPUTS)["vanilla"]
    assert plan.training_jobs(cfg, run, INPUTS)["vanilla"]["val_data"] == INPUTS.val_data


def test_without_sub_model_evaluations_the_merge_and_the_ensemble_are_still_evaluated():
    cfg = config("baselines.methods=[ensemble]", "eval.sub_models=false")
    run = RunDir(Path("/runs/x")).seed_run(cfg.seed)
    models = plan.evaluated_models(cfg, run, INPUTS)
    assert list(models) == ["base", "vanilla", "DTM", "ensemble"]
    assert models["ensemble"] == [str(run.model(f"sub-{i}")) for i in (1, 2, 3)]
    assert list(plan.training_jobs(cfg, run, INPUTS)) == ["sub-1", "sub-2", "sub-3", "vanilla"]  # still trained


def test_work_done_while_the_pool_waits_gets_the_pool_cores_then_gives_them_back():
    """The k-means dispersal embeds in the main process while the training workers wait: with
    `make analyses`' OMP_NUM_THREADS=1 it used one of the two cores."""
    import torch

    from dtm.pipeline import pool_cores

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pool_cores(2):
            assert torch.get_num_threads() == (1 if torch.cuda.is_available() else 2)
        assert torch.get_num_threads() == 1
        with pool_cores(1):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_eval_sub_models_at_its_default_leaves_the_stage_hashes_of_runs_made_before_it():
    """A run made before `eval.sub_models` existed hashed an eval section without it: at the default
    the key is left out of the hash, so that run's eval stage stays up to date (not cleared)."""
    import hashlib
    import json

    from dtm.pipeline import STAGE_SECTIONS, STAGES, base_fingerprint, stage_hashes

    cfg = config()
    dump = cfg.model_dump(mode="json")
    del dump["eval"]["sub_models"]  # the config as an earlier version dumped it
    sections, before = ["seed"], {}
    for stage in STAGES:
        sections += STAGE_SECTIONS[stage]
        blob = json.dumps({"control": False, "base": base_fingerprint(cfg), **{s: dump[s] for s in sections}}, sort_keys=True)
        before[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert stage_hashes(cfg) == before
    off = stage_hashes(config("eval.sub_models=false"))
    assert off["eval"] != before["eval"] and off["train"] == before["train"]
