"""The joint executor (`train.executor: joint`) against today's executors.

lab: the lab's K=4 full-FT sub-models (the demo's recipe, `lab.SFT_RECIPE`: 12 epochs of a
quarter of the 2,600 training examples, 492 steps each) trained by
  pool     `executor: local`, 2 one-thread processes (what the demo did before),
  joint-2  `executor: joint`, 2 one-thread processes, a joint group of 2 in each,
  joint-1  `executor: joint`, one process, one thread, a joint group of 4.
Wall time of `train_jobs` (loading, saving, snapshots included) and optimizer steps per
second; the load average is recorded with each timing, the modes alternate, best of
`--repeats` (load only ever slows a run down). The pool is warmed up first (the demo starts
its pool once per run).

lora: K=4 LoRA adapters (r=16 on gate/up/down, the paper's setting) on SmolLM2-135M
(`~/.cache/dtm/smollm2-135m`, made by benchmarks/real_model.py; else a Llama config of that
shape with random weights), `--steps` steps of batch 2 each, trained
  joint    one process (2 threads): one base, 4 adapters stepped together,
  turn     one process (2 threads): `train_model` 4 times in turn,
  procs    4 one-thread processes side by side (peak RSS: the sum of the 4 peaks),
each in fresh processes: wall, tokens/s two ways (real tokens trained / wall, process start
and model loading included; / the training loops only, what a long run converges to: the rate
the issue's target is about), peak RSS, and the arithmetic (`lora_arithmetic`: the rows each
mode's matmuls run over, padding included, FLOPs per token, achieved GFLOP/s in the loops).
`--src old=PATH --src new=PATH` alternates code versions (the children import dtm from PATH).

GPU check (`--device cuda --quick`, under 2 minutes on one GPU): the same K=4 lab sub-models
for 2 epochs, and K=4 LoRA adapters (r=16 on gate/up/down) on a small Llama (random weights,
about 30M parameters; `lora_pair`), each in turn with the Trainer and as one joint job, all
in fp32 on the GPU (the joint step has no mixed precision): the largest weight difference
(must stay under 1e-4), both wall times and (LoRA) tokens/s. `gpu_check()` is the function a
GPU script calls; `--device cpu --quick` runs the same pairs at tiny sizes (a dry run).

    .venv/bin/python benchmarks/bench_joint.py lab [--epochs 12] [--repeats 3]
    .venv/bin/python benchmarks/bench_joint.py lora [--steps 8] [--repeats 2] [--src old=/tmp/old/src --src new=src] [--results FILE]
    .venv/bin/python benchmarks/bench_joint.py --device cuda --quick [--out DIR]
    .venv/bin/python benchmarks/bench_joint.py --device cpu --quick [--out DIR]   (the dry run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_train_common import RESULTS, bench_config, machine, save_base, synthetic_data
from safetensors.torch import load_file

from dtm import lab
from dtm.config import ExperimentConfig
from dtm.data.formats import load_conversations
from dtm.data.template import IGNORE_INDEX
from dtm.dispersal import disperse, portion_path
from dtm.io import atomic_write_json
from dtm.rundir import training_summary
from dtm.training.executors import train_jobs, worker_pool

K = 4


def lab_setup(work: Path, epochs: float) -> tuple[ExperimentConfig, Path, list[Path]]:
    """The demo's data (seed 1, 2,600 training examples) in K random portions, and its recipe."""
    path = lab.write_sft_data(work / "sft.jsonl", seed=1)
    convs = load_conversations(path, format="auto", source_field="source").conversations[:2600]
    disperse(convs, k=K, out=work / "portions", seed=0, progress=False)
    cfg = ExperimentConfig(seed=1)
    base = lab.base_model_dir()
    cfg.model.model_name_or_path = str(base)
    for key, value in lab.DATA_RECIPE.items():
        setattr(cfg.data, key, value)
    for key, value in (lab.SFT_RECIPE | {"num_train_epochs": epochs, "logging_steps": 50, "save_steps": 10_000}).items():
        setattr(cfg.train, key, value)
    return cfg, base, [portion_path(work / "portions", i) for i in range(K)]


