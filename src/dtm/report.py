"""The report: the alignment tax and its cure at a glance.

Input is plain data (`ReportData`, assembled by the pipeline from the run directory); output
is `report.md` and a self-contained `report.html` (plots embedded as PNG data URIs).
The math (mean and spread over seeds, best per column, the knowledge/instruction frontier;
the loss-reduction ratio is `dtm.evaluation.diagnostics`') lives in small pure functions so it can be tested on hand-computed numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtm.io import atomic_write_text

# ---------------------------------------------------------------- data


@dataclass
class GroupTable:
    """One metric of a grouped generation task (e.g. instruction following by instruction type),
    one column per group: shows whether every model, each sub-model included, learned every group."""

    task: str
    metric: str  # the result's metric name, as the evaluator wrote it
    suffix: str  # the metric's headline column suffix ("" for the main metric, " (format)", ...)
    groups: list[str]  # column headers
    columns: list[str]  # the matching score columns (`task/group` plus the metric's headline suffix)
    rows: list[str]  # models, in display order


@dataclass
class ReportData:
    title: str
    # model -> column -> one value per seed (higher is better in every column)
    scores: dict[str, dict[str, list[float]]]
    columns: list[str]
    notes: list[str] = field(default_factory=list)  # setting: seeds, K, data sizes, compute
    # metric -> fraction -> per-seed values, for vanilla checkpoints along training
    tax_curve: dict[str, dict[float, list[float]]] = field(default_factory=dict)
    # fraction -> (train_loss, val_loss) per seed, for the loss-reduction-ratio diagnostic
    losses: dict[float, list[tuple[float, float]]] = field(default_factory=dict)
    # trade-off axes: column names of knowledge and instruction following
    tradeoff_axes: tuple[str, str] | None = None
    # model -> group ("base", "vanilla checkpoints", "wise-ft", "soup", "dtm", ...)
    groups: dict[str, str] = field(default_factory=dict)
    portions: list[dict[str, Any]] = field(default_factory=list)  # dispersal stats per portion
    # method -> {steps, examples, seconds} (COMPUTE_COLUMNS keys), mean over seeds of its parts' sum
    compute: dict[str, dict[str, float]] = field(default_factory=dict)
    compute_parts: dict[str, str] = field(default_factory=dict)  # method -> what its numbers sum
    group_tables: list[GroupTable] = field(default_factory=list)  # a generation task's metric per group
    controls: list[ReportData] = field(default_factory=list)  # e.g. the no-bias lab
    table: list[str] | None = None  # models in the headline table (None = all); the rest only in plots
    detail_columns: list[str] = field(default_factory=list)  # a second, full table (every metric and split)

    def table_scores(self) -> dict[str, dict[str, list[float]]]:
        return {m: self.scores[m] for m in (self.table if self.table is not None else self.scores) if m in self.scores}


# ---------------------------------------------------------------- pure functions


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def best_per_column(scores: dict[str, dict[str, list[float]]], columns: list[str]) -> dict[str, str]:
    """Column -> model with the highest mean (first one on ties)."""
    best: dict[str, str] = {}
    for col in columns:
        ranked = [(mean_std(s[col])[0], m) for m, s in scores.items() if s.get(col)]
        ranked = [(v, m) for v, m in ranked if not math.isnan(v)]
        if ranked:
            top = max(v for v, _ in ranked)
            best[col] = next(m for v, m in ranked if v == top)
    return best


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


def fmt(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


# ---------------------------------------------------------------- tables


def scores_markdown(rows: dict[str, dict[str, list[float]]], columns: list[str], headers: list[str] | None = None) -> str:
    """A model x column table of mean ± std, the best mean per column in bold."""
    best = best_per_column(rows, columns)
    lines = ["| model | " + " | ".join(headers or columns) + " |", "|---|" + "---|" * len(columns)]
    for model, s in rows.items():
        cells = []
        for col in columns:
            cell = fmt(s.get(col, []))
            cells.append(f"**{cell}**" if best.get(col) == model else cell)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scores_html(rows: dict[str, dict[str, list[float]]], columns: list[str], table_id: str, headers: list[str] | None = None) -> str:
    """The HTML twin of `scores_markdown` (best cells get class `best`)."""
    best = best_per_column(rows, columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in headers or columns)
    body = []
    for model, s in rows.items():
        cells = "".join(
            f"<td class=\"{'best' if best.get(c) == model else ''}\">{html.escape(fmt(s.get(c, [])))}</td>" for c in columns
        )
        body.append(f"<tr><th scope=row>{html.escape(model)}</th>{cells}</tr>")
    return f"<table id={table_id} class=headline><thead><tr><th>model</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def headline_markdown(data: ReportData, columns: list[str] | None = None) -> str:
    return scores_markdown(data.table_scores(), columns or data.columns)


def headline_html(data: ReportData, table_id: str = "headline", columns: list[str] | None = None) -> str:
    return scores_html(data.table_scores(), columns or data.columns, table_id)


def group_table_rows(data: ReportData, table: GroupTable) -> dict[str, dict[str, list[float]]]:
    return {m: data.scores[m] for m in table.rows if m in data.scores}


def group_table_title(table: GroupTable) -> str:
    """Named as its headline column, so the per-group table reads as that column split up."""
    return f"{table.task}{table.suffix} per group: {table.metric}"


GROUP_NOTE = ("Mean ± sample std over seeds, one column per group of the task's items; each sub-model has its own row, "
              "to show whether every sub-model learned every group.")


COMPUTE_COLUMNS = {  # key -> (header, decimals)
    "steps": ("optimizer steps", 0),
    "examples": ("examples processed (examples × epochs)", 0),
    "tokens": ("tokens processed (no padding)", 0),
    "seconds": ("train+merge seconds", 1),
}
COMPUTE_NOTE = (
    "Mean over seeds. A method's numbers are the sum over the models it needs (column 'sums'): DTM's sub-models "
    "and merge, the soup's ingredients and merge; WiSE-FT reuses vanilla and adds only a merge (0 training of its own). "
    "Examples processed = training examples × epochs; tokens processed = their real tokens (prompt and response, "
    "padding excluded). Seconds are summed "
    "even where models were trained side by side, so they measure compute, not the wait."
)


def compute_table(data: ReportData) -> tuple[list[str], list[list[str]]]:
    """Header and rows (model, what it sums, then one cell per compute column) of the compute table;
    shared by the markdown and the HTML so the two cannot drift apart."""
    keys = [k for k in COMPUTE_COLUMNS if any(k in v for v in data.compute.values())]
    keys += sorted({k for v in data.compute.values() for k in v} - set(keys))
    header = ["model", "sums", *(COMPUTE_COLUMNS.get(k, (k, 1))[0] for k in keys)]
    rows = []
    for model, v in data.compute.items():
        cells = [f"{v[k]:.{COMPUTE_COLUMNS.get(k, (k, 1))[1]}f}" if k in v else "–" for k in keys]
        rows.append([model, data.compute_parts.get(model, model), *cells])
    return header, rows


def tradeoff_summary(data: ReportData, subject: str = "DTM") -> str | None:
    """One sentence: where `subject` lies against the frontier of base/vanilla/WiSE-FT models."""
    if not data.tradeoff_axes or subject not in data.scores:
        return None
    k_col, i_col = data.tradeoff_axes
    ref_groups = {"base", "vanilla", "vanilla checkpoints", "wise-ft"}
    reference = [
        (mean_std(s[i_col])[0], mean_std(s[k_col])[0])
        for m, s in data.scores.items()
        if data.groups.get(m) in ref_groups and s.get(i_col) and s.get(k_col)
    ]
    if not reference:
        return None
    point = (mean_std(data.scores[subject][i_col])[0], mean_std(data.scores[subject][k_col])[0])
    gap = frontier_gap(point, reference)
    where = "above" if gap > 0 else "below" if gap < 0 else "on"
    dominating = [
        m for m, s in data.scores.items()
        if m != subject and s.get(i_col) and s.get(k_col)
        and mean_std(s[i_col])[0] >= point[0] and mean_std(s[k_col])[0] >= point[1]
    ]
    others = (f" Models with at least as much {k_col} and {i_col} as {subject}: {', '.join(dominating)}." if dominating
              else f" No other model has both at least as much {k_col} and as much {i_col}.")
    return (
        f"{subject} lies {where} the frontier traced by the base, vanilla checkpoints and WiSE-FT "
        f"interpolations: {gap:+.3f} {k_col} at its {i_col} of {point[0]:.3f}." + others
    )


# ---------------------------------------------------------------- plots


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
        dtm = data.scores.get("DTM", {}).get(metric)
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
        if group in {"base", "vanilla", "vanilla checkpoints", "wise-ft"}:
            reference.append((x, y))
        size = 16 if group == "dtm" else 8
        label = group if group not in seen_groups else None
        seen_groups.add(group)
        ax.plot([x], [y], markers.get(group, "x"), markersize=size, color=f"C{sorted(markers).index(group) if group in markers else 9}", label=label)
        if group not in {"vanilla checkpoints"}:
            ax.annotate(model, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if len(reference) >= 2:
        front = pareto_frontier(reference)
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, label="frontier (base/vanilla/WiSE-FT)")
    ax.set_xlabel(i_col)
    ax.set_ylabel(k_col)
    ax.set_title("Knowledge vs instruction following")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------- writing


def _portions_markdown(portions: list[dict[str, Any]]) -> str:
    if not portions:
        return ""
    keys = [k for k in portions[0] if k != "sources"]
    lines = ["| " + " | ".join(keys) + " | sources |", "|" + "---|" * (len(keys) + 1)]
    for p in portions:
        sources = ", ".join(f"{k}: {v}" for k, v in p.get("sources", {}).items())
        lines.append("| " + " | ".join(str(p[k]) for k in keys) + f" | {sources} |")
    return "\n".join(lines)


def _compute_markdown(data: ReportData) -> str:
    header, rows = compute_table(data)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(data: ReportData, images: dict[str, str], level: int = 1) -> str:
    h = "#" * level
    parts = [f"{h} {data.title}", "", *[f"- {n}" for n in data.notes], "", f"{h}# Headline (mean ± sample std over seeds; best per column in bold)", "", headline_markdown(data), ""]
    summary = tradeoff_summary(data)
    if summary:
        parts += [summary, ""]
    for name, caption in (("tax_curve", "Alignment-tax curve"), ("tradeoff", "Trade-off"), ("loss_ratio", "Train/validation loss and the loss-reduction ratio")):
        if name in images:
            parts += [f"{h}# {caption}", "", f"![{caption}]({images[name]})", ""]
    if data.detail_columns:
        parts += [f"{h}# All metrics (every task and split)", "", headline_markdown(data, data.detail_columns), ""]
    for table in data.group_tables:
        parts += [f"{h}# {group_table_title(table)}", "", GROUP_NOTE, "",
                  scores_markdown(group_table_rows(data, table), table.columns, table.groups), ""]
    if data.portions:
        parts += [f"{h}# Portions", "", _portions_markdown(data.portions), ""]
    if data.compute:
        parts += [f"{h}# Wall time and compute per method", "", COMPUTE_NOTE, "", _compute_markdown(data), ""]
    for control in data.controls:
        parts += [_markdown(control, {}, level + 1), ""]
    return "\n".join(parts)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th[scope=row],thead th:first-child{text-align:left}td.best{font-weight:bold;background:#e6f4ea}
img{max-width:100%;border:1px solid #eee}.note{color:#555}
"""


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower())


