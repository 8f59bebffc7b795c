"""Load instruction data as it comes and normalise it to one type: `Conversation`.

Containers: JSON (a list of records), JSONL, Parquet, a local Hugging Face `datasets`
directory (`save_to_disk`). Record schemas (auto-detected from the first record's fields,
or forced with `format=`):

- alpaca:            {"instruction", "input"?, "output"}
- sharegpt:          {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
- messages:          {"messages": [{"role": "system"|"user"|"assistant", "content"}]}  (OpenAI)
- prompt_completion: {"prompt", "completion"}  (strings, or message lists as in TRL)

A bad record is an error naming the file and line (JSONL line, or record number for JSON,
Parquet and datasets dirs); with `on_bad_example="skip"` it is skipped and counted instead.
Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dtm.errors import DataError

Role = Literal["system", "user", "assistant"]
Format = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion"]

SHAREGPT_ROLES: dict[str, Role] = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass
class Conversation:
    """One training example: messages, a stable id, its source (if known) and extra fields."""

    messages: list[Message]
    id: str
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def instruction(self) -> str:
        """The first user turn (what the paper trains on, with `response`)."""
        return next(m.content for m in self.messages if m.role == "user")

    @property
    def response(self) -> str:
        return next(m.content for m in self.messages if m.role == "assistant")

    def to_record(self) -> dict[str, Any]:
        """The `messages` schema plus id/source/meta: what portions are written as."""
        rec: dict[str, Any] = {"id": self.id, "messages": [{"role": m.role, "content": m.content} for m in self.messages]}
        if self.source is not None:
            rec["source"] = self.source
        if self.meta:
            rec["meta"] = self.meta
        return rec


@dataclass
class BadExample:
    where: str  # "file:line"
    reason: str


@dataclass
class LoadedData:
    conversations: list[Conversation]
    format: str
    path: Path
    skipped: list[BadExample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.conversations)


class _Bad(Exception):
    """A record that cannot become a conversation (internal; becomes DataError or a skip)."""


# ---------------------------------------------------------------- containers


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` (optionally `:split`) that is not a local path: a Hugging Face Hub data set."""
    parts = name.split(":")[0].split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and "." not in parts[1][-8:]


def hub_refusal(name: str) -> str | None:
    """Why the missing local path `name` is not tried on the Hub (a message naming it), or None to try it.

    Trying the Hub for a name that is not there takes tens of seconds of retries; a name whose
    first part is a local directory (`mydata/train` beside `mydata/`) is a path the user meant.
    """
    owner = name.split(":")[0].split("/")[0]
    if Path(owner).is_dir():
        return (f"{name}: data file not found ({owner}/ is a local directory, so this is a local path, not a Hugging Face "
                "Hub data set); check the file name and its extension")
    return None  # offline, `datasets` answers at once from its cache (or fails at once): no retries to save


def _iter_hub(name: str) -> Iterator[tuple[str, Any]]:
    """A data set from the Hugging Face Hub (`owner/name[:split]`, default split `train`)."""
    refusal = hub_refusal(name)
    if refusal:
        raise DataError(refusal)
    import datasets

    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:
        raise DataError(f"{name}: not a local file, and loading it from the Hugging Face Hub failed ({type(e).__name__}: {e}); "
                        "give a local path, or check the data set name and your network") from None
    for i, rec in enumerate(ds):
        yield f"{name}:row {i + 1}", rec


