"""Would torch.compile (inductor's C++ CPU backend) do for the fused TIES chunk? What it costs a
process and whether its bits are torch's eager bits. The evaluation behind `dtm.merging.kernels`
using numba instead (session 9, issue #18).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_torch_compile.py

Runs itself in fresh processes with one inductor cache directory (a temporary one): the first
compiles cold, the second finds the cache warm. Each reports: seconds to import dynamo and
inductor, seconds of the first call (trace + compile or cache load) for a 2^18-element K=4 chunk
and for a shorter last chunk (another shape), thread-CPU ms per chunk after that, and whether the
output is bitwise the eager `methods.ties` on continuous and tie-heavy data (zeros, -0.0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
from dtm.merging import methods as M
t1 = time.perf_counter()
import torch._dynamo, torch._inductor.config  # noqa
t2 = time.perf_counter()

TINY = torch.finfo(torch.float32).tiny


def ties_chunk(x0, x1, x2, x3, base, drops, weights, scaling):
    ds = []
    for i, x in enumerate((x0, x1, x2, x3)):
        d = x - base
        d = torch.where(d.abs() <= drops[i], torch.zeros_like(d), d) * weights[i]
        ds.append(d)
    tot = ds[0]
    for d in ds[1:]:
        tot = tot + d
    s = torch.where(tot >= 0, 1.0, -1.0)
    acc = div = None
    for i, d in enumerate(ds):
        a = d * s
        a = torch.where(a <= 0, torch.zeros_like(a), a)
        agree = torch.where(a > 0, weights[i], torch.zeros_like(a))
        acc = a if acc is None else acc + a
        div = agree if div is None else div + agree
    q = acc / torch.where(div > TINY, div, torch.full_like(div, TINY))
    return ((q * s) * scaling) + base


fn = torch.compile(ties_chunk, dynamic=False)


def data(n, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.05
    xs = []
    for _ in range(4):
        d = torch.randn(n, generator=g) * 0.02
        if kind == "coarse":
            d = torch.round(d * 200) / 4
            d[torch.rand(n, generator=g) < 0.1] = -0.0
            base = torch.round(base * 64) / 64
        xs.append(base + d)
    return xs, base


def run(n, kind):
    xs, base = data(n, kind)
    w = [1.0, 0.5, 2.0, 1.0]
    trims = [M.magnitude_trim((x - base).abs(), 0.5) for x in xs]
    drops = [t.kernel_trim(torch.float32) for t in trims]
    if any(d[1] >= 0 for d in drops):  # a split tie: not what this function does
        trims = [M.Trim(0.0, keep_all=True)] * 4
        drops = [(-float("inf"), -1)] * 4
    drops = [d[0] for d in drops]
    args = (*xs, base, torch.tensor(drops), torch.tensor(w), torch.tensor(1.0))
    t0 = time.perf_counter()
    got = fn(*args)
    first = time.perf_counter() - t0
    want = M.ties(xs, w, base, trims=trims)
    return first, bool(torch.equal(got.view(torch.int32), want.view(torch.int32))), args


first_full, same_cont, args = run(1 << 18, "continuous")
first_short, same_short, _ = run(100_000, "continuous")
_, same_coarse, _ = run(1 << 18, "coarse")
times = []
for _ in range(20):
    c0 = time.thread_time()
    fn(*args)
    times.append(time.thread_time() - c0)
print(json.dumps({"import_torch_dtm_s": round(t1 - t0, 3), "import_dynamo_inductor_s": round(t2 - t1, 3),
                  "first_call_s": round(first_full, 3), "first_call_other_shape_s": round(first_short, 3),
                  "chunk_ms": round(min(times) * 1e3, 3),
                  "bitwise_eager": {"continuous": same_cont, "shorter_chunk": same_short, "coarse_ties_zeros": same_coarse}}))
"""


def main() -> None:
    runs = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", CHILD], env=env, text=True, capture_output=True)
            if p.returncode != 0:
                print(p.stderr[-3000:])
                raise SystemExit(f"{label} run failed")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["process_wall_s"] = round(time.perf_counter() - t0, 3)
            r["cache"] = label
            runs.append(r)
            print(json.dumps(r), flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
