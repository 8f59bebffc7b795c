"""Loaders and templates, on hand-built examples."""

import json

import pytest

from dtm.data.formats import load_conversations
from dtm.data.template import (
    ALPACA_PROMPT,
    IGNORE_INDEX,
    conversation,
    format_prompt,
    prompt_ids,
    tokenize_conversation,
    tokenize_conversations,
)
from dtm.errors import DataError


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ALPACA = {"instruction": "Name a colour", "input": "", "output": "Blue.", "source": "a"}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour"}, {"from": "gpt", "value": "Blue."}]}
MESSAGES = {"messages": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue."}], "id": "m1"}
PROMPT_COMPLETION = {"prompt": "Name a colour", "completion": "Blue."}


@pytest.mark.parametrize("record, fmt", [(ALPACA, "alpaca"), (SHAREGPT, "sharegpt"), (MESSAGES, "messages"), (PROMPT_COMPLETION, "prompt_completion")])
def test_each_schema_normalises_to_the_same_turn(tmp_path, record, fmt):
    data = load_conversations(jsonl(tmp_path / "d.jsonl", [record]))
    assert data.format == fmt
    conv = data.conversations[0]
    assert (conv.instruction, conv.response) == ("Name a colour", "Blue.")


def test_alpaca_input_source_and_extra_fields(tmp_path):
    rec = {"instruction": "Translate", "input": "chat", "output": "cat", "source": "dolly", "quality": 3}
    conv = load_conversations(jsonl(tmp_path / "d.jsonl", [rec])).conversations[0]
    assert conv.instruction == "Translate\n\nchat"
    assert conv.source == "dolly" and conv.meta == {"quality": 3}


def test_json_parquet_and_datasets_dir(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [ALPACA, {**ALPACA, "output": "Red."}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for name in ("d.json", "d.parquet", "ds"):
        data = load_conversations(tmp_path / name)
        assert [c.response for c in data.conversations] == ["Blue.", "Red."], name


def test_trl_conversational_prompt_completion(tmp_path):
    rec = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]}
    conv = load_conversations(jsonl(tmp_path / "d.jsonl", [rec])).conversations[0]
    assert (conv.instruction, conv.response) == ("hi", "hello")


BAD = [
    ('{"instruction": "a", "output": "b"', "invalid JSON"),
    ({"instruction": "a"}, "missing field 'output'"),
    ({"question": "a"}, "cannot tell the data format"),
    ({"instruction": "a", "output": ""}, "empty response"),
    ({"instruction": "  ", "output": "b"}, "empty instruction"),
    ({"instruction": "a", "output": 3}, "field 'output' must be a string"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "not a known role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ([1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_record_names_file_and_line(tmp_path, bad, message):
    if message in ("cannot tell the data format", "missing field 'output'"):  # the first good record decides the format
        path = jsonl(tmp_path / "d.jsonl", [bad])
        with pytest.raises(DataError, match=rf"{path}:1: {message}"):
            load_conversations(path)
        return
    first = SHAREGPT if "conversations" in str(bad) else MESSAGES if "messages" in str(bad) else ALPACA
    path = jsonl(tmp_path / "d.jsonl", [first, bad])  # the bad record is on line 2
    with pytest.raises(DataError, match=rf"{path}:2: .*{message}"):
        load_conversations(path)


def test_skip_counts_instead_of_failing(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [ALPACA, '{"broken', {"instruction": "a", "output": ""}, {**ALPACA, "output": "Red."}])
    data = load_conversations(path, on_bad_example="skip")
    assert len(data) == 2
    assert [b.where for b in data.skipped] == [f"{path}:2", f"{path}:3"]
    assert "empty response" in data.skipped[1].reason


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_conversations(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(ALPACA).encode() + b"\n" + '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=rf"{latin}:2: not valid UTF-8"):
        load_conversations(latin)
    with pytest.raises(DataError, match="not found"):
        load_conversations(tmp_path / "nope.jsonl")
    bad_json = tmp_path / "b.json"
    bad_json.write_text('[\n{"instruction": "a", "output": "b"},\n{oops}\n]')
    with pytest.raises(DataError, match=rf"{bad_json}:3: invalid JSON"):
        load_conversations(bad_json)
    dup = jsonl(tmp_path / "dup.jsonl", [MESSAGES, MESSAGES])
    with pytest.raises(DataError, match="duplicate example id 'm1'"):
        load_conversations(dup)
    allbad = jsonl(tmp_path / "allbad.jsonl", [{"instruction": "a", "output": ""}])
    with pytest.raises(DataError, match="no usable examples"):
        load_conversations(allbad, on_bad_example="skip")


# ---------------------------------------------------------------- template


def test_alpaca_mask_covers_exactly_response_and_eos(tokenizer):
    conv = conversation("Name a colour", "Blue.")
    example, truncated = tokenize_conversation(conv, tokenizer, "alpaca")
    prompt = [tokenizer.bos_token_id] + tokenizer(ALPACA_PROMPT.format(instruction="Name a colour"), add_special_tokens=False)["input_ids"]
    response = tokenizer("Blue.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + response
    assert example["attention_mask"] == [1] * (len(prompt) + len(response))
    assert not truncated
    assert prompt_ids(tokenizer, "Name a colour") == prompt


def test_chat_template_mask_positions(tokenizer):
    conv = conversation("hi", "yo")
    example, _ = tokenize_conversation(conv, tokenizer, "chat")
    text = tokenizer.decode(example["input_ids"])
    assert text == "<s><|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n"
    trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])
    assert trained == "yo<|end|>\n"
    first = example["labels"].index(next(label for label in example["labels"] if label != IGNORE_INDEX))
    assert example["input_ids"][:first] == prompt_ids(tokenizer, "hi", "chat")
    assert format_prompt("hi", "chat", tokenizer) == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"


def test_first_turn_only_versus_all_turns(tokenizer):
    from dtm.data.formats import Conversation, Message

    conv = Conversation([Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "d")], id="x")
    first, _ = tokenize_conversation(conv, tokenizer, "alpaca", first_turn_only=True)
    both, _ = tokenize_conversation(conv, tokenizer, "alpaca", first_turn_only=False)

    def trained(ex):
        return tokenizer.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX])

    assert trained(first) == "b</s>"
    assert trained(both) == "b</s>d</s>"
    assert both["input_ids"][: len(first["input_ids"])] == first["input_ids"]


