"""Parts of a K=4 lab step alone, one thread, process CPU ms (best of 5): what bounds the step.

  adamw      the stacked AdamW + clipping over the [4, 213568] buffer: the unfused update of
             `joint.adamw_rows` before (a dozen buffer-sized passes) against the fused kernel now
  matmul     one projection's batched matmul at the lab's sizes ([4, 574, 64] x [4, 64, 192]),
             with its GFLOP/s (the single-core AVX2 peak at 2.8 GHz is about 90)
  attention  fwd+bwd of one layer's attention: sdpa over packed rows of 82 with the block mask
             (today), against examples bucketed by length (padded to a multiple of 8, 16, 32, 64)
             under `is_causal`, one sdpa call per bucket (64 examples of 20-55 tokens)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lab_step_parts.py
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

K, P = 4, 213_568  # the lab's K=4 joint group; trained weights per model


def best_ms(f: Callable[[], object], n: int = 20) -> float:
    f()
    best = float("inf")
    for _ in range(5):
        c = time.process_time()
        for _ in range(n):
            f()
        best = min(best, (time.process_time() - c) / n * 1e3)
    return round(best, 3)


def adamw_unfused(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, decay: torch.Tensor) -> None:
    """`joint.adamw_rows` and its clipping as they were (commit 003258f)."""
    def col(x: float) -> torch.Tensor:
        return torch.full((K, 1), x)

    norms = g.pow(2).sum(1).sqrt()
    grad = g * (col(1.0)[:, 0] / (norms + 1e-6)).clamp(max=1.0)[:, None]
    lr, b1, b2 = col(1e-3), col(0.9), col(0.98)
    p.mul_(1 - lr * col(0.0) * decay)
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad * (1 - b2))
    bc1, bc2_sqrt = 1 - b1 ** col(5), (1 - b2 ** col(5)).sqrt()
    p.sub_(lr / bc1 * m / (v.sqrt() / bc2_sqrt).add_(col(1e-6)))


def adamw_fused(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, decay: torch.Tensor) -> None:
    """`joint.clip_rows` + `joint.adamw_rows` now: in place, one fused kernel call per row."""
    norms = torch.linalg.vector_norm(g, dim=1)
    for r, c in enumerate((1.0 / (norms + 1e-6)).clamp(max=1.0).tolist()):
        if c < 1.0:
            g[r].mul_(c)
    for r in range(K):
        torch._fused_adamw_([p[r]], [g[r]], [m[r]], [v[r]], [], [torch.tensor(5.0)], lr=1e-3, beta1=0.9, beta2=0.98,
                            weight_decay=0.0, eps=1e-6, amsgrad=False, maximize=False)


def attention(rng: random.Random) -> dict[str, float]:
    lens = [rng.randint(20, 55) for _ in range(64)]
    out = {}
    q, k, v = (torch.randn(28, 4, 82, 16, requires_grad=True) for _ in range(3))
    seg = torch.randint(0, 3, (28, 82)).sort(-1).values
    mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(82, 82, dtype=torch.bool).tril())[:, None]
    out["packed rows of 82, block mask"] = best_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward())
    for mult in (8, 16, 32, 64):
        buckets: dict[int, int] = {}
        for n in lens:
            length = -(-n // mult) * mult
            buckets[length] = buckets.get(length, 0) + 1
        qkv = {n: [torch.randn(c, 4, n, 16, requires_grad=True) for _ in range(3)] for n, c in buckets.items()}

        def bucketed(qkv: dict = qkv) -> None:
            sum(F.scaled_dot_product_attention(a, b, c, is_causal=True).sum() for a, b, c in qkv.values()).backward()

        out[f"bucketed x{mult} ({len(buckets)} sdpa calls), is_causal"] = best_ms(bucketed)
    return out


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    state = [torch.randn(K, P) * 0.1, torch.randn(K, P), torch.zeros(K, P), torch.zeros(K, P), torch.ones(P)]
    x, w = torch.randn(K, 574, 64), torch.randn(K, 192, 64)
    mm = best_ms(lambda: torch.bmm(x, w.transpose(1, 2)), 200)
    result = {
        "adamw_ms": {"unfused (before)": best_ms(lambda: adamw_unfused(*state)), "fused (now)": best_ms(lambda: adamw_fused(*state))},
        "matmul_ms": mm, "matmul_gflops": round(K * 574 * 64 * 192 * 2 / mm / 1e6, 1),
        "attention_fwd_bwd_ms": attention(random.Random(0)),
        "load_avg": [round(load, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
