"""`dtm run` on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: separate raylets and
object stores on this host): every parallel stage placed across nodes, the shared-storage check,
and a node removed mid-training. Results are compared with the local executor's, bit for bit.

One cluster per module: a head node with no CPU (the driver's: it places tasks, runs none) and
three worker nodes of one CPU each.
"""

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import read_all

from dtm import cluster as dtm_cluster
from dtm.config import load_config
from dtm.pipeline import LAB_CONFIG, run, status
from dtm.rundir import RunDir, attempts_file, shared_storage_marker, train_log, training_summary
from dtm.training.sft import last_checkpoint

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

# The lab demo, reduced: one seed, no control, DTM by Fisher merging (so the Fisher stage runs),
# two baselines, a checkpoint every 4 steps and a log row every step (for the redone steps).
REDUCED = ["seeds=[1]", "lab.control=false", "lab.scale=0.1", "train.max_steps=64", "train.save_steps=4",
           "train.logging_steps=1", "train.save_fractions=[]", "train.num_workers=1", "baselines.methods=[short,wise_ft]",
           "baselines.wise_ft_alphas=[0.5]", "merge.method=fisher", "merge.fisher_samples=16", "eval.limit=16"]
# one model per task (train.models_per_job=1): bit for bit the local executor's run (a Ray joint job differs in the last bits;
# test_ray_runs_one_joint_job_per_task_slot_equal_to_local_joint covers those)
ON_RAY = ["train.executor=ray", "train.num_cpus_per_model=1", "train.num_gpus_per_model=0", "train.memory_per_model=0.5",
          "train.models_per_job=1"]


@pytest.fixture(scope="module")
def nodes_cwd(tmp_path_factory):
    """The working directory the cluster's nodes (and their workers) are started in."""
    return tmp_path_factory.mktemp("nodes")


@pytest.fixture(scope="module")
def ray_cluster(nodes_cwd):
    from ray.cluster_utils import Cluster

    with working_directory(nodes_cwd):
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True})  # the state API needs the dashboard
        for _ in range(3):
            c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same run with the local executor (not the default joint one, whose
    summation order differs in the last bits), one torch thread like a Ray task."""
    out = tmp_path_factory.mktemp("local") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(load_config(LAB_CONFIG, [*REDUCED, "train.executor=local", f"output_dir={out}"]), report=False)
    finally:
        torch.set_num_threads(threads)


@contextmanager
def working_directory(path):
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)


def tasks_by_stage():
    """stage -> node ids its tasks ran on, from Ray's state API (not from our logs)."""
    from ray.util.state import list_tasks

    placed: dict[str, set[str]] = {}
    for t in list_tasks(limit=10_000, raise_on_missing_output=False):
        if ":" in (t.name or "") and t.node_id:
            placed.setdefault(t.name.split(":")[0], set()).add(t.node_id)
    return placed


def assert_same_results(local: Path, other: Path):
    """Every model's weights and Fisher bit for bit, every evaluation's numbers equal."""
    a, b = RunDir(local).seed_run(1), RunDir(other).seed_run(1)
    names = sorted(p.name for p in a.models.iterdir())
    assert names == sorted(p.name for p in b.models.iterdir()) and "DTM" in names and "vanilla" in names
    for name in names:
        wa, wb = read_all(a.model(name)), read_all(b.model(name))
        assert wa.keys() == wb.keys() and wa, name
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name}: weights differ from the local run"
    for f in sorted(a.fisher_dir.glob("*.safetensors")):
        fa, fb = read_all_file(f), read_all_file(b.fisher_dir / f.name)
        assert all(torch.equal(fa[k], fb[k]) for k in fa), f.name
    results = sorted(p.name for p in a.eval_dir.glob("*.json"))
    assert results == sorted(p.name for p in b.eval_dir.glob("*.json")) and len(results) >= len(names)
    for f in results:
        ra, rb = json.loads((a.eval_dir / f).read_text()), json.loads((b.eval_dir / f).read_text())
        assert {t: (r["metrics"], r["groups"], r["counts"]) for t, r in ra.items()} == \
               {t: (r["metrics"], r["groups"], r["counts"]) for t, r in rb.items()}, f


def read_all_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_every_stage_runs_on_several_nodes_with_the_local_results(ray_cluster, local_run, tmp_path):
    out = run(load_config(LAB_CONFIG, [*REDUCED, *ON_RAY, f"output_dir={tmp_path / 'run'}"]), report=False)
    placed = tasks_by_stage()
    for stage in ("train", "fisher", "merge", "eval"):
        assert placed.get(stage), f"no {stage} task on the cluster"
    head = ray.get_runtime_context().get_node_id()
    used = set().union(*placed.values())
    assert len(used) > 1 and head not in used, f"tasks ran on {used}"  # spread over the workers; the driver's node ran none
    assert len(placed["train"]) > 1
    assert_same_results(local_run, out)
    manifest = RunDir(out).seed_run(1).manifest("train")
    assert manifest["outputs"]["redone_steps"] == {}  # nothing lost, nothing redone


