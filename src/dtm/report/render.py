"""Render the report model as report.md (+ its PNGs) and a self-contained report.html.

Both files show the same `SECTIONS`, in the same order, with the same titles and notes; the
templates (`templates/report.md.j2`, `templates/report.html.j2`) only decide how each *kind* of
block looks. Adding a section is one entry in `SECTIONS` (plus template markup for a new kind).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from dtm.io import atomic_write_bytes, atomic_write_text
from dtm.report.model import ErrorSets, GroupTable, ReportData
from dtm.report.plots import render_plots
from dtm.report.stats import (
    ERROR_CATEGORIES,
    best_per_column,
    column_stderr,
    early_late,
    error_set_summary,
    fmt,
    redone_text,
    token_rank_summary,
    tradeoff_summary,
)
from dtm.rundir import RunDir

# ---------------------------------------------------------------- what the templates show


@dataclass
class Cell:
    text: str
    best: bool = False  # the column's best mean: bold (markdown), class `best` (HTML)


@dataclass
class Table:
    """A table as text cells. `row_header`: the first cell of a row names it (a model); `left`: the
    columns aligned left (text among numbers) in the HTML."""

    header: list[str]
    rows: list[list[Cell]]
    row_header: bool = True
    left: frozenset[int] = frozenset()


@dataclass
class Plot:
    file: str  # the PNG's file name beside report.md
    png: bytes

    @property
    def uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


@dataclass
class Block:
    """One shown section: heading, note, then its body (a Table, a Plot or a nested Page), then `after`."""

    kind: str  # scores (a Table with best cells), table, plot, report (a nested Page)
    section: str  # the id of its `Section`
    id: str  # the HTML id of its table or image (unique in the page)
    title: str
    note: str
    body: Any
    after: str | None = None  # a paragraph under the body
    after_id: str | None = None  # its HTML id


@dataclass
class Page:
    """A report (or a nested one, such as the no-bias control) as the templates walk it."""

    title: str
    notes: list[str]
    level: int  # heading level of the title; its sections are one deeper
    blocks: list[Block] = field(default_factory=list)
    warning: str = ""  # shown above the title


# ---------------------------------------------------------------- tables


def scores_table(rows: dict[str, dict[str, list[float]]], columns: list[str], headers: list[str] | None = None,
                 stderr: dict[str, dict[str, list[float]]] | None = None) -> Table:
    """A model x column table of mean ± std (and the standard error where given), the best
    mean per column marked only where it leads by more than its standard error."""
    best = best_per_column(rows, columns, stderr)
    se = (lambda m, c: column_stderr(stderr, m, c)) if stderr else (lambda m, c: None)
    return Table(["model", *(headers or columns)],
                 [[Cell(model), *(Cell(fmt(s.get(c, []), se=se(model, c)), best.get(c) == model) for c in columns)]
                  for model, s in rows.items()])


def group_table_title(table: GroupTable) -> str:
    """Named as its headline column, so the per-group table reads as that column split up."""
    return f"{table.task}{table.suffix} per group: {table.metric}"


HEADLINE_NOTE = ("One column per task (per-group columns, but for a few splits of the knowledge column, are in the detail table). (se x): the evaluation's standard "
                 "error (sample std of the per-item scores / sqrt(items), mean over seeds). Bold only where the best leads "
                 "the runner-up by more than the standard error of that difference; a tie is not a best.")
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


def compute_table(data: ReportData) -> Table:
    """model, what it sums, then one cell per compute column that any method has."""
    keys = [k for k in COMPUTE_COLUMNS if any(k in v for v in data.compute.values())]
    keys += sorted({k for v in data.compute.values() for k in v} - set(keys))
    header = ["model", "sums", *(COMPUTE_COLUMNS.get(k, (k, 1))[0] for k in keys)]
    rows = []
    for model, v in data.compute.items():
        cells = [f"{v[k]:.{COMPUTE_COLUMNS.get(k, (k, 1))[1]}f}" if k in v else "–" for k in keys]
        rows.append([Cell(c) for c in (model, data.compute_parts.get(model, model), *cells)])
    return Table(header, rows, left=frozenset({0, 1}))


def redone_summary(redone: dict[str, dict[str, int]]) -> str | None:
    """One line per stage that trained steps twice after an interrupted attempt (none: nothing shown).
    They are compute the run spent beyond the table's, and a sign of lost nodes or kills worth knowing."""
    if not redone:
        return None
    return "  \n".join(f"Redone after interrupted attempts (lost nodes, killed runs), {stage}: {redone_text(models)}."
                        for stage, models in redone.items())


def portions_table(portions: list[dict[str, Any]]) -> Table:
    """One row per portion: its dispersal stats, then its examples per source."""
    keys = [k for k in portions[0] if k != "sources"]
    rows = [[*(Cell(str(p[k])) for k in keys), Cell(", ".join(f"{a}: {b}" for a, b in p.get("sources", {}).items()))]
            for p in portions]
    return Table([*keys, "sources"], rows, row_header=False, left=frozenset({len(keys)}))


