"""Multiple-choice scoring: `dtm.evaluate` against lm-evaluation-harness, same data, model, batch size.

    .venv/bin/python benchmarks/bench_eval.py                     # 600 questions, batch size 16
    .venv/bin/python benchmarks/bench_eval.py --questions 100     # a quick check of the script

What it does, exactly:
  1. generates an ARC-style multiple-choice task (questions with 3-5 choices of varied length)
     as one JSONL file in our bare format {id, question, choices, answer};
  2. builds a tiny Llama from a config (random weights, seed 0) with a byte-level BPE tokenizer
     trained on the task text (BOS added like Llama's), saved with `save_pretrained`;
  3. makes lm-eval read the *same* JSONL file through a custom task YAML
     (`dataset_path: json`, `dataset_kwargs: {data_files: {test: <file>}}`, prompt
     "Question: {{question}}\\nAnswer:", `doc_to_choice: "{{choices}}"`, `doc_to_target: "{{answer}}"`,
     metrics acc and acc_norm): the prompt our bare-JSONL task uses;
  4. runs lm-eval (`HFLM`, float32, CPU) in its own venv ($DTM_LMEVAL_VENV, default ~/.cache/dtm/venvs/lmeval: torch==2.13.0
     first, then lm-eval; created if missing) and dtm in .venv, each in a child process with
     one thread, alternately, `--repeats` times each; timing = the log-likelihood phase
     (lm-eval: its `HFLM.loglikelihood` call; dtm: `run_task`), and the whole call
     (model load + task load + scoring) as a second, reported figure;
  5. compares acc / acc_norm (how many questions differ) and every choice's log-likelihood;
  6. once more with 3-shot prompts drawn from a separate split (same seeded sampler), agreement only;
  7. greedy generation (generate_until vs our loop) on --gen-prompts prompts: identical outputs?
Numbers go to stdout and benchmarks/results/bench_eval.json, with the machine's cores and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_eval.json"
# A venv of its own for the peer (its pins differ from ours): $DTM_LMEVAL_VENV, else the user's cache dir.
LMEVAL_VENV = Path(os.environ.get("DTM_LMEVAL_VENV", Path.home() / ".cache" / "dtm" / "venvs" / "lmeval"))
LMEVAL_VERSION = "0.4.13"

SUBJECTS = ["planets", "metals", "rivers", "birds", "engines", "cells", "storms", "crystals", "forests", "magnets"]
VERBS = ["heats", "cools", "moves", "bends", "splits", "grows", "stores", "reflects", "absorbs", "changes"]
THINGS = ["water", "light", "sand", "iron", "air", "ice", "salt", "copper", "soil", "wind", "glass", "oil", "sound", "heat"]


def make_task(n: int, path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            q = (f"Which of these {rng.choice(VERBS)} {rng.choice(THINGS)} when {rng.choice(SUBJECTS)} "
                 f"{rng.choice(VERBS)} the {rng.choice(THINGS)}?")
            k = rng.randint(3, 5)
            choices = [" ".join(rng.choice(THINGS + VERBS) for _ in range(rng.randint(1, 4))) for _ in range(k)]
            f.write(json.dumps({"id": f"q{i}", "question": q, "choices": choices, "answer": rng.randrange(k)}) + "\n")


def build_model(task: Path, model_dir: Path) -> int:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line) for line in task.open()]
    corpus = [t["question"] + " " + " ".join(t["choices"]) for t in texts] + ["Question: Answer:"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())


LMEVAL_YAML = """\
task: bench_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

LMEVAL_RUN = """
import json, sys, time
t_start = time.perf_counter()
import torch
torch.set_num_threads(1)
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
model_dir, task_dir, bs, task = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
timing = {}
orig = HFLM.loglikelihood
def timed(self, requests, *a, **k):
    s, c = time.perf_counter(), time.process_time(); r = orig(self, requests, *a, **k)
    timing["loglikelihood_s"] = time.perf_counter() - s; timing["loglikelihood_cpu_s"] = time.process_time() - c
    timing["requests"] = len(requests); return r
HFLM.loglikelihood = timed
t0 = time.perf_counter()
lm = HFLM(pretrained=model_dir, batch_size=bs, device="cpu", dtype="float32")
res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=task_dir), log_samples=True)
t1 = time.perf_counter()
r = res["results"][task]
samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
print(json.dumps({"acc": r["acc,none"], "acc_norm": r["acc_norm,none"],
    "lls": [[float(x[0]) for x in s["filtered_resps"]] for s in samples],
    "acc_items": [s["acc"] for s in samples], "acc_norm_items": [s["acc_norm"] for s in samples],
    "call_s": t1 - t0, "process_s": t1 - t_start, **timing, "version": lm_eval.__version__}))
"""