def _html_section(data: ReportData, images: dict[str, bytes], level: int = 1) -> str:
    h1, h2 = f"h{level}", f"h{level + 1}"
    parts = [f"<{h1}>{html.escape(data.title)}</{h1}>", "<ul class=note>" + "".join(f"<li>{html.escape(n)}</li>" for n in data.notes) + "</ul>"]
    parts += [f"<{h2}>Headline</{h2}>", "<p class=note>Mean ± sample standard deviation over seeds; the best value per column is highlighted.</p>", headline_html(data, "headline" if level == 1 else "headline-" + _slug(data.title))]
    summary = tradeoff_summary(data)
    if summary:
        parts.append(f"<p id=frontier>{html.escape(summary)}</p>")
    for name, caption in (("tax_curve", "Alignment-tax curve"), ("tradeoff", "Knowledge vs instruction following"), ("loss_ratio", "Train/validation loss and the loss-reduction ratio")):
        if images.get(name):
            b64 = base64.b64encode(images[name]).decode()
            parts.append(f"<{h2}>{caption}</{h2}><img class=plot id={name} alt='{caption}' src='data:image/png;base64,{b64}'>")
    if data.detail_columns:
        parts.append(f"<{h2}>All metrics (every task and split)</{h2}>" + headline_html(data, "detail-" + _slug(data.title), data.detail_columns))
    for table in data.group_tables:
        table_id = "groups-" + _slug(f"{data.title} {table.task} {table.metric}")
        parts.append(f"<{h2}>{html.escape(group_table_title(table))}</{h2}><p class=note>{html.escape(GROUP_NOTE)}</p>"
                     + scores_html(group_table_rows(data, table), table.columns, table_id, table.groups))
    if data.portions:
        keys = [k for k in data.portions[0] if k != "sources"]
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(p[k]))}</td>" for k in keys)
            + f"<td style='text-align:left'>{html.escape(', '.join(f'{a}: {b}' for a, b in p.get('sources', {}).items()))}</td></tr>"
            for p in data.portions
        )
        parts.append(f"<{h2}>Portions</{h2}><table id=portions><tr>" + "".join(f"<th>{k}</th>" for k in keys) + f"<th>sources</th></tr>{rows}</table>")
    if data.compute:
        header, rows = compute_table(data)
        body = "".join(f"<tr><th scope=row>{html.escape(r[0])}</th><td style='text-align:left'>{html.escape(r[1])}</td>"
                       + "".join(f"<td>{html.escape(c)}</td>" for c in r[2:]) + "</tr>" for r in rows)
        parts.append(f"<{h2}>Wall time and compute per method</{h2}><p class=note>{html.escape(COMPUTE_NOTE)}</p>"
                     + f"<table id=compute-{_slug(data.title)} class=compute><thead><tr>"
                     + "".join(f"<th{' style=text-align:left' if i < 2 else ''}>{html.escape(c)}</th>" for i, c in enumerate(header))
                     + f"</tr></thead><tbody>{body}</tbody></table>")
    for control in data.controls:
        parts.append("<section class=control>" + _html_section(control, render_plots(control), level + 1) + "</section>")
    return "\n".join(parts)