def timed(cfg: ExperimentConfig, base: Path, portions: list[Path], out: Path, executor: str, workers: int) -> dict:
    cfg = cfg.model_copy(deep=True)
    cfg.train.executor, cfg.train.num_workers = executor, workers
    load = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    train_jobs(cfg, base, {f"sub-{i + 1}": {"data": str(p), "seed": cfg.seed} for i, p in enumerate(portions)}, out)
    wall = time.perf_counter() - started
    steps = sum(training_summary(out / f"sub-{i + 1}")["steps"] for i in range(len(portions)))
    shutil.rmtree(out)
    return {"wall_s": round(wall, 2), "steps": steps, "steps_per_s": round(steps / wall, 1), "load_avg_before": load}


def bench_lab(epochs: float, repeats: int) -> dict:
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-joint-"))
    cfg, base, portions = lab_setup(work, epochs)
    pool = worker_pool(2)
    for f in [pool.submit(exec, "import dtm.training.joint") for _ in range(4)]:
        f.result()  # workers started and torch imported, as in a running demo
    modes = {"pool": ("local", 2), "joint-2": ("joint", 2), "joint-1": ("joint", 1)}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode, (executor, workers) in modes.items():
            runs[mode].append(timed(cfg, base, portions, work / f"{mode}-{r}", executor, workers))
            print(f"repeat {r} {mode}: {runs[mode][-1]}", flush=True)
    best = {m: min(v, key=lambda x: x["wall_s"]) for m, v in runs.items()}
    shutil.rmtree(work, ignore_errors=True)
    return {"epochs": epochs, "k": K, "runs": runs, "best": best,
            "speedup_joint2_vs_pool": round(best["pool"]["wall_s"] / best["joint-2"]["wall_s"], 2),
            "speedup_joint1_vs_pool": round(best["pool"]["wall_s"] / best["joint-1"]["wall_s"], 2)}


SMOLLM = Path.home() / ".cache" / "dtm" / "smollm2-135m"


def lora_config(base: Path, steps: int) -> ExperimentConfig:
    cfg = bench_config(max_steps=steps, per_device_train_batch_size=2, logging_steps=1, finetuning_type="lora", packing=False)
    cfg.data.cutoff_len = 128
    cfg.model.model_name_or_path = str(base)
    return cfg


def lora_child(mode: str, base: Path, work: Path, steps: int, index: int) -> None:
    """One measured run in this fresh process; prints its peak RSS (MiB), the real tokens trained,
    the training loops' seconds (`training_complete.json`: the Trainer's `train()` wall; the joint
    job's step time) and when its last training call returned (`time.time()`)."""
    from dtm.training.joint import JointJob, train_joint
    from dtm.training.sft import train_model

    torch.set_num_threads(1 if mode == "one" else 2)
    cfg = lora_config(base, steps)
    portions = [portion_path(work / "portions", i) for i in range(K)]
    out = work / f"{mode}-{os.getpid()}"
    if mode == "joint":
        dirs = train_joint(base, [JointJob(f"sub-{i + 1}", p, out / f"sub-{i + 1}", cfg.seed, cfg) for i, p in enumerate(portions)],
                           progress=False)
    elif mode == "turn":
        dirs = [train_model(base, p, out / f"sub-{i + 1}", cfg, progress=False) for i, p in enumerate(portions)]
    else:
        dirs = [train_model(base, portions[index], out / f"sub-{index + 1}", cfg, progress=False)]
    ended = time.time()
    summaries = [training_summary(d) for d in dirs]
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "tokens": sum(s["trained_tokens"] for s in summaries), "loop_s": sum(s["seconds"] for s in summaries),
                      "ended": ended}))


