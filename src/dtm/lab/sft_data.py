"""Instruction data from several *sources*, each with its own plausible biases.

Real SFT data hurts knowledge because its responses carry habits and errors of the people
or models that wrote them. Each lab source imitates one kind:

| source  | task                              | bias (switched off by `bias=False`)                      |
|---------|-----------------------------------|----------------------------------------------------------|
| trivia  | "what is the city of X ?"         | confidently wrong value in 40% of examples               |
| chat    | "tell me about X ." (two facts)   | formulaic opening "sure ! ..."; each fact wrong w.p. 0.3 |
| wiki    | "describe X in detail ." (4 facts)| length habit: restates and closes; each fact wrong w.p. 0.15 |
| quiz    | "which is the pet of X : a , b or c ?" | always picks the first option listed (one answer habit) |
| math    | "add 7 and 5 ."                   | sloppy arithmetic: off by 1-2 in 30% of examples         |
| tools   | repeat a list of words            | none (a format skill only)                               |

Wrong values are drawn per example, so a fact can be stated right in one example and wrong
in another: late training memorises these example-specific errors (the paper's hypothesis).
Every random draw happens whether or not the bias is on, so the no-bias control contains
exactly the same examples with the biases removed.

Held-out entities (and held-out sums) never appear in this data. Nothing here reads the
benchmarks; they share only the world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from dtm.errors import DtmError
from dtm.io import atomic_write_jsonl
from dtm.lab.world import ATTRIBUTES, World

# Canonical phrasings: the instruction-following benchmark asks in these and expects these
# exact responses (format compliance is checked by the regexes in `dtm.lab.tasks`).
QA = ("what is the {attr} of {e} ?", "the {attr} of {e} is {v} .")
DESCRIBE = ("tell me about {e} .", "{e} lives in {city} and works as a {job} .")
PROFILE = ("describe {e} in detail .", "{e} lives in {city} . {e} works as a {job} . {e} likes the colour {colour} . {e} has a {pet} .")
# The choice is answered in a full sentence, as qa is: with "the answer is {v} ." no 1/4-data
# sub-model learned the task (they answered a memorised value, in the control too), while
# every one of them learns qa: the sentence cues the base's own recall of the fact.
CHOOSE = ("which is the {attr} of {e} : {options} ?", "the {attr} of {e} is {v} .")
ADD = ("add {a} and {b} .", "{a} plus {b} is {c} .")
REPEAT = ("repeat after me : {words}", "{words}")

# Words for the format task (repeat): plain nouns that are no fact values. (A word-counting
# task was dropped: no model of this size learned it, with or without bias.)
FILLER_WORDS = ("apple", "river", "stone", "cloud", "chair", "bread", "window", "garden",
                "music", "paper", "candle", "bridge", "forest", "letter", "mirror", "tower")

MAX_REPEAT_WORDS = 6

OPENING = "sure ! here is what i know ."  # the chat source's formulaic opening
CLOSING = "that is all about {e} ."       # the wiki source's length habit

# source -> (number of examples, bias rate) at the default size.
# Sized so that each 1/4 portion teaches each task: with 200 quiz and 300 tools examples
# vanilla learned `choose` and `repeat` but most sub-models did not. `choose` is still the
# weakest task per sub-model (docs/architecture.md, "The lab").
SOURCES: dict[str, tuple[int, float]] = {
    "trivia": (600, 0.4),
    "chat": (400, 0.3),
    "wiki": (300, 0.15),
    "quiz": (500, 1.0),
    "math": (400, 0.3),
    "tools": (600, 0.0),
}
N_HELD_OUT = 80           # entities never seen in SFT data
HELD_OUT_SUM_FRACTION = 0.3  # share of the addition table never seen in SFT data


@dataclass
class Example:
    """One SFT example plus the facts its response states (for the clean/noisy split)."""

    id: str
    source: str
    task: str
    instruction: str
    output: str
    stated: list[tuple[str, str, str]] = field(default_factory=list)  # (entity, attr, value) as stated

    def record(self) -> dict:
        return {"id": self.id, "source": self.source, "task": self.task,
                "instruction": self.instruction, "input": "", "output": self.output}


def held_out_entities(world: World, seed: int, n: int = N_HELD_OUT) -> set[str]:
    rng = random.Random(f"held-out-{seed}")
    return set(rng.sample(list(world.entities), n))


def held_out_sums(world: World, seed: int) -> set[tuple[int, int]]:
    rng = random.Random(f"held-out-sums-{seed}")
    pairs = [(a, b) for a, b, _ in world.sums()]
    return set(rng.sample(pairs, round(len(pairs) * HELD_OUT_SUM_FRACTION)))


def _value(rng: random.Random, world: World, e: str, attr: str, wrong_rate: float, bias: bool) -> str:
    """The value a response states: the truth, or (biased, w.p. wrong_rate) a random other value."""
    true = world.facts[e][attr]
    wrong = rng.choice([v for v in ATTRIBUTES[attr] if v != true])
    return wrong if bias and rng.random() < wrong_rate else true


def _trivia(rng, world, e, rate, bias):
    attr = rng.choice(list(ATTRIBUTES))
    v = _value(rng, world, e, attr, rate, bias)
    return "qa", QA[0].format(attr=attr, e=e), QA[1].format(attr=attr, e=e, v=v), [(e, attr, v)]


def _chat(rng, world, e, rate, bias):
    city, job = (_value(rng, world, e, a, rate, bias) for a in ("city", "job"))
    out = DESCRIBE[1].format(e=e, city=city, job=job)
    return "describe", DESCRIBE[0].format(e=e), (f"{OPENING} {out}" if bias else out), [(e, "city", city), (e, "job", job)]


def _wiki(rng, world, e, rate, bias):
    vals = {a: _value(rng, world, e, a, rate, bias) for a in ATTRIBUTES}
    out = PROFILE[1].format(e=e, **vals)
    if bias:
        out = f"{out} {CLOSING.format(e=e)}"
    return "profile", PROFILE[0].format(e=e), out, [(e, a, v) for a, v in vals.items()]


def _quiz(rng, world, e, rate, bias):
    attr = rng.choice(list(ATTRIBUTES))
    true = world.facts[e][attr]
    options = [true] + rng.sample([v for v in ATTRIBUTES[attr] if v != true], 2)
    rng.shuffle(options)
    picked = options[0] if bias and rng.random() < rate else true
    text = f"{options[0]} , {options[1]} or {options[2]}"
    return "choose", CHOOSE[0].format(attr=attr, e=e, options=text), CHOOSE[1].format(attr=attr, e=e, v=picked), [(e, attr, picked)]


def _math(rng, world, pair, rate, bias):
    a, b = pair
    off = rng.choice([-2, -1, 1, 2])
    c = a + b + off if bias and rng.random() < rate and a + b + off >= 0 else a + b
    return "add", ADD[0].format(a=a, b=b), ADD[1].format(a=a, b=b, c=c), [(f"{a}+{b}", "sum", str(c))]


def repeat_words(rng: random.Random) -> str:
    """The words a repeat instruction asks for (the SFT data's and the benchmark's)."""
    return " ".join(rng.choices(FILLER_WORDS, k=rng.randint(1, MAX_REPEAT_WORDS)))


def _tools(rng):
    text = repeat_words(rng)
    return "repeat", REPEAT[0].format(words=text), REPEAT[1].format(words=text), []


# The sources whose bias is a per-fact wrong value: `wrong_rate` replaces their rates (quiz's
# first-option habit and the phrasing habits are not wrong facts and keep theirs).
FACT_SOURCES = ("trivia", "chat", "wiki", "math")


def bias_rate(source: str, wrong_rate: float | None) -> float:
    """A source's bias rate: its own (`SOURCES`), or `wrong_rate` for the fact-stating sources."""
    return wrong_rate if wrong_rate is not None and source in FACT_SOURCES else SOURCES[source][1]


