"""Merge speed, memory and exactness: `dtm merge` against mergekit on a linear merge of 4 models.

    .venv/bin/python benchmarks/bench_merge.py                    # ~500M and ~125M Llama configs
    .venv/bin/python benchmarks/bench_merge.py --sizes tiny       # a quick check of the script

For each size it builds K Llama-style models from a config (different seeds, saved as sharded
safetensors with a different shard size each, so shard boundaries differ), then:
  * warms the page cache (`cat` every input to /dev/null) and times that read: the read part
    of the disk-bound limit; the write part is a `dd` of the output size to the same disk;
  * runs `dtm merge --method average` and `mergekit-yaml` (linear, float32) alternately, twice
    each, every run as a child process under /usr/bin/time -v (wall time, peak RSS);
  * compares every output tensor (max abs difference, how many are bitwise equal).
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


def build_models(size: str, k: int, work: Path) -> tuple[list[Path], int, int]:
    """K models of one config, different seeds and shard sizes; returns dirs, #params, largest tensor bytes."""
    code = f"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(2)
cfg = LlamaConfig(**{SIZES[size]!r}, tie_word_embeddings=False)
seed, out, shard = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.manual_seed(seed)
m = LlamaForCausalLM(cfg)
m.save_pretrained(out, max_shard_size=shard)
print(sum(p.numel() for p in m.parameters()), max(p.numel() * 4 for p in m.parameters()))
"""
    dirs = []
    n_params = largest = 0
    for i in range(k):
        d = work / f"{size}-m{i}"
        if not (d / "config.json").exists():
            print(f"  building {d.name}", flush=True)
            tmp = d.with_name(d.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            out = sh([sys.executable, "-c", code, str(i), str(tmp), SHARD_SIZES[i % len(SHARD_SIZES)]]).stdout.split()
            tmp.rename(d)
        dirs.append(d)
    out = sh([sys.executable, "-c", f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
with torch.device('meta'):
    m = LlamaForCausalLM(LlamaConfig(**{SIZES[size]!r}, tie_word_embeddings=False))
print(sum(p.numel() for p in m.parameters()), max(p.numel() * 4 for p in m.parameters()))
"""]).stdout.split()
    n_params, largest = int(out[-2]), int(out[-1])
    return dirs, n_params, largest


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run under /usr/bin/time -v: wall seconds and peak RSS (MiB) of the command."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(rss_kb / 1024, 1)}


def dir_bytes(d: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.name.endswith(suffix))


