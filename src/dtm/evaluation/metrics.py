"""Metrics as small pure functions (the lm-evaluation-harness definitions where one exists).

- acc: argmax of the summed log-likelihood of each choice is the gold choice;
- acc_norm: the same after dividing each choice's log-likelihood by its length in characters
  (lm-eval divides by `len(choice)` of the choice string; for ASCII that is its byte length);
- standard error of a mean of per-item scores: sample standard deviation / sqrt(n), as lm-eval;
- exact_match after normalisation (whitespace; case when asked), a numeric extractor for
  GSM8K-style answers, a regex extractor; pattern_match: the whole output matches the row's regex.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean (sample std, ddof=1, over sqrt n); None below two items."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on ties (numpy's rule, which lm-eval uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mc_item_scores(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc and acc_norm of one question from its choices' summed log-likelihoods."""
    acc = float(argmax(loglikelihoods) == gold)
    normed = [ll / max(len(c), 1) for ll, c in zip(loglikelihoods, choices, strict=True)]
    return {"acc": acc, "acc_norm": float(argmax(normed) == gold)}


def summarize(per_item: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """Mean and standard error of each per-item score (items lacking a score are left out of it)."""
    keys: list[str] = []
    for item in per_item:
        keys += [k for k in item if k not in keys]
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [item[k] for item in per_item if k in item]
        out[k] = sum(vals) / len(vals) if vals else None
        out[f"{k}_stderr"] = mean_stderr(vals)
    return out


def grouped(per_item: Sequence[dict[str, float]], groups: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """summarize() per group value, plus each group's item count."""
    buckets: dict[str, list[dict[str, float]]] = {}
    for item, g in zip(per_item, groups, strict=True):
        buckets.setdefault(str(g), []).append(item)
    return {g: summarize(items) | {"items": len(items)} for g, items in sorted(buckets.items())}


def per_item_columns(ids: Sequence[Any], per_item: Sequence[dict[str, float]]) -> dict[str, list[Any]]:
    """Per-question scores as columns, {"ids": [...], metric: [score per id]} (None where an item
    lacks the metric; 0/1 scores as ints): what the error-set diagnostic compares across models."""
    if len(ids) != len(per_item):
        raise ValueError(f"{len(ids)} ids but {len(per_item)} per-item scores")
    keys: list[str] = []
    for item in per_item:
        keys += [k for k in item if k not in keys]
    columns: dict[str, list[Any]] = {"ids": list(ids)}
    for k in keys:
        columns[k] = [None if k not in item else int(item[k]) if float(item[k]).is_integer() else item[k] for item in per_item]
    return columns


# ---------------------------------------------------------------- generation


def normalize(text: str, ignore_case: bool = False) -> str:
    """Collapse whitespace, strip the ends; lower-case when asked."""
    text = " ".join(text.split())
    return text.lower() if ignore_case else text


_NUMBER = re.compile(r"-?[$0-9.,]*[0-9]")


def _to_number(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_numeric(text: str) -> float | None:
    """The answer number of a GSM8K-style text: after '####' if present, else the last number
    (lm-eval's flexible-extract); commas, '$' and a trailing period are ignored."""
    if "####" in text:
        text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    for cand in reversed(found):
        value = _to_number(cand)
        if value is not None:
            return value
    return None


def extract_regex(text: str, pattern: str) -> str:
    """Group 1 (or the whole match) of the first match; '[invalid]' when nothing matches (lm-eval)."""
    m = re.search(pattern, text)
    if m is None:
        return "[invalid]"
    return m.group(1) if m.groups() else m.group(0)


def exact_match(output: str, answer: str, extractor: str = "exact", regex: str | None = None, ignore_case: bool = False) -> float:
    """1.0 when the extracted output equals the answer after normalisation."""
    if extractor == "numeric":
        got, want = extract_numeric(output), extract_numeric(str(answer))
        return float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))
    if extractor == "regex":
        output = extract_regex(output, regex or "(.*)")
    return float(normalize(output, ignore_case) == normalize(str(answer), ignore_case))


def pattern_match(output: str, pattern: str) -> float:
    """1.0 when the whole output (surrounding whitespace stripped) matches `pattern`."""
    return float(re.fullmatch(pattern, output.strip(), flags=re.DOTALL) is not None)


# ---------------------------------------------------------------- perplexity


def perplexity_metrics(loglikelihoods: Sequence[float], texts: Sequence[str], token_counts: Sequence[int]) -> dict[str, float]:
    """Corpus-level (weighted) perplexities, as lm-eval aggregates them."""
    total = sum(loglikelihoods)
    words = sum(len(re.split(r"\s+", t.strip())) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    tokens = sum(token_counts)
    return {
        "token_perplexity": math.exp(-total / max(tokens, 1)),
        "word_perplexity": math.exp(-total / max(words, 1)),
        "byte_perplexity": math.exp(-total / max(nbytes, 1)),
        "bits_per_byte": -total / max(nbytes, 1) / math.log(2),
    }