def _iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) for every record in the file or directory."""
    if not path.exists():
        yield from _iter_hub(str(path))
        return
    if path.is_dir():
        yield from _iter_hf_disk(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it must hold at least one example")
    stripped = text.lstrip()
    if suffix == ".json" or (suffix != ".jsonl" and stripped.startswith("[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if isinstance(data, dict):
            # {"data": [...]} / {"train": [...]}: take the single list-valued key.
            lists = [k for k, v in data.items() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a JSON list of records (or one key holding it), got an object with keys {sorted(data)[:8]}")
            data = data[lists[0]]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path}:record {i + 1}", rec
        return
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit raw inside a JSON string
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", _Bad(f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        yield f"{path}:{lineno}", rec


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {e}") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path}:row {i + 1}", rec


def _iter_hf_disk(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a `datasets` directory written by save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    for i, rec in enumerate(ds):
        yield f"{path}:row {i + 1}", rec


# ---------------------------------------------------------------- schemas


def detect_format(record: Any, where: str) -> str:
    try:
        return _detect(record)
    except _Bad as e:
        raise DataError(f"{where}: {e}") from None


# one field of a pair present: the record is that format with the other field missing
_HALF_PAIRS = (("instruction", "output", "alpaca"), ("output", "instruction", "alpaca"),
               ("prompt", "completion", "prompt/completion"), ("completion", "prompt", "prompt/completion"))


def _detect(record: Any) -> str:
    if not isinstance(record, dict):
        raise _Bad(f"expected a JSON object per example, got {type(record).__name__}")
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    for present, missing, name in _HALF_PAIRS:
        if present in keys:
            raise _Bad(f"missing field {missing!r} (the record has {present!r}, so it looks like {name}; its fields: {sorted(keys)})")
    raise _Bad(
        f"cannot tell the data format from the fields {sorted(keys)}; expected alpaca "
        "(instruction/input/output), sharegpt (conversations), messages, or prompt/completion. "
        "Rename the fields or pass the format explicitly"
    )


def _text(rec: dict, key: str, required: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise _Bad(f"missing field {key!r}")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise _Bad(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _from_alpaca(rec: dict) -> list[Message]:
    instruction = _text(rec, "instruction")
    extra = _text(rec, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs = []
    if rec.get("system"):
        msgs.append(Message("system", _text(rec, "system")))
    return msgs + [Message("user", user), Message("assistant", _text(rec, "output"))]


def _from_role_list(items: Any, field_name: str, role_key: str, content_key: str, roles: dict[str, Role]) -> list[Message]:
    if not isinstance(items, list):
        raise _Bad(f"field {field_name!r} must be a list of turns, got {type(items).__name__}")
    msgs = []
    for j, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise _Bad(f"{field_name}[{j}] must be an object, got {type(turn).__name__}")
        if role_key not in turn or content_key not in turn:
            raise _Bad(f"{field_name}[{j}] needs {role_key!r} and {content_key!r}")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise _Bad(f"{field_name}[{j}].{role_key} = {turn[role_key]!r} is not a known role ({sorted(set(roles))})")
        content = turn[content_key]
        if not isinstance(content, str):
            raise _Bad(f"{field_name}[{j}].{content_key} must be a string")
        msgs.append(Message(role, content))
    return msgs


_OPENAI_ROLES: dict[str, Role] = {"system": "system", "user": "user", "assistant": "assistant"}


def _from_prompt_completion(rec: dict) -> list[Message]:
    prompt, completion = rec.get("prompt"), rec.get("completion")
    if isinstance(prompt, list):
        msgs = _from_role_list(prompt, "prompt", "role", "content", _OPENAI_ROLES)
    else:
        msgs = [Message("user", _text(rec, "prompt"))]
    if isinstance(completion, list):
        msgs += _from_role_list(completion, "completion", "role", "content", _OPENAI_ROLES)
    else:
        msgs.append(Message("assistant", _text(rec, "completion")))
    return msgs


def _check_turns(msgs: list[Message]) -> None:
    roles = [m.role for m in msgs if m.role != "system"]
    if "user" not in roles:
        raise _Bad("no user turn")
    if "assistant" not in roles[roles.index("user"):]:
        raise _Bad("no assistant turn after the first user turn")
    first_user = next(m for m in msgs if m.role == "user")
    if not first_user.content.strip():
        raise _Bad("empty instruction (first user turn)")
    for m in msgs:
        if m.role == "assistant" and not m.content.strip():
            raise _Bad("empty response (assistant turn)")


def record_to_conversation(rec: Any, fmt: str, index: int, source_field: str | None = None) -> Conversation:
    """Normalise one record; raises `_Bad` with the reason if it cannot."""
    if not isinstance(rec, dict):
        raise _Bad(f"expected a JSON object, got {type(rec).__name__}")
    if fmt == "alpaca":
        msgs, used = _from_alpaca(rec), {"instruction", "input", "output", "system"}
    elif fmt == "sharegpt":
        msgs, used = _from_role_list(rec.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES), {"conversations"}
    elif fmt == "messages":
        msgs, used = _from_role_list(rec.get("messages"), "messages", "role", "content", _OPENAI_ROLES), {"messages"}
    elif fmt == "prompt_completion":
        msgs, used = _from_prompt_completion(rec), {"prompt", "completion"}
    else:
        raise DataError(f"unknown data format {fmt!r}")
    _check_turns(msgs)
    # `source` is where our own portion/split files keep it, whatever the user's field was called
    source_key = source_field if source_field in rec else next((k for k in ("source", "dataset") if k in rec), None)
    source = rec.get(source_key) if source_key else None
    if source_field and source_key is None:
        raise _Bad(f"missing source field {source_field!r}")
    meta = {k: v for k, v in rec.items() if k not in used | {"id", source_key}}
    if isinstance(meta.get("meta"), dict) and len(meta) == 1:
        meta = meta["meta"]  # our own portion files nest extra fields under "meta"
    rec_id = rec.get("id")
    return Conversation(
        messages=msgs,
        id=str(rec_id) if rec_id is not None else str(index),
        source=str(source) if source is not None else None,
        meta=meta,
    )


def _has_id(rec: Any) -> bool:
    return isinstance(rec, dict) and rec.get("id") is not None


def load_conversations(
    path: str | Path,
    format: Format = "auto",
    on_bad_example: Literal["error", "skip"] = "error",
    source_field: str | None = None,
    max_samples: int | None = None,
) -> LoadedData:
    """Read a data file or directory into conversations.

    Raises `DataError` naming the file and line for the first bad record, unless
    `on_bad_example="skip"`, in which case bad records are counted in `.skipped`.
    """
    path = Path(path)
    if not path.exists() and not looks_like_hub_id(str(path)):
        raise DataError(f"{path}: data file not found")
    if not path.exists() and (refusal := hub_refusal(str(path))):
        raise DataError(refusal)
    fmt = format
    conversations: list[Conversation] = []
    skipped: list[BadExample] = []
    implicit_where: dict[str, tuple[tuple[str, bool], ...]] = {}  # id -> (where, numbered by position?) per record
    for index, (where, rec) in enumerate(_iter_records(path)):
        try:
            if isinstance(rec, _Bad):
                raise rec
            # the format comes from the first good record (a bad first record skipped does not decide it)
            row_fmt = _detect(rec) if fmt == "auto" else fmt
            conversations.append(record_to_conversation(rec, row_fmt, index, source_field))
            fmt = row_fmt
            implicit_where[conversations[-1].id] = implicit_where.get(conversations[-1].id, ()) + ((where, not _has_id(rec)),)
        except _Bad as e:
            if on_bad_example == "error":
                raise DataError(f"{where}: {e} (fix the record, or set on_bad_example: skip to skip and count such records)") from None
            skipped.append(BadExample(where, str(e)))
        if max_samples is not None and len(conversations) >= max_samples:
            break
    if not conversations:
        detail = f"; all {len(skipped)} records were bad, first: {skipped[0].where}: {skipped[0].reason}" if skipped else ""
        raise DataError(f"{path}: no usable examples{detail}")
    ids = [c.id for c in conversations]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        (w1, implicit1), (w2, implicit2) = implicit_where[dup][:2]
        if implicit1 != implicit2:
            explicit_at, implicit_at = (w2, w1) if implicit1 else (w1, w2)
            raise DataError(f"{path}: duplicate example id {dup!r}: {explicit_at} has the explicit id {dup!r} and {implicit_at} has no "
                            f"`id`, so it is numbered by position ({dup}); give every record an id, or none")
        raise DataError(f"{path}: duplicate example id {dup!r} ({w1} and {w2}); ids must be unique "
                        "(remove the `id` field to number examples by position)")
    return LoadedData(conversations=conversations, format=fmt, path=path, skipped=skipped)


def load_texts(path: str | Path, field: str = "text", missing: str = "text corpus not found") -> list[str]:
    """Plain texts (replay corpora, Fisher samples): a `.txt` file (one text per non-empty line)
    or JSON/JSONL records with a string `field` (or `messages` / `instruction`+`output`, joined)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    if path.suffix not in (".json", ".jsonl"):
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = []
    for where, rec in _iter_records(path):
        if isinstance(rec, _Bad):
            raise DataError(f"{where}: {rec}")
        if isinstance(rec, dict) and isinstance(rec.get(field), str):
            texts.append(rec[field])
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            texts.append("\n".join(str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict)))
        elif isinstance(rec, dict) and "instruction" in rec:
            texts.append("\n".join(str(rec[k]) for k in ("instruction", "input", "output") if rec.get(k)))
        else:
            raise DataError(f"{where}: expected a record with a string field `{field}` (or messages / instruction+output)")
    return texts
