"""The numba kernels behind `kernels.py` (import them only through it: it sets the cache
directory and falls back to torch when numba is missing or fails).

Each kernel does in one pass over a chunk group what `methods.py` does in a dozen torch ops,
each a full pass over K x 1 MiB: the K inputs and the base are read once, the rest stays in
the L1 cache (blocks of `BLOCK` elements). The arithmetic is the torch formulation's, operation
for operation and in the same order, in float32: numba's default (no `fastmath`) keeps IEEE
semantics, so LLVM neither contracts a multiply and an add into an FMA nor reorders the sum over
models, and signed zeros and NaN propagate as in torch. tests/test_merge_kernels.py checks the
bits against the torch formulation.
"""

from __future__ import annotations

import numba
import numpy as np

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
TINY = np.float32(np.finfo(np.float32).tiny)
BLOCK = 512  # elements per block: K + 4 rows of 2 KiB, in L1

# SplitMix64 (Steele, Lea and Flood 2014): draw i of the stream with key k is mix64(k + (i + 1) * GAMMA)
GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
S27, S30, S31, S40 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(40)

JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)


@numba.njit(inline="always", **JIT)
def _top24(key, pos):  # type: ignore[no-untyped-def]
    """The top 24 bits of SplitMix64's draw number `pos` (0-based) of the stream with `key`."""
    z = key + np.uint64(pos + 1) * GAMMA
    z = (z ^ (z >> S30)) * MIX1
    z = (z ^ (z >> S27)) * MIX2
    z = z ^ (z >> S31)
    return np.int64(z >> S40)


@numba.njit(**JIT)
def _trimmed_row(x, base, drop, w, row):  # type: ignore[no-untyped-def]
    """row = w * hardshrink(x - base, drop) (|d| <= drop -> +0; a negative drop keeps all)."""
    for e in range(x.shape[0]):
        v = x[e] - base[e]
        if abs(v) <= drop:
            v = ZERO
        row[e] = v * w


@numba.njit(**JIT)
def _split_row(x, base, t, left, w, row):  # type: ignore[no-untyped-def]
    """row = w * (x - base) * keep, keep where |d| > t or, of the entries with |d| == t, the
    first `left` in order (`Trim.mask`: a chunk that splits the ties at the threshold); returns
    how many of those ties are still to be kept (the next block's `left`). As `delta * mask`
    (mask 1 or 0): +-0 where dropped, NaN stays NaN.

    A block keeps all of its ties or none of them but in one block of the chunk: those two
    cases are one vectorised pass each (the block's ties counted first); only the block where
    `left` runs out is walked tie by tie (the comparisons go either way at random around the
    threshold, so a loop that branches on them, or carries `left` through every element, is
    several times slower). The two passes stay two loops: one loop with an "every tie" flag
    was a quarter slower on a split bf16 chunk."""
    m = x.shape[0]
    equal = 0
    for e in range(m):
        equal += abs(x[e] - base[e]) == t
    if equal <= left:  # every tie of this block is kept: |d| >= t
        for e in range(m):
            v = x[e] - base[e]
            row[e] = (v * (ONE if abs(v) >= t else ZERO)) * w
        return left - equal
    if left == 0:  # none: |d| > t
        for e in range(m):
            v = x[e] - base[e]
            row[e] = (v * (ONE if abs(v) > t else ZERO)) * w
        return 0
    for e in range(m):  # the block where the kept ties run out
        v = x[e] - base[e]
        a = abs(v)
        keep = a > t
        if a == t and left > 0:
            keep = True
            left -= 1
        row[e] = (v * (ONE if keep else ZERO)) * w
    return left


@numba.njit(**JIT)
def _dare_row(x, base, pos0, key, thr, mode, dens, rescale, w, row):  # type: ignore[no-untyped-def]
    """row = w * dare_drop(x - base) for the elements from `pos0` of the tensor: mode 0 drops all
    (+0), 1 keeps all, 2 keeps where the draw's top 24 bits are < thr (u < density), rescaled
    by / density when `rescale`."""
    m = x.shape[0]
    if mode == 0:
        for e in range(m):
            row[e] = ZERO * w
    elif mode == 1:
        for e in range(m):
            row[e] = (x[e] - base[e]) * w
    elif rescale:
        for e in range(m):
            keep = ONE if _top24(key, pos0 + e) < thr else ZERO
            row[e] = (((x[e] - base[e]) * keep) / dens) * w
    else:
        for e in range(m):
            keep = ONE if _top24(key, pos0 + e) < thr else ZERO
            row[e] = ((x[e] - base[e]) * keep) * w


@numba.njit(**JIT)
def _sum_rows(rows, m, into):  # type: ignore[no-untyped-def]
    """into[:m] = rows[0, :m] + rows[1, :m] + ..., added in model order (the float order of
    `methods._combine`'s sum and of `elect_sign`'s)."""
    for e in range(m):
        into[e] = rows[0, e]
    for i in range(1, rows.shape[0]):
        r = rows[i]
        for e in range(m):
            into[e] = into[e] + r[e]


