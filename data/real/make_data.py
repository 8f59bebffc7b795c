"""Rebuild the files of data/real/ from git clones of the source repositories (see README.md).

    python data/real/make_data.py HENDRYCKS_TEST_GIT GRADE_SCHOOL_MATH_GIT BIG_BENCH_HARD_GIT LLM_FOUNDRY_GIT HELLASWAG_TEXT_DATA_GIT

Each argument is a repository's git directory (a clone's .git, or a bare clone). The
selection is fixed (subjects, first rows), so the output is the same bytes every time.
"""

import bz2
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

REPOS = dict(zip(("mmlu", "gsm8k", "bbh", "foundry", "klosax"), sys.argv[1:6], strict=True))
out = Path(__file__).resolve().parent


def show(repo, rev_path):
    return subprocess.run(["git", f"--git-dir={REPOS[repo]}", "show", rev_path], capture_output=True, check=True).stdout.decode("utf-8")


SUBJ = [
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "college_biology",
    "computer_security",
    "econometrics",
    "high_school_geography",
    "high_school_physics",
    "human_aging",
    "marketing",
    "nutrition",
    "philosophy",
    "prehistory",
    "world_religions",
]
MM = "mmlu"
C = "785eba57b455b9f9be12a0d3c1106d67274fea0e"


def rows(subj, split, n):
    text = show(MM, f"{C}:data/{split}/{subj}_{split}.csv")
    r = list(csv.reader(io.StringIO(text)))[:n]
    return [
        {"id": f"{subj}-{split}-{i}", "subject": subj, "question": q[0], "choices": q[1:5], "answer": "ABCD".index(q[5].strip())}
        for i, q in enumerate(r)
    ]


test, dev = [], []
for s in SUBJ:
    test += rows(s, "test", 25)
    dev += rows(s, "dev", 5)
open(f"{out}/mmlu.jsonl", "w").write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test))
open(f"{out}/mmlu_dev.jsonl", "w").write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dev))
G = "gsm8k"


def gsm(split, n, start=0):
    lines = show(G, f"3101c7d5072418e28b9008a6636bde82a006892c:grade_school_math/data/{split}.jsonl").splitlines()[start : start + n]
    return [json.loads(line) for line in lines]


gt = [{"id": f"gsm8k-test-{i}", "prompt": r["question"], "answer": r["answer"]} for i, r in enumerate(gsm("test", 60))]
gtr = [{"id": f"gsm8k-train-{i}", "prompt": r["question"], "answer": r["answer"]} for i, r in enumerate(gsm("train", 8))]
open(f"{out}/gsm8k.jsonl", "w").write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gt))
open(f"{out}/gsm8k_train.jsonl", "w").write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gtr))
# instruction data: GSM8K train (after the 8 few-shot rows), MIT
ins = gsm("train", 300, start=100)
json.dump(
    [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in ins[:100]],
    open(f"{out}/instructions_alpaca.json", "w"),
    ensure_ascii=False,
    indent=1,
)
open(f"{out}/instructions_sharegpt.jsonl", "w").write(
    "".join(
        json.dumps(
            {"conversations": [{"from": "human", "value": r["question"]}, {"from": "gpt", "value": r["answer"]}]}, ensure_ascii=False
        )
        + "\n"
        for r in ins[100:200]
    )
)
open(f"{out}/instructions_messages.jsonl", "w").write(
    "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}, ensure_ascii=False
        )
        + "\n"
        for r in ins[200:300]
    )
)
B = "bbh"
bbh, shots = [], []
for t in ["boolean_expressions", "date_understanding", "sports_understanding", "web_of_lies"]:
    ex = json.loads(show(B, f"9ee07bd481feebf959a6b59d61ea57bdcf30964d:bbh/{t}.json"))["examples"][:10]
    bbh += [{"id": f"{t}-{i}", "subtask": t, "prompt": e["input"], "answer": e["target"]} for i, e in enumerate(ex)]
    cot = show(B, f"9ee07bd481feebf959a6b59d61ea57bdcf30964d:cot-prompts/{t}.txt").split("-----\n", 1)[1]
    desc, *qs = cot.split("\n\nQ: ")
    for i, q in enumerate(qs):
        qq, a = re.split(r"\nA: Let.s think step by step\.\s*", q, maxsplit=1)
        shots.append({"id": f"{t}-cot-{i}", "subtask": t, "description": desc.strip() + "\n\n", "prompt": qq, "answer": a.strip()})
for r in bbh:
    r["description"] = next(s["description"] for s in shots if s["subtask"] == r["subtask"])
open(f"{out}/bbh.jsonl", "w").write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bbh))
open(f"{out}/bbh_fewshot.jsonl", "w").write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in shots))
# ARC-Challenge (CC BY-SA 4.0) and HellaSwag (MIT) as mosaicml/llm-foundry ships them (rows {query, choices, gold};
# HellaSwag's query already lm-eval's preprocessed "activity_label: ctx"): the shape dtm's built-ins read.
F = "8c8dd48f72168c5d51e2f7b151595892a8fba43d"
arc = [json.loads(line) for line in show("foundry", f"{F}:scripts/eval/local_data/world_knowledge/arc_challenge.jsonl").splitlines()]
assert all(r["query"].startswith("Question: ") for r in arc)
arc = [{"id": f"arc_challenge-test-{i}", "question": r["query"][len("Question: "):], "choices": r["choices"], "answer": r["gold"]}
       for i, r in enumerate(arc[:65])]
open(f"{out}/arc_challenge.jsonl", "w").write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in arc[:40]))
open(f"{out}/arc_challenge_fewshot.jsonl", "w").write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in arc[40:]))
hs = [json.loads(line) for line in show("foundry", f"{F}:tests/eval/local_data/hellaswag_small.jsonl").splitlines()]
hs = [{"id": f"hellaswag-{i}", "question": r["query"], "choices": r["choices"], "answer": r["gold"]} for i, r in enumerate(hs)]
# + the first 40 HellaSwag validation rows (MIT) as klosax/hellaswag_text_data extracted them from rowanz/hellaswag's
# hellaswag_val.jsonl: 6 lines per row ("activity_label: ctx", the label, the 4 endings), bracket tags cleaned
K = "60a646bd806bce22dcb2eb6d4fadb12f1472aa4c"
blob = subprocess.run(["git", f"--git-dir={REPOS['klosax']}", "show", f"{K}:hellaswag_val_full.txt.bz2"], capture_output=True, check=True).stdout
lines = bz2.decompress(blob).decode("utf-8").split("\n")
for i in range(40):
    ctx, label, *endings = lines[6 * i : 6 * i + 6]
    hs.append({"id": f"hellaswag-val-{i}", "question": ctx, "choices": endings, "answer": int(label)})
open(f"{out}/hellaswag.jsonl", "w").write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in hs))
print(len(test), len(dev), len(gt), len(bbh), len(shots), len(arc), len(hs))
