"""Reading model directories lazily and writing safetensors shards as a stream.

The merge reads element ranges with `ChunkReader` (`os.preadv` into chunk buffers). Whole
tensors (LoRA deltas, integer buffers, adapter files) use `safetensors.safe_open`, which
memory-maps the file; a file is opened per tensor and closed right after, so the pages of
tensors already merged leave this process.

Writing is our own small safetensors writer (`ShardWriter`), because `safetensors.save_file`
needs every tensor of a shard in memory at once; the format is an 8-byte header length, a
JSON header with each tensor's dtype, shape and byte offsets, then the raw bytes, so the
header can be written first (shapes are known from the inputs) and each tensor appended as
soon as it is merged. The files it writes are read back by `safe_open` in the tests. Large
shards bypass the page cache (`DirectFile`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from dtm.errors import DtmError
from dtm.fisher import ADAPTER_CONFIG  # the Fisher's file and PEFT's adapter config name, defined once there

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"

# Files that travel with a merged model: config, generation config, tokenizer, chat template.
CARRIED_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\..*|merges\.txt|.*\.model|chat_template\..*|preprocessor_config\.json)$"
)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MergeError(DtmError):
    """Bad merge input: the message names the model directory, file or tensor and what to do."""


def torch_dtype(name: str, what: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise MergeError(f"{what}: unknown dtype {name!r}; use one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1  # absolute byte offset of the data in `file` (for chunked reads)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file (name -> info), without reading any data."""
    try:
        with safe_open(file, framework="pt") as f:
            infos = {}
            for name in f.keys():
                s = f.get_slice(name)
                code = s.get_dtype()
                if code not in DTYPES:
                    raise MergeError(f"{file}: tensor {name!r} has dtype {code}, which dtm cannot merge")
                infos[name] = TensorInfo(name, file, tuple(s.get_shape()), DTYPES[code])
    except SafetensorError as e:
        raise MergeError(
            f"{file}: not a readable safetensors file ({e}); the file is corrupt or truncated: "
            "save the model again with save_pretrained or copy it again"
        ) from None
    except OSError as e:
        raise MergeError(f"{file}: cannot read ({e})") from None
    # safe_open validated the file; the header also gives each tensor's byte offset, which
    # safe_open does not expose and the chunked reader (`ChunkReader`) needs.
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {name: replace(i, offset=8 + n + header[name]["data_offsets"][0]) for name, i in infos.items()}


