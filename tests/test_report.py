import json
import math
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtm.report import (
    SECTIONS,
    GroupTable,
    ReportData,
    best_per_column,
    collect_run,
    frontier_gap,
    headline_markdown,
    mean_std,
    method_costs,
    pareto_frontier,
    render_report,
    tradeoff_summary,
    training_cost,
)
from dtm.report.collect import (
    benchmark_sizes,
    group_table_models,
    grouped_generation_tasks,
    headline_columns,
    task_columns,
    task_stderrs,
)
from dtm.report.stats import frontier_stderr


def test_mean_std_hand_computed():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_best_per_column_and_bold_cell():
    scores = {"vanilla": {"k": [0.7, 0.8], "i": [0.9]}, "DTM": {"k": [0.9, 0.9], "i": [0.6]}}
    assert best_per_column(scores, ["k", "i"]) == {"k": "DTM", "i": "vanilla"}
    md = headline_markdown(ReportData("t", scores, ["k", "i"]))
    assert "| DTM | **0.900 ± 0.000** | 0.600 |" in md
    assert "| vanilla | 0.750 ± 0.071 | **0.900** |" in md


def test_a_tie_or_a_lead_within_the_standard_error_is_not_a_best():
    scores = {"base": {"mmlu": [0.40], "gsm8k": [0.10], "arc": [0.50]}, "DTM": {"mmlu": [0.45], "gsm8k": [0.10], "arc": [0.60]}}
    stderr = {"base": {"mmlu": [0.03], "gsm8k": [0.02], "arc": [0.02]}, "DTM": {"mmlu": [0.03], "gsm8k": [0.02], "arc": [0.02]}}
    # mmlu: 0.05 < hypot(0.03, 0.03) = 0.042? no: 0.05 > 0.042 -> a win; gsm8k: a tie; arc: 0.10 > 0.028
    assert best_per_column(scores, ["mmlu", "gsm8k", "arc"], stderr) == {"mmlu": "DTM", "arc": "DTM"}
    stderr["DTM"]["mmlu"] = [0.05]  # the lead 0.05 is now within hypot(0.03, 0.05) = 0.058
    assert best_per_column(scores, ["mmlu"], stderr) == {}
    md = headline_markdown(ReportData("t", scores, ["mmlu", "gsm8k", "arc"], stderr=stderr))
    assert "| base | 0.400 (se 0.030) | 0.100 (se 0.020) | 0.500 (se 0.020) |" in md
    assert "| DTM | 0.450 (se 0.050) | 0.100 (se 0.020) | **0.600 (se 0.020)** |" in md


def test_standard_errors_and_benchmark_sizes_come_from_the_results():
    res = mc_result("mmlu", 0.5, {"anatomy": 0.4, "astronomy": 0.6})
    res["metrics"]["acc_stderr"] = 0.026
    res["groups"]["anatomy"]["acc_stderr"] = 0.1
    res["counts"] = {"items": 350}
    assert task_stderrs(res) == {"mmlu": 0.026, "mmlu/anatomy": 0.1}
    assert benchmark_sizes({"base": {"mmlu": res}, "DTM": {"mmlu": res | {"counts": {"items": 1}}}}) == {"mmlu": (350, 0.026)}


def test_the_headline_has_one_column_per_task_and_few_knowledge_splits():
    lab = ["knowledge", "knowledge/clean", "knowledge/held_out", "knowledge/noisy", "instruction", "instruction/qa"]
    assert headline_columns(lab, "knowledge") == ["knowledge", "knowledge/clean", "knowledge/held_out", "knowledge/noisy", "instruction"]
    mmlu = ["mmlu", *(f"mmlu/{s}" for s in ("anatomy", "astronomy", "marketing", "nutrition")), "gsm8k"]
    assert headline_columns(mmlu, "mmlu") == ["mmlu", "gsm8k"]  # 4 subjects: the detail table's
    assert headline_columns(mmlu, None) == ["mmlu", "gsm8k"]


