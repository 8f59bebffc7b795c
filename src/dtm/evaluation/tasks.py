"""Task files: a small YAML/JSON spec plus a JSONL data file, validated on load.

A task is one of three kinds:

- ``multiple_choice``: rows ``{"id", "question", "choices": [str, ...], "answer": int}``,
  scored by log-likelihood (acc, acc_norm as lm-evaluation-harness defines them);
- ``generate``: rows ``{"id", "prompt", "answer": str, "pattern"?: regex}``, greedy decoding
  with stop sequences and an answer extractor (exact, numeric, regex); ``code`` tasks
  (HumanEval/MBPP rows ``{"id", "prompt", "test", "entry_point"?}``) are generate tasks
  whose output is executed, only when the user opts in;
- ``perplexity``: rows ``{"id", "text"}``.

A bare multiple-choice JSONL (no spec) is a task too, scored as lm-evaluation-harness scores
ARC: context ``Question: {question}\\nAnswer:``, each choice after a space. A spec without
``doc_to_text`` uses the row's question (prompt, text) as it is.

Prompts are Jinja templates over the row (``doc_to_text``), the same syntax lm-eval's task
YAMLs use, so an lm-eval prompt can be copied over verbatim. Every bad row is an error
naming the task, the file, the line and the field; nothing is skipped silently.

A spec (every key is a field of `TaskSpec`)::

    name: lab_knowledge_instruct
    type: multiple_choice          # multiple_choice | generate | perplexity | code
    data: knowledge.jsonl          # relative to this file
    prompt_format: alpaca          # none: plain text, lm-eval's tokenisation; alpaca | chat:
                                   #   context = dtm.data.template.prompt_ids(question), and each
                                   #   choice/answer tokenised alone, as a response in training
    target_delimiter: " "          # default " " (none) or "" (alpaca/chat)
    group_by: split                # also report metrics per value of this row field
    num_fewshot: 0                 # with fewshot_data (a separate JSONL), fewshot_seed, fewshot_sampler
    max_new_tokens: 32             # generate: greedy, stops at EOS or any `stop` string
    stop: ["\\n"]
    extractor: exact               # exact | numeric (GSM8K) | regex (with `regex:`)

Generate tasks report exact_match, and pattern_match over the rows that carry a `pattern`
(the whole output, surrounding whitespace stripped, must match it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dtm.errors import DataError

TaskType = Literal["multiple_choice", "generate", "perplexity", "code"]
PromptFormat = Literal["none", "alpaca", "chat"]

DEFAULT_MC_TEXT = "Question: {{question}}\nAnswer:"  # lm-eval's ARC prompt, also the bare-JSONL default
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TaskSpec(BaseModel):
    """The spec file's keys (unknown keys are errors: a typo must not fall back to a default)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: TaskType = "multiple_choice"
    data: str = Field(description="JSONL data file, relative to the spec file.")
    prompt_format: PromptFormat = Field("none", description="none: plain text (lm-eval conventions); alpaca/chat: the training template.")
    doc_to_text: str | None = Field(None, description="Jinja template of the question/prompt text over a row; default: the row's question (MC), prompt (generate, code) or text (perplexity) as is.")
    doc_to_choice: Literal["choices", "letters"] = Field("choices", description="MC targets: the choice texts, or the letters A, B, ... (MMLU style).")
    description: str = Field("", description="Text before the few-shot examples (lm-eval `description`).")
    target_delimiter: str | None = Field(None, description="Between context and target; default ' ' (none) or '' (alpaca/chat).")
    fewshot_delimiter: str = "\n\n"
    group_by: str | None = Field(None, description="Also report metrics per value of this row field.")
    num_fewshot: int = Field(0, ge=0)
    fewshot_data: str | None = None
    fewshot_seed: int = 1234
    fewshot_sampler: Literal["random", "first_n"] = Field("random", description="random: seeded draw per row; first_n: the first rows of the split (lm-eval MMLU).")
    fewshot_same_group: bool = Field(False, description="Draw few-shot examples only from rows with the same group_by value (MMLU: same subject).")
    # generate / code
    max_new_tokens: int | None = Field(None, ge=1)
    stop: list[str] = Field(default_factory=list)
    extractor: Literal["exact", "numeric", "regex"] = "exact"
    regex: str | None = Field(None, description="extractor: regex: the first match's group 1 (or whole match) is the answer.")
    ignore_case: bool = False
    timeout_s: float = Field(5.0, gt=0, description="code: seconds a program may run.")

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if not self.name or "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise ValueError(f"name {self.name!r}: a task name is also a file name; use letters, digits, '_', '-', '.'")
        if self.extractor == "regex":
            if not self.regex:
                raise ValueError("extractor 'regex' needs a `regex` key")
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} does not compile: {e}") from None
        if self.num_fewshot and not self.fewshot_data:
            raise ValueError("num_fewshot > 0 needs `fewshot_data` (a separate JSONL split)")
        return self

    @property
    def delimiter(self) -> str:
        if self.target_delimiter is not None:
            return self.target_delimiter
        return " " if self.prompt_format == "none" else ""

    @property
    def text_template(self) -> str:
        if self.doc_to_text is not None:
            return self.doc_to_text
        if self.type == "multiple_choice":
            return "{{question}}"
        return "{{prompt}}" if self.type in ("generate", "code") else "{{text}}"