def test_ray_executor_with_two_workers_per_model_equals_one_local_worker(ray_cluster, base_dir, tmp_path):
    """A model trained by a Ray task that launches 2 Ray Train workers (gloo DDP), with
    `num_cpus_per_model: 2`, so 1 CPU per worker: on the 1-CPU nodes, its two workers sit on two
    nodes. The task itself declares no CPU (`stage_resources`): were it to hold the model's 2 CPUs,
    only 1 of the cluster's 3 would be left for the 2 workers, and they could never start. The
    model equals its local, single-process training with the same global batch (16 examples:
    2 x 8 against 1 x 16, every step the whole data set, as in `tests/test_raytrain.py`) within
    rtol 1e-4."""
    from safetensors.torch import load_file

    from dtm.config import ExperimentConfig
    from dtm.training import train_model
    from dtm.training.executors import train_jobs

    def config(per_device: int, workers: int, executor: str) -> ExperimentConfig:
        cfg = ExperimentConfig(seed=3)
        cfg.data.cutoff_len = 64
        for k, v in {"finetuning_type": "full", "max_steps": 2, "per_device_train_batch_size": per_device,
                     "gradient_accumulation_steps": 1, "warmup_steps": 0, "learning_rate": 1e-3, "logging_steps": 1,
                     "save_steps": 100, "group_by_length": False, "workers_per_model": workers, "executor": executor,
                     "num_cpus_per_model": 2, "num_gpus_per_model": 0}.items():
            setattr(cfg.train, k, v)
        return cfg

    data = tmp_path / "data.jsonl"  # lengths differ, so the workers' halves hold different token counts
    data.write_text("".join(json.dumps({"instruction": f"What is {i} * {i}?", "output": f"{i * i}." + " Yes." * (i % 3)}) + "\n"
                            for i in range(16)))
    seconds = train_jobs(config(8, 2, "ray"), base_dir, {"m": {"data": str(data), "seed": 3}}, tmp_path / "ray")
    assert list(seconds) == ["m"] and training_summary(tmp_path / "ray" / "m")["workers"] == 2
    one = train_model(base_dir, data, tmp_path / "local", config(16, 1, "local"), seed=3, progress=False)
    a, b = load_file(one / "model.safetensors"), load_file(tmp_path / "ray" / "m" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_a_node_removed_during_training_is_survived_with_identical_results(ray_cluster, nodes_cwd, local_run, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(LAB_CONFIG, [*REDUCED, *ON_RAY, f"output_dir={out}"])
    vanilla = RunDir(out).seed_run(1).model("vanilla")
    finished: dict[str, object] = {}

    def drive():
        try:
            finished["out"] = run(cfg, report=False)
        except BaseException as e:  # re-raised in the test's thread below
            finished["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    node, reached, checkpoint = wait_for_a_checkpointed_vanilla(ray_cluster, vanilla, driver)
    ray_cluster.remove_node(node)
    driver.join(timeout=300)
    assert not driver.is_alive(), "the run did not finish after the node was lost"
    if "error" in finished:
        raise finished["error"]
    assert_same_results(local_run, out)
    attempts = [json.loads(line) for line in attempts_file(vanilla).read_text().splitlines()]
    assert attempts[0]["resumed_from_step"] >= checkpoint > 0  # resumed from its checkpoint, not from zero
    redone = RunDir(out).seed_run(1).manifest("train")["outputs"]["redone_steps"]
    print(f"node removed with vanilla at logged step {reached} (checkpoint {checkpoint}); attempts {attempts}; train manifest redone_steps {redone}")
    assert redone["vanilla"] == sum(a["redone_steps"] for a in attempts) >= reached - attempts[0]["resumed_from_step"]
    train_row = next(r for r in status(out) if r["run"] == "seed-1" and r["stage"] == "train")
    assert train_row["redone"] == {m: n for m, n in redone.items() if n} and train_row["state"] == "done"  # `dtm status` shows them
    with working_directory(nodes_cwd):
        ray_cluster.add_node(num_cpus=1)  # back to three workers for the other tests
    ray_cluster.wait_for_nodes()


def wait_for_a_checkpointed_vanilla(ray_cluster, vanilla: Path, driver: threading.Thread, timeout: float = 240):
    """Once vanilla runs on a worker node past its first checkpoint: (that node, its last logged step, the checkpoint step)."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.is_alive():
        ckpt = last_checkpoint(vanilla)
        if ckpt is not None:
            running = list_tasks(filters=[("name", "=", "train:vanilla"), ("state", "=", "RUNNING")], raise_on_missing_output=False)
            steps = [json.loads(line)["step"] for line in train_log(vanilla).read_text().splitlines() if line.strip()]
            step = int(ckpt.name.split("-")[1])
            if running and steps and max(steps) > step:
                node = next(n for n in ray_cluster.worker_nodes if n.node_id == running[0].node_id)
                return node, max(steps), step
        time.sleep(0.05)
    pytest.fail("vanilla never ran past a checkpoint on a worker node")


def test_a_run_directory_a_node_cannot_see_is_refused(ray_cluster, nodes_cwd, tmp_path):
    """A node whose processes resolve the path elsewhere (here: a relative path, and a node started
    in another working directory than the others and the driver) does not see the driver's
    marker: refused, naming that node and only it."""
    with working_directory(tmp_path):
        blind = ray_cluster.add_node(num_cpus=1)  # its raylet and workers live in tmp_path
    ray_cluster.wait_for_nodes()
    relative = Path(f"run-{os.getpid()}")
    try:
        with working_directory(nodes_cwd), pytest.raises(dtm_cluster.StorageError) as e:
            dtm_cluster.check_shared_storage(relative)
        named = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"][:12] in str(e.value)]
        assert named == [blind.node_id] and str(relative) in str(e.value)
        assert not shared_storage_marker(nodes_cwd / relative).exists()  # the marker is cleaned up
    finally:
        ray_cluster.remove_node(blind)
    dtm_cluster.check_shared_storage(tmp_path / "visible")  # every remaining node sees an absolute path
    dtm_cluster.forget_checks()


def test_a_node_that_joins_later_is_checked_before_the_next_wave(ray_cluster, nodes_cwd, tmp_path, monkeypatch):
    """After the run's check, a node joins: before the next wave of tasks (`run_tasks`) it alone is
    checked (the nodes the real check is asked about are recorded on the way through), and Ray's
    state API shows the check's task on it; a later wave checks nothing. A node joining with
    another view of the run directory (as in the test above: a relative path and another working
    directory, since one host has one file system) is refused by name before any task of the wave
    runs. What this does not prove: a real second file system."""
    from ray.util.state import list_tasks

    from dtm.training.executors import Retries

    def tally(path: str) -> str:  # nested: shipped by value
        with open(path, "a") as f:
            f.write("x")
        return path

    def checks_on(node_id: str, expected: int, timeout: float = 30) -> int:
        """The storage_check tasks Ray's state API lists on the node, waited for until `expected`
        (up to `timeout`): workers report task events to the GCS in batches, about every second."""
        deadline = time.monotonic() + timeout
        while True:
            n = sum(t.node_id == node_id for t in list_tasks(filters=[("name", "=", "storage_check")], limit=10_000,
                                                               raise_on_missing_output=False))
            if n == expected or time.monotonic() > deadline:
                return n
            time.sleep(0.5)

    asked: list[list[str]] = []  # the node ids each storage check was run on
    real = dtm_cluster.nodes_not_seeing
    monkeypatch.setattr(dtm_cluster, "nodes_not_seeing",
                        lambda path, token, nodes, **kw: asked.append([n["NodeID"] for n in nodes]) or real(path, token, nodes, **kw))

    def wave(name: str) -> dict:
        return dtm_cluster.run_tasks(tally, {name: (str(tmp_path / name),)}, dtm_cluster.Resources(cpus=1), Retries(0), "late")

    relative, added = Path(f"late-{os.getpid()}"), []
    try:
        with working_directory(nodes_cwd):
            dtm_cluster.check_shared_storage(relative)  # the run's check: every node so far sees it
            assert sorted(asked[0]) == sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
            added.append(ray_cluster.add_node(num_cpus=1))  # joins with the same view
            ray_cluster.wait_for_nodes()
            assert wave("a") == {"a": str(tmp_path / "a")}
            assert asked[1:] == [[added[0].node_id]] and checks_on(added[0].node_id, expected=1) == 1  # it alone, on it
            assert wave("b") == {"b": str(tmp_path / "b")} and len(asked) == 2  # no new node: nothing checked
            with working_directory(tmp_path):
                added.append(ray_cluster.add_node(num_cpus=1))  # joins with another view: its relative path is elsewhere
            ray_cluster.wait_for_nodes()
            with pytest.raises(dtm_cluster.StorageError) as e:
                wave("c")
        named = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"][:12] in str(e.value)]
        assert asked[2:] == [[added[1].node_id]] and named == [added[1].node_id]  # refused by name,
        assert not (tmp_path / "c").exists()  # before the wave ran
    finally:
        dtm_cluster.forget_checks()
        for node in added:
            ray_cluster.remove_node(node)


def test_a_task_that_raises_is_retried_by_our_policy_only(ray_cluster, tmp_path):
    """Ray never reruns a raised exception (only lost tasks): a bug runs 1 + train.retries times,
    a user error once, and both are reported by name."""
    from dtm.training.executors import Retries

    def fail_and_count(tally: str, error: str) -> None:  # nested: shipped by value (workers cannot import the tests)
        from dtm.errors import DataError

        with open(tally, "a") as f:
            f.write("x")
        raise DataError("bad data") if error == "user" else RuntimeError("a bug")

    retries = Retries(2)
    calls = {name: (str(tmp_path / name), name) for name in ("user", "bug")}
    results = dtm_cluster.run_tasks(fail_and_count, calls, dtm_cluster.Resources(cpus=1), retries, "check")
    assert results == {}
    assert (tmp_path / "user").read_text() == "x" and (tmp_path / "bug").read_text() == "xxx"
    assert "bad data" in retries.failures["user"] and "a bug" in retries.failures["bug"]