def test_truncation_and_dropping_are_counted(tokenizer):
    n_prompt = len(prompt_ids(tokenizer, "a"))
    convs = [conversation("a", "b c d e f", id="keep"), conversation("a", "b c d e f", id="cut"), conversation("a" * 200, "b", id="gone")]
    full, _ = tokenize_conversation(convs[0], tokenizer, "alpaca", cutoff_len=1024)
    cutoff = n_prompt + 2
    examples, stats = tokenize_conversations(convs, tokenizer, "alpaca", cutoff_len=cutoff)
    assert stats.examples == 3 and stats.truncated == 3 and stats.dropped == 1 and stats.dropped_ids == ["gone"]
    assert len(examples) == 2 and all(len(e["input_ids"]) == cutoff for e in examples)
    assert examples[0]["labels"][-2:] == full["labels"][n_prompt : n_prompt + 2]
    assert stats.response_tokens == 4


def test_hub_names_are_recognised_and_fail_clearly_offline(tmp_path, monkeypatch):
    from dtm.data.formats import looks_like_hub_id

    assert looks_like_hub_id("allenai/tulu-v2-sft-mixture") and looks_like_hub_id("tatsu-lab/alpaca:train")
    assert not looks_like_hub_id("data/train.jsonl") and not looks_like_hub_id("./a/b") and not looks_like_hub_id("train.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="owner-x/no-such-set: not a local file, and loading it from the Hugging Face Hub failed"):
        load_conversations("owner-x/no-such-set")


def test_a_local_looking_path_fails_at_once_without_trying_the_hub(tmp_path, monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"mydata/train: data file not found \(mydata/ is a local directory"):
        load_conversations("mydata/train")
    assert time.perf_counter() - t0 < 2


def test_skip_a_bad_first_record_and_detect_the_format_from_the_first_good_one(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"instruction": "no output"}, {"x": 1}, MESSAGES, MESSAGES | {"id": "m2"}])
    data = load_conversations(path, on_bad_example="skip")
    assert data.format == "messages" and len(data) == 2 and [b.where for b in data.skipped] == [f"{path}:1", f"{path}:2"]
    assert "missing field 'output'" in data.skipped[0].reason