@numba.njit(**JIT)
def _signed_block(rows, base, normalize, w, scaling, sgn, acc, div, out):  # type: ignore[no-untyped-def]
    """TIES' sign election and agreeing (normalised) sum of the weighted deltas in `rows`, then
    lambda and the base, into `out` (`methods._agreeing_mean`, `_signed_merge`); rows has a row
    per model and at least out's length of columns, the work rows (sgn, acc, div) too."""
    k, m = rows.shape[0], out.shape[0]
    _sum_rows(rows, m, sgn)
    for e in range(m):
        sgn[e] = ONE if sgn[e] >= ZERO else -ONE  # copysign(1, sum + 0.0): -0 elects +
    w0 = w[0]
    r = rows[0]
    for e in range(m):
        a = r[e] * sgn[e]
        if a <= ZERO:  # relu, and -0 -> +0 (NaN stays NaN)
            a = ZERO
        acc[e] = a
        div[e] = w0 if a > ZERO else ZERO
    for i in range(1, k):
        wi = w[i]
        r = rows[i]
        for e in range(m):
            a = r[e] * sgn[e]
            if a <= ZERO:
                a = ZERO
            acc[e] = acc[e] + a
            div[e] = div[e] + (wi if a > ZERO else ZERO)
    if normalize:
        for e in range(m):
            d = div[e]
            acc[e] = acc[e] / (d if d > TINY else TINY)  # no agreeing model: 0 / tiny = +0
    for e in range(m):
        out[e] = ((acc[e] * sgn[e]) * scaling) + base[e]


@numba.njit(**JIT)
def ties_merge(xs, base, level, ties, w, scaling, normalize, out):  # type: ignore[no-untyped-def]
    """`methods.ties` on one chunk given each model's trim (`Trim.kernel_trim`): ties[i] < 0 zeroes
    |d| <= level[i]; ties[i] >= 0 keeps |d| > level[i] and the first ties[i] entries equal to it."""
    n = base.shape[0]
    k = len(xs)
    rows = np.empty((k, BLOCK), np.float32)
    sgn = np.empty(BLOCK, np.float32)
    acc = np.empty(BLOCK, np.float32)
    div = np.empty(BLOCK, np.float32)
    left = ties.copy()
    for s0 in range(0, n, BLOCK):
        s1 = min(n, s0 + BLOCK)
        b = base[s0:s1]
        for i in range(k):
            if ties[i] < 0:
                _trimmed_row(xs[i][s0:s1], b, level[i], w[i], rows[i])
            else:
                left[i] = _split_row(xs[i][s0:s1], b, level[i], left[i], w[i], rows[i])
        _signed_block(rows, b, normalize, w, scaling, sgn, acc, div, out[s0:s1])


@numba.njit(**JIT)
def dare_merge(xs, base, start, keys, thr, mode, dens, rescale, w, scaling, signed, normalize, total, out):  # type: ignore[no-untyped-def]
    """`methods.dare_ties` (`signed`) or `methods.dare_linear` on the chunk that starts at element
    `start` of the tensor; `total` is dare_linear's divisor when it normalises."""
    n = base.shape[0]
    k = len(xs)
    rows = np.empty((k, BLOCK), np.float32)
    sgn = np.empty(BLOCK, np.float32)
    acc = np.empty(BLOCK, np.float32)
    div = np.empty(BLOCK, np.float32)
    for s0 in range(0, n, BLOCK):
        s1 = min(n, s0 + BLOCK)
        b = base[s0:s1]
        o = out[s0:s1]
        for i in range(k):
            _dare_row(xs[i][s0:s1], b, start + s0, keys[i], thr[i], mode[i], dens[i], rescale, w[i], rows[i])
        if signed:
            _signed_block(rows, b, normalize, w, scaling, sgn, acc, div, o)
            continue
        m = s1 - s0
        _sum_rows(rows, m, acc)  # `methods._combine`: the weighted deltas summed in model order
        for e in range(m):
            q = acc[e]
            if normalize:
                q = q / total
            o[e] = (q * scaling) + b[e]


@numba.njit(**JIT)
def count_brackets(xs, base, lo, hi, mode, above, size, values):  # type: ignore[no-untyped-def]
    """`methods.count_bracket` of |x_i - base| for every model i at once: mode 0 skips model i,
    1 counts above hi[i] and copies the values in [lo[i], hi[i]] to values[i, :size[i]] (in
    order), 2 (lo == hi) counts above and equal only."""
    n = base.shape[0]
    for i in range(len(xs)):
        x = xs[i]
        lo_i, hi_i = lo[i], hi[i]
        n_above = 0
        n_in = 0
        if mode[i] == 2:
            for e in range(n):
                a = abs(x[e] - base[e])
                n_above += a > hi_i
                n_in += a == hi_i
        elif mode[i] == 1:
            row = values[i]
            for e in range(n):
                a = abs(x[e] - base[e])
                n_above += a > hi_i
                row[n_in] = a  # kept only if inside: the next one overwrites it otherwise
                n_in += (a >= lo_i) & (a <= hi_i)
        above[i] = n_above
        size[i] = n_in