def read_tensor(info: TensorInfo, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor, memory-mapped (converted to `dtype` if given; then it is a copy)."""
    try:
        with safe_open(info.file, framework="pt") as f:
            t = f.get_tensor(info.name)
    except SafetensorError as e:
        raise MergeError(f"{info.file}: cannot read tensor {info.name!r} ({e}); the file is corrupt") from None
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


class ChunkReader:
    """Reads element ranges of tensors into given buffers with `os.preadv` (no mmap).

    Why not the memory map here: an elementwise merge visits each input element once, so a
    small chunk buffer per model replaces whole-tensor temporaries, and the mapped pages never
    count toward our resident memory. Not thread-safe: one thread (the merge's reader) uses it.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read(self, info: TensorInfo, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [start, start + out.numel()) of the tensor, flattened, into `out` (info.dtype)."""
        return self.read_pieces(info, [(start, out.numel())], out)

    def read_pieces(self, info: TensorInfo, pieces: Sequence[tuple[int, int]], out: torch.Tensor) -> torch.Tensor:
        """The tensor's elements at each (start, length) of `pieces`, one after another, into
        `out` (info.dtype, as many elements as the pieces hold). One buffer for all of them:
        TIES' threshold sample is 64 small pieces per input, and a tensor per piece cost more
        than the reads."""
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        raw = out.view(torch.uint8).numpy()
        size, at = out.element_size(), 0
        for start, m in pieces:
            view = raw[at:at + m * size]
            if os.preadv(fd, [view], info.offset + start * size) != view.nbytes:
                raise MergeError(f"{info.file}: tensor {info.name!r} ends early (file truncated?); copy the model again")
            at += m * size
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MergeError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------- full models


@dataclass
class Checkpoint:
    """A full model saved with `save_pretrained` (safetensors, single or sharded), read lazily."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] = field(default_factory=dict)
    _tied: dict[str, str] | None = None

    @property
    def label(self) -> str:
        return str(self.path)

    def info(self, name: str) -> TensorInfo | None:
        """The stored tensor for `name`; a tied output embedding resolves to the input embedding."""
        if name in self.tensors:
            return self.tensors[name]
        alias = self.tied_aliases().get(name)
        return self.tensors.get(alias) if alias else None

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.info(name)
        if info is None:
            raise MergeError(f"{self.label}: has no tensor {name!r}")
        return read_tensor(info, dtype)

    def tied_aliases(self) -> dict[str, str]:
        """{output-embedding name: input-embedding name} when the config ties them, else {}.

        `save_pretrained` drops the tied `lm_head.weight`; a merge with an untied model still
        needs it, and it is (by definition of tying) the input embedding.
        """
        if self._tied is None:
            self._tied = tied_aliases(self.config, self.tensors)
        return self._tied


def tied_aliases(config: dict[str, Any], names: Iterable[str]) -> dict[str, str]:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if not (text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))):
        return {}
    names = list(names)
    inputs = [n for n in names if re.search(r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$", n)]
    if len(inputs) != 1:
        return {}
    return {"lm_head.weight": inputs[0]}


def open_checkpoint(path: Path, allow_pickle: bool = False) -> Checkpoint:
    """Open a full-model directory; refuses pickle weights unless `allow_pickle`."""
    config_file = path / "config.json"
    config = _load_json(config_file) if config_file.is_file() else {}
    if (path / SAFE_INDEX).is_file():
        index = _load_json(path / SAFE_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError(f"{path / SAFE_INDEX}: has no 'weight_map'; the index is damaged: save the model again")
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values()), key=str):
            file = path / shard
            if not file.is_file():
                missing = sorted(n for n, s in weight_map.items() if s == shard)
                raise MergeError(
                    f"{path}: shard {shard} is missing (listed in {SAFE_INDEX} for {len(missing)} tensors, "
                    f"e.g. {missing[0]!r}); copy the complete model directory"
                )
            tensors.update(read_header(file))
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].file.name != Path(shard).name:
                raise MergeError(f"{path}: {SAFE_INDEX} says tensor {name!r} is in {shard}, but it is not there")
        return Checkpoint(path, tensors, config)
    if (path / SAFE_SINGLE).is_file():
        return Checkpoint(path, read_header(path / SAFE_SINGLE), config)
    if (path / PICKLE_SINGLE).is_file() or (path / PICKLE_INDEX).is_file():
        if not allow_pickle:
            raise MergeError(
                f"{path}: has only pickle weights ({PICKLE_SINGLE}); loading pickle can run arbitrary code. "
                "Convert it to safetensors (load it and save_pretrained), or pass --allow-pickle "
                "(allow_pickle=True) if you trust its source"
            )
        return _pickle_checkpoint(path, config)
    found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else []
    raise MergeError(
        f"{path}: no model weights found (expected {SAFE_SINGLE}, {SAFE_INDEX} or a PEFT adapter with "
        f"{ADAPTER_CONFIG}); the directory holds {found or 'nothing'}"
    )


def _pickle_checkpoint(path: Path, config: dict[str, Any]) -> Checkpoint:
    """Convert pickle weights to a temporary safetensors file once (only with --allow-pickle).

    `torch.load(weights_only=True)` refuses arbitrary objects; the converted copy lets the rest
    of the engine stream as usual. It lives in a private temporary directory, removed at exit.
    """
    import atexit
    import shutil
    import tempfile

    from safetensors.torch import save_file

    files = [path / PICKLE_SINGLE]
    if (path / PICKLE_INDEX).is_file():
        files = [path / s for s in sorted(set(_load_json(path / PICKLE_INDEX)["weight_map"].values()))]
    tmp = Path(tempfile.mkdtemp(prefix="dtm-unpickled-"))
    atexit.register(shutil.rmtree, tmp, True)
    tensors: dict[str, TensorInfo] = {}
    for i, file in enumerate(files):
        if not file.is_file():
            raise MergeError(f"{path}: shard {file.name} is missing; copy the complete model directory")
        state = torch.load(file, map_location="cpu", weights_only=True)
        out = tmp / f"{i}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, out, metadata={"format": "pt"})
        tensors.update(read_header(out))
        del state
    return Checkpoint(path, tensors, config)


# ---------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not m:
        raise MergeError(f"max_shard_size: cannot read {size!r}; write e.g. 5GB or 500MB")
    unit = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m.group(2) or ""]
    return int(float(m.group(1)) * unit)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int, stem: str = "model") -> list[str]:
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


# Shards at least this large are written past the page cache (`DirectFile`); smaller ones
# (tests, small models) are not worth a synchronous write per buffer.
DIRECT_MIN_BYTES = 64 << 20


class DirectFile:
    """A new file written with O_DIRECT from page-aligned staging buffers by a thread of its own,
    where the OS and file system allow it; plain buffered writes where they do not (no O_DIRECT,
    tmpfs, a device that wants another alignment).

    Why: a merge writes gigabytes once and never reads them back. Through the page cache each
    written byte is copied into a newly allocated cache page, which on a machine whose cache is
    full of the inputs means reclaiming a page first: kernel CPU taken from the merge's compute,
    and a lot of it, varying run to run (docs/architecture.md, "Merging", has the measurements).
    Direct writes cost one copy into a staging buffer; the thread keeps the disk busy (one
    buffer on its way while the next fills) and waiting for it uses no core. The last partial
    block goes through the page cache (O_DIRECT sizes are block multiples).
    """

    ALIGN = 4096  # the largest logical block size in common use: offsets and sizes stay multiples of it
    BUFFER = 8 << 20
    BUFFERS = 3

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0)
        try:
            self._fd = os.open(path, flags | direct, 0o666)
            self.direct = bool(direct)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._fd = os.open(path, flags, 0o666)  # the file system refuses O_DIRECT
            self.direct = False
        self._maps = [mmap.mmap(-1, self.BUFFER) for _ in range(self.BUFFERS)]  # anonymous maps are page-aligned
        self._writes: list[Future[None] | None] = [None] * self.BUFFERS  # each buffer's write in flight
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="dtm-merge-direct-write")
        self._current = 0
        self._filled = 0

    def _buffer(self, i: int) -> np.ndarray:
        return np.frombuffer(self._maps[i], dtype=np.uint8)

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        src = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        while src.size:
            n = min(src.size, self.BUFFER - self._filled)
            self._buffer(self._current)[self._filled:self._filled + n] = src[:n]
            self._filled += n
            src = src[n:]
            if self._filled == self.BUFFER:
                self._submit(self.BUFFER)

    def _submit(self, n: int) -> None:
        """Hand the current buffer's first n bytes to the thread, then wait until the next buffer is free."""
        self._writes[self._current] = self._disk.submit(self._write_out, self._current, n)
        self._current = (self._current + 1) % self.BUFFERS
        self._filled = 0
        pending = self._writes[self._current]
        if pending is not None:
            pending.result()  # raises the thread's error, if it had one
            self._writes[self._current] = None

    def _write_out(self, i: int, n: int) -> None:
        view = memoryview(self._maps[i])[:n]
        try:
            while view.nbytes:
                try:
                    view = view[os.write(self._fd, view):]
                except OSError as e:
                    if not (self.direct and e.errno == errno.EINVAL):
                        raise
                    self._buffered()  # another alignment wanted (or a short write left one): carry on buffered
        finally:
            view.release()

    def _buffered(self) -> None:
        if self.direct:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False

    def close(self) -> None:
        """Write what is left and close the file; raises the first write's error, if any."""
        if self._fd < 0:
            return
        try:
            tail = self._filled % self.ALIGN
            if self._filled > tail:  # the whole blocks, direct
                whole = self._filled - tail
                rest = self._buffer(self._current)[whole:self._filled].copy()
                self._submit(whole)
                self._buffer(self._current)[:tail] = rest
                self._filled = tail
            self._disk.shutdown(wait=True)
            for pending in self._writes:
                if pending is not None:
                    pending.result()
            self._buffered()
            self._write_out(self._current, self._filled)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file without writing what is buffered (the merge failed; the file goes with its directory)."""
        if self._fd >= 0:
            self._disk.shutdown(wait=True, cancel_futures=True)
            os.close(self._fd)
            self._fd = -1
            for m in self._maps:
                m.close()


class ShardWriter:
    """Writes one safetensors file: header first, then each tensor's bytes as it arrives, in plan order."""

    def __init__(self, file: Path, plan: Sequence[PlannedTensor], metadata: dict[str, str] | None = None):
        self.file = file
        self.plan = list(plan)
        self._next = 0
        self._written = 0  # elements of plan[_next] written so far
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for t in self.plan:
            header[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._f: Any = DirectFile(file) if offset >= DIRECT_MIN_BYTES else open(file, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one whole tensor."""
        expected = self.plan[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(f"writer expected {expected}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self.append(name, tensor.reshape(-1))
        self.end(name)

    def append(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next flat piece of tensor `name` (the merge's writer thread calls this per chunk)."""
        expected = self.plan[self._next]
        if name != expected.name or chunk.dtype != expected.dtype or self._written + chunk.numel() > math.prod(expected.shape):
            raise RuntimeError(f"writer expected {expected} ({self._written} elements written), got {name} "
                               f"{chunk.numel()} elements {chunk.dtype}")
        self._append(chunk)
        self._written += chunk.numel()

    def end(self, name: str) -> None:
        """Tensor `name` is complete: check its size and move on to the next in the plan."""
        expected = self.plan[self._next]
        if name != expected.name or self._written != math.prod(expected.shape):
            raise RuntimeError(f"writer expected {expected}, got {name} with {self._written} elements")
        self._next += 1
        self._written = 0

    def _append(self, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.write(data)

    def close(self) -> None:
        # No fsync, as in transformers' save_pretrained: the output directory only appears
        # (by rename) after every shard is closed, which is what protects against a crash
        # of the merge; flushing gigabytes to the platter is the OS's business.
        if self._next != len(self.plan):
            raise RuntimeError(f"{self.file}: {len(self.plan) - self._next} tensors were not written")
        self._f.close()

    def abort(self) -> None:
        (self._f.abort if isinstance(self._f, DirectFile) else self._f.close)()
