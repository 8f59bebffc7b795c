"""dtm's built-in `mmlu`, `gsm8k` and `bbh` tasks against lm-eval's own task definitions, on the
same public rows (data/real/, MIT; see its README) and SmolLM2-135M.

The lm-eval side is lm-eval's installed task YAML itself (`mmlu_<subject>`, `gsm8k`,
`bbh_cot_fewshot_<subtask>`), included unchanged except for the dataset: the local rows under the
field names lm-eval's template reads (GSM8K `question`, BBH `input`/`target`) and a shorter
generation limit (the same on both sides; greedy decoding, so a prefix of the full outputs), and
MMLU's `num_fewshot: 5` (lm-eval's mmlu is 0-shot unless asked; dtm's built-in is 5-shot). So
the test checks dtm's claim that its built-ins ARE lm-eval's formats: description, few-shot
sampler (first_n for MMLU and BBH, lm-eval's seeded random draw for GSM8K), delimiters, the BBH
chain-of-thought exemplars (lm-eval ships its own copy inside its YAML; ours come from the
BIG-Bench-Hard repository), stop strings and answer extraction. Per question: the prompt
byte-identical to lm-eval's context, the same acc (MMLU, log-likelihoods within 1e-4), the same
greedy generation and the same exact_match (GSM8K's flexible-extract, BBH's get-answer filter).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmeval_compare import dtm_samples, lm_eval_samples, request_contexts
from test_smollm2 import smollm2  # noqa: F401 - the converted model fixture (skips or fails as that tier does)

from dtm.evaluation.tasks import build_texts, resolve_tasks

pytestmark = pytest.mark.real

DATA = Path(__file__).resolve().parents[2] / "data" / "real"
MMLU_PER_SUBJECT = 1  # 14 questions, one per subject (its description and dev examples), 5-shot
GSM8K_QUESTIONS, GSM8K_TOKENS = 4, 32
BBH_PER_SUBTASK, BBH_TOKENS = 2, 40  # 8 questions over the 4 subtasks, 3-shot chain of thought
FILTER = {"gsm8k": "flexible-extract", "bbh": "get-answer"}  # the lm-eval filter whose exact_match dtm's extractor matches


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def first_per_group(rows: list[dict], key: str, n: int) -> list[dict]:
    """The first n rows of each group, in file order."""
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        if seen.get(r[key], 0) < n:
            seen[r[key]] = seen.get(r[key], 0) + 1
            out.append(r)
    return out


def lm_eval_task(builtin: Path, name: str, files: dict[str, str], **overrides) -> str:
    """An lm-eval task: lm-eval's own YAML `builtin` included, only the dataset (and `overrides`) replaced."""
    tree = {"include": str(builtin), "task": name, "tag": [], "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": files}} | overrides
    return json.dumps(tree)  # JSON is YAML


