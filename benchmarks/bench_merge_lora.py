"""LoRA adapter merges: `dtm merge --lora-merge full|concat|svd` against PEFT's `add_weighted_adapter`.

    .venv/bin/python benchmarks/bench_merge_lora.py                          # 500M base, K=4, r=16, best of 3
    .venv/bin/python benchmarks/bench_merge_lora.py --size tiny --runs 1     # a quick check of the script

It builds a Llama-style base (fp32, random) and K LoRA adapters on it (r=16, alpha=32, MLP targets
gate/up/down_proj, random A and B so every adapter changes the model), then merges them with
uniform weights three ways, each with dtm and with PEFT, alternately (the first tool swaps every
round), every run a child process under /usr/bin/time -v (wall time, peak RSS), 1-minute load
average recorded before it:

  full    dtm: the dense model W + mean_k s_k B_k A_k, streamed;
          PEFT: add_weighted_adapter(combination_type="cat") + merge_and_unload + save_pretrained
  concat  dtm: one exact adapter of rank K*r; PEFT: combination_type="cat", the adapter saved
  svd     dtm: the concatenated adapter truncated to rank r; PEFT: combination_type="svd", svd_rank=r

Each pair of outputs is compared: the dense models tensor by tensor (full), or each module's
dense delta scale * B @ A (concat, svd): max |difference|, and for svd each tool's relative
error against the exact delta. Results to stdout and benchmarks/results/bench_merge_lora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from bench_merge import SIZES, compare, machine, settle, sh, timed  # the same model shapes, timing, comparison, machine record
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_merge_lora.json"
TARGETS = ["gate_proj", "up_proj", "down_proj"]
MODES = ["full", "concat", "svd"]

BUILD = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(2)
cfg, root, k, r = eval(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False)).save_pretrained(root + '/base')
for i in range(k):
    base = LlamaForCausalLM.from_pretrained(root + '/base')
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=sys.argv[5].split(','), lora_dropout=0.0))
    g = torch.Generator().manual_seed(100 + i)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_' in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(root + f'/a{i}')
"""

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
mode, base, out, rank, adapters = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name='a0')
for i, a in enumerate(adapters[1:], 1):
    model.load_adapter(a, adapter_name=f'a{i}')
names = [f'a{i}' for i in range(len(adapters))]
kw = dict(combination_type='svd', svd_rank=rank) if mode == 'svd' else dict(combination_type='cat')
model.add_weighted_adapter(names, [1 / len(names)] * len(names), 'merged', **kw)
model.set_adapter('merged')
if mode == 'full':
    for n in names:
        model.delete_adapter(n)
    model.merge_and_unload().save_pretrained(out)
else:
    model.save_pretrained(out, selected_adapters=['merged'])
