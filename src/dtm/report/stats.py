"""The report's math, pure functions tested on hand-computed numbers: mean and spread over seeds,
best per column, the knowledge/instruction frontier, what each method cost. (The loss-reduction
ratio is `dtm.evaluation.diagnostics`'.)"""

from __future__ import annotations

import math
from typing import Any

from dtm import rundir
from dtm.report.model import REFERENCE_GROUPS, ReportData


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def best_per_column(scores: dict[str, dict[str, list[float]]], columns: list[str],
                    stderr: dict[str, dict[str, list[float]]] | None = None) -> dict[str, str]:
    """Column -> the model whose mean leads by more than the standard error of its lead.

    No best where the top is shared (a tie is not a best), nor where the runner-up is within
    sqrt(se_top² + se_runner-up²), each model's se being its evaluations' standard error (mean
    over seeds): a difference smaller than its standard error is not a win. Without standard
    errors the top must only be strictly higher."""
    best: dict[str, str] = {}
    stderr = stderr or {}
    for col in columns:
        ranked = sorted(((mean_std(s[col])[0], m) for m, s in scores.items() if s.get(col)), key=lambda x: -x[0])
        ranked = [(v, m) for v, m in ranked if not math.isnan(v)]
        if not ranked:
            continue
        if len(ranked) == 1:
            best[col] = ranked[0][1]
            continue
        (top, model), (second, other) = ranked[0], ranked[1]
        margin = math.hypot(column_stderr(stderr, model, col), column_stderr(stderr, other, col))
        if top - second > margin:
            best[col] = model
    return best


def column_stderr(stderr: dict[str, dict[str, list[float]]], model: str, column: str) -> float:
    """A model's standard error in a column: the mean of its seeds' (0 where none is known)."""
    values = [v for v in stderr.get(model, {}).get(column, []) if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else 0.0


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (x, y), both maximised; sorted by x ascending (y then descends)."""
    front = []
    for x, y in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def frontier_gap(point: tuple[float, float], reference: list[tuple[float, float]]) -> float:
    """y of `point` minus the frontier of `reference` at the point's x.

    The frontier is the Pareto front joined by straight lines (mixing two models' weights or
    outputs moves roughly along such chords). Left of the front's first point the frontier is
    that point's y; right of its last point nothing reaches that x, and the gap is measured
    against the last point's y. Positive: more y at equal x than any mix of the references.
    """
    front = pareto_frontier(reference)
    x, y = point
    if x <= front[0][0]:
        return y - front[0][1]
    if x >= front[-1][0]:
        return y - front[-1][1]
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= x <= x1:
            return y - (y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    raise AssertionError("unreachable")


def redone_text(redone: dict[str, int]) -> str:
    """`{"vanilla": 3, "sub-2": 1}` -> "4 steps (sub-2 1, vanilla 3)": the training steps a stage
    did twice because an attempt was interrupted (a lost node, a killed run), in all and by model."""
    total = sum(redone.values())
    return f"{total} step{'s' if total != 1 else ''} ({', '.join(f'{m} {n}' for m, n in sorted(redone.items()))})"


def fmt(values: list[float], digits: int = 3, se: float | None = None) -> str:
    """mean ± std (just the mean for one value, – for none), then the standard error if given."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")
    return text + (f" (se {se:.{digits}f})" if se else "")


# How the sentence names each reference group, in the order it lists them.
GROUP_PHRASES = {"base": "the base", "vanilla": "vanilla", "vanilla checkpoints": "vanilla checkpoints",
                 "wise-ft": "WiSE-FT interpolations"}


def reference_phrase(groups: list[str]) -> str:
    """'the base, vanilla and WiSE-FT interpolations': only the groups a run has, so the sentence
    never names checkpoints or interpolations that were not made."""
    names = [GROUP_PHRASES[g] for g in GROUP_PHRASES if g in groups]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def frontier_stderr(x: float, reference: dict[tuple[float, float], float]) -> float:
    """The standard error of the frontier's y at `x`: the larger of the two front points the chord
    at x joins (one point left or right of the front). A chord mixes its ends, so its error is
    at most the larger of theirs; `reference` maps each point to its se (0 where unknown)."""
    front = pareto_frontier(list(reference))
    if x <= front[0][0]:
        return reference[front[0]]
    if x >= front[-1][0]:
        return reference[front[-1]]
    return next(max(reference[a], reference[b]) for a, b in zip(front, front[1:]) if a[0] <= x <= b[0])


