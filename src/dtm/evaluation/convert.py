"""Turn rows of the public benchmark datasets (as the Hugging Face hub serves them) into our
task rows, so a user with a local copy can drop them into `$DTM_EVAL_DATA`:

    rows = [json.loads(l) for l in open("arc_challenge_test_raw.jsonl")]
    atomic_write_jsonl(data_dir / "arc_challenge.jsonl", convert_rows("arc_challenge", rows))

The conversions are lm-evaluation-harness's own `doc_to_*` / `process_docs` logic (HellaSwag's
preprocessing included), so the numbers match it on the same data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from dtm.errors import DataError


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _one(benchmark: str, doc: dict[str, Any], i: int, subtask: str | None) -> dict[str, Any]:
    rid = str(doc.get("id", doc.get("task_id", f"{benchmark}-{i}")))
    if benchmark in ("arc_challenge", "arc_easy"):
        labels = list(doc["choices"]["label"])
        return {"id": rid, "question": doc["question"], "choices": list(doc["choices"]["text"]), "answer": labels.index(doc["answerKey"])}
    if benchmark == "mmlu":
        return {"id": rid, "question": doc["question"], "choices": list(doc["choices"]), "answer": int(doc["answer"]), "subject": doc["subject"]}
    if benchmark == "hellaswag":
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"id": rid, "question": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in doc["endings"]], "answer": int(doc["label"])}
    if benchmark == "truthfulqa_mc1":
        targets = doc["mc1_targets"]
        return {"id": rid, "question": doc["question"], "choices": list(targets["choices"]), "answer": list(targets["labels"]).index(1)}
    if benchmark == "gsm8k":
        return {"id": rid, "prompt": doc["question"], "answer": doc["answer"]}
    if benchmark == "bbh":
        return {"id": rid, "prompt": doc["input"], "answer": doc["target"], "subtask": subtask or doc.get("subtask", "bbh")}
    if benchmark == "humaneval":
        return {"id": rid, "prompt": doc["prompt"], "test": doc["test"], "entry_point": doc["entry_point"]}
    if benchmark == "mbpp":
        return {"id": rid, "prompt": doc["text"], "test": "\n".join(doc["test_list"])}
    raise DataError(f"no conversion for benchmark {benchmark!r}")


def convert_rows(benchmark: str, docs: Iterable[dict[str, Any]], subtask: str | None = None) -> list[dict[str, Any]]:
    """Hub-format rows of `benchmark` -> our task rows; a row lacking a field is an error naming it."""
    out = []
    for i, doc in enumerate(docs):
        try:
            out.append(_one(benchmark, doc, i, subtask))
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{benchmark} row {i}: cannot convert ({type(e).__name__}: {e}); expected the hub dataset's fields") from None
    return out
