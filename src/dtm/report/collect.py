"""Read a whole run into the report model: `collect_run(cfg) -> ReportData`.

Everything is read through `dtm.rundir` (seed runs, evaluation results, manifests, training
summaries, vanilla's loss along training); model names are rundir's. The rows the report adds
itself ("sub-models (mean)", "vanilla (best checkpoint)") are spelled here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dtm import rundir
from dtm.report.model import ErrorSets, GroupTable, ReportData
from dtm.report.stats import error_sets, mean_std, method_costs, training_cost

TITLE = "Disperse-Then-Merge: results"
CONTROL_TITLE = "No-bias control (the same lab with every bias off)"

SUB_MEAN = "sub-models (mean)"  # the sub-models' scores averaged, per seed
BEST_CHECKPOINT = "vanilla (best checkpoint)"  # vanilla's snapshot best on the knowledge column, per seed

MODEL_ORDER = [rundir.BASE, rundir.VANILLA, BEST_CHECKPOINT, rundir.SHORT, rundir.SOUP, *rundir.TRAINING_BASELINES,
               SUB_MEAN, rundir.ENSEMBLE, rundir.DTM]

# task type -> its headline metrics as (metric, column suffix); the first is the main one. A
# generation task also shows format compliance, which can be high while exact match is low.
HEADLINE_METRICS: dict[str, list[tuple[str, str]]] = {
    "multiple_choice": [("acc", "")],
    "generate": [("exact_match", ""), ("pattern_match", " (format)")],
}

Scores = dict[str, dict[str, float]]  # model -> column -> value, one seed


# ---------------------------------------------------------------- results -> columns


def headline_metrics(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, suffix) of the headline metrics this result has; none without its main metric.
    An lm-evaluation-harness result's main metric is the first its task lists."""
    wanted = HEADLINE_METRICS.get(result["type"], [])
    if result["type"] == "lm-eval":
        wanted = [(m, "") for m, v in result["metrics"].items() if not m.endswith("_stderr") and isinstance(v, (int, float))][:1]
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


def task_stderrs(result: dict[str, Any]) -> dict[str, float]:
    """The standard error of each number `task_columns` gives (where the result has one)."""
    task = result["task"]
    out: dict[str, float] = {}
    for metric, suffix in headline_metrics(result):
        for column, m in [(task + suffix, result["metrics"])] + [(f"{task}/{g}{suffix}", m) for g, m in result.get("groups", {}).items()]:
            se = m.get(f"{metric}_stderr")
            if isinstance(se, (int, float)) and not isinstance(se, bool):
                out[column] = float(se)
    return out


def benchmark_sizes(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, tuple[int, float | None]]:
    """task -> (items, the standard error of the first model's main metric): what a difference must exceed."""
    sizes: dict[str, tuple[int, float | None]] = {}
    for by_task in results.values():
        for task, result in by_task.items():
            items = result.get("counts", {}).get("items")
            if task not in sizes and isinstance(items, int):
                sizes[task] = (items, task_stderrs(result).get(task))
    return sizes


# A task's per-group columns stay in the headline only for the knowledge column, and only this
# few (the lab's held-out/contradicted splits); more (MMLU's subjects) go to the detail table.
MAX_HEADLINE_GROUPS = 3


def headline_columns(columns: list[str], k_col: str | None) -> list[str]:
    """One aggregate per task, plus the knowledge column's splits when there are few."""
    k_splits = [c for c in columns if k_col is not None and c.startswith(k_col + "/")]
    return [c for c in columns if "/" not in c or (c in k_splits and len(k_splits) <= MAX_HEADLINE_GROUPS)]


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


def scores_of(results: dict[str, dict[str, dict[str, Any]]]) -> Scores:
    """model -> column -> value, from a seed run's model -> task -> result (`SeedRun.eval_results`)."""
    scores: Scores = {}
    for model, by_task in results.items():
        cols: dict[str, float] = {}
        for result in by_task.values():
            cols |= task_columns(result)
        scores[model] = cols
    return scores


