"""Ray, for every parallel stage of a run: the one module that knows Ray.

With `train.executor: ray` the stages hand their independent pieces of work (train a model,
compute a sub-model's Fisher, merge, evaluate a model) to `run_tasks`, which runs each as a Ray
task with declared resources (`stage_resources`), placed by Ray across the cluster's nodes; the
driver (`dtm run`) only plans, waits and writes manifests. The stages never import Ray.

- `session(cfg, root)`: connect (`train.ray_address`, else `RAY_ADDRESS`, else the running
  instance, else a new local one: `ray.init`'s own rule) once for the whole run, and check that
  every node sees the run directory (`check_shared_storage`), before any work is placed. A node
  that joins later (an autoscaler's, a replaced one) is checked before the next wave of tasks
  (`check_new_nodes`, called by `run_tasks`).
- Retries: a task lost with its node or worker (a system failure) is retried by Ray itself, up to
  `LOST_TASK_RETRIES` times, on another node; the job resumes from what it left on the shared
  run directory (a training job from its last checkpoint; Fisher files, merges and results are
  written atomically, so a lost one left nothing that looks done). An exception the job raised
  is never retried by Ray (`retry_exceptions=False`): the caller's `Retries` judges it (a user
  error is final, another is retried `train.retries` times), so the two loops never compound.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from dtm import rundir
from dtm.errors import DtmError, TrainingError

log = logging.getLogger(__name__)

LOST_TASK_RETRIES = 3  # a task whose node or worker died is rerun on another node this many times
MARKER_TIMEOUT_S = 120.0  # a node that cannot even start a task in this long is reported as unreachable


class StorageError(DtmError):
    """The run directory is not visible on every node of the cluster."""


class RetryPolicy(Protocol):
    """What `run_tasks` needs of `dtm.training.executors.Retries` (the one retry policy)."""

    failures: dict[str, str]

    def failed(self, name: str, error: BaseException) -> bool: ...

    def succeeded(self, name: str) -> None: ...


@dataclass(frozen=True)
class Resources:
    """What one task declares to Ray: it is placed on a node with this much free."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int = 0  # bytes of host memory; 0 = not declared

    def options(self) -> dict[str, Any]:
        return {"num_cpus": self.cpus, "num_gpus": self.gpus} | ({"memory": self.memory} if self.memory else {})


def enabled(cfg: Any) -> bool:
    """Does this config run its parallel stages on Ray?"""
    return cfg.train.executor == "ray"


def _ray():
    try:
        import ray
    except ImportError:
        raise TrainingError("train.executor: ray needs the ray package: pip install 'disperse-then-merge[ray]'") from None
    return ray


# ---------------------------------------------------------------- connecting


@contextmanager
def connected(address: str | None) -> Iterator[bool]:
    """Ray for the duration: the running instance, else `ray.init(address)` (None: `RAY_ADDRESS`,
    else a new local instance), shut down again at the end only if started here. -> started here?"""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=True)
    try:
        yield started
    finally:
        if started:
            forget_checks()  # the nodes checked were this instance's
            ray.shutdown()


def session(cfg: Any, root: str | Path):
    """The whole run's Ray connection, its shared storage checked; a no-op for the local executor.
    One connection for all stages: starting Ray costs seconds, paid once instead of per stage."""
    if not enabled(cfg):
        return nullcontext()
    return _session(cfg.train.ray_address, Path(root))


@contextmanager
def _session(address: str | None, root: Path) -> Iterator[None]:
    with connected(address):
        try:
            check_shared_storage(root)
            yield
        finally:
            forget_checks()


# ---------------------------------------------------------------- shared storage


@dataclass
class _Checked:
    """The run directory whose visibility was checked, and the nodes (ids) that passed."""

    root: Path
    nodes: set[str]


_CHECKED: _Checked | None = None  # this process's current check (one run directory at a time)


def forget_checks() -> None:
    """End of a session: no node is known to see any run directory."""
    global _CHECKED
    _CHECKED = None


def alive_nodes() -> list[dict[str, Any]]:
    """`ray.nodes()` entries of the nodes that are up."""
    return [n for n in _ray().nodes() if n.get("Alive")]


def _read_marker(path: str, token: str) -> tuple[str, bool]:
    """(this node's address, does `path` hold `token`?): run as a task on each node."""
    import ray

    try:
        seen = Path(path).read_text(encoding="utf-8").strip() == token
    except OSError:
        seen = False
    return ray.util.get_node_ip_address(), seen


