"""The report model: what a run's report shows, as plain data (`collect_run` fills it, `render_report` shows it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
class ErrorSets:
    """One task's error sets (`stats.error_sets`, one per seed): the questions by how many of the K
    sub-models get them wrong, and how many of those the merged model gets wrong too."""

    task: str
    metric: str  # the per-question score counted as right (1) or wrong (0): the task's main metric
    k: int
    per_seed: list[dict[str, dict[str, int]]]

    def mean(self, category: str, key: str) -> float:
        """A category's "questions" or "merged_wrong", mean over seeds."""
        return sum(s[category][key] for s in self.per_seed) / max(len(self.per_seed), 1)


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
    # "seed 1, train" -> model -> training steps redone after interrupted attempts (lost nodes, killed runs); only stages with any
    redone: dict[str, dict[str, int]] = field(default_factory=dict)
    group_tables: list[GroupTable] = field(default_factory=list)  # a generation task's metric per group
    controls: list[ReportData] = field(default_factory=list)  # e.g. the no-bias lab
    table: list[str] | None = None  # models in the headline table (None = all); the rest only in plots
    detail_columns: list[str] = field(default_factory=list)  # a second, full table (every metric and split)
    warning: str = ""  # shown at the very top (a partial report says what it lacks)
    error_sets: list[ErrorSets] = field(default_factory=list)  # per task, when results have per-question scores
    # the token-level diagnostic per seed (`diagnostics.token_loss_diagnostic` plus "seed")
    token_losses: list[dict[str, Any]] = field(default_factory=list)
    # model -> column -> the evaluation's standard error per seed (where the results have one)
    stderr: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def table_scores(self) -> dict[str, dict[str, list[float]]]:
        return {m: self.scores[m] for m in (self.table if self.table is not None else self.scores) if m in self.scores}


# The groups whose models trace the knowledge/instruction frontier DTM is measured against.
REFERENCE_GROUPS = frozenset({"base", "vanilla", "vanilla checkpoints", "wise-ft"})
