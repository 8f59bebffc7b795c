"""Merge speed, memory and exactness: `dtm merge` against mergekit, method by method, on the same YAML.

    .venv/bin/python benchmarks/bench_merge.py                    # 500M and 125M, fp32 and bf16, 4 methods, best of 3
    .venv/bin/python benchmarks/bench_merge.py --sizes tiny --runs 1   # a quick check of the script
    .venv/bin/python benchmarks/bench_merge.py --sizes 500m --dtypes float32 --methods ties,dare_ties
    .venv/bin/python benchmarks/bench_merge.py --sizes 500m --peer-runs 1   # ~25 min: mergekit once per method

For each size and dtype it builds a Llama-style base and K fine-tunes of it (base + small noise,
like DTM's sub-models), saved as sharded safetensors with a different shard size each, so shard
boundaries differ. Then, for each method (linear, task_arithmetic, ties, dare_ties; density 0.5),
the same mergekit YAML runs through `dtm merge --config` and `mergekit-yaml`, alternately (the
first tool swaps every round), `--runs` times each, every run a child process under
/usr/bin/time -v (wall time, peak RSS), with the 1-minute load average recorded before it.
bf16 models: `dtype: float32, out_dtype: bfloat16` (both tools accumulate in fp32, round once).
Every output tensor is compared (max abs difference, how many are bitwise equal; DARE draws its
random masks with different generators in the two tools, so there only the size of the
difference is informative: tests/test_merge_mergekit.py checks DARE's kept fraction and rescale).
`--one-thread` also times `dtm merge --no-overlap` (no reader/writer threads) in the rotation
and checks that it writes the same bytes. The disk-bound limit is `cat` of the method's inputs
(warm page cache) plus a `dd` of the output size to the same disk. The issue's targets are
checked and written beside the numbers, and peak RSS flat in model size (within 1.25x from
125M to 500M parameters).
Threads: run it under OMP_NUM_THREADS=1 (as the lead's commands do): both tools' torch ops then
use one intra-op thread. That does not limit Python threads: dtm reads on one thread and writes
on another (both tools' files come from the page cache), and for TIES and DARE (from session 8)
merges chunks on two compute threads (`engine.COMPUTE_THREADS`), each running one-thread torch
ops, so on 2 cores dtm may use both for the arithmetic while mergekit's ops run on one (its
`--num-threads` would set torch's intra-op threads, which the runs here leave at 1 for both
tools; `--one-thread` adds dtm on a single thread, `--no-overlap`, to the rotation).
mergekit lives in its own venv ($DTM_MERGEKIT_VENV, default ~/.cache/dtm/venvs/mergekit, torch==2.13.0 first), created if missing.
Numbers go to stdout and benchmarks/results/bench_merge.json, with the machine's cores and load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_merge.json"
# A venv of its own for the peer (its pins differ from ours): $DTM_MERGEKIT_VENV, else the user's cache dir.
MERGEKIT_VENV = Path(os.environ.get("DTM_MERGEKIT_VENV", Path.home() / ".cache" / "dtm" / "venvs" / "mergekit"))

SIZES = {  # Llama-style configs; parameter counts are printed by the script
    "tiny": dict(vocab_size=4000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
    "500m": dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4),
}
SHARD_SIZES = ["1GB", "700MB", "400MB", "2GB", "300MB", "900MB"]
# method -> (needs the base, top-level parameters, per-model parameters)
METHODS = {
    "linear": (False, {}, {"weight": 1.0}),
    "task_arithmetic": (True, {"lambda": 1.0}, {"weight": 0.25}),
    "ties": (True, {"density": 0.5}, {"weight": 1.0}),
    "dare_ties": (True, {"density": 0.5}, {"weight": 1.0}),
}
RANDOM_METHODS = {"dare_ties"}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def ensure_mergekit() -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        print(f"installing mergekit into {MERGEKIT_VENV} (torch==2.13.0 first)", flush=True)
        sh([sys.executable, "-m", "venv", str(MERGEKIT_VENV)])
        pip = str(MERGEKIT_VENV / "bin" / "pip")
        sh([pip, "install", "-q", "torch==2.13.0"])
        sh([pip, "install", "-q", "mergekit==0.1.5"])
    return exe


def build_models(size: str, dtype: str, k: int, work: Path) -> tuple[Path, list[Path], int, int]:
    """A base and K fine-tunes of it (base + 0.02-scale noise, different seeds and shard sizes).
    Returns base dir, model dirs, #parameters, largest tensor bytes (in fp32)."""
    code = f"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(2)
