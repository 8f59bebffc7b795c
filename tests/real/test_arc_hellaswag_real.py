"""dtm's ARC and HellaSwag prompts and scores equal lm-eval's on the same public questions
(data/real/: ARC-Challenge, CC BY-SA 4.0; HellaSwag, MIT; see its README), on SmolLM2-135M.

Three tasks, each once as dtm runs it and once as an lm-eval task YAML over the same JSONL rows
(lm-eval's `json` dataset builder, `HFLM`, float32 CPU, the same batch size):
  arc_challenge   dtm's built-in (lm-eval's arc_challenge: "Question: ..\\nAnswer:", full-text
                  choices, acc and acc_norm), 0-shot, all 40 questions;
  arc_25shot      the same format with 25 examples (first_n, the Open LLM Leaderboard's shot
                  count), 3 questions: lm-eval scores ~1,500 tokens per choice;
  hellaswag       dtm's built-in (lm-eval's hellaswag: the preprocessed query, " " + ending),
                  0-shot, all 44 questions there (4 from llm-foundry, the first 40 of the
                  validation split from klosax/hellaswag_text_data).
Per question: the prompt string byte-identical to lm-eval's context, the same acc and
acc_norm, log-likelihoods within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmeval_compare import dtm_samples, lm_eval_samples, request_contexts
from test_smollm2 import smollm2  # noqa: F401 - the converted model fixture (skips or fails as that tier does)

from dtm.evaluation.tasks import build_texts, load_task, resolve_tasks

pytestmark = pytest.mark.real

DATA = Path(__file__).resolve().parents[2] / "data" / "real"
ARC_SHOTS, ARC_25_QUESTIONS = 25, 3


def lm_eval_yaml(name: str, test: Path, fewshot: Path | None = None) -> str:
    """An lm-eval task over local JSONL rows {question, choices, answer}: ARC's and HellaSwag's template."""
    text = "{{question}}" if name.startswith("hellaswag") else "Question: {{question}}\nAnswer:"
    tree = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(test)} | ({"train": str(fewshot)} if fewshot else {})},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": text, "doc_to_choice": "{{choices}}",
            "doc_to_target": "answer", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    if fewshot:
        tree |= {"fewshot_split": "train", "num_fewshot": ARC_SHOTS, "fewshot_config": {"sampler": "first_n"}}
    return json.dumps(tree)  # JSON is YAML


@pytest.fixture(scope="module")
def both(smollm2, tmp_path_factory):  # noqa: F811 - the imported fixture
    """{task: (dtm's prompts, dtm's samples, lm-eval's samples in row order)}."""

    tmp = tmp_path_factory.mktemp("arc_hellaswag")
    arc25_rows = tmp / "arc25.jsonl"
    arc25_rows.write_text("".join((DATA / "arc_challenge.jsonl").read_text().splitlines(keepends=True)[:ARC_25_QUESTIONS]))
    (tmp / "arc_25shot.yaml").write_text(json.dumps({
        "name": "arc_25shot", "type": "multiple_choice", "data": str(arc25_rows), "doc_to_text": "Question: {{question}}\nAnswer:",
        "fewshot_data": str(DATA / "arc_challenge_fewshot.jsonl"), "num_fewshot": ARC_SHOTS, "fewshot_sampler": "first_n"}))
    tasks = {t.name: t for t in resolve_tasks(["arc_challenge", "hellaswag"], data_dir=DATA, require_all=True)}
    tasks["arc_25shot"] = load_task(tmp / "arc_25shot.yaml")
    lm_dir = tmp / "lmeval"
    lm_dir.mkdir()
    (lm_dir / "arc_challenge.yaml").write_text(lm_eval_yaml("arc_challenge_local", DATA / "arc_challenge.jsonl"))
    (lm_dir / "arc_25shot.yaml").write_text(lm_eval_yaml("arc_25shot_local", arc25_rows, DATA / "arc_challenge_fewshot.jsonl"))
    (lm_dir / "hellaswag.yaml").write_text(lm_eval_yaml("hellaswag_local", DATA / "hellaswag.jsonl"))
    names = {"arc_challenge": "arc_challenge_local", "arc_25shot": "arc_25shot_local", "hellaswag": "hellaswag_local"}
    theirs = lm_eval_samples(smollm2, list(names.values()), lm_dir)
    ours = dtm_samples(smollm2, tasks)
    return {name: (build_texts(task, task.rows), ours[name], sorted(theirs[names[name]], key=lambda s: s["doc_id"]))
            for name, task in tasks.items()}


@pytest.mark.parametrize("task", ["arc_challenge", "arc_25shot", "hellaswag"])
def test_prompts_and_scores_equal_lm_eval(both, task):
    prompts, ours, theirs = both[task]
    assert len(ours) == len(theirs) == len(prompts) > 0
    largest = 0.0
    for i, (prompt, a, b) in enumerate(zip(prompts, ours, theirs, strict=True)):
        contexts = request_contexts(b)
        assert set(contexts) == {prompt}, f"{task} question {i}: prompts differ"
        lls = [float(r[0]) for r in b["filtered_resps"]]
        assert a["loglikelihoods"] == pytest.approx(lls, abs=1e-4), f"{task} question {i}"
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"]), f"{task} question {i}"
        largest = max(largest, *(abs(x - y) for x, y in zip(a["loglikelihoods"], lls, strict=True)))
    if task == "arc_25shot":
        assert all(p.count("\nAnswer: ") == ARC_SHOTS for p in prompts)  # the examples are in every prompt
    if task == "hellaswag":
        assert len(ours) == 44  # every row of data/real/hellaswag.jsonl
    print(f"{task}: {len(ours)} questions, 0 differ, max |log-likelihood difference| {largest:.1e}")