def test_pareto_frontier_drops_dominated_points():
    pts = [(0.0, 0.9), (0.5, 0.8), (0.4, 0.7), (1.0, 0.5), (1.0, 0.4)]
    assert pareto_frontier(pts) == [(0.0, 0.9), (0.5, 0.8), (1.0, 0.5)]


unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@given(st.lists(st.tuples(unit, unit), min_size=1, max_size=30))
def test_pareto_frontier_points_are_undominated_and_dominate_every_point(points):
    front = pareto_frontier(points)
    assert front == sorted(front) and set(front) <= set(points)
    assert all(y0 > y1 for (_, y0), (_, y1) in zip(front, front[1:]))  # x ascending, y descending
    for x, y in front:  # no input point is at least as good in both and better in one
        assert not any(px >= x and py >= y and (px, py) != (x, y) for px, py in points)
    for px, py in points:  # every input point is on the front or dominated by a point of it
        assert any(x >= px and y >= py for x, y in front)


@given(st.lists(st.tuples(unit, unit), min_size=1, max_size=30))
def test_frontier_gap_is_zero_on_the_front_and_never_positive_for_a_reference_point(points):
    front = pareto_frontier(points)
    for x, y in front:
        assert frontier_gap((x, y), points) == pytest.approx(0.0, abs=1e-9)
    for p in points:  # the frontier joins undominated points: a reference point lies on or below it
        assert frontier_gap(p, points) <= 1e-9


def test_frontier_gap_interpolates_between_front_points():
    ref = [(0.0, 0.9), (0.5, 0.8), (1.0, 0.5)]
    # at x=0.75 the chord from (0.5, 0.8) to (1.0, 0.5) is at 0.65
    assert frontier_gap((0.75, 0.70), ref) == pytest.approx(0.05)
    assert frontier_gap((0.75, 0.60), ref) == pytest.approx(-0.05)
    assert frontier_gap((1.2, 0.6), ref) == pytest.approx(0.1)  # beyond the front: vs its last point
    assert frontier_gap((0.0, 0.95), ref) == pytest.approx(0.05)


def sample_report() -> ReportData:
    scores = {
        "base": {"knowledge": [0.87, 0.87], "instruction": [0.0, 0.0]},
        "vanilla": {"knowledge": [0.78, 0.80], "instruction": [0.72, 0.73], "instruction/qa": [0.9, 0.7], "instruction/add": [0.5, 0.6]},
        "sub-1": {"instruction/qa": [0.1, 0.3], "instruction/add": [0.0, 0.0]},
        "vanilla @ 0.5": {"knowledge": [0.84, 0.85], "instruction": [0.65, 0.66]},
        "WiSE-FT 0.5": {"knowledge": [0.95, 0.96], "instruction": [0.05, 0.10]},
        "DTM": {"knowledge": [0.96, 0.95], "instruction": [0.65, 0.68], "instruction/qa": [0.8, 1.0], "instruction/add": [0.4, 0.4]},
    }
    groups = {"base": "base", "vanilla": "vanilla", "vanilla @ 0.5": "vanilla checkpoints", "WiSE-FT 0.5": "wise-ft", "DTM": "dtm", "sub-1": "sub-model"}
    return ReportData(
        title="lab", scores=scores, columns=["knowledge", "instruction"], notes=["seeds: 2"], groups=groups,
        table=["base", "vanilla", "vanilla @ 0.5", "WiSE-FT 0.5", "DTM"],
        tax_curve={"knowledge": {0.5: [0.84, 0.85], 1.0: [0.78, 0.80]}},
        losses={0.5: [(1.0, 1.2), (1.1, 1.3)], 1.0: [(0.5, 1.25), (0.6, 1.3)]},
        tradeoff_axes=("knowledge", "instruction"),
        portions=[{"portion": 1, "examples": 10, "sources": {"a": 5, "b": 5}}],
        compute={"vanilla": {"steps": 8.0, "examples": 64.0, "seconds": 11.0}, "DTM": {"steps": 8.0, "examples": 64.0, "seconds": 12.0},
                 "WiSE-FT 0.5": {"steps": 0.0, "examples": 0.0, "seconds": 0.2}},
        compute_parts={"DTM": "sub-1, sub-2 + merge", "vanilla": "vanilla", "WiSE-FT 0.5": "merge only (reuses vanilla)"},
        group_tables=[GroupTable("instruction", "exact_match", "", ["qa", "add"], ["instruction/qa", "instruction/add"], ["vanilla", "DTM", "sub-1"])],
        controls=[ReportData("no-bias control", {"DTM": {"knowledge": [0.9]}}, ["knowledge"])],
    )