cfg = LlamaConfig(**{SIZES[size]!r}, tie_word_embeddings=False)
dtype, k, root = getattr(torch, sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
m = LlamaForCausalLM(cfg)
base = {{n: p.detach().clone() for n, p in m.named_parameters()}}
m.to(dtype).save_pretrained(root + '/base.tmp', max_shard_size='1GB')
for i in range(k):
    g = torch.Generator().manual_seed(100 + i)
    m.float()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(base[n] + 0.02 * torch.randn(p.shape, generator=g))
    m.to(dtype).save_pretrained(root + f'/m{{i}}.tmp', max_shard_size=sys.argv[4 + i])
"""
    root = work / f"{size}-{dtype}"
    names = ["base", *(f"m{i}" for i in range(k))]
    if not all((root / n / "config.json").exists() for n in names):
        print(f"  building {root.name}: base + {k} fine-tunes", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        sh([sys.executable, "-c", code, dtype, str(k), str(root), *(SHARD_SIZES[i % len(SHARD_SIZES)] for i in range(k))])
        for n in names:
            (root / f"{n}.tmp").rename(root / n)
    out = sh([sys.executable, "-c", f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
with torch.device('meta'):
    m = LlamaForCausalLM(LlamaConfig(**{SIZES[size]!r}, tie_word_embeddings=False))
print(sum(p.numel() for p in m.parameters()), max(p.numel() * 4 for p in m.parameters()))
"""]).stdout.split()
    return root / "base", [root / f"m{i}" for i in range(k)], int(out[-2]), int(out[-1])


def recipe(method: str, dtype: str, base: Path, models: list[Path]) -> dict:
    """The mergekit YAML both tools run (bf16 models: fp32 accumulation, bf16 output)."""
    needs_base, top, per_model = METHODS[method]
    r: dict = {"merge_method": method, "dtype": "float32",
               "models": [{"model": str(m), "parameters": dict(per_model)} for m in models]}
    if needs_base:
        r["base_model"] = str(base)
        r["models"].insert(0, {"model": str(base)})
    if top:
        r["parameters"] = dict(top)
    if dtype != "float32":
        r["out_dtype"] = dtype
    return r


def cpu_ticks() -> dict[str, int]:
    """The machine's CPU time so far from /proc/stat's first line, in clock ticks: busy, idle
    (idle + iowait), steal (taken by the hypervisor for other guests) and the total."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, steal = v[3] + v[4], v[7] if len(v) > 7 else 0
    return {"busy": sum(v) - idle - steal, "idle": idle, "steal": steal, "total": sum(v)}


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run under /usr/bin/time -v: wall seconds, peak RSS (MiB) and the user and system CPU
    seconds of the command, and the fraction of the machine's CPU time the hypervisor stole
    meanwhile (a VM's neighbours: CPU seconds and wall time both grow with it)."""
    t0, ticks0 = time.perf_counter(), cpu_ticks()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    ticks1 = cpu_ticks()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")

    def field(name: str) -> float:
        return float(re.search(rf"{name}: ([\d.]+)", p.stderr).group(1))

    total = max(1, ticks1["total"] - ticks0["total"])
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(field(r"Maximum resident set size \(kbytes\)") / 1024, 1),
            "user_s": field(r"User time \(seconds\)"), "sys_s": field(r"System time \(seconds\)"),
            "steal_during": round((ticks1["steal"] - ticks0["steal"]) / total, 3)}


def cpu_busy(seconds: float = 1.0) -> float:
    """The fraction of the machine's CPU time spent busy over the last `seconds` (from /proc/stat):
    whether anything else runs just before a timing. The 1-minute load average, recorded too,
    mostly reflects this benchmark's own previous run."""
    a = cpu_ticks()
    time.sleep(seconds)
    b = cpu_ticks()
    return round((b["busy"] - a["busy"]) / max(1, b["total"] - a["total"]), 3)


