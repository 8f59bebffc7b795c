"""Result files: one JSON file {task: result} per model, or a directory of <task>.json files.

The one owner of how results are stored, shared by our harness (`runner.py`) and the
lm-evaluation-harness backend (`lmeval.py`), so both write files the report reads alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dtm.errors import DtmError
from dtm.io import atomic_write_json, atomic_write_jsonl


class ResultStore:
    """Where results go: one JSON file {task: result}, or a directory of <task>.json files."""

    def __init__(self, out: str | os.PathLike | None):
        self.path = Path(out) if out is not None else None
        self.is_file = self.path is not None and self.path.suffix == ".json"
        if self.path is not None and not self.is_file and self.path.exists() and not self.path.is_dir():
            raise DtmError(f"{self.path}: is an existing file, but results without a .json name go into a directory "
                           "(one file per task); pass a .json file name or a directory")

    def _task_path(self, name: str) -> Path:
        assert self.path is not None
        return self.path / f"{name}.json"

    def load(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            if self.is_file:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                return data if isinstance(data, dict) else {}
            return {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in self.path.glob("*.json")}
        except (json.JSONDecodeError, OSError) as e:
            raise DtmError(f"{self.path}: existing results are unreadable ({e}); move the file away to start afresh") from None

    def save(self, name: str, result: dict[str, Any], samples: list[dict[str, Any]] | None) -> None:
        if self.path is None:
            return
        if self.is_file:
            current = self.load()
            current[name] = result
            atomic_write_json(self.path, current)
            samples_path = self.path.with_name(f"{self.path.stem}.{name}.samples.jsonl")
        else:
            atomic_write_json(self._task_path(name), result)
            samples_path = self.path / f"{name}.samples.jsonl"
        if samples is not None:
            atomic_write_jsonl(samples_path, samples)