def tradeoff_summary(data: ReportData, subject: str = rundir.DTM) -> str | None:
    """One sentence: where `subject` lies against the frontier of the run's base/vanilla/WiSE-FT
    models. Above or below only when the gap exceeds its standard error, hypot(subject's se,
    the frontier's se) in the knowledge column, as the headline's bold does; else "on ... within
    its standard error"."""
    if not data.tradeoff_axes or subject not in data.scores:
        return None
    k_col, i_col = data.tradeoff_axes
    members = [m for m, s in data.scores.items() if data.groups.get(m) in REFERENCE_GROUPS and s.get(i_col) and s.get(k_col)]
    if not members:
        return None
    reference: dict[tuple[float, float], float] = {}
    for m in members:
        point = (mean_std(data.scores[m][i_col])[0], mean_std(data.scores[m][k_col])[0])
        reference[point] = max(reference.get(point, 0.0), column_stderr(data.stderr, m, k_col))
    point = (mean_std(data.scores[subject][i_col])[0], mean_std(data.scores[subject][k_col])[0])
    gap = frontier_gap(point, list(reference))
    margin = math.hypot(column_stderr(data.stderr, subject, k_col), frontier_stderr(point[0], reference))
    where = "above" if gap > margin else "below" if gap < -margin else "on"
    within = f" (within its standard error {margin:.3f})" if where == "on" and gap != 0 else ""
    traced = reference_phrase([data.groups[m] for m in members])
    dominating = [
        m for m, s in data.scores.items()
        if m != subject and s.get(i_col) and s.get(k_col)
        and mean_std(s[i_col])[0] >= point[0] and mean_std(s[k_col])[0] >= point[1]
    ]
    others = (f" Models with at least as much {k_col} and {i_col} as {subject}: {', '.join(dominating)}." if dominating
              else f" No other model has both at least as much {k_col} and as much {i_col}.")
    return (
        f"{subject} lies {where} the frontier traced by {traced}{within}: "
        f"{gap:+.3f} {k_col} at its {i_col} of {point[0]:.3f}." + others
    )


# ---------------------------------------------------------------- compute


def training_cost(complete: dict[str, Any]) -> dict[str, float]:
    """What one trained model cost, from its training summary (`rundir.training_summary`): optimizer steps, examples
    processed (examples × epochs, replay included), real tokens processed (where training recorded them) and seconds."""
    cfg = complete.get("config", {})
    n = complete["examples"] + complete.get("replay_examples", 0)
    if cfg.get("max_steps", -1) > 0:  # stopped by steps, not epochs: every step saw a full batch
        processed = complete["steps"] * cfg["per_device_train_batch_size"] * cfg.get("gradient_accumulation_steps", 1)
    else:
        processed = n * cfg["num_train_epochs"]
    cost = {"steps": float(complete["steps"]), "examples": float(processed), "seconds": float(complete["seconds"])}
    if "trained_tokens" in complete:
        cost["tokens"] = float(complete["trained_tokens"])
    return cost