DTM_RUN = """
import json, sys, time
t_start = time.perf_counter()
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer  # imported before the clock, as lm-eval's HFLM import does
from dtm.evaluation.harness import load_scorer
from dtm.evaluation.runner import run_task
from dtm.evaluation.tasks import load_task
model_dir, data, bs, share = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "packed"
t0 = time.perf_counter()
scorer = load_scorer(model_dir, device="cpu", share_context=share)
task = load_task(data)
s, c = time.perf_counter(), time.process_time()
result, samples = run_task(scorer, task, batch_size=bs, progress=False)
t1, c1 = time.perf_counter(), time.process_time()
print(json.dumps({"acc": result["metrics"]["acc"], "acc_norm": result["metrics"]["acc_norm"],
    "lls": [x["loglikelihoods"] for x in samples], "acc_items": [x["acc"] for x in samples],
    "acc_norm_items": [x["acc_norm"] for x in samples], "scoring": result["scoring"],
    "loglikelihood_s": t1 - s, "loglikelihood_cpu_s": c1 - c, "call_s": t1 - t0, "process_s": t1 - t_start}))
"""


GEN_LMEVAL_YAML = """\
task: bench_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{prompt}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""

GEN_OURS_YAML = """\
name: bench_gen
type: generate
data: {data}
doc_to_text: "Question: {{{{prompt}}}}\\nAnswer:"
stop: ["\\n\\n", "Question:"]
max_new_tokens: 16
"""

LMEVAL_GEN_RUN = """
import json, sys, torch
torch.set_num_threads(1)
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
model_dir, task_dir, bs = sys.argv[1], sys.argv[2], int(sys.argv[3])
lm = HFLM(pretrained=model_dir, batch_size=bs, device="cpu", dtype="float32")
res = lm_eval.simple_evaluate(model=lm, tasks=["bench_gen"], task_manager=TaskManager(include_path=task_dir), log_samples=True)
samples = sorted(res["samples"]["bench_gen"], key=lambda s: s["doc_id"])
print(json.dumps({"outputs": [s["filtered_resps"][0] for s in samples]}))
"""

DTM_GEN_RUN = """
import json, sys, torch
torch.set_num_threads(1)
from dtm.evaluation.harness import load_scorer
from dtm.evaluation.runner import run_task
from dtm.evaluation.tasks import load_task
model_dir, spec, bs = sys.argv[1], sys.argv[2], int(sys.argv[3])
result, samples = run_task(load_scorer(model_dir, device="cpu"), load_task(spec), batch_size=bs, progress=False)
print(json.dumps({"outputs": [x["output"] for x in samples]}))
"""


def ensure_lmeval() -> Path:
    py = LMEVAL_VENV / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import lm_eval"], capture_output=True) if py.exists() else None
    if probe is None or probe.returncode != 0:
        print(f"installing lm-eval=={LMEVAL_VERSION} into {LMEVAL_VENV} (torch==2.13.0 first)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LMEVAL_VENV)], check=True)
        pip = str(LMEVAL_VENV / "bin" / "pip")
        subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([pip, "install", "-q", f"lm-eval=={LMEVAL_VERSION}", "transformers>=4.46", "accelerate>=1.0"], check=True)
    return py


def child(python: str, code: str, args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    proc = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({python}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen-prompts", type=int, default=100)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    lmeval_py = ensure_lmeval()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(tmp)
        data = work / "arc_like.jsonl"
        make_task(args.questions, data)
        params = build_model(data, work / "model")
        (work / "tasks").mkdir()
        (work / "tasks" / "bench_arc.yaml").write_text(LMEVAL_YAML.format(data=data))
        load_before = os.getloadavg()
        # "packed" rows hold a whole question (all its choices): at batch size B a forward scores
        # B questions, about 4B choices. "packed, same choices per forward" uses B / (mean choices)
        # questions per forward, so each forward scores as many choices as lm-eval's does.
        mean_choices = sum(len(json.loads(line)["choices"]) for line in data.open()) / args.questions
        equal_bs = max(1, round(args.batch_size / mean_choices))
        configs = {
            "dtm packed": ("packed", args.batch_size),
            "dtm packed, same choices per forward": ("packed", equal_bs),
            "dtm per-choice": ("per-choice", args.batch_size),
        }
        runs: dict[str, list[dict]] = {"lm-eval": [], **{name: [] for name in configs}}
        for rep in range(args.repeats):  # alternate, so drifts in machine load hit all alike
            runs["lm-eval"].append(child(str(lmeval_py), LMEVAL_RUN, [str(work / "model"), str(work / "tasks"), str(args.batch_size), "bench_arc"]))
            for name, (mode, bs) in configs.items():
                runs[name].append(child(sys.executable, DTM_RUN, [str(work / "model"), str(data), str(bs), mode]))
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
        load_after = os.getloadavg()
        # few-shot agreement (no timing): 3 examples per question drawn by the seeded sampler
        # (seed 1234, lm-eval's default) from a separate split, the same file for both
        shots = work / "fewshot.jsonl"
        make_task(60, shots, seed=1)
        (work / "tasks" / "bench_arc_fewshot.yaml").write_text(
            LMEVAL_YAML.format(data=data).replace("task: bench_arc", "task: bench_arc_fewshot")
            .replace(f"    test: {data}\n", f"    test: {data}\n    train: {shots}\n")
            + "fewshot_split: train\nnum_fewshot: 3\n")
        ours = work / "ours_fewshot.yaml"
        ours.write_text(f"name: bench_arc_fewshot\ndata: {data}\nfewshot_data: {shots}\nnum_fewshot: 3\n"
                        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n")
        fs_ref = child(str(lmeval_py), LMEVAL_RUN, [str(work / "model"), str(work / "tasks"), str(args.batch_size), "bench_arc_fewshot"])
        fs_ours = child(sys.executable, DTM_RUN, [str(work / "model"), str(ours), str(args.batch_size), "packed"])
        # greedy generation agreement (no timing): lm-eval's generate_until vs our KV-cached loop
        rng = random.Random(2)
        gen_data = work / "gen.jsonl"
        gen_data.write_text("".join(json.dumps({"id": f"g{i}", "prompt": f"Which {rng.choice(THINGS)} {rng.choice(VERBS)} the {rng.choice(THINGS)}?",
                                                "answer": rng.choice(THINGS)}) + "\n" for i in range(args.gen_prompts)))
        (work / "gen_tasks").mkdir()
        (work / "gen_tasks" / "bench_gen.yaml").write_text(GEN_LMEVAL_YAML.format(data=gen_data))
        (work / "ours_gen.yaml").write_text(GEN_OURS_YAML.format(data=gen_data))
        gen_ref = child(str(lmeval_py), LMEVAL_GEN_RUN, [str(work / "model"), str(work / "gen_tasks"), str(args.batch_size)])
        gen_ours = child(sys.executable, DTM_GEN_RUN, [str(work / "model"), str(work / "ours_gen.yaml"), str(args.batch_size)])
    ref = runs["lm-eval"][0]
    n = args.questions
    report: dict = {
        "what": "multiple-choice log-likelihood scoring, dtm vs lm-evaluation-harness, same JSONL file, model and batch size",
        "questions": n, "choices": sum(len(x) for x in ref["lls"]), "batch_size": args.batch_size,
        "model": f"LlamaForCausalLM from a config, {params} parameters, random init (seed 0), float32, CPU, 1 thread",
        "lm_eval_version": ref["version"], "repeats": args.repeats,
        "how_lm_eval_reads_the_file": "custom task YAML via TaskManager(include_path=...): dataset_path: json, "
                                      "dataset_kwargs.data_files.test = the same JSONL; doc_to_text 'Question: {{question}}\\nAnswer:', "
                                      "doc_to_choice '{{choices}}', doc_to_target '{{answer}}'; HFLM(pretrained=dir, batch_size=B, dtype=float32, device=cpu)",
        "timing": "scoring = lm-eval's HFLM.loglikelihood call vs dtm's run_task (tokenising + scoring + metrics); "
                  "call = model + tokenizer load + task load + scoring (lm-eval's includes building its task index); best of repeats; "
                  "wall seconds and this process's CPU seconds (one thread each; the CPU figure is the less load-sensitive one on a shared machine)",
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "systems": {},
    }
    for name, rs in runs.items():
        best_ll = min(r["loglikelihood_s"] for r in rs)
        best_cpu = min(r["loglikelihood_cpu_s"] for r in rs)
        best_call = min(r["call_s"] for r in rs)
        r0 = rs[0]
        diff_acc = sum(a != b for a, b in zip(r0["acc_items"], ref["acc_items"], strict=True))
        diff_norm = sum(a != b for a, b in zip(r0["acc_norm_items"], ref["acc_norm_items"], strict=True))
        max_ll = max(abs(a - b) for x, y in zip(r0["lls"], ref["lls"], strict=True) for a, b in zip(x, y, strict=True))
        report["systems"][name] = {
            "acc": r0["acc"], "acc_norm": r0["acc_norm"],
            "questions_differing_from_lm_eval": {"acc": diff_acc, "acc_norm": diff_norm},
            "max_abs_loglikelihood_diff_vs_lm_eval": max_ll,
            "scoring_s_best": round(best_ll, 4), "scoring_items_per_s": round(n / best_ll, 1),
            "scoring_cpu_s_best": round(best_cpu, 4), "scoring_items_per_cpu_s": round(n / best_cpu, 1),
            "call_s_best": round(best_call, 4), "call_items_per_s": round(n / best_call, 1),
            "scoring_s_all": [round(r["loglikelihood_s"], 4) for r in rs], "call_s_all": [round(r["call_s"], 4) for r in rs],
        }
    report["fewshot_agreement"] = {
        "setup": "3-shot, random sampler seeded 1234 over a separate 60-row split (lm-eval: fewshot_split: train in the same YAML)",
        "lm_eval": {"acc": fs_ref["acc"], "acc_norm": fs_ref["acc_norm"]},
        "dtm": {"acc": fs_ours["acc"], "acc_norm": fs_ours["acc_norm"]},
        "questions_differing": {"acc": sum(a != b for a, b in zip(fs_ours["acc_items"], fs_ref["acc_items"], strict=True)),
                                "acc_norm": sum(a != b for a, b in zip(fs_ours["acc_norm_items"], fs_ref["acc_norm_items"], strict=True))},
        "max_abs_loglikelihood_diff": max(abs(a - b) for x, y in zip(fs_ours["lls"], fs_ref["lls"], strict=True) for a, b in zip(x, y, strict=True)),
    }
    report["generation_agreement"] = {
        "setup": f"{args.gen_prompts} prompts 'Question: ...\\nAnswer:', greedy, max 16 new tokens, stop at '\\n\\n' / 'Question:' / EOS; "
                 "lm-eval generate_until (HF generate) vs dtm's KV-cached batched loop, same batch size",
        "outputs_identical": sum(a == b for a, b in zip(gen_ours["outputs"], gen_ref["outputs"], strict=True)),
        "outputs_total": len(gen_ref["outputs"]),
        "first_difference": next(({"dtm": a, "lm_eval": b} for a, b in zip(gen_ours["outputs"], gen_ref["outputs"], strict=True) if a != b), None),
    }
    lm = report["systems"]["lm-eval"]
    for name, (mode, bs) in configs.items():
        s = report["systems"][name]
        s["rows_per_forward"] = bs
        s["row"] = "one question (context + all its choices)" if mode == "packed" else "one (context, choice) pair, as lm-eval"
        s["speedup_scoring_vs_lm_eval"] = round(lm["scoring_s_best"] / s["scoring_s_best"], 2)
        s["speedup_scoring_cpu_vs_lm_eval"] = round(lm["scoring_cpu_s_best"] / s["scoring_cpu_s_best"], 2)
        s["speedup_call_vs_lm_eval"] = round(lm["call_s_best"] / s["call_s_best"], 2)
    print(json.dumps({k: v for k, v in report.items()}, indent=2))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