def test_tradeoff_summary_places_dtm_against_the_frontier():
    text = tradeoff_summary(sample_report())
    # frontier at instruction 0.665: chord from WiSE-FT (0.075, 0.955) to vanilla@0.5 (0.655, 0.845)... and on to vanilla
    assert text.startswith("DTM lies above the frontier")
    assert "No other model has both" in text
    data = sample_report()
    data.scores["L2"] = {"knowledge": [0.97], "instruction": [0.70]}
    assert "as much knowledge and instruction as DTM: L2." in tradeoff_summary(data)


def test_tradeoff_names_only_the_reference_groups_the_run_has():
    text = tradeoff_summary(sample_report())
    assert "traced by the base, vanilla, vanilla checkpoints and WiSE-FT interpolations:" in text
    data = sample_report()
    for m in ("vanilla @ 0.5", "WiSE-FT 0.5"):
        del data.scores[m]
    text = tradeoff_summary(data)
    assert "traced by the base and vanilla:" in text
    assert "checkpoints" not in text and "WiSE-FT" not in text


def test_tradeoff_claims_no_side_of_the_frontier_within_the_standard_error():
    # a real run's case: 40 questions, DTM one question (0.025) above vanilla at the same instruction score
    scores = {"base": {"mmlu": [0.30], "gsm8k": [0.0]}, "vanilla": {"mmlu": [0.300], "gsm8k": [0.10]},
              "DTM": {"mmlu": [0.325], "gsm8k": [0.10]}}
    data = ReportData("real", scores, ["mmlu", "gsm8k"], groups={"base": "base", "vanilla": "vanilla", "DTM": "dtm"},
                      tradeoff_axes=("mmlu", "gsm8k"))
    assert tradeoff_summary(data).startswith("DTM lies above the frontier traced by the base and vanilla: +0.025 mmlu")
    data.stderr = {"base": {"mmlu": [0.043]}, "vanilla": {"mmlu": [0.043]}, "DTM": {"mmlu": [0.043]}}
    text = tradeoff_summary(data)  # 0.025 < hypot(0.043, 0.043) = 0.061
    assert text.startswith("DTM lies on the frontier traced by the base and vanilla (within its standard error 0.061): +0.025 mmlu")
    data.scores["DTM"]["mmlu"] = [0.40]  # 0.100 > 0.061: a difference worth naming
    assert tradeoff_summary(data).startswith("DTM lies above the frontier")
    data.scores["DTM"]["mmlu"] = [0.20]
    assert tradeoff_summary(data).startswith("DTM lies below the frontier")


def test_frontier_stderr_is_the_larger_of_the_chord_ends():
    ref = {(0.0, 0.9): 0.01, (0.5, 0.8): 0.03, (1.0, 0.5): 0.02, (0.4, 0.7): 0.5}  # (0.4, 0.7) is dominated: never used
    assert frontier_stderr(0.25, ref) == 0.03  # chord (0.0, 0.9)-(0.5, 0.8)
    assert frontier_stderr(0.75, ref) == 0.03  # chord (0.5, 0.8)-(1.0, 0.5)
    assert frontier_stderr(-1.0, ref) == 0.01 and frontier_stderr(2.0, ref) == 0.02  # beyond the ends: the end's

