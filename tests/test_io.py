"""Atomic writes: the whole file or the old one, and the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat

from dtm.io import atomic_write_json, atomic_write_text


def test_an_atomic_write_gets_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "result.json", {"acc": 1.0})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        private = atomic_write_text(tmp_path / "private.txt", "x")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.txt", "result.json"]  # no temporaries left
