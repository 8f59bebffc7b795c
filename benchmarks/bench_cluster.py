"""Wall time of the lab on a 3-node Ray cluster against the local executors, and Ray's start-up
overhead.

The cluster is `ray.cluster_utils.Cluster` on this host: a zero-CPU head (the driver's) and three
worker nodes of one CPU each, real raylets and object stores. The config (`--config`):

- `reduced` (default): the lab demo reduced as the cluster tests do: one seed, no control, lab
  scale 0.1, `--steps` optimizer steps for DTM (vanilla as many), short and WiSE-FT baselines,
  Fisher merging (so every parallel stage runs), `eval.limit=16`;
- `demo`: the lab demo config itself (`dtm demo`: 3 seeds, the no-bias control, every baseline).

Arms, each a whole `dtm run` (report off) into a fresh directory:

- `local`: `train.executor: local` in this process, one torch thread, models in turn;
- `joint`: the default executor as the config sets it (the demo: 2 workers), i.e. `dtm demo`;
- `local_3_workers`: the local executor with three one-thread processes (the cluster's 3 CPUs);
- `joint_3_workers`: the default executor (models of one shape trained together), 3 processes;
- `ray`: `train.executor: ray` on the cluster. Its first run (`ray_first`, in round 1) also pays
  for the workers' start and imports; later runs reuse the workers.

The arms alternate, `--repeats` rounds (the order reversed every other round), so drifts in the
machine's load hit them alike; the best of the rounds is reported, with every run's seconds and
the load average when it started. Also timed once: the cluster's start (head + 3 nodes +
`ray.init`), the shared-storage check, and 30 empty tasks. Whether the Ray runs' weights equal the
reference run's (bit for bit), and their largest difference, are recorded.

    .venv/bin/python benchmarks/bench_cluster.py [--config reduced|demo] [--steps 64] [--repeats 3] [--arms local,ray]
                                                 [--reference local] [--work DIR] [--out FILE]

`--reference` (one of the arms, `local` by default) is what the others' times are divided by
and what the Ray runs' weights are compared with; for the demo, `--arms joint,ray --reference
joint` compares the cluster with the demo as `make demo` runs it (the one-process `local` arm
alone is the demo's whole compute on one core).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_train_common import RESULTS, machine
from safetensors.torch import load_file

from dtm import cluster
from dtm.config import load_config
from dtm.io import atomic_write_json
from dtm.pipeline import LAB_CONFIG, run
from dtm.rundir import RunDir

ARMS = {
    "local": ["train.executor=local", "train.num_workers=1"],
    "joint": ["train.executor=joint"],  # the default executor with the config's own workers: what `dtm demo` runs
    "local_3_workers": ["train.executor=local", "train.num_workers=3"],
    "joint_3_workers": ["train.executor=joint", "train.num_workers=3"],
    "ray": ["train.executor=ray", "train.num_cpus_per_model=1", "train.num_gpus_per_model=0"],
}
STAGES = ("data", "disperse", "train", "merge", "eval")


def settings(config: str, steps: int) -> list[str]:
    """The overrides of `--config` on top of the lab demo config."""
    if config == "demo":
        return []
    return ["seeds=[1]", "lab.control=false", "lab.scale=0.1", f"train.max_steps={steps}", "train.save_fractions=[]",
            "baselines.methods=[short,wise_ft]", "baselines.wise_ft_alphas=[0.5]", "merge.method=fisher",
            "merge.fisher_samples=16", "eval.limit=16"]


def timed_run(overrides: list[str], out: Path) -> dict:
    """One `dtm run`: its seconds, the load average at its start, and the first seed's stage seconds."""
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    run(load_config(LAB_CONFIG, [*overrides, f"output_dir={out}"]), report=False)
    seconds = time.perf_counter() - t0
    first = RunDir(out).seed_run(1)  # both configs have seed 1
    return {"seconds": round(seconds, 2), "load_1m_at_start": load, "stages": {s: round(first.manifest(s)["seconds"], 2) for s in STAGES}}