def test_write_report_files(tmp_path):
    md, page = render_report(sample_report(), tmp_path)
    text = md.read_text()
    # DTM and WiSE-FT tie on knowledge (0.955): a tie is not a best, so nothing is bold there
    assert "| DTM | 0.955 ± 0.007 |" in text and "**0.955" not in text
    assert "tax_curve.png" in text and "no-bias control" in text
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    assert page.read_text().count("data:image/png;base64,") == 3
    # per-group table: qa of sub-1 is mean 0.2, std sqrt(2 * 0.1^2 / 1) = 0.141; best qa is DTM's 0.9
    assert "## instruction per group: exact_match" in text
    assert "| model | qa | add |" in text
    assert "| sub-1 | 0.200 ± 0.141 | 0.000 ± 0.000 |" in text
    assert "| DTM | **0.900 ± 0.141** | 0.400 ± 0.000 |" in text and "| vanilla | 0.800 ± 0.141 | **0.550 ± 0.071** |" in text
    assert "| model | sums | optimizer steps | examples processed (examples × epochs) | train+merge seconds |" in text
    assert "| DTM | sub-1, sub-2 + merge | 8 | 64 | 12.0 |" in text
    assert "| WiSE-FT 0.5 | merge only (reuses vanilla) | 0 | 0 | 0.2 |" in text
    page_text = page.read_text()
    assert "<h2>instruction per group: exact_match</h2>" in page_text and "<td>sub-1, sub-2 + merge</td>" not in page_text
    assert "<td style='text-align:left'>sub-1, sub-2 + merge</td><td>8</td><td>64</td><td>12.0</td>" in page_text
    assert "<th scope=row>sub-1</th><td class=\"\">0.200 ± 0.141</td>" in page_text


def section_titles(md_text: str, html_text: str) -> tuple[list[str], list[str]]:
    """The headings of report.md (any level) and of report.html (h1-h3), in order."""
    import html
    import re

    md = [line.lstrip("#").strip() for line in md_text.splitlines() if line.startswith("#")]
    page = [html.unescape(t) for _, t in re.findall(r"<h([1-3])>(.*?)</h\1>", html_text)]
    return md, page


def test_markdown_and_html_show_the_same_sections_in_the_same_order(tmp_path):
    data = sample_report()
    data.controls[0].portions = data.portions  # a nested report with more than its headline
    md, page = render_report(data, tmp_path)
    md_titles, html_titles = section_titles(md.read_text(), page.read_text())
    assert md_titles == html_titles
    assert md_titles == ["lab", "Headline (mean ± sample std over seeds; best per column in bold)", "Alignment-tax curve",
                         "Trade-off", "Train/validation loss and the loss-reduction ratio", "instruction per group: exact_match",
                         "Portions", "Wall time and compute per method",
                         "no-bias control", "Headline (mean ± sample std over seeds; best per column in bold)", "Portions"]
    # every title comes from SECTIONS, in its order
    fixed = [s.title for s in SECTIONS if "{" not in s.title]
    assert [t for t in md_titles if t in fixed][:6] == [t for t in fixed if t in md_titles][:6]
    text = page.read_text()  # ids are unique: a nested report's tables get its title in their id
    assert 'id="headline"' in text and 'id="headline-no-bias-control"' in text
    assert 'id="portions"' in text and 'id="portions-no-bias-control"' in text and 'id="frontier"' in text


# ---------------------------------------------------------------- from a run directory (plain dicts, hand numbers)


def generate_result(task: str, exact: float, pattern: float, groups: dict[str, tuple[float, float]]) -> dict:
    return {"task": task, "type": "generate", "metrics": {"exact_match": exact, "exact_match_stderr": 0.1, "pattern_match": pattern},
            "groups": {g: {"exact_match": e, "pattern_match": p, "items": 10} for g, (e, p) in groups.items()}}


def mc_result(task: str, acc: float, groups: dict[str, float] | None = None) -> dict:
    return {"task": task, "type": "multiple_choice", "metrics": {"acc": acc, "acc_norm": 0.0},
            "groups": {g: {"acc": a, "items": 5} for g, a in (groups or {}).items()}}


