"""The streaming merge engine: `merge()` and the model-level procedures around the per-tensor methods.

Flow of a merge:
  1. open every input lazily (full models as `Checkpoint`, LoRA adapters as `AdaptedModel` on
     their base), check they fit together (architecture, tensor names, shapes);
  2. plan the output shards from the first model's tensor list (shapes and dtypes are known
     before any data is read);
  3. for each tensor name: compute the method's per-model state (TIES thresholds, from a
     sample taken ahead on a thread of its own, `BracketsAhead`; DARE streams), then read it
     from the K models chunk by chunk, merge each chunk with the method's per-tensor function
     in the compute dtype (TIES and DARE: its fused kernel, `kernels.py`, where it applies; on
     two threads, chunks in order), cast to the output dtype and append it to the open shard;
  4. copy config, generation config and tokenizer files, write `dtm_merge.json`, and rename
     the temporary directory to the output name (`dtm.io.atomic_directory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import math
import queue
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from dtm.fisher import FISHER_FILE
from dtm.io import atomic_directory, atomic_write_json, temp_prefix
from dtm.merging import kernels
from dtm.merging import methods as M
from dtm.merging.checkpoint import (
    ADAPTER_CONFIG,
    CARRIED_FILES,
    SAFE_INDEX,
    Checkpoint,
    ChunkReader,
    MergeError,
    PlannedTensor,
    ShardWriter,
    TensorInfo,
    open_checkpoint,
    parse_size,
    plan_shards,
    read_header,
    shard_names,
    tied_aliases,
    torch_dtype,
)
from dtm.merging.lora import (
    AdaptedModel,
    Adapter,
    concat_adapters,
    is_adapter,
    open_adapter,
    svd_truncate,
)
from dtm.merging.overlap import Ahead, Behind, Workers

log = logging.getLogger("dtm.merging")

RECORD = "dtm_merge.json"
ENGINE_PARAMS = {"seed", "fisher_files", "max_shard_size", "rank"}  # not per-tensor method parameters


class Source(Protocol):
    """What the engine needs from an input model (a `Checkpoint` or an `AdaptedModel`)."""

    label: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]

    def info(self, name: str) -> TensorInfo | None: ...
    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor: ...
    def tied_aliases(self) -> dict[str, str]: ...


# ---------------------------------------------------------------- the public API

def check_merge_args(method: str, k: int, weights: Sequence[float] | None, parameters: dict[str, Any] | None
                     ) -> tuple[M.MergeMethod, dict[str, Any], list[float]]:
    """The per-tensor method, its resolved parameters and the weights for merging `k` models;
    a `MergeError` naming what is wrong. Checked before any file is opened (the config runs
    it at load time, so a run does not fail at the merge stage after all its training)."""
    try:
        spec = M.get_method(method)
    except KeyError:
        raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(M.method_names())}") from None
    method_params = {key: v for key, v in (parameters or {}).items() if key not in ENGINE_PARAMS}
    try:
        fn_params = M.resolve_params(spec, method_params)
    except KeyError as e:
        known = sorted([*spec.params, *ENGINE_PARAMS])
        raise MergeError(f"method {spec.name!r} has no parameter {e.args[0]!r}; its parameters are {', '.join(known)}") from None
    except ValueError as e:
        raise MergeError(f"method {spec.name!r}: {e}") from None
    weights = check_weights(weights, k, spec)
    for key in spec.per_model:
        value = fn_params.get(spec.params[key][0])
        if isinstance(value, list) and len(value) != k:
            raise MergeError(f"method {spec.name!r}: {key} has {len(value)} values for {k} models; give one, or one per model")
    if spec.max_models is not None and k > spec.max_models:
        raise MergeError(f"method {spec.name!r} takes {spec.max_models} model besides the base, got {k}")
    return spec, fn_params, weights


def merge(
    models: Sequence[str | Path],
    out: str | Path,
    method: str = "average",
    weights: Sequence[float] | None = None,
    base: str | Path | None = None,
    parameters: dict[str, Any] | None = None,
    dtype: str = "float32",
    out_dtype: str | None = None,
    lora_merge: str = "full",
    overwrite: bool = False,
    *,
    allow_pickle: bool = False,
    score_fn: Callable[[Path], float] | None = None,
    progress: bool = True,
    overlap: bool = True,
) -> Path:
    """Merge `models` (save_pretrained dirs or PEFT LoRA adapter dirs) into `out`; return `out`.

    method      a name from `methods.METHODS` (`average` is the paper's), or `greedy_soup`
    weights     one per model (default uniform); `average`/`ties`/`fisher` use only their ratios
    base        the base model, for methods on task vectors and for adapters (default: the
                adapters' `base_model_name_or_path`)
    parameters  method parameters in mergekit's names (`lambda`, `density`, `alpha`, ...), plus
                `seed` (DARE), `fisher_files`, `max_shard_size` (default 5GB), `rank` (svd)
    dtype       computation dtype; out_dtype: output dtype (default: each input tensor's dtype)
    lora_merge  adapters only: `full` (dense model), `concat` (exact adapter of rank K*r), `svd`
    score_fn    greedy soup only: higher is better, called on a model directory
    overlap     read ahead and write behind on two threads (the same bytes; False: one thread)
    """
    models = [Path(m) for m in models]
    out = Path(out)
    parameters = dict(parameters or {})
    if not models:
        raise MergeError("no models to merge: give at least one model directory")
    for m in models:
        if not m.is_dir():
            raise MergeError(f"{m}: model directory not found")
    if method == "greedy_soup":
        if score_fn is None:
            raise MergeError("greedy_soup needs a score function (score_fn=...): use the Python API or the pipeline")
        return greedy_soup(models, out, score_fn, base=base, dtype=dtype, out_dtype=out_dtype,
                           overwrite=overwrite, allow_pickle=allow_pickle, parameters=parameters, progress=progress)
    spec, fn_params, weights = check_merge_args(method, len(models), weights, parameters)
    compute = torch_dtype(dtype, "dtype")
    if compute not in (torch.float32, torch.float64):
        raise MergeError(f"dtype: compute in float32 or float64 (got {dtype}); use out_dtype for a smaller output")
    output = torch_dtype(out_dtype, "out_dtype") if out_dtype else None
    if lora_merge not in ("full", "concat", "svd"):
        raise MergeError(f"lora_merge: {lora_merge!r} is not one of full, concat, svd")
    resolved = {p.resolve() for p in models} | ({Path(base).resolve()} if base else set())
    if out.resolve() in resolved:
        raise MergeError(f"{out}: the output directory is one of the inputs; choose another --out")
    if out.exists() and not overwrite:
        raise MergeError(f"{out}: output directory exists; pass --overwrite (overwrite=True) to replace it")

    check_distinct(models)
    sources, base_source, adapters = open_inputs(models, base, allow_pickle, need_base=spec.needs_base)
    if not adapters and not (models[0] / "config.json").is_file():
        raise MergeError(f"{models[0]}: no config.json; the output takes its config from the first input, and without one "
                         "it would not load: put the model's config.json there, or list a model that has one first")
    if spec.needs_base and base_source is None:
        raise MergeError(f"method {spec.name!r} works on differences to the base model: pass --base DIR (base=...)")
    if lora_merge != "full" and adapters:
        if len(adapters) != len(models):
            raise MergeError(f"lora_merge={lora_merge!r} needs every input to be a LoRA adapter; use lora_merge='full' for a mix")
        if spec.name != "average":
            raise MergeError(f"lora_merge={lora_merge!r} is exact only for a (weighted) average; use lora_merge='full' for {spec.name!r}")
        return merge_adapters(adapters, base_source, weights, out, lora_merge, rank=parameters.get("rank"), overwrite=overwrite)

    if lora_merge != "full" and not adapters:
        log.warning("lora_merge=%r applies to LoRA adapters only; these are full models, merged as such", lora_merge)
    fishers = open_fishers(models, sources, parameters.get("fisher_files")) if spec.uses_fisher else None
    record = {
        "method": spec.name, "models": [str(m) for m in models], "weights": weights,
        "base": str(base_source.path) if base_source is not None else None, "parameters": parameters,
        "dtype": dtype, "out_dtype": out_dtype, "lora_merge": lora_merge if adapters else None,
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        stats = merge_streaming(
            sources, tmp, spec, weights, fn_params, base=base_source, compute=compute, output=output,
            fishers=fishers, seed=int(parameters.get("seed", 0)),
            max_shard_bytes=parse_size(parameters.get("max_shard_size", "5GB")), progress=progress, overlap=overlap,
        )
        carry_files(sources[0], adapters, base_source, tmp, output, stats["untied"])
        atomic_write_json(tmp / RECORD, {**record, **{k: v for k, v in stats.items() if k != "untied"}})
    log.info("merged %d models with %s into %s", len(models), spec.name, out)
    return out


def check_distinct(models: Sequence[Path]) -> None:
    """The same directory twice gets twice the weight: allowed (a weighting), but said."""
    seen: dict[Path, Path] = {}
    for m in models:
        key = m.resolve()
        if key in seen:
            log.warning("%s is given more than once (as %s and %s): it counts once per listing, i.e. with a larger weight",
                        m, seen[key], m)
        else:
            seen[key] = m


def check_weights(weights: Sequence[float] | None, k: int, spec: M.MergeMethod) -> list[float]:
    if weights is None:
        return [1.0] * k
    weights = [float(w) for w in weights]
    if len(weights) != k:
        raise MergeError(f"weights: got {len(weights)} weights for {k} models; give one weight per model")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights: {weights} contains a non-finite number")
    if (spec.normalizes_weights or spec.name in ("ties", "dare_ties")) and sum(weights) <= 0:
        raise MergeError(f"weights: {weights} sum to {sum(weights):g}; {spec.name} divides by their sum, which must be positive")
    return weights


# ---------------------------------------------------------------- opening inputs


def open_inputs(
    models: Sequence[Path], base: str | Path | None, allow_pickle: bool, need_base: bool = True
) -> tuple[list[Source], Checkpoint | None, list[Adapter]]:
    """Open each input; adapters become dense views on their (shared) base model.

    The base is opened only when the method or an adapter needs it, so a caller may always
    pass one (the pipeline does) even when it is a hub id and the inputs are full models.
    """
    adapters = [open_adapter(m, allow_pickle) if is_adapter(m) else None for m in models]
    if not need_base and not any(adapters):
        base = None
    base_path = Path(base) if base is not None else None
    if base_path is None:
        named = {a.base_path() for a in adapters if a is not None}
        if None in named:
            bad = next(a for a in adapters if a is not None and a.base_path() is None)
            raise MergeError(f"{bad.path / ADAPTER_CONFIG}: base_model_name_or_path is empty; pass the base model with --base DIR")
        if len({p.resolve() for p in named if p is not None}) > 1:
            raise MergeError(f"the adapters name different base models ({', '.join(sorted(map(str, named)))}); "
                             "LoRA sub-models must share one base: pass it with --base DIR if they do")
        base_path = next(iter(named), None)
    base_source = None
    if base_path is not None:
        if not base_path.is_dir():
            raise MergeError(f"base model {base_path}: not a local directory; pass the base model directory with --base DIR")
        if is_adapter(base_path):
            raise MergeError(f"base model {base_path}: is a LoRA adapter; the base must be a full model")
        base_source = open_checkpoint(base_path, allow_pickle)
    sources: list[Source] = []
    for m, a in zip(models, adapters):
        if a is None:
            sources.append(open_checkpoint(m, allow_pickle))
        else:
            assert base_source is not None
            sources.append(AdaptedModel(base_source, a))
    check_compatible(sources + ([base_source] if base_source is not None else []))
    return sources, base_source, [a for a in adapters if a is not None]


def check_compatible(sources: Sequence[Source]) -> None:
    """Same architecture, same tensor names and shapes; errors name the tensor and the two models."""
    first = sources[0]

    def arch(cfg: dict[str, Any]) -> tuple[str | None, str | None]:
        return cfg.get("model_type"), ",".join(cfg.get("architectures") or []) or None

    for s in sources[1:]:
        (t1, a1), (t2, a2) = arch(first.config), arch(s.config)
        if (t1 and t2 and t1 != t2) or (a1 and a2 and a1 != a2):
            raise MergeError(
                f"architectures differ: {first.label} is {a1 or t1}, {s.label} is {a2 or t2}; "
                "merging needs models of one architecture"
            )
    for s in sources[1:]:
        for name in output_names(sources):
            a, b = first.info(name), s.info(name)
            if a is None or b is None:
                missing, has = (first, s) if a is None else (s, first)
                raise MergeError(f"tensor {name!r} is in {has.label} but not in {missing.label}; the models have different architectures")
            if a.shape != b.shape:
                hint = ""
                if "embed" in name or "lm_head" in name or "wte" in name:
                    hint = f" (vocabulary sizes {a.shape[0]} vs {b.shape[0]}: the models use different tokenizers or a resized vocabulary)"
                raise MergeError(f"tensor {name!r} has shape {list(a.shape)} in {first.label} but {list(b.shape)} in {s.label}{hint}")


def output_names(sources: Sequence[Source]) -> list[str]:
    """The first model's tensor names, plus an untied output embedding that another model stores."""
    names = list(sources[0].tensors)
    seen = set(names)
    for s in sources[1:]:
        for n in s.tensors:
            if n not in seen:
                names.append(n)
                seen.add(n)
    return names


def open_fishers(models: Sequence[Path], sources: Sequence[Source], files: Sequence[str] | None) -> list[Checkpoint]:
    """One diagonal-Fisher file per model: `fisher_files` or `<model>/fisher.safetensors`."""
    if files is not None and len(files) != len(models):
        raise MergeError(f"fisher_files: got {len(files)} files for {len(models)} models")
    paths = [Path(f) for f in files] if files is not None else [m / FISHER_FILE for m in models]
    out = []
    for m, p, s in zip(models, paths, sources):
        if not p.is_file():
            raise MergeError(f"{m}: no Fisher file {p}; compute it with `dtm fisher {m} --data FILE` or pass fisher_files")
        tensors = read_header(p)
        out.append(Checkpoint(p, tensors, {}, _tied=tied_aliases(s.config, tensors)))
    return out


# ---------------------------------------------------------------- the stream


def merge_streaming(
    sources: Sequence[Source], out_dir: Path, spec: M.MergeMethod, weights: Sequence[float], fn_params: dict[str, Any],
    *, base: Checkpoint | None, compute: torch.dtype, output: torch.dtype | None,
    fishers: Sequence[Checkpoint] | None = None, seed: int = 0, max_shard_bytes: int = 5 * 10**9, progress: bool = True,
    overlap: bool = True,
) -> dict[str, Any]:
    """Merge tensor by tensor into sharded safetensors in `out_dir`; return stats for the record.

    With `overlap`, a reader thread reads the chunks ahead of the compute (`ChunkFeed`) and a
    writer thread writes the merged chunks behind it (`overlap.Behind`); the output is the same
    bytes either way (tests/test_merge_overlap.py).
    """
    keep_freed_memory()
    if spec.fused is not None:
        # numba's import and code load (this method's kernels only) overlap the start of the merge
        kernels.preload(len(sources), ("count_brackets", "ties_merge") if spec.trims else ("dare_merge",))
    names = output_names(sources)
    infos = [sources[0].info(n) for n in names]
    plan = [PlannedTensor(n, i.shape, output if (output and i.dtype.is_floating_point) else i.dtype)
            for n, i in zip(names, infos)]
    shards = plan_shards(plan, max_shard_bytes)
    files = shard_names(len(shards))
    total = sum(t.nbytes for t in plan)
    weight_map = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"merge ({spec.name})", disable=not progress, delay=1.0)  # no bar for a merge that takes under a second

    def schedule(hold: int) -> Iterator[ChunkRead]:
        return (r for t in plan for r in tensor_reads(t.name, sources, spec, fn_params, base, fishers, hold))

    hold = hold_groups(schedule(0), compute)  # headers only: no data is read here
    ahead = BracketsAhead(trimmed_tensors(schedule(0)), functools.partial(
        sampled_brackets, sources=sources, spec=spec, fn_params=fn_params, base=base, compute=compute), threaded=overlap)
    threads = compute_threads(spec) if overlap else 0
    feed = ChunkFeed(schedule(hold), compute, threaded=overlap, groups=pool_groups(threads, hold))
    writes = Behind(WRITE_BEHIND, threaded=overlap)
    writers: list[ShardWriter] = []
    scratch = Scratch()
    direct = ChunkReader()  # TIES' threshold sample and its rare exact fallback, outside the schedule
    workers = Workers(threads, COMPUTE_AHEAD, initializer=lambda: torch.set_num_threads(1))
    # Chunks are small and memory-bound: forking threads for each op costs more than it gains,
    # and on a busy machine one descheduled OpenMP worker stalls every op (docs/architecture.md,
    # "Merging"); methods with more work per element use whole chunks on two Python threads
    # instead (`compute_threads`). Every registered method is elementwise (given its state).
    try:
        with torch_threads(1) if spec.elementwise else contextlib.nullcontext():
            for shard, file in zip(shards, files):
                writer = ShardWriter(out_dir / file, shard)
                writers.append(writer)
                for t in shard:
                    if spec.elementwise and sources[0].info(t.name).dtype.is_floating_point:  # type: ignore[union-attr]
                        for c, release in merge_tensor_chunks(t.name, sources, spec, weights, fn_params, base, compute,
                                                              fishers, t.dtype, feed, seed=seed, scratch=scratch,
                                                              workers=workers, direct=direct, hold=hold, ahead=ahead):
                            writes.submit(writer.append, t.name, c)
                            if release is not _nothing:
                                writes.submit(release)  # after the write: `c` may be a view of an input buffer
                        writes.submit(writer.end, t.name)
                    else:
                        merged = merge_tensor(t.name, sources, spec, weights, fn_params, base, compute, fishers, seed)
                        writes.submit(writer.write, t.name, finite_or_refuse(t.name, merged, t.dtype))
                        del merged
                    weight_map[t.name] = file
                    bar.update(t.nbytes)
                writes.submit(writer.close)
        writes.finish()
    except BaseException:
        writes.abort()
        for w in writers:
            w.abort()
        raise
    finally:
        workers.close()
        feed.close()
        direct.close()
        ahead.close()
    bar.close()
    if len(files) > 1:
        atomic_write_json(out_dir / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    untied = any(n not in sources[0].tensors for n in names)
    return {"tensors": len(plan), "total_bytes": total, "shards": len(files), "untied": untied}


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed chunk-sized blocks for reuse instead of handing them back.

    Why: the merge allocates and frees a few MiB of temporaries per chunk (the methods are
    plain torch expressions). glibc serves blocks above its (dynamic) mmap threshold with mmap
    and returns freed heap tops above its trim threshold to the kernel, so temporaries kept
    coming back as fresh pages, each faulted in and zeroed: task arithmetic's arithmetic ran 10x
    slower than on reused memory (2.4 against 13 ms per 1 MiB chunk group, K=4). A fixed 32 MiB
    mmap threshold and 64 MiB trim threshold keep the temporaries on the heap; whole tensors
    (larger) are still mapped and unmapped, so memory stays flat. Process-wide and idempotent;
    a no-op where the C library has no `mallopt` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32 per model: a chunk group of K + 1 inputs stays in the CPU cache
# Queue depths of the reader and writer threads (module `overlap`). In flight at once, at most
# READ_AHEAD + 2 chunk groups of inputs (K models + base + Fishers, one chunk each: 30 MiB for
# K=4 in fp32), and WRITE_BEHIND + 1 merged outputs (chunks; whole tensors only for what is not
# streamed: adapters, integer buffers). The write queue is the deeper one: page-cache writes
# stall now and then (the kernel reclaiming or flushing), and a TIES merge writes in bursts
# (nothing during a tensor's trim pass); 8 rather than 2 took a few tenths of a second off
# a 500M merge, linear and TIES alike, for 6 more pooled groups (~30 MiB at K=4, fp32).
READ_AHEAD = 4
WRITE_BEHIND = 8
# Compute threads for the methods with more arithmetic per element than a linear merge (TIES'
# threshold pass and trim, DARE's draws): whole chunks on Python threads, each running one-thread
# torch ops, results written in order; at most COMPUTE_AHEAD + 1 chunk groups in the compute.
COMPUTE_THREADS = 2
COMPUTE_AHEAD = 2
SAMPLE_AHEAD = 2  # TIES: trimmed tensors whose threshold brackets are computed ahead (`BracketsAhead`)
# Reused read buffer groups (`ChunkFeed`): enough for every group that can be in flight at once
# (READ_AHEAD queued + 1 being read + 1 in the compute, COMPUTE_AHEAD more with compute threads,
# + WRITE_BEHIND + 1 in the writer), so the reader never waits on the pool unless the compute
# or writer is behind anyway.
POOL_GROUPS = READ_AHEAD + WRITE_BEHIND + 3
# TIES reads each tensor twice (the trim pass counts, then the merge pass merges). The trim pass
# keeps up to this many bytes of a tensor's chunk groups (its leading ones) for the merge pass,
# which reads only the rest again: every tensor of a 500M Llama but its two embeddings fits
# (~120 MiB for K = 4 in fp32), so the re-read is ~14% of the inputs instead of all of them.
# A fixed budget, not a fraction of the model, so peak memory stays flat in model size.
HOLD_BYTES = 256 << 20


def pool_groups(threads: int, hold: int = 0) -> int:
    """The pool's size for a merge with `threads` compute threads (0: the caller's thread) whose
    trim passes keep up to `hold` groups for their merge passes (`hold_groups`), on top."""
    return POOL_GROUPS + (COMPUTE_AHEAD if threads else 0) + hold


def compute_threads(spec: M.MergeMethod) -> int:
    """How many threads compute `spec`'s chunks: COMPUTE_THREADS for TIES- and DARE-style methods,
    none (the caller's thread) for the others, whose arithmetic is a few ops per element and
    leaves the CPU to the reader and writer threads."""
    return COMPUTE_THREADS if spec.elementwise and (spec.trims or spec.random) else 0


def chunkable(name: str, sources: Sequence[Source], spec: M.MergeMethod, base: Checkpoint | None,
              fishers: Sequence[Checkpoint] | None) -> bool:
    """Every input of this tensor is plain safetensors: read it in chunks, never the whole tensor.

    (An adapter on its base is computed whole, W + B A, then sliced; so is everything when this
    says no, which changes memory, never the result.)
    """
    if not spec.elementwise:
        return False
    infos = [r.info(name) if isinstance(r, Checkpoint) else None for r in tensor_inputs(sources, spec, base, fishers)]
    return all(i is not None and i.offset >= 0 and i.dtype.is_floating_point for i in infos)


def tensor_inputs(sources: Sequence[Source], spec: M.MergeMethod, base: Checkpoint | None,
                  fishers: Sequence[Checkpoint] | None) -> list[Any]:
    """Every input of a tensor, in the order a chunk group lists them: the K models, the base
    (if the method uses it), the Fishers."""
    return [*sources, *([base] if spec.needs_base and base is not None else []), *(fishers or [])]


def trim_densities(spec: M.MergeMethod, fn_params: dict[str, Any], n: int, k: int) -> list[float] | None:
    """TIES-style methods: each model's density, when some model keeps fewer than all n entries
    (then a first pass over the tensor finds the thresholds); else None (no first pass)."""
    if not spec.trims:
        return None
    densities = M.per_model(fn_params.get("density", 1.0), k)
    return None if all(M.keep_count(n, d) >= n for d in densities) else densities


Step = tuple[str, str, int, int]  # (tensor, pass "trim" or "merge", -1, first element)


def group_bytes(infos: Sequence[TensorInfo], compute: torch.dtype) -> int:
    """The memory of one pooled buffer group that reads a full chunk of `infos`: per input, the
    stored dtype's buffer and, where that is not the compute dtype, the converted copy."""
    return CHUNK_ELEMENTS * sum(i.dtype.itemsize + (compute.itemsize if i.dtype != compute else 0) for i in infos)


def hold_groups(reads: Iterable[ChunkRead], compute: torch.dtype) -> int:
    """How many chunk groups a tensor's trim pass may keep for its merge pass (the leading ones):
    as many as `HOLD_BYTES` pays for at the merge's largest group (the pool's groups all grow to
    it), at most the longest trim pass's chunks; 0 for a merge without trim passes. Walks the
    schedule made with `hold=0` (headers only, nothing is read)."""
    largest, trims = 0, Counter[str]()
    for r in reads:
        largest = max(largest, group_bytes(r.infos, compute))
        if r.key[1] == "trim":
            trims[r.key[0]] += 1
    return min(max(trims.values()), HOLD_BYTES // largest) if trims else 0


def trimmed_tensors(reads: Iterable[ChunkRead]) -> list[str]:
    """The tensors with a trim pass, in the schedule's order (walk a schedule made with `hold=0`)."""
    return list(dict.fromkeys(r.key[0] for r in reads if r.key[1] == "trim"))


def sampled_brackets(name: str, reader: ChunkReader, *, sources: Sequence[Source], spec: M.MergeMethod,
                     fn_params: dict[str, Any], base: Checkpoint | None, compute: torch.dtype) -> list[Bracket]:
    """`threshold_brackets` of tensor `name` (one with a trim pass), read with `reader`."""
    k, n = len(sources), sources[0].info(name).numel  # type: ignore[union-attr]
    densities = trim_densities(spec, fn_params, n, k)
    assert densities is not None, name
    ranges = InputRanges(name, tensor_inputs(sources, spec, base, None), None, reader, compute)
    return threshold_brackets(ranges, n, k, densities)


def kept_chunks(inputs: int, k: int, hold: int) -> int:
    """How many leading chunk groups of a tensor with a trim pass that pass keeps for the merge
    pass: `hold`, where the trim pass reads every input the merge pass needs (the K models and the
    base: TIES), else none. One rule for the schedule (`tensor_reads`) and the compute
    (`merge_tensor_chunks`), so the merge pass reads exactly the chunks that were not kept."""
    return hold if inputs == k + 1 else 0


@dataclass(frozen=True)
class ChunkRead:
    """One step of the read schedule: elements [start, start + size) of some inputs of a tensor
    (pass "trim": the K models and the base; pass "merge": every input of `tensor_inputs`)."""

    key: Step
    infos: tuple[TensorInfo, ...]
    start: int
    size: int


def tensor_reads(name: str, sources: Sequence[Source], spec: M.MergeMethod, fn_params: dict[str, Any],
                 base: Checkpoint | None, fishers: Sequence[Checkpoint] | None, hold: int = 0) -> Iterator[ChunkRead]:
    """The chunk reads of one tensor, in the order `merge_tensor_chunks` takes them (none for a
    tensor merged or read whole): TIES' trim pass, then the merge pass without the chunks the
    trim pass keeps for it (`kept_chunks` of `hold`). Pure: the reader thread walks it ahead of
    the compute."""
    first = sources[0].info(name)
    if first is None or not first.dtype.is_floating_point or not chunkable(name, sources, spec, base, fishers):
        return
    infos = tuple(i.info(name) for i in tensor_inputs(sources, spec, base, fishers))
    k, n, chunk = len(sources), first.numel, CHUNK_ELEMENTS
    kept = 0
    if n > chunk and trim_densities(spec, fn_params, n, k) is not None:
        kept = kept_chunks(len(infos), k, hold)
        for start in range(0, n, chunk):
            yield ChunkRead((name, "trim", -1, start), infos[:k + 1], start, min(chunk, n - start))
    for start in range(kept * chunk, n, chunk):
        yield ChunkRead((name, "merge", -1, start), infos, start, min(chunk, n - start))


class ChunkFeed:
    """The chunk reads of a whole merge, read up to `READ_AHEAD` groups ahead of the compute by a
    thread (`overlap.Ahead`) and taken in the same order. `take` checks each step's key, so a
    schedule that disagreed with the compute would stop the merge at once, never merge wrong data.

    Reads go into a fixed pool of `groups` reused buffer groups (`pool_groups`), not fresh memory: a fresh
    buffer per read made the kernel fault in and zero a new page for every 4 KiB read (a
    merge's whole input size in page faults). A group goes back to the pool only when its
    `release` is called, which the engine does after the last use of anything computed from
    it (for a merged chunk: after the writer thread has written it, since the chunk may be a
    view of an input), so a reused buffer is never overwritten while something still reads it.
    A reader with no free group waits; it is never the only one holding them, so it cannot
    hang: the compute holds a few groups (one per compute job) and the writer releases what it
    has written; besides those, a TIES trim pass keeps at most `hold` groups of its tensor for
    the merge pass (which releases them as any other), and the pool has `hold` groups more.
    """

    def __init__(self, reads: Iterator[ChunkRead], compute: torch.dtype, threaded: bool = True,
                 groups: int = POOL_GROUPS):
        self._reader = ChunkReader()
        self._compute = compute
        self._closed = threading.Event()
        self._free: queue.SimpleQueue[BufferGroup] = queue.SimpleQueue()
        for _ in range(groups):
            self._free.put(BufferGroup())
        self._ahead = Ahead(self._read(reads), READ_AHEAD, threaded)

    def _acquire(self) -> BufferGroup:
        """A free buffer group; waits for the writer to release one (checks every 0.1 s for `close`)."""
        while not self._closed.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        raise FeedClosed

    def _read(self, reads: Iterator[ChunkRead]) -> Iterator[tuple[Step, list[torch.Tensor], BufferGroup]]:
        for r in reads:
            group = self._acquire()
            parts = [self._reader.read(i, r.start, group.raw(j, i.dtype, r.size)) for j, i in enumerate(r.infos)]
            yield r.key, [group.compute(j, p, self._compute) for j, p in enumerate(parts)], group

    def take(self, key: Step) -> tuple[list[torch.Tensor], Callable[[], None]]:
        """The chunks of step `key`, which must be the next one read, and the call that hands
        their buffers back (call it once nothing computed from them is still in use)."""
        got, parts, group = next(self._ahead, (None, [], None))
        if got != key:
            raise RuntimeError(f"merge read schedule out of step: the compute wants {key}, the reader read {got}")
        return parts, lambda: self._free.put(group)

    def close(self) -> None:
        """Stop the reader thread, then close the files (the thread no longer uses them)."""
        self._closed.set()
        self._ahead.close()
        self._reader.close()


class FeedClosed(Exception):
    """The feed was closed while its reader waited for a free buffer (the merge is stopping)."""


class BufferGroup:
    """One chunk group's reusable buffers: per input, a buffer in the stored dtype (what `preadv`
    fills) and, where that is not the compute dtype, one in the compute dtype (the conversion's
    target). Buffers grow to the largest chunk seen and are reused from then on."""

    def __init__(self) -> None:
        self._raw: list[torch.Tensor] = []
        self._compute: list[torch.Tensor] = []

    @staticmethod
    def _slot(bufs: list[torch.Tensor], j: int, dtype: torch.dtype, size: int) -> torch.Tensor:
        while len(bufs) <= j:
            bufs.append(torch.empty(0, dtype=torch.uint8))
        nbytes = size * dtype.itemsize
        if bufs[j].numel() < nbytes:
            bufs[j] = torch.empty(nbytes, dtype=torch.uint8)
        return bufs[j][:nbytes].view(dtype)

    def raw(self, j: int, dtype: torch.dtype, size: int) -> torch.Tensor:
        """Input j's read buffer: `size` elements of `dtype`."""
        return self._slot(self._raw, j, dtype, size)

    def compute(self, j: int, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Input j's chunk in the compute dtype: `raw` itself, or converted into a reused buffer."""
        if raw.dtype == dtype:
            return raw
        return self._slot(self._compute, j, dtype, raw.numel()).copy_(raw)


def merge_tensor_chunks(
    name: str, sources: Sequence[Source], spec: M.MergeMethod, weights: Sequence[float], fn_params: dict[str, Any],
    base: Checkpoint | None, compute: torch.dtype, fishers: Sequence[Checkpoint] | None, out_dtype: torch.dtype,
    feed: ChunkFeed, seed: int = 0, scratch: Scratch | None = None, workers: Workers | None = None,
    direct: ChunkReader | None = None, hold: int = 0, ahead: BracketsAhead | None = None,
) -> Iterator[tuple[torch.Tensor, Callable[[], None]]]:
    """The merged tensor as consecutive flat chunks (every method is elementwise given its state),
    each with the call that releases its input buffers (to make once the chunk is written).

    Each chunk is the method's own per-tensor function applied to the same element range of
    every input, so the result is exactly the whole-tensor result, with memory of a few chunk
    groups instead of a few tensors times K. Inputs in plain safetensors come from `feed` (read
    ahead, in `tensor_reads`' order); the others (an adapter on its base) are computed whole
    here and sliced. Chunks are computed by `workers` (several threads for TIES and DARE) and
    come out in order. State that needs the whole tensor comes first:
      * TIES: each model's exact magnitude threshold (`tensor_trims`: a sample, one counting
        pass over the chunks, rarely an exact selection over a scratch copy); a tensor of one
        chunk gets it from that chunk, inside the method. The counting pass keeps its first
        `kept_chunks` chunk groups (up to `hold`, `HOLD_BYTES`) for the merge pass, which reads
        only the others again;
      * DARE: one random stream per model, by position (`methods.DareStream`).
    """
    chunk = CHUNK_ELEMENTS
    for f in fishers or []:
        if f.info(name) is None:
            raise MergeError(f"{f.path}: has no Fisher tensor for {name!r}; recompute it for this model")
    inputs = tensor_inputs(sources, spec, base, fishers)
    wholes = None if chunkable(name, sources, spec, base, fishers) else [i.get(name, compute).reshape(-1) for i in inputs]
    workers = workers or Workers()

    # trim-pass chunk groups kept for the merge pass, by first element; the caller's thread alone
    # touches it (`Workers` advances the jobs' iterator, which calls `take`, in that thread)
    kept: dict[int, tuple[list[torch.Tensor], Callable[[], None]]] = {}
    keep_below = 0  # the first element past the kept chunks (set with the trim pass below)

    def take(key: Step, which: Sequence[int], start: int, m: int) -> tuple[list[torch.Tensor], Callable[[], None]]:
        if wholes is not None:
            return [wholes[i][start:start + m] for i in which], _nothing
        if key[1] == "merge" and start in kept:
            return kept.pop(start)  # its release goes with the merged chunk, after the write
        parts, release = feed.take(key)
        if key[1] == "trim" and start < keep_below:
            kept[start] = (parts, release)
            return parts, _nothing  # the counting only reads the parts; the merge pass releases them
        return parts, release

    k = len(sources)
    n = sources[0].info(name).numel  # type: ignore[union-attr]
    state: dict[str, Any] = {}
    if spec.random:
        state["generators"] = M.model_generators(seed, name, k)
    densities = trim_densities(spec, fn_params, n, k)
    trims: list[M.ChunkedTrim] | None = None
    if spec.trims and densities is None:
        state["trims"] = [M.Trim(0.0, keep_all=True)] * k
    elif densities is not None and n > chunk:
        if wholes is None:
            keep_below = kept_chunks(len(inputs), k, hold) * chunk
        ranges = InputRanges(name, inputs, wholes, direct, compute)
        brackets = ahead.get(name) if ahead is not None and wholes is None else None
        trims = tensor_trims(name, densities, n, k, take, ranges, workers, scratch or Scratch(), compute, brackets)
    # else (one chunk): the method finds the exact thresholds on that chunk, i.e. the whole tensor
    has_base = int(spec.needs_base and base is not None)

    def merge(j: int, start: int, parts: list[torch.Tensor], release: Callable[[], None]
              ) -> tuple[torch.Tensor, Callable[[], None]]:
        kwargs = {**fn_params, **state}
        if trims is not None:
            kwargs["trims"] = [t.chunk(j) for t in trims]
        if spec.random:
            kwargs["offset"] = start
        if has_base:
            kwargs["base"] = parts[k]
        if fishers:
            kwargs["fishers"] = parts[k + has_base:]
        if spec.fused is not None:  # one kernel pass; None where it does not apply
            fused = spec.fused(parts[:k], weights, **kwargs)
            if fused is not None:
                out = fused.to(out_dtype)
                if all_finite(out):
                    release()  # the kernel wrote into memory of its own: the inputs can be read over now
                    return out, _nothing
                # not finite: the method's own ops below give the same bits and the exact error
        merged = spec.fn(parts[:k], weights, **kwargs)
        return finite_or_refuse(name, merged, out_dtype), release

    def jobs() -> Iterator[Callable[[], tuple[torch.Tensor, Callable[[], None]]]]:
        for j, start in enumerate(range(0, n, chunk)):
            parts, release = take((name, "merge", -1, start), range(len(inputs)), start, min(chunk, n - start))
            yield functools.partial(merge, j, start, parts, release)

    yield from workers.in_order(jobs())
    if kept:  # every kept group is merged (and handed back) by now; a leftover would starve the reader
        raise RuntimeError(f"merge read schedule out of step: {name}'s trim-pass chunks at {sorted(kept)} were never merged")


class InputRanges:
    """Element ranges of one tensor's inputs read on demand in the caller's thread, outside the
    read-ahead schedule (TIES' threshold sample and its exact fallback), in the compute dtype."""

    def __init__(self, name: str, inputs: Sequence[Any], wholes: list[torch.Tensor] | None,
                 reader: ChunkReader | None, compute: torch.dtype):
        self.name, self.inputs, self.wholes, self.compute = name, inputs, wholes, compute
        self.reader = reader

    def read(self, j: int, start: int, m: int) -> torch.Tensor:
        """Input j's elements [start, start + m)."""
        return self.gather(j, [(start, m)])

    def gather(self, j: int, pieces: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Input j's elements at each (start, length) of `pieces`, one after another."""
        if self.wholes is not None:
            return torch.cat([self.wholes[j][s:s + m] for s, m in pieces])
        if self.reader is None:
            self.reader = ChunkReader()  # a caller without one (tests): files stay open until exit
        info = self.inputs[j].info(self.name)
        out = torch.empty(sum(m for _, m in pieces), dtype=info.dtype)
        return self.reader.read_pieces(info, pieces, out).to(self.compute)

    def delta(self, i: int, k: int, start: int, m: int) -> torch.Tensor:
        """|x_i - base| over [start, start + m) (the base is input k)."""
        return torch.sub(self.read(i, start, m), self.read(k, start, m)).abs_()


def tensor_trims(name: str, densities: Sequence[float], n: int, k: int,
                 take: Callable[[Step, Sequence[int], int, int], tuple[list[torch.Tensor], Callable[[], None]]],
                 ranges: InputRanges, workers: Workers, scratch: Scratch, compute: torch.dtype,
                 brackets: list[Bracket] | None = None) -> list[M.ChunkedTrim]:
    """Each model's exact TIES trim of a tensor of several chunks (`methods.ChunkedTrim`).

    A sample of |x_i - base| read at `methods.sample_ranges` brackets each model's threshold
    (`threshold_brackets`; `brackets` when the caller has them already, `BracketsAhead`);
    the trim pass (one chunk group of the K models and the base at a time, on the workers)
    counts each chunk against the brackets; the threshold is selected among the few entries
    inside. A model whose threshold falls outside its bracket, or whose bracket holds more than
    n / BRACKET_ROOM entries, gets the exact whole-tensor selection instead (`exact_trim`).
    Memory: the sample, the entries inside the brackets (a few % of K n), a chunk group per thread.
    """
    chunk = CHUNK_ELEMENTS
    keeps = [M.keep_count(n, d) for d in densities]
    if brackets is None:
        brackets = threshold_brackets(ranges, n, k, densities)
    live = list(brackets)  # a model's bracket until it has failed
    room = n // M.BRACKET_ROOM + 1

    def count(parts: list[torch.Tensor], release: Callable[[], None], using: list[tuple[Any, Any] | None]
              ) -> list[M.BracketCount | None]:
        try:
            return M.count_brackets(parts[:k], parts[k], using)
        finally:
            release()

    def jobs() -> Iterator[Callable[[], list[M.BracketCount | None]]]:
        for start in range(0, n, chunk):
            parts, release = take((name, "trim", -1, start), range(k + 1), start, min(chunk, n - start))
            yield functools.partial(count, parts, release, list(live))

    counts: list[list[M.BracketCount]] = [[] for _ in range(k)]
    inside = [0] * k
    for per_model in workers.in_order(jobs()):
        for i, c in enumerate(per_model):
            if live[i] is None or c is None:
                continue
            counts[i].append(c)
            inside[i] += c.size if c.values is not None else 0
            if inside[i] > room:  # too wide a bracket (a mass of equal values in it): stop counting
                live[i], counts[i] = None, []
    trims = []
    for i, (keep, br) in enumerate(zip(keeps, brackets)):
        if br is None:
            trims.append(M.ChunkedTrim.of(M.Trim(0.0, keep_all=True) if keep >= n else M.Trim(math.inf)))
            continue
        got = M.select_in_bracket(counts[i], keep, *br) if live[i] is not None else None
        if got is None:
            log.debug("%s: model %d's threshold sample missed; exact selection", name, i)
            got = exact_trim(i, k, densities[i], n, ranges, scratch, compute)
        trims.append(got)
    return trims


Bracket = tuple[Any, Any] | None  # a model's (lo, hi) threshold bracket, None: no threshold to find


def threshold_brackets(ranges: InputRanges, n: int, k: int, densities: Sequence[float]) -> list[Bracket]:
    """Each model's bracket of its threshold (`methods.bracket`) from a sample of |x_i - base| read
    at `methods.sample_ranges` (the base is input k); None for a model that keeps all or none."""
    sample = M.sample_ranges(n)
    base_sample = ranges.gather(k, sample)
    brackets: list[Bracket] = []
    for i, density in enumerate(densities):
        keep = M.keep_count(n, density)
        if 0 < keep < n:
            d = ranges.gather(i, sample).sub_(base_sample).abs_()
            brackets.append(M.bracket(d.numpy(), n, keep))
        else:
            brackets.append(None)
    return brackets


class BracketsAhead:
    """The threshold brackets of a merge's trimmed tensors (`threshold_brackets`), computed on a
    thread of their own, in plan order, up to `SAMPLE_AHEAD` tensors ahead of the merge.

    Why: a tensor's trim pass cannot start before its brackets are known, and the sample behind
    them is a few hundred small reads and K partial sorts; computed in line, every trimmed
    tensor began with the compute threads idle (about a tenth of a 500M TIES merge). The
    thread reads with a `ChunkReader` of its own (they are not thread-safe) and holds only the
    brackets (two numbers per model per tensor) and one tensor's sample.
    """

    def __init__(self, names: Sequence[str], brackets_of: Callable[[str, ChunkReader], list[Bracket]],
                 threaded: bool = True):
        self._names = list(names)
        self._next = 0  # the next name to submit
        self._brackets_of = brackets_of
        self._reader = ChunkReader()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dtm-merge-sample",
                                        initializer=lambda: torch.set_num_threads(1)) if threaded and names else None
        self._futures: dict[str, Future[list[Bracket]]] = {}
        self._fill()

    def _fill(self) -> None:
        while self._pool is not None and self._next < len(self._names) and len(self._futures) < SAMPLE_AHEAD:
            name = self._names[self._next]
            self._futures[name] = self._pool.submit(self._brackets_of, name, self._reader)
            self._next += 1

    def get(self, name: str) -> list[Bracket] | None:
        """Tensor `name`'s brackets (waiting for them), or None where they are not computed ahead
        (no thread, a tensor outside the list): the caller computes them itself."""
        future = self._futures.pop(name, None)
        self._fill()
        return None if future is None else future.result()

    def close(self) -> None:
        """Stop the thread (dropping what it has not started), then close its files."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._reader.close()


def exact_trim(i: int, k: int, density: float, n: int, ranges: InputRanges, scratch: Scratch,
               compute: torch.dtype) -> M.ChunkedTrim:
    """Model i's trim by a selection over its whole |x_i - base| (one scratch tensor), read again
    chunk by chunk; a split tie at the threshold takes one more pass counting it per chunk."""
    chunk = CHUNK_ELEMENTS
    work = scratch.get(n, compute)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        work[start:start + m] = ranges.delta(i, k, start, m)
    trim = M.magnitude_trim(work, density)
    equal = None
    if 0 < trim.ties < trim.equal:
        t = trim.threshold
        equal = [int(np.count_nonzero(ranges.delta(i, k, s, min(chunk, n - s)).numpy() == t)) for s in range(0, n, chunk)]
    return M.ChunkedTrim.of(trim, equal)


def merge_tensor(
    name: str, sources: Sequence[Source], spec: M.MergeMethod, weights: Sequence[float], fn_params: dict[str, Any],
    base: Checkpoint | None, compute: torch.dtype, fishers: Sequence[Checkpoint] | None, seed: int,
) -> torch.Tensor:
    """One output tensor: read it from every model, merge it (float) or check it is identical (int)."""
    first = sources[0].info(name)
    assert first is not None
    if not first.dtype.is_floating_point:
        # integer buffers (e.g. position ids) are not averaged: they must agree
        ref = sources[0].get(name)
        for s in sources[1:]:
            if not torch.equal(ref, s.get(name)):
                raise MergeError(f"tensor {name!r} is an integer buffer and differs between {sources[0].label} and {s.label}")
        return ref
    tensors = [s.get(name, compute) for s in sources]
    kwargs = dict(fn_params)
    if spec.needs_base:
        assert base is not None
        kwargs["base"] = base.get(name, compute)
    if spec.random:
        kwargs["generators"] = M.model_generators(seed, name, len(tensors))
    if spec.uses_fisher:
        assert fishers is not None
        fs = []
        for f in fishers:
            if f.info(name) is None:
                raise MergeError(f"{f.path}: has no Fisher tensor for {name!r}; recompute it for this model")
            fs.append(f.get(name, compute))
        kwargs["fishers"] = fs
    return spec.fn(tensors, weights, **kwargs)


class Scratch:
    """The work space of TIES' exact fallback selection (`exact_trim`), one buffer kept for the
    rest of the merge once needed (grown to the largest tensor that needs it): a new one per
    tensor was faulted in page by page each time. A merge whose threshold samples never miss
    allocates none."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def get(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < n or self._buf.dtype != dtype:
            self._buf = None  # free the smaller one first
            self._buf = torch.empty(n, dtype=dtype)
        return self._buf[:n]


def _nothing() -> None:
    """The release of chunks sliced from whole tensors (no pooled buffer to hand back)."""


def finite_or_refuse(name: str, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`merged` cast to the output dtype; a tensor (or chunk) with inf/nan is never written: the
    merge stops naming it, so no model that looks finished holds a non-finite weight."""
    out = merged.to(dtype)
    if out.is_floating_point() and not all_finite(out):
        if torch.isfinite(merged).all():
            raise MergeError(f"tensor {name!r}: merged values overflow {str(dtype).removeprefix('torch.')} (inf); "
                             "choose a wider out_dtype (float32 or bfloat16)")
        raise MergeError(f"tensor {name!r}: the merge produced inf/nan; check the inputs and weights (an input may hold inf/nan)")
    return out


def all_finite(t: torch.Tensor) -> bool:
    """No inf or nan in `t`. A sum with an inf or nan term is inf or nan (IEEE arithmetic never
    turns them finite again), so a finite sum proves every element finite in one reduction; only
    a sum that is not finite (a bad element, or finite values overflowing the sum) takes the exact
    elementwise test. (`isfinite(t).all()` alone, a bool tensor and a reduction per chunk, cost
    three times the merge arithmetic itself.)"""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def carry_files(first: Source, adapters: Sequence[Adapter], base: Checkpoint | None, out_dir: Path,
                output: torch.dtype | None, untied: bool) -> None:
    """Copy config, generation config and tokenizer from the first model (from the base for adapters,
    with an adapter's own tokenizer files on top), and record the output dtype in the config."""
    dirs = [base.path] if adapters and base is not None else [Path(first.label)]
    if adapters:
        dirs.append(adapters[0].path)
    for d in dirs:
        for f in sorted(d.iterdir()):
            if f.is_file() and CARRIED_FILES.match(f.name) and f.name != ADAPTER_CONFIG:
                shutil.copy2(f, out_dir / f.name)
    cfg_file = out_dir / "config.json"
    if cfg_file.is_file() and (output is not None or untied):
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        if output is not None:
            cfg["dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"] = str(output).removeprefix("torch.")
        if untied:
            cfg["tie_word_embeddings"] = False
        atomic_write_json(cfg_file, cfg)


# ---------------------------------------------------------------- LoRA: keep an adapter


def merge_adapters(
    adapters: Sequence[Adapter], base: Checkpoint | None, weights: Sequence[float], out: Path, mode: str,
    rank: int | None = None, overwrite: bool = False,
) -> Path:
    """Write one adapter equal to the weighted average of `adapters`: concatenated (exact) or SVD-truncated."""
    from safetensors.torch import save_file

    from dtm.merging.checkpoint import read_tensor

    total = sum(weights)
    coefs = [w / total for w in weights]
    modules = sorted({w for a in adapters for w in a.modules})
    for a in adapters[1:]:
        if set(a.replaced) != set(adapters[0].replaced):
            raise MergeError(f"{a.path}: saves full tensors {sorted(a.replaced)} unlike {adapters[0].path}; use lora_merge='full'")
    target_rank = int(rank) if rank is not None else int(adapters[0].config.get("r", 8))
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    for weight in tqdm(modules, desc=f"lora {mode}", unit="module"):
        parts = [(a, a.modules[weight]) for a in adapters if weight in a.modules]
        mod = parts[0][1]
        if any(p.embedding != mod.embedding or p.transpose != mod.transpose for _, p in parts):
            raise MergeError(f"module {mod.module!r}: adapters disagree on its kind (embedding / fan_in_fan_out)")
        As = [read_tensor(p.a, torch.float32) for _, p in parts]
        Bs = [read_tensor(p.b, torch.float32) for _, p in parts]
        cs = [coefs[adapters.index(a)] * p.scale for a, p in parts]
        a_cat, b_cat = concat_adapters(As, Bs, cs)
        if mode == "svd":
            a_cat, b_cat, errors[mod.module] = svd_truncate(a_cat, b_cat, target_rank)
        out_dtype = read_tensor(mod.a).dtype
        ka, kb = (("lora_embedding_A", "lora_embedding_B") if mod.embedding else ("lora_A.weight", "lora_B.weight"))
        state[f"base_model.model.{mod.module}.{ka}"] = a_cat.to(out_dtype).contiguous()
        state[f"base_model.model.{mod.module}.{kb}"] = b_cat.to(out_dtype).contiguous()
        ranks[mod.module] = a_cat.shape[0]
    for name, info in adapters[0].replaced.items():
        # full tensors saved with the adapters (e.g. modules_to_save) are averaged like full weights
        merged = M.weighted_average([read_tensor(a.replaced[name], torch.float32) for a in adapters], list(weights))
        state[info.name] = merged.to(info.dtype)  # info.name is the key as stored in the adapter file
    for key, tensor in state.items():
        finite_or_refuse(key, tensor, tensor.dtype)
    r_main = max(ranks.values(), key=list(ranks.values()).count) if ranks else target_rank
    config = dict(adapters[0].config)
    targets: set[str] = set()
    for a in adapters:
        t = a.config.get("target_modules")
        if isinstance(t, str):
            raise MergeError(f"{a.path / ADAPTER_CONFIG}: target_modules is a regex; lora_merge={mode!r} needs a list (use 'full')")
        targets.update(t or [])
    config.update({
        "r": r_main, "lora_alpha": r_main, "use_rslora": False, "target_modules": sorted(targets),
        "rank_pattern": {m: r for m, r in ranks.items() if r != r_main},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != r_main},
        "base_model_name_or_path": str(base.path) if base is not None else config.get("base_model_name_or_path"),
    })
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG, config)
        for f in sorted(adapters[0].path.iterdir()):  # the tokenizer and generation config travel with the adapter
            if f.is_file() and CARRIED_FILES.match(f.name) and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
        record = {"method": "average", "models": [str(a.path) for a in adapters], "weights": list(weights),
                  "base": config["base_model_name_or_path"], "lora_merge": mode, "ranks": ranks}
        if mode == "svd":
            record["rank"] = target_rank
            record["svd_relative_error"] = {"max": max(errors.values(), default=0.0), "per_module": errors}
            log.info("svd to rank %d: max relative error %.3g", target_rank, record["svd_relative_error"]["max"])
        atomic_write_json(tmp / RECORD, record)
    return out


# ---------------------------------------------------------------- model soups


def greedy_soup(
    models: Sequence[Path], out: Path, score_fn: Callable[[Path], float], *, base: str | Path | None = None,
    dtype: str = "float32", out_dtype: str | None = None, overwrite: bool = False, allow_pickle: bool = False,
    parameters: dict[str, Any] | None = None, progress: bool = True,
) -> Path:
    """Greedy soup (Wortsman et al. 2022): rank models by score, then add each one only if the
    uniform soup's score does not drop. `score_fn(model_dir)` must return higher-is-better."""
    if out.exists() and not overwrite:
        raise MergeError(f"{out}: output directory exists; pass --overwrite (overwrite=True) to replace it")
    common = dict(base=base, dtype=dtype, out_dtype=out_dtype, allow_pickle=allow_pickle,
                  parameters={k: v for k, v in (parameters or {}).items() if k == "max_shard_size"}, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out.name)))
    try:
        def score_of(members: Sequence[Path], tag: str) -> float:
            if len(members) == 1 and not is_adapter(members[0]):
                return float(score_fn(members[0]))
            cand = merge(members, work / tag, "average", **common)
            try:
                return float(score_fn(cand))
            finally:
                shutil.rmtree(cand, ignore_errors=True)

        single = {m: score_of([m], f"single-{i}") for i, m in enumerate(models)}
        order = sorted(models, key=lambda m: single[m], reverse=True)
        soup, best = [order[0]], single[order[0]]
        trace = [{"model": str(order[0]), "score_alone": single[order[0]], "soup_score": best, "added": True}]
        for i, cand in enumerate(order[1:]):
            s = score_of([*soup, cand], f"try-{i}")
            added = s >= best
            trace.append({"model": str(cand), "score_alone": single[cand], "soup_score": s, "added": added})
            log.info("greedy soup: %s -> %.6g (%s)", cand, s, "added" if added else "skipped")
            if added:
                soup.append(cand)
                best = s
        merge(soup, out, "average", overwrite=overwrite, **common)
        rec = json.loads((out / RECORD).read_text())
        rec.update({"method": "greedy_soup", "candidates": [str(m) for m in models], "soup": [str(m) for m in soup],
                    "score": best, "trace": trace})
        atomic_write_json(out / RECORD, rec)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
