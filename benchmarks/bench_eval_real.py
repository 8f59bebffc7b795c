"""Evaluation speed on a real model: `dtm` against `lm_eval --model hf`, same questions, same batch size.

    .venv/bin/python benchmarks/bench_eval_real.py                 # the full run (idle machine: see --help)
    .venv/bin/python benchmarks/bench_eval_real.py --peer-repeats 1 # the same with lm-eval once per task (~75 min; --jobs 2: ~40)
    .venv/bin/python benchmarks/bench_eval_real.py --mmlu5 70 --mmlu0 70 --arc 10 --gsm8k 10 --gen-tokens 64 --repeats 1
    .venv/bin/python benchmarks/bench_eval_real.py --mmlu5 308 --mmlu0 140 --jobs 8   # the issue's sizes in ~20 min, 8+ idle cores

The model is SmolLM2-135M-Instruct converted by `benchmarks/real_model.py` (float32, CPU, one
thread); the questions are the public samples in data/real/ (MIT, see its README). Four tasks,
each written once as a dtm task spec and once as an lm-eval task YAML over the same JSONL rows:

  mmlu_5shot   MMLU format (lm-eval's `mmlu` template: description, "A. ..", "Answer:", letter
               targets), 5 examples from the same subject's dev split (first_n); lm-eval gets one
               task per subject (as its own mmlu group does); --mmlu5 questions, spread evenly
               over the 14 subjects;
  mmlu_0shot   the same questions without examples;
  arc_25shot   ARC-Challenge (lm-eval's `arc_challenge` template: "Question: ..\\nAnswer:", full-text
               choices, acc and acc_norm) with 25 examples (first_n, so every question shares
               them): the --arc first questions of data/real/arc_challenge.jsonl (40 there), the
               examples from arc_challenge_fewshot.jsonl;
  gsm8k_8shot  GSM8K format (lm-eval's `gsm8k` template "Question: ..\\nAnswer:"), 8 worked
               examples (first_n) from the train split, greedy generation up to --gen-tokens,
               stops "Question:", "</s>", "<|im_end|>".

Each (task, tool) runs in a child process (one thread), the two tools alternating, --repeats
times; --jobs N runs N children at once (each one thread: give it N idle cores, and the load
average after each run shows whether they had them; one repeat of the issue's sizes is about
45 CPU-minutes, most of it lm-eval's 8-shot GSM8K and 25-shot ARC); a time is the scoring call only (lm-eval: its HFLM.loglikelihood / generate_until
calls; dtm: run_task), wall and CPU seconds, best of the repeats; items/s = questions / best
wall seconds. Agreement: questions whose acc (acc_norm) differ, the largest |log-likelihood
difference|, generations that differ (must be 0). The load average is recorded before and after.
Results: stdout and benchmarks/results/bench_eval_real.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "real"
RESULTS = ROOT / "benchmarks" / "results" / "bench_eval_real.json"

MMLU_TEXT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"
ARC_TEXT = "Question: {{question}}\nAnswer:"
GSM8K_TEXT = "Question: {{prompt}}\nAnswer:"
GSM8K_STOP = ["Question:", "</s>", "<|im_end|>"]

LMEVAL_CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
model_dir, task_dir, bs, tasks = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
clock = {"wall": 0.0, "cpu": 0.0}
def timed(orig):
    def run(self, requests, *a, **k):
        s, c = time.perf_counter(), time.process_time()
        try:
            return orig(self, requests, *a, **k)
        finally:
            clock["wall"] += time.perf_counter() - s; clock["cpu"] += time.process_time() - c
    return run
HFLM.loglikelihood = timed(HFLM.loglikelihood)
HFLM.generate_until = timed(HFLM.generate_until)
lm = HFLM(pretrained=model_dir, batch_size=bs, device="cpu", dtype="float32")
res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=task_dir), log_samples=True)
items = []
for t in tasks:  # in the order given: the rows of the dtm file, subject by subject
    for s in sorted(res["samples"][t], key=lambda s: s["doc_id"]):
        if "acc" in s:
            items.append({"lls": [float(x[0]) for x in s["filtered_resps"]], "acc": s["acc"], "acc_norm": s.get("acc_norm")})
        else:
            items.append({"output": s["filtered_resps"][0]})
print(json.dumps({"items": items, "wall_s": clock["wall"], "cpu_s": clock["cpu"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "version": lm_eval.__version__}))
"""