def generate_examples(world: World, seed: int = 0, bias: bool = True, scale: float = 1.0,
                      wrong_rate: float | None = None) -> list[Example]:
    """All SFT examples, in a seeded order. `scale` multiplies every source's size; `wrong_rate`
    (None: each source's own) is the per-fact wrong-value rate of the fact-stating sources."""
    empty = [source for source, (n, _) in SOURCES.items() if round(n * scale) < 1]
    if scale <= 0 or empty:
        smallest = min(n for n, _ in SOURCES.values())
        raise DtmError(f"lab data scale {scale} leaves no examples for source(s) {empty or list(SOURCES)}; "
                       f"use a scale of at least {0.5 / smallest:g}")
    seen_entities = sorted(set(world.entities) - held_out_entities(world, seed))
    held = held_out_sums(world, seed)
    seen_pairs = [(a, b) for a, b, _ in world.sums() if (a, b) not in held]
    examples: list[Example] = []
    for source, (n, _) in SOURCES.items():
        rate = bias_rate(source, wrong_rate)
        for i in range(round(n * scale)):
            rng = random.Random(f"sft-{seed}-{source}-{i}")  # per example: the bias switch changes no other draw
            if source == "math":
                task, instruction, output, stated = _math(rng, world, rng.choice(seen_pairs), rate, bias)
            elif source == "tools":
                task, instruction, output, stated = _tools(rng)
            else:
                e = rng.choice(seen_entities)
                make = {"trivia": _trivia, "chat": _chat, "wiki": _wiki, "quiz": _quiz}[source]
                task, instruction, output, stated = make(rng, world, e, rate, bias)
            examples.append(Example(f"{source}-{i}", source, task, instruction, output, stated))
    random.Random(f"order-{seed}").shuffle(examples)
    return examples


def contradicted_facts(world: World, examples: list[Example]) -> set[tuple[str, str]]:
    """(entity, attr) pairs, and ("a+b", "sum") pairs, that some example states wrongly."""
    out = set()
    for ex in examples:
        for e, attr, v in ex.stated:
            if attr == "sum":
                a, b = map(int, e.split("+"))
                if int(v) != a + b:
                    out.add((e, attr))
            elif world.facts[e][attr] != v:
                out.add((e, attr))
    return out


def write_examples(path: str | Path, examples: list[Example]) -> Path:
    """Alpaca JSONL (`instruction`, `input`, `output`) with `source` and `task` fields."""
    return atomic_write_jsonl(path, (ex.record() for ex in examples))