TOKEN_NOTE = (
    "Vanilla SFT's loss on a fixed sample of its training data, per response token, at each snapshot; for the interval "
    "ending nearest 10% of training (early) and nearest 90% (late), the tokens whose loss fell most since the previous "
    "snapshot (mean drop per occurrence, among tokens that occur at least `eval.token_loss_min_count` times in the "
    "sample), with their frequency rank among the response tokens of the whole training split (1 = most frequent). "
    "The tokens are the first seed's.")
ERROR_NOTE = (
    "Per task, the questions by how many of the K sub-models get them wrong (the task's main metric; mean over seeds), "
    "and how many of those the merged model (DTM) gets right: it fixes them; in the last column, the questions every "
    "sub-model gets right that DTM gets wrong.")


def token_text(text: str) -> str:
    """A token as a table cell: quoted with escapes (spaces and newlines show), no table-breaking '|'."""
    import json

    return json.dumps(text, ensure_ascii=False).replace("|", "¦")


def token_table(runs: list[dict[str, Any]]) -> Table | None:
    """The first seed's top tokens, early beside late: token, mean loss drop, frequency rank."""
    intervals = runs[0]["intervals"]
    picked = early_late([iv["to"] for iv in intervals])
    if picked is None:
        return None
    header = ["#"]
    columns = []
    for label, i in zip(("early", "late"), picked):
        iv = intervals[i]
        header += [f"{label} ({iv['from']:g} → {iv['to']:g}): token", "loss drop", "frequency rank"]
        columns.append(iv["top"])
    rows = []
    for r in range(max(len(c) for c in columns)):
        row = [Cell(str(r + 1))]
        for top in columns:
            row += ([Cell(token_text(top[r]["token"])), Cell(f"{top[r]['mean_drop']:.3f}"), Cell(str(top[r]["rank"]))]
                    if r < len(top) else [Cell("–")] * 3)
        rows.append(row)
    return Table(header, rows, row_header=False, left=frozenset({1, 4}))


def token_summary(runs: list[dict[str, Any]]) -> str | None:
    """`token_rank_summary` over the seeds: each seed's early and late median rank of its top tokens."""
    early, late = [], []
    for run in runs:
        intervals = run["intervals"]
        picked = early_late([iv["to"] for iv in intervals])
        if picked is None or picked[0] == picked[1] or None in (intervals[picked[0]]["median_rank_top"], intervals[picked[1]]["median_rank_top"]):
            return None
        early.append(intervals[picked[0]]["median_rank_top"])
        late.append(intervals[picked[1]]["median_rank_top"])
    distinct = runs[0]["distinct_train_tokens"]
    return token_rank_summary(early, late, runs[0]["top"]) + f" ({distinct} distinct response tokens in the training data.)"


def error_table(tables: list[ErrorSets]) -> Table:
    """One row per task: questions, then per category its questions and how many DTM fixes."""
    k = tables[0].k
    header = ["task", "metric", "questions", f"wrong by all {k}", "DTM fixes", "by some", "DTM fixes", "by one", "DTM fixes",
              "by none", "DTM gets wrong"]
    rows = []
    for t in tables:
        total = sum(t.mean(c, "questions") for c in ERROR_CATEGORIES)
        cells = [t.task, t.metric, f"{total:.0f}"]
        for c in ERROR_CATEGORIES:
            n, wrong = t.mean(c, "questions"), t.mean(c, "merged_wrong")
            cells += [f"{n:.1f}", f"{wrong:.1f}" if c == "none" else f"{n - wrong:.1f}"]
        rows.append([Cell(c) for c in cells])
    return Table(header, rows, left=frozenset({0, 1}))


def _error_summary(tables: list[ErrorSets]) -> str | None:
    seeds = min(len(t.per_seed) for t in tables)
    return error_set_summary([{t.task: t.per_seed[s] for t in tables} for s in range(seeds)])


# ---------------------------------------------------------------- the sections


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower())


@dataclass(frozen=True)
class Item:
    """One block of a section: its body, its HTML id, and what fills the section's title."""

    body: Any
    id: str
    title: dict[str, str] = field(default_factory=dict)
    after: str | None = None


@dataclass(frozen=True)
class Section:
    id: str  # names the section; the stem of its blocks' HTML ids
    title: str  # heading, markdown and HTML alike; `{...}` fields are filled per item
    kind: str  # which template block shows an item: scores, table, plot, report
    items: Callable[[ReportData, dict[str, Plot], int], list[Item]]  # what it shows: none, no section
    note: str = ""  # paragraph under the heading
    after_id: str | None = None  # HTML id of the paragraph under the body (`_own_id`)