DTM_CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM  # noqa: F401 - imported before the clock, as lm-eval's import does
from dtm.evaluation.harness import load_scorer
from dtm.evaluation.runner import run_task
from dtm.evaluation.tasks import load_task
model_dir, spec, bs = sys.argv[1], sys.argv[2], int(sys.argv[3])
scorer = load_scorer(model_dir, device="cpu")
task = load_task(spec)
s, c = time.perf_counter(), time.process_time()
result, samples = run_task(scorer, task, batch_size=bs, progress=False)
wall, cpu = time.perf_counter() - s, time.process_time() - c
items = [{"lls": x["loglikelihoods"], "acc": x["acc"], "acc_norm": x["acc_norm"]} if "loglikelihoods" in x else {"output": x["output"]}
         for x in samples]
print(json.dumps({"items": items, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def spread(rows: list[dict], n: int, key: str) -> list[dict]:
    """The first rows of each `key` value, round robin, n in all (kept in file order)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    picked: list[dict] = []
    depth = 0
    while len(picked) < n and depth < max(len(g) for g in groups.values()):
        picked += [g[depth] for g in groups.values() if depth < len(g)][: n - len(picked)]
        depth += 1
    chosen = {id(r) for r in picked}
    return [r for r in rows if id(r) in chosen]


def lmeval_yaml(name: str, test: Path, *, kind: str, text: str, choices: str | None = None, description: str = "",
                train: Path | None = None, shots: int = 0, gen_tokens: int = 0) -> str:
    """One lm-eval task over local JSONL files (its `json` dataset builder reads them)."""
    files = {"test": str(test)} | ({"train": str(train)} if train else {})
    tree: dict = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test",
                  "output_type": kind, "doc_to_text": text}
    if description:
        tree["description"] = description
    if train:
        tree |= {"fewshot_split": "train", "num_fewshot": shots, "fewshot_config": {"sampler": "first_n"}}
    if kind == "multiple_choice":
        tree |= {"doc_to_choice": choices, "doc_to_target": "answer",
                 "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    else:
        tree |= {"doc_to_target": "{{answer}}", "metric_list": [{"metric": "exact_match"}],
                 "generation_kwargs": {"until": GSM8K_STOP, "max_gen_toks": gen_tokens, "do_sample": False}}
    return json.dumps(tree)  # JSON is YAML


def dtm_spec(name: str, test: Path, *, kind: str, text: str, letters: bool = False, description: str = "",
             train: Path | None = None, shots: int = 0, same_group: bool = False, gen_tokens: int = 0) -> str:
    tree: dict = {"name": name, "type": kind, "data": str(test), "doc_to_text": text}
    if letters:
        tree |= {"doc_to_choice": "letters", "group_by": "subject"}
    if description:
        tree["description"] = description
    if train:
        tree |= {"fewshot_data": str(train), "num_fewshot": shots, "fewshot_sampler": "first_n", "fewshot_same_group": same_group}
    if kind == "generate":
        tree |= {"stop": GSM8K_STOP, "max_new_tokens": gen_tokens, "extractor": "numeric"}
    return json.dumps(tree)


def build_tasks(work: Path, args: argparse.Namespace) -> dict[str, dict]:
    """-> {task: {"dtm": spec path, "lmeval": [lm-eval task names], "n": questions, "kind": mc|gen}}."""
    (work / "lmeval").mkdir()
    mmlu, dev = read_jsonl(DATA / "mmlu.jsonl"), read_jsonl(DATA / "mmlu_dev.jsonl")
    tasks: dict[str, dict] = {}

    def add(name: str, kind: str, n: int, spec: str, lm: dict[str, str]) -> None:
        (work / f"{name}.yaml").write_text(spec)
        for lm_name, text in lm.items():
            (work / "lmeval" / f"{lm_name}.yaml").write_text(text)
        tasks[name] = {"dtm": work / f"{name}.yaml", "lmeval": list(lm), "n": n, "kind": kind}

    for name, n, shots in (("mmlu_5shot", args.mmlu5, 5), ("mmlu_0shot", args.mmlu0, 0)):
        if not n:
            continue
        rows = spread(mmlu, n, "subject")
        test = write_jsonl(work / f"{name}.jsonl", rows)
        subjects = list(dict.fromkeys(r["subject"] for r in rows))
        lm = {}
        for s in subjects:  # lm-eval draws few-shot examples from a task's own split: one task per subject
            sub_test = write_jsonl(work / f"{name}_{s}.jsonl", [r for r in rows if r["subject"] == s])
            sub_dev = write_jsonl(work / f"dev_{s}.jsonl", [r for r in dev if r["subject"] == s]) if shots else None
            lm[f"{name}_{s}"] = lmeval_yaml(f"{name}_{s}", sub_test, kind="multiple_choice", text=MMLU_TEXT,
                                            choices='["A", "B", "C", "D"]', description=MMLU_DESCRIPTION, train=sub_dev, shots=shots)
        add(name, "mc", len(rows), dtm_spec(name, test, kind="multiple_choice", text=MMLU_TEXT, letters=True, description=MMLU_DESCRIPTION,
                                            train=DATA / "mmlu_dev.jsonl" if shots else None, shots=shots, same_group=True), lm)
    if args.arc:
        rows = read_jsonl(DATA / "arc_challenge.jsonl")[: args.arc]
        test, shots = write_jsonl(work / "arc.jsonl", rows), DATA / "arc_challenge_fewshot.jsonl"
        add("arc_25shot", "mc", len(rows),
            dtm_spec("arc_25shot", test, kind="multiple_choice", text=ARC_TEXT, train=shots, shots=25),
            {"arc_25shot": lmeval_yaml("arc_25shot", test, kind="multiple_choice", text=ARC_TEXT, choices="{{choices}}",
                                       train=shots, shots=25)})
    if args.gsm8k:
        test = write_jsonl(work / "gsm8k.jsonl", read_jsonl(DATA / "gsm8k.jsonl")[: args.gsm8k])
        add("gsm8k_8shot", "gen", args.gsm8k,
            dtm_spec("gsm8k_8shot", test, kind="generate", text=GSM8K_TEXT, train=DATA / "gsm8k_train.jsonl", shots=8, gen_tokens=args.gen_tokens),
            {"gsm8k_8shot": lmeval_yaml("gsm8k_8shot", test, kind="generate_until", text=GSM8K_TEXT, train=DATA / "gsm8k_train.jsonl",
                                        shots=8, gen_tokens=args.gen_tokens)})
    return tasks


def child(code: str, args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(kind: str, ours: list[dict], ref: list[dict]) -> dict:
    if len(ours) != len(ref):
        raise SystemExit(f"dtm scored {len(ours)} items, lm-eval {len(ref)}")
    if kind == "gen":
        diff = [i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a["output"] != b["output"]]
        return {"generations_differing": len(diff), "first_difference": ({"dtm": ours[diff[0]]["output"], "lm_eval": ref[diff[0]]["output"]}
                                                                         if diff else None)}
    return {"questions_differing_acc": sum(a["acc"] != b["acc"] for a, b in zip(ours, ref, strict=True)),
            "questions_differing_acc_norm": sum(a["acc_norm"] != b["acc_norm"] for a, b in zip(ours, ref, strict=True)),
            "max_abs_loglikelihood_diff": max(abs(x - y) for a, b in zip(ours, ref, strict=True) for x, y in zip(a["lls"], b["lls"], strict=True))}


def run_all(tasks: dict[str, dict], args: argparse.Namespace, work: Path) -> dict[str, dict[str, list[dict]]]:
    """{task: {tool: [each repeat's child output]}}: every (task, repeat, tool) child, task by task, the
    tools alternating (load drifts hit both alike), --jobs of them at once (in that order)."""
    order = [(name, tool) for name in tasks for rep in range(args.repeats)
             for tool in (("lm_eval", "dtm") if rep % 2 == 0 else ("dtm", "lm_eval"))
             if tool == "dtm" or rep < args.peer_repeats]

    def one(name: str, tool: str) -> dict:
        t = tasks[name]
        if tool == "lm_eval":
            out = child(LMEVAL_CHILD, [str(args.model), str(work / "lmeval"), str(args.batch_size), ",".join(t["lmeval"])])
        else:
            out = child(DTM_CHILD, [str(args.model), str(t["dtm"]), str(args.batch_size)])
        out["loadavg"] = os.getloadavg()[0]
        print(f"{name} {tool}: {out['wall_s']:.1f}s wall, {out['cpu_s']:.1f}s cpu, load {out['loadavg']:.1f}", flush=True)
        return out

    runs: dict[str, dict[str, list[dict]]] = {name: {"lm_eval": [], "dtm": []} for name in tasks}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the child processes
        for (name, tool), out in zip(order, pool.map(lambda job: one(*job), order), strict=True):
            runs[name][tool].append(out)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmlu5", type=int, default=350, help="5-shot MMLU questions (0 = skip)")
    ap.add_argument("--mmlu0", type=int, default=350, help="0-shot MMLU questions (0 = skip)")
    ap.add_argument("--arc", type=int, default=40, help="25-shot ARC-Challenge questions, at most 40 (0 = skip; lm-eval scores ~1,500 tokens per choice)")
    ap.add_argument("--gsm8k", type=int, default=40, help="8-shot GSM8K-format generations (0 = skip)")
    ap.add_argument("--gen-tokens", type=int, default=256, help="max new tokens (lm-eval's gsm8k: 256)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-repeats", type=int, default=None,
                    help="lm-eval's runs per task, at most --repeats (default: --repeats). One lm-eval run of the full "
                         "5-shot MMLU takes ~20 min; its best of fewer runs can only be slower, so the ratio is then "
                         "an upper bound within the run-to-run noise (a few percent when idle); the JSON records it")
    ap.add_argument("--jobs", type=int, default=1, help="children run at once, one thread each (needs that many idle cores)")
    ap.add_argument("--model", type=Path, default=None, help="default: the converted SmolLM2-135M (benchmarks/real_model.py)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    args.peer_repeats = args.repeats if args.peer_repeats is None else max(1, min(args.peer_repeats, args.repeats))
    if args.model is None:
        spec = importlib.util.spec_from_file_location("dtm_real_model", ROOT / "benchmarks" / "real_model.py")
        real_model = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(real_model)
        args.model = real_model.default_dir()
        if not real_model.is_ready(args.model):
            raise SystemExit(f"{args.model}: no converted model; run `python benchmarks/real_model.py` first")
    load_before = os.getloadavg()
    started = time.time()
    report: dict = {"what": "evaluation speed and agreement, dtm vs lm_eval --model hf, same rows, model and batch size",
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "model": str(args.model.name),
                    "batch_size": args.batch_size, "repeats": args.repeats, "lm_eval_repeats": args.peer_repeats,
                    "jobs": args.jobs, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="bench-eval-real-") as tmp:
        work = Path(tmp)
        tasks = build_tasks(work, args)
        runs = run_all(tasks, args, work)
        for name, t in tasks.items():
            entry: dict = {"questions": t["n"], "kind": t["kind"]}
            for tool, rs in runs[name].items():
                best = min(r["wall_s"] for r in rs)
                entry[tool] = {"items_per_s": round(t["n"] / best, 3), "wall_s_best": round(best, 2),
                               "cpu_s_best": round(min(r["cpu_s"] for r in rs), 2), "wall_s_all": [round(r["wall_s"], 2) for r in rs],
                               "loadavg_1min_after_each": [round(r["loadavg"], 2) for r in rs],
                               "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs))}
            entry["speedup_wall"] = round(entry["lm_eval"]["wall_s_best"] / entry["dtm"]["wall_s_best"], 2)
            entry["speedup_cpu"] = round(entry["lm_eval"]["cpu_s_best"] / entry["dtm"]["cpu_s_best"], 2)
            entry["agreement"] = agreement(t["kind"], runs[name]["dtm"][0]["items"], runs[name]["lm_eval"][0]["items"])
            report["tasks"][name] = entry
            report["lm_eval_version"] = runs[name]["lm_eval"][0].get("version")
    report["machine"] = {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                         "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "minutes": round((time.time() - started) / 60, 1)}
    print(json.dumps(report, indent=2))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