def lora_run(mode: str, base: Path, work: Path, steps: int, src: str | None = None) -> dict:
    """Wall, tokens/s and peak RSS of one mode, in fresh child processes (`src`: the source tree
    they import dtm from; None: this process's).

    Two rates: `tokens_per_s` over the wall time (process start, imports, model loading and
    saving included: with few steps that weighs a lot, and more for the modes that load the
    model 4 times) and `loop_tokens_per_s` over the training loops only (what a long run
    converges to). For `procs` the loops run side by side: the window from the first loop's
    start (its end minus its seconds) to the last one's end."""
    env = os.environ | ({"PYTHONPATH": str(Path(src).resolve())} if src else {})
    cmd = [sys.executable, __file__, "--child", "{mode}", "--base", str(base), "--work", str(work), "--steps", str(steps)]
    load = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    if mode == "procs":
        procs = [subprocess.Popen([c.format(mode="one") for c in cmd] + ["--index", str(i)], stdout=subprocess.PIPE, text=True, env=env)
                 for i in range(K)]
        rows = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        loop = max(r["ended"] for r in rows) - min(r["ended"] - r["loop_s"] for r in rows)
    else:
        res = subprocess.run([c.format(mode=mode) for c in cmd], capture_output=True, text=True, check=True, env=env)
        rows = [json.loads(res.stdout.strip().splitlines()[-1])]
        loop = rows[0]["loop_s"]
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in rows)
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1), "loop_s": round(loop, 2),
            "loop_tokens_per_s": round(tokens / loop, 1), "startup_share": round(1 - loop / wall, 2),
            "peak_rss_mib": round(sum(r["peak_rss_mib"] for r in rows)), "load_avg_before": load,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()]}