def test_task_columns_use_the_headline_metrics_per_group():
    gen = generate_result("if", 0.5, 0.9, {"qa": (0.25, 1.0), "add": (0.75, 0.8)})
    assert task_columns(gen) == {"if": 0.5, "if/qa": 0.25, "if/add": 0.75, "if (format)": 0.9, "if/qa (format)": 1.0, "if/add (format)": 0.8}
    assert task_columns(mc_result("kn", 0.6, {"clean": 0.7})) == {"kn": 0.6, "kn/clean": 0.7}
    no_main = {"task": "x", "type": "generate", "metrics": {"pattern_match": 1.0}, "groups": {}}
    assert task_columns(no_main) == {}
    # Only generation tasks with groups get per-group tables; groups are the union in first-seen order.
    other = generate_result("if", 0.5, 0.9, {"add": (0.1, 0.1), "repeat": (0.0, 1.0)})
    found = grouped_generation_tasks([gen, mc_result("kn", 0.6, {"clean": 0.7}), generate_result("plain", 0.1, 0.2, {}), other])
    assert found == {("if", "exact_match", ""): ["qa", "add", "repeat"], ("if", "pattern_match", " (format)"): ["qa", "add", "repeat"]}


def test_group_table_models_put_each_sub_model_after_their_mean():
    models = ["base", "vanilla", "vanilla (best checkpoint)", "short", "sub-models (mean)", "DTM", "sub-1", "sub-10", "sub-2",
              "vanilla@0.50", "wise_ft-0.5"]
    assert group_table_models(models) == ["base", "vanilla", "short", "sub-models (mean)", "sub-1", "sub-2", "sub-10", "DTM", "wise_ft-0.5"]


def complete(examples: int, steps: int, seconds: float, epochs: float = 3.0, **extra) -> dict:
    return {"examples": examples, "replay_examples": extra.pop("replay", 0), "steps": steps, "seconds": seconds,
            "config": {"num_train_epochs": epochs, "max_steps": extra.pop("max_steps", -1), "per_device_train_batch_size": 4,
                       "gradient_accumulation_steps": 2}}


def test_training_cost_counts_examples_times_epochs():
    assert training_cost(complete(10, 6, 1.5)) == {"steps": 6.0, "examples": 30.0, "seconds": 1.5}
    assert training_cost(complete(10, 6, 1.5, epochs=2.0, replay=5))["examples"] == 30.0  # (10 + 5) x 2
    assert training_cost(complete(10, 5, 1.0, max_steps=5))["examples"] == 40.0  # 5 steps x batch 4 x accumulation 2
    assert training_cost(complete(10, 6, 1.5) | {"trained_tokens": 1234})["tokens"] == 1234.0  # recorded by training


def test_method_costs_sum_each_methods_models():
    trained = {"sub-1": {"steps": 6.0, "examples": 30.0, "seconds": 1.5}, "sub-2": {"steps": 7.0, "examples": 36.0, "seconds": 2.5},
               "vanilla": {"steps": 13.0, "examples": 66.0, "seconds": 5.0}, "short": {"steps": 3.0, "examples": 11.0, "seconds": 1.0},
               "soup-2": {"steps": 3.0, "examples": 11.0, "seconds": 1.25}}
    costs = method_costs(trained, {"DTM": 0.5, "soup": 0.25, "wise_ft-0.5": 0.125}, ensembles=("ensemble",))
    assert costs["DTM"] == ("sub-1, sub-2 + merge", {"steps": 13.0, "examples": 66.0, "seconds": 4.5})
    assert costs["soup"] == ("short, soup-2 + merge", {"steps": 6.0, "examples": 22.0, "seconds": 2.5})
    assert costs["wise_ft-0.5"] == ("merge only (reuses vanilla)", {"steps": 0.0, "examples": 0.0, "seconds": 0.125})
    assert costs["ensemble"] == ("sub-1, sub-2 (no merge)", {"steps": 13.0, "examples": 66.0, "seconds": 4.0})
    assert costs["vanilla"] == ("vanilla", trained["vanilla"]) and costs["short"] == ("short", trained["short"])
    assert not any(name.startswith(("sub-", "soup-")) for name in costs)  # ingredients are counted in their method
    # A part without a step count leaves DTM's steps unknown rather than understated.
    del trained["sub-2"]["steps"]
    assert method_costs(trained, {"DTM": 0.5})["DTM"][1] == {"examples": 66.0, "seconds": 4.5}


