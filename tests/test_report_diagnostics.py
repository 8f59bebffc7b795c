"""The report's diagnostics: error sets (which questions the sub-models miss and the merge fixes)
and the token-level diagnostic, from their pure math up to the rendered sections."""

from __future__ import annotations

import json

import pytest
from test_report import complete, mc_result, write_seed_run

from dtm.evaluation.metrics import per_item_columns
from dtm.report import collect_run, render_report
from dtm.report.collect import question_correct
from dtm.report.stats import early_late, error_category, error_set_summary, error_sets, token_rank_summary


def test_error_category_by_how_many_sub_models_are_wrong():
    assert [error_category(w, 4) for w in (4, 3, 2, 1, 0)] == ["all", "some", "some", "one", "none"]
    assert [error_category(w, 2) for w in (2, 1, 0)] == ["all", "one", "none"]
    assert error_category(1, 1) == "all"


def test_error_sets_count_questions_and_what_the_merge_keeps():
    # 3 sub-models, questions a..f; True = right
    subs = [{"a": False, "b": False, "c": True, "d": True, "e": True, "f": False},
            {"a": False, "b": True, "c": False, "d": True, "e": True},  # f unanswered: left out
            {"a": False, "b": False, "c": True, "d": True, "e": True, "f": False}]
    merged = {"a": True, "b": False, "c": True, "d": True, "e": False, "f": False}
    assert error_sets(subs, merged) == {
        "all": {"questions": 1, "merged_wrong": 0},   # a: fixed
        "some": {"questions": 1, "merged_wrong": 1},  # b (2 of 3 wrong): kept
        "one": {"questions": 1, "merged_wrong": 0},   # c: fixed
        "none": {"questions": 2, "merged_wrong": 1},  # d right, e a new error
    }


def test_error_set_summary_pools_tasks_per_seed_then_averages_seeds():
    def sets(all_q, all_wrong, none_q, none_wrong):
        return {"all": {"questions": all_q, "merged_wrong": all_wrong}, "some": {"questions": 0, "merged_wrong": 0},
                "one": {"questions": 0, "merged_wrong": 0}, "none": {"questions": none_q, "merged_wrong": none_wrong}}

    # seed 1: tasks x, y pooled: all 10 questions, 5 kept -> 50% fixed; seed 2: 4 of 4 kept -> 0% fixed
    per_seed = [{"x": sets(6, 3, 100, 1), "y": sets(4, 2, 100, 3)}, {"x": sets(4, 4, 200, 0)}]
    text = error_set_summary(per_seed)
    assert "of the 7 questions every sub-model gets wrong, DTM gets 25.0% ± 35.4% right" in text
    assert "of the 200 questions every sub-model gets right, DTM gets 1.0% ± 1.4% wrong" in text
    assert "several" not in text  # no question in that category: nothing said about it
    assert error_set_summary([]) is None


def test_early_late_picks_the_intervals_nearest_10_and_90_percent():
    assert early_late([0.1, 0.25, 0.5, 0.75, 1.0]) == (0, 4)
    assert early_late([0.2, 0.9, 1.0]) == (0, 1)
    assert early_late([1.0]) == (0, 0)
    assert early_late([]) is None


def test_token_rank_summary_states_the_direction_only_when_every_seed_agrees():
    assert "as the paper reports" in token_rank_summary([3, 5], [40, 60], 10)
    assert "early 4 ± 1, late 50 ± 14" in token_rank_summary([3, 5], [40, 60], 10)
    assert "opposite of the paper" in token_rank_summary([40], [3], 10)
    assert "no consistent difference" in token_rank_summary([3, 50], [40, 6], 10)


def test_per_item_columns_keep_ids_and_scores_in_order():
    cols = per_item_columns(["q1", "q2"], [{"acc": 1.0, "acc_norm": 0.0}, {"acc": 0.0}])
    assert cols == {"ids": ["q1", "q2"], "acc": [1, 0], "acc_norm": [0, None]}
    with pytest.raises(ValueError):
        per_item_columns(["q1"], [])


def with_items(result: dict, correct: dict[str, int]) -> dict:
    return result | {"per_item": {"ids": list(correct), "acc": list(correct.values())}}