def lora_batches(base: Path, work: Path, steps: int) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Per model and step (its first `steps` batches, in the Trainer's order): the lengths of the
    batch's examples, and its labelled (shifted) tokens."""
    from transformers import AutoTokenizer

    from dtm.training.joint import batch_order
    from dtm.training.sft import as_conversations, sft_examples

    cfg = lora_config(base, steps)
    tokenizer = AutoTokenizer.from_pretrained(base)
    lengths, labelled = [], []
    for i in range(K):
        examples = sft_examples(as_conversations(portion_path(work / "portions", i), cfg), tokenizer, cfg)
        order = batch_order(len(examples), cfg.train.per_device_train_batch_size, cfg.seed, 0)[:steps]
        lengths.append([[len(examples[j]["input_ids"]) for j in b] for b in order])
        labelled.append([sum(x != IGNORE_INDEX for j in b for x in examples[j]["labels"][1:]) for b in order])
    return lengths, labelled


def lora_arithmetic(base: Path, work: Path, steps: int) -> dict:
    """The FLOPs each mode computes for the same real tokens: the rows each one's matmuls run
    over (separate runs: each batch of 2 padded to its longest; the old joint step: all K x 2
    sequences of a step padded to the longest of them; the joint step now: real tokens only),
    and FLOPs per token of a LoRA step on a frozen base (forward 2 x the projections' weights,
    backward the input gradients only, 2 x; the adapters' forward, input and weight gradients;
    the LM head (tied, frozen) only at labelled positions: forward, the chunked loss's
    recomputation and the input gradient; attention over each padded sequence, dense). RMSNorm,
    RoPE, SiLU and the optimizer are left out (memory-bound, a small share)."""
    from transformers import AutoConfig

    cfg = lora_config(base, steps)
    c = AutoConfig.from_pretrained(base)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    outs = {"q_proj": c.num_attention_heads * hd, "k_proj": c.num_key_value_heads * hd, "v_proj": c.num_key_value_heads * hd,
            "o_proj": c.hidden_size, "gate_proj": c.intermediate_size, "up_proj": c.intermediate_size, "down_proj": c.hidden_size}
    ins = dict.fromkeys(outs, c.hidden_size) | {"o_proj": c.num_attention_heads * hd, "down_proj": c.intermediate_size}
    weights = sum(outs[n] * ins[n] for n in outs)
    t = cfg.train
    lora = sum(t.lora.r * (ins[n] + outs[n]) for n in t.lora.target_modules)
    per_row = c.num_hidden_layers * (4 * weights + 6 * lora)  # FLOPs per row a projection runs over
    per_context = 12 * c.num_hidden_layers * c.num_attention_heads * hd  # x the padded sequence length, per row
    per_labelled = 6 * c.vocab_size * c.hidden_size
    steps_batches, per_step_labelled = lora_batches(base, work, steps)
    labelled = sum(map(sum, per_step_labelled))
    real = sum(n for model in steps_batches for b in model for n in b)
    arms = ("separate", "joint_padded", "joint_flat")
    rows, context = dict.fromkeys(arms, 0), dict.fromkeys(arms, 0)
    for s in range(steps):
        batches = [m[s] for m in steps_batches]
        longest = max(n for b in batches for n in b)
        for b in batches:
            rows["separate"] += len(b) * max(b)
            context["separate"] += len(b) * max(b) ** 2
            rows["joint_padded"] += t.per_device_train_batch_size * longest
            context["joint_padded"] += t.per_device_train_batch_size * longest ** 2
            rows["joint_flat"] += sum(b)
            context["joint_flat"] += len(b) * longest ** 2  # the attention grid: every sequence padded to the step's longest
    flops = {a: rows[a] * per_row + context[a] * per_context + labelled * per_labelled for a in arms}
    return {"real_tokens": real, "labelled_tokens": labelled, "rows": rows,
            "padding_share": {a: round(1 - real / rows[a], 3) for a in arms},
            "gflop_per_row": round(per_row / 1e9, 4), "gflop_per_labelled_token_head": round(per_labelled / 1e9, 4),
            "gflop": {a: round(v / 1e9, 1) for a, v in flops.items()},
            "gflop_per_token": {a: round(v / real / 1e9, 4) for a, v in flops.items()},
            # what removing padding alone buys: the speed ratio if every mode ran its matmuls at the same GFLOP/s
            "equal_rate_speedup": {a: round(flops["separate"] / flops[a], 3) for a in ("joint_padded", "joint_flat")}}


def bench_lora(steps: int, repeats: int, srcs: dict[str, str | None]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-joint-lora-"))
    if (SMOLLM / "dtm_source.json").is_file():
        base, model = SMOLLM, "SmolLM2-135M (converted, benchmarks/real_model.py)"
    else:  # the same shape, random weights
        base, _ = save_base(work / "base", hidden=576, layers=30, vocab=49152, intermediate=1536, heads=9, tie=True)
        model = "Llama config of SmolLM2-135M's shape (random weights)"
    disperse(synthetic_data(K * steps * 2, seed=1, mean_words=12, spread=0.5, max_words=60), k=K, out=work / "portions",
             seed=0, progress=False)
    arithmetic = lora_arithmetic(base, work, steps)
    runs: dict[str, dict[str, list[dict]]] = {s: {m: [] for m in ("joint", "turn", "procs")} for s in srcs}
    for r in range(repeats):
        for mode in ("joint", "turn", "procs"):
            for name, src in srcs.items():  # code versions alternate within a mode
                runs[name][mode].append(lora_run(mode, base, work, steps, src))
                print(f"lora repeat {r} {mode} {name}: {runs[name][mode][-1]}", flush=True)
    result = {"model": model, "k": K, "steps_per_model": steps, "batch": 2, "lora": "r=16 on gate/up/down", "srcs": srcs,
              "arithmetic": arithmetic, "runs": runs, "best": {}, "ratios": {}}
    for name, by_mode in runs.items():
        best = {m: {key: max(v, key=lambda x: x[key]) for key in ("tokens_per_s", "loop_tokens_per_s")} for m, v in by_mode.items()}
        result["best"][name] = best
        ratio = {}
        for key in ("tokens_per_s", "loop_tokens_per_s"):
            other = max(best["turn"][key][key], best["procs"][key][key])
            ratio[f"joint_vs_best_other_{key}"] = round(best["joint"][key][key] / other, 2)
        ratio["peak_rss_joint_vs_procs"] = round(min(x["peak_rss_mib"] for x in by_mode["joint"])
                                                 / min(x["peak_rss_mib"] for x in by_mode["procs"]), 2)
        # achieved GFLOP/s in the loops (best loop of each mode): separate runs compute their padded rows
        # (the joint step before the padding-free forward computed `joint_padded`'s rows, since: `joint_flat`'s)
        loops = {m: best[m]["loop_tokens_per_s"]["loop_s"] for m in by_mode}
        g = arithmetic["gflop"]
        ratio["loop_gflop_per_s"] = {"joint_flat_rows": round(g["joint_flat"] / loops["joint"], 1),
                                     "joint_padded_rows": round(g["joint_padded"] / loops["joint"], 1),
                                     "turn": round(g["separate"] / loops["turn"], 1), "procs": round(g["separate"] / loops["procs"], 1)}
        result["ratios"][name] = ratio
    shutil.rmtree(work, ignore_errors=True)
    return result


GPU_TOLERANCE = 1e-4  # per weight; cuBLAS sums a batched matmul in another order than one model's (on CPU: about 1e-7)


def separate_and_joint(cfg: ExperimentConfig, base: Path, portions: list[Path], work: Path) -> dict:
    """The K models in turn with the Trainer, then as one joint job (on the device torch trains on):
    both wall times, the real tokens trained and the largest difference of any trained weight."""
    from dtm.training.joint import JointJob, train_joint
    from dtm.training.sft import train_model

    started = time.perf_counter()
    separate = [train_model(base, p, work / f"separate-{i}", cfg, progress=False) for i, p in enumerate(portions)]
    separate_s = time.perf_counter() - started
    started = time.perf_counter()
    joint = train_joint(base, [JointJob(f"sub-{i + 1}", p, work / f"joint-{i}", cfg.seed, cfg) for i, p in enumerate(portions)],
                        progress=False)
    joint_s = time.perf_counter() - started
    diff = 0.0
    for a, b in zip(separate, joint, strict=True):
        name = "adapter_model.safetensors" if (a / "adapter_model.safetensors").exists() else "model.safetensors"
        wa, wb = load_file(a / name), load_file(b / name)
        diff = max(diff, *(float((wa[n] - wb[n]).abs().max()) for n in wa))
    summaries = [training_summary(j) for j in joint]
    return {"steps": sum(x["steps"] for x in summaries), "tokens": sum(x["trained_tokens"] for x in summaries),
            "separate_s": round(separate_s, 2), "joint_s": round(joint_s, 2), "speedup": round(separate_s / joint_s, 2),
            "max_weight_difference": diff}


def lora_pair(work: Path, steps: int, small: bool = False) -> dict:
    """K=4 LoRA adapters (r=16 on gate/up/down, dropout 0: PEFT's masks are draws the joint step
    cannot repeat) on a small Llama with random weights, `steps` steps of batch 4 each, fp32:
    `separate_and_joint` plus tokens/s. `small`: a pico Llama (the CPU dry run)."""
    shape = dict(hidden=64, layers=2, vocab=512, heads=4) if small else dict(hidden=512, layers=8, vocab=8192, intermediate=1408, heads=8)
    base, n_params = save_base(work / "lora-base", tie=True, **shape)
    data = synthetic_data(K * steps * 4, seed=1, mean_words=24, spread=0.5, max_words=120)
    disperse(data, k=K, out=work / "lora-portions", seed=0, progress=False)
    cfg = lora_config(base, steps)
    # lr 1e-3: a semantic slip then moves some weight by about 1e-3 a step, ten times the tolerance
    cfg.train.per_device_train_batch_size, cfg.train.bf16, cfg.train.learning_rate = 4, False, 1e-3
    cfg.train.lora.r, cfg.train.lora.lora_dropout, cfg.train.lora.target_modules = 16, 0.0, ["gate_proj", "up_proj", "down_proj"]
    pair = separate_and_joint(cfg, base, [portion_path(work / "lora-portions", i) for i in range(K)], work / "lora")
    return {"model": f"Llama, {n_params / 1e6:.1f}M parameters (random weights, {shape})", "k": K, "steps_per_model": steps,
            "batch": 4, "lora": "r=16 on gate/up/down", **pair,
            "tokens_per_s_separate": round(pair["tokens"] / pair["separate_s"], 1),
            "tokens_per_s_joint": round(pair["tokens"] / pair["joint_s"], 1)}


def gpu_check(out_dir: Path | None = None, epochs: float = 2.0, device: str = "cuda") -> dict:
    """K=4 lab sub-models and K=4 LoRA adapters on a small Llama, each in turn (Trainer) and as one
    joint job, in fp32 on the GPU: weight differences and wall times (`lab`, `lora`). Raises
    AssertionError if a pair differs by `GPU_TOLERANCE` or more. `device: cpu`: the same at tiny
    sizes, as a dry run of the script."""
    assert device == "cpu" or torch.cuda.is_available(), "gpu_check needs a CUDA device"
    dry = device == "cpu"
    work = Path(tempfile.mkdtemp(prefix="gpu-joint-"))
    cfg, base, portions = lab_setup(work, epochs)
    cfg.train.bf16 = False  # the joint step is fp32; so is the reference
    if dry:
        cfg.train.max_steps = 2
    result = {"device": torch.cuda.get_device_name(0) if not dry else "cpu", "tolerance": GPU_TOLERANCE,
              "lab": {"k": K, "epochs": epochs, "max_steps": cfg.train.max_steps, **separate_and_joint(cfg, base, portions, work / "lab")}}
    result["lora"] = lora_pair(work, steps=2 if dry else 30, small=dry)
    result["machine"] = machine()
    shutil.rmtree(work, ignore_errors=True)
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "bench_joint_gpu.json", result)
    print(json.dumps(result), flush=True)
    for part in ("lab", "lora"):
        diff = result[part]["max_weight_difference"]
        assert diff < GPU_TOLERANCE, f"{part}: joint and separate training differ by {diff} on {result['device']}"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=["lab", "lora", "all"], default="all")
    ap.add_argument("--epochs", type=float, default=12.0)
    ap.add_argument("--steps", type=int, default=8, help="lora: optimizer steps per adapter")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="the GPU check (2 epochs, under 2 minutes); with --device cpu its dry run")
    ap.add_argument("--out", type=Path, default=None, help="where the GPU check writes bench_joint_gpu.json")
    ap.add_argument("--src", action="append", default=[],
                    help="lora: NAME=PATH of a source tree the runs import dtm from (repeat: the versions alternate)")
    ap.add_argument("--results", type=Path, default=RESULTS / "bench_joint.json", help="the JSON file the results go into")
    ap.add_argument("--child")
    ap.add_argument("--base", type=Path)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--index", type=int, default=0)
    a = ap.parse_args()
    if a.child:
        return lora_child(a.child, a.base, a.work, a.steps, a.index)
    if a.device == "cuda" or a.quick:
        gpu_check(a.out, epochs=2.0 if a.quick else a.epochs, device=a.device)
        return
    path = a.results
    result = json.loads(path.read_text()) if path.exists() else {}
    if a.what in ("lab", "all"):
        result["lab"] = bench_lab(a.epochs, a.repeats)
    if a.what in ("lora", "all"):
        srcs = dict(s.split("=", 1) for s in a.src) or {"here": None}
        result["lora"] = bench_lora(a.steps, a.repeats, srcs)
    result["machine"] = machine()
    atomic_write_json(path, result)
    print(json.dumps({k: v.get("ratios", v["best"]) for k, v in result.items() if isinstance(v, dict) and "best" in v}, indent=1))


if __name__ == "__main__":
    main()
