"""Fused per-chunk kernels for TIES, DARE and TIES' threshold count, with torch as the fallback.

`methods.py` says what each method computes, as torch (and numpy) ops on whole tensors or
chunks. Those ops are each a full memory pass over K x 1 MiB and were most of a TIES or DARE
merge's time (several times a linear merge's arithmetic: docs/architecture.md, "Merging"). The kernels here (`_jit.py`, compiled by numba) compute the same float32
values, bit for bit, in one pass. Every function returns None where it does not apply (numba
missing or failing, `DTM_MERGE_KERNELS=0`, not float32, a layout it does not take); the caller
then runs the torch formulation, which stays the reference (tests/test_merge_kernels.py).

Why numba and not torch.compile (which the project has already): inductor's C++ kernels are
built with `-fno-signed-zeros` and its graph passes drop `x + 0.0`, while TIES' output bits
depend on signed zeros; and a dtm process would pay dynamo's and inductor's start-up on every merge
(measured in docs/architecture.md). Numba compiles from LLVM with IEEE semantics by default,
releases the GIL (`nogil`) so the engine's compute threads run kernels in parallel, and caches
the machine code; what it compiled lives in the user's cache directory
(`~/.cache/dtm/numba`, or numba's `NUMBA_CACHE_DIR`), never beside the source.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dtm.envflags import MERGE_KERNELS, env_flag

log = logging.getLogger("dtm.merging")

KERNELS_ENV = MERGE_KERNELS  # "0": torch's ops only (the reference path)


def _turned_off() -> bool:
    """`KERNELS_ENV` says torch's ops only."""
    return not env_flag(KERNELS_ENV, default=True)


def cache_dir() -> Path:
    """Where numba keeps the compiled kernels (unless `NUMBA_CACHE_DIR` says otherwise)."""
    return Path.home() / ".cache" / "dtm" / "numba"


_failed: list[str] = []  # why the kernels were given up in this process (empty: not given up)
_loading = threading.Lock()  # the compute threads may ask for the kernels at the same time


@functools.cache
def _load() -> ModuleType | None:
    """The compiled kernels' module, or None (numba missing, or turned off by `KERNELS_ENV`)."""
    if _turned_off():
        return None
    with _loading:
        try:
            import numba
        except ImportError:
            log.info("numba is not installed: TIES and DARE run on torch's ops (slower, same bytes)")
            return None
        old = numba.config.CACHE_DIR
        try:
            if not old:  # numba reads it when each kernel is defined: set it for ours only
                numba.config.CACHE_DIR = str(cache_dir())
            from dtm.merging import _jit
        except Exception as e:  # a numba that cannot build our kernels: fall back, say why
            log.warning("merge kernels unavailable (%s: %s): TIES and DARE run on torch's ops", type(e).__name__, e)
            return None
        finally:
            numba.config.CACHE_DIR = old
        return _jit


def preload(k: int, names: Sequence[str] = ("count_brackets", "ties_merge", "dare_merge")) -> None:
    """Import numba and load (or, the first time, compile) the kernels `names` for `k` models on a
    thread of their own, so that the merge's start (opening the inputs, TIES' samples, the first
    reads) overlaps it instead of the first chunk waiting for all of it. A failure here is left
    to the first real call, which reports it."""
    if _turned_off():
        return
    threading.Thread(target=_warm, args=(k, tuple(names)), name="dtm-kernels-preload", daemon=True).start()


def _warm(k: int, names: tuple[str, ...]) -> None:
    try:
        jit = _load()
        if jit is None or _failed:
            return
        xs, base = tuple(np.zeros(1, np.float32) for _ in range(k)), np.zeros(1, np.float32)
        f, i = np.zeros(k, np.float32), np.zeros(k, np.int64)
        if "count_brackets" in names:  # TIES' first pass: needed first
            jit.count_brackets(xs, base, f, f, i, i.copy(), i.copy(), np.zeros((k, 1), np.float32))
        if "ties_merge" in names:
            jit.ties_merge(xs, base, f, i - 1, f, np.float32(1), True, np.zeros(1, np.float32))
        if "dare_merge" in names:
            jit.dare_merge(xs, base, 0, i.astype(np.uint64), i, i, f, True, f, np.float32(1), True, False,
                           np.float32(1), np.zeros(1, np.float32))
    except Exception:  # the first real call reports it (and turns the kernels off)
        return


def available() -> bool:
    """Whether the fused kernels run in this process."""
    return not _failed and _load() is not None