def disk_limit(inputs: list[Path], out_bytes: int, work: Path) -> dict[str, float]:
    files = [str(f) for d in inputs for f in sorted(d.glob("*.safetensors"))]
    t0 = time.perf_counter()
    sh(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])
    read_s = time.perf_counter() - t0
    target = work / "dd-write.tmp"
    t0 = time.perf_counter()
    sh(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={max(1, out_bytes // (16 << 20))}"])
    write_s = time.perf_counter() - t0
    target.unlink()
    return {"read_s": round(read_s, 3), "write_s": round(write_s, 3), "limit_s": round(read_s + write_s, 3)}


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


def machine() -> dict:
    mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()[:3])
    return {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
            "mem_total": mem["MemTotal"].strip(), "mem_available": mem["MemAvailable"].strip(), "python": platform.python_version()}


def bench_size(size: str, k: int, work: Path, mergekit: Path, runs: int, ties: bool) -> dict:
    print(f"[{size}] building {k} models", flush=True)
    models, n_params, largest = build_models(size, k, work)
    print(f"[{size}] {n_params / 1e6:.1f}M parameters, {dir_bytes(models[0]) / 1e9:.2f} GB per model, "
          f"largest tensor {largest / 2**20:.0f} MiB", flush=True)
    recipe = work / f"{size}-mergekit.yml"
    recipe.write_text(json.dumps({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }))
    ours_out, mk_out = work / f"{size}-ours", work / f"{size}-mergekit"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    ours_cmd = [str(ROOT / ".venv" / "bin" / "dtm"), "merge", "--method", "average", "--overwrite", "--out", str(ours_out), *map(str, models)]
    mk_cmd = [str(mergekit), str(recipe), str(mk_out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    # untimed warm-up of the page cache, then the disk-bound limit on warm inputs
    disk_limit(models, dir_bytes(models[0]), work)
    limit = disk_limit(models, dir_bytes(models[0]), work)
    results: dict[str, list] = {"ours": [], "mergekit": []}
    for r in range(runs):
        for tool, cmd, out in (("ours", ours_cmd, ours_out), ("mergekit", mk_cmd, mk_out)):
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            res = timed(cmd, env)
            res["load1_before"] = round(load, 2)
            results[tool].append(res)
            print(f"[{size}] run {r + 1} {tool:8s} {res['wall_s']:7.2f} s  peak RSS {res['peak_rss_mib']:8.1f} MiB  (load {load:.2f})", flush=True)
    diff = compare(ours_out, mk_out)
    if ties:
        # a whole-tensor method (TIES needs a top-k over each tensor): its memory is a few
        # tensors times K, still not the model size
        shutil.rmtree(ours_out, ignore_errors=True)
        ties_cmd = [str(ROOT / ".venv" / "bin" / "dtm"), "merge", "--method", "ties", "--param", "density=0.5",
                    "--base", str(models[0]), "--out", str(ours_out), *map(str, models[1:])]
        ties_res = timed(ties_cmd, env)
        print(f"[{size}] ours ties (K={k - 1}, whole tensors) {ties_res['wall_s']:.2f} s  peak RSS {ties_res['peak_rss_mib']:.1f} MiB", flush=True)
    best = {t: min(x["wall_s"] for x in v) for t, v in results.items()}
    rss = {t: max(x["peak_rss_mib"] for x in v) for t, v in results.items()}
    out = {
        "parameters": n_params, "k": k, "bytes_per_model": dir_bytes(models[0]), "largest_tensor_bytes": largest,
        "runs": results, "best_wall_s": best, "peak_rss_mib": rss,
        "wall_ratio_ours_over_mergekit": round(best["ours"] / best["mergekit"], 3),
        "rss_ratio_ours_over_mergekit": round(rss["ours"] / rss["mergekit"], 3),
        "disk_bound": limit, "ours_over_disk_bound": round(best["ours"] / limit["limit_s"], 2),
        "largest_tensor_times_k_mib": round(largest * k / 2**20, 1), "compare": diff,
    }
    if ties:
        out["ties_whole_tensor"] = {**ties_res, "k": k - 1, "largest_tensor_times_k_mib": round(largest * (k - 1) / 2**20, 1)}
    print(f"[{size}] ours/mergekit wall {out['wall_ratio_ours_over_mergekit']}, RSS {out['rss_ratio_ours_over_mergekit']}, "
          f"max |diff| {diff['max_abs_diff']:.3g} ({diff['bitwise_equal_tensors']}/{diff['tensors']} tensors bitwise equal), "
          f"disk-bound {limit['limit_s']} s -> ours x{out['ours_over_disk_bound']}", flush=True)
    shutil.rmtree(ours_out, ignore_errors=True)
    shutil.rmtree(mk_out, ignore_errors=True)
    return out


def import_floor() -> dict[str, float]:
    """Wall time and peak RSS of a process that only imports what `dtm merge` imports (its floor)."""
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-c", "import torch, safetensors, tqdm, dtm.merging, dtm.cli"]
    runs = [timed(cmd, dict(os.environ)) for _ in range(3)]
    return {"wall_s": min(r["wall_s"] for r in runs), "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500m,125m", help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "dtm" / "bench_merge"), help="scratch directory for the models (outside the repo; default in the user's cache dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--ties", action="store_true", help="also measure a TIES merge (whole-tensor path) per size")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    mergekit = ensure_mergekit()
    report = {"benchmark": "linear merge, dtm vs mergekit 0.1.5", "machine_before": machine(), "sizes": {}}
    report["import_floor"] = import_floor()
    for size in a.sizes.split(","):
        res = report["sizes"][size] = bench_size(size, a.k, work, mergekit, a.runs, a.ties)
        # the merge itself, without the interpreter + torch start-up that every CLI run pays
        res["ours_minus_import_over_disk_bound"] = round(
            (res["best_wall_s"]["ours"] - report["import_floor"]["wall_s"]) / res["disk_bound"]["limit_s"], 2)
        if not a.keep:
            for d in work.glob(f"{size}-m*"):
                shutil.rmtree(d, ignore_errors=True)
    report["machine_after"] = machine()
    sizes = report["sizes"]
    if len(sizes) >= 2:
        names = sorted(sizes, key=lambda s: sizes[s]["parameters"])
        small, large = sizes[names[0]], sizes[names[-1]]
        floor = report["import_floor"]["peak_rss_mib"]
        report["memory_scaling"] = {
            "sizes": names, "param_ratio": round(large["parameters"] / small["parameters"], 2),
            "ours_peak_rss_mib": [small["peak_rss_mib"]["ours"], large["peak_rss_mib"]["ours"]],
            "ours_above_import_floor_mib": [round(small["peak_rss_mib"]["ours"] - floor, 1), round(large["peak_rss_mib"]["ours"] - floor, 1)],
            "largest_tensor_times_k_mib": [small["largest_tensor_times_k_mib"], large["largest_tensor_times_k_mib"]],
            "mergekit_peak_rss_mib": [small["peak_rss_mib"]["mergekit"], large["peak_rss_mib"]["mergekit"]],
        }
        if "ties_whole_tensor" in small:
            report["memory_scaling"]["ours_ties_peak_rss_mib"] = [small["ties_whole_tensor"]["peak_rss_mib"], large["ties_whole_tensor"]["peak_rss_mib"]]
            report["memory_scaling"]["ties_largest_tensor_times_k_mib"] = [small["ties_whole_tensor"]["largest_tensor_times_k_mib"], large["ties_whole_tensor"]["largest_tensor_times_k_mib"]]
        print("memory scaling:", json.dumps(report["memory_scaling"]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
