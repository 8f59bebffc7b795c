"""Per-evaluation cost at the lab's scale: one thread, a 0.24M-parameter Llama, a suite of
~2k multiple-choice items + ~300 generations, through the public `dtm.evaluate_many`.

    .venv/bin/python benchmarks/bench_eval_suite.py
    .venv/bin/python benchmarks/bench_eval_suite.py --mc 200 --gen 30 --models 2 --no-save   # quick check

The suite (generated here): two alpaca-format MC tasks (1000 questions each, 4 choices) and
one generation task (300 prompts, max_new_tokens 32, no stop string, so a prompt ends at EOS or
after 32 tokens; the mean number of generated tokens is reported: random weights rarely pick
EOS, the lab's instruction-tuned models end their short answers with it).
It times `evaluate_many` over `--models` saved checkpoints in one warm process (tasks loaded
once, as the pipeline does), per model and per task, with batch size 16.
Numbers go to stdout and benchmarks/results/bench_eval_suite.json with the machine facts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_eval_suite.json"
WORDS = ("river stone cloud metal seed flame glass tower forest wheel salt copper lamp moon field bridge "
         "north south heavy light quick slow red blue one two three four five six").split()


def phrase(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def build(work: Path, n_mc: int, n_gen: int, n_models: int) -> tuple[list[Path], dict[str, Path], int]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from dtm.data.template import ALPACA_PROMPT

    rng = random.Random(0)
    tasks = {}
    for name in ("knowledge_a", "knowledge_b"):
        rows = [{"id": f"{name}-{i}", "question": f"Which {phrase(rng, 2, 4)} is {phrase(rng, 1, 3)}?",
                 "choices": [phrase(rng, 1, 3) for _ in range(4)], "answer": rng.randrange(4)} for i in range(n_mc // 2)]
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (work / f"{name}.yaml").write_text(f"name: {name}\ntype: multiple_choice\ndata: {name}.jsonl\nprompt_format: alpaca\n")
        tasks[name] = work / f"{name}.yaml"
    rows = [{"id": f"g{i}", "prompt": f"List {phrase(rng, 2, 5)}.", "answer": phrase(rng, 1, 3), "pattern": "[a-z ,]+"} for i in range(n_gen)]
    (work / "instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # no stop strings: a random model would often emit "\n" at once; this way each prompt runs
    # until EOS or 32 tokens (the report states the mean number of tokens generated)
    (work / "instruct.yaml").write_text("name: instruct\ntype: generate\ndata: instruct.jsonl\nprompt_format: alpaca\nmax_new_tokens: 32\n")
    tasks["instruct"] = work / "instruct.yaml"

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([ALPACA_PROMPT, " ".join(WORDS)] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    dirs = []
    for k in range(n_models):
        torch.manual_seed(k)
        cfg = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(work / f"ckpt-{k}")
        fast.save_pretrained(work / f"ckpt-{k}")
        dirs.append(work / f"ckpt-{k}")
    return dirs, tasks, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mc", type=int, default=2000)
    ap.add_argument("--gen", type=int, default=300)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t_import = time.perf_counter()
    import transformers  # noqa: F401  (imported once per process; timed apart)

    from dtm.evaluation import evaluate_many, resolve_tasks

    import_s = time.perf_counter() - t_import
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-eval-suite-") as tmp:
        work = Path(tmp)
        dirs, task_files, params = build(work, args.mc, args.gen, args.models)
        t0 = time.perf_counter()
        tasks = resolve_tasks(list(task_files.values()))
        load_tasks_s = time.perf_counter() - t0
        per_model = []
        gen_tokens: list[float] = []
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(dirs[0])
        for d in dirs:
            t0, c0 = time.perf_counter(), time.process_time()
            res = evaluate_many({d.name: d}, tasks, work / "eval", batch_size=args.batch_size, progress=False, log_samples=True)[d.name]
            outputs = [json.loads(line)["output"] for line in (work / "eval" / f"{d.name}.instruct.samples.jsonl").open()]
            gen_tokens.append(sum(len(ids) for ids in tokenizer(outputs, add_special_tokens=False)["input_ids"]) / len(outputs))
            per_model.append({"model": d.name, "seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3),
                              "tasks": {n: {"seconds": r["seconds"], "items": r["counts"]["items"]} for n, r in res.items()}})
            print(f"{d.name}: {per_model[-1]['seconds']:.2f}s (cpu {per_model[-1]['cpu_seconds']:.2f}s)  " + "  ".join(f"{n} {v['seconds']:.2f}s" for n, v in per_model[-1]["tasks"].items()), flush=True)
    warm = per_model[1:] or per_model
    report = {
        "what": "seconds per evaluation of a lab-scale suite via evaluate_many, one thread, batch size 16",
        "suite": {"mc_items": args.mc, "mc_choices": 4, "generations": args.gen, "max_new_tokens": 32, "prompt_format": "alpaca"},
        "model": f"LlamaForCausalLM, {params} parameters, random init",
        "import_transformers_and_dtm_s": round(import_s, 3),
        "load_and_validate_tasks_once_s": round(load_tasks_s, 3),
        "generated_tokens_per_prompt_mean": round(sum(gen_tokens) / len(gen_tokens), 2),
        "first_model_s": per_model[0]["seconds"],
        "warm_model_s_mean": round(sum(m["seconds"] for m in warm) / len(warm), 3),
        "warm_model_cpu_s_mean": round(sum(m["cpu_seconds"] for m in warm) / len(warm), 3),
        "note": "wall seconds depend on the machine's load (see loadavg; 2 cores shared); cpu_seconds = this process's CPU time, one thread",
        "per_model": per_model,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    print(json.dumps({k: v for k, v in report.items() if k != "per_model"}, indent=2))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