def _sum_costs(costs: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise sum; a key missing from any part is left out (a partial sum would understate the cost)."""
    keys = set.intersection(*(set(c) for c in costs)) if costs else set()
    return {k: sum(c[k] for c in costs) for k in sorted(keys)}


def method_costs(trained: dict[str, dict[str, float]], merge_seconds: dict[str, float],
                 ensembles: tuple[str, ...] = ()) -> dict[str, tuple[str, dict[str, float]]]:
    """method -> (what it sums, its cost), by the run directory's model names: DTM = sub-1..sub-K + its merge,
    soup = short + soup-2.. + its merge, WiSE-FT = its merge only (vanilla is reused, not retrained), an
    ensemble = its sub-models (no merge); every other trained or merged model is its own cost."""
    subs = rundir.sub_models(trained)
    ingredients = rundir.soup_ingredients(trained)
    zero = {k: 0.0 for cost in trained.values() for k in cost} or {"steps": 0.0, "examples": 0.0, "seconds": 0.0}
    out: dict[str, tuple[str, dict[str, float]]] = {}
    for name, cost in trained.items():
        if not rundir.is_sub_model(name) and not rundir.is_soup_ingredient(name):
            out[name] = (name, dict(cost))
    for name, sec in merge_seconds.items():
        parts = {rundir.DTM: subs, rundir.SOUP: ingredients}.get(name, [])
        merged = {**zero, "seconds": sec}
        if parts:
            out[name] = (", ".join(parts) + " + merge", _sum_costs([trained[p] for p in parts] + [merged]))
        elif rundir.is_wise_ft(name):
            out[name] = ("merge only (reuses vanilla)", merged)
        else:
            out[name] = ("merge", merged)
    for name in ensembles:
        if subs:
            out[name] = (", ".join(subs) + " (no merge)", _sum_costs([trained[p] for p in subs]))
    return out


# ---------------------------------------------------------------- error sets (which questions the sub-models miss)

ERROR_CATEGORIES = ("all", "some", "one", "none")  # how many of the K sub-models get a question wrong


def error_category(wrong: int, k: int) -> str:
    """'all' K sub-models wrong, 'one', 'none', or 'some' (2..K-1); with K=1 a miss is 'all'."""
    if wrong == k and k > 0:
        return "all"
    return {0: "none", 1: "one"}.get(wrong, "some")


def error_sets(sub_correct: list[dict[Any, bool]], merged_correct: dict[Any, bool]) -> dict[str, dict[str, int]]:
    """Category (`ERROR_CATEGORIES`) -> {"questions", "merged_wrong"}: the questions by how many
    sub-models get them wrong, and how many of those the merged model gets wrong too (kept; the
    rest it fixes; in 'none' they are its new errors). Only the questions every model answered count."""
    ids = [q for q in merged_correct if all(q in s for s in sub_correct)]
    out = {c: {"questions": 0, "merged_wrong": 0} for c in ERROR_CATEGORIES}
    for q in ids:
        cell = out[error_category(sum(not s[q] for s in sub_correct), len(sub_correct))]
        cell["questions"] += 1
        cell["merged_wrong"] += int(not merged_correct[q])
    return out


def _category_rate(per_seed: list[dict[str, dict[str, dict[str, int]]]], category: str) -> tuple[list[float], float]:
    """(per seed: the share of the category's questions, over all tasks, that the merged model
    gets wrong; mean question count)."""
    totals = [(sum(t[category]["questions"] for t in seed.values()), sum(t[category]["merged_wrong"] for t in seed.values()))
              for seed in per_seed]
    return [w / q for q, w in totals if q], sum(q for q, _ in totals) / max(len(totals), 1)


def error_set_summary(per_seed: list[dict[str, dict[str, dict[str, int]]]]) -> str | None:
    """One sentence over all tasks (`error_sets` per task, per seed): how often the merged model
    fixes what all / several / one sub-model gets wrong, and its new errors."""
    parts = []
    for category, label in (("all", "every sub-model gets wrong"), ("some", "several (not all) get wrong"),
                            ("one", "exactly one gets wrong"), ("none", "every sub-model gets right")):
        wrong, n = _category_rate(per_seed, category)
        if not wrong:
            continue
        rates = wrong if category == "none" else [1 - w for w in wrong]
        mean, std = mean_std(rates)
        spread = f" ± {std:.1%}" if len(rates) > 1 else ""
        parts.append(f"of the {n:.0f} questions {label}, DTM gets {mean:.1%}{spread} " + ("wrong" if category == "none" else "right"))
    return ("Over all tasks (mean over seeds): " + "; ".join(parts) + ".") if parts else None


# ---------------------------------------------------------------- token-level diagnostic


def early_late(ends: list[float], early: float = 0.1, late: float = 0.9) -> tuple[int, int] | None:
    """Indices of the intervals between snapshots (given by where each ends) nearest `early` and
    `late` of training (the first on ties); None when there is no interval."""
    if not ends:
        return None
    nearest = lambda target: min(range(len(ends)), key=lambda i: (abs(ends[i] - target), i))  # noqa: E731
    return nearest(early), nearest(late)


def token_rank_summary(early: list[float], late: list[float], top: int) -> str:
    """The median frequency rank of the top tokens early and late (mean ± std over seeds), and
    what they say only as far as every seed agrees."""
    (e, es), (lt, ls) = mean_std(early), mean_std(late)
    spread = len(early) > 1
    text = (f"Median frequency rank of the {top} tokens whose loss fell most: early {e:.0f}" + (f" ± {es:.0f}" if spread else "")
            + f", late {lt:.0f}" + (f" ± {ls:.0f}" if spread else "") + " (rank 1 = the most frequent response token).")
    if all(b > a for a, b in zip(early, late)):
        return text + (" Late in training the loss falls most on rarer tokens" + (" in every seed" if spread else "")
                       + ", as the paper reports (common words early, data-specific tokens late).")
    if all(b < a for a, b in zip(early, late)):
        return text + " Late in training the loss falls most on *more* frequent tokens here: the opposite of the paper's observation."
    return text + " The seeds disagree on the direction: no consistent difference."