"""


def build(size: str, k: int, r: int, work: Path) -> tuple[Path, list[Path]]:
    root = work / f"{size}-k{k}-r{r}"
    names = ["base", *(f"a{i}" for i in range(k))]
    if not all((root / n).is_dir() for n in names):
        print(f"  building {root.name}: base + {k} adapters", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        sh([sys.executable, "-c", BUILD, repr(SIZES[size]), str(root), str(k), str(r), ",".join(TARGETS)])
    return root / "base", [root / f"a{i}" for i in range(k)]


def lora_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (A, B, scale) of a saved adapter (one rank and alpha for all its modules).
    The factors are small; each dense delta is formed one module at a time (`delta`), since all
    of them at once would take several GB at 500M."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise RuntimeError(f"{adapter_dir}: per-module ranks; this comparison assumes one rank")
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    state = load_file(adapter_dir / "adapter_model.safetensors")
    return {key.removesuffix(".lora_A.weight").removeprefix("base_model.model."): (a, state[key.replace("lora_A", "lora_B")], scale)
            for key, a in state.items() if key.endswith("lora_A.weight")}


def delta(factors: dict, module: str) -> torch.Tensor:
    a, b, scale = factors[module]
    return (b.double() @ a.double()) * scale


def compare_adapters(ours: Path, peft: Path, adapters: list[Path]) -> dict[str, float]:
    """Module by module: our merged adapter's dense delta against PEFT's, and each against the
    exact merged delta (the mean of the K adapters' deltas)."""
    peft = peft / "merged" if (peft / "merged").is_dir() else peft  # PEFT saves a named adapter in a subdirectory
    a, b, each = lora_factors(ours), lora_factors(peft), [lora_factors(x) for x in adapters]
    if set(a) != set(b) or set(a) != set(each[0]):
        raise RuntimeError(f"modules differ: ours {len(a)}, PEFT {len(b)}, inputs {len(each[0])}")
    worst = {"max_abs_diff": 0.0, "ours_max_rel_error_vs_exact": 0.0, "peft_max_rel_error_vs_exact": 0.0}
    for m in sorted(a):
        exact = sum(delta(f, m) for f in each) / len(each)
        da, db = delta(a, m), delta(b, m)
        worst["max_abs_diff"] = max(worst["max_abs_diff"], float((da - db).abs().max()))
        worst["ours_max_rel_error_vs_exact"] = max(worst["ours_max_rel_error_vs_exact"], float((da - exact).norm() / exact.norm()))
        worst["peft_max_rel_error_vs_exact"] = max(worst["peft_max_rel_error_vs_exact"], float((db - exact).norm() / exact.norm()))
    return {"modules": len(a), **worst}


def bench_mode(mode: str, base: Path, adapters: list[Path], r: int, work: Path, runs: int) -> dict:
    tag = f"{work.name}/{mode}"
    outs = {"ours": work / f"{mode}-ours", "peft": work / f"{mode}-peft"}
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "src")}
    cmds = {"ours": [sys.executable, "-m", "dtm.cli", "merge", *map(str, adapters), "--base", str(base),
                     "--lora-merge", mode, "--param", f"rank={r}", "--overwrite", "--out", str(outs["ours"])],
            "peft": [sys.executable, "-c", PEFT_MERGE, mode, str(base), str(outs["peft"]), str(r), *map(str, adapters)]}
    results: dict[str, list] = {t: [] for t in cmds}
    for i in range(runs):
        for tool in (("ours", "peft") if i % 2 == 0 else ("peft", "ours")):
            shutil.rmtree(outs[tool], ignore_errors=True)
            load, busy = settle()
            res = timed(cmds[tool], env) | {"load1_before": round(load, 2), "cpu_busy_before": busy}
            results[tool].append(res)
            print(f"[{tag}] run {i + 1} {tool:5s} {res['wall_s']:7.2f} s  peak RSS {res['peak_rss_mib']:8.1f} MiB  (load {load:.2f}, CPU busy {busy:.0%})", flush=True)
    diff = compare(outs["ours"], outs["peft"]) if mode == "full" else compare_adapters(outs["ours"], outs["peft"], adapters)
    best = {t: min(x["wall_s"] for x in v) for t, v in results.items()}
    rss = {t: max(x["peak_rss_mib"] for x in v) for t, v in results.items()}
    out = {"runs": results, "best_wall_s": best, "peak_rss_mib": rss,
           "wall_ratio_ours_over_peft": round(best["ours"] / best["peft"], 3),
           "rss_ratio_ours_over_peft": round(rss["ours"] / rss["peft"], 3), "compare": diff}
    print(f"[{tag}] ours/PEFT wall {out['wall_ratio_ours_over_peft']}, RSS {out['rss_ratio_ours_over_peft']}, {json.dumps(diff)}", flush=True)
    for d in outs.values():
        shutil.rmtree(d, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="500m", help=f"base model shape, from {', '.join(SIZES)}")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool and mode (best of)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "dtm" / "bench_merge_lora"), help="scratch directory (outside the repo)")
    ap.add_argument("--keep", action="store_true", help="keep the generated base and adapters")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    modes = a.modes.split(",")
    if set(modes) - set(MODES):
        ap.error(f"unknown mode(s) {sorted(set(modes) - set(MODES))}; choose from {MODES}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "dtm merge --lora-merge vs PEFT add_weighted_adapter (+ merge_and_unload for full)",
              "machine_before": machine(), "size": a.size, "k": a.k, "r": a.r, "targets": TARGETS, "runs": a.runs}
    print(f"[{a.size}] building the base and {a.k} adapters (r={a.r}, {', '.join(TARGETS)})", flush=True)
    base, adapters = build(a.size, a.k, a.r, work)
    report["results"] = {m: bench_mode(m, base, adapters, a.r, base.parent, a.runs) for m in modes}
    report["machine_after"] = machine()
    if not a.keep:
        shutil.rmtree(base.parent, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