def write_seed_run(root, seed: int, evals: dict[str, dict], trained: dict[str, dict], merge_seconds: dict[str, float]) -> None:
    (root / "eval").mkdir(parents=True)
    (root / "manifests").mkdir()
    for model, results in evals.items():
        (root / "eval" / f"{model}.json").write_text(json.dumps({r["task"]: r for r in results}))
    for name, info in trained.items():
        (root / "models" / name).mkdir(parents=True)
        (root / "models" / name / "training_complete.json").write_text(json.dumps(info))
    (root / "manifests" / "train.json").write_text(json.dumps({"outputs": {"models": sorted(trained),
                                                                           "seconds": {n: i["seconds"] for n, i in trained.items()}}}))
    (root / "manifests" / "merge.json").write_text(json.dumps({"outputs": {"models": sorted(merge_seconds), "seconds": merge_seconds}}))


def test_build_report_data_from_two_seed_runs(tmp_path):
    from dtm.config import ExperimentConfig

    # seed -> model -> (if exact, (qa exact, add exact)); format is 1.0 everywhere
    numbers = {
        1: {"base": (0.0, (0.0, 0.0)), "vanilla": (0.5, (0.6, 0.4)), "sub-1": (0.2, (0.4, 0.0)), "sub-2": (0.3, (0.2, 0.4)),
            "DTM": (0.4, (0.5, 0.3)), "wise_ft-0.5": (0.1, (0.2, 0.0)), "vanilla@0.50": (0.3, (0.3, 0.3))},
        2: {"base": (0.0, (0.0, 0.0)), "vanilla": (0.7, (0.8, 0.6)), "sub-1": (0.4, (0.8, 0.0)), "sub-2": (0.5, (0.6, 0.4)),
            "DTM": (0.4, (0.7, 0.1)), "wise_ft-0.5": (0.1, (0.2, 0.0)), "vanilla@0.50": (0.3, (0.3, 0.3))},
    }
    cfg = ExperimentConfig.model_validate({"model": {"model_name_or_path": "x"}, "data": {"path": "y"}, "seeds": [1, 2],
                                           "disperse": {"k": 2}, "output_dir": str(tmp_path)})
    for seed, by_model in numbers.items():
        evals = {m: [mc_result("knowledge_instruct", 0.9), generate_result("instruction", e, 1.0, {"qa": (qa, 1.0), "add": (add, 1.0)})]
                 for m, (e, (qa, add)) in by_model.items()}
        trained = {"sub-1": complete(10, 6, 1.5 * seed), "sub-2": complete(12, 6, 2.5 * seed), "vanilla": complete(22, 12, 5.0 * seed)}
        write_seed_run(tmp_path / f"seed-{seed}", seed, evals, trained, {"DTM": 0.5 * seed, "wise_ft-0.5": 0.25 * seed})
    data = collect_run(cfg)

    assert [(t.task, t.metric, t.suffix, t.groups) for t in data.group_tables] == [
        ("instruction", "exact_match", "", ["qa", "add"]), ("instruction", "pattern_match", " (format)", ["qa", "add"])]
    table = data.group_tables[0]
    assert table.rows == ["base", "vanilla", "sub-models (mean)", "sub-1", "sub-2", "DTM", "wise_ft-0.5"]
    assert table.columns == ["instruction/qa", "instruction/add"]
    assert mean_std(data.scores["sub-1"]["instruction/qa"]) == pytest.approx((0.6, math.sqrt(0.08)))  # 0.4, 0.8
    assert mean_std(data.scores["sub-models (mean)"]["instruction/qa"]) == pytest.approx((0.5, math.sqrt(0.08)))  # 0.3, 0.7
    assert data.group_tables[1].columns == ["instruction/qa (format)", "instruction/add (format)"]
    # the per-group columns are not repeated in the headline or the detail table
    assert data.columns == ["knowledge_instruct", "instruction", "instruction (format)"]
    assert not any("/" in c for c in data.detail_columns)

    # compute, mean over the seeds: DTM = sub-1 + sub-2 + merge = (1.5 + 2.5 + 0.5) x seed -> 4.5, 9.0 -> 6.75
    assert data.compute["DTM"] == pytest.approx({"steps": 12.0, "examples": 66.0, "seconds": 6.75})
    assert data.compute["vanilla"] == pytest.approx({"steps": 12.0, "examples": 66.0, "seconds": 7.5})
    assert data.compute["wise_ft-0.5"] == pytest.approx({"steps": 0.0, "examples": 0.0, "seconds": 0.375})
    assert list(data.compute) == ["vanilla", "DTM", "wise_ft-0.5"]
    assert data.compute_parts["DTM"] == "sub-1, sub-2 + merge"

    md, _ = render_report(data, tmp_path / "out")
    text = md.read_text()
    assert "| sub-1 | 0.600 ± 0.283 | 0.000 ± 0.000 |" in text
    assert "| DTM | sub-1, sub-2 + merge | 12 | 66 | 6.8 |" in text
    assert "## instruction (format) per group: pattern_match" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs it where apt is available)")