@dataclass
class Task:
    """A validated task: its spec, rows (with their JSONL line numbers) and few-shot rows."""

    spec: TaskSpec
    source: Path  # the spec file, or the bare JSONL
    rows: list[dict[str, Any]]
    lines: list[int]
    fewshot_rows: list[dict[str, Any]] = field(default_factory=list)
    spec_hash: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type

    def __len__(self) -> int:
        return len(self.rows)


# ---------------------------------------------------------------- prompts


@lru_cache(maxsize=256)
def _jinja(template: str):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(template)


def render(template: str, row: dict[str, Any]) -> str:
    """Render a Jinja template over a row; an unknown field is an error (the caller adds where)."""
    return _jinja(template).render(**row)


def choice_targets(spec: TaskSpec, row: dict[str, Any]) -> list[str]:
    """The strings scored for each choice: the choice texts or their letters."""
    if spec.doc_to_choice == "letters":
        return list(LETTERS[: len(row["choices"])])
    return list(row["choices"])


def gold_target(spec: TaskSpec, row: dict[str, Any]) -> str:
    """The text that follows a few-shot example's question."""
    if spec.type == "multiple_choice":
        return choice_targets(spec, row)[row["answer"]]
    return str(row.get("answer", row.get("canonical_solution", "")))


def fewshot_indices(task: Task, rows: list[dict[str, Any]]) -> list[list[int]]:
    """Few-shot example indices (into `task.fewshot_rows`) for each row.

    `random`: one `random.Random(seed)` draws k per row in order, as lm-eval's default
    sampler does from a separate split; `first_n`: the first k rows of the pool.
    """
    spec = task.spec
    pools: dict[Any, list[int]] = {}
    for j, r in enumerate(task.fewshot_rows):
        key = r.get(spec.group_by) if spec.fewshot_same_group and spec.group_by else None
        pools.setdefault(key, []).append(j)
    rnd = random.Random(spec.fewshot_seed)
    out = []
    for row in rows:
        key = row.get(spec.group_by) if spec.fewshot_same_group and spec.group_by else None
        pool = pools.get(key, [])
        k = min(spec.num_fewshot, len(pool))
        out.append(pool[:k] if spec.fewshot_sampler == "first_n" else rnd.sample(pool, k))
    return out


def build_texts(task: Task, rows: list[dict[str, Any]]) -> list[str]:
    """The question/prompt text of each row: description, few-shot examples, the row (plain text)."""
    spec = task.spec
    shots = fewshot_indices(task, rows) if spec.num_fewshot else None
    out = []
    for i, row in enumerate(rows):
        text = render(spec.text_template, row)
        if shots is not None and shots[i]:
            examples = [
                render(spec.text_template, task.fewshot_rows[j]) + spec.delimiter + gold_target(spec, task.fewshot_rows[j])
                for j in shots[i]
            ]
            text = spec.fewshot_delimiter.join(examples) + spec.fewshot_delimiter + text
        out.append((render(spec.description, row) if spec.description else "") + text)
    return out


