"""Task files, validation errors, few-shot prompts, suites, and the pure metric functions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dtm.errors import DataError
from dtm.evaluation import metrics as M
from dtm.evaluation.diagnostics import curve_from_results, loss_reduction_ratios
from dtm.evaluation.tasks import build_texts, load_task, resolve_tasks


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


MC = [
    {"id": "a", "question": "2+2?", "choices": ["3", "4"], "answer": 1, "split": "x"},
    {"id": "b", "question": "Sky?", "choices": ["blue", "green", "red"], "answer": 0, "split": "y"},
]


def test_bare_jsonl_is_a_task_with_lm_eval_arc_prompt(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "id"} for r in MC]
    task = load_task(write_jsonl(tmp_path / "quiz.jsonl", rows))
    assert task.name == "quiz" and task.type == "multiple_choice" and len(task) == 2
    assert [r["id"] for r in task.rows] == ["line-1", "line-2"]
    assert build_texts(task, task.rows) == ["Question: 2+2?\nAnswer:", "Question: Sky?\nAnswer:"]
    assert task.spec.delimiter == " "


def test_spec_hash_changes_with_data_and_spec(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MC)
    spec = tmp_path / "t.yaml"
    spec.write_text("name: t\ndata: d.jsonl\n")
    h1 = load_task(spec).spec_hash
    assert load_task(spec).spec_hash == h1
    spec.write_text("name: t\ndata: d.jsonl\nprompt_format: alpaca\n")
    h2 = load_task(spec).spec_hash
    write_jsonl(data, MC[:1])
    assert len({h1, h2, load_task(spec).spec_hash}) == 3


@pytest.mark.parametrize(
    "row, expect",
    [
        ({"id": "z", "choices": ["a"], "answer": 0}, ["bad.jsonl:3:", "missing field 'question'"]),
        ({"id": "z", "question": "q", "choices": ["a", "b"], "answer": 2}, ["bad.jsonl:3:", "'answer' = 2 is out of range for 2 choices"]),
        ({"id": "a", "question": "q", "choices": ["a", "b"], "answer": 0}, ["bad.jsonl:3:", "duplicate id 'a'", "line 1"]),
        ({"id": "z", "question": "q", "choices": [], "answer": 0}, ["bad.jsonl:3:", "'choices' is an empty list"]),
        ({"id": "z", "question": "q", "choices": ["a", 5], "answer": 0}, ["bad.jsonl:3:", "'choices'[1] must be a string"]),
        ({"id": "z", "question": "q", "choices": ["a", ""], "answer": 0}, ["bad.jsonl:3:", "'choices'[1] is an empty string"]),
        ({"id": "z", "question": "q", "choices": ["a", "b"], "answer": "0"}, ["bad.jsonl:3:", "'answer' must be an integer"]),
        ({"id": "z", "question": "q", "choices": ["a", "b"], "answer": True}, ["bad.jsonl:3:", "'answer' must be an integer"]),
        ('{"id": "z", "question": ', ["bad.jsonl:3:", "not valid JSON"]),
        ("[1, 2]", ["bad.jsonl:3:", "expected a JSON object"]),
    ],
)
def test_bad_rows_name_task_line_and_field(tmp_path, row, expect):
    path = write_jsonl(tmp_path / "bad.jsonl", [*MC, row])
    with pytest.raises(DataError) as err:
        load_task(path)
    msg = str(err.value)
    assert "task 'bad'" in msg and str(path) in msg
    for part in expect:
        assert part in msg


def test_generate_rows_are_checked(tmp_path):
    write_jsonl(tmp_path / "g.jsonl", [{"id": "1", "prompt": "p", "answer": "x", "pattern": "(["}])
    (tmp_path / "g.yaml").write_text("name: gen\ntype: generate\ndata: g.jsonl\n")
    with pytest.raises(DataError, match=r"task 'gen'.*g\.jsonl:1: field 'pattern' does not compile"):
        load_task(tmp_path / "g.yaml")
    write_jsonl(tmp_path / "g.jsonl", [{"id": "1", "prompt": "p"}])
    with pytest.raises(DataError, match=r"g\.jsonl:1: missing field 'answer'"):
        load_task(tmp_path / "g.yaml")


def test_bad_specs(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", MC)
    (tmp_path / "s.yaml").write_text("name: s\ndata: d.jsonl\nnum_fewshots: 2\n")
    with pytest.raises(DataError, match=r"s\.yaml: num_fewshots: unknown key"):
        load_task(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("name: s\ndata: missing.jsonl\n")
    with pytest.raises(DataError, match=r"task 's'.*missing\.jsonl: data file not found"):
        load_task(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("name: s\ndata: d.jsonl\ngroup_by: subject\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'subject' \(the spec's group_by\)"):
        load_task(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("name: s\ndata: d.jsonl\ndoc_to_text: '{{ questionn }}'\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: the prompt template cannot be filled.*questionn"):
        load_task(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("name: s\ndata: d.jsonl\nnum_fewshot: 2\n")
    with pytest.raises(DataError, match="fewshot_data"):
        load_task(tmp_path / "s.yaml")


def test_fewshot_prompts_are_seeded_and_match_lm_eval_layout(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", MC)
    shots = [{"id": f"s{i}", "question": f"Q{i}", "choices": ["no", "yes"], "answer": i % 2, "split": "x"} for i in range(6)]
    write_jsonl(tmp_path / "dev.jsonl", shots)
    (tmp_path / "t.yaml").write_text(
        "name: t\ndata: test.jsonl\nfewshot_data: dev.jsonl\nnum_fewshot: 2\nfewshot_sampler: first_n\n"
        "description: \"About {{split}}.\\n\\n\"\n"
    )
    task = load_task(tmp_path / "t.yaml")
    texts = build_texts(task, task.rows)
    # description + (question + target_delimiter + gold choice) joined by fewshot_delimiter + question
    assert texts[0] == "About x.\n\nQ0 no\n\nQ1 yes\n\n2+2?"
    (tmp_path / "t.yaml").write_text("name: t\ndata: test.jsonl\nfewshot_data: dev.jsonl\nnum_fewshot: 3\nfewshot_seed: 7\n")
    task = load_task(tmp_path / "t.yaml")
    first, again = build_texts(task, task.rows), build_texts(task, task.rows)
    assert first == again  # deterministic
    assert all(t.count("\n\n") == 3 for t in first)
    (tmp_path / "t.yaml").write_text("name: t\ndata: test.jsonl\nfewshot_data: dev.jsonl\nnum_fewshot: 3\nfewshot_seed: 8\n")
    assert build_texts(load_task(tmp_path / "t.yaml"), task.rows) != first


def test_letters_targets_for_mmlu_style(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", MC)
    (tmp_path / "t.yaml").write_text(
        "name: t\ndata: d.jsonl\ndoc_to_choice: letters\n"
        "doc_to_text: \"{{question}}\\n{% for c in choices %}{{ 'ABCD'[loop.index0] }}. {{c}}\\n{% endfor %}Answer:\"\n"
    )
    task = load_task(tmp_path / "t.yaml")
    from dtm.evaluation.tasks import choice_targets

    assert build_texts(task, task.rows)[1] == "Sky?\nA. blue\nB. green\nC. red\nAnswer:"
    assert choice_targets(task.spec, task.rows[1]) == ["A", "B", "C"]


def test_suites_and_missing_paper_data(tmp_path, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", MC)
    b = write_jsonl(tmp_path / "b.jsonl", MC)
    tasks = resolve_tasks(["lab_knowledge", str(b)], suites={"lab_knowledge": [a, b]}, data_dir=tmp_path / "none")
    assert [t.name for t in tasks] == ["a", "b"]  # b named twice runs once
    with pytest.raises(DataError) as err:
        resolve_tasks(["paper"], data_dir=tmp_path / "bench")
    msg = str(err.value)
    for name in ("mmlu.jsonl", "mmlu_dev.jsonl", "bbh.jsonl", "gsm8k.jsonl", "arc_challenge.jsonl", "humaneval.jsonl", "mbpp.jsonl"):
        assert str(tmp_path / "bench" / name) in msg
    bench = tmp_path / "bench"
    bench.mkdir()
    write_jsonl(bench / "arc_easy.jsonl", MC)
    got = resolve_tasks(["paper"], data_dir=bench)
    assert [t.name for t in got] == ["arc_easy"]
    assert "mmlu" in caplog.text and "arc_easy" not in caplog.text.split("missing")[1].split("\n")[0]
    with pytest.raises(DataError, match="not a file and not a known suite"):
        resolve_tasks(["knowlege"])


# ---------------------------------------------------------------- metrics (hand-computed)


def test_mc_scores_acc_and_acc_norm():
    # lls -3, -2, -5 over choices of 1, 4, 2 characters: acc picks 1; normalised -3, -0.5, -2.5 -> 1
    assert M.mc_item_scores([-3.0, -2.0, -5.0], ["a", "bbbb", "cc"], 1) == {"acc": 1.0, "acc_norm": 1.0}
    # lls -2, -3 over 1 and 10 characters: acc picks 0; normalised -2, -0.3 -> 1
    assert M.mc_item_scores([-2.0, -3.0], ["a", "bbbbbbbbbb"], 1) == {"acc": 0.0, "acc_norm": 1.0}
    assert M.argmax([1.0, 3.0, 3.0]) == 1  # first on ties


def test_mean_stderr_and_summary():
    assert M.mean_stderr([1, 0, 1, 0]) == pytest.approx(math.sqrt((1 / 3) / 4))
    assert M.mean_stderr([1]) is None
    s = M.summarize([{"acc": 1.0}, {"acc": 0.0, "x": 1.0}])
    assert s["acc"] == 0.5 and s["x"] == 1.0 and s["x_stderr"] is None
    g = M.grouped([{"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}], ["a", "b", "a"])
    assert g == {"a": {"acc": 1.0, "acc_stderr": 0.0, "items": 2}, "b": {"acc": 0.0, "acc_stderr": None, "items": 1}}


def test_extractors_and_matches():
    assert M.extract_numeric("So she pays $1,234.50.") == 1234.5
    assert M.extract_numeric("Natalia sold 48 clips... #### 72") == 72
    assert M.extract_numeric("3 apples and -4 pears") == -4
    assert M.extract_numeric("no digits") is None
    assert M.exact_match("The total is 1,000.", "reasoning... #### 1000", extractor="numeric") == 1.0
    assert M.exact_match("The total is 999", "#### 1000", extractor="numeric") == 0.0
    assert M.exact_match("  Paris \n", "Paris") == 1.0
    assert M.exact_match("paris", "Paris") == 0.0
    assert M.exact_match("paris", "Paris", ignore_case=True) == 1.0
    assert M.exact_match("so the answer is (B).", "(B)", extractor="regex", regex=r"the answer is (\(.\))") == 1.0
    assert M.extract_regex("nothing", r"answer is (\w)") == "[invalid]"
    assert M.pattern_match("  cat, dog, fish \n", r"\w+(, \w+)*") == 1.0
    assert M.pattern_match("cat, dog. extra", r"\w+(, \w+)*") == 0.0


def test_perplexity_metrics():
    m = M.perplexity_metrics([-6.0, -4.0], ["a b", "cd"], [3, 2])
    assert m["token_perplexity"] == pytest.approx(math.exp(10 / 5))
    assert m["word_perplexity"] == pytest.approx(math.exp(10 / 3))
    assert m["byte_perplexity"] == pytest.approx(math.exp(10 / 5))
    assert m["bits_per_byte"] == pytest.approx(2 / math.log(2))


def test_loss_reduction_ratios_and_curve():
    assert loss_reduction_ratios([3.0, 2.0, 1.5, 1.0], [3.0, 2.5, 2.5, 2.6]) == [2.0, None, pytest.approx(-5.0)]
    with pytest.raises(ValueError):
        loss_reduction_ratios([1.0], [1.0, 2.0])
    curve = curve_from_results({
        0.5: {"t": {"metrics": {"acc": 0.4, "acc_stderr": 0.1}}},
        0.1: {"t": {"metrics": {"acc": 0.5, "acc_stderr": 0.1}}, "u": {"metrics": {"exact_match": 0.2}}},
    })
    assert curve["fractions"] == [0.1, 0.5]
    assert curve["tasks"]["t"]["acc"] == [0.5, 0.4]
    assert curve["tasks"]["u"]["exact_match"] == [0.2, None]


def test_convert_hub_rows_like_lm_eval():
    from dtm.evaluation.convert import convert_rows

    arc = convert_rows("arc_easy", [{"id": "x", "question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}])
    assert arc == [{"id": "x", "question": "Q?", "choices": ["a", "b"], "answer": 1}]
    hs = convert_rows("hellaswag", [{"activity_label": "Cooking", "ctx_a": "A man [title] cuts.", "ctx_b": "he then", "endings": [" stirs [step]  it ", "eats"], "label": "0"}])
    assert hs[0]["question"] == "Cooking: A man. cuts. He then" and hs[0]["choices"] == ["stirs  it", "eats"] and hs[0]["answer"] == 0
    # ("stirs [step]  it" -> "stirs   it" -> one pass of "  " -> " ": lm-eval's preprocess, byte for byte)
    tq = convert_rows("truthfulqa_mc1", [{"question": "q", "mc1_targets": {"choices": ["t", "f"], "labels": [1, 0]}}])
    assert tq[0]["answer"] == 0 and tq[0]["id"] == "truthfulqa_mc1-0"
    mbpp = convert_rows("mbpp", [{"task_id": 2, "text": "Write f.", "test_list": ["assert f(1)", "assert f(2)"]}])
    assert mbpp == [{"id": "2", "prompt": "Write f.", "test": "assert f(1)\nassert f(2)"}]
    with pytest.raises(DataError, match="gsm8k row 0: cannot convert.*question"):
        convert_rows("gsm8k", [{"answer": "#### 3"}])


def test_paper_benchmark_specs_render_like_lm_eval(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    write_jsonl(bench / "mmlu.jsonl", [{"id": "t", "question": " Q? ", "choices": ["w", "x", "y", "z"], "answer": 2, "subject": "abstract_algebra"}])
    write_jsonl(bench / "mmlu_dev.jsonl", [{"id": f"d{i}", "question": f"D{i}", "choices": ["1", "2", "3", "4"], "answer": i % 4, "subject": s}
                                           for i, s in enumerate(["anatomy", "abstract_algebra", "abstract_algebra"])])
    (task,) = resolve_tasks(["mmlu"], data_dir=bench)
    assert build_texts(task, task.rows)[0] == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "D1\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\nD2\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: C\n\n"
        "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    )


def test_two_task_files_with_one_name_are_an_error_naming_both(tmp_path):
    (tmp_path / "dirA").mkdir()
    (tmp_path / "dirB").mkdir()
    a = write_jsonl(tmp_path / "dirA" / "quiz.jsonl", MC)
    b = write_jsonl(tmp_path / "dirB" / "quiz.jsonl", [{**r, "question": r["question"] + "?"} for r in MC])
    with pytest.raises(DataError, match=r"two tasks named 'quiz'.*dirA/quiz\.jsonl.*dirB/quiz\.jsonl"):
        resolve_tasks([str(a), str(b)])
    assert [t.name for t in resolve_tasks([str(a), str(a)])] == ["quiz"]  # the same file twice runs once


def test_a_one_choice_question_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [*MC, {"id": "z", "question": "q?", "choices": ["only"], "answer": 0}])
    with pytest.raises(DataError, match=r"one\.jsonl:\d+: field 'choices' has one choice.*at least two"):
        load_task(path)