def render_plots(data: ReportData) -> dict[str, bytes]:
    plots = {"tax_curve": plot_tax_curve(data), "tradeoff": plot_tradeoff(data), "loss_ratio": plot_loss_ratio(data)}
    return {k: v for k, v in plots.items() if v}


def write_report(data: ReportData, out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md (+ PNGs beside it) and a self-contained report.html into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = render_plots(data)
    names = {}
    for name, png in images.items():
        path = out_dir / f"{name}.png"
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
        names[name] = path.name
    md = atomic_write_text(out_dir / "report.md", _markdown(data, names))
    page = f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(data.title)}</title><style>{CSS}</style></head><body>{_html_section(data, images)}</body></html>"
    page_path = atomic_write_text(out_dir / "report.html", page)
    return md, page_path


# ---------------------------------------------------------------- from a run directory

MODEL_ORDER = ["base", "vanilla", "vanilla (best checkpoint)", "short", "soup", "l2", "ewc", "replay", "curation", "sub-models (mean)", "ensemble", "DTM"]


# task type -> its headline metrics as (metric, column suffix); the first is the main one. A
# generation task also shows format compliance, which can be high while exact match is low.
HEADLINE_METRICS: dict[str, list[tuple[str, str]]] = {
    "multiple_choice": [("acc", "")],
    "generate": [("exact_match", ""), ("pattern_match", " (format)")],
}