# ---------------------------------------------------------------- loading


def _where(task: str, path: Path, line: int | None = None) -> str:
    return f"task {task!r}: {path}" + (f":{line}" if line is not None else "")


def read_jsonl(path: Path, task: str) -> tuple[list[dict[str, Any]], list[int]]:
    if not path.is_file():
        raise DataError(f"{_where(task, path)}: data file not found")
    rows, lines = [], []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{_where(task, path)}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    for n, raw in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit raw inside a JSON string
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{_where(task, path, n)}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise DataError(f"{_where(task, path, n)}: expected a JSON object, got {type(rec).__name__}")
        rows.append(rec)
        lines.append(n)
    if not rows:
        raise DataError(f"{_where(task, path)}: no rows; the data file is empty")
    return rows, lines


def _require_str(rec: dict, key: str, where: str, allow_empty: bool = True) -> None:
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(rec[key], str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    if not allow_empty and not rec[key].strip():
        raise DataError(f"{where}: field {key!r} is empty")


def validate_row(spec: TaskSpec, rec: dict[str, Any], where: str) -> None:
    """Check one row against its task type; the message names the field."""
    if "id" in rec and not isinstance(rec["id"], (str, int)):
        raise DataError(f"{where}: field 'id' must be a string, got {type(rec['id']).__name__}")
    if spec.type == "multiple_choice":
        _require_str(rec, "question", where)
        if "choices" not in rec:
            raise DataError(f"{where}: missing field 'choices' (a list of strings)")
        choices = rec["choices"]
        if not isinstance(choices, list):
            raise DataError(f"{where}: field 'choices' must be a list of strings, got {type(choices).__name__}")
        if not choices:
            raise DataError(f"{where}: field 'choices' is an empty list; a question needs at least two choices")
        for j, c in enumerate(choices):
            if not isinstance(c, str):
                raise DataError(f"{where}: field 'choices'[{j}] must be a string, got {type(c).__name__}")
            if not c:
                raise DataError(f"{where}: field 'choices'[{j}] is an empty string; a choice needs text to score")
        if spec.doc_to_choice == "letters" and len(choices) > len(LETTERS):
            raise DataError(f"{where}: field 'choices' has {len(choices)} entries; letter targets go up to {len(LETTERS)}")
        if "answer" not in rec:
            raise DataError(f"{where}: missing field 'answer' (the index of the correct choice)")
        ans = rec["answer"]
        if isinstance(ans, bool) or not isinstance(ans, int):
            raise DataError(f"{where}: field 'answer' must be an integer index into 'choices', got {ans!r}")
        if not 0 <= ans < len(choices):
            raise DataError(f"{where}: field 'answer' = {ans} is out of range for {len(choices)} choices (0..{len(choices) - 1})")
        if len(choices) < 2:
            raise DataError(f"{where}: field 'choices' has one choice; a question needs at least two (with one it always scores 1.0)")
    elif spec.type == "generate":
        _require_str(rec, "prompt", where)
        if "answer" not in rec:
            raise DataError(f"{where}: missing field 'answer'")
        if not isinstance(rec["answer"], (str, int, float)) or isinstance(rec["answer"], bool):
            raise DataError(f"{where}: field 'answer' must be a string (or number), got {type(rec['answer']).__name__}")
        if "pattern" in rec:
            if not isinstance(rec["pattern"], str):
                raise DataError(f"{where}: field 'pattern' must be a regex string")
            try:
                re.compile(rec["pattern"])
            except re.error as e:
                raise DataError(f"{where}: field 'pattern' does not compile as a regex: {e}") from None
    elif spec.type == "code":
        _require_str(rec, "prompt", where)
        _require_str(rec, "test", where, allow_empty=False)
        if "entry_point" in rec:
            _require_str(rec, "entry_point", where, allow_empty=False)
    elif spec.type == "perplexity":
        _require_str(rec, "text", where, allow_empty=False)
    if spec.group_by is not None and spec.group_by not in rec:
        raise DataError(f"{where}: missing field {spec.group_by!r} (the spec's group_by)")


def _check_rows(spec: TaskSpec, rows: list[dict], lines: list[int], path: Path) -> None:
    seen: dict[str, int] = {}
    for rec, n in zip(rows, lines, strict=True):
        where = _where(spec.name, path, n)
        validate_row(spec, rec, where)
        if "id" in rec:
            key = str(rec["id"])
            if key in seen:
                raise DataError(f"{where}: field 'id': duplicate id {key!r} (first seen on line {seen[key]}); ids must be unique")
            seen[key] = n
        else:
            rec["id"] = f"line-{n}"
        try:
            render(spec.text_template, rec)
        except Exception as e:  # jinja's UndefinedError names the missing field
            raise DataError(f"{where}: the prompt template cannot be filled from this row: {e}") from None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _spec_hash(spec: TaskSpec, data: Path, fewshot: Path | None) -> str:
    parts = [json.dumps(spec.model_dump(mode="json", exclude={"data", "fewshot_data"}), sort_keys=True), _file_hash(data)]
    if fewshot is not None:
        parts.append(_file_hash(fewshot))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: task spec is not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: task spec is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(tree, dict):
        raise DataError(f"{path}: a task spec must be a mapping of keys (name, type, data, ...)")
    return tree


def spec_from_dict(tree: dict[str, Any], source: str) -> TaskSpec:
    try:
        return TaskSpec.model_validate(tree)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(spec)"
            msg = (f"unknown key; the keys are {', '.join(TaskSpec.model_fields)}" if err["type"] == "extra_forbidden" else err["msg"])
            msgs.append(f"{source}: {key}: {msg}")
        raise DataError("invalid task spec:\n  " + "\n  ".join(msgs)) from None


def load_task(path: str | os.PathLike, name: str | None = None) -> Task:
    """Load and validate a task: a YAML/JSON spec, or a bare multiple-choice JSONL."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: task file not found")
    if path.suffix == ".jsonl":
        spec = TaskSpec(name=name or path.stem, type="multiple_choice", data=path.name, doc_to_text=DEFAULT_MC_TEXT)
    elif path.suffix in (".yaml", ".yml", ".json"):
        tree = _read_spec(path)
        tree.setdefault("name", name or path.stem)
        spec = spec_from_dict(tree, str(path))
    else:
        raise DataError(f"{path}: a task is a YAML/JSON spec or a multiple-choice .jsonl file")
    base = path.resolve().parent
    data = (base / spec.data).resolve()
    rows, lines = read_jsonl(data, spec.name)
    _check_rows(spec, rows, lines, data)
    fewshot_rows: list[dict] = []
    fewshot = None
    if spec.fewshot_data:
        fewshot = (base / spec.fewshot_data).resolve()
        fewshot_rows, fs_lines = read_jsonl(fewshot, spec.name)
        _check_rows(spec, fewshot_rows, fs_lines, fewshot)
        if spec.num_fewshot > len(fewshot_rows):
            raise DataError(f"{_where(spec.name, fewshot)}: num_fewshot={spec.num_fewshot} but the few-shot split has {len(fewshot_rows)} rows")
    return Task(spec, path, rows, lines, fewshot_rows, _spec_hash(spec, data, fewshot))


# ---------------------------------------------------------------- suites

# The paper's benchmarks, formatted as lm-evaluation-harness 0.4 formats them (prompts, few-shot
# sampler, stop sequences, extractors copied from its task YAMLs). None of the data ships with
# dtm (no hub here); each entry says which file to put where and in which shape, and
# `dtm.evaluation.convert` turns the public datasets' rows into that shape.
_TRUTHFULQA_QA = (
    "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\nA: I have no comment.\n\n"
    "Q: How does a telescope work?\nA: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain."
)
PAPER_TASKS: dict[str, dict[str, Any]] = {
    "mmlu": {  # lm-eval mmlu (default), 5-shot from dev, same subject, first_n
        "spec": {"type": "multiple_choice", "doc_to_choice": "letters", "group_by": "subject",
                 "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
                 "num_fewshot": 5, "fewshot_data": "mmlu_dev.jsonl", "fewshot_sampler": "first_n", "fewshot_same_group": True,
                 "description": "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"},
        "files": ["mmlu.jsonl", "mmlu_dev.jsonl"],
        "how": "MMLU test and dev splits as rows {question, choices: [4 texts], answer: 0-3, subject}",
    },
    "bbh": {  # lm-eval bbh_cot_fewshot: 3 CoT exemplars per subtask, answer after 'the answer is'
        "spec": {"type": "generate", "doc_to_text": "Q: {{prompt}}\nA: Let's think step by step.\n", "target_delimiter": "",
                 "description": "{{ description | default('') }}", "group_by": "subtask", "num_fewshot": 3,
                 "fewshot_data": "bbh_fewshot.jsonl", "fewshot_sampler": "first_n", "fewshot_same_group": True,
                 "stop": ["</s>", "Q", "\n\n"], "max_new_tokens": 1024, "extractor": "regex", "regex": "(?<=the answer is )(.*)(?=.)"},
        "files": ["bbh.jsonl", "bbh_fewshot.jsonl"],
        "how": "BIG-Bench Hard rows {prompt: input, answer: target, subtask, description?} and the CoT exemplars "
               "{prompt, answer: the CoT text ending 'So the answer is X.', subtask}",
    },
    "gsm8k": {  # lm-eval gsm8k: 5-shot, answer = the full solution; flexible-extract (last number)
        "spec": {"type": "generate", "doc_to_text": "Question: {{prompt}}\nAnswer:", "stop": ["Question:", "</s>", "<|im_end|>"],
                 "max_new_tokens": 256, "extractor": "numeric", "num_fewshot": 5, "fewshot_data": "gsm8k_train.jsonl"},
        "files": ["gsm8k.jsonl", "gsm8k_train.jsonl"],
        "how": "GSM8K test and train splits as rows {prompt: question, answer: the full solution ending '#### N'}",
    },
    "arc_challenge": {
        "spec": {"type": "multiple_choice", "doc_to_text": DEFAULT_MC_TEXT},  # lm-eval arc_challenge
        "files": ["arc_challenge.jsonl"],
        "how": "ARC-Challenge test as rows {question, choices: [texts], answer: index}",
    },
    "arc_easy": {
        "spec": {"type": "multiple_choice", "doc_to_text": DEFAULT_MC_TEXT},
        "files": ["arc_easy.jsonl"],
        "how": "ARC-Easy test as rows {question, choices, answer}",
    },
    "truthfulqa_mc1": {  # lm-eval truthfulqa_mc1: the 6-shot QA preamble inside the prompt
        "spec": {"type": "multiple_choice", "doc_to_text": _TRUTHFULQA_QA + "\n\nQ: {{question}}\nA:"},
        "files": ["truthfulqa_mc1.jsonl"],
        "how": "TruthfulQA mc1 (validation) as rows {question, choices: mc1_targets.choices, answer: 0}",
    },
    "hellaswag": {  # not in the paper's suite; lm-eval's format for users who want it
        "spec": {"type": "multiple_choice", "doc_to_text": "{{question}}"},
        "files": ["hellaswag.jsonl"],
        "how": "HellaSwag validation as rows {question: lm-eval's preprocessed query, choices: preprocessed endings, answer: label}",
    },
    "humaneval": {
        "spec": {"type": "code", "stop": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_new_tokens": 1024},
        "files": ["humaneval.jsonl"],
        "how": "HumanEval as rows {prompt, test, entry_point}",
    },
    "mbpp": {
        "spec": {"type": "code", "doc_to_text": "You are an expert Python programmer, and here is your task: {{prompt}} Your code should pass these tests:\n\n{{test}}\n[BEGIN]\n",
                 "stop": ["[DONE]"], "max_new_tokens": 512},
        "files": ["mbpp.jsonl"],
        "how": "MBPP test as rows {prompt: text, test: the assert lines joined by newlines}",
    },
}

BUILTIN_SUITES: dict[str, list[str]] = {
    "knowledge": ["mmlu", "arc_challenge", "arc_easy", "truthfulqa_mc1"],
    "reasoning": ["bbh", "gsm8k"],
    "code": ["humaneval", "mbpp"],
    "paper": ["mmlu", "bbh", "gsm8k", "arc_challenge", "arc_easy", "truthfulqa_mc1", "humaneval", "mbpp"],
}


def default_data_dir() -> Path:
    """Where the paper's benchmark files are looked for: $DTM_EVAL_DATA or ~/.cache/dtm/eval."""
    return Path(os.environ.get("DTM_EVAL_DATA", Path.home() / ".cache" / "dtm" / "eval"))


def builtin_task(name: str, data_dir: Path) -> Task | str:
    """The paper benchmark `name` from `data_dir`, or a line saying which files are missing."""
    entry = PAPER_TASKS[name]
    missing = [f for f in entry["files"] if not (data_dir / f).is_file()]
    if missing:
        return f"{name}: put {', '.join(str(data_dir / f) for f in missing)} ({entry['how']})"
    tree = {"name": name, "data": entry["files"][0], **entry["spec"]}
    spec_path = data_dir / f"{name}.yaml"
    if spec_path.is_file():  # the user's own spec for this benchmark wins
        return load_task(spec_path)
    spec = spec_from_dict(tree, f"built-in task {name}")
    data = data_dir / spec.data
    rows, lines = read_jsonl(data, name)
    _check_rows(spec, rows, lines, data)
    fewshot_rows: list[dict] = []
    fewshot = None
    if spec.fewshot_data:
        fewshot = data_dir / spec.fewshot_data
        fewshot_rows, fs_lines = read_jsonl(fewshot, name)
        _check_rows(spec, fewshot_rows, fs_lines, fewshot)
    return Task(spec, data, rows, lines, fewshot_rows, _spec_hash(spec, data, fewshot))


def resolve_tasks(
    tasks: list[str | os.PathLike],
    suites: dict[str, list[str | os.PathLike]] | None = None,
    data_dir: str | os.PathLike | None = None,
    require_all: bool = False,
) -> list[Task]:
    """Turn task files, suite names and benchmark names into validated tasks.

    `suites` (e.g. the lab's `{"knowledge": [spec paths]}`) take precedence over the built-in
    suites of the same name. Built-in benchmarks whose data is missing are skipped with a
    message listing what to put where (an error if nothing is left, or with `require_all`).
    """
    suites = {k: list(v) for k, v in (suites or {}).items()}
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    out: list[Task] = []
    missing: list[str] = []
    seen: dict[str, Task] = {}

    def add(task: Task) -> None:
        first = seen.get(task.name)
        if first is not None:
            if first.source.resolve() == task.source.resolve() or first.spec_hash == task.spec_hash:
                return  # the same task named twice (e.g. in two suites) runs once
            raise DataError(f"two tasks named {task.name!r}: {first.source} and {task.source}; results are stored by task "
                            "name, so one would silently replace the other: rename one (its file, or `name:` in a spec)")
        seen[task.name] = task
        out.append(task)

    for item in tasks:
        key = str(item)
        if key in suites:
            for path in suites[key]:
                add(load_task(path))
        elif key in BUILTIN_SUITES or key in PAPER_TASKS:
            for name in BUILTIN_SUITES.get(key, [key]):
                got = builtin_task(name, data_dir)
                if isinstance(got, str):
                    missing.append(got)
                else:
                    add(got)
        elif Path(key).exists() or key.endswith((".jsonl", ".yaml", ".yml", ".json")):
            add(load_task(key))
        else:
            known = sorted(set(suites) | set(BUILTIN_SUITES) | set(PAPER_TASKS))
            raise DataError(f"task {key!r}: not a file and not a known suite or benchmark ({', '.join(known)})")
    if missing:
        msg = ("benchmark data missing (nothing is downloaded; put the files there or set DTM_EVAL_DATA; "
               "dtm.evaluation.convert_rows turns hub-format rows into these):\n  " + "\n  ".join(missing))
        if require_all or not out:
            raise DataError(msg)
        import logging

        logging.getLogger(__name__).warning(msg)
    return out