def settle() -> tuple[float, float]:
    """Before a timed run: flush the dirty pages earlier runs left (their write-back would
    otherwise run during this one), then the load average and `cpu_busy`."""
    os.sync()
    return os.getloadavg()[0], cpu_busy()


def dir_bytes(d: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.name.endswith(suffix))


def disk_limit(inputs: list[Path], out_bytes: int, work: Path, runs: int = 3) -> dict[str, float]:
    """The time to read every input (from the page cache, as the merges do: warmed first) plus
    the time to write the output's bytes, each the best of `runs`, the write both through the
    page cache and past it (`oflag=direct`, as dtm writes large shards), the faster counting."""
    files = [str(f) for d in inputs for f in sorted(d.glob("*.safetensors"))]
    target = work / "dd-write.tmp"
    count = f"count={max(1, out_bytes // (16 << 20))}"
    reads, buffered, direct = [], [], []
    for _ in range(runs):
        settle()
        t0 = time.perf_counter()
        sh(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])
        reads.append(time.perf_counter() - t0)
        for times, flags in ((buffered, []), (direct, ["oflag=direct"])):
            settle()
            t0 = time.perf_counter()
            sh(["dd", "if=/dev/zero", f"of={target}", "bs=16M", count, *flags])
            times.append(time.perf_counter() - t0)
            target.unlink()
    read_s, write_s = min(reads), min(min(buffered), min(direct))
    return {"read_s": round(read_s, 3), "write_buffered_s": round(min(buffered), 3), "write_direct_s": round(min(direct), 3),
            "write_s": round(write_s, 3), "limit_s": round(read_s + write_s, 3)}


def compare(ours: Path, theirs: Path) -> dict[str, float | int]:
    """Every tensor of our output against mergekit's: max abs diff and how many are bitwise equal."""
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    a, b = tensors(ours), tensors(theirs)
    if set(a) != set(b):
        raise RuntimeError(f"tensor names differ: only ours {sorted(set(a) - set(b))[:5]}, only mergekit {sorted(set(b) - set(a))[:5]}")
    worst, equal = 0.0, 0
    for name in sorted(a):
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.shape != y.shape or x.dtype != y.dtype:
                raise RuntimeError(f"{name}: ours {x.dtype} {tuple(x.shape)}, mergekit {y.dtype} {tuple(y.shape)}")
            worst = max(worst, float((x.double() - y.double()).abs().max()))
            equal += int(torch.equal(x, y))
    return {"tensors": len(a), "max_abs_diff": worst, "bitwise_equal_tensors": equal}


def files_equal(a: Path, b: Path) -> bool:
    """The two outputs' safetensors files hold the same bytes."""
    names = sorted(f.name for f in a.glob("*.safetensors"))
    return names == sorted(f.name for f in b.glob("*.safetensors")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def machine() -> dict:
    mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()[:3])
    return {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
            "mem_total": mem["MemTotal"].strip(), "mem_available": mem["MemAvailable"].strip(), "python": platform.python_version()}