def nodes_not_seeing(path: Path, token: str, nodes: list[dict[str, Any]], timeout: float = MARKER_TIMEOUT_S) -> list[str]:
    """Those of `nodes` (`ray.nodes()` entries) on which a task cannot read `token` from `path`
    ("ip (node id)"), each checked by a task pinned to it (named `storage_check`, as Ray's state
    API lists it). A node where no task could start in `timeout` is listed too."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
    refs = {read.options(name="storage_check", scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(str(path), token): f"{n['NodeManagerAddress']} (node {n['NodeID'][:12]})" for n in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    missing = []
    for ref, label in refs.items():
        try:
            ok = ref in ready and ray.get(ref)[1]
        except ray.exceptions.RayError:
            ok = False
        if not ok:
            missing.append(label)
    return missing


def check_shared_storage(root: str | Path, nodes: list[dict[str, Any]] | None = None) -> None:
    """Refuse a run directory that some node of the cluster (of `nodes`; default: every alive
    one) cannot see: the driver writes a marker file with a fresh token into it, and a task on
    every node must read that token back. Without this, a task on such a node would train into
    its own local disk and the driver would wait for outputs that never appear (or find another
    node's stale ones). The nodes that passed are remembered (`check_new_nodes`)."""
    global _CHECKED
    from dtm.io import atomic_write_text, make_dirs

    root = Path(root)
    nodes = alive_nodes() if nodes is None else nodes
    make_dirs(root, "creating the run directory (output_dir)")
    marker, token = rundir.shared_storage_marker(root), uuid.uuid4().hex
    atomic_write_text(marker, token)
    try:
        missing = nodes_not_seeing(marker, token, nodes)
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        raise StorageError(
            f"{root}: the run directory is not visible on every node of the Ray cluster: a task on "
            f"{', '.join(missing)} could not read the marker file {marker} the driver wrote. Put output_dir on storage "
            "every node mounts at the same absolute path (NFS, a cluster file system), or use train.executor: local"
        )
    if _CHECKED is None or _CHECKED.root != root:
        _CHECKED = _Checked(root, set())
    _CHECKED.nodes |= {n["NodeID"] for n in nodes}
    log.info("ray: %s is visible on the %d node(s) checked", root, len(nodes))


def check_new_nodes() -> None:
    """Check the nodes that joined the cluster since the run directory was checked (an
    autoscaler's, a replacement for a lost one), before tasks may be placed on them; a no-op
    outside a checked session. A node that cannot see the run directory is refused by name."""
    if _CHECKED is None:
        return
    new = [n for n in alive_nodes() if n["NodeID"] not in _CHECKED.nodes]
    if new:
        log.info("ray: %d node(s) joined the cluster; checking that they see %s", len(new), _CHECKED.root)
        check_shared_storage(_CHECKED.root, new)


# ---------------------------------------------------------------- resources


def cluster_has_gpus() -> bool:
    return _ray().cluster_resources().get("GPU", 0) > 0


def stage_resources(cfg: Any, stage: str) -> Resources:
    """What a task of `stage` declares. Training, Fisher and evaluation run a model's forward (and
    backward) passes: `num_cpus_per_model` and `num_gpus_per_model` (GPUs only if the cluster has
    any). A merge streams tensors from disk on the CPU: one CPU, no GPU. Memory: `train.memory_per_model` GiB
    (0 = not declared: Ray then places by CPUs and GPUs alone). A model trained data-parallel
    (`train.workers_per_model` > 1): nothing, its Ray Train workers declare the resources."""
    t = cfg.train
    memory = int(t.memory_per_model * 2**30)
    if stage == "train" and t.workers_per_model > 1:
        # the task only launches the model's Ray Train workers and waits for them; they declare the
        # model's CPUs and GPUs. Were the task to hold them too, tasks waiting for their workers
        # could take every CPU and leave none for any worker: a deadlock.
        return Resources(cpus=0.0, gpus=0.0, memory=0)
    if stage == "merge":
        return Resources(cpus=1.0, gpus=0.0, memory=memory)
    gpus = t.num_gpus_per_model if t.num_gpus_per_model and cluster_has_gpus() else 0.0
    if t.num_gpus_per_model and not gpus:
        log.info("ray: the cluster has no GPU; %s tasks run on CPU", stage)
    return Resources(cpus=t.num_cpus_per_model, gpus=gpus, memory=memory)


def task_slots(resources: Resources) -> int:
    """How many tasks declaring `resources` the cluster runs at once (by GPUs when they declare
    any, else CPUs; a task that declares neither, such as a launcher of Ray Train workers, counts
    as one CPU: its workers hold the CPUs)."""
    total = _ray().cluster_resources()
    if resources.gpus:
        return max(1, int(total.get("GPU", 0) // resources.gpus))
    return max(1, int(total.get("CPU", 1) // (resources.cpus or 1.0)))


def for_models(per_model: Resources, models: int) -> Resources:
    """What a task that trains `models` models in one process (a joint job) declares: `models` times
    one model's host memory (each model's weights, optimizer state and batches are its own; the
    base they share is counted in each, on the safe side), and one model's CPUs and GPUs: the
    models share the process's threads and its device (one joint job per task slot, `task_slots`)."""
    return replace(per_model, memory=per_model.memory * models)


def models_per_node(per_model: Resources, nodes: list[dict[str, Any]] | None = None) -> int | None:
    """The most models whose declared memory one node of the cluster (of `nodes`, `ray.nodes()`
    entries; default: every alive one) holds, so that no joint job asks for more than any node
    has (Ray would leave such a task pending for ever); None when no memory is declared."""
    if not per_model.memory:
        return None
    nodes = alive_nodes() if nodes is None else nodes
    largest = max((n.get("Resources", {}).get("memory", 0) for n in nodes), default=0)
    return max(1, int(largest // per_model.memory))


def threads_for(resources: Resources) -> int:
    """Torch threads of a task: its declared CPUs (more threads than cores slow small steps badly)."""
    return max(1, int(resources.cpus))


# ---------------------------------------------------------------- running tasks


def _call_with_threads(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    """A task's body: `fn(*args)` with torch using the task's declared CPUs, no more."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


def run_tasks(fn: Callable[..., Any], calls: Mapping[str, tuple], resources: Resources | Mapping[str, Resources],
              retries: RetryPolicy, what: str) -> dict[str, Any]:
    """Run `fn(*calls[name])` for every name as Ray tasks (named `what:name`, so the Ray dashboard
    and state API show them), each declaring `resources` (or `resources[name]`); -> name -> result
    for those that succeeded. The failures are left in `retries.failures` by name, after every
    other task has finished."""
    ray = _ray()
    task = ray.remote(max_retries=LOST_TASK_RETRIES, retry_exceptions=False)(_call_with_threads)
    names: dict[Any, str] = {}  # task ref -> call name

    def submit(name: str) -> Any:
        declared = resources if isinstance(resources, Resources) else resources[name]
        ref = task.options(name=f"{what}:{name}", **declared.options()).remote(fn, threads_for(declared), *calls[name])
        names[ref] = name
        return ref

    results: dict[str, Any] = {}
    check_new_nodes()  # a node that joined since the last wave sees the run directory, or nothing runs
    waiting = [submit(name) for name in calls]
    while waiting:  # a failed call that may be retried is resubmitted at once, not after the others
        done, waiting = ray.wait(waiting, num_returns=1)
        name = names.pop(done[0])
        try:
            results[name] = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:  # the job raised: judge its own exception
            again = retries.failed(name, getattr(e, "cause", None) or e)
        except ray.exceptions.RayError as e:  # lost more than LOST_TASK_RETRIES times, or Ray gave up
            again = retries.failed(name, e)
        else:
            retries.succeeded(name)
            continue
        if again:
            check_new_nodes()  # a retry may land on a node that replaced a lost one
            waiting.append(submit(name))
    return results


def run_all(fn: Callable[..., Any], calls: Mapping[str, tuple], resources: Resources, retries: RetryPolicy,
            what: str) -> dict[str, Any]:
    """`run_tasks`, raising a `DtmError` that names every failed call (the finished ones are kept)."""
    results = run_tasks(fn, calls, resources, retries, what)
    if retries.failures:
        lines = "\n  ".join(f"{name}: {err}" for name, err in retries.failures.items())
        raise DtmError(f"{what}: {len(retries.failures)} of {len(calls)} tasks failed on the Ray cluster:\n  {lines}\n"
                       "finished outputs are kept; rerun to resume")
    return results
