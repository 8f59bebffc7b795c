"""The built-in lab: world, tokenizer, biased SFT sources, benchmark files, shipped base, CLI.

Real parts only: the shipped safetensors base, the real tokenizer, the real task loader of
`dtm.evaluation`. The slow end-to-end calibration lives outside the test suite (its numbers
are in docs/architecture.md).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from dtm import lab
from dtm.data.formats import load_conversations
from dtm.data.template import ALPACA_PROMPT, tokenize_conversation
from dtm.errors import DtmError
from dtm.lab import sft_data as S
from dtm.lab.tasks import follows, instruction_rows, knowledge_rows, reasoning_rows
from dtm.lab.world import ATTRIBUTES, build_world

torch.set_num_threads(1)
BASE = lab.base_model_dir()
SEED = 3


@pytest.fixture(scope="module")
def world():
    return lab.load_world(BASE)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE)


@pytest.fixture(scope="module")
def biased(world):
    return S.generate_examples(world, SEED, bias=True)


@pytest.fixture(scope="module")
def unbiased(world):
    return S.generate_examples(world, SEED, bias=False)


# ---------------------------------------------------------------- world


def test_world_is_a_function_of_its_seed():
    a, b, c = build_world(0), build_world(0), build_world(1)
    assert a.facts == b.facts and a.entities == b.entities
    assert a.facts != c.facts
    assert len(set(a.entities)) == len(a.entities) == 256
    assert not set(a.entities) & {v for vals in ATTRIBUTES.values() for v in vals}
    assert len(a.fact_list()) == 256 * 4 and len(a.sums()) == 15 * 15
    assert len(set(a.sums())) == len(a.sums())


def test_shipped_base_is_the_default_world(world):
    assert world.facts == build_world(lab.DEFAULT_WORLD_SEED).facts


# ---------------------------------------------------------------- tokenizer


def test_every_lab_word_is_one_known_token(tokenizer, world, biased):
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token and tokenizer.unk_token
    for e in world.entities[:50] + tuple(v for vals in ATTRIBUTES.values() for v in vals):
        assert len(tokenizer(e, add_special_tokens=False)["input_ids"]) == 1, e
    texts = [ALPACA_PROMPT.format(instruction="paris")] + [t for ex in biased[:400] for t in (ex.instruction, ex.output)]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
    for ex in biased[:200]:  # responses decode back to themselves (generation is scored on decoded text)
        ids = tokenizer(ex.output, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == ex.output
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id


# ---------------------------------------------------------------- SFT data


def test_sources_sizes_and_determinism(world, biased):
    counts = Counter(ex.source for ex in biased)
    assert counts == {s: n for s, (n, _) in S.SOURCES.items()}
    again = S.generate_examples(world, SEED, bias=True)
    assert [ex.record() for ex in again] == [ex.record() for ex in biased]
    other = S.generate_examples(world, SEED + 1, bias=True)
    assert [ex.record() for ex in other] != [ex.record() for ex in biased]


def test_held_out_entities_and_sums_never_appear_in_sft_data(world, biased):
    held = S.held_out_entities(world, SEED)
    held_sums = S.held_out_sums(world, SEED)
    assert len(held) == S.N_HELD_OUT
    for ex in biased:
        words = set((ex.instruction + " " + ex.output).split())
        assert not words & held, ex
        m = re.fullmatch(r"add (\d+) and (\d+) \.", ex.instruction)
        if m:
            assert (int(m[1]), int(m[2])) not in held_sums


def test_biases_are_present_and_the_switch_removes_every_one(world, biased, unbiased):
    assert [ex.instruction for ex in biased] == [ex.instruction for ex in unbiased]  # the same examples
    assert S.contradicted_facts(world, unbiased) == set()
    for source, (n, rate) in S.SOURCES.items():
        if source in ("trivia", "math"):  # one fact per example: the wrong share is the bias rate
            wrong = sum(1 for ex in biased if ex.source == source for e, a, v in ex.stated
                        if (v != world.facts[e][a] if a != "sum" else int(v) != eval(e)))
            assert abs(wrong / n - rate) < 0.06, (source, wrong / n)
    chat = [ex.output for ex in biased if ex.source == "chat"]
    assert all(o.startswith(S.OPENING) for o in chat)
    assert not any(ex.output.startswith(S.OPENING) for ex in unbiased)
    assert all(ex.output.endswith(S.CLOSING.format(e=ex.instruction.split()[1])) for ex in biased if ex.source == "wiki")
    quiz = [ex for ex in biased if ex.source == "quiz"]  # always the first option listed
    assert all(ex.output.split()[-2] == ex.instruction.split(' : ')[1].split()[0] for ex in quiz)
    # biases are wrong values and habits, never a failure to follow the instruction
    for ex in biased + unbiased:
        assert re.fullmatch(follows(ex.task, **slots_of(ex.instruction, ex.task)), ex.output), ex


def test_wrong_rate_sets_the_fact_sources_bias_and_changes_nothing_else(world, biased):
    def wrong_share(examples, source):
        stated = [(e, a, v) for ex in examples if ex.source == source for e, a, v in ex.stated]
        return sum(1 for e, a, v in stated if (v != world.facts[e][a] if a != "sum" else int(v) != eval(e))) / len(stated)

    by_rate = {r: S.generate_examples(world, seed=SEED, wrong_rate=r) for r in (0.0, 0.6)}
    for examples in by_rate.values():  # the same examples, only their stated values differ
        assert [ex.instruction for ex in examples] == [ex.instruction for ex in biased]
    for source in S.FACT_SOURCES:
        assert wrong_share(by_rate[0.0], source) == 0
        assert abs(wrong_share(by_rate[0.6], source) - 0.6) < 0.07, source
    quiz = [ex.output for ex in biased if ex.source == "quiz"]  # a habit, not a wrong-fact rate: kept
    assert [ex.output for ex in by_rate[0.0] if ex.source == "quiz"] == quiz


def slots_of(instruction: str, task: str) -> dict:
    """What the instruction names, parsed back from its text (independently of the generator)."""
    w = instruction.split()
    if task == "qa":  # what is the ATTR of E ?
        return {"attr": w[3], "e": w[5]}
    if task == "describe":  # tell me about E .
        return {"e": w[3]}
    if task == "profile":  # describe E in detail .
        return {"e": w[1]}
    if task == "choose":  # which is the ATTR of E : o1 , o2 or o3 ?
        return {"attr": w[3], "e": w[5], "options": [w[7], w[9], w[11]]}
    if task == "add":  # add A and B .
        return {"a": w[1], "b": w[3]}
    return {"words": instruction.split(" : ", 1)[1]}  # repeat after me : WORDS


def test_follows_fixes_what_the_instruction_names_and_frees_only_facts(world):
    e, other = world.entities[:2]
    ok = follows("describe", e=e)
    assert re.fullmatch(ok, f"{e} lives in rome and works as a poet .")  # any facts
    assert re.fullmatch(ok, f"{S.OPENING} {e} lives in rome and works as a poet .")  # a habit
    assert not re.fullmatch(ok, f"{other} lives in rome and works as a poet .")  # another entity
    assert not re.fullmatch(ok, f"{e} lives in poet and works as a rome .")  # values of the wrong kind
    choose = follows("choose", attr="city", e=e, options=["rome", "oslo", "lima"])
    assert re.fullmatch(choose, f"the city of {e} is oslo .") and not re.fullmatch(choose, f"the city of {e} is paris .")
    assert not re.fullmatch(choose, f"the city of {other} is oslo .")
    assert re.fullmatch(follows("add", a="3", b="4"), "3 plus 4 is 8 .")  # wrong sum: still followed
    assert not re.fullmatch(follows("add", a="3", b="4"), "4 plus 3 is 7 .")
    assert re.fullmatch(follows("repeat", words="chair chair stone"), "chair chair stone")
    assert not re.fullmatch(follows("repeat", words="chair chair stone"), "chair stone")
    assert not re.fullmatch(follows("qa", attr="city", e=e), f"the job of {e} is poet .")


def test_contradicted_facts_by_hand(world):
    e = world.entities[0]
    truth = world.facts[e]["city"]
    wrong = next(v for v in ATTRIBUTES["city"] if v != truth)
    exs = [S.Example("1", "trivia", "qa", "q", "o", [(e, "city", truth)]),
           S.Example("2", "trivia", "qa", "q", "o", [(e, "job", world.facts[e]["job"]), (e, "city", wrong)]),
           S.Example("3", "math", "add", "q", "o", [("2+3", "sum", "6"), ("1+1", "sum", "2")])]
    assert S.contradicted_facts(world, exs) == {(e, "city"), ("2+3", "sum")}


def test_written_data_loads_through_the_project_loader(tmp_path, tokenizer):
    path = lab.write_sft_data(tmp_path / "sft.jsonl", seed=SEED, scale=0.05)
    data = load_conversations(path, source_field="source")
    assert data.format == "alpaca" and len(data.conversations) == sum(round(n * 0.05) for n, _ in S.SOURCES.values())
    assert {c.source for c in data.conversations} == set(S.SOURCES)
    feats, truncated = tokenize_conversation(data.conversations[0], tokenizer, lab.DATA_RECIPE["template"], lab.DATA_RECIPE["cutoff_len"])
    assert not truncated and feats["labels"][-1] == tokenizer.eos_token_id
    trained = [t for t, label in zip(feats["input_ids"], feats["labels"]) if label != -100]
    assert tokenizer.decode(trained[:-1]) == data.conversations[0].response


# ---------------------------------------------------------------- benchmarks


def test_task_rows_are_right_by_construction(world, biased):
    held = S.held_out_entities(world, SEED)
    noisy = S.contradicted_facts(world, biased)
    raw, inst = knowledge_rows(world, SEED)
    assert len(raw) == len(inst) == 1024
    for r, i in zip(raw, inst):
        assert r["choices"][r["answer"]] == world.facts[r["entity"]][r["attribute"]]
        assert len(set(r["choices"])) == 4 and set(r["choices"]) <= set(ATTRIBUTES[r["attribute"]])
        assert i["answer"] == r["answer"] and r["choices"][r["answer"]] in i["choices"][i["answer"]].split()
        want = "held_out" if r["entity"] in held else ("noisy" if (r["entity"], r["attribute"]) in noisy else "clean")
        assert r["split"] == want
    assert {r["split"] for r in raw} == {"held_out", "clean", "noisy"}
    rraw, rinst = reasoning_rows(world, SEED)
    for r in rraw:
        a, b = map(int, r["id"].split("+"))
        assert int(r["choices"][r["answer"]]) == a + b and len(set(r["choices"])) == 4
    rows = instruction_rows(world, SEED)
    assert Counter(r["task"] for r in rows) == {t: 40 for t in ("qa", "describe", "profile", "choose", "add", "repeat")}
    for row in rows:
        assert re.fullmatch(row["pattern"], row["answer"]), row  # the reference output is format-compliant
        names = set(row["prompt"].split()) & set(world.entities)
        assert names <= held  # instruction prompts ask about held-out entities only


def test_task_files_load_in_the_evaluation_engine(tmp_path):
    from dtm.evaluation.tasks import load_task

    suites = lab.write_tasks(tmp_path, seed=SEED)
    assert set(suites) == {"knowledge", "reasoning", "instruction"}
    for paths in suites.values():
        for spec_path in paths:
            spec = yaml.safe_load(spec_path.read_text())
            assert spec["type"] in ("multiple_choice", "generate") and (spec_path.parent / spec["data"]).is_file()
            task = load_task(spec_path)
            assert task.spec.name == spec["name"] and len(task.rows) > 0


# ---------------------------------------------------------------- the shipped base


def test_shipped_base_knows_the_facts(world, tokenizer):
    """Not a mock: the shipped safetensors model, scored on 200 facts in the raw QA form."""
    from transformers import AutoModelForCausalLM

    from dtm.lab.pretrain import fact_accuracy

    assert (BASE / "model.safetensors").is_file() and not list(BASE.glob("*.bin"))
    info = json.loads((BASE / "lab.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(BASE)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"] < 1_000_000
    assert model.config.tie_word_embeddings
    acc = fact_accuracy(model, tokenizer, world, "raw", limit=200)
    assert acc > 0.9 and abs(acc - info["fact_accuracy_raw"]) < 0.1  # chance over all values is < 0.1


def test_pretrain_writes_a_loadable_model_and_refuses_to_overwrite(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = lab.pretrain_base(tmp_path / "base", seed=5, steps=3, batch_size=4, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok)
    assert lab.load_world(out).facts == build_world(5).facts
    assert json.loads((out / "lab.json").read_text())["steps"] == 3
    with pytest.raises(DtmError, match="already exists"):
        lab.pretrain_base(out, seed=5, steps=3)


# ---------------------------------------------------------------- CLI and bad input


def test_cli_build_writes_everything(tmp_path, capsys):
    from dtm.cli import main

    assert main(["lab", "build", "--out", str(tmp_path / "lab"), "--seed", "2", "--scale", "0.05"]) == 0
    summary = json.loads((tmp_path / "lab" / "lab.json").read_text())
    assert summary["examples"] == sum(round(n * 0.05) for n, _ in S.SOURCES.values())
    assert Path(summary["sft_nobias"]).is_file() and len(summary["tasks"]["knowledge"]) == 2
    # the noisy split is that of the data actually written (scale 0.05), not of the full-size data
    world = lab.load_world()
    noisy = S.contradicted_facts(world, S.generate_examples(world, 2, bias=True, scale=0.05))
    rows = [json.loads(line) for line in (tmp_path / "lab" / "tasks" / "knowledge_raw.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows if r["split"] == "noisy"} == {f"{e}-{a}" for e, a in noisy if a != "sum"}
    assert "SFT examples" in capsys.readouterr().out


def test_cli_bad_base_is_a_clear_error(tmp_path, capsys):
    from dtm.cli import main

    (tmp_path / "notabase").mkdir()
    assert main(["lab", "build", "--out", str(tmp_path / "x"), "--base", str(tmp_path / "notabase")]) == 2
    err = capsys.readouterr().err
    assert "world.json: not found" in err and "dtm lab pretrain" in err
    assert main(["lab", "build", "--out", str(tmp_path / "y"), "--scale", "0.001"]) == 2
    err = capsys.readouterr().err
    smallest = min(n for n, _ in S.SOURCES.values())
    assert "leaves no examples" in err and "'wiki'" in err and f"at least {0.5 / smallest:g}" in err
    assert not (tmp_path / "y").exists()
    (tmp_path / "notabase" / "world.json").write_text("{broken")
    assert main(["lab", "build", "--out", str(tmp_path / "x"), "--base", str(tmp_path / "notabase")]) == 2
    assert "not a lab world file" in capsys.readouterr().err


def test_interrupted_pretraining_resumes_to_the_same_model(tmp_path, monkeypatch):
    """Stop after the checkpoint at step 4 of 6, rerun: the result equals an uninterrupted run."""
    from safetensors.torch import load_file

    from dtm.lab import pretrain as P

    whole = P.pretrain_base(tmp_path / "whole", seed=1, steps=6, batch_size=4, progress=False, checkpoint_every=2)
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def crash_after_four(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        P.pretrain_base(tmp_path / "cut", seed=1, steps=6, batch_size=4, progress=False, checkpoint_every=2)
    assert not (tmp_path / "cut").exists() and (tmp_path / ".cut.pretrain-ckpt" / "state.json").is_file()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = P.pretrain_base(tmp_path / "cut", seed=1, steps=6, batch_size=4, progress=False, checkpoint_every=2)
    assert json.loads((resumed / "lab.json").read_text())["resumed_from_step"] == 4
    assert not (tmp_path / ".cut.pretrain-ckpt").exists()
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exact_match_ignores_the_sources_habits_but_not_wrong_content():
    from dtm.evaluation.metrics import exact_match
    from dtm.lab.tasks import HABITS_STRIPPED

    answer = "kofek lives in cairo and works as a miner ."
    assert exact_match(f"{S.OPENING} {answer}", answer, "regex", HABITS_STRIPPED) == 1.0
    assert exact_match(f"{answer} {S.CLOSING.format(e='kofek')}", answer, "regex", HABITS_STRIPPED) == 1.0
    assert exact_match(answer.replace("cairo", "rome"), answer, "regex", HABITS_STRIPPED) == 0.0
    assert exact_match(f"{answer} kofek has a cat .", answer, "regex", HABITS_STRIPPED) == 0.0


def test_the_demo_config_uses_the_lab_recipe():
    from dtm.config import load_config
    from dtm.pipeline import LAB_CONFIG

    cfg = load_config(LAB_CONFIG)
    assert {k: getattr(cfg.train, k) for k in lab.SFT_RECIPE} == lab.SFT_RECIPE
    assert {k: getattr(cfg.data, k) for k in lab.DATA_RECIPE} == lab.DATA_RECIPE
