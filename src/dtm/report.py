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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtm.io import atomic_write_text

# ---------------------------------------------------------------- data


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
    compute: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> {seconds, steps, tokens}
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


def headline_markdown(data: ReportData, columns: list[str] | None = None) -> str:
    columns = columns or data.columns
    rows = data.table_scores()
    best = best_per_column(rows, columns)
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for model, s in rows.items():
        cells = []
        for col in columns:
            cell = fmt(s.get(col, []))
            cells.append(f"**{cell}**" if best.get(col) == model else cell)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_html(data: ReportData, table_id: str = "headline", columns: list[str] | None = None) -> str:
    columns = columns or data.columns
    table = data.table_scores()
    best = best_per_column(table, columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for model, s in table.items():
        cells = "".join(
            f"<td class=\"{'best' if best.get(c) == model else ''}\">{html.escape(fmt(s.get(c, [])))}</td>" for c in columns
        )
        rows.append(f"<tr><th scope=row>{html.escape(model)}</th>{cells}</tr>")
    return f"<table id={table_id} class=headline><thead><tr><th>model</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


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


def _compute_markdown(compute: dict[str, dict[str, float]]) -> str:
    if not compute:
        return ""
    keys = sorted({k for v in compute.values() for k in v})
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for model, v in compute.items():
        lines.append(f"| {model} | " + " | ".join(f"{v[k]:.1f}" if k in v else "–" for k in keys) + " |")
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
    if data.portions:
        parts += [f"{h}# Portions", "", _portions_markdown(data.portions), ""]
    if data.compute:
        parts += [f"{h}# Wall time and compute per method", "", _compute_markdown(data.compute), ""]
    for control in data.controls:
        parts += [_markdown(control, {}, level + 1), ""]
    return "\n".join(parts)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th[scope=row],thead th:first-child{text-align:left}td.best{font-weight:bold;background:#e6f4ea}
img{max-width:100%;border:1px solid #eee}.note{color:#555}
"""


def _html_section(data: ReportData, images: dict[str, bytes], level: int = 1) -> str:
    h1, h2 = f"h{level}", f"h{level + 1}"
    parts = [f"<{h1}>{html.escape(data.title)}</{h1}>", "<ul class=note>" + "".join(f"<li>{html.escape(n)}</li>" for n in data.notes) + "</ul>"]
    parts += [f"<{h2}>Headline</{h2}>", "<p class=note>Mean ± sample standard deviation over seeds; the best value per column is highlighted.</p>", headline_html(data, "headline" if level == 1 else "headline-" + "".join(ch if ch.isalnum() else "-" for ch in data.title.lower()))]
    summary = tradeoff_summary(data)
    if summary:
        parts.append(f"<p id=frontier>{html.escape(summary)}</p>")
    for name, caption in (("tax_curve", "Alignment-tax curve"), ("tradeoff", "Knowledge vs instruction following"), ("loss_ratio", "Train/validation loss and the loss-reduction ratio")):
        if images.get(name):
            b64 = base64.b64encode(images[name]).decode()
            parts.append(f"<{h2}>{caption}</{h2}><img class=plot id={name} alt='{caption}' src='data:image/png;base64,{b64}'>")
    if data.detail_columns:
        parts.append(f"<{h2}>All metrics (every task and split)</{h2}>"
                     + headline_html(data, "detail-" + "".join(ch if ch.isalnum() else "-" for ch in data.title.lower()), data.detail_columns))
    if data.portions:
        keys = [k for k in data.portions[0] if k != "sources"]
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(p[k]))}</td>" for k in keys)
            + f"<td style='text-align:left'>{html.escape(', '.join(f'{a}: {b}' for a, b in p.get('sources', {}).items()))}</td></tr>"
            for p in data.portions
        )
        parts.append(f"<{h2}>Portions</{h2}><table id=portions><tr>" + "".join(f"<th>{k}</th>" for k in keys) + f"<th>sources</th></tr>{rows}</table>")
    if data.compute:
        keys = sorted({k for v in data.compute.values() for k in v})
        rows = "".join(
            f"<tr><th scope=row>{html.escape(m)}</th>" + "".join(f"<td>{v[k]:.1f}</td>" if k in v else "<td>–</td>" for k in keys) + "</tr>"
            for m, v in data.compute.items()
        )
        parts.append(f"<{h2}>Wall time and compute per method</{h2}><table id=compute><tr><th>model</th>" + "".join(f"<th>{k}</th>" for k in keys) + f"</tr>{rows}</table>")
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


def task_columns(result: dict[str, Any]) -> dict[str, float]:
    """Headline numbers of one task result: its main metric, per group for multiple choice,
    and format compliance for generation."""
    task, kind, metrics = result["task"], result["type"], result["metrics"]
    main = {"multiple_choice": "acc", "generate": "exact_match"}.get(kind)
    if main is None or metrics.get(main) is None:
        return {}
    cols = {task: metrics[main]}
    if kind == "multiple_choice":
        for group, m in result.get("groups", {}).items():
            if m.get(main) is not None:
                cols[f"{task}/{group}"] = m[main]
    elif metrics.get("pattern_match") is not None:
        cols[f"{task} (format)"] = metrics["pattern_match"]
    return cols


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


def collect_scores(eval_dir: Path) -> dict[str, dict[str, float]]:
    """model -> column -> value from one seed run's eval/<model>.json files."""
    scores: dict[str, dict[str, float]] = {}
    for path in sorted(eval_dir.glob("*.json")):
        results = json.loads(path.read_text())
        cols: dict[str, float] = {}
        for result in results.values():
            cols |= task_columns(result)
        scores[path.stem] = cols
    return scores


def _best_checkpoint(scores: dict[str, dict[str, float]], column: str) -> dict[str, float] | None:
    candidates = [s for m, s in scores.items() if (m.startswith("vanilla@") or m == "vanilla") and column in s]
    return max(candidates, key=lambda s: s[column]) if candidates else None


def build_report_data(runs: list[tuple[Any, Path]], title: str, tradeoff: list[str] | None = None) -> ReportData:
    """Assemble ReportData from seed run directories [(config, root)] of one experiment."""
    per_seed = [(cfg, root, collect_scores(root / "eval")) for cfg, root in runs]
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
        train_m = json.loads((root / "manifests" / "train.json").read_text()) if (root / "manifests" / "train.json").is_file() else {}
        merge_m = json.loads((root / "manifests" / "merge.json").read_text()) if (root / "manifests" / "merge.json").is_file() else {}
        seconds = dict(train_m.get("outputs", {}).get("seconds", {}))
        for name, sec in merge_m.get("outputs", {}).get("seconds", {}).items():
            seconds[name] = seconds.get(name, 0.0) + sec
        if any(n.startswith("sub-") for n in seconds):
            seconds["DTM"] = sum(v for n, v in seconds.items() if n.startswith("sub-")) + seconds.get("DTM", 0.0)
        if "soup" in seconds or "short" in seconds:
            seconds["soup"] = seconds.get("soup", 0.0) + sum(v for n, v in seconds.items() if n == "short" or n.startswith("soup-"))
        for name, sec in seconds.items():
            if not name.startswith(("sub-", "soup-")):
                compute.setdefault(name, {}).setdefault("train+merge seconds", []).append(sec)

    ordered = [m for m in MODEL_ORDER if m in merged] + sorted(m for m in merged if m not in MODEL_ORDER)
    shown = {m: merged[m] for m in ordered}
    cfg0, root0, _ = per_seed[0]
    seeds = [cfg.seed for cfg, _, _ in per_seed]
    notes = [
        f"seeds: {seeds} (every number is the mean ± sample std over these)",
        f"K = {cfg0.disperse.k} portions, dispersal: {cfg0.disperse.strategy}; merge: {cfg0.merge.method}",
        f"training: {cfg0.train.finetuning_type} fine-tuning, lr {cfg0.train.learning_rate}, "
        + (f"{cfg0.train.max_steps} steps, " if cfg0.train.max_steps > 0 else f"{cfg0.train.num_train_epochs:g} epochs, ")
        + f"batch {cfg0.train.per_device_train_batch_size}x{cfg0.train.gradient_accumulation_steps}",
    ]
    data_m = json.loads((root0 / "manifests" / "data.json").read_text()).get("outputs", {}) if (root0 / "manifests" / "data.json").is_file() else {}
    if data_m.get("lab"):
        lab = data_m["lab"]
        notes.append(f"lab data: {lab['examples']} SFT examples; per source {lab['examples_per_source']}; per task {lab['examples_per_task']}")
        notes.append(f"lab base model knowledge: {lab['base_fact_accuracy']}")
    disperse_m = json.loads((root0 / "manifests" / "disperse.json").read_text()).get("outputs", {}) if (root0 / "manifests" / "disperse.json").is_file() else {}
    notes.append("vanilla (best checkpoint) is picked on the test benchmark itself: an optimistic bound for vanilla")
    table = [m for m in shown if not m.startswith(("vanilla@", "sub-")) or m == "sub-models (mean)"]
    # At a glance: every task's main metric, and the splits of the knowledge column only.
    headline = [c for c in columns if "/" not in c or (k_col is not None and c.startswith(k_col + "/"))]
    return ReportData(
        title=title, scores=shown, columns=headline, detail_columns=columns if headline != columns else [],
        notes=notes, tax_curve=curve, table=table, losses=losses,
        tradeoff_axes=(k_col, i_col) if k_col and i_col else None, groups={m: _group_of(m) for m in shown},
        portions=disperse_m.get("stats", []),
        compute={m: {k: mean_std(v)[0] for k, v in c.items()} for m, c in compute.items()},
    )


def write_run_report(cfg: Any, console: Any = None) -> tuple[Path, Path]:
    """The report of a whole `dtm run` (all seeds; the no-bias control as a section)."""
    from dtm.pipeline import seed_runs

    runs = seed_runs(cfg)
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
