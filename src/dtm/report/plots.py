"""The report's plots, as PNG bytes (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

import io
import math
from typing import Any

from dtm import rundir
from dtm.report.model import REFERENCE_GROUPS, ReportData
from dtm.report.stats import ERROR_CATEGORIES, early_late, mean_std, pareto_frontier, reference_phrase


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_tax_curve(data: ReportData) -> bytes | None:
    if not data.tax_curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (metric, by_fraction) in enumerate(sorted(data.tax_curve.items())):
        xs = sorted(by_fraction)
        means = [mean_std(by_fraction[x])[0] for x in xs]
        stds = [mean_std(by_fraction[x])[1] for x in xs]
        color = f"C{i}"
        ax.plot(xs, means, "o-", color=color, label=f"vanilla: {metric}")
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], color=color, alpha=0.15)
        dtm = data.scores.get(rundir.DTM, {}).get(metric)
        if dtm:
            ax.plot([1.0], [mean_std(dtm)[0]], "*", color=color, markersize=14, markeredgecolor="black", label=f"DTM: {metric}")
    ax.set_xlabel("fraction of the training data seen (vanilla SFT)")
    ax.set_ylabel("accuracy")
    ax.set_title("Alignment-tax curve")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_loss_ratio(data: ReportData) -> bytes | None:
    """Left: train and validation loss of the vanilla checkpoints. Right: the ratio of their
    reductions between checkpoints (symlog: it explodes when the validation loss stalls and
    turns negative when it rises while the train loss still falls)."""
    if len(data.losses) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtm.evaluation.diagnostics import loss_reduction_ratios

    fractions = sorted(data.losses)
    n_seeds = min(len(data.losses[f]) for f in fractions)
    fig, (ax_loss, ax_ratio) = plt.subplots(1, 2, figsize=(10, 3.6))
    for s in range(n_seeds):
        train = [data.losses[f][s][0] for f in fractions]
        val = [data.losses[f][s][1] for f in fractions]
        ax_loss.plot(fractions, train, "o-", color=f"C{s}", alpha=0.8, label=f"train, seed {s + 1}")
        ax_loss.plot(fractions, val, "s--", color=f"C{s}", alpha=0.8, label=f"validation, seed {s + 1}")
        ratios = loss_reduction_ratios(train, val)
        ax_ratio.plot(fractions[1:], [math.nan if r is None else r for r in ratios], "o-", color=f"C{s}", alpha=0.8, label=f"seed {s + 1}")
    ax_loss.set_xlabel("fraction of the training data seen")
    ax_loss.set_ylabel("loss (response tokens)")
    ax_loss.set_title("Vanilla SFT: train vs validation loss")
    ax_loss.legend(fontsize=6, ncol=2)
    ax_ratio.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax_ratio.set_yscale("symlog", linthresh=1.0)
    ax_ratio.set_xlabel("fraction of the training data seen")
    ax_ratio.set_ylabel("Δ train loss / Δ validation loss")
    ax_ratio.set_title("Loss-reduction ratio (large or negative: fitting data-specific bias)", fontsize=9)
    ax_ratio.legend(fontsize=7)
    for ax in (ax_loss, ax_ratio):
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_tradeoff(data: ReportData) -> bytes | None:
    if not data.tradeoff_axes:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k_col, i_col = data.tradeoff_axes
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = {"base": "s", "vanilla": "o", "vanilla checkpoints": ".", "wise-ft": "^", "soup": "D", "dtm": "*", "baseline": "x", "sub-model": "v"}
    reference = []
    seen_groups: set[str] = set()
    for model, s in data.scores.items():
        if not s.get(k_col) or not s.get(i_col):
            continue
        group = data.groups.get(model, "baseline")
        x, y = mean_std(s[i_col])[0], mean_std(s[k_col])[0]
        if group in REFERENCE_GROUPS:
            reference.append((x, y))
        size = 16 if group == "dtm" else 8
        label = group if group not in seen_groups else None
        seen_groups.add(group)
        ax.plot([x], [y], markers.get(group, "x"), markersize=size, color=f"C{sorted(markers).index(group) if group in markers else 9}", label=label)
        if group not in {"vanilla checkpoints"}:
            ax.annotate(model, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if len(reference) >= 2:
        front = pareto_frontier(reference)
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, label=f"frontier ({reference_phrase(sorted(seen_groups & REFERENCE_GROUPS))})")
    ax.set_xlabel(i_col)
    ax.set_ylabel(k_col)
    ax.set_title("Knowledge vs instruction following")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_token_losses(data: ReportData) -> bytes | None:
    """Left: per interval between vanilla's snapshots, the median frequency rank of the tokens whose
    loss fell most (one line per seed). Right: the first seed's early and late intervals, every
    token's mean loss drop against its frequency rank, the top tokens labelled."""
    runs = [r for r in data.token_losses if r["intervals"]]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rank, ax_scatter) = plt.subplots(1, 2, figsize=(11, 4))
    for s, run in enumerate(runs):
        points = [(iv["to"], iv["median_rank_top"]) for iv in run["intervals"] if iv["median_rank_top"] is not None]
        ax_rank.plot([x for x, _ in points], [y for _, y in points], "o-", color=f"C{s}", label=f"seed {run['seed']}: top {run['top']}")
        points = [(iv["to"], iv["median_rank_all"]) for iv in run["intervals"] if iv["median_rank_all"] is not None]
        ax_rank.plot([x for x, _ in points], [y for _, y in points], ":", color=f"C{s}", alpha=0.6,
                     label=f"seed {run['seed']}: all tokens seen" if s == 0 else None)
    ax_rank.invert_yaxis()
    ax_rank.set_xlabel("end of the interval (fraction of vanilla's training)")
    ax_rank.set_ylabel("median frequency rank (up = more frequent)")
    ax_rank.set_title("How frequent are the tokens whose loss fell most?", fontsize=9)
    ax_rank.legend(fontsize=7)
    first = runs[0]
    picked = early_late([iv["to"] for iv in first["intervals"]])
    for colour, label, i in zip(("C0", "C3"), ("early", "late"), sorted(set(picked or ()))):
        iv = first["intervals"][i]
        ranks = [t[3] for t in iv["tokens"]]
        drops = [t[1] for t in iv["tokens"]]
        ax_scatter.scatter(ranks, drops, s=6, alpha=0.35, color=colour, label=f"{label} ({iv['from']:g} → {iv['to']:g})")
        for t in iv["top"][:5]:
            ax_scatter.annotate(t["token"].strip() or repr(t["token"]), (t["rank"], t["mean_drop"]), fontsize=6, color=colour)
    ax_scatter.set_xscale("log")
    ax_scatter.axhline(0.0, color="gray", lw=0.8)
    ax_scatter.set_xlabel("frequency rank in the training data (log; 1 = most frequent)")
    ax_scatter.set_ylabel("mean loss drop per occurrence")
    ax_scatter.set_title(f"Every token seen ≥ {first['min_count']} times (seed {first['seed']})", fontsize=9)
    ax_scatter.legend(fontsize=7)
    for ax in (ax_rank, ax_scatter):
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_error_sets(data: ReportData) -> bytes | None:
    """One panel per task: the questions by how many sub-models get them wrong, stacked into those
    DTM gets right and wrong (mean over seeds); 'none' shows only DTM's new errors (its right
    answers there would dwarf the rest)."""
    if not data.error_sets:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data.error_sets)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, sets in zip(axes.flat, data.error_sets):
        labels = [f"all {sets.k}", "some", "one", "none"]
        wrong = [sets.mean(c, "merged_wrong") for c in ERROR_CATEGORIES]
        right = [sets.mean(c, "questions") - w for c, w in zip(ERROR_CATEGORIES, wrong)]
        right[-1] = 0.0
        ax.bar(labels, right, color="C2", label="DTM right (fixed)")
        ax.bar(labels, wrong, bottom=right, color="C3", label="DTM wrong (kept / new)")
        ax.set_title(f"{sets.task} ({sets.metric})", fontsize=8)
        ax.set_xlabel("sub-models wrong", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].set_ylabel("questions")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


def render_plots(data: ReportData) -> dict[str, bytes]:
    """Plot id -> PNG of every plot the data has (tax_curve, tradeoff, loss_ratio, token_losses, error_sets)."""
    plots = {"tax_curve": plot_tax_curve(data), "tradeoff": plot_tradeoff(data), "loss_ratio": plot_loss_ratio(data),
             "token_losses": plot_token_losses(data), "error_sets": plot_error_sets(data)}
    return {k: v for k, v in plots.items() if v}
