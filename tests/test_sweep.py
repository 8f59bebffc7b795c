"""Sweeps: the `sweep:` section's validation, its cells, and a pico sweep end to end.

The sweep (one_at_a_time over merge.method and disperse.k, pico Llama, one seed) is made once
per module, and it is made the hard way: its run crashes in the third cell and is run again,
so every test below reads a sweep that was interrupted and resumed.
"""

import json
import os
import shutil

import pytest
from conftest import make_llama, make_tokenizer

from dtm import pipeline
from dtm import rundir as rd
from dtm.cli import main
from dtm.config import load_config
from dtm.errors import ConfigError
from dtm.sweep import evaluations, plan_sweep, run, status, trainings


def write_config(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------- validation (no training)


def test_every_bad_sweep_key_and_value_is_named_with_its_line(tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", """\
sweep:
  mode: one_at_a_time
  disperse.k: [2, 0]
  merge:
    method: [average, nope]
  disperse: [{strategy: kmeans}, {embed_on: sideways}]
  train.bogus: [1]
  seeds: [[1, 2]]
  lab.wrong_rate: 0.3
  merge.weights: [null, null]
""")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    lines = str(e.value).splitlines()[1:]
    assert lines == [
        f"  {cfg}:3: sweep.disperse.k: value 0: disperse.k: Input should be greater than or equal to 1",
        f"  {cfg}:5: sweep.merge.method: value 'nope': merge.method: unknown value 'nope'; choose one of "
        + lines[1].split("choose one of ", 1)[1],
        f"  {cfg}:6: sweep.disperse: value {{'embed_on': 'sideways'}}: disperse.embed_on: Input should be 'instruction', 'response' or 'both'",
        f"  {cfg}:7: sweep.train.bogus: value 1: train.bogus: unknown key (not a config setting; `dtm config init` lists them)",
        f"  {cfg}:8: sweep.seeds: seeds cannot be swept (every cell runs all `seeds` into its own directory)",
        f"  {cfg}:9: sweep.lab.wrong_rate: expected a non-empty list of values, got 0.3",
        f"  {cfg}:10: sweep.merge.weights: value None is listed twice; list each value once",
    ]
    assert "average" in lines[1] and "ties" in lines[1]


def test_a_sweep_given_as_an_override_is_checked_and_named(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'sweep.disperse.k=\[2, -1\]': sweep.disperse.k: value -1"):
        load_config(None, ["sweep.disperse.k=[2, -1]"])


def test_one_at_a_time_cells_share_the_center_and_grid_cells_cover_every_combination(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "disperse.k=4", "sweep.mode=one_at_a_time",
                             "sweep.disperse.k=[2, 4]", "sweep.merge.method=[average, ties]"])
    sweep = plan_sweep(cfg)
    assert [c.name for c in sweep.cells] == ["center", "disperse.k=2", "merge.method=ties"]
    assert [(a.key, a.points) for a in sweep.axes] == [
        ("disperse.k", [(2, "disperse.k=2"), (4, "center")]), ("merge.method", [("average", "center"), ("ties", "merge.method=ties")])]
    cell = sweep.cell("disperse.k=2").cfg
    assert (cell.disperse.k, cell.merge.method, cell.sweep.axes) == (2, "average", {})
    assert cell.output_dir == str(rd.RunDir(tmp_path).sweep_cell("disperse.k=2").root)

    grid = plan_sweep(load_config(None, [f"output_dir={tmp_path}", "sweep.disperse.k=[2, 4]", "sweep.merge.method=[average, ties]"]))
    assert [c.name for c in grid.cells] == ["disperse.k=2,merge.method=average", "disperse.k=2,merge.method=ties",
                                            "disperse.k=4,merge.method=average", "disperse.k=4,merge.method=ties"]


def test_a_mapping_value_is_merged_into_its_section(tmp_path):
    cfg = write_config(tmp_path / "s.yaml", """\
disperse: {k: 3, balance: true}
sweep:
  mode: one_at_a_time
  disperse: [{strategy: kmeans, embed_on: both}]
""")
    cell = plan_sweep(load_config(cfg)).cells[1]
    assert cell.name == "disperse.strategy=kmeans,disperse.embed_on=both"
    d = cell.cfg.disperse
    assert (d.k, d.balance, d.strategy, d.embed_on) == (3, True, "kmeans", "both")


# ---------------------------------------------------------------- a pico sweep, interrupted and resumed


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A finished sweep made in two goes (the first crashes in the third cell's merge stage), with
    the mtimes of the first cell's models between the goes."""
    tmp = tmp_path_factory.mktemp("sweep")
    make_llama(seed=0).save_pretrained(tmp / "base")
    make_tokenizer().save_pretrained(tmp / "base")
    with open(tmp / "data.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"instruction": f"What is {i} + 1?", "input": "", "output": f"{i + 1}.", "source": "math" if i % 2 else "chat"}) + "\n")
    with open(tmp / "mc.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"id": str(i), "question": f"What is {i} + 1?", "choices": [f"{i + 1}.", f"{i + 2}.", f"{i}."], "answer": 0}) + "\n")
    config = write_config(tmp / "exp.yaml", f"""\
output_dir: {tmp / 'run'}
seed: 1
model: {{model_name_or_path: base}}
data: {{path: data.jsonl, cutoff_len: 64, val_size: 4}}
disperse: {{k: 2}}
train: {{max_steps: 4, per_device_train_batch_size: 4, gradient_accumulation_steps: 1, warmup_steps: 0, learning_rate: 0.01}}
eval: {{suites: [], tasks: [mc.jsonl], batch_size: 8}}
sweep:
  mode: one_at_a_time
  merge.method: [average, ties]
  disperse.k: [2, 1]
""")
    cfg = load_config(config)
    merge_stage = pipeline.STAGE_FUNCTIONS["merge"]

    def crash_in_k1(r):
        if r.cfg.disperse.k == 1:
            raise RuntimeError("killed")
        return merge_stage(r)

    pipeline.STAGE_FUNCTIONS["merge"] = crash_in_k1
    try:
        with pytest.raises(RuntimeError, match="killed"):
            run(cfg)
    finally:
        pipeline.STAGE_FUNCTIONS["merge"] = merge_stage
    center = rd.RunDir(tmp / "run").sweep_cell("center").seed_run(1)
    before = {p: p.stat().st_mtime_ns for p in center.models.rglob("*.safetensors")}
    k1_trained = {p: p.stat().st_mtime_ns for p in rd.RunDir(tmp / "run").sweep_cell("disperse.k=1").seed_run(1).models.rglob("*.safetensors")}
    root = run(load_config(config))
    return root, cfg, before, k1_trained


def cell_run(root, name):
    return rd.RunDir(root).sweep_cell(name).seed_run(1)


def inode(model_dir):
    """The weights file's inode (a LoRA adapter here): equal inodes are one file, linked."""
    (weights,) = model_dir.glob("*.safetensors")
    return weights.stat().st_ino


def test_a_merge_method_cell_trains_nothing_and_a_k_cell_reuses_vanilla(swept):
    root, cfg, _, _ = swept
    center, ties, k1 = (cell_run(root, n) for n in ("center", "merge.method=ties", "disperse.k=1"))
    for name in ("sub-1", "sub-2", "vanilla"):  # the same files: linked, not trained again
        assert inode(ties.model(name)) == inode(center.model(name))
    assert inode(k1.model("vanilla")) == inode(center.model("vanilla"))
    # K=1's one sub-model trains on all the data with vanilla's recipe (no snapshots): vanilla's job, linked
    assert inode(k1.model("sub-1")) == inode(center.model("vanilla")) != inode(center.model("sub-1"))
    assert (ties.model("DTM") / "dtm_merge.json").is_file() and json.loads((ties.model("DTM") / "dtm_merge.json").read_text())["method"] == "ties"
    # 3 models in the center, 3 in the ties cell (all linked), 2 in the K=1 cell (both linked)
    assert trainings(plan_sweep(cfg)) == {"planned": 8, "linked": 5, "trained": 3}


def test_an_interrupted_sweep_resumes_without_redoing_finished_work(swept):
    root, _, before, k1_trained = swept
    center = cell_run(root, "center")
    assert {p: p.stat().st_mtime_ns for p in center.models.rglob("*.safetensors")} == before
    k1 = cell_run(root, "disperse.k=1")
    assert k1_trained and {p: p.stat().st_mtime_ns for p in k1_trained} == k1_trained  # trained before the crash, kept
    assert k1.manifest("merge") is not None and (k1.model("DTM") / "config.json").is_file()


def test_every_cell_is_an_ordinary_run_and_status_shows_the_grid(swept, capsys):
    root, cfg, _, _ = swept
    rows = status(root)
    cells = [c.name for c in plan_sweep(cfg).cells]
    assert {r["run"].split("/")[0] for r in rows} == {*cells, "."}
    assert all(r["state"] == "done" for r in rows), [r for r in rows if r["state"] != "done"]
    for name in cells:
        assert all(r["state"] == "done" for r in pipeline.status(rd.RunDir(root).sweep_cell(name).root))
    assert main(["status", str(root)]) in (0, None)
    out = capsys.readouterr().out
    assert "disperse.k=1/seed-1" in out and "sweep report" in out


def test_the_sweep_report_has_every_cell_and_a_plot_per_axis(swept):
    root, _, _, _ = swept
    md = (root / "report.md").read_text()
    for name in ("center", "merge.method=ties", "disperse.k=1"):
        assert f"| {name} |" in md
    assert "8 models; 5 were linked from a sibling cell" in md
    for png in ("sweep-merge-method.png", "sweep-disperse-k.png"):
        assert (root / png).stat().st_size > 1000 and f"]({png})" in md
    assert "DTM's mc" in md
    assert 'id="sweep-table"' in (root / "report.html").read_text()


def test_a_changed_cell_is_stale_until_it_is_run_again(swept, tmp_path):
    root, _, _, _ = swept
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["output_dir"] = str(copy)
    cfg["sweep"]["axes"]["merge.method"] = ["average", "dare_ties"]
    (copy / "config.json").write_text(json.dumps(cfg))
    rows = {(r["run"], r["stage"]): r["state"] for r in status(copy)}
    assert rows[("merge.method=dare_ties/seed-1", "data")] == "pending"
    assert rows[(".", "sweep report")] == "stale"
    assert os.path.isdir(copy / "sweep" / "merge.method=ties")  # a cell no longer swept is left alone


def test_the_analyses_config_plans_every_axis_around_the_lab_config():
    """examples/lab-analyses.yaml (`make analyses`): the lab's training recipe, each axis alone, 3 seeds."""
    from pathlib import Path

    root = Path(__file__).parent.parent
    cfg = load_config(root / "examples" / "lab-analyses.yaml", check_paths=False)
    lab_cfg = load_config(root / "src" / "dtm" / "configs" / "lab.yaml", check_paths=False)
    assert cfg.train.model_dump(exclude={"save_fractions"}) == lab_cfg.train.model_dump(exclude={"save_fractions"})
    sweep = plan_sweep(cfg)
    points = {a.key: [v for v, _ in a.points] for a in sweep.axes}
    assert points["disperse.k"] == [1, 2, 4, 8] and cfg.seeds == [1, 2, 3]
    assert [p["method"] for p in points["merge"]] == ["average", "fisher", "task_arithmetic", "ties", "dare_ties"]
    assert points["lab.wrong_rate"] == [0.0, 0.3, 0.6]
    assert cfg.sweep.center_only == ["baselines", "sub_models"]  # the cuts that fit the 30-minute budget
    assert sweep.cells[-5].name == "merge.method=dare_ties,merge.parameters.density=0.5,merge.parameters.normalize=True"
    assert len(sweep.cells) == 1 + 3 + 4 + 4 + 1 + 3  # center + each axis's other values


def test_a_result_whose_model_and_tasks_are_unchanged_is_linked_not_scored_again(swept):
    """Evaluation reuse: the ties cell scores only its merge, the K=1 cell its own models."""
    root, cfg, _, _ = swept
    center, ties, k1 = (cell_run(root, n) for n in ("center", "merge.method=ties", "disperse.k=1"))
    same = {name: os.path.samefile(ties.eval_result(name), center.eval_result(name)) for name in center.outputs("eval")["models"]}
    assert same == {rd.BASE: True, rd.VANILLA: True, "sub-1": True, "sub-2": True, rd.DTM: False}
    assert os.path.samefile(k1.eval_result(rd.VANILLA), center.eval_result(rd.VANILLA))
    assert not os.path.samefile(k1.eval_result("sub-1"), center.eval_result("sub-1"))
    # K=1's sub-1 is the center's vanilla under another name: its result is reused, not scored again
    assert os.path.samefile(k1.eval_result("sub-1"), center.eval_result(rd.VANILLA))
    assert not os.path.samefile(k1.eval_result(rd.DTM), center.eval_result(rd.VANILLA))  # a merge of one: new files, scored
    assert json.loads(ties.eval_result(rd.DTM).read_text())["mc"]["run_key"] != json.loads(center.eval_result(rd.DTM).read_text())["mc"]["run_key"]
    # center 5 scored; ties 4 of 5 linked; K=1 (base, vanilla, sub-1, DTM) all but DTM linked
    assert evaluations(plan_sweep(cfg)) == {"planned": 14, "linked": 7, "scored": 7}
    assert "14 results; 7 are a sibling cell's result" in (root / "report.md").read_text()


def test_a_stage_redone_on_request_is_never_linked_from_a_cell_not_yet_redone(swept, tmp_path):
    """`dtm run --from eval` on a sweep rescores the first cell (its siblings' results, current but
    not redone, are not linked back), and later cells link the fresh results."""
    root, _, _, _ = swept
    copy = tmp_path / "run"
    shutil.copytree(root, copy)  # copy2: the same mtimes, so the copy's results are current
    cfg = json.loads((copy / "config.json").read_text())
    cfg["output_dir"] = str(copy)
    (copy / "config.json").write_text(json.dumps(cfg))
    old = {n: cell_run(copy, n).eval_result(rd.BASE).stat().st_ino for n in ("center", "merge.method=ties")}
    run(pipeline.load_run_config(copy), from_stage="eval")
    center, ties = cell_run(copy, "center"), cell_run(copy, "merge.method=ties")
    assert center.eval_result(rd.BASE).stat().st_ino not in old.values()  # scored again
    assert os.path.samefile(ties.eval_result(rd.BASE), center.eval_result(rd.BASE))  # then linked


def test_each_axis_gets_one_sentence_and_no_clear_effect_where_the_spread_covers_it():
    from dtm.report.sweep import axis_summary

    points = [("1", {"knowledge": [0.80, 0.82, 0.81], "format": [0.90, 0.99, 0.84], "mc": [0.5]}),
              ("4", {"knowledge": [0.97, 0.98, 0.975], "format": [0.93, 0.88, 0.90], "mc": [0.6]})]
    said = axis_summary("disperse.k", points, ["knowledge", "format", "mc"])
    assert said.startswith("Along disperse.k: DTM's knowledge is highest at 4 (0.975) and lowest at 1 (0.810; 0.165 apart, seed spread 0.010)")
    assert "DTM's mc is highest at 4 (0.600) and lowest at 1 (0.500; one seed, no spread to judge by)" in said
    assert said.endswith("; no clear effect on DTM's format (the differences are within the seed spread).")
    assert said.count(". ") == 0  # one sentence
    assert axis_summary("merge.method", points[:1], ["knowledge"]) == "Along merge.method: fewer than two finished values."
    one_seed = axis_summary("lab.scale", [("1.0", {"k": [0.9]}), ("0.357", {"k": [0.5]})], ["k"])
    assert one_seed == "Along lab.scale (one seed, so no spread to judge by): DTM's k is highest at 1.0 (0.900) and lowest at 0.357 (0.500)."



def test_the_cell_tables_are_one_column_a_task_and_bold_only_a_real_best():
    """The headline (DTM) and the detail tables (ensemble, vanilla) have one column a task; bold
    marks a cell only where it leads its column beyond the evaluation's standard error, never a
    shared top (K=1's DTM is vanilla's job: the same numbers as the vanilla linked into every cell)."""
    from dtm.report.sweep import SweepScores, cell_table

    def cell(dtm, vanilla):
        return {rd.DTM: {"knowledge": dtm[0], "format": dtm[1]}, rd.VANILLA: {"knowledge": vanilla[0], "format": vanilla[1]}}

    shared = ([0.82, 0.80, 0.84], [0.988, 0.98, 0.996])  # one vanilla, linked into three cells
    names = ("center", "disperse.k=1", "disperse.k=8", "lab.wrong_rate=0.0")
    scores = SweepScores(
        ["knowledge", "format"],
        {"center": cell(([0.97, 0.98, 0.975], [0.975, 0.97, 0.98]), shared),
         "disperse.k=1": cell(shared, shared),
         "disperse.k=8": cell(([0.99, 0.995, 0.994], [0.70, 0.69, 0.70]), shared),
         "lab.wrong_rate=0.0": cell(([0.996, 0.995, 0.997], [0.979, 0.979, 0.979]), ([0.986, 0.98, 0.99], [0.983, 0.97, 0.99]))},
        [],
        {n: {m: {"knowledge": [0.004] * 3, "format": [0.012] * 3} for m in (rd.DTM, rd.VANILLA)} for n in names},
    )
    dtm, vanilla = cell_table(scores, rd.DTM).body, cell_table(scores, rd.VANILLA).body
    assert dtm.header == vanilla.header == ["cell", "knowledge", "format"]

    def bold(table):
        return {(row[0].text, table.header[i]) for row in table.rows for i, c in enumerate(row) if c.best}

    # DTM knowledge: 0.996 against 0.993 is within hypot(0.004, 0.004); format: K=1's 0.988 against
    # 0.979 within hypot(0.012, 0.012): no best in either column
    assert bold(dtm) == set()
    # vanilla knowledge: 0.985 leads the shared 0.82 far beyond the error; vanilla format: the top
    # (0.988) is one model in three cells, a tie: no best
    assert bold(vanilla) == {("lab.wrong_rate=0.0", "knowledge")}
    scores.cells["lab.wrong_rate=0.0"][rd.DTM]["knowledge"] = [0.95] * 3  # K=8's 0.993 now leads 0.975 beyond the error
    assert bold(cell_table(scores, rd.DTM).body) == {("disperse.k=8", "knowledge")}


def test_center_only_keeps_the_cuts_to_the_main_config_and_the_cells_still_share_its_models(tmp_path):
    """`sweep.center_only` (documented cuts, none by default): only the main config's cell runs
    `baselines.methods` and scores each sub-model on its own; the other cells' sub-models and vanilla
    are still the center's jobs (the baselines section matters only to a trained baseline's job),
    so they are linked, not trained, and their merge (and ensemble) are still scored."""
    from dtm import plan
    from dtm.pipeline import seed_runs
    from dtm.sweep import job_key

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}) + "\n" for i in range(8)))
    config = write_config(tmp_path / "exp.yaml", f"""\
output_dir: {tmp_path / 'run'}
model: {{model_name_or_path: org/some-model}}
data: {{path: {data}}}
baselines: {{methods: [ensemble, l2]}}
eval: {{suites: [], tasks: [mc.jsonl]}}
sweep:
  mode: one_at_a_time
  merge.method: [average, ties]
  disperse.k: [4, 2]
""")
    names = ["center", "merge.method=ties", "disperse.k=2"]
    every = plan_sweep(load_config(config, check_paths=False))
    assert {c.name: (c.cfg.baselines.methods, c.cfg.eval.sub_models) for c in every.cells} == dict.fromkeys(names, (["ensemble", "l2"], True))
    cfg = load_config(config, ["sweep.center_only=[baselines]"], check_paths=False)
    sweep = plan_sweep(cfg)
    assert {c.name: c.cfg.baselines.methods for c in sweep.cells} == {"center": ["ensemble", "l2"], "merge.method=ties": [], "disperse.k=2": []}
    center, ties = (seed_runs(sweep.cell(name).cfg)[0] for name in ("center", "merge.method=ties"))
    job = {"data": str(data), "train": {"save_fractions": []}, "seed": cfg.seed}
    assert job_key(center, job, {}) == job_key(ties, job, {})  # a sub-model or vanilla: the same job
    l2 = job | {"baseline": "l2"}
    assert job_key(center, l2, {}) != job_key(ties, l2, {})  # a trained baseline reads the baselines section

    both = plan_sweep(load_config(config, ["sweep.center_only=[baselines, sub_models]"], check_paths=False))
    inputs = plan.Inputs(base="org/some-model", train_data=str(data))
    evaluated = {c.name: list(plan.evaluated_models(c.cfg, rd.RunDir(tmp_path / c.name).seed_run(1), inputs)) for c in both.cells}
    assert evaluated == {"center": ["base", "vanilla", "sub-1", "sub-2", "sub-3", "sub-4", "l2", "DTM", "ensemble"],
                         "merge.method=ties": ["base", "vanilla", "DTM"], "disperse.k=2": ["base", "vanilla", "DTM"]}