def weight_difference(a: Path, b: Path) -> float:
    """The largest |difference| over every trained or merged model of every seed run (0.0: bit
    for bit; inf: a model missing or of other tensors). The joint executor trains a lone job with
    the joint step where Ray uses the Trainer, so against `joint` the float order differs."""
    worst, found = 0.0, False
    for fa in sorted(a.glob("**/models/*/model.safetensors")):
        fb = b / fa.relative_to(a)
        ta, tb = load_file(str(fa)), load_file(str(fb)) if fb.is_file() else {}
        if ta.keys() != tb.keys():
            return float("inf")
        worst = max([worst, *((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)])
        found = True
    return worst if found else float("inf")


def start_cluster():
    """Head (0 CPU) + 3 one-CPU nodes, connected: (cluster, seconds it took)."""
    import ray
    from ray.cluster_utils import Cluster

    t0 = time.perf_counter()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    return c, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("reduced", "demo"), default="reduced")
    parser.add_argument("--steps", type=int, default=64, help="reduced config: train.max_steps (DTM's total)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of alternating arms; the best is reported")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--reference", default="local", help="the arm the others are compared with (one of --arms)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default: results/bench_cluster.json, or bench_cluster_demo.json for --config demo)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    ref = args.reference
    if unknown or ref not in arms:
        parser.error(f"--arms: unknown {unknown}" if unknown else f"--arms: the reference `{ref}` (--reference) must be one of them")
    import ray

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_cluster-"))
    torch.set_num_threads(1)
    base = settings(args.config, args.steps)
    from dtm.lab import base_model_dir

    base_model_dir()  # the lab base exists before any timing (a rebuild would be pretrained here, untimed)
    result: dict = {"machine": machine(), "config": args.config, "overrides": base, "repeats": args.repeats, "arms": arms, "reference": ref,
                    "nodes": "head (0 CPU, the driver) + 3 workers x 1 CPU", "overhead_seconds": {}, "runs": {a: [] for a in arms}}
    c, result["overhead_seconds"]["cluster_start"] = start_cluster()
    try:
        t0 = time.perf_counter()
        cluster.check_shared_storage(work / "check")
        result["overhead_seconds"]["shared_storage_check"] = time.perf_counter() - t0
        cluster.forget_checks()
        for r in range(args.repeats):
            for arm in arms if r % 2 == 0 else arms[::-1]:  # alternate; reversed every other round
                out = work / f"{arm}-{r}"
                result["runs"][arm].append(timed_run([*base, *ARMS[arm]], out))
                print(arm, r, result["runs"][arm][-1], flush=True)
                if r == 0 and arm == "ray":
                    result["ray_first"] = result["runs"]["ray"][0]
        if "ray" in arms and ref != "ray":
            diff = max(weight_difference(work / f"{ref}-0", work / f"ray-{r}") for r in range(args.repeats))
            result[f"ray_weights_equal_{ref}"], result[f"ray_weights_max_abs_diff_{ref}"] = diff == 0.0, diff
        empty = ray.remote(num_cpus=1)(lambda: None)
        t0 = time.perf_counter()
        ray.get([empty.remote() for _ in range(30)])
        result["overhead_seconds"]["30_empty_tasks"] = time.perf_counter() - t0
    finally:
        ray.shutdown()
        c.shutdown()
    result["overhead_seconds"] = {k: round(v, 2) for k, v in result["overhead_seconds"].items()}
    result["best_seconds"] = {a: min(x["seconds"] for x in result["runs"][a]) for a in arms}
    result[f"over_{ref}"] = {a: round(s / result["best_seconds"][ref], 2) for a, s in result["best_seconds"].items()}
    result["machine_after"] = machine()
    out = args.out or RESULTS / ("bench_cluster.json" if args.config == "reduced" else "bench_cluster_demo.json")
    atomic_write_json(out, result)
    print({k: result[k] for k in ("best_seconds", f"over_{ref}", "overhead_seconds")}, result.get(f"ray_weights_max_abs_diff_{ref}"))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
