"""Merge methods: small pure functions on one tensor name across K models, and their registry.

Every method takes the K models' tensors for one name (already in the compute dtype), one
weight per model and, where the method needs it, the base model's tensor, and returns the
merged tensor. Every method is elementwise once its per-model state is known (TIES: `trims`,
DARE: `generators`), so the streaming engine (`engine.py`) calls it on chunks of one tensor.

Names and parameters follow mergekit where it has the method (`linear`, `task_arithmetic`,
`ties`, `dare_linear`, `dare_ties`; `weight`, `density`, `lambda`), so a mergekit user's YAML
reads the same. References:
  task arithmetic  Ilharco et al. 2023, "Editing models with task arithmetic"
  WiSE-FT          Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"
  TIES             Yadav et al. 2023, "TIES-Merging"
  DARE             Yu et al. 2024, "Language models are Super Mario"
  Fisher merging   Matena & Raffel 2022, "Merging models with Fisher-weighted averaging"
  model soups      Wortsman et al. 2022, "Model soups"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dtm.merging import kernels

# ---------------------------------------------------------------- building blocks


def weighted_average(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k w_k x_k / sum_k w_k, accumulated in place (one output buffer, no stacking).

    The accumulation order and rounding (x_0 w_0, then `addcmul_` of each next model, then one
    division by the weight sum) are the same as mergekit's `linear`, so results agree bitwise.
    """
    total = float(sum(weights))
    out = torch.mul(tensors[0], weights[0])
    for x, w in zip(tensors[1:], weights[1:]):
        out.addcmul_(x, torch.tensor(w, dtype=out.dtype))
    return out.div_(total)


def per_model(value: float | Sequence[float], k: int, what: str = "density") -> list[float]:
    """A parameter given once for all models or once per model (mergekit allows both for density)."""
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"{what}: got {len(value)} values for {k} models; give one, or one per model")
        return [float(v) for v in value]
    return [float(value)] * k


