"""Training K sub-models: local (in turn, side by side in processes) and on real local Ray."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtm.config import ExperimentConfig
from dtm.data.template import conversation
from dtm.dispersal import disperse, portion_path
from dtm.io import atomic_write_jsonl
from dtm.rundir import COMPLETE_FILE
from dtm.training import TrainingError, is_complete, train, train_jobs

torch.set_num_threads(1)


def tiny_config(base: Path, **train_keys) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=5)
    cfg.model.model_name_or_path = str(base)
    cfg.data.cutoff_len = 64
    # the executors under test run every model alone (the joint executor, the default, has tests of its own)
    settings = {"executor": "local", "max_steps": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "warmup_steps": 0, "learning_rate": 1e-2, "logging_steps": 2, "save_steps": 100}
    for k, v in (settings | train_keys).items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module")
def portions(tmp_path_factory) -> Path:
    data = [conversation(f"What is {i} times 2?", f"It is {2 * i}.", id=str(i)) for i in range(32)]
    out = tmp_path_factory.mktemp("run") / "portions"
    disperse(data, k=2, out=out, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def local_models(base_dir, portions, tmp_path_factory) -> list[Path]:
    """K=2 sub-models trained one after another (the reference for the other executors)."""
    return train(tiny_config(base_dir), portions, tmp_path_factory.mktemp("local") / "models")


def adapter(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "adapter_model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = adapter(a), adapter(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_local_trains_every_portion_and_skips_finished_ones(local_models, base_dir, portions):
    assert [p.name for p in local_models] == ["sub-1", "sub-2"]
    assert all(is_complete(p) for p in local_models)
    assert not same_weights(*local_models)  # different portions, different sub-models
    stamps = [(p / COMPLETE_FILE).stat().st_mtime_ns for p in local_models]
    assert train(tiny_config(base_dir), portions, local_models[0].parent) == local_models
    assert [(p / COMPLETE_FILE).stat().st_mtime_ns for p in local_models] == stamps


def test_side_by_side_processes_match_the_sequential_run(local_models, base_dir, portions, tmp_path):
    models = train(tiny_config(base_dir, num_workers=2), portions, tmp_path / "models")
    for a, b in zip(models, local_models, strict=True):
        assert same_weights(a, b)


def test_a_failed_sub_model_is_reported_by_name_and_the_others_finish(base_dir, portions, tmp_path):
    bad = tmp_path / "portions"
    bad.mkdir()
    for i in range(2):
        (bad / portion_path(bad, i).name).write_text(portion_path(portions, i).read_text())
    long = conversation("word " * 200, "answer", id="long")  # nothing left after cutoff_len=64
    atomic_write_jsonl(portion_path(bad, 1), [long.to_record()])
    with pytest.raises(TrainingError, match=r"(?s)1 of 2 models failed.*sub-2: .*no example left to train on"):
        train(tiny_config(base_dir), bad, tmp_path / "models")
    assert is_complete(tmp_path / "models" / "sub-1") and not is_complete(tmp_path / "models" / "sub-2")


def test_train_jobs_applies_overrides_seeds_and_baselines(base_dir, portions, tmp_path):
    jobs = {
        "short": {"data": str(portion_path(portions, 0)), "seed": 5, "train": {"max_steps": 2, "save_fractions": [1.0]},
                  "val_data": str(portion_path(portions, 1))},
        "l2": {"data": str(portion_path(portions, 0)), "seed": 6, "train": {}, "baseline": "l2"},
    }
    seconds = train_jobs(tiny_config(base_dir), base_dir, jobs, tmp_path / "models")
    assert set(seconds) == {"short", "l2"} and all(s > 0 for s in seconds.values())
    short = json.loads((tmp_path / "models" / "short" / COMPLETE_FILE).read_text())
    l2 = json.loads((tmp_path / "models" / "l2" / COMPLETE_FILE).read_text())
    assert (short["steps"], short["seed"], short["regularizer"]) == (2, 5, None)
    fractions = json.loads((tmp_path / "models" / "short" / "fractions" / "fractions.json").read_text())
    assert [r["step"] for r in fractions] == [0, 2] and all("val_loss" in r for r in fractions)
    assert (l2["steps"], l2["seed"], l2["regularizer"]) == (4, 6, "l2")


def test_ray_sub_models_match_the_local_executor(local_models, base_dir, portions, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = tiny_config(base_dir, executor="ray", num_cpus_per_model=1, num_gpus_per_model=0)
        models = train(cfg, portions, tmp_path / "models")
    finally:
        ray.shutdown()
    for a, b in zip(models, local_models, strict=True):
        assert is_complete(a) and same_weights(a, b)


def test_a_crashed_training_is_retried_and_resumes_from_its_checkpoint(base_dir, portions, tmp_path):
    from transformers import TrainerCallback

    from dtm.training.executors import Job, Retries
    from dtm.training.sft import train_model

    class CrashOnce(TrainerCallback):
        crashed = False

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3 and not CrashOnce.crashed:
                CrashOnce.crashed = True
                raise RuntimeError("worker lost")

    job = Job("sub-1", portion_path(portions, 0), tmp_path / "sub-1", 5)
    cfg = tiny_config(base_dir, save_steps=2)
    err = Retries(1).run(job.name, lambda: train_model(base_dir, job.data, job.out, cfg, progress=False, callbacks=[CrashOnce()]))
    assert err is None and CrashOnce.crashed
    assert json.loads((job.out / COMPLETE_FILE).read_text())["resumed_from_step"] == 2


def test_a_resumed_attempt_records_the_steps_it_redoes(base_dir, portions, tmp_path):
    """Killed at step 4 (logged up to 3, checkpoint at 2): the next attempt resumes from 2 and
    records 1 step redone, which the train stage reports; the finished model has no double rows."""
    from transformers import TrainerCallback

    from dtm.rundir import attempts_file, train_log
    from dtm.training.executors import Job, redone_steps, run_job
    from dtm.training.sft import train_model

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                raise RuntimeError("node lost")

    job = Job("sub-1", portion_path(portions, 0), tmp_path / "sub-1", 5)
    cfg = tiny_config(base_dir, save_steps=2, logging_steps=1)
    with pytest.raises(RuntimeError):
        train_model(base_dir, job.data, job.out, cfg, progress=False, callbacks=[Crash()])
    run_job(job, cfg, str(base_dir), progress=False)
    rows = [json.loads(line) for line in attempts_file(job.out).read_text().splitlines()]
    assert [(r["resumed_from_step"], r["redone_steps"]) for r in rows] == [(2, 1)]
    assert redone_steps([job.out, tmp_path / "never-interrupted"]) == {"sub-1": 1}
    assert [json.loads(line)["step"] for line in train_log(job.out).read_text().splitlines()] == [1, 2, 3, 4]


def test_one_retry_policy_never_retries_user_errors():
    from dtm.errors import DataError
    from dtm.training.executors import Retries

    calls = []

    def flaky():
        calls.append(1)
        raise RuntimeError("worker lost")

    def bad_data():
        calls.append(2)
        raise DataError("portion-2.jsonl:3: no response")

    retries = Retries(2)
    assert retries.run("sub-1", flaky) == "RuntimeError: worker lost" and calls == [1, 1, 1]  # 1 + 2 attempts
    assert retries.run("sub-2", bad_data) == "portion-2.jsonl:3: no response" and calls[3:] == [2]  # never retried
    assert retries.failures == {"sub-1": "RuntimeError: worker lost", "sub-2": "portion-2.jsonl:3: no response"}
    assert retries.failed("sub-3", RuntimeError("x")) and retries.failed("sub-3", RuntimeError("x"))
    assert not retries.failed("sub-3", RuntimeError("x"))
    retries.succeeded("sub-3")
    assert "sub-3" not in retries.failures


def test_a_broken_pool_is_replaced():
    import signal

    from dtm.training.executors import discard_pool, worker_pool

    pool = worker_pool(1)
    pid = pool.submit(os.getpid).result()
    future = pool.submit(time_sleep, 30)
    os.kill(pid, signal.SIGKILL)
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool):
        future.result(timeout=60)
    fresh = worker_pool(1)
    assert fresh is not pool and fresh.submit(os.getpid).result() != pid
    discard_pool(1)


def time_sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def _torch_threads() -> int:
    return torch.get_num_threads()


def test_pool_workers_really_run_one_torch_thread():
    # the evaluation pool runs no training code that would set it: the initializer must
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from dtm.training.executors import one_thread_worker

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=one_thread_worker) as pool:
        assert pool.submit(_torch_threads).result() == 1


def test_worker_pool_is_shared_until_discarded():
    from dtm.training.executors import discard_pool, worker_pool

    pool = worker_pool(3)
    assert worker_pool(3) is pool  # one start-up per run, not per stage
    pids = {pool.submit(os.getpid).result() for _ in range(3)}
    assert os.getpid() not in pids and pool.submit(_torch_threads).result() == 1
    discard_pool(3)
    assert worker_pool(3) is not pool
    discard_pool(3)


@pytest.mark.slow  # kills a whole run process and waits for its pool workers to go: ~10-15 s, the integration tier
def test_pool_workers_end_when_the_run_is_killed(tmp_path):
    import signal
    import subprocess
    import time

    script = ("import os, sys, time\n"
              "from dtm.training.executors import worker_pool\n"
              "if __name__ == '__main__':\n"
              "    print(worker_pool(1).submit(os.getpid).result(), flush=True)\n"
              "    time.sleep(60)\n")
    (tmp_path / "run.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(50):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the pool worker outlived its killed parent")


def test_longest_jobs_start_first(tmp_path):
    from dtm.training.executors import Job, expected_cost

    cfg = ExperimentConfig()
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text("x" * 100)
    big.write_text("x" * 400)
    sub = Job("sub-1", small, tmp_path / "a", 1)
    vanilla = Job("vanilla", big, tmp_path / "b", 1)
    short = Job("short", big, tmp_path / "c", 1, {"num_train_epochs": cfg.train.num_train_epochs / 4})
    jobs = sorted([sub, short, vanilla], key=lambda j: -expected_cost(j, cfg))
    assert jobs[0].name == "vanilla"
    assert expected_cost(vanilla, cfg) == 4 * expected_cost(sub, cfg) == 4 * expected_cost(short, cfg)


def test_dtm_train_gives_each_sub_model_its_share_of_max_steps(tmp_path):
    from dtm.config import load_config
    from dtm.training.executors import plan_sub_models

    for i in (1, 2, 3):
        (tmp_path / f"portion-{i}.jsonl").write_text("{}\n")
    cfg = load_config(None, ["train.max_steps=10", "disperse.k=4"], check_paths=False)  # three portions on disk, not k
    jobs = plan_sub_models(cfg, tmp_path, tmp_path / "models")
    assert [(j.name, j.train_overrides["max_steps"]) for j in jobs] == [("sub-1", 3), ("sub-2", 3), ("sub-3", 3)]


def test_pool_workers_started_from_a_thread_outlive_the_thread():
    """Seed runs side by side start the pool's workers from their threads, which end before the
    run: a worker must not die with the thread that started it (PR_SET_PDEATHSIG did)."""
    import threading
    import time

    from dtm.training.executors import discard_pool, worker_pool

    discard_pool(4)
    pids = []
    thread = threading.Thread(target=lambda: pids.append(worker_pool(4).submit(os.getpid).result()))
    thread.start()
    thread.join()
    time.sleep(1.5)  # the old PR_SET_PDEATHSIG's SIGTERM came at once
    try:
        assert worker_pool(4).submit(os.getpid).result(timeout=60) == pids[0]
    finally:
        discard_pool(4)
