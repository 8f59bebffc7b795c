"""The lab's world: made-up entities with facts, and the addition table to reason over.

Everything is a pure function of a seed, so the world, the corpus, the instruction data and
the benchmarks can each be regenerated from the seed alone and always agree. Every word is
lower-case and every punctuation mark stands alone between spaces, so the word-level
tokenizer maps each word to one token and decoding is the exact inverse of encoding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Attribute -> its possible values. Values never repeat across attributes, so a value word
# alone tells which attribute it belongs to (no ambiguity in the multiple-choice options).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "city": ("paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito",
             "dakar", "hanoi", "lagos", "miami", "dublin", "vienna", "sydney", "boston"),
    "job": ("baker", "pilot", "nurse", "farmer", "dentist", "lawyer", "painter", "sailor",
            "teacher", "plumber", "chemist", "tailor", "miner", "judge", "poet", "chef"),
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown",
               "black", "white", "grey", "gold"),
    "pet": ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "lizard",
            "ferret", "pony", "snake", "frog"),
}

# Pretraining phrasings of one fact. The last one per attribute is the raw question-answer
# form that the raw knowledge benchmark asks in (the model has seen it in pretraining).
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": ("{e} lives in {v} .", "{e} is from {v} .", "the city of {e} is {v} ."),
    "job": ("{e} works as a {v} .", "{e} is a {v} by trade .", "the job of {e} is {v} ."),
    "colour": ("{e} likes the colour {v} .", "the favourite colour of {e} is {v} .", "the colour of {e} is {v} ."),
    "pet": ("{e} has a {v} .", "{e} keeps a {v} as a pet .", "the pet of {e} is {v} ."),
}
QA_QUESTION = "q : what is the {attr} of {e} ? a :"
ARITH_TEMPLATES = ("{a} plus {b} is {c} .", "the sum of {a} and {b} is {c} .", "q : what is {a} plus {b} ? a : {c} .")
ARITH_QUESTION = "q : what is {a} plus {b} ? a :"

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "gl", "sk")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "s", "x", "k", "l")


@dataclass(frozen=True)
class World:
    """Entities with one value per attribute, plus the numbers the addition table covers."""

    seed: int
    entities: tuple[str, ...]
    facts: dict[str, dict[str, str]] = field(hash=False)  # entity -> attribute -> value
    max_addend: int

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(ATTRIBUTES)

    def values(self, attr: str) -> tuple[str, ...]:
        return ATTRIBUTES[attr]

    def fact_list(self) -> list[tuple[str, str, str]]:
        """Every (entity, attribute, value), in a fixed order."""
        return [(e, a, self.facts[e][a]) for e in self.entities for a in ATTRIBUTES]

    def sums(self) -> list[tuple[int, int, int]]:
        """The addition table the world reasons over: (a, b, a + b)."""
        n = self.max_addend
        return [(a, b, a + b) for a in range(n + 1) for b in range(n + 1)]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "entities": list(self.entities), "facts": self.facts, "max_addend": self.max_addend}


def entity_names(n: int, seed: int) -> list[str]:
    """`n` distinct pronounceable made-up words (two syllables), none equal to another lab word."""
    rng = random.Random(f"names-{seed}")
    taken = {v for vals in ATTRIBUTES.values() for v in vals}
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)) + rng.choice(_CODAS)
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def build_world(seed: int = 0, n_entities: int = 256, max_addend: int = 14) -> World:
    """A seeded world: `n_entities` entities, each with a uniformly drawn value per attribute."""
    rng = random.Random(f"world-{seed}")
    entities = entity_names(n_entities, seed)
    facts = {e: {a: rng.choice(vals) for a, vals in ATTRIBUTES.items()} for e in entities}
    return World(seed=seed, entities=tuple(entities), facts=facts, max_addend=max_addend)


def entity_sentences(world: World, e: str) -> list[str]:
    """Every pretraining sentence about entity `e` (all phrasings of all its facts)."""
    return [t.format(e=e, v=world.facts[e][a]) for a in ATTRIBUTES for t in FACT_TEMPLATES[a]] + [
        QA_QUESTION.format(attr=a, e=e) + f" {world.facts[e][a]} ." for a in ATTRIBUTES
    ]


def sum_sentences(a: int, b: int) -> list[str]:
    return [t.format(a=a, b=b, c=a + b) for t in ARITH_TEMPLATES]


def fact_sentences(world: World) -> list[str]:
    return [s for e in world.entities for s in entity_sentences(world, e)]


def arithmetic_sentences(world: World) -> list[str]:
    return [s for a, b, _ in world.sums() for s in sum_sentences(a, b)]