def keep_count(numel: int, density: float) -> int:
    """How many entries TIES keeps: int(density * n), at least one when density > 0 (as mergekit)."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


@dataclass
class Trim:
    """TIES step 1 for one task vector, as a magnitude threshold that can be applied chunk by chunk.

    Keeps every entry with |d| > `threshold` and, of the entries with |d| == `threshold`, the first
    `ties` in flat order: exactly `keep_count` entries, the ones a stable sort by descending
    magnitude puts first (mergekit's `argsort(|d|, descending)[:k]`). Chunks must be masked in
    order, each once: `mask` and `apply` consume the ties they keep. `equal` counts the entries
    with |d| == `threshold` not yet seen: while it equals `ties`, all of them are kept.
    """

    threshold: float
    ties: int = 0
    keep_all: bool = False
    equal: int = 0
    below: float | None = None  # the next float below `threshold` in the task vector's dtype

    def mask(self, delta: Tensor) -> Tensor:
        """Boolean mask of the kept entries of the next chunk of the (flat or whole) task vector."""
        if self.keep_all:
            return torch.ones_like(delta, dtype=torch.bool)
        a = delta.abs()
        keep = a > self.threshold
        if self.ties > 0:
            eq = (a == self.threshold).reshape(-1)
            n_eq = int(eq.sum())
            self.equal = max(0, self.equal - n_eq)
            if n_eq <= self.ties:
                keep.reshape(-1)[eq] = True
                self.ties -= n_eq
            else:
                flat = keep.reshape(-1)
                flat[eq.nonzero().reshape(-1)[: self.ties]] = True
                keep = flat.reshape(keep.shape)
                self.ties = 0
        return keep

    def apply(self, delta: Tensor) -> Tensor:
        """`delta * mask(delta)`, bit for bit up to the sign of a dropped zero (`hardshrink` gives
        +0 where the mask gives ±0; TIES' sum and agreeing mean cannot tell them apart, which the
        fast-path test checks on the merged bits).

        Why not `mask`: torch's comparisons into bool tensors and bool-masked writes run
        unvectorised on CPU, 5-50x slower than float ops, and made TIES 5x a linear merge. Unless
        the ties at the threshold must be split by position (some kept, some not: then `mask`),
        the trim keeps |d| > t (no tie left to keep) or |d| >= t, i.e. > the next float below t
        (all kept): one `F.hardshrink` (x where |x| > lambda, else 0) in float.
        """
        if self.keep_all:
            return delta
        below = self.below
        if below is None:
            t = torch.tensor(self.threshold, dtype=delta.dtype)
            below = self.below = float(torch.nextafter(t, torch.tensor(-math.inf, dtype=delta.dtype)))
        if 0 < self.ties < self.equal:
            kept = F.hardshrink(delta, self.threshold)
            if not torch.equal(kept, _shrink(delta, below)):  # an entry of this chunk sits at t
                return delta * self.mask(delta)
            return kept
        return _shrink(delta, below if self.ties > 0 else self.threshold)

    def kernel_trim(self, dtype: torch.dtype) -> tuple[float, int]:
        """`apply`/`mask` as (level, ties) for the fused kernel (`kernels.ties`): ties < 0 zeroes
        the entries with |d| <= level (a negative level keeps all, -0 and NaN included); ties >= 0
        (a chunk that splits the ties at the threshold) keeps |d| > level and the first `ties`
        entries with |d| == level, in order."""
        if self.keep_all:
            return -math.inf, -1
        if 0 < self.ties < self.equal:
            return self.threshold, self.ties
        if self.ties == 0:
            return self.threshold, -1
        if self.below is None:
            t = torch.tensor(self.threshold, dtype=dtype)
            self.below = float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)))
        return self.below, -1


def _shrink(delta: Tensor, threshold: float) -> Tensor:
    """Entries with |d| > threshold (the others 0); a negative threshold (the float below 0)
    keeps everything."""
    return delta if threshold < 0 else F.hardshrink(delta, threshold)


@dataclass(frozen=True)
class ChunkedTrim:
    """One model's TIES trim of one tensor merged in chunks, as a `Trim` per chunk that needs no
    state from the chunks before it (so chunks can be merged in any order, on several threads).

    It is `magnitude_trim`'s trim exactly: keep |d| > `threshold`, and of the entries with
    |d| == `threshold` the first `ties` in flat order. `split` says, per chunk, (how many of its
    tied entries are kept, how many it has); None when no tie is split (all kept or none), where
    every chunk behaves the same.
    """

    threshold: float
    below: float | None  # the next float below `threshold` (None: `Trim.apply` works it out)
    ties: int = 0
    equal: int = 0
    split: tuple[tuple[int, int], ...] | None = None
    keep_all: bool = False

    @classmethod
    def of(cls, trim: Trim, equal_per_chunk: Sequence[int] | None = None) -> ChunkedTrim:
        """From a whole-tensor `Trim`; `equal_per_chunk` (each chunk's count of |d| == threshold)
        is needed only when the tie is split (0 < ties < equal)."""
        if trim.keep_all:
            return cls(0.0, 0.0, keep_all=True)
        split = None
        if 0 < trim.ties < trim.equal:
            if equal_per_chunk is None or sum(equal_per_chunk) != trim.equal:
                raise ValueError("a split tie needs each chunk's count of entries at the threshold")
            left, pairs = trim.ties, []
            for e in equal_per_chunk:
                kept = min(e, left)
                pairs.append((kept, e))
                left -= kept
            split = tuple(pairs)
        return cls(trim.threshold, trim.below, trim.ties, trim.equal, split)

    def chunk(self, j: int) -> Trim:
        """The trim of chunk j (a fresh `Trim`: `mask` consumes its ties)."""
        if self.keep_all:
            return Trim(0.0, keep_all=True)
        ties, equal = self.split[j] if self.split is not None else (self.ties, self.equal)
        return Trim(self.threshold, ties=ties, equal=equal, below=self.below)


def magnitude_trim(scratch: Tensor, density: float) -> Trim:
    """The exact top-k threshold of one task vector from `scratch` = |delta| flattened.

    `scratch` is used as work space (reordered in place by a selection, numpy's introselect),
    so the only memory is that one tensor: no sort, no index tensor, no copy.
    """
    n = scratch.numel()
    k = keep_count(n, density)
    if k >= n:
        return Trim(0.0, keep_all=True)
    if k == 0:
        return Trim(math.inf)
    arr = scratch.reshape(-1).numpy()
    arr.partition(n - k)  # arr[n - k] is the k-th largest; everything after it is >= it
    t = arr[n - k]
    greater = int(np.count_nonzero(arr[n - k + 1:] > t))
    return Trim(float(t), ties=k - greater, equal=int(np.count_nonzero(arr == t)),
                below=float(np.nextafter(t, t.dtype.type(-np.inf))))


# TIES' threshold without a whole-tensor selection. A sample of |d| brackets the k-th largest
# value, [lo, hi]; one counting pass over the chunks counts the entries above hi and keeps the
# few inside the bracket; the exact threshold is then selected among those. Exact by
# construction: when the counts show the k-th largest outside the bracket (an unlucky sample),
# the caller falls back to `magnitude_trim` on the whole task vector. Why not only that: its
# selection is ~4 ns per element and model on one thread, over a scratch copy of the tensor;
# the counting pass is a few vectorised numpy comparisons per chunk while the chunk is in
# cache, splits over threads, and needs no scratch tensor.
SAMPLE_PIECES = 64  # places a sample is read from, spread evenly over the tensor
SAMPLE_PIECE = 1024  # elements read at each place (for tensors of 512K elements and more)
BRACKET_SIGMAS = 8.0  # the bracket's half width: this many binomial std of the sample rank, plus
BRACKET_SLACK = 1 / 256  # this fraction of the sample (pieces are contiguous, not independent draws)
BRACKET_ROOM = 8  # give up on the bracket (fall back) when more than n / this many entries fall inside


def sample_ranges(n: int) -> list[tuple[int, int]]:
    """Where to read a tensor's threshold sample: (start, length) of `SAMPLE_PIECES` pieces, evenly
    spread, at most n / 8 elements in all."""
    piece = max(1, min(SAMPLE_PIECE, n // (8 * SAMPLE_PIECES)))
    return [((j * (n - piece)) // (SAMPLE_PIECES - 1), piece) for j in range(SAMPLE_PIECES)]


def bracket(sample: np.ndarray, n: int, keep: int) -> tuple[Any, Any]:
    """Two values of `sample` (|d| at the sample places) that very likely enclose the `keep`-th
    largest of all n entries: the sample's order statistics a few standard deviations either side
    of where that rank falls in the sample. A side that reaches the sample's end is open (0 or
    inf), so a density near 0 or 1 cannot miss there. Reorders `sample`."""
    s = sample.size
    q = (n - keep) / n  # the threshold's rank from the bottom, as a fraction
    at = q * (s - 1)
    half = math.ceil(BRACKET_SIGMAS * math.sqrt(s * q * (1 - q)) + BRACKET_SLACK * s) + 1
    lo_i, hi_i = max(0, math.floor(at) - half), min(s - 1, math.ceil(at) + half)
    sample.partition(sorted({lo_i, hi_i}))
    kind = sample.dtype.type
    return (kind(0) if lo_i == 0 else sample[lo_i]), (kind(np.inf) if hi_i == s - 1 else sample[hi_i])


@dataclass
class BracketCount:
    """One chunk's count for the bracket [lo, hi]: entries above hi, and the entries inside it
    (their values; only their number when lo == hi, as they are all equal)."""

    above: int
    size: int
    values: np.ndarray | None = None


def count_bracket(a: np.ndarray, lo: Any, hi: Any) -> BracketCount:
    """Count one chunk of |d| against the bracket (numpy's comparisons are vectorised; torch's
    comparisons into bool tensors are not, see `Trim.apply`)."""
    above = int(np.count_nonzero(a > hi))
    if lo == hi:
        return BracketCount(above, int(np.count_nonzero(a == hi)))
    inside = a[(a >= lo) & (a <= hi)]
    return BracketCount(above, inside.size, inside)


def count_brackets(parts: Sequence[Tensor], base: Tensor, brackets: Sequence[tuple[Any, Any] | None]
                   ) -> list[BracketCount | None]:
    """`count_bracket` of |x_i - base| for each model i with a bracket (None for the others):
    one fused kernel pass over the chunk group where it runs (`kernels.count_brackets`), else
    torch's difference and numpy's count per model. The same counts and values either way."""
    fused = kernels.count_brackets(parts, base, brackets)
    if fused is not None:
        return [None if c is None else BracketCount(*c) for c in fused]
    return [None if br is None else count_bracket(torch.sub(x, base).abs_().numpy(), *br)
            for x, br in zip(parts, brackets)]


def select_in_bracket(counts: Sequence[BracketCount], keep: int, lo: Any, hi: Any) -> ChunkedTrim | None:
    """The exact trim keeping the `keep` largest entries, from every chunk's `BracketCount` (in
    chunk order); None when the `keep`-th largest is not inside the bracket (fall back)."""
    above = sum(c.above for c in counts)
    size = sum(c.size for c in counts)
    need = keep - above  # the threshold is the need-th largest entry inside the bracket
    if not 0 < need <= size:
        return None
    if lo == hi:
        t, greater, equal = lo, above, [c.size for c in counts]
    else:
        values = np.concatenate([c.values for c in counts if c.values is not None])
        at = size - need
        values.partition(at)
        t = values[at]
        greater = above + int(np.count_nonzero(values[at + 1:] > t))
        equal = [int(np.count_nonzero(c.values == t)) if c.values is not None else 0 for c in counts]
    below = float(np.nextafter(t, t.dtype.type(-np.inf)))
    return ChunkedTrim.of(Trim(float(t), ties=keep - greater, equal=sum(equal), below=below), equal)


def trim(delta: Tensor, density: float) -> Tensor:
    """TIES step 1: keep the `density` fraction of entries with the largest magnitude, zero the rest.

    At least one entry survives in a non-empty tensor when density > 0 (as in mergekit); ties at
    the threshold are broken by position (first in flat order).
    """
    t = magnitude_trim(delta.abs().reshape(-1), density)
    return t.apply(delta)


def elect_sign(deltas: Sequence[Tensor] | Tensor) -> Tensor:
    """TIES step 2: per entry, the sign (+1/-1) of the summed deltas: the sign with more total mass.

    `deltas` are the K weighted deltas (a list, or stacked [K, ...]). A zero sum elects +1 (as
    mergekit does).
    """
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def disjoint_mean(deltas: Sequence[Tensor] | Tensor, weights: Sequence[float] | Tensor, sign: Tensor,
                  normalize: bool = True) -> Tensor:
    """TIES step 3: sum of the weighted deltas that agree with the elected sign, divided (if
    `normalize`) by the summed weights of those models (mergekit's `ties`; PEFT divides by their
    count instead, the same for unit weights). Entries where no model agrees stay 0. Accumulates
    model by model, so the extra memory is two tensors, not K.
    """
    total = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign) if normalize else None
    for d, w in zip(deltas, weights):
        agree = (torch.sign(d) == sign).to(d.dtype)
        total.addcmul_(d, agree)
        if divisor is not None:
            divisor.add_(agree.mul_(w))
    if divisor is None:
        return total
    divisor[divisor == 0] = 1
    return total.div_(divisor)


def dare_drop(delta: Tensor, density: float, generator: DareStream | torch.Generator, rescale: bool = True,
              start: int = 0) -> Tensor:
    """DARE: drop each entry with probability p = 1 - density, rescale survivors by 1 / (1 - p).

    The rescale keeps the expected delta unchanged entry by entry (the DARE paper's choice;
    mergekit instead rescales to the tensor's L1 norm, which needs the whole tensor). The mask
    draws one float32 uniform per entry: from a `DareStream` (the engine's), the draws of
    elements [start, start + n) of the task vector, the same whichever chunks ask, in any order;
    from a plain `torch.Generator`, its next n draws.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if isinstance(generator, DareStream):
        u = generator.uniform(start, delta.numel()).reshape(delta.shape)
    else:
        u = torch.rand(delta.shape, generator=generator, dtype=torch.float32)
    # 1.0 where u < density, else 0.0, in float ops (a bool mask runs unvectorised, see
    # `Trim.apply`): the rounded density - u is > 0 exactly when u < density (fp32 subtraction
    # keeps the sign of the exact difference), so this is `(u < density).to(dtype)` bit for bit.
    keep = torch.rsub(u, density).relu_().sign_()
    out = delta * keep.to(delta.dtype)
    return out.div_(density) if rescale else out


# SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014):
# draw i of the stream with key k is mix64(k + (i + 1) * GOLDEN). `_jit._top24` is the same
# function in the fused DARE kernel.
GOLDEN = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MASK64 = (1 << 64) - 1


def mix64(z: int) -> int:
    """SplitMix64's output function (a bijection of 64-bit integers with full avalanche)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class DareStream:
    """The uniform draws behind one model's DARE mask for one tensor, by position.

    Element i's draw is a function of (the stream's key, i) alone: the top 24 bits of SplitMix64's
    draw number i, as a float32 in [0, 1) on the 2^-24 grid (what `torch.rand` gives in float32
    too). So a chunk's mask does not depend on the chunks before it (the engine merges chunks on
    several threads and gets the masks of a one-thread, whole-tensor merge), and the fused DARE
    kernel (`kernels.dare`) computes each draw where it uses it, with no array of draws (numpy's
    PCG64 arrays, session 8's, were most of DARE's arithmetic; docs/architecture.md, "Merging").
    The key is mix64(seed), so streams of neighbouring seeds (the K models of a tensor) share no
    structure. **Session 9 changed the masks** (as session 8 did, from torch's Mersenne twister
    to PCG64): the same seed now draws other masks; kept fraction and rescale are unchanged
    (tests/test_merge_kernels.py checks the draws' uniformity and independence).
    """

    seed: int

    @property
    def key(self) -> int:
        return mix64(self.seed)

    def uniform(self, start: int, n: int) -> Tensor:
        """Float32 draws of elements [start, start + n) (numpy; the kernel computes the same)."""
        z = np.arange(start + 1, start + n + 1, dtype=np.uint64) * np.uint64(GOLDEN) + np.uint64(self.key)
        z ^= z >> np.uint64(30)
        z *= np.uint64(MIX1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(MIX2)
        z ^= z >> np.uint64(31)
        return torch.from_numpy((z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24))


def model_generators(seed: int, name: str, k: int) -> list[DareStream]:
    """One DARE stream per model for tensor `name`: a merge is reproducible in any tensor order and
    any chunking (each model's mask is its own stream)."""
    base = tensor_seed(seed, name)
    return [DareStream(base + i) for i in range(k)]


def _weight_total(weights: Sequence[float]) -> float:
    """The divisor of a normalised sum: sum_k w_k, or 1 where it is ~0 (mergekit's guard)."""
    total = float(sum(weights))
    return total if abs(total) >= 1e-8 else 1.0


def _agreeing_weights(weights: Sequence[float], normalize: bool, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `_signed_merge` may take `_agreeing_mean` (what the fused kernels compute too): no
    normalising, or every weight positive in `dtype` (with a weight <= 0, divisors may cancel)."""
    tiny = float(torch.finfo(dtype).tiny)
    return not normalize or all(float(torch.tensor(w, dtype=dtype)) >= tiny for w in weights)


def _combine(deltas: Sequence[Tensor], weights: Sequence[float], base: Tensor, scaling: float, normalize: bool) -> Tensor:
    """base + lambda * sum_k w_k d_k (divided by sum_k w_k if `normalize`), in mergekit's order:
    weight each delta, sum them in model order, divide, scale, add the base."""
    mixed = deltas[0] * weights[0]
    for d, w in zip(deltas[1:], weights[1:]):
        mixed.add_(d * w)
    if normalize:
        mixed.div_(_weight_total(weights))
    if scaling != 1:
        mixed.mul_(scaling)
    return mixed.add_(base)


def _signed_merge(deltas: list[Tensor], weights: Sequence[float], base: Tensor, scaling: float, normalize: bool) -> Tensor:
    """TIES steps 2-3 on weighted sparse deltas, then lambda and the base (mergekit's order)."""
    if not _agreeing_weights(weights, normalize, deltas[0].dtype):
        merged = disjoint_mean(deltas, weights, elect_sign(deltas), normalize)  # a weight <= 0: divisors may cancel
    else:
        merged = _agreeing_mean(deltas, weights, normalize)
    if scaling != 1:
        merged.mul_(scaling)
    return merged.add_(base)


def _agreeing_mean(deltas: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """`disjoint_mean(deltas, weights, elect_sign(deltas), normalize)` bit for bit, in float ops
    only, for positive weights (the caller checks). Overwrites `deltas`.

    Why: `elect_sign` and `disjoint_mean` compare into bool tensors, which torch runs
    unvectorised on CPU (most of TIES' time). Here, with s the elected sign (+1 where the sum
    of the deltas is >= 0, from `copysign` after adding +0 so that -0 counts as +), the
    agreeing part of d is relu(d * s) = |d| where d has sign s, else 0: summed from +0 in model
    order it is s times `disjoint_mean`'s sum (negation is exact and rounding symmetric), and
    sign() of it is 1 exactly where the model agrees, so the divisor sums the same weights in
    the same order. With positive weights the divisor is 0 only where no model agrees (the sum
    is +0 there), so clamping it to the smallest normal float replaces `divisor[divisor == 0] = 1`.
    The first model's part starts the sums (`+ 0.0` turns a -0 into the +0 a zero start gives).
    """
    total = torch.add(deltas[0], deltas[1]) if len(deltas) > 1 else deltas[0].clone()
    for d in deltas[2:]:
        total.add_(d)
    sign = torch.copysign(_ONE.to(total.dtype), total.add_(0.0))
    acc = divisor = None
    for d, w in zip(deltas, weights):
        agreeing = d.mul_(sign).relu_()  # the deltas are the caller's scratch: no copy
        if acc is None:
            acc = agreeing.add_(0.0)
            if normalize:
                divisor = torch.sign(acc) if w == 1 else torch.sign(acc).mul_(w)
            continue
        acc.add_(agreeing)
        if divisor is not None:
            divisor.add_(agreeing.sign_(), alpha=w)  # agreeing is 0 or > 0: adds w or 0, exactly
    assert acc is not None
    if divisor is not None:
        acc.div_(divisor.clamp_min_(torch.finfo(divisor.dtype).tiny))
    return acc.mul_(sign)


_ONE = torch.tensor(1.0)


# ---------------------------------------------------------------- methods (per tensor)
#
# Every method below is elementwise once its per-model state is known (TIES: a magnitude
# threshold per model, `trims`; DARE: a random stream per model, `generators`), so the engine
# runs each of them on chunks of the flattened tensors; called on whole tensors without that
# state, a method computes it itself and gives the same result bit for bit.


def average(tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None = None) -> Tensor:
    """Uniform or weighted average (the paper's merge; also the uniform model soup)."""
    return weighted_average(tensors, weights)


def task_arithmetic(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, scaling: float = 1.0, normalize: bool = False
) -> Tensor:
    """base + lambda * sum_k w_k (x_k - base): add the scaled task vectors back to the base."""
    return _combine([x - base for x in tensors], weights, base, scaling, normalize)


def wise_ft(tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, alpha: float = 0.5) -> Tensor:
    """(1 - alpha) * base + alpha * fine-tuned: the WiSE-FT interpolation (one fine-tuned model)."""
    (tuned,) = tensors
    return torch.lerp(base, tuned, alpha)


def ties_trims(tensors: Sequence[Tensor], base: Tensor, density: float | Sequence[float]) -> list[Trim]:
    """Each model's magnitude threshold, from its whole task vector (one at a time)."""
    return [magnitude_trim((x - base).abs_().reshape(-1), d)
            for x, d in zip(tensors, per_model(density, len(tensors)))]


def ties(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, density: float | Sequence[float] = 1.0,
    scaling: float = 1.0, normalize: bool = True, trims: Sequence[Trim] | None = None,
) -> Tensor:
    """TIES: trim each task vector to `density`, elect a sign per entry, average the agreeing ones.

    `trims` (the engine's, one per model) make this an elementwise function of one chunk.
    """
    if trims is None:
        trims = ties_trims(tensors, base, density)
    deltas = []
    for x, w, t in zip(tensors, weights, trims):
        d = t.apply(x - base)
        deltas.append(d if w == 1 else d.mul_(w))
    return _signed_merge(deltas, weights, base, scaling, normalize)


def _dare_deltas(tensors: Sequence[Tensor], base: Tensor, density: float | Sequence[float], rescale: bool,
                 generators: Sequence[DareStream | torch.Generator] | None, offset: int) -> list[Tensor]:
    gens = list(generators) if generators is not None else model_generators(0, "", len(tensors))
    return [dare_drop(x - base, d, g, rescale, offset) for x, d, g in zip(tensors, per_model(density, len(tensors)), gens)]


def dare_linear(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, density: float | Sequence[float] = 1.0,
    scaling: float = 1.0, rescale: bool = True, normalize: bool = False,
    generators: Sequence[DareStream | torch.Generator] | None = None, offset: int = 0,
) -> Tensor:
    """DARE then task arithmetic: base + lambda * sum_k w_k dare(x_k - base).

    `offset`: where these tensors start in the whole flattened tensor (the engine's chunks)."""
    return _combine(_dare_deltas(tensors, base, density, rescale, generators, offset), weights, base, scaling, normalize)


def dare_ties(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, density: float | Sequence[float] = 1.0,
    scaling: float = 1.0, rescale: bool = True, normalize: bool = False,
    generators: Sequence[DareStream | torch.Generator] | None = None, offset: int = 0,
) -> Tensor:
    """DARE sparsification, then TIES sign election and the sum (or, `normalize`, mean) of the agreeing deltas."""
    deltas = [d if w == 1 else d.mul_(w) for d, w in zip(_dare_deltas(tensors, base, density, rescale, generators, offset), weights)]
    return _signed_merge(deltas, weights, base, scaling, normalize)


# ---------------------------------------------------------------- fused forms (kernels.py)
#
# The same functions as `ties`, `dare_ties` and `dare_linear`, bit for bit, as one fused kernel
# pass over the chunk; None where the kernel does not apply (then the engine calls the method
# itself): numba missing, not float32, TIES normalising with a weight <= 0 (divisors may
# cancel), DARE with a torch.Generator.


def ties_fused(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, density: float | Sequence[float] = 1.0,
    scaling: float = 1.0, normalize: bool = True, trims: Sequence[Trim] | None = None,
) -> Tensor | None:
    """`ties` by `kernels.ties`, or None."""
    if base.dtype != torch.float32 or not _agreeing_weights(weights, normalize):
        return None
    if trims is None:
        trims = ties_trims(tensors, base, density)
    return kernels.ties(tensors, base, [t.kernel_trim(base.dtype) for t in trims], weights, scaling, normalize)


def _dare_fused(tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, density: float | Sequence[float],
                scaling: float, rescale: bool, normalize: bool, generators: Sequence[Any] | None, offset: int,
                signed: bool) -> Tensor | None:
    gens = list(generators) if generators is not None else model_generators(0, "", len(tensors))
    if base.dtype != torch.float32 or not all(isinstance(g, DareStream) for g in gens):
        return None
    if signed and not _agreeing_weights(weights, normalize):
        return None
    return kernels.dare(tensors, base, offset, [g.key for g in gens], per_model(density, len(tensors)), rescale,
                        weights, scaling, signed, normalize, _weight_total(weights))


def dare_ties_fused(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, density: float | Sequence[float] = 1.0,
    scaling: float = 1.0, rescale: bool = True, normalize: bool = False,
    generators: Sequence[DareStream | torch.Generator] | None = None, offset: int = 0,
) -> Tensor | None:
    """`dare_ties` by `kernels.dare`, or None."""
    return _dare_fused(tensors, weights, base, density, scaling, rescale, normalize, generators, offset, signed=True)


def dare_linear_fused(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor, density: float | Sequence[float] = 1.0,
    scaling: float = 1.0, rescale: bool = True, normalize: bool = False,
    generators: Sequence[DareStream | torch.Generator] | None = None, offset: int = 0,
) -> Tensor | None:
    """`dare_linear` by `kernels.dare`, or None."""
    return _dare_fused(tensors, weights, base, density, scaling, rescale, normalize, generators, offset, signed=False)


def fisher(
    tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None = None,
    fishers: Sequence[Tensor] = (), fisher_floor: float = 1e-6,
) -> Tensor:
    """Fisher-weighted average: sum_k w_k F_k x_k / sum_k w_k F_k with diagonal Fishers F_k.

    F_k is floored at `fisher_floor` (as Matena & Raffel do), so a parameter no data touched
    falls back to the plain weighted average instead of 0/0.
    """
    if len(fishers) != len(tensors):
        raise ValueError(f"fisher merge needs one Fisher tensor per model, got {len(fishers)} for {len(tensors)}")
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for x, f, w in zip(tensors, fishers, weights):
        fw = f.to(x.dtype).clamp(min=fisher_floor).mul_(w)
        num.addcmul_(fw, x)
        den.add_(fw)
    return num.div_(den)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its per-tensor function and what the engine must hand it."""

    name: str
    fn: Callable[..., Tensor]
    summary: str
    needs_base: bool = False
    # user-facing parameter name -> (function keyword, default); mergekit spells scaling `lambda`
    params: dict[str, tuple[str, Any]] = field(default_factory=dict)
    random: bool = False  # gets `generators`, a `DareStream` per model and tensor, and `offset` (`model_generators`)
    uses_fisher: bool = False  # gets `fishers`, one tensor per model
    max_models: int | None = None
    normalizes_weights: bool = False  # weights are relative (only their ratios matter)
    # output element i depends only on input elements i, given the per-model state below:
    # the engine merges in cache-sized chunks of the flattened tensors
    elementwise: bool = False
    # gets `trims`, one magnitude threshold per model, computed from the whole task vector first
    trims: bool = False
    # parameters that may be given once per model (a list), as mergekit allows for density
    per_model: frozenset[str] = frozenset()
    # `fn` as one fused kernel pass on a chunk (same arguments, same bits), None where it does not apply
    fused: Callable[..., Tensor | None] | None = None


_SPARSE = {"density": ("density", 1.0), "lambda": ("scaling", 1.0)}
METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod("average", average, "uniform or weighted average (the paper's merge; the uniform soup)",
                    normalizes_weights=True, elementwise=True),
        MergeMethod("task_arithmetic", task_arithmetic, "base + lambda * sum_k w_k (model_k - base)",
                    needs_base=True, params={"lambda": ("scaling", 1.0), "normalize": ("normalize", False)},
                    elementwise=True),
        MergeMethod("wise_ft", wise_ft, "(1 - alpha) * base + alpha * model (WiSE-FT; one model)",
                    needs_base=True, params={"alpha": ("alpha", 0.5)}, max_models=1, elementwise=True),
        MergeMethod("ties", ties, "TIES: trim to density, elect sign, disjoint mean",
                    needs_base=True, params={**_SPARSE, "normalize": ("normalize", True)},
                    elementwise=True, trims=True, per_model=frozenset({"density"}), fused=ties_fused),
        MergeMethod("dare_linear", dare_linear, "DARE (drop 1-density, rescale) + task arithmetic",
                    needs_base=True, random=True, elementwise=True, per_model=frozenset({"density"}), fused=dare_linear_fused,
                    params={**_SPARSE, "rescale": ("rescale", True), "normalize": ("normalize", False)}),
        MergeMethod("dare_ties", dare_ties, "DARE (drop 1-density, rescale) + TIES sign election",
                    needs_base=True, random=True, elementwise=True, per_model=frozenset({"density"}), fused=dare_ties_fused,
                    params={**_SPARSE, "rescale": ("rescale", True), "normalize": ("normalize", False)}),
        MergeMethod("fisher", fisher, "Fisher-weighted average (diagonal Fisher per model, see `dtm fisher`)",
                    uses_fisher=True, params={"fisher_floor": ("fisher_floor", 1e-6)}, normalizes_weights=True,
                    elementwise=True),
    ]
}
# mergekit's name for the weighted average (the uniform model soup is `average` too); the greedy
# soup is a model-level loop in engine.py.
ALIASES = {"linear": "average"}
MODEL_LEVEL_METHODS = {"greedy_soup": "greedy soup: add a model (best score first) only if the soup's score improves"}


def method_names() -> list[str]:
    return sorted([*METHODS, *ALIASES, *MODEL_LEVEL_METHODS])


def get_method(name: str) -> MergeMethod:
    key = ALIASES.get(name, name)
    if key not in METHODS:
        raise KeyError(name)
    return METHODS[key]


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, independent of processing order (so a merge is reproducible)."""
    h = 0
    for ch in f"{seed}:{name}".encode():
        h = (h * 1_000_003 + ch) % (2**61 - 1)
    return h


def resolve_params(method: MergeMethod, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """Map user parameters (mergekit names) to function keywords, with defaults; unknown keys raise KeyError."""
    out = {kw: default for kw, default in method.params.values()}
    for key, value in (parameters or {}).items():
        if key not in method.params:
            raise KeyError(key)
        kw, default = method.params[key]
        if isinstance(value, (list, tuple)) and key in method.per_model:
            value = [float(v) for v in value]
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{key}: expected true or false, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, (bool, list, tuple, dict)):
                raise ValueError(f"{key}: expected a number, got {value!r}")
            value = float(value)
        out[kw] = value
    return out


__all__ = [
    "ALIASES", "METHODS", "ChunkedTrim", "DareStream", "MergeMethod", "Trim", "average", "count_brackets", "dare_drop",
    "dare_linear", "dare_linear_fused", "dare_ties", "dare_ties_fused", "disjoint_mean", "ties_fused",
    "elect_sign", "fisher", "get_method", "keep_count", "magnitude_trim", "method_names", "model_generators",
    "per_model", "resolve_params", "task_arithmetic", "ties", "ties_trims", "trim", "weighted_average", "wise_ft",
]
