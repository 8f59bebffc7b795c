"""A corpus of bad inputs: every one stops with exit 2, one line naming the file (and line or key), no traceback.

One parametrised test over a case table (name, files to make, argv, expected substrings), run
in-process through `dtm.cli.main`. Valid look-alikes (a UTF-8 BOM, CRLF endings, a very long
line, unicode) must pass. Most cases load no model; those that do share the session's pico model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dtm.cli import main

GOOD = [{"instruction": f"Say {w}.", "output": f"{w}."} for w in ("one", "two", "three", "four", "five", "six")]


def jl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@dataclass
class Case:
    name: str
    files: dict[str, str | bytes | Callable[[Path, Path], None]]  # relative path -> content (or a maker(tmp, base))
    argv: list[str]  # {t}: the case's directory, {base}: the pico model
    expect: list[str] = field(default_factory=list)  # substrings of stderr ({t} expanded); the first names the file
    ok: bool = False  # a valid look-alike: exit 0
    xfail: str | None = None


def data_case(name, content, expect, fname="d.jsonl", extra=()) -> Case:
    return Case(name, {fname: content}, ["disperse", "{t}/" + fname, "--k", "2", "--out", "{t}/out", *extra], expect)


def _parquet(rows, corrupt=False):
    def make(t: Path, base: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), t / "d.parquet")
        if corrupt:
            (t / "d.parquet").write_bytes((t / "d.parquet").read_bytes()[:40])
    return make


def _model(kind: str):
    """A copy of the pico model, damaged as `kind` says."""
    def make(t: Path, base: Path) -> None:
        m = t / "m"
        shutil.copytree(base, m)
        w = m / "model.safetensors"
        if kind == "truncated":
            w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        elif kind == "corrupt":
            w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header}" + b"\0" * 64)
        elif kind == "garbage":
            w.write_bytes(b"hello")
        elif kind == "noconfig":
            (m / "config.json").unlink()
        elif kind == "badconfig":
            (m / "config.json").write_text("{ not json")
    return make


def _run_dir(manifest: str | None = None, config: str | None = None):
    def make(t: Path, base: Path) -> None:
        from dtm.config import load_config
        from dtm.io import atomic_write_json

        r = t / "run"
        cfg = load_config(None, [f"output_dir={r}", "data.path=x.jsonl"], check_paths=False)
        atomic_write_json(r / "config.json", cfg.model_dump(mode="json"))
        if config is not None:
            (r / "config.json").write_text(config)
        if manifest is not None:
            (r / "seed-42" / "manifests").mkdir(parents=True)
            (r / "seed-42" / "manifests" / "disperse.json").write_text(manifest)
    return make


MC = {"question": "2+2?", "choices": ["3", "4"], "answer": 1}
TASK_OK = jl([MC, MC])
D = "{t}/d.jsonl"

CASES: list[Case] = [
    # ---------------------------------------------------------------- data files (dtm disperse)
    data_case("jsonl-invalid-json", jl([GOOD[0], "{bad json", *GOOD[1:]]), ["d.jsonl:2", "invalid JSON"]),
    data_case("jsonl-truncated-last-line", jl(GOOD) + '{"instruction": "x", "outp', ["d.jsonl:7", "invalid JSON"]),
    data_case("jsonl-row-is-list", jl([[1, 2], *GOOD]), ["d.jsonl:1", "JSON object"]),
    data_case("jsonl-row-is-number", jl([*GOOD[:2], "3", *GOOD[2:]]), ["d.jsonl:3", "JSON object"]),
    data_case("alpaca-first-row-missing-output", jl([{"instruction": "hi"}, *GOOD]), ["d.jsonl:1", "missing field 'output'"]),
    data_case("alpaca-row-missing-output", jl([*GOOD, {"instruction": "hi"}]), ["d.jsonl:7", "missing field 'output'"]),
    data_case("alpaca-first-row-missing-instruction", jl([{"output": "hi"}, *GOOD]), ["d.jsonl:1", "missing field 'instruction'"]),
    data_case("alpaca-output-not-string", jl([{"instruction": "a", "output": 3}, *GOOD]), ["d.jsonl:1", "'output' must be a string"]),
    data_case("alpaca-input-not-string", jl([*GOOD, {"instruction": "a", "input": [1], "output": "b"}]), ["d.jsonl:7", "'input'"]),
    data_case("alpaca-empty-instruction", jl([*GOOD, {"instruction": "  ", "output": "b"}]), ["d.jsonl:7", "empty instruction"]),
    data_case("alpaca-empty-output", jl([*GOOD, {"instruction": "a", "output": ""}]), ["d.jsonl:7", "empty response"]),
    data_case("alpaca-null-output", jl([*GOOD, {"instruction": "a", "output": None}]), ["d.jsonl:7", "missing field 'output'"]),
    data_case("unknown-fields", jl([{"question": "a", "answer": "b"}, *GOOD]), ["d.jsonl:1", "cannot tell the data format"]),
    data_case("duplicate-explicit-ids", jl([{**GOOD[0], "id": "a"}, {**GOOD[1], "id": "a"}, *GOOD[2:]]),
              ["d.jsonl", "duplicate example id 'a'"]),
    data_case("implicit-id-collides-with-explicit", jl([{**GOOD[0], "id": "1"}, *GOOD[1:]]),
              ["d.jsonl", "duplicate example id '1'", "has no `id`, so it is numbered by position"]),
    data_case("empty-file", "", ["d.jsonl", "empty"]),
    data_case("whitespace-only-file", "\n  \n\t\n", ["d.jsonl", "empty"]),
    data_case("blank-lines-only-bad", jl(["", "[]"]), ["d.jsonl:2", "JSON object"]),
    data_case("not-utf8", b'{"instruction": "caf\xe9", "output": "x"}\n', ["d.jsonl:1", "not valid UTF-8"]),
    data_case("utf16-file", jl(GOOD).encode("utf-16"), ["d.jsonl", "not valid UTF-8"]),
    data_case("json-invalid", '[{"instruction": "a", "output": "b"},\n{"instruction": ]', ["d.json:2", "invalid JSON"], "d.json"),
    data_case("json-trailing-comma", '[{"instruction": "a", "output": "b"},\n]', ["d.json:2", "invalid JSON"], "d.json"),
    data_case("json-object-two-lists", json.dumps({"train": GOOD, "test": GOOD}), ["d.json", "expected a JSON list"], "d.json"),
    data_case("json-scalar", "42", ["d.json", "expected a JSON list"], "d.json"),
    data_case("json-string", '"hello"', ["d.json", "expected a JSON list"], "d.json"),
    data_case("json-list-of-strings", json.dumps(["a", "b"]), ["d.json:record 1", "JSON object"], "d.json"),
    data_case("json-empty-list", "[]", ["d.json", "no usable examples"], "d.json"),
    data_case("json-record-missing-output", json.dumps([*GOOD, {"instruction": "x"}]), ["d.json:record 7", "missing field 'output'"], "d.json"),
    data_case("sharegpt-unknown-role", jl([{"conversations": [{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}]}]),
              ["d.jsonl:1", "conversations[0].from"]),
    data_case("sharegpt-not-a-list", jl([{"conversations": "hi"}]), ["d.jsonl:1", "'conversations' must be a list"]),
    data_case("sharegpt-turn-not-object", jl([{"conversations": ["hi", "there"]}]), ["d.jsonl:1", "conversations[0] must be an object"]),
    data_case("sharegpt-missing-value", jl([{"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}]),
              ["d.jsonl:1", "'from' and 'value'"]),
    data_case("sharegpt-no-assistant", jl([{"conversations": [{"from": "human", "value": "a"}]}]), ["d.jsonl:1", "no assistant turn"]),
    data_case("sharegpt-value-not-string", jl([{"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "b"}]}]),
              ["d.jsonl:1", "conversations[0].value must be a string"]),
    data_case("messages-unknown-role", jl([{"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}]),
              ["d.jsonl:1", "messages[0].role"]),
    data_case("messages-content-not-string", jl([{"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "b"}]}]),
              ["d.jsonl:1", "messages[0].content must be a string"]),
    data_case("messages-no-user", jl([{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}]),
              ["d.jsonl:1", "no user turn"]),
    data_case("messages-empty", jl([{"messages": []}]), ["d.jsonl:1", "no user turn"]),
    data_case("messages-null", jl([{"messages": None}]), ["d.jsonl:1", "'messages' must be a list"]),
    data_case("messages-assistant-before-user-only", jl([{"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}]),
              ["d.jsonl:1", "no assistant turn after the first user turn"]),
    data_case("prompt-without-completion", jl([{"prompt": "a"}, *GOOD]), ["d.jsonl:1", "missing field 'completion'"]),
    data_case("completion-not-string", jl([{"prompt": "a", "completion": 5}]), ["d.jsonl:1", "'completion' must be a string"]),
    data_case("prompt-list-bad-role", jl([{"prompt": [{"role": "x", "content": "a"}], "completion": "b"}]), ["d.jsonl:1", "prompt[0].role"]),
    data_case("format-forced-wrong", jl(GOOD), ["d.jsonl:1", "'conversations' must be a list"], extra=("--format", "sharegpt")),
    data_case("source-field-missing", jl(GOOD), ["d.jsonl:1", "missing source field 'cat'"], extra=("--source-field", "cat")),
    data_case("all-bad-with-skip", jl([{"a": 1}, {"b": 2}]), ["d.jsonl", "no usable examples", "d.jsonl:1"], extra=("--on-bad-example", "skip")),
    data_case("k-larger-than-data", jl(GOOD[:2]), ["d.jsonl"], extra=("--k", "5")),
    Case("parquet-corrupt", {"d.parquet": _parquet(GOOD, corrupt=True)}, ["disperse", "{t}/d.parquet", "--out", "{t}/out"],
         ["d.parquet", "cannot read Parquet"]),
    Case("parquet-missing-output", {"d.parquet": _parquet([*GOOD, {"instruction": "x", "output": None}])},
         ["disperse", "{t}/d.parquet", "--out", "{t}/out"], ["d.parquet:row 7", "missing field 'output'"]),
    Case("parquet-unknown-columns", {"d.parquet": _parquet([{"q": "a", "a": "b"}])}, ["disperse", "{t}/d.parquet", "--out", "{t}/out"],
         ["d.parquet:row 1", "cannot tell the data format"]),
    Case("data-file-not-found", {}, ["disperse", "{t}/nope.jsonl", "--out", "{t}/out"], ["nope.jsonl", "not found"]),
    Case("local-path-without-dot", {"mydata/other.jsonl": jl(GOOD)}, ["disperse", "mydata/train", "--out", "{t}/out"],
         ["mydata/train", "data file not found"]),
    Case("directory-not-a-dataset", {"dd/x.txt": "x"}, ["disperse", "{t}/dd", "--out", "{t}/out"], ["dd", "not a `datasets` directory"]),
    Case("disperse-out-under-a-file", {"d.jsonl": jl(GOOD), "f": "x"}, ["disperse", D, "--k", "2", "--out", "{t}/f/out"], ["{t}/f/out"]),
    Case("disperse-out-is-a-file", {"d.jsonl": jl(GOOD), "f": "x"}, ["disperse", D, "--k", "2", "--out", "{t}/f", "--overwrite"], ["{t}/f"]),
    Case("disperse-out-under-proc", {"d.jsonl": jl(GOOD)}, ["disperse", D, "--k", "2", "--out", "/proc/dtm-out"], ["/proc/dtm-out"]),
    Case("disperse-out-exists", {"d.jsonl": jl(GOOD), "out/x": "x"}, ["disperse", D, "--k", "2", "--out", "{t}/out"], ["{t}/out", "exists"]),
    Case("disperse-k-zero", {"d.jsonl": jl(GOOD)}, ["disperse", D, "--k", "0", "--out", "{t}/out"], ["k"]),
    Case("disperse-stratified-no-source", {"d.jsonl": jl(GOOD)}, ["disperse", D, "--strategy", "stratified", "--out", "{t}/out"], ["source"]),
    # ---------------------------------------------------------------- configs (dtm config show)
    Case("config-yaml-syntax", {"c.yaml": "train:\n  learning_rate: [1\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:"]),
    Case("config-unknown-key", {"c.yaml": "train:\n  learnin_rate: 0.1\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:2", "learnin_rate"]),
    Case("config-unknown-section", {"c.yaml": "trian:\n  x: 1\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:1", "trian"]),
    Case("config-wrong-type", {"c.yaml": "train:\n  learning_rate: fast\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:2", "train.learning_rate"]),
    Case("config-k-zero", {"c.yaml": "disperse:\n  k: 0\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:2", "disperse.k"]),
    Case("config-bad-merge-method", {"c.yaml": "merge:\n  method: blend\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:2", "merge.method"]),
    Case("config-bad-strategy", {"c.yaml": "disperse:\n  strategy: magic\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:2", "disperse.strategy"]),
    Case("config-bad-baseline", {"c.yaml": "baselines:\n  methods: [vanilla, nope]\n"}, ["config", "show", "{t}/c.yaml"],
         ["c.yaml:2", "baselines.methods"]),
    Case("config-top-level-list", {"c.yaml": "- a\n- b\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml"]),
    Case("config-top-level-scalar", {"c.yaml": "hello\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml"]),
    Case("config-section-not-mapping", {"c.yaml": "train: 3\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:1", "train"]),
    Case("config-tab-indent", {"c.yaml": "train:\n\tlearning_rate: 0.1\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml", "line 2"]),
    Case("config-not-utf8", {"c.yaml": b"seed: 1\n# caf\xe9\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml"]),
    Case("config-not-found", {}, ["config", "show", "{t}/missing.yaml"], ["missing.yaml"]),
    Case("config-negative-lr", {"c.yaml": "train:\n  learning_rate: -1\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:2", "train.learning_rate"]),
    Case("config-bad-val-size", {"c.yaml": "data:\n  val_size: -3\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:2", "data.val_size"]),
    Case("config-duplicate-key", {"c.yaml": "seed: 1\nseed: 2\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:2", "seed"]),
    Case("config-fp16-and-bf16", {"c.yaml": "train:\n  bf16: true\n  fp16: true\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:1", "train.bf16 and train.fp16"]),
    Case("config-bad-attn", {"c.yaml": "model:\n  attn_implementation: flash\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:2", "model.attn_implementation"]),
    Case("config-workers-zero", {"c.yaml": "train:\n  workers_per_model: 0\n"}, ["config", "show", "{t}/c.yaml"], ["c.yaml:2", "train.workers_per_model"]),
    Case("override-unknown-key", {}, ["config", "show", "train.lernrate=1"], ["train.lernrate"]),
    Case("override-bad-value", {}, ["config", "show", "disperse.k=many"], ["disperse.k"]),
    Case("override-in-file-bad", {"c.yaml": "seed: 1\n"}, ["config", "show", "{t}/c.yaml", "merge.method=zzz"], ["merge.method"]),
    Case("config-init-out-under-file", {"f": "x"}, ["config", "init", "--out", "{t}/f/c.yaml"], ["{t}/f"]),
    # ---------------------------------------------------------------- task files (dtm eval: checked before the model loads)
    Case("task-jsonl-invalid", {"t.jsonl": jl([MC, "{oops"])}, ["eval", "{t}/nomodel", "--task", "{t}/t.jsonl"], ["t.jsonl:2"]),
    Case("task-missing-answer", {"t.jsonl": jl([MC, {"question": "q", "choices": ["a", "b"]}])}, ["eval", "{t}/nomodel", "--task", "{t}/t.jsonl"],
         ["t.jsonl:2", "answer"]),
    Case("task-answer-out-of-range", {"t.jsonl": jl([{**MC, "answer": 5}])}, ["eval", "{t}/nomodel", "--task", "{t}/t.jsonl"], ["t.jsonl:1", "answer"]),
    Case("task-choices-not-list", {"t.jsonl": jl([{**MC, "choices": "ab"}])}, ["eval", "{t}/nomodel", "--task", "{t}/t.jsonl"], ["t.jsonl:1", "choices"]),
    Case("task-empty-file", {"t.jsonl": ""}, ["eval", "{t}/nomodel", "--task", "{t}/t.jsonl"], ["t.jsonl"]),
    Case("task-yaml-syntax", {"t.yaml": "name: x\ndata: [\n"}, ["eval", "{t}/nomodel", "--task", "{t}/t.yaml"], ["t.yaml"]),
    Case("task-yaml-unknown-key", {"t.yaml": "name: x\ndata: t.jsonl\nbogus_key: 1\n", "t.jsonl": TASK_OK},
         ["eval", "{t}/nomodel", "--task", "{t}/t.yaml"], ["t.yaml", "bogus_key"]),
    Case("task-yaml-data-missing", {"t.yaml": "name: x\ndata: gone.jsonl\n"}, ["eval", "{t}/nomodel", "--task", "{t}/t.yaml"], ["gone.jsonl"]),
    Case("task-yaml-not-mapping", {"t.yaml": "- a\n"}, ["eval", "{t}/nomodel", "--task", "{t}/t.yaml"], ["t.yaml"]),
    Case("task-unknown-name", {}, ["eval", "{t}/nomodel", "--task", "no_such_suite"], ["no_such_suite"]),
    Case("task-not-utf8", {"t.jsonl": b'{"question": "caf\xe9", "choices": ["a", "b"], "answer": 0}\n'},
         ["eval", "{t}/nomodel", "--task", "{t}/t.jsonl"], ["t.jsonl"]),
    # ---------------------------------------------------------------- model directories (dtm eval / train / merge)
    Case("eval-model-not-found", {"t.jsonl": TASK_OK}, ["eval", "{t}/nomodel", "--task", "{t}/t.jsonl"], ["nomodel"]),
    Case("eval-model-no-config", {"m": _model("noconfig"), "t.jsonl": TASK_OK}, ["eval", "{t}/m", "--task", "{t}/t.jsonl"], ["{t}/m"]),
    Case("eval-model-bad-config", {"m": _model("badconfig"), "t.jsonl": TASK_OK}, ["eval", "{t}/m", "--task", "{t}/t.jsonl"], ["{t}/m"]),
    Case("eval-truncated-safetensors", {"m": _model("truncated"), "t.jsonl": TASK_OK}, ["eval", "{t}/m", "--task", "{t}/t.jsonl"],
         ["model.safetensors", "truncated"]),
    Case("eval-corrupt-safetensors", {"m": _model("corrupt"), "t.jsonl": TASK_OK}, ["eval", "{t}/m", "--task", "{t}/t.jsonl"],
         ["model.safetensors", "corrupt"]),
    Case("eval-garbage-safetensors", {"m": _model("garbage"), "t.jsonl": TASK_OK}, ["eval", "{t}/m", "--task", "{t}/t.jsonl"],
         ["model.safetensors", "corrupt"]),
    Case("eval-adapter-not-adapter", {"t.jsonl": TASK_OK, "ad/x": "x"}, ["eval", "{base}", "--task", "{t}/t.jsonl", "--adapter", "{t}/ad"], ["ad"]),
    Case("eval-out-under-a-file", {"t.jsonl": TASK_OK, "f": "x"}, ["eval", "{base}", "--task", "{t}/t.jsonl", "--out", "{t}/f/r.json"], ["{t}/f"]),
    Case("eval-out-under-proc", {"t.jsonl": TASK_OK}, ["eval", "{base}", "--task", "{t}/t.jsonl", "--out", "/proc/dtm-r/r.json"], ["/proc/dtm-r"]),
    Case("train-base-truncated", {"m": _model("truncated"), "d.jsonl": jl(GOOD)},
         ["train", "--base", "{t}/m", "--data", D, "--out", "{t}/o", "--max-steps", "1", "--no-progress"], ["model.safetensors", "truncated"]),
    Case("train-base-corrupt", {"m": _model("corrupt"), "d.jsonl": jl(GOOD)},
         ["train", "--base", "{t}/m", "--data", D, "--out", "{t}/o", "--max-steps", "1", "--no-progress"], ["model.safetensors", "corrupt"]),
    Case("train-base-not-found", {"d.jsonl": jl(GOOD)}, ["train", "--base", "{t}/nomodel", "--data", D, "--out", "{t}/o"], ["nomodel"]),
    Case("train-data-not-found", {}, ["train", "--base", "{base}", "--data", "{t}/nope.jsonl", "--out", "{t}/o"], ["nope.jsonl"]),
    Case("train-bad-data", {"d.jsonl": jl([{"x": 1}])}, ["train", "--base", "{base}", "--data", D, "--out", "{t}/o"], ["d.jsonl:1"]),
    Case("train-out-under-a-file", {"d.jsonl": jl(GOOD), "f": "x"},
         ["train", "--base", "{base}", "--data", D, "--out", "{t}/f/o", "--max-steps", "1", "--no-progress"], ["{t}/f/o"]),
    Case("train-out-is-a-file", {"d.jsonl": jl(GOOD), "f": "x"},
         ["train", "--base", "{base}", "--data", D, "--out", "{t}/f", "--max-steps", "1", "--no-progress"], ["{t}/f"]),
    Case("train-data-without-out", {"d.jsonl": jl(GOOD)}, ["train", "--base", "{base}", "--data", D], ["--out"]),
    Case("train-config-bad-key", {"c.yaml": "train:\n  epochz: 1\n"}, ["train", "{t}/c.yaml"], ["c.yaml:2", "epochz"]),
    Case("merge-model-not-found", {}, ["merge", "{t}/a", "{t}/b", "--out", "{t}/o"], ["{t}/a"]),
    Case("merge-truncated-safetensors", {"m": _model("truncated")}, ["merge", "{base}", "{t}/m", "--out", "{t}/o"], ["model.safetensors", "truncated"]),
    Case("merge-garbage-safetensors", {"m": _model("garbage")}, ["merge", "{base}", "{t}/m", "--out", "{t}/o"], ["model.safetensors", "corrupt"]),
    Case("merge-no-weights", {"m": _model("noconfig"), "e/x": "x"}, ["merge", "{base}", "{t}/e", "--out", "{t}/o"], ["{t}/e"]),
    Case("merge-out-under-a-file", {"f": "x"}, ["merge", "{base}", "{base}", "--out", "{t}/f/o"], ["{t}/f/o"]),
    Case("merge-out-is-a-file", {"f": "x"}, ["merge", "{base}", "{base}", "--out", "{t}/f", "--overwrite"], ["{t}/f"]),
    Case("merge-out-under-proc", {}, ["merge", "{base}", "{base}", "--out", "/proc/dtm-m"], ["/proc/dtm-m"]),
    Case("merge-bad-weights", {}, ["merge", "{base}", "{base}", "--out", "{t}/o", "--weights", "a,b"], ["--weights"]),
    Case("merge-weights-count", {}, ["merge", "{base}", "{base}", "--out", "{t}/o", "--weights", "1,2,3"], ["weights"]),
    Case("merge-bad-param", {}, ["merge", "{base}", "{base}", "--out", "{t}/o", "--param", "density"], ["--param"]),
    Case("merge-unknown-method", {}, ["merge", "{base}", "{base}", "--out", "{t}/o", "--method", "blend"], ["blend"]),
    # ---------------------------------------------------------------- merge recipes
    Case("recipe-yaml-syntax", {"r.yaml": "merge_method: linear\nmodels: [\n"}, ["merge", "--config", "{t}/r.yaml", "--out", "{t}/o"], ["r.yaml"]),
    Case("recipe-unknown-method", {"r.yaml": "merge_method: slerpy\nmodels:\n  - model: {base}\n  - model: {base}\n"},
         ["merge", "--config", "{t}/r.yaml", "--out", "{t}/o"], ["r.yaml:1", "slerpy"]),
    Case("recipe-no-models", {"r.yaml": "merge_method: linear\n"}, ["merge", "--config", "{t}/r.yaml", "--out", "{t}/o"], ["r.yaml"]),
    Case("recipe-model-missing", {"r.yaml": "merge_method: linear\nmodels:\n  - model: {t}/gone\n  - model: {base}\n"},
         ["merge", "--config", "{t}/r.yaml", "--out", "{t}/o"], ["gone"]),
    Case("recipe-not-mapping", {"r.yaml": "- linear\n"}, ["merge", "--config", "{t}/r.yaml", "--out", "{t}/o"], ["r.yaml"]),
    Case("recipe-models-not-list", {"r.yaml": "merge_method: linear\nmodels: {base}\n"}, ["merge", "--config", "{t}/r.yaml", "--out", "{t}/o"],
         ["r.yaml:2", "models"]),
    Case("recipe-bad-weight", {"r.yaml": "merge_method: linear\nmodels:\n  - model: {base}\n    parameters:\n      weight: heavy\n"
                               "  - model: {base}\n    parameters:\n      weight: 1\n"},
         ["merge", "--config", "{t}/r.yaml", "--out", "{t}/o"], ["r.yaml:5", "weight"]),
    Case("recipe-not-found", {}, ["merge", "--config", "{t}/r.yaml", "--out", "{t}/o"], ["r.yaml"]),
    # ---------------------------------------------------------------- run directories (dtm status / report / run)
    Case("status-not-a-run-dir", {"x/y": "y"}, ["status", "{t}/x"], ["{t}/x", "not a run directory"]),
    Case("status-truncated-manifest", {"run": _run_dir(manifest='{"stage": "disperse", "ha')}, ["status", "{t}/run"],
         ["disperse.json", "not valid JSON", "redone"]),
    Case("status-manifest-not-object", {"run": _run_dir(manifest="[1, 2]")}, ["status", "{t}/run"], ["disperse.json", "redone"]),
    Case("status-manifest-empty", {"run": _run_dir(manifest="")}, ["status", "{t}/run"], ["disperse.json", "not valid JSON"]),
    Case("status-config-json-truncated", {"run": _run_dir(config='{"seed": 4')}, ["status", "{t}/run"], ["config.json"]),
    Case("status-config-json-bad-value", {"run": _run_dir(config='{"disperse": {"k": 0}}')}, ["status", "{t}/run"], ["config.json", "disperse.k"]),
    Case("report-not-a-run-dir", {"x/y": "y"}, ["report", "{t}/x"], ["{t}/x", "not a run directory"]),
    Case("run-config-not-found", {}, ["run", "{t}/c.yaml"], ["c.yaml"]),
    Case("run-data-not-found", {"c.yaml": "data:\n  path: nope.jsonl\n"}, ["run", "{t}/c.yaml"], ["c.yaml:2", "nope.jsonl"]),
    Case("run-bad-from-stage", {"c.yaml": "data:\n  path: d.jsonl\n", "d.jsonl": jl(GOOD)}, ["run", "{t}/c.yaml", "--from", "bake"], ["bake"]),
    Case("fisher-data-not-found", {}, ["fisher", "{base}", "--data", "{t}/nope.txt"], ["nope.txt"]),
    Case("fisher-model-not-found", {"d.txt": "hello\n"}, ["fisher", "{t}/nomodel", "--data", "{t}/d.txt"], ["nomodel"]),
    Case("fisher-bad-jsonl", {"d.jsonl": "{oops\n"}, ["fisher", "{base}", "--data", D], ["d.jsonl:1"]),
    # ---------------------------------------------------------------- valid look-alikes: must pass
    Case("ok-utf8-bom-jsonl", {"d.jsonl": "\ufeff" + jl(GOOD)}, ["disperse", D, "--k", "2", "--out", "{t}/out"], ok=True),
    Case("ok-utf8-bom-json", {"d.json": "\ufeff" + json.dumps(GOOD)}, ["disperse", "{t}/d.json", "--k", "2", "--out", "{t}/out"], ok=True),
    Case("ok-crlf-jsonl", {"d.jsonl": jl(GOOD).replace("\n", "\r\n")}, ["disperse", D, "--k", "2", "--out", "{t}/out"], ok=True),
    Case("ok-very-long-line", {"d.jsonl": jl([{"instruction": "long " * 200_000, "output": "yes"}, *GOOD])},
         ["disperse", D, "--k", "2", "--out", "{t}/out"], ok=True),
    Case("ok-unicode-data-and-names", {"données ü/数据.jsonl": jl([{"instruction": "¿Qué? 你好 🙂", "output": "ça va ✓"}, *GOOD])},
         ["disperse", "{t}/données ü/数据.jsonl", "--k", "2", "--out", "{t}/sortie é"], ok=True),
    Case("ok-skip-bad-first-row", {"d.jsonl": jl([{"instruction": "no output"}, *GOOD])},
         ["disperse", D, "--k", "2", "--out", "{t}/out", "--on-bad-example", "skip"], ok=True),
    Case("ok-raw-line-separator-in-string", {"d.jsonl": jl(GOOD) + json.dumps({"instruction": "a\u2028b\u0085c", "output": "d"}, ensure_ascii=False) + "\n"},
         ["disperse", D, "--k", "2", "--out", "{t}/out"], ok=True),
    Case("ok-crlf-bom-config", {"c.yaml": "\ufeffseed: 3\r\ntrain:\r\n  learning_rate: 0.001\r\n"}, ["config", "show", "{t}/c.yaml"], ok=True),
    Case("ok-crlf-task-file", {"t.jsonl": TASK_OK.replace("\n", "\r\n")}, ["eval", "{base}", "--task", "{t}/t.jsonl", "--device", "cpu"], ok=True),
]

XFAIL: dict[str, str] = {}


def _params():
    for c in CASES:
        reason = c.xfail or XFAIL.get(c.name)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(c, id=c.name, marks=marks)


def test_corpus_size():
    assert sum(not c.ok for c in CASES) >= 100 and sum(c.ok for c in CASES) >= 5
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case: Case, tmp_path, base_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for rel, content in case.files.items():
        p = tmp_path / rel
        if callable(content):
            content(tmp_path, Path(base_dir))
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_bytes(content.replace("{base}", str(base_dir)).replace("{t}", str(tmp_path)).encode("utf-8"))
    argv = [a.replace("{t}", str(tmp_path)).replace("{base}", str(base_dir)) for a in case.argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if case.ok:
        assert code == 0, err
        return
    assert code == 2, (code, err)
    head = f"dtm {argv[0]}: error: "
    assert head in err, err  # after any progress bars
    msg = err[err.index(head):]
    for s in case.expect:
        assert s.replace("{t}", str(tmp_path)) in msg, (s, msg)