def bench_method(method: str, dtype: str, base: Path, models: list[Path], work: Path, mergekit: Path, runs: int,
                 one_thread: bool = False, peer_runs: int | None = None) -> dict:
    """One method: the tools in turn (the first one rotates every round), `runs` times each
    (mergekit `peer_runs` times, default `runs`: its TIES takes minutes at 500M); outputs
    compared; disk limit of its inputs. `one_thread` adds `dtm merge --no-overlap`."""
    tag = f"{work.name}/{method}"
    path = work / f"{method}.yaml"
    path.write_text(json.dumps(recipe(method, dtype, base, models)))  # JSON is YAML
    ours_out, mk_out = work / f"{method}-ours", work / f"{method}-mergekit"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "src")}  # this checkout's dtm
    dtm_merge = [sys.executable, "-m", "dtm.cli", "merge", "--config", str(path), "--overwrite"]
    cmds = {"ours": [*dtm_merge, "--out", str(ours_out)],
            "mergekit": [str(mergekit), str(path), str(mk_out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]}
    outs = {"ours": ours_out, "mergekit": mk_out}
    if one_thread:
        cmds["ours_one_thread"] = [*dtm_merge, "--no-overlap", "--out", str(work / f"{method}-one-thread")]
        outs["ours_one_thread"] = work / f"{method}-one-thread"
    inputs = models + ([base] if METHODS[method][0] else [])
    out_bytes = dir_bytes(models[0])
    disk_limit(inputs, out_bytes, work, runs=1)  # untimed: warms the page cache
    limit = disk_limit(inputs, out_bytes, work)
    tools = list(cmds)
    results: dict[str, list] = {t: [] for t in tools}
    peer_runs = runs if peer_runs is None else peer_runs
    for r in range(runs):
        for tool in tools[r % len(tools):] + tools[:r % len(tools)]:
            if tool == "mergekit" and r >= peer_runs:
                continue
            shutil.rmtree(outs[tool], ignore_errors=True)
            load, busy = settle()
            res = timed(cmds[tool], env)
            res["load1_before"], res["cpu_busy_before"] = round(load, 2), busy
            results[tool].append(res)
            print(f"[{tag}] run {r + 1} {tool:15s} {res['wall_s']:7.2f} s  peak RSS {res['peak_rss_mib']:8.1f} MiB  "
                  f"user+sys {res['user_s']:.1f}+{res['sys_s']:.1f} s, steal {res['steal_during']:.0%} "
                  f"(load {load:.2f}, CPU busy {busy:.0%} in the second before)", flush=True)
    diff = compare(ours_out, mk_out)
    best = {t: min(x["wall_s"] for x in v) for t, v in results.items()}
    rss = {t: max(x["peak_rss_mib"] for x in v) for t, v in results.items()}
    out = {"runs": results, "best_wall_s": best, "peak_rss_mib": rss,
           "wall_ratio_ours_over_mergekit": round(best["ours"] / best["mergekit"], 3),
           "rss_ratio_ours_over_mergekit": round(rss["ours"] / rss["mergekit"], 3),
           "disk_bound": limit, "ours_over_disk_bound": round(best["ours"] / limit["limit_s"], 2),
           "compare": {**diff, "random_masks_differ": method in RANDOM_METHODS}}
    if one_thread:
        out["overlap_speedup"] = round(best["ours_one_thread"] / best["ours"], 3)  # > 1: the threads help
        out["one_thread_bitwise_equal"] = files_equal(ours_out, outs["ours_one_thread"])
        print(f"[{tag}] one thread / overlapped: {out['overlap_speedup']}, same bytes: {out['one_thread_bitwise_equal']}", flush=True)
        shutil.rmtree(outs["ours_one_thread"], ignore_errors=True)
    print(f"[{tag}] ours/mergekit wall {out['wall_ratio_ours_over_mergekit']}, RSS {out['rss_ratio_ours_over_mergekit']}, "
          f"max |diff| {diff['max_abs_diff']:.3g} ({diff['bitwise_equal_tensors']}/{diff['tensors']} tensors bitwise equal), "
          f"disk-bound {limit['limit_s']} s -> ours x{out['ours_over_disk_bound']}", flush=True)
    shutil.rmtree(ours_out, ignore_errors=True)
    shutil.rmtree(mk_out, ignore_errors=True)
    return out


def targets(methods: dict[str, dict]) -> dict[str, dict]:
    """The issue's targets, checked: linear <= 0.4x mergekit and <= 1.3x the disk limit; every
    other method <= 1.5x our own linear time and <= 0.6x mergekit's time for that method."""
    out = {}
    linear = methods.get("linear", {}).get("best_wall_s", {}).get("ours")
    for name, m in methods.items():
        t = {"ours_over_mergekit": m["wall_ratio_ours_over_mergekit"]}
        if name == "linear":
            t |= {"ours_over_disk_bound": m["ours_over_disk_bound"],
                  "met": m["wall_ratio_ours_over_mergekit"] <= 0.4 and m["ours_over_disk_bound"] <= 1.3}
        else:
            t["met"] = m["wall_ratio_ours_over_mergekit"] <= 0.6
            if linear:
                t["ours_over_our_linear"] = round(m["best_wall_s"]["ours"] / linear, 3)
                t["met"] = t["met"] and t["ours_over_our_linear"] <= 1.5
        out[name] = t
    return out


def bench_size(size: str, dtype: str, k: int, work: Path, mergekit: Path, runs: int, methods: list[str],
               one_thread: bool = False, peer_runs: int | None = None) -> dict:
    print(f"[{size}-{dtype}] building the base and {k} models", flush=True)
    base, models, n_params, largest = build_models(size, dtype, k, work)
    print(f"[{size}-{dtype}] {n_params / 1e6:.1f}M parameters, {dir_bytes(models[0]) / 1e9:.2f} GB per model, "
          f"largest tensor {largest / 2**20:.0f} MiB (fp32)", flush=True)
    res = {name: bench_method(name, dtype, base, models, base.parent, mergekit, runs, one_thread, peer_runs) for name in methods}
    return {"parameters": n_params, "k": k, "dtype": dtype, "bytes_per_model": dir_bytes(models[0]),
            "largest_tensor_fp32_bytes": largest, "methods": res, "targets": targets(res)}


FLAT_RSS = 1.25  # "flat in model size": our peak RSS at the largest size within this factor of the smallest


def memory_scaling(cells: dict[str, dict], methods: list[str]) -> dict:
    """Peak RSS per method at each size (one dtype), and whether ours stays flat as the model grows."""
    ours = {m: [c["methods"][m]["peak_rss_mib"]["ours"] for c in cells.values()] for m in methods}
    return {"cells": list(cells), "parameters": [c["parameters"] for c in cells.values()],
            "ours_peak_rss_mib": ours,
            "mergekit_peak_rss_mib": {m: [c["methods"][m]["peak_rss_mib"]["mergekit"] for c in cells.values()] for m in methods},
            "ours_flat": {m: {"max_over_min": round(max(v) / min(v), 3), "met": max(v) <= FLAT_RSS * min(v)} for m, v in ours.items()}}


def import_floor() -> dict[str, float]:
    """Wall time and peak RSS of a process that only imports what `dtm merge` imports (its floor)."""
    cmd = [sys.executable, "-c", "import torch, safetensors, tqdm, dtm.merging, dtm.cli"]
    runs = [timed(cmd, {**os.environ, "PYTHONPATH": str(ROOT / "src")}) for _ in range(3)]
    return {"wall_s": min(r["wall_s"] for r in runs), "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500m,125m", help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3, help="runs per tool and method (best of)")
    ap.add_argument("--peer-runs", type=int, default=None,
                    help="mergekit's runs per method (default --runs; 1 fits the 500M fp32+bf16 run in ~25 min)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "dtm" / "bench_merge"), help="scratch directory for the models (outside the repo; default in the user's cache dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--one-thread", action="store_true", help="also time `dtm merge --no-overlap` (the reader/writer threads' gain)")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    mergekit = ensure_mergekit()
    report = {"benchmark": "dtm merge --config vs mergekit-yaml 0.1.5, same YAML", "machine_before": machine(), "runs": a.runs,
              "peer_runs": a.peer_runs or a.runs, "results": {}}
    report["import_floor"] = import_floor()
    for size in a.sizes.split(","):
        for dtype in a.dtypes.split(","):
            report["results"][f"{size}-{dtype}"] = bench_size(size, dtype, a.k, work, mergekit, a.runs, methods, a.one_thread,
                                                              a.peer_runs)
            if not a.keep:
                shutil.rmtree(work / f"{size}-{dtype}", ignore_errors=True)
    report["machine_after"] = machine()
    # the disk limit is two plain tools (cat, dd) that import nothing; `dtm merge` first imports
    # torch (the floor above): linear's ratio is also given without that floor, beside the target's
    floor = report["import_floor"]["wall_s"]
    for r in report["results"].values():
        linear = r["methods"].get("linear")
        if linear:
            r["targets"]["linear"]["ours_minus_import_floor_over_disk_bound"] = round(
                (linear["best_wall_s"]["ours"] - floor) / linear["disk_bound"]["limit_s"], 2)
    # memory flat in model size: our peak RSS per method at each size (the same dtype)
    by_dtype: dict[str, dict] = {}
    for key, r in report["results"].items():
        by_dtype.setdefault(r["dtype"], {})[key] = r
    report["memory_scaling"] = {dtype: memory_scaling(cells, methods) for dtype, cells in by_dtype.items() if len(cells) >= 2}
    print("targets:", json.dumps({k: r["targets"] for k, r in report["results"].items()}), flush=True)
    print("memory scaling:", json.dumps(report["memory_scaling"]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