def _run(kernel: str, *args: Any) -> bool:
    """Call `kernel`; False when it cannot run here (then the caller takes torch's path). A
    kernel that fails to compile turns them all off for the process, with a warning."""
    if _failed:
        return False
    jit = _load()
    if jit is None:
        return False
    try:
        getattr(jit, kernel)(*args)
    except Exception as e:
        if not _failed:
            _failed.append(f"{type(e).__name__}: {e}")
            log.warning("merge kernel %s failed (%s): TIES and DARE run on torch's ops", kernel, _failed[0])
        return False
    return True


def _arrays(parts: Sequence[Tensor], base: Tensor) -> tuple[tuple[np.ndarray, ...], np.ndarray] | None:
    """The chunks as numpy arrays (no copy) when they are what the kernels take: flat (or
    contiguous) float32 CPU tensors of one length."""
    n = base.numel()
    for t in (*parts, base):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != n:
            return None
    return tuple(p.reshape(-1).numpy() for p in parts), base.reshape(-1).numpy()


def _f32(values: Sequence[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def ties(parts: Sequence[Tensor], base: Tensor, trims: Sequence[tuple[float, int]], weights: Sequence[float],
         scaling: float, normalize: bool) -> Tensor | None:
    """`methods.ties` on one chunk: model i's trim (level, ties) (`Trim.kernel_trim`) zeroes
    |x_i - base| <= level (ties < 0), or keeps |x_i - base| > level and the first `ties` entries
    equal to it; then weighted, signs elected, the agreeing deltas summed (divided by their
    weights when `normalize`), times `scaling`, plus the base; float32, shaped like `base`."""
    arrays = _arrays(parts, base)
    if arrays is None:
        return None
    out = torch.empty_like(base)
    xs, b = arrays
    level, ties_kept = _f32([t[0] for t in trims]), np.array([t[1] for t in trims], dtype=np.int64)
    ok = _run("ties_merge", xs, b, level, ties_kept, _f32(weights), np.float32(scaling), bool(normalize),
              out.reshape(-1).numpy())
    return out if ok else None


def dare(parts: Sequence[Tensor], base: Tensor, start: int, keys: Sequence[int], densities: Sequence[float],
         rescale: bool, weights: Sequence[float], scaling: float, signed: bool, normalize: bool,
         total: float = 1.0) -> Tensor | None:
    """`methods.dare_ties` (`signed`) or `methods.dare_linear` on the chunk starting at element
    `start` of the tensor, model i's mask drawn from the SplitMix64 stream with key keys[i]
    (`methods.DareStream`); `total` is dare_linear's divisor when it normalises."""
    arrays = _arrays(parts, base)
    if arrays is None:
        return None
    mode, thr = [], []
    for d in densities:
        mode.append(0 if d <= 0 else 1 if d >= 1 else 2)
        thr.append(draw_threshold(d) if 0 < d < 1 else 0)
    out = torch.empty_like(base)
    xs, b = arrays
    ok = _run("dare_merge", xs, b, int(start), np.array(keys, dtype=np.uint64), np.array(thr, dtype=np.int64),
              np.array(mode, dtype=np.int64), _f32(densities), bool(rescale), _f32(weights), np.float32(scaling),
              bool(signed), bool(normalize), np.float32(total), out.reshape(-1).numpy())
    return out if ok else None


def draw_threshold(density: float) -> int:
    """The integer form of DARE's keep test: u < float32(density) for u = j / 2^24 (j the draw's
    top 24 bits) holds exactly when j < ceil(float32(density) * 2^24) (a power-of-two scaling,
    exact in double)."""
    return int(np.ceil(float(np.float32(density)) * 2.0**24))


def count_brackets(parts: Sequence[Tensor], base: Tensor, brackets: Sequence[tuple[Any, Any] | None]
                   ) -> list[tuple[int, int, np.ndarray | None] | None] | None:
    """`methods.count_bracket` of |x_i - base| for every model at once: per model, (entries
    above hi, entries in [lo, hi], their values in order, None when lo == hi), or None for a
    model without a bracket."""
    arrays = _arrays(parts, base)
    if arrays is None:
        return None
    k, n = len(parts), base.numel()
    mode = [0 if br is None else 2 if br[0] == br[1] else 1 for br in brackets]
    lo = _f32([0.0 if br is None else br[0] for br in brackets])
    hi = _f32([0.0 if br is None else br[1] for br in brackets])
    above = np.zeros(k, dtype=np.int64)
    size = np.zeros(k, dtype=np.int64)
    values = np.empty((k, n) if 1 in mode else (k, 0), dtype=np.float32)
    xs, b = arrays
    if not _run("count_brackets", xs, b, lo, hi, np.array(mode, dtype=np.int64), above, size, values):
        return None
    return [None if m == 0 else (int(above[i]), int(size[i]), values[i, :size[i]].copy() if m == 1 else None)
            for i, m in enumerate(mode)]