def headline_metrics(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, suffix) of the headline metrics this result has; none without its main metric."""
    wanted = HEADLINE_METRICS.get(result["type"], [])
    if not wanted or result["metrics"].get(wanted[0][0]) is None:
        return []
    return [(m, suffix) for m, suffix in wanted if result["metrics"].get(m) is not None]


def task_columns(result: dict[str, Any]) -> dict[str, float]:
    """Headline numbers of one task result: its main metric (and format compliance for
    generation), overall and per group (`task/group`)."""
    task = result["task"]
    cols: dict[str, float] = {}
    for metric, suffix in headline_metrics(result):
        cols[task + suffix] = result["metrics"][metric]
        for group, m in result.get("groups", {}).items():
            if m.get(metric) is not None:
                cols[f"{task}/{group}{suffix}"] = m[metric]
    return cols


def grouped_generation_tasks(results: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[str]]:
    """(task, metric, suffix) -> groups, for generation tasks whose results are split into groups
    (the lab's instruction following by instruction type), in first-seen order over `results`."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for result in results:
        if result["type"] != "generate" or not result.get("groups"):
            continue
        for metric, suffix in headline_metrics(result):
            groups = found.setdefault((result["task"], metric, suffix), [])
            groups += [g for g, m in result["groups"].items() if m.get(metric) is not None and g not in groups]
    return found


def group_table_models(models: list[str]) -> list[str]:
    """Rows of a per-group table: every model but vanilla's checkpoints, each sub-model (sub-1..sub-K,
    in numeric order) right after their mean: the table asks whether each of them learned every group."""
    subs = sub_models(models)
    rows: list[str] = []
    for m in models:
        if _is_sub_model(m) or m.startswith("vanilla@") or m == "vanilla (best checkpoint)":
            continue
        rows.append(m)
        if m == "sub-models (mean)":
            rows += subs
    return rows + [m for m in subs if m not in rows]


def _is_sub_model(name: str) -> bool:
    return name.startswith("sub-") and name.removeprefix("sub-").isdigit()


def sub_models(names: Iterable[str]) -> list[str]:
    """The sub-model names among `names`, in numeric order (sub-2 before sub-10)."""
    return sorted((n for n in names if _is_sub_model(n)), key=lambda n: int(n.removeprefix("sub-")))


def training_cost(complete: dict[str, Any]) -> dict[str, float]:
    """What one trained model cost, from its training_complete.json: optimizer steps, examples
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
    """method -> (what it sums, its cost), by the pipeline's model names: DTM = sub-1..sub-K + its merge,
    soup = short + soup-2.. + its merge, WiSE-FT = its merge only (vanilla is reused, not retrained), an
    ensemble = its sub-models (no merge); every other trained or merged model is its own cost."""
    subs = sub_models(trained)
    ingredients = [n for n in trained if n == "short"] + sorted((n for n in trained if n.startswith("soup-")),
                                                                key=lambda n: int(n.removeprefix("soup-")))
    zero = {k: 0.0 for cost in trained.values() for k in cost} or {"steps": 0.0, "examples": 0.0, "seconds": 0.0}
    out: dict[str, tuple[str, dict[str, float]]] = {}
    for name, cost in trained.items():
        if not _is_sub_model(name) and not name.startswith("soup-"):
            out[name] = (name, dict(cost))
    for name, sec in merge_seconds.items():
        parts = {"DTM": subs, "soup": ingredients}.get(name, [])
        merged = {**zero, "seconds": sec}
        if parts:
            out[name] = (", ".join(parts) + " + merge", _sum_costs([trained[p] for p in parts] + [merged]))
        elif name.startswith("wise_ft"):
            out[name] = ("merge only (reuses vanilla)", merged)
        else:
            out[name] = ("merge", merged)
    for name in ensembles:
        if subs:
            out[name] = (", ".join(subs) + " (no merge)", _sum_costs([trained[p] for p in subs]))
    return out


def _group_of(model: str) -> str:
    if model == "base":
        return "base"
    if model == "vanilla":
        return "vanilla"
    if model.startswith("vanilla@"):
        return "vanilla checkpoints"
    if model.startswith("wise_ft"):
        return "wise-ft"
    if model.startswith("sub-"):
        return "sub-model"
    return {"DTM": "dtm", "soup": "soup"}.get(model, "baseline")


def load_results(eval_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> task -> result, from one seed run's eval/<model>.json files."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(eval_dir.glob("*.json"))}


def scores_of(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """model -> column -> value, from `load_results`' model -> task -> result."""
    scores: dict[str, dict[str, float]] = {}
    for model, by_task in results.items():
        cols: dict[str, float] = {}
        for result in by_task.values():
            cols |= task_columns(result)
        scores[model] = cols
    return scores


def collect_scores(eval_dir: Path) -> dict[str, dict[str, float]]:
    """model -> column -> value from one seed run's eval/<model>.json files."""
    return scores_of(load_results(eval_dir))


def manifest_outputs(root: Path, stage: str) -> dict[str, Any]:
    """The `outputs` a finished stage recorded in its manifest ({} if it has none yet)."""
    from dtm.rundir import read_manifest

    return (read_manifest(root, stage) or {}).get("outputs", {})


def run_costs(root: Path, evaluated: list[str]) -> dict[str, tuple[str, dict[str, float]]]:
    """`method_costs` of one seed run: training from each model's training_complete.json (the train
    manifest's seconds where that file is missing), merge seconds from the merge manifest."""
    train_m, merge_m = manifest_outputs(root, "train"), manifest_outputs(root, "merge")
    trained: dict[str, dict[str, float]] = {}
    for name in train_m.get("models", train_m.get("seconds", {})):
        complete = root / "models" / name / "training_complete.json"
        if complete.is_file():
            trained[name] = training_cost(json.loads(complete.read_text()))
        elif name in train_m.get("seconds", {}):
            trained[name] = {"seconds": float(train_m["seconds"][name])}
    merge_seconds = {n: float(merge_m.get("seconds", {}).get(n, 0.0)) for n in merge_m.get("models", merge_m.get("seconds", {}))}
    return method_costs(trained, merge_seconds, tuple(m for m in evaluated if m == "ensemble"))


def _best_checkpoint(scores: dict[str, dict[str, float]], column: str) -> dict[str, float] | None:
    candidates = [s for m, s in scores.items() if (m.startswith("vanilla@") or m == "vanilla") and column in s]
    return max(candidates, key=lambda s: s[column]) if candidates else None


def build_report_data(runs: list[tuple[Any, Path]], title: str, tradeoff: list[str] | None = None) -> ReportData:
    """Assemble ReportData from seed run directories [(config, root)] of one experiment."""
    results = [load_results(root / "eval") for _, root in runs]
    per_seed = [(cfg, root, scores_of(res)) for (cfg, root), res in zip(runs, results)]
    grouped = grouped_generation_tasks([r for res in results for by_task in res.values() for r in by_task.values()])
    group_cols = {f"{task}/{g}{suffix}" for (task, _, suffix), groups in grouped.items() for g in groups}
    columns: list[str] = []
    for _, _, scores in per_seed:
        for s in scores.values():
            columns += [c for c in s if c not in columns]
    k_col, i_col = (tradeoff or [None, None])[:2]
    if k_col is None:
        k_col = next((c for c in columns if "knowledge" in c and "instruct" in c and "/" not in c), next((c for c in columns if "/" not in c), None))
    if i_col is None:
        i_col = next((c for c in columns if "instruction" in c and "/" not in c and "(format)" not in c), None)
    merged: dict[str, dict[str, list[float]]] = {}
    curve: dict[str, dict[float, list[float]]] = {}
    compute: dict[str, dict[str, list[float]]] = {}
    compute_parts: dict[str, str] = {}
    losses: dict[float, list[tuple[float, float]]] = {}
    for cfg, root, scores in per_seed:
        fractions_file = root / "models" / "vanilla" / "fractions" / "fractions.json"
        if fractions_file.is_file():
            for row in json.loads(fractions_file.read_text()):
                if row.get("val_loss") is not None:
                    losses.setdefault(float(row["fraction"]), []).append((row["train_loss"], row["val_loss"]))
        k = cfg.disperse.k
        subs = [scores[f"sub-{i + 1}"] for i in range(k) if f"sub-{i + 1}" in scores]
        if subs:
            scores["sub-models (mean)"] = {c: sum(s[c] for s in subs) / len(subs) for c in subs[0] if all(c in s for s in subs)}
        if k_col:
            best = _best_checkpoint(scores, k_col)
            if best:
                scores["vanilla (best checkpoint)"] = best
        for model, cols in scores.items():
            for c, v in cols.items():
                merged.setdefault(model, {}).setdefault(c, []).append(v)
            if model.startswith("vanilla@") or model in ("vanilla", "base"):
                frac = 0.0 if model == "base" else 1.0 if model == "vanilla" else float(model.split("@")[1])
                for c, v in cols.items():
                    if "/" not in c and "(format)" not in c:
                        curve.setdefault(c, {}).setdefault(frac, []).append(v)
        for method, (what, cost) in run_costs(root, list(scores)).items():
            compute_parts[method] = what
            for key, value in cost.items():
                compute.setdefault(method, {}).setdefault(key, []).append(value)

    ordered = [m for m in MODEL_ORDER if m in merged] + sorted(m for m in merged if m not in MODEL_ORDER)
    shown = {m: merged[m] for m in ordered}
    cfg0, root0, _ = per_seed[0]
    seeds = [cfg.seed for cfg, _, _ in per_seed]
    notes = [
        f"seeds: {seeds} " + ("(every number is the mean ± sample std over these)" if len(seeds) > 1 else "(one seed: no spread to show)"),
        f"K = {cfg0.disperse.k} portions, dispersal: {cfg0.disperse.strategy}; merge: {cfg0.merge.method}",
        f"training: {cfg0.train.finetuning_type} fine-tuning, lr {cfg0.train.learning_rate}, "
        + (f"{cfg0.train.max_steps} steps, " if cfg0.train.max_steps > 0 else f"{cfg0.train.num_train_epochs:g} epochs, ")
        + f"batch {cfg0.train.per_device_train_batch_size}x{cfg0.train.gradient_accumulation_steps}",
    ]
    data_m = manifest_outputs(root0, "data")
    if data_m.get("lab"):
        lab = data_m["lab"]
        notes.append(f"lab data: {lab['examples']} SFT examples; per source {lab['examples_per_source']}; per task {lab['examples_per_task']}")
        notes.append(f"lab base model knowledge: {lab['base_fact_accuracy']}")
    disperse_m = manifest_outputs(root0, "disperse")
    notes.append("vanilla (best checkpoint) is picked on the test benchmark itself: an optimistic bound for vanilla")
    table = [m for m in shown if not m.startswith(("vanilla@", "sub-")) or m == "sub-models (mean)"]
    # At a glance: every task's main metric, and the splits of the knowledge column only.
    headline = [c for c in columns if "/" not in c or (k_col is not None and c.startswith(k_col + "/"))]
    detail = [c for c in columns if c not in group_cols]  # grouped generation tasks get their own tables
    rows = group_table_models(ordered)
    group_tables = [GroupTable(task, metric, suffix, groups, [f"{task}/{g}{suffix}" for g in groups], rows)
                    for (task, metric, suffix), groups in grouped.items()]
    order = [m for m in ordered if m in compute] + [m for m in compute if m not in ordered]
    return ReportData(
        title=title, scores=shown, columns=headline, detail_columns=detail if headline != detail else [],
        group_tables=group_tables, compute_parts=compute_parts,
        notes=notes, tax_curve=curve, table=table, losses=losses,
        tradeoff_axes=(k_col, i_col) if k_col and i_col else None, groups={m: _group_of(m) for m in shown},
        portions=disperse_m.get("stats", []),
        compute={m: {k: mean_std(v)[0] for k, v in compute[m].items()} for m in order},
    )


def write_run_report(cfg: Any, console: Any = None) -> tuple[Path, Path]:
    """The report of a whole `dtm run` (all seeds; the no-bias control as a section)."""
    from dtm.pipeline import seed_runs

    runs = [(r.cfg, r.dir.root, r.dir.control) for r in seed_runs(cfg)]
    main = [(c, r) for c, r, control in runs if not control]
    controls = [(c, r) for c, r, control in runs if control]
    data = build_report_data(main, "Disperse-Then-Merge: results", cfg.report.tradeoff)
    if controls:
        data.controls.append(build_report_data(controls, "No-bias control (the same lab with every bias off)", cfg.report.tradeoff))
    out = write_report(data, cfg.output_dir)
    if console is not None:
        console.print(headline_markdown(data))
        summary = tradeoff_summary(data)
        if summary:
            console.print(summary)
    return out
