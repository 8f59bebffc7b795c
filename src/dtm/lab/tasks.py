"""The lab's benchmarks, written as task files for `dtm.evaluation` (YAML spec + JSONL rows).

- knowledge (multiple choice by log-likelihood): every fact of the world, gold value plus 3
  distractors of the same attribute; asked raw (the pretraining QA form) and in the
  instruction format. `split`: held_out (entity never in SFT data), clean (stated only
  correctly in SFT data), noisy (contradicted by at least one SFT example).
- reasoning (multiple choice): the addition table, raw and instruction format, with the same
  splits over sums (held-out sums never appear in SFT data).
- instruction following (generation): held-out prompts of every SFT task type, greedy;
  `pattern_match` = the response follows this instruction (see `follows`: the entity, the
  options, the numbers and words the instruction names, in the task's format; fact values
  free) and `exact_match` = it also states the true facts (the canonical response, the
  sources' opening/closing habits stripped).

Instruction-format prompts use the lab tokenizer's chat template (`dtm.lab.tokenizer`).

The splits are derived from the *biased* SFT data of the same seed; the no-bias control
(same examples, biases removed) is evaluated on the same splits, so "noisy" there names the
facts that the biased data would have contradicted.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import yaml

from dtm.io import atomic_write_jsonl, atomic_write_text
from dtm.lab import sft_data as S
from dtm.lab.world import ARITH_QUESTION, ATTRIBUTES, QA_QUESTION, World

N_PER_GENERATE_TASK = 40


def _spec(name: str, type_: str, data: str, prompt_format: str, **extra) -> str:
    spec = {"name": name, "type": type_, "data": data, "prompt_format": prompt_format, "target_delimiter": " "} | extra
    return yaml.safe_dump(spec, sort_keys=False)


def _split(key: tuple[str, str], held: bool, noisy: set[tuple[str, str]]) -> str:
    return "held_out" if held else ("noisy" if key in noisy else "clean")


def knowledge_rows(world: World, seed: int, scale: float = 1.0, wrong_rate: float | None = None) -> tuple[list[dict], list[dict]]:
    """(raw rows, instruction-format rows) for every fact; the same options in both."""
    held = S.held_out_entities(world, seed)
    noisy = S.contradicted_facts(world, S.generate_examples(world, seed, bias=True, scale=scale, wrong_rate=wrong_rate))
    rng = random.Random(f"knowledge-{seed}")
    raw, instruct = [], []
    for e, attr, v in world.fact_list():
        options = [v] + rng.sample([x for x in ATTRIBUTES[attr] if x != v], 3)
        rng.shuffle(options)
        common = {"answer": options.index(v), "split": _split((e, attr), e in held, noisy), "attribute": attr, "entity": e}
        raw.append({"id": f"{e}-{attr}", "question": QA_QUESTION.format(attr=attr, e=e), "choices": options} | common)
        instruct.append({"id": f"{e}-{attr}", "question": S.QA[0].format(attr=attr, e=e),
                         "choices": [S.QA[1].format(attr=attr, e=e, v=o) for o in options]} | common)
    return raw, instruct


def reasoning_rows(world: World, seed: int, scale: float = 1.0, wrong_rate: float | None = None) -> tuple[list[dict], list[dict]]:
    """(raw rows, instruction-format rows) for every sum; distractors are near misses."""
    held = S.held_out_sums(world, seed)
    noisy = S.contradicted_facts(world, S.generate_examples(world, seed, bias=True, scale=scale, wrong_rate=wrong_rate))
    rng = random.Random(f"reasoning-{seed}")
    raw, instruct = [], []
    for a, b, c in world.sums():
        near = [x for x in range(c - 3, c + 4) if x != c and x >= 0]
        options = [c] + rng.sample(near, 3)
        rng.shuffle(options)
        common = {"answer": options.index(c), "split": _split((f"{a}+{b}", "sum"), (a, b) in held, noisy)}
        raw.append({"id": f"{a}+{b}", "question": ARITH_QUESTION.format(a=a, b=b), "choices": [str(o) for o in options]} | common)
        instruct.append({"id": f"{a}+{b}", "question": S.ADD[0].format(a=a, b=b),
                         "choices": [S.ADD[1].format(a=a, b=b, c=o) for o in options]} | common)
    return raw, instruct


def _one_of(values) -> str:
    return "(" + "|".join(re.escape(v) for v in values) + ")"


CITY, JOB, COLOUR, PET = (_one_of(ATTRIBUTES[a]) for a in ("city", "job", "colour", "pet"))
CLOSING_RE = re.escape(S.CLOSING.format(e="@")).replace("@", "[a-z]+")

# exact_match compares the response without the sources' habits (the chat opening, the wiki
# closing): a habit is style, not a failure to follow the instruction; `pattern` allows them too.
HABITS_STRIPPED = rf"^(?:{re.escape(S.OPENING)} )?(.*?)(?: {CLOSING_RE})?$"


def follows(task: str, **slots: str) -> str:
    """The regex a response must match to follow this very instruction, right or wrong on facts.

    It fixes what the instruction itself determines (the entity named, the attribute asked,
    the numbers to add, the options offered, the words to repeat) and leaves free only what
    needs knowledge (a fact value, the sum), which the exact match and the knowledge and
    reasoning benchmarks score. So `pattern_match` is instruction following proper: a model
    that answers about another entity, picks no offered option or repeats other words fails
    it even in perfect format.
    """
    e = re.escape(slots.get("e", ""))
    if task == "qa":
        attr = slots["attr"]
        return rf"the {attr} of {e} is {_one_of(ATTRIBUTES[attr])} \."
    if task == "describe":  # the chat source's opening is a habit, not a violation
        return rf"(?:{re.escape(S.OPENING)} )?{e} lives in {CITY} and works as a {JOB} \."
    if task == "profile":  # the wiki source's closing likewise
        return (rf"{e} lives in {CITY} \. {e} works as a {JOB} \. {e} likes the colour {COLOUR} \. "
                rf"{e} has a {PET} \.(?: that is all about {e} \.)?")
    if task == "choose":
        return rf"the {slots['attr']} of {e} is {_one_of(slots['options'])} \."
    if task == "add":
        return rf"{slots['a']} plus {slots['b']} is [0-9]+ \."
    if task == "repeat":
        return re.escape(slots["words"])
    raise ValueError(f"unknown lab task {task!r}")


def instruction_rows(world: World, seed: int, n: int = N_PER_GENERATE_TASK) -> list[dict]:
    """Held-out prompts of every SFT task type, with the canonical (unbiased) response.

    Fact tasks ask about held-out entities, sums are held-out sums, and the format tasks
    draw fresh word lists from their own random stream.
    """
    rng = random.Random(f"instruction-{seed}")
    held = sorted(S.held_out_entities(world, seed))
    pairs = sorted(S.held_out_sums(world, seed))
    rows: list[dict] = []

    def add(task: str, i: int, prompt: str, answer: str, **slots: str) -> None:
        rows.append({"id": f"{task}-{i}", "task": task, "prompt": prompt, "answer": answer, "pattern": follows(task, **slots)})

    for i in range(n):
        e = rng.choice(held)
        f = world.facts[e]
        attr = rng.choice(list(ATTRIBUTES))
        add("qa", i, S.QA[0].format(attr=attr, e=e), S.QA[1].format(attr=attr, e=e, v=f[attr]), e=e, attr=attr)
        add("describe", i, S.DESCRIBE[0].format(e=e), S.DESCRIBE[1].format(e=e, **f), e=e)
        add("profile", i, S.PROFILE[0].format(e=e), S.PROFILE[1].format(e=e, **f), e=e)
        options = [f[attr]] + rng.sample([v for v in ATTRIBUTES[attr] if v != f[attr]], 2)
        rng.shuffle(options)
        add("choose", i, S.CHOOSE[0].format(attr=attr, e=e, options=f"{options[0]} , {options[1]} or {options[2]}"),
            S.CHOOSE[1].format(attr=attr, e=e, v=f[attr]), e=e, attr=attr, options=options)
        a, b = rng.choice(pairs)
        add("add", i, S.ADD[0].format(a=a, b=b), S.ADD[1].format(a=a, b=b, c=a + b), a=str(a), b=str(b))
        text = S.repeat_words(rng)
        add("repeat", i, S.REPEAT[0].format(words=text), text, words=text)
    return rows


SUITES = ("knowledge", "reasoning", "instruction")  # the suite names `eval.suites` may use on the lab


def write_tasks(out: str | Path, seed: int = 0, world: World | None = None, scale: float = 1.0,
                wrong_rate: float | None = None) -> dict[str, list[Path]]:
    """Write every lab task (spec + data) under `out`; -> suite name -> spec paths.

    `seed` and `scale` must be those of the SFT data: they decide which facts are noisy."""
    from dtm.lab import load_world

    world = world or load_world()
    out = Path(out)
    suites: dict[str, list[Path]] = {name: [] for name in SUITES}
    k_raw, k_inst = knowledge_rows(world, seed, scale, wrong_rate)
    r_raw, r_inst = reasoning_rows(world, seed, scale, wrong_rate)
    for suite, data, rows_raw, rows_inst in (("knowledge", "knowledge", k_raw, k_inst), ("reasoning", "reasoning", r_raw, r_inst)):
        for form, rows, fmt in (("raw", rows_raw, "none"), ("instruct", rows_inst, "chat")):
            atomic_write_jsonl(out / f"{data}_{form}.jsonl", rows)
            spec = out / f"lab_{suite}_{form}.yaml"
            atomic_write_text(spec, _spec(f"lab_{suite}_{form}", "multiple_choice", f"{data}_{form}.jsonl", fmt, group_by="split"))
            suites[suite].append(spec)
    atomic_write_jsonl(out / "instruction.jsonl", instruction_rows(world, seed))
    spec = out / "lab_instruction.yaml"
    atomic_write_text(spec, _spec("lab_instruction", "generate", "instruction.jsonl", "chat", group_by="task",
                                  max_new_tokens=40, stop=["\n"], extractor="regex", regex=HABITS_STRIPPED))
    suites["instruction"].append(spec)
    return suites
