"""Atomic writes: every output appears complete under its final name or not at all.

A crash mid-write leaves at most a `.NAME.tmp-<pid>.<start>@<host>-*` sibling behind, never a
truncated file or a half-filled directory that a rerun would mistake for finished work; the
writer's identity in the name lets a later run remove the temporaries whose writer is gone
(`remove_stale_temporaries`) without touching a live writer's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dtm.errors import OutputError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
# how a write error reads when it comes through a library that keeps only the message (safetensors' Rust writer)
_DISK_FULL_TEXT = ("no space left", "file too large", "filetoolarge", "storagefull", "disk quota", "code: 28,", "code: 27,")


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk (or quota, or the file size limit) ran out."""
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return True
    text = str(e).lower()
    return any(t in text for t in _DISK_FULL_TEXT)


def output_error(e: BaseException, path: str | os.PathLike, what: str = "writing it") -> OutputError:
    """The user-facing error for a failed write to `path`: disk full, or the path cannot be made."""
    if is_disk_full(e):
        return OutputError(f"{path}: the disk is full (or the file size limit was hit) while {what}; nothing was marked "
                           "complete; free space (or raise the limit) and rerun the same command")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    if isinstance(e, OSError) and e.filename and str(e.filename) != str(path):
        reason = f"{reason}: {e.filename}"
    hint = ("a parent of it is a regular file, or it is one; choose another path"
            if isinstance(e, (NotADirectoryError, FileExistsError)) else "check the path and its permissions, or choose another path")
    return OutputError(f"{path}: cannot write there while {what} ({reason}); {hint}")


def bad_safetensors(model_dir: str | os.PathLike) -> str | None:
    """A message naming the first `*.safetensors` file of `model_dir` that is corrupt or truncated, or None.

    Cheap: reads each header and checks the data covers it (safetensors' own validation)."""
    from safetensors import SafetensorError, safe_open

    root = Path(model_dir)
    for f in sorted(root.glob("*.safetensors")) if root.is_dir() else []:
        try:
            with safe_open(f, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return (f"{f}: not a readable safetensors file ({e}); the file is corrupt or truncated: "
                    "save the model again with save_pretrained, or copy it again")
    return None


def make_dirs(path: str | os.PathLike, what: str = "creating the output directory") -> Path:
    """`mkdir -p path`, with an `OutputError` naming the path when it cannot be made (a regular file on the way,
    no permission, a read-only or pseudo file system)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(e, path, what) from None
    if not path.is_dir():
        raise output_error(NotADirectoryError(errno.ENOTDIR, "not a directory"), path, what)
    return path


# ---------------------------------------------------------------- temporaries and their owners

TMP_MARK = ".tmp-"
# `.NAME.tmp-<pid>.<start>@<host>-<random>`: tempfile's random suffix has no '-', a host name may
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)\.(?P<start>\d+)@(?P<host>.+)-(?P<rand>[A-Za-z0-9_]+)$")


def _start_time(pid: int) -> int:
    """When process `pid` started (clock ticks since boot, Linux /proc), 0 where unknown or gone.

    With the pid it names a process uniquely: a container restarts pid numbering, so a rerun
    may get the very pid of the run that was killed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the (comm) field
    except (OSError, ValueError, IndexError):
        return 0


def temp_prefix(name: str) -> str:
    """The prefix of a temporary this process writes for the output `name` (beside it): who wrote it is in the name."""
    pid = os.getpid()
    return f".{name}{TMP_MARK}{pid}.{_start_time(pid)}@{socket.gethostname()}-"


def writer_is_gone(pid: int, start: int, host: str) -> bool:
    """Whether the process that wrote a temporary has ended (never guessed for another host's writer)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return bool(start) and _start_time(pid) not in (0, start)  # the pid was reused by a later process


def stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """The temporaries under `root` (any depth) whose writer on this host has ended, e.g. by `kill -9`."""
    found = []
    for parent, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            m = _TMP_NAME.match(name)
            if m and writer_is_gone(int(m["pid"]), int(m["start"]), m["host"]):
                found.append(Path(parent) / name)
        dirs[:] = [d for d in dirs if TMP_MARK not in d]  # nothing to find inside a temporary
    return found


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left under `root` (a live writer's temporaries are kept); -> what was removed."""
    stale = stale_temporaries(root) if Path(root).is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return stale


# ---------------------------------------------------------------- atomic writes


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via a temporary file in the same directory and a rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    """The process's umask (reading it means setting it; set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same directory, fsync, and a rename:
    a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    _make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name))
    except OSError as e:
        raise output_error(e, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; an output gets the mode a plain open() would give
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise output_error(e, path) from None
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_text(
        path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )


def _make_parent(path: Path) -> None:
    """The parent directory of the output `path`; an error names `path` itself (what the user gave)."""
    try:
        make_dirs(path.parent)
    except OutputError:
        raise output_error(NotADirectoryError(errno.ENOTDIR, f"cannot create its directory {path.parent}"), path,
                           "creating its directory") from None


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to `path` only if the block succeeds.

    With `overwrite`, an existing `path` is replaced only after the new one is complete.
    A full disk inside the block (an `OSError`, or a library's error that says so) becomes an
    `OutputError` naming `path`; nothing is left under `path`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    if path.exists() and not path.is_dir():
        raise output_error(NotADirectoryError(errno.ENOTDIR, "it is a regular file, not a directory"), path)
    _make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path.name)))
    except OSError as e:
        raise output_error(e, path) from None
    try:
        try:
            yield tmp
        except OutputError as e:
            raise OutputError(str(e).replace(str(tmp), str(path))) from None  # name the output, not our staging dir
        except Exception as e:
            if is_disk_full(e):
                raise output_error(e, path) from None
            raise
        if path.exists():
            old = path.with_name(temp_prefix(path.name) + "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