def group_table_models(models: list[str]) -> list[str]:
    """Rows of a per-group table: every model but vanilla's checkpoints, each sub-model (sub-1..sub-K,
    in numeric order) right after their mean: the table asks whether each of them learned every group."""
    subs = rundir.sub_models(models)
    rows: list[str] = []
    for m in models:
        if rundir.is_sub_model(m) or rundir.is_snapshot(m) or m == BEST_CHECKPOINT:
            continue
        rows.append(m)
        if m == SUB_MEAN:
            rows += subs
    return rows + [m for m in subs if m not in rows]


def group_of(model: str) -> str:
    """Where a model sits in the plots (marker) and in the trade-off (the reference groups)."""
    if model == rundir.BASE:
        return "base"
    if model == rundir.VANILLA:
        return "vanilla"
    if rundir.is_snapshot(model):
        return "vanilla checkpoints"
    if rundir.is_wise_ft(model):
        return "wise-ft"
    if rundir.is_sub_model(model) or model == SUB_MEAN:
        return "sub-model"
    return {rundir.DTM: "dtm", rundir.SOUP: "soup"}.get(model, "baseline")


# ---------------------------------------------------------------- one seed run


def run_costs(run: rundir.SeedRun, evaluated: list[str]) -> dict[str, tuple[str, dict[str, float]]]:
    """`method_costs` of one seed run: training from each model's training summary (the train
    manifest's seconds where it has none), merge seconds from the merge manifest."""
    train_m, merge_m = run.outputs("train"), run.outputs("merge")
    trained: dict[str, dict[str, float]] = {}
    for name in train_m.get("models", train_m.get("seconds", {})):
        summary = rundir.training_summary(run.model(name))
        if summary is not None:
            trained[name] = training_cost(summary)
        elif name in train_m.get("seconds", {}):
            trained[name] = {"seconds": float(train_m["seconds"][name])}
    merge_seconds = {n: float(merge_m.get("seconds", {}).get(n, 0.0)) for n in merge_m.get("models", merge_m.get("seconds", {}))}
    return method_costs(trained, merge_seconds, tuple(m for m in evaluated if m == rundir.ENSEMBLE))


def vanilla_losses(run: rundir.SeedRun) -> list[tuple[float, float, float]]:
    """(fraction, train loss, validation loss) along vanilla's training, where a validation loss was measured."""
    path = rundir.fractions_file(run.model(rundir.VANILLA))
    if not path.is_file():
        return []
    return [(float(row["fraction"]), row["train_loss"], row["val_loss"])
            for row in json.loads(path.read_text()) if row.get("val_loss") is not None]


def question_correct(result: dict[str, Any]) -> tuple[str, dict[Any, bool]] | None:
    """(main metric, question id -> right?) of a result with per-question scores (None: an older
    result file, an lm-eval result, or a task without a 0/1 main metric)."""
    metrics = headline_metrics(result)
    columns = result.get("per_item") or {}
    if not metrics or metrics[0][0] not in columns:
        return None
    metric = metrics[0][0]
    scores = dict(zip(columns["ids"], columns[metric], strict=True))
    if any(v not in (0, 1, None) for v in scores.values()):
        return None
    return metric, {q: v == 1 for q, v in scores.items() if v is not None}


def seed_error_sets(results: dict[str, dict[str, dict[str, Any]]], k: int) -> dict[str, tuple[str, dict[str, dict[str, int]]]]:
    """task -> (metric, `error_sets` of the K sub-models and DTM), for each task every one of them
    has per-question scores for, in one seed run's results."""
    names = [rundir.sub_model_name(i) for i in range(k)]
    if rundir.DTM not in results or any(n not in results for n in names):
        return {}
    out = {}
    for task, result in results[rundir.DTM].items():
        merged = question_correct(result)
        subs = [question_correct(results[n][task]) if task in results[n] else None for n in names]
        if merged is None or any(s is None or s[0] != merged[0] for s in subs):
            continue
        out[task] = (merged[0], error_sets([s[1] for s in subs if s], merged[1]))
    return out