def _own_id(stem: str, data: ReportData, level: int) -> str:
    """The top report's `headline`; a nested report's `headline-<its title>`."""
    return stem if level == 1 else f"{stem}-{_slug(data.title)}"


def _plot(name: str) -> Callable[[ReportData, dict[str, Plot], int], list[Item]]:
    return lambda data, plots, level: [Item(plots[name], name)] if name in plots else []


SECTIONS: tuple[Section, ...] = (
    Section("headline", "Headline (mean ± sample std over seeds; best per column in bold)", "scores",
            lambda d, p, lv: [Item(scores_table(d.table_scores(), d.columns, stderr=d.stderr), _own_id("headline", d, lv),
                                   after=tradeoff_summary(d))],
            after_id="frontier", note=HEADLINE_NOTE),
    Section("tax_curve", "Alignment-tax curve", "plot", _plot("tax_curve")),
    Section("tradeoff", "Trade-off", "plot", _plot("tradeoff")),
    Section("loss_ratio", "Train/validation loss and the loss-reduction ratio", "plot", _plot("loss_ratio")),
    Section("token_losses", "Which tokens' training loss fell most (vanilla SFT, early vs late)", "table",
            lambda d, p, lv: [Item(t, _own_id("token-losses", d, lv), after=token_summary(d.token_losses))
                              for t in [token_table(d.token_losses)] if t] if d.token_losses else [],
            note=TOKEN_NOTE),
    Section("token_losses_plot", "Loss drop against token frequency", "plot", _plot("token_losses")),
    Section("detail", "All metrics (every task and split)", "scores",
            lambda d, p, lv: [Item(scores_table(d.table_scores(), d.detail_columns, stderr=d.stderr), "detail-" + _slug(d.title))]
            if d.detail_columns else []),
    Section("groups", "{title}", "scores",
            lambda d, p, lv: [Item(scores_table({m: d.scores[m] for m in t.rows if m in d.scores}, t.columns, t.groups),
                                   "groups-" + _slug(f"{d.title} {t.task} {t.metric}"), {"title": group_table_title(t)})
                              for t in d.group_tables],
            note=GROUP_NOTE),
    Section("error_sets", "Error sets: the questions the sub-models get wrong, and the merge", "table",
            lambda d, p, lv: [Item(error_table(d.error_sets), _own_id("error-sets", d, lv), after=_error_summary(d.error_sets))]
            if d.error_sets else [], note=ERROR_NOTE),
    Section("error_sets_plot", "Error sets per task", "plot", _plot("error_sets")),
    Section("portions", "Portions", "table",
            lambda d, p, lv: [Item(portions_table(d.portions), _own_id("portions", d, lv))] if d.portions else []),
    Section("compute", "Wall time and compute per method", "table",
            lambda d, p, lv: [Item(compute_table(d), "compute-" + _slug(d.title), after=redone_summary(d.redone))] if d.compute else [],
            note=COMPUTE_NOTE),
    # A nested report (the no-bias control) shows its tables; the plot files beside report.md are the main report's.
    Section("control", "{title}", "report",
            lambda d, p, lv: [Item(page(c, {}, lv + 1), "control-" + _slug(c.title), {"title": c.title}) for c in d.controls]),
)


def page(data: ReportData, plots: dict[str, Plot], level: int = 1) -> Page:
    """`data` as the templates walk it: every section of `SECTIONS` that has something to show."""
    out = Page(data.title, data.notes, level, warning=data.warning)
    for section in SECTIONS:
        for item in section.items(data, plots, level):
            after_id = _own_id(section.after_id, data, level) if section.after_id else None
            out.blocks.append(Block(section.kind, section.id, item.id, section.title.format(**item.title), section.note,
                                    item.body, item.after, after_id))
    return out


# ---------------------------------------------------------------- templates


@cache
def _env(html: bool) -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("dtm.report", "templates"), autoescape=html,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def markdown(report: Page) -> str:
    return _env(False).get_template("report.md.j2").render(page=report)


def html(report: Page) -> str:
    return _env(True).get_template("report.html.j2").render(page=report)


def headline_markdown(data: ReportData, columns: list[str] | None = None) -> str:
    """The headline table in markdown (as the report shows it; the pipeline prints it)."""
    table = scores_table(data.table_scores(), columns or data.columns, stderr=data.stderr)
    return _env(False).get_template("report.md.j2").module.table(table).rstrip("\n")


def render_report(data: ReportData, out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md (+ its PNGs beside it) and a self-contained report.html into `out_dir`."""
    out = RunDir(Path(out_dir))
    out.root.mkdir(parents=True, exist_ok=True)
    plots = {}
    for name, png in render_plots(data).items():
        path = atomic_write_bytes(out.report_plot(name), png)
        plots[name] = Plot(path.name, png)
    report = page(data, plots)
    return atomic_write_text(out.report_md, markdown(report)), atomic_write_text(out.report_html, html(report))
