"""`dtm.turns`: seed runs side by side take turns, keep their own random streams, and stop
cleanly when told (the pipeline's use of it: tests/test_side_by_side.py)."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch

from dtm import turns
from dtm.training import executors


def draws() -> list[float]:
    return [torch.rand(1).item(), float(np.random.rand()), random.random()]


def test_one_seed_run_runs_at_a_time_and_each_keeps_its_own_random_streams():
    group = turns.Turns()
    turns.set_rng_state(group.start_rng)
    alone = draws() + draws()  # what a seed run draws before and after a wait, with nobody else drawing
    jobs = ThreadPoolExecutor(2)
    running, most, seen = [0], [0], {}

    def section() -> None:
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.05)  # long enough for another thread to enter, were it allowed
        running[0] -= 1

    def seed_run(name: str) -> None:
        with turns.taking_turns(group, name):
            assert turns.active() and turns.label() == name
            section()
            first = draws()
            job = jobs.submit(time.sleep, 0.2)
            done, rest = turns.wait_any({job})  # the other seed run takes its turn (and draws) meanwhile
            assert done == {job} and not rest
            section()
            seen[name] = first + draws()

    threads = [threading.Thread(target=seed_run, args=(n,)) for n in ("seed-1", "seed-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs.shutdown()
    assert most[0] == 1
    assert seen == {"seed-1": alone, "seed-2": alone}
    assert not turns.active() and turns.label() == ""


def test_a_seed_run_told_to_stop_cancels_jobs_not_started_and_waits_for_started_ones():
    group = turns.Turns()
    queued, started = Future(), Future()
    assert started.set_running_or_notify_cancel()
    outcome = {}

    def seed_run() -> None:
        with turns.taking_turns(group, "seed-3"):
            try:
                turns.wait_any({queued, started})
            except turns.Stopped as e:
                outcome["stopped"] = str(e)
            outcome["started_done"] = started.done()

    thread = threading.Thread(target=seed_run)
    thread.start()
    time.sleep(0.3)
    group.stop.set()
    time.sleep(3 * turns.POLL_SECONDS)
    assert queued.cancelled() and thread.is_alive()  # still waiting for the job that started
    started.set_result(None)
    thread.join(5)
    assert not thread.is_alive() and outcome == {"stopped": "seed-3", "started_done": True}
    with turns.taking_turns(group, "seed-4"), pytest.raises(turns.Stopped):
        turns.check()  # and a seed run that has not begun a stage yet stops before it


def test_outside_a_group_waiting_is_plain_and_nothing_stops():
    job = Future()
    job.set_result(1)
    assert turns.wait_any({job}) == ({job}, set())
    turns.check()
    assert not turns.active()


def test_a_broken_pool_already_replaced_by_another_seed_run_is_not_discarded_twice():
    class Pool:
        def __init__(self) -> None:
            self.shut = False

        def shutdown(self, wait: bool, cancel_futures: bool) -> None:
            self.shut = True

    broken, fresh = Pool(), Pool()
    executors._POOLS[97] = fresh  # the seed run that saw the pool break first has replaced it
    try:
        executors.discard_pool(97, broken)  # the second seed run to see it broken
        assert executors._POOLS[97] is fresh and not fresh.shut
        executors.discard_pool(97, fresh)
        assert 97 not in executors._POOLS and fresh.shut
    finally:
        executors._POOLS.pop(97, None)


def test_work_that_takes_the_pool_cores_beside_other_seed_runs_waits_for_the_pools_jobs():
    """`pipeline.pool_cores` in a seed run side by side: computing on the pool's cores waits until
    the jobs in flight have finished (no new one can start: it holds the turn); an elementwise
    merge (`computes=False`) does not wait. The thread count is the sequential run's either way."""
    from dtm.pipeline import pool_cores

    if torch.cuda.is_available():
        pytest.skip("pool_cores gives threads on CPU only")
    group, jobs, seen = turns.Turns(), ThreadPoolExecutor(1), {}

    def seed_run() -> None:
        with turns.taking_turns(group, "seed-1"):
            torch.set_num_threads(1)
            job = executors.submit(jobs, time.sleep, 0.5)  # another seed run's job, say
            with pool_cores(2, computes=False):
                seen["merge"] = (job.done(), torch.get_num_threads())
            with pool_cores(2):
                seen["fisher"] = (job.done(), torch.get_num_threads())
            seen["after"] = torch.get_num_threads()

    thread = threading.Thread(target=seed_run)
    thread.start()
    thread.join(10)
    jobs.shutdown()
    assert seen == {"merge": (False, 2), "fisher": (True, 2), "after": 1}