def _best_checkpoint(scores: Scores, column: str) -> dict[str, float] | None:
    """Vanilla's best snapshot (the end included) on `column`; None without snapshots, where the
    row would only repeat vanilla's."""
    if not any(rundir.is_snapshot(m) for m in scores):
        return None
    candidates = [s for m, s in scores.items() if (rundir.is_snapshot(m) or m == rundir.VANILLA) and column in s]
    return max(candidates, key=lambda s: s[column]) if candidates else None


# ---------------------------------------------------------------- the whole run


def collect_run(cfg: Any) -> ReportData:
    """The report of a whole run (`cfg`: the run's `ExperimentConfig`; its output_dir is the run
    directory): every seed, and the lab's no-bias control as a nested report."""
    runs = rundir.RunDir(Path(cfg.output_dir)).seed_runs(cfg)
    main = [r for r in runs if not r.control]
    controls = [r for r in runs if r.control]
    data = collect_seeds(cfg, main, TITLE)
    if controls:
        data.controls.append(collect_seeds(cfg, controls, CONTROL_TITLE))
    return data


def collect_seeds(cfg: Any, runs: list[rundir.SeedRun], title: str) -> ReportData:
    """One experiment's seed runs (all trained with `cfg` but for the seed) as one report."""
    results = [run.eval_results() for run in runs]
    per_seed = [(run, scores_of(res)) for run, res in zip(runs, results)]
    grouped = grouped_generation_tasks([r for res in results for by_task in res.values() for r in by_task.values()])
    group_cols = {f"{task}/{g}{suffix}" for (task, _, suffix), groups in grouped.items() for g in groups}
    columns: list[str] = []
    for _, scores in per_seed:
        for s in scores.values():
            columns += [c for c in s if c not in columns]
    k_col, i_col = (cfg.report.tradeoff or [None, None])[:2]
    if k_col is None:
        k_col = next((c for c in columns if "knowledge" in c and "instruct" in c and "/" not in c), next((c for c in columns if "/" not in c), None))
    if i_col is None:
        i_col = next((c for c in columns if "instruction" in c and "/" not in c and "(format)" not in c), None)
    merged: dict[str, dict[str, list[float]]] = {}
    stderr: dict[str, dict[str, list[float]]] = {}
    for res in results:
        for model, by_task in res.items():
            for result in by_task.values():
                for c, v in task_stderrs(result).items():
                    stderr.setdefault(model, {}).setdefault(c, []).append(v)
    curve: dict[str, dict[float, list[float]]] = {}
    compute: dict[str, dict[str, list[float]]] = {}
    compute_parts: dict[str, str] = {}
    redone_by_stage: dict[str, dict[str, int]] = {}
    losses: dict[float, list[tuple[float, float]]] = {}
    sub_names = [rundir.sub_model_name(i) for i in range(cfg.disperse.k)]
    for run, scores in per_seed:
        for fraction, train_loss, val_loss in vanilla_losses(run):
            losses.setdefault(fraction, []).append((train_loss, val_loss))
        subs = [scores[n] for n in sub_names if n in scores]
        if subs:
            scores[SUB_MEAN] = {c: sum(s[c] for s in subs) / len(subs) for c in subs[0] if all(c in s for s in subs)}
        if k_col:
            best = _best_checkpoint(scores, k_col)
            if best:
                scores[BEST_CHECKPOINT] = best
        for model, cols in scores.items():
            for c, v in cols.items():
                merged.setdefault(model, {}).setdefault(c, []).append(v)
            if rundir.is_snapshot(model) or model in (rundir.VANILLA, rundir.BASE):
                frac = rundir.snapshot_fraction(model)
                for c, v in cols.items():
                    if "/" not in c and "(format)" not in c:
                        curve.setdefault(c, {}).setdefault(frac, []).append(v)
        redone = {m: n for m, n in run.outputs("train").get("redone_steps", {}).items() if n}
        if redone:
            redone_by_stage[f"seed {run.seed}, train"] = redone
        for method, (what, cost) in run_costs(run, list(scores)).items():
            compute_parts[method] = what
            for key, value in cost.items():
                compute.setdefault(method, {}).setdefault(key, []).append(value)

    ordered = [m for m in MODEL_ORDER if m in merged] + sorted(m for m in merged if m not in MODEL_ORDER)
    shown = {m: merged[m] for m in ordered}
    first = runs[0]
    seeds = [run.seed for run in runs]
    train = cfg.train
    notes = [
        f"seeds: {seeds} " + ("(every number is the mean ± sample std over these)" if len(seeds) > 1 else "(one seed: no spread to show)"),
        f"K = {cfg.disperse.k} portions, dispersal: {cfg.disperse.strategy}; merge: {cfg.merge.method}",
        f"training: {train.finetuning_type} fine-tuning, lr {train.learning_rate}, "
        + (f"{train.max_steps} steps in all (DTM's K sub-models together; vanilla as many), " if train.max_steps > 0 else f"{train.num_train_epochs:g} epochs, ")
        + f"batch {train.per_device_train_batch_size}x{train.gradient_accumulation_steps}",
    ]
    lab = first.outputs("data").get("lab")
    if lab:
        notes.append(f"lab data: {lab['examples']} SFT examples; per source {lab['examples_per_source']}; per task {lab['examples_per_task']}")
        notes.append(f"lab base model knowledge: {lab['base_fact_accuracy']}")
    split = first.outputs("data").get("split")
    if split:
        notes.append(f"instruction data: {split['train']} training examples, {split['validation']} held out for validation")
    sizes = benchmark_sizes(results[0])
    if sizes:
        notes.append("benchmarks (items; standard error of the first model's score): "
                     + ", ".join(f"{t} {n}" + (f" (se {se:.3f})" if se is not None else "") for t, (n, se) in sizes.items())
                     + "; a difference smaller than its standard error is not shown as a win")
    if BEST_CHECKPOINT in shown:
        notes.append(f"{BEST_CHECKPOINT} is picked on the test benchmark itself: an optimistic bound for vanilla")
    table = [m for m in shown if not (rundir.is_snapshot(m) or rundir.is_sub_model(m))]
    # At a glance: every task's main metric, and the splits of the knowledge column only.
    headline = headline_columns(columns, k_col)
    detail = [c for c in columns if c not in group_cols]  # grouped generation tasks get their own tables
    rows = group_table_models(ordered)
    group_tables = [GroupTable(task, metric, suffix, groups, [f"{task}/{g}{suffix}" for g in groups], rows)
                    for (task, metric, suffix), groups in grouped.items()]
    order = [m for m in ordered if m in compute] + [m for m in compute if m not in ordered]
    errors: dict[str, ErrorSets] = {}
    for res in results:
        for task, (metric, sets) in seed_error_sets(res, cfg.disperse.k).items():
            errors.setdefault(task, ErrorSets(task, metric, cfg.disperse.k, [])).per_seed.append(sets)
    token_losses = [{"seed": run.seed} | json.loads(run.token_losses_file.read_text()) for run in runs if run.token_losses_file.is_file()]
    return ReportData(
        title=title, scores=shown, columns=headline, detail_columns=detail if headline != detail else [],
        group_tables=group_tables, compute_parts=compute_parts, redone=redone_by_stage,
        notes=notes, tax_curve=curve, table=table, losses=losses,
        tradeoff_axes=(k_col, i_col) if k_col and i_col else None, groups={m: group_of(m) for m in shown},
        portions=first.outputs("disperse").get("stats", []),
        compute={m: {k: mean_std(v)[0] for k, v in compute[m].items()} for m in order},
        error_sets=list(errors.values()), token_losses=token_losses,
        stderr={m: stderr[m] for m in shown if m in stderr},
    )