def test_report_renders_in_headless_chromium(tmp_path):
    _, page = render_report(sample_report(), tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    # The page's own script-free DOM, as the browser parsed it, with image decode state checked by JS.
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text().replace(
            "</body>",
            "<script>window.onload=()=>{const imgs=[...document.images];"
            "document.title='rows='+document.querySelectorAll('#headline tbody tr').length+"
            "';imgs='+imgs.filter(i=>i.complete&&i.naturalWidth>100).length+';best='+document.querySelectorAll('#headline td.best').length+"
            "';groups='+document.querySelectorAll('table[id^=groups-] tbody tr').length+"
            "';compute='+document.querySelectorAll('table.compute tbody tr').length;}</script></body>",
        )
    )
    out = subprocess.run([CHROMIUM, *flags, "--dump-dom", "--virtual-time-budget=3000", probe.as_uri()], capture_output=True, text=True, timeout=120)
    # best=1: knowledge is a tie (DTM and WiSE-FT 0.955), which is not a best
    assert "<title>rows=5;imgs=3;best=1;groups=3;compute=3</title>" in out.stdout, out.stderr[-2000:]


def test_collect_run_nests_the_no_bias_control(tmp_path):
    from dtm.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate({"model": {"model_name_or_path": "lab"}, "data": {"path": "lab"}, "seeds": [1, 2],
                                           "disperse": {"k": 2}, "lab": {"control_seeds": 1}, "output_dir": str(tmp_path)})
    evals = {m: [mc_result("knowledge_instruct", 0.9 - i / 10), generate_result("instruction", i / 10, 1.0, {"qa": (0.5, 1.0)})]
             for i, m in enumerate(["base", "vanilla", "sub-1", "sub-2", "DTM"])}
    trained = {"sub-1": complete(10, 6, 1.5), "sub-2": complete(12, 6, 2.5), "vanilla": complete(22, 12, 5.0)}
    for root in (tmp_path / "seed-1", tmp_path / "seed-2", tmp_path / "control-nobias" / "seed-1"):
        write_seed_run(root, 1, evals, trained, {"DTM": 0.5})
    data = collect_run(cfg)
    assert data.title == "Disperse-Then-Merge: results" and data.notes[0].startswith("seeds: [1, 2] ")
    [control] = data.controls
    assert control.title.startswith("No-bias control") and control.notes[0].startswith("seeds: [1] (one seed")
    # no vanilla snapshots here: no "best checkpoint" row (it would repeat vanilla's), nor its note
    assert control.table == ["base", "vanilla", "sub-models (mean)", "DTM"]
    assert not any("best checkpoint" in n for n in control.notes)
    md, page = render_report(data, tmp_path)
    md_titles, html_titles = section_titles(md.read_text(), page.read_text())
    assert md_titles == html_titles and md_titles.count("Wall time and compute per method") == 2
    assert "### Wall time and compute per method" in md.read_text()
