"""Helper threads that let a merge read, compute and write at the same time.

A streaming merge does three things per chunk: read K inputs from disk, merge them, write the
result. Done in turn, the disk idles while the CPU computes and the CPU idles while the disk
reads. `Ahead` runs the reads on a thread a few items ahead of the compute; `Behind` runs the
writes on a thread behind it. Threads (not processes) suffice: `os.preadv`, file writes and
torch's copies and arithmetic release the GIL, so on 2 cores the three really overlap.

Both are bounded queues, so memory stays flat: at most `depth` finished items wait in a queue,
plus the one the producer is building and the one the consumer holds (`depth + 2` in all).
Both surface a failure in their thread (a corrupt input, a full disk) in the caller's thread
as the same exception, and neither can hang: a stopped consumer stops the producer, and a
failed writer keeps draining its queue so the caller never blocks on it.

Why not `concurrent.futures` for these two: an executor's queue is unbounded (memory would grow
with the model) and it does not keep a sequence of writes in order; what is needed is two small
queues. `Workers` (the compute of the methods that do more than a linear merge's arithmetic,
on several threads) does use an executor, but never submits more than `depth` jobs ahead of
the results it has handed out, in order.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_END = object()  # the end of a stream in a queue


class Ahead(Generic[T]):
    """Iterate `items` on a thread, at most `depth` items ahead of the consumer.

    `threaded=False` iterates in the caller's thread instead (same items, same order): the
    engine's switch for comparing outputs with and without the threads.
    Use as a context manager, so that a consumer that stops early also stops the thread.
    """

    def __init__(self, items: Iterator[T], depth: int = 2, threaded: bool = True):
        self._items = items
        self._threaded = threaded
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="dtm-merge-reader", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put((True, item)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put((False, e))
            return
        self._put((True, _END))

    def _put(self, entry: tuple[bool, Any]) -> bool:
        """Put unless the consumer has stopped (checked every 0.1 s, so a full queue never hangs us)."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if not self._threaded:
            return next(self._items)
        ok, item = self._queue.get()
        if not ok:
            self._queue.put((False, item))  # every later call raises it too
            raise item
        if item is _END:
            self._queue.put((True, _END))
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (if it is still producing) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Ahead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Behind:
    """Run calls on a thread in the order they are submitted, at most `depth` waiting.

    The first call that raises stops the others from running (they are dropped, the queue still
    drains); its exception is raised in the caller's thread by the next `submit` or by `finish`.
    `threaded=False` runs each call at once in the caller's thread.
    """

    def __init__(self, depth: int = 2, threaded: bool = True):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._dropping = False  # set by a failure or by `abort`: queued calls are skipped
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="dtm-merge-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _END:
                return
            if not self._dropping:
                fn, args = job
                try:
                    fn(*args)
                except BaseException as e:
                    self._error, self._dropping = e, True

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)`; raises the error of an earlier call, if one failed."""
        self._raise()
        if self._thread is None:
            fn(*args)
        else:
            self._queue.put((fn, args))

    def finish(self) -> None:
        """Wait until every submitted call has run; raises the first error."""
        self._join()
        self._raise()

    def abort(self) -> None:
        """Drop the calls still queued and wait for the one running (the caller is failing)."""
        self._dropping = True
        self._join()

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(_END)
            self._thread.join()
            self._thread = None


class Workers:
    """Run a stream of jobs on `threads` threads, at most `depth` of them submitted ahead of the
    results handed out, and hand the results out in submission order (`in_order`).

    `threads=0` runs each job in the caller's thread when its result is asked for (same results,
    same order). The jobs' iterator is advanced in the caller's thread only, so what it does to
    make a job (take the next chunk group from the reader) stays in order.
    """

    def __init__(self, threads: int = 0, depth: int = 2, initializer: Callable[[], Any] | None = None):
        self._depth = depth
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dtm-merge-compute", initializer=initializer) if threads else None

    def in_order(self, jobs: Iterator[Callable[[], T]]) -> Iterator[T]:
        """The jobs' results, in order. A job's exception is raised here, in order; a consumer
        that stops (or fails) cancels what has not started and waits for what has."""
        if self._pool is None:
            for job in jobs:
                yield job()
            return
        pending: deque[Future[T]] = deque()
        try:
            for job in jobs:
                pending.append(self._pool.submit(job))
                if len(pending) > self._depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            wait(pending)

    def close(self) -> None:
        """Wait for the threads to end (every stream has been consumed or closed by now)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
