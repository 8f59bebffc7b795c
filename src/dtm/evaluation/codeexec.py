"""Run model-written programs (HumanEval, MBPP) only in a locked-down subprocess.

Callers reach this only with an explicit opt-in (`allow_code_execution=True`). Each program
runs in a fresh `python -I` (isolated: no user site, no PYTHON* env) in an empty temporary
directory, with a wall-clock timeout, CPU/memory/file-size limits, no network (sockets are
disabled before the program runs; on Linux a network namespace is used where `unshare` can
make one), and a minimal environment. This is the same containment lm-eval and the
HumanEval reference use; it is not a security boundary against a determined attacker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

_PRELUDE = """
import socket as _s
def _no_net(*a, **k):
    raise OSError("network access is disabled during code evaluation")
_s.socket = _no_net; _s.create_connection = _no_net; _s.getaddrinfo = _no_net
del _s
"""


def _limits(memory_mb: int, cpu_s: int):
    def apply() -> None:
        import resource

        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    return apply


def _netns_prefix() -> list[str]:
    """`unshare -rn` puts the program in an empty network namespace, if this system allows it."""
    exe = shutil.which("unshare")
    if exe is None or sys.platform != "linux":
        return []
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return [exe, "-rn"] if ok else []


def run_program(program: str, timeout_s: float = 5.0, memory_mb: int = 1024, prefix: list[str] | None = None) -> tuple[bool, str]:
    """-> (passed, 'passed' | 'timed out' | the last line of the error)."""
    prefix = _netns_prefix() if prefix is None else prefix
    with tempfile.TemporaryDirectory(prefix="dtm-code-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_PRELUDE + "\n" + program)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.run(
                prefix + [sys.executable, "-I", path], cwd=tmp, env=env, capture_output=True, text=True,
                timeout=timeout_s, preexec_fn=_limits(memory_mb, int(timeout_s) + 1), stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return False, "timed out"
    if proc.returncode == 0:
        return True, "passed"
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return False, lines[-1][:300] if lines else f"exit status {proc.returncode}"


def run_programs(programs: list[str], timeout_s: float = 5.0, progress: bool = False) -> list[tuple[bool, str]]:
    from tqdm.auto import tqdm

    prefix = _netns_prefix()
    return [run_program(p, timeout_s, prefix=prefix) for p in tqdm(programs, desc="code", disable=not progress, leave=False)]
