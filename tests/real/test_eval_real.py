"""Few-shot prefix caching on the real model: 5-shot MMLU-format scoring and 8-shot
GSM8K-format greedy generation, with the shared prefix cached and without, on the public
questions shipped in data/real/ (SmolLM2-135M: grouped-query attention, tied embeddings)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_smollm2 import smollm2  # noqa: F401 - the converted model fixture (skips or fails as that tier does)

from dtm.evaluation.harness import load_scorer, prefix_groups
from dtm.evaluation.runner import encode_mc, encode_prompts, run_task
from dtm.evaluation.tasks import build_texts, load_task

pytestmark = pytest.mark.real

DATA = Path(__file__).resolve().parents[2] / "data" / "real"
MMLU_5SHOT = """\
name: mmlu_5shot
data: {data}/mmlu.jsonl
fewshot_data: {data}/mmlu_dev.jsonl
num_fewshot: 5
fewshot_sampler: first_n
fewshot_same_group: true
doc_to_choice: letters
group_by: subject
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
description: "The following are multiple choice questions (with answers) about {{{{subject.replace('_', ' ')}}}}.\\n\\n"
"""
GSM8K_8SHOT = """\
name: gsm8k_8shot
type: generate
data: {data}/gsm8k.jsonl
fewshot_data: {data}/gsm8k_train.jsonl
num_fewshot: 8
fewshot_sampler: first_n
doc_to_text: "Question: {{{{prompt}}}}\\nAnswer:"
stop: ["Question:", "</s>", "<|im_end|>"]
max_new_tokens: 16
extractor: numeric
"""


@pytest.fixture(scope="module")
def scorer(smollm2):  # noqa: F811 - the imported fixture
    return load_scorer(smollm2, device="cpu")


def _task(tmp_path: Path, text: str, rows: slice):
    spec = tmp_path / "task.yaml"
    spec.write_text(text.format(data=DATA))
    task = load_task(spec)
    task.rows = task.rows[rows]
    return task


def test_five_shot_mmlu_with_the_prefix_cached_equals_whole_prompts(scorer, tmp_path):
    task = _task(tmp_path, MMLU_5SHOT, slice(20, 30))  # the end of one subject, the start of the next
    groups = prefix_groups([ctx for ctx, _ in encode_mc(task, scorer.tokenizer, task.rows)])
    assert [len(m) for n, m in groups if n > 250] == [5, 5]  # one cached prefix (5 examples, 250+ tokens) per subject
    cached, with_cache = run_task(scorer, task, batch_size=8, progress=False)
    whole, without = run_task(dataclasses.replace(scorer, prefix_cache=False), task, batch_size=8, progress=False)
    for a, b in zip(with_cache, without, strict=True):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])
    assert cached["metrics"] == whole["metrics"]


def test_eight_shot_gsm8k_generation_with_the_prefix_cached_is_identical(scorer, tmp_path):
    task = _task(tmp_path, GSM8K_8SHOT, slice(0, 4))
    prompts = encode_prompts(task, scorer.tokenizer, build_texts(task, task.rows))
    assert prefix_groups(prompts)[0][0] > 900  # the 8 worked examples, once
    _, with_cache = run_task(scorer, task, batch_size=2, progress=False)
    _, without = run_task(dataclasses.replace(scorer, prefix_cache=False), task, batch_size=2, progress=False)
    assert [s["output"] for s in with_cache] == [s["output"] for s in without]
    assert len({s["output"] for s in with_cache}) == len(with_cache)  # real, distinct continuations
