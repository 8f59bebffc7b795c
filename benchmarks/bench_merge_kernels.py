"""Per-chunk cost of the merge arithmetic: the fused kernels (`dtm.merging.kernels`, numba)
against the torch formulation they replace, and what the kernels cost a process to load.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_merge_kernels.py            # K=4, 2^18 elements
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_merge_kernels.py --repeat 100 --compile-check

Thread CPU time (`time.thread_time`) of one chunk group's merge, min over `--repeat` runs, for
linear (reference), TIES (given the per-chunk trims; threshold ties all kept or dropped, the
common case), TIES' bracket count (all K models) and DARE-TIES (density 0.5), each in torch's
ops and in the kernel; the outputs are compared bitwise. `--compile-check` also times, in fresh
processes, loading the kernels with an empty numba cache (compiling) and with a warm one.
Results: stdout and benchmarks/results/bench_merge_kernels.json, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dtm.merging import kernels as K  # noqa: E402
from dtm.merging import methods as M  # noqa: E402


def best(fn, repeat: int) -> float:
    """Min thread-CPU milliseconds of fn() over `repeat` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return round(min(times) * 1e3, 3)


def chunk_group(k: int, n: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.05
    return [base + 0.02 * torch.randn(n, generator=g) for _ in range(k)], base


def measure(k: int, n: int, repeat: int) -> dict:
    torch.set_num_threads(1)
    xs, base = chunk_group(k, n)
    weights = [1.0] * k
    trims = [M.magnitude_trim((x - base).abs(), 0.5) for x in xs]
    out: dict[str, dict] = {}

    def pair(name: str, eager, fused) -> None:
        a, b = eager(), fused()
        same = b is not None and torch.equal(a.view(torch.int32), b.view(torch.int32))
        out[name] = {"torch_ms": best(eager, repeat), "kernel_ms": best(fused, repeat), "bitwise_equal": same}
        print(f"{name:10s} torch {out[name]['torch_ms']:7.3f} ms  kernel {out[name]['kernel_ms']:7.3f} ms  same bits: {same}",
              flush=True)

    out["linear"] = {"torch_ms": best(lambda: M.weighted_average(xs, weights), repeat)}
    print(f"linear     torch {out['linear']['torch_ms']:7.3f} ms", flush=True)
    pair("ties", lambda: M.ties(xs, weights, base, trims=trims), lambda: M.ties_fused(xs, weights, base, trims=trims))
    gens = M.model_generators(0, "t", k)
    dkw = dict(density=0.5, generators=gens, offset=1 << 20)
    pair("dare_ties", lambda: M.dare_ties(xs, weights, base, **dkw), lambda: M.dare_ties_fused(xs, weights, base, **dkw))
    brackets = []
    for x in xs:
        a = (x - base).abs().numpy()
        brackets.append(M.bracket(a[:: n // 4096].copy(), n, M.keep_count(n, 0.5)))

    def count_torch() -> list:
        return [M.count_bracket(torch.sub(x, base).abs_().numpy(), *br) for x, br in zip(xs, brackets)]

    got, want = M.count_brackets(xs, base, brackets), count_torch()
    same = all(g.above == w.above and np.array_equal(g.values, w.values) for g, w in zip(got, want))
    out["count"] = {"torch_ms": best(count_torch, repeat), "kernel_ms": best(lambda: K.count_brackets(xs, base, brackets), repeat),
                    "bitwise_equal": same, "inside_fraction": round(sum(w.size for w in want) / (k * n), 4)}
    print(f"count      torch {out['count']['torch_ms']:7.3f} ms  kernel {out['count']['kernel_ms']:7.3f} ms  same: {same}",
          flush=True)
    return out


LOAD = """
import sys, time
t0 = time.perf_counter()
import torch
from dtm.merging import methods as M
t1 = time.perf_counter()
xs = [torch.randn(4096) for _ in range(4)]
base = torch.randn(4096)
trims = [M.Trim(0.0, keep_all=True)] * 4
assert M.ties_fused(xs, [1.0] * 4, base, trims=trims) is not None
gens = M.model_generators(0, "t", 4)
assert M.dare_ties_fused(xs, [1.0] * 4, base, density=0.5, generators=gens) is not None
assert M.count_brackets(xs, base, [(0.1, 0.2)] * 4)[0] is not None
print(round(t1 - t0, 3), round(time.perf_counter() - t1, 3))
"""


def compile_check() -> dict:
    """Seconds to import and to load the K=4 kernels in a fresh process: cold (empty numba
    cache: compiles), then warm (the same cache), twice each."""
    res: dict[str, list] = {"cold_s": [], "warm_s": [], "import_s": []}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for _ in range(2):
        with tempfile.TemporaryDirectory() as cache:
            env["NUMBA_CACHE_DIR"] = cache
            for kind in ("cold_s", "warm_s"):
                p = subprocess.run([sys.executable, "-c", LOAD], env=env, text=True, capture_output=True, check=True)
                imp, load = map(float, p.stdout.split())
                res[kind].append(load)
                res["import_s"].append(imp)
    print(f"kernels: load cold {res['cold_s']} s, warm {res['warm_s']} s (imports {res['import_s']} s)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n", type=int, default=1 << 18)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--compile-check", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_merge_kernels.json"))
    a = ap.parse_args()
    if not K.available():
        sys.exit("the merge kernels do not run here (numba missing or DTM_MERGE_KERNELS=0)")
    report = {"k": a.k, "n": a.n, "repeat": a.repeat, "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    report["per_chunk"] = measure(a.k, a.n, a.repeat)
    if a.compile_check:
        report["kernel_load"] = compile_check()
    report["load_after"] = os.getloadavg()
    print(f"load average before {report['load_before']}, after {report['load_after']}")
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
