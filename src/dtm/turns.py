"""Seed runs side by side in one process, taking turns (`pipeline.run_side_by_side`).

A cell's seed runs share one pool of worker processes (`executors.worker_pool`): each seed run
is a thread here that submits its training and evaluation jobs to the pool, so one seed run's
jobs fill the workers another leaves idle (the tail of a stage, a lone joint group, the work
done in this process). Only one of the threads runs code at a time: it holds the *turn*, and
gives it away only while it waits for its pool jobs (`wait_any`). So the work done here
(merges, Fishers, the token diagnostic, the seed runs' bookkeeping) never runs twice at once,
and process-global state (torch's thread count, the rich console, logging, warnings filters,
environment variables) is touched by one seed run at a time, exactly as in a sequential run.
The global random generators (torch's, numpy's, `random`'s) are each seed run's own: saved
when it gives its turn away, put back when it takes it again, and the same for every seed run
at its start, so no seed run draws numbers that depend on what another one drew or when.

Why one turn and not a lock per resource: the sections that touch global state are many and
small, and one rule ("a seed run runs here only with the turn") is checkable where a dozen
locks are not; the seed runs lose nothing by it, since their heavy work is in the pool.

Work whose numbers may depend on the thread it runs in (torch keeps OpenMP's and MKL's thread
settings per thread) runs in the driver's main thread on a seed run's behalf (`in_main_thread`,
`serve`), where the sequential run computes it.

A failed seed run tells the others to stop (`Turns.stop`): each cancels its jobs not yet
started, waits for those started (their work is kept, a rerun skips it) and raises `Stopped`
at its next wait or stage; the driver then raises the failure.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from typing import Any

POLL_SECONDS = 0.2  # how soon a seed run waiting on the pool sees that another one failed


class Stopped(Exception):
    """Raised in a seed run that stops because another seed run of its group failed (the driver
    raises that failure instead, never this)."""


def rng_state() -> tuple[Any, Any, Any]:
    """The global random generators' states: torch's (CPU), numpy's and `random`'s."""
    import numpy as np
    import torch

    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def set_rng_state(state: tuple[Any, Any, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


class Turns:
    """The turn of a group of seed runs side by side, the signal to stop, and the random
    generators' state every seed run of the group starts from (the driver's at its start)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.start_rng = rng_state()
        self.calls: queue.Queue = queue.Queue()  # `in_main_thread` calls for the driver (`serve`)


_here = threading.local()  # in a seed run's thread while it runs: .turns and .label


def _turns() -> Turns | None:
    return getattr(_here, "turns", None)


def active() -> bool:
    """Whether this thread is a seed run side by side with others (sharing the pool)."""
    return _turns() is not None


def label() -> str:
    """This seed run's label (`seed-2`, `control-nobias/seed-1`) beside others; '' otherwise."""
    return getattr(_here, "label", "") if active() else ""


@contextmanager
def taking_turns(turns: Turns, name: str) -> Iterator[None]:
    """Run the body (in its own thread) as the seed run `name` of the group: with the turn,
    except while `wait_any` waits on the pool."""
    turns.lock.acquire()
    _here.turns, _here.label = turns, name
    try:
        set_rng_state(turns.start_rng)
        yield
    finally:
        _here.turns = None
        turns.lock.release()


def check() -> None:
    """Raise `Stopped` in a seed run whose group was told to stop (another seed run failed)."""
    turns = _turns()
    if turns is not None and turns.stop.is_set():
        raise Stopped(label())


@contextmanager
def _turn_given_away(turns: Turns) -> Iterator[None]:
    """The body runs without the turn (it only waits); this seed run's random state is kept aside."""
    state = rng_state()
    turns.lock.release()
    try:
        yield
    finally:
        turns.lock.acquire()
        set_rng_state(state)


def wait_any(pending: set[Future]) -> tuple[set[Future], set[Future]]:
    """`concurrent.futures.wait(pending, return_when=FIRST_COMPLETED)` -> (done, not done). In a
    seed run beside others, with its turn given away meanwhile; told to stop, it cancels the
    futures not started, waits for the started ones and raises `Stopped`."""
    turns = _turns()
    if turns is None:
        done, rest = wait(pending, return_when=FIRST_COMPLETED)
        return done, rest
    with _turn_given_away(turns):
        while not turns.stop.is_set():
            done, rest = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            if done:
                return done, rest
        # a job not yet started is cancelled (a cancelled future counts as done only once its
        # executor reaches it: not waited for); a started one runs to its end
        wait([future for future in pending if not future.cancel()])
    raise Stopped(label())


def in_main_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, run for this seed run in the driver's thread (`serve`) while this one waits,
    holding its turn; called directly outside a group. For the work here whose numbers may depend
    on the thread it runs in (the merges, the Fishers, the token diagnostic: torch keeps OpenMP's
    thread settings per thread), which the sequential run computes in the main thread."""
    turns = _turns()
    if turns is None:
        return fn(*args)
    box: dict[str, Any] = {}
    done = threading.Event()
    turns.calls.put((fn, args, label(), box, done))
    done.wait()
    if "error" in box:
        raise box["error"]
    return box["value"]


def serve(turns: Turns, threads: list[threading.Thread]) -> None:
    """In the driver's (main) thread: run the seed runs' `in_main_thread` calls, each as its seed
    run (`active`, `label`), until every seed run's thread has ended."""
    while any(t.is_alive() for t in threads):
        try:
            fn, args, name, box, done = turns.calls.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
        _here.turns, _here.label = turns, name
        try:
            box["value"] = fn(*args)
        except Exception as e:  # raised in the seed run's thread
            box["error"] = e
        except BaseException as e:  # Ctrl-C: there, and here
            box["error"] = e
            raise
        finally:
            _here.turns = None
            done.set()