def test_question_correct_reads_the_main_metric_and_skips_old_files():
    assert question_correct(with_items(mc_result("kn", 0.5), {"a": 1, "b": 0})) == ("acc", {"a": True, "b": False})
    assert question_correct(mc_result("kn", 0.5)) is None  # a result file written before per-question scores


def token_run(early_ranks: list[int], late_ranks: list[int]) -> dict:
    def interval(start, end, ranks):
        top = [{"id": i, "token": f" w{r}|", "mean_drop": 1.0 - 0.1 * i, "count": 5, "frequency": 100 // r, "rank": r}
               for i, r in enumerate(ranks)]
        return {"from": start, "to": end, "top": top, "median_rank_top": sorted(ranks)[len(ranks) // 2], "median_rank_all": 7,
                "mean_drop": 0.2, "tokens": [[t["id"], t["mean_drop"], 5, t["rank"]] for t in top]}

    return {"fractions": [0.0, 0.1, 0.5, 1.0], "top": 3, "min_count": 3, "distinct_train_tokens": 90,
            "intervals": [interval(0.0, 0.1, early_ranks), interval(0.1, 0.5, [5, 5, 5]), interval(0.5, 1.0, late_ranks)]}


def test_report_shows_error_sets_and_token_losses_from_a_run(tmp_path):
    from dtm.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate({"model": {"model_name_or_path": "x"}, "data": {"path": "y"}, "seeds": [1, 2],
                                           "disperse": {"k": 2}, "output_dir": str(tmp_path)})
    # questions a..d; sub-1 and sub-2 both miss a; only sub-1 misses b; DTM fixes b, keeps a, newly misses d (seed 1)
    answers = {"sub-1": {"a": 0, "b": 0, "c": 1, "d": 1}, "sub-2": {"a": 0, "b": 1, "c": 1, "d": 1},
               "DTM": {"a": 0, "b": 1, "c": 1, "d": 0}}
    for seed in (1, 2):
        evals = {m: [with_items(mc_result("kn", sum(c.values()) / 4), c)] for m, c in answers.items()}
        evals["vanilla"] = [mc_result("kn", 0.5)]  # an old result file without per-question scores: not needed here
        write_seed_run(tmp_path / f"seed-{seed}", seed, evals, {"sub-1": complete(10, 6, 1.0)}, {"DTM": 0.5})
        diag = tmp_path / f"seed-{seed}" / "diagnostics"
        diag.mkdir()
        (diag / "token_losses.json").write_text(json.dumps(token_run([1, 2, 3], [30, 40, 50 * seed])))
    data = collect_run(cfg)
    (sets,) = data.error_sets
    assert (sets.task, sets.metric, sets.k, len(sets.per_seed)) == ("kn", "acc", 2, 2)
    assert sets.per_seed[0] == {"all": {"questions": 1, "merged_wrong": 1}, "some": {"questions": 0, "merged_wrong": 0},
                                "one": {"questions": 1, "merged_wrong": 0}, "none": {"questions": 2, "merged_wrong": 1}}
    assert [r["seed"] for r in data.token_losses] == [1, 2]

    md, page = render_report(data, tmp_path / "out")
    text = md.read_text()
    assert "| kn | acc | 4 | 1.0 | 0.0 | 0.0 | 0.0 | 1.0 | 1.0 | 2.0 | 1.0 |" in text
    assert "of the 1 questions exactly one gets wrong, DTM gets 100.0% ± 0.0% right" in text
    assert '| 1 | " w1¦" | 1.000 | 1 | " w30¦" | 1.000 | 30 |' in text  # early beside late; '|' cannot break the table
    assert "early 2 ± 0, late 40 ± 0" in text and "in every seed, as the paper reports" in text
    assert "![Loss drop against token frequency](token_losses.png)" in text
    assert "![Error sets per task](error_sets.png)" in text
    assert (tmp_path / "out" / "token_losses.png").stat().st_size > 1000 and (tmp_path / "out" / "error_sets.png").is_file()
    assert "Error sets: the questions the sub-models get wrong" in page.read_text()
