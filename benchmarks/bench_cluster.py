"""Wall time of a reduced lab run on a 3-node Ray cluster against the local executor, and Ray's
start-up overhead.

The cluster is `ray.cluster_utils.Cluster` on this host: a zero-CPU head (the driver's) and three
worker nodes of one CPU each, real raylets and object stores. Arms, on the same reduced lab
config (one seed, no control, `--steps` optimizer steps for DTM, short and WiSE-FT baselines,
Fisher merging, `eval.limit`):

- `local`: `train.executor: local` in this process, one torch thread, models in turn;
- `local_2_workers`: the local executor with two one-thread processes (`train.num_workers: 2`);
- `ray_first`: `train.executor: ray` on the fresh cluster (its workers start and import torch);
- `ray_warm`: the same again into a new directory (the workers are reused).

Also timed: the cluster's start (head + 3 nodes + `ray.init`), the shared-storage check, and
the round trip of 30 empty tasks. Whether the Ray runs' weights equal the local run's is
recorded. On a shared machine, the load average is recorded with the numbers.

    .venv/bin/python benchmarks/bench_cluster.py [--steps 64] [--work DIR]
"""

from __future__ import annotations

import argparse
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


def reduced(steps: int, out: Path, *extra: str):
    return load_config(LAB_CONFIG, [
        "seeds=[1]", "lab.control=false", "lab.scale=0.1", f"train.max_steps={steps}", "train.save_fractions=[]",
        "train.num_workers=1", "baselines.methods=[short,wise_ft]", "baselines.wise_ft_alphas=[0.5]",
        "merge.method=fisher", "merge.fisher_samples=16", "eval.limit=16", f"output_dir={out}", *extra])


def timed_run(cfg) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = run(cfg, report=False)
    seconds = time.perf_counter() - t0
    stages = RunDir(out).seed_run(1)
    return seconds, {stage: round(stages.manifest(stage)["seconds"], 2) for stage in ("data", "disperse", "train", "merge", "eval")}


def same_weights(a: Path, b: Path) -> bool:
    models_a, models_b = RunDir(a).seed_run(1).models, RunDir(b).seed_run(1).models
    for f in sorted(models_a.glob("*/model.safetensors")):
        ta, tb = load_file(str(f)), load_file(str(models_b / f.parent.name / f.name))
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="train.max_steps (DTM's total)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_cluster-"))
    torch.set_num_threads(1)
    result: dict = {"machine": machine(), "steps": args.steps, "nodes": "head (0 CPU, the driver) + 3 workers x 1 CPU", "seconds": {}}
    secs = result["seconds"]
    secs["local"], result["local_stages"] = timed_run(reduced(args.steps, work / "local"))
    secs["local_2_workers"], _ = timed_run(reduced(args.steps, work / "local2", "train.num_workers=2"))

    t0 = time.perf_counter()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    secs["cluster_start"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        cluster.check_shared_storage(work / "check")
        secs["shared_storage_check"] = time.perf_counter() - t0
        ray_args = ("train.executor=ray", "train.num_cpus_per_model=1", "train.num_gpus_per_model=0")
        secs["ray_first"], result["ray_first_stages"] = timed_run(reduced(args.steps, work / "ray1", *ray_args))
        secs["ray_warm"], result["ray_warm_stages"] = timed_run(reduced(args.steps, work / "ray2", *ray_args))

        empty = ray.remote(num_cpus=1)(lambda: None)
        t0 = time.perf_counter()
        ray.get([empty.remote() for _ in range(30)])
        secs["30_empty_tasks"] = time.perf_counter() - t0
        result["ray_weights_equal_local"] = same_weights(work / "local", work / "ray1") and same_weights(work / "local", work / "ray2")
    finally:
        ray.shutdown()
        c.shutdown()
    result["seconds"] = {k: round(v, 2) for k, v in secs.items()}
    result["ray_over_local"] = round(secs["ray_warm"] / secs["local"], 2)
    result["machine_after"] = machine()
    atomic_write_json(RESULTS / "bench_cluster.json", result)
    print(result)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