@pytest.fixture(scope="module")
def both(smollm2, tmp_path_factory):  # noqa: F811 - the imported fixture
    """{task: [(dtm's prompt, dtm's sample, lm-eval's sample), ...] in dtm's row order}."""
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks"
    tmp = tmp_path_factory.mktemp("mmlu_gsm8k_bbh")
    lm_dir = tmp / "lmeval"
    lm_dir.mkdir()
    tasks = {t.name: t for t in resolve_tasks(["mmlu", "gsm8k", "bbh"], data_dir=DATA, require_all=True)}
    order: dict[str, list[str]] = {}  # dtm task -> its lm-eval tasks, in dtm's row order

    mmlu = first_per_group(read_jsonl(DATA / "mmlu.jsonl"), "subject", MMLU_PER_SUBJECT)
    dev = read_jsonl(DATA / "mmlu_dev.jsonl")
    tasks["mmlu"].rows = mmlu
    for subject in dict.fromkeys(r["subject"] for r in mmlu):
        files = {"test": write_jsonl(tmp / f"mmlu_{subject}.jsonl", [r for r in mmlu if r["subject"] == subject]),
                 "dev": write_jsonl(tmp / f"mmlu_dev_{subject}.jsonl", [r for r in dev if r["subject"] == subject])}
        name = f"local_mmlu_{subject}"
        # lm-eval's mmlu is 0-shot unless asked (`--num_fewshot 5`); dtm's built-in is the paper's 5-shot
        (lm_dir / f"{name}.yaml").write_text(lm_eval_task(builtin / "mmlu" / "default" / f"mmlu_{subject}.yaml", name, files,
                                                          num_fewshot=5))
        order.setdefault("mmlu", []).append(name)

    gsm8k = read_jsonl(DATA / "gsm8k.jsonl")[:GSM8K_QUESTIONS]
    tasks["gsm8k"].rows = gsm8k
    files = {"test": write_jsonl(tmp / "gsm8k.jsonl", [{"question": r["prompt"], "answer": r["answer"]} for r in gsm8k]),
             "train": write_jsonl(tmp / "gsm8k_train.jsonl",
                                  [{"question": r["prompt"], "answer": r["answer"]} for r in read_jsonl(DATA / "gsm8k_train.jsonl")])}
    generation = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0, "max_gen_toks": GSM8K_TOKENS}
    (lm_dir / "local_gsm8k.yaml").write_text(lm_eval_task(builtin / "gsm8k" / "gsm8k.yaml", "local_gsm8k", files,
                                                          generation_kwargs=generation))
    order["gsm8k"] = ["local_gsm8k"]

    bbh = first_per_group(read_jsonl(DATA / "bbh.jsonl"), "subtask", BBH_PER_SUBTASK)
    tasks["bbh"].rows = bbh
    for subtask in dict.fromkeys(r["subtask"] for r in bbh):
        rows = [{"input": r["prompt"], "target": r["answer"]} for r in bbh if r["subtask"] == subtask]
        name = f"local_bbh_{subtask}"
        generation = {"until": ["</s>", "Q", "\n\n"], "do_sample": False, "temperature": 0.0, "max_gen_toks": BBH_TOKENS}
        (lm_dir / f"{name}.yaml").write_text(lm_eval_task(builtin / "bbh" / "cot_fewshot" / f"{subtask}.yaml", name,
                                                          {"test": write_jsonl(tmp / f"bbh_{subtask}.jsonl", rows)},
                                                          generation_kwargs=generation))
        order.setdefault("bbh", []).append(name)

    tokens = {"gsm8k": GSM8K_TOKENS, "bbh": BBH_TOKENS}
    for name, n in tokens.items():
        tasks[name].spec = tasks[name].spec.model_copy(update={"max_new_tokens": n})

    theirs = lm_eval_samples(smollm2, [n for names in order.values() for n in names], lm_dir)
    ours = dtm_samples(smollm2, tasks)
    out = {}
    for name, task in tasks.items():
        ref = []
        for lm_name in order[name]:
            samples = [s for s in theirs[lm_name] if s.get("filter", "none") in (FILTER.get(name), "none")]
            ref += sorted(samples, key=lambda s: s["doc_id"])
        out[name] = list(zip(build_texts(task, task.rows), ours[name], ref, strict=True))
    return out


def test_mmlu_five_shot_prompts_and_scores_equal_lm_eval(both):
    items = both["mmlu"]
    assert len(items) == 14 * MMLU_PER_SUBJECT
    largest = 0.0
    for i, (prompt, ours, theirs) in enumerate(items):
        assert set(request_contexts(theirs)) == {prompt}, f"mmlu question {i}: prompts differ"
        assert prompt.count("\nAnswer: ") == 5  # five examples from the subject's dev split
        lls = [float(r[0]) for r in theirs["filtered_resps"]]
        assert ours["loglikelihoods"] == pytest.approx(lls, abs=1e-4), f"mmlu question {i}"
        assert ours["acc"] == theirs["acc"], f"mmlu question {i}"
        largest = max(largest, *(abs(x - y) for x, y in zip(ours["loglikelihoods"], lls, strict=True)))
    print(f"mmlu 5-shot: {len(items)} questions, 0 differ, max |log-likelihood difference| {largest:.1e}")


@pytest.mark.parametrize("task", ["gsm8k", "bbh"])
def test_generation_prompts_outputs_and_answers_equal_lm_eval(both, task):
    items = both[task]
    assert len(items) == (GSM8K_QUESTIONS if task == "gsm8k" else 4 * BBH_PER_SUBTASK)
    for i, (prompt, ours, theirs) in enumerate(items):
        assert request_contexts(theirs)[0] == prompt, f"{task} question {i}: prompts differ"
        assert ours["output"] == theirs["resps"][0][0], f"{task} question {i}: generations differ"
        assert ours["exact_match"] == theirs["exact_match"], f"{task} question {i}: answers scored differently"
    shots = {"gsm8k": ("\nAnswer:", 6), "bbh": ("\nA: Let's think step by step.\n", 4)}[task]
    assert all(p.count(shots[0]) == shots[1] for p, _, _ in items)  # the examples and the question
    print(f"{task}: {len(items)} generations, 0 differ")
