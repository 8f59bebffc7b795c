"""`evaluate` and `evaluate_many`: tasks in, one results dict per task out, resumable.

A results dict (one per model and task) holds the metrics with standard errors, per-group
metrics, counts (items scored, items truncated from the left), seconds, the model path(s) and
a hash of the task spec + data. Each one is written atomically as soon as its task finishes,
into a JSON file (``{task: result}``) or a directory (``<task>.json``); a rerun skips every
task whose stored result has the same run key (task hash, model files, options).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dtm.errors import DtmError
from dtm.evaluation import metrics as M
from dtm.evaluation.harness import (
    NonFiniteScores,
    Scorer,
    generate_greedy,
    load_scorer,
    score_choices,
    score_texts,
    truncate_left,
    truncate_mc,
)
from dtm.evaluation.results import ResultStore
from dtm.evaluation.tasks import Task, build_texts, choice_targets, resolve_tasks

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64
ModelRef = str | os.PathLike


# ---------------------------------------------------------------- encoding


def _encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of many texts in one call.

    For a fast tokenizer without saved truncation/padding, the Rust backend's `encode_batch`
    is called directly: it gives the same ids as `tokenizer(texts)` (tested) without the
    wrapper's per-text conversion, which was a third of the time of a lab-sized MC task.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch") and backend.truncation is None and backend.padding is None:
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=special)]
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _encode_plain(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """lm-eval's `tok_encode`: the tokenizer's default special tokens, none if the text
    already starts with the BOS string."""
    bos = tokenizer.bos_token
    out: list[list[int]] = [[] for _ in texts]
    for special in (True, False):
        idx = [i for i, t in enumerate(texts) if (not (bos and t.startswith(bos))) == special]
        for i, ids in zip(idx, _encode(tokenizer, [texts[i] for i in idx], special), strict=True):
            out[i] = ids
    return out


def encode_prompts(task: Task, tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Prompt token ids: plain text (lm-eval), or the training template (`prompt_ids`, in bulk)."""
    fmt = task.spec.prompt_format
    if fmt == "none":
        return _encode_plain(tokenizer, texts)
    from dtm.data.template import format_prompt, special_prefix

    if fmt == "alpaca":  # == [prompt_ids(tokenizer, t, "alpaca") for t in texts], one tokenizer call
        prefix = special_prefix(tokenizer)
        return [prefix + ids for ids in _encode(tokenizer, [format_prompt(t, "alpaca") for t in texts], False)]
    return _encode(tokenizer, [format_prompt(t, "chat", tokenizer) for t in texts], False)


def encode_mc(task: Task, tokenizer: Any, rows: list[dict[str, Any]]) -> list[tuple[list[int], list[list[int]]]]:
    """(context ids, [choice ids, ...]) per question.

    Plain format follows lm-eval exactly: trailing whitespace of the context moves to the
    continuation, context+continuation is encoded whole and split after the context's tokens.
    Template formats tokenise each choice alone, as a response is tokenised in training.
    """
    spec = task.spec
    texts = build_texts(task, rows)
    targets = [choice_targets(spec, r) for r in rows]
    if spec.prompt_format != "none":
        contexts = encode_prompts(task, tokenizer, texts)
        flat = _encode(tokenizer, [spec.delimiter + t for ts in targets for t in ts], False)
        out, k = [], 0
        for ctx, ts in zip(contexts, targets, strict=True):
            out.append((ctx, flat[k:k + len(ts)]))
            k += len(ts)
        return out
    ctx_texts, wholes = [], []
    for text, ts in zip(texts, targets, strict=True):
        stripped = text.rstrip()
        spaces = text[len(stripped):]
        ctx_texts.append(stripped)
        wholes += [stripped + spaces + spec.delimiter + t for t in ts]
    contexts = _encode_plain(tokenizer, ctx_texts)
    whole_ids = _encode_plain(tokenizer, wholes)
    out, k = [], 0
    for ctx_text, ctx, ts in zip(ctx_texts, contexts, targets, strict=True):
        if not ctx_text:  # empty context: condition on the prefix token, as lm-eval does
            ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
            conts = _encode(tokenizer, [spec.delimiter + t for t in ts], False)
        else:
            conts = [w[len(ctx):] for w in whole_ids[k:k + len(ts)]]
        out.append((ctx, conts))
        k += len(ts)
    return out


# Token ids of tasks' requests, kept across the models one process evaluates: DTM scores K
# sub-models, the merge and the baselines, usually with one tokenizer, on the same tasks, and
# encoding a lab task took a third of a model's evaluation. Bounded in token ids (Python ints:
# about 30 bytes each), oldest out first; a task larger than the bound is not kept.
_ENCODINGS: OrderedDict[tuple[str, str, str, int], tuple[Any, int]] = OrderedDict()
ENCODING_CACHE_IDS = 4_000_000


def _count_ids(value: Any) -> int:
    return sum(_count_ids(v) for v in value) if value and isinstance(value[0], (list, tuple)) else len(value)


def task_encoding(scorer: Scorer, task: Task, kind: str, rows: list[dict[str, Any]], encode: Any) -> Any:
    """`encode()`, or what it returned for this task, row count and tokenizer files before."""
    if not scorer.tokenizer_key:
        return encode()
    key = (scorer.tokenizer_key, task.spec_hash, kind, len(rows))
    if key in _ENCODINGS:
        _ENCODINGS.move_to_end(key)
        return _ENCODINGS[key][0]
    value = encode()
    size = _count_ids(value)
    if size <= ENCODING_CACHE_IDS:
        _ENCODINGS[key] = (value, size)
        while sum(n for _, n in _ENCODINGS.values()) > ENCODING_CACHE_IDS:
            _ENCODINGS.popitem(last=False)
    return value


# ---------------------------------------------------------------- one task


def _code_program(row: dict[str, Any], completion: str) -> str:
    """HumanEval: prompt + completion + tests + check(entry_point); MBPP: completion + asserts."""
    if "entry_point" in row:
        return f"{row['prompt']}{completion}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"
    return f"{completion}\n\n{row['test']}\n"


def _non_finite(scorer: Scorer, task: Task, row: dict[str, Any], what: str, where: str = "") -> NonFiniteScores:
    model = scorer.names[0] if len(scorer.names) == 1 else ", ".join(scorer.names)
    return NonFiniteScores(
        f"{model}: task {task.name!r}: non-finite {what} (nan/inf) at item {row['id']!r}{where}; the model's weights or "
        "activations overflow (check how it was trained or merged, or evaluate in float32): no score is reported")


def run_task(
    scorer: Scorer,
    task: Task,
    batch_size: int = 16,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    allow_code_execution: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score one task -> (result dict, per-item samples)."""
    spec = task.spec
    if spec.type == "code" and not allow_code_execution:
        raise DtmError(f"task {spec.name!r} executes model-written code; pass allow_code_execution=True (CLI: --allow-code-execution)")
    rows = task.rows[:limit] if limit else task.rows
    start = time.perf_counter()
    tok = scorer.tokenizer
    truncated = 0
    per_item: list[dict[str, float]] = []
    samples: list[dict[str, Any]] = []
    if spec.type == "multiple_choice":
        items = []
        for ctx, choices in task_encoding(scorer, task, "mc", rows, lambda: encode_mc(task, tok, rows)):
            ctx, choices, cut = truncate_mc(ctx, choices, scorer.max_length)
            truncated += cut
            items.append((ctx, choices))
        lls = score_choices(scorer, items, batch_size, progress, desc=spec.name)
        for row, ll in zip(rows, lls, strict=True):
            if not all(map(math.isfinite, ll)):
                bad = next(j for j, x in enumerate(ll) if not math.isfinite(x))
                raise _non_finite(scorer, task, row, "log-likelihood", f", choice {bad}")
            per_item.append(M.mc_item_scores(ll, choice_targets(spec, row), row["answer"]))
            samples.append({"id": row["id"], "loglikelihoods": ll, "answer": row["answer"], **per_item[-1]})
    elif spec.type in ("generate", "code"):
        new_tokens = spec.max_new_tokens or max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        room = scorer.max_length - new_tokens
        if room < 1:
            raise DtmError(f"task {spec.name!r}: max_new_tokens={new_tokens} leaves no room for a prompt in the model's {scorer.max_length} positions")
        prompts = []
        for ids in task_encoding(scorer, task, "prompts", rows, lambda: encode_prompts(task, tok, build_texts(task, rows))):
            ids, cut = truncate_left(ids, room)
            truncated += cut
            prompts.append(ids)
        try:
            outputs = generate_greedy(scorer, prompts, new_tokens, spec.stop, batch_size, progress, desc=spec.name)
        except NonFiniteScores as e:
            raise _non_finite(scorer, task, rows[e.index or 0], "logits", f", generation step {e.step}") from None
        if spec.type == "code":
            from dtm.evaluation.codeexec import run_programs

            passed = run_programs([_code_program(r, o) for r, o in zip(rows, outputs, strict=True)], spec.timeout_s, progress)
            for row, out, (ok, why) in zip(rows, outputs, passed, strict=True):
                per_item.append({"pass_at_1": float(ok)})
                samples.append({"id": row["id"], "output": out, "passed": ok, "result": why})
        else:
            for row, out in zip(rows, outputs, strict=True):
                scores = {"exact_match": M.exact_match(out, row["answer"], spec.extractor, spec.regex, spec.ignore_case)}
                if "pattern" in row:
                    scores["pattern_match"] = M.pattern_match(out, row["pattern"])
                per_item.append(scores)
                samples.append({"id": row["id"], "output": out, "answer": row["answer"], **scores})
    else:  # perplexity
        texts = [r["text"] for r in rows]
        token_ids = _encode(tok, texts, False)
        lls = score_texts(scorer, token_ids, batch_size, progress)
        for row, ll in zip(rows, lls, strict=True):
            if not math.isfinite(ll):
                raise _non_finite(scorer, task, row, "log-likelihood")
        result_metrics = M.perplexity_metrics(lls, texts, [len(t) for t in token_ids])
        samples = [{"id": r["id"], "loglikelihood": ll, "tokens": len(t)} for r, ll, t in zip(rows, lls, token_ids, strict=True)]
    seconds = time.perf_counter() - start
    if truncated:
        log.warning("%s: %d of %d prompts are longer than the model's %d positions; cut from the left (counted in the results)",
                    spec.name, truncated, len(rows), scorer.max_length)
    if spec.type == "perplexity":
        metrics_out: dict[str, Any] = result_metrics
        groups: dict[str, Any] = {}
    else:
        metrics_out = M.summarize(per_item)
        groups = M.grouped(per_item, [r[spec.group_by] for r in rows]) if spec.group_by else {}
    if spec.type == "generate" and any("pattern" in r for r in rows):
        metrics_out["pattern_items"] = sum("pattern" in r for r in rows)
    result = {
        "task": spec.name,
        "type": spec.type,
        "source": str(task.source),
        "spec_hash": task.spec_hash,
        "model": scorer.names[0] if len(scorer.names) == 1 else scorer.names,
        "ensemble": len(scorer.names) > 1,
        "metrics": metrics_out,
        "groups": groups,
        "counts": {"items": len(rows), "truncated": truncated, "task_items": len(task.rows)},
        "num_fewshot": spec.num_fewshot,
        "limit": limit,
        "seconds": round(seconds, 4),
        "items_per_second": round(len(rows) / seconds, 2) if seconds > 0 else None,
        "scoring": "packed" if scorer.share_context else "per_choice",
    }
    if per_item:  # per-question scores (the error-set diagnostic); readers of older files find none
        result["per_item"] = M.per_item_columns([r["id"] for r in rows], per_item)
    return result, samples


# ---------------------------------------------------------------- results files


def _model_fingerprint(paths: Sequence[ModelRef]) -> list[str]:
    """Names, sizes and mtimes of a model directory's weight/config files (a retrained checkpoint
    is re-evaluated), not its path: a hard link or `copy2` of the same files elsewhere (a sweep's
    cells share models so) keeps its results. A hub id or a file is its path."""
    out = []
    for p in paths:
        p = Path(p).resolve()
        parts = []
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                    st = f.stat()
                    parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        out.append("|".join(parts) or str(p))
    return out


def run_key(task: Task, models: Sequence[ModelRef], adapter: ModelRef | None, limit: int | None, max_new_tokens: int | None,
            dtype: str | None = None) -> str:
    payload = {
        "task": task.spec_hash, "models": _model_fingerprint(models),
        "adapter": _model_fingerprint([adapter])[0] if adapter else None,
        "limit": limit, "max_new_tokens": max_new_tokens if task.type in ("generate", "code") else None,
    }
    if dtype:  # only when asked for, so the keys of results scored at the default stay valid
        payload["dtype"] = dtype
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_keys(model: Any, tasks: Sequence[Task], limit: int | None = None, max_new_tokens: int | None = None,
             dtype: str | None = None) -> dict[str, str]:
    """Task name -> the run key `evaluate_many` stores with `model`'s result on it: a result file
    whose tasks carry these keys is current for `model`, whatever model name it was written under
    (a sweep links a sibling's result for the same files under another name)."""
    entry = _model_entries({"model": model})["model"]
    return {t.name: run_key(t, entry["paths"], entry["adapter"], limit, max_new_tokens, dtype) for t in tasks}


def _run_tasks(
    scorer_factory, model_paths: list[ModelRef], task_list: list[Task], store: ResultStore, *, adapter, batch_size, limit,
    max_new_tokens, allow_code_execution, progress, log_samples, dtype=None,
) -> dict[str, Any]:
    done = store.load()
    results: dict[str, Any] = {}
    failures: list[str] = []
    scorer: Scorer | None = None
    for task in task_list:
        key = run_key(task, model_paths, adapter, limit, max_new_tokens, dtype)
        prior = done.get(task.name)
        if isinstance(prior, dict) and prior.get("run_key") == key:
            log.info("%s: already evaluated (%s), skipped", task.name, store.path)
            results[task.name] = prior
            continue
        if task.type == "code" and not allow_code_execution:
            log.warning("%s: skipped; code tasks execute model-written programs, pass allow_code_execution=True "
                        "(CLI: --allow-code-execution) to run them in a sandboxed subprocess", task.name)
            continue
        if scorer is None:
            scorer = scorer_factory()
        try:
            result, samples = run_task(scorer, task, batch_size, limit, max_new_tokens, allow_code_execution, progress)
        except NonFiniteScores:
            raise  # the model itself is broken: every task would fail alike
        except DtmError as e:  # e.g. a chat-format task on a tokenizer without a chat template
            log.error("%s: %s", task.name, e)
            failures.append(f"{task.name}: {e}")
            continue
        except Exception as e:  # keep going: finished tasks are saved, this one is retried on rerun
            log.exception("%s: failed", task.name)
            failures.append(f"{task.name}: {type(e).__name__}: {e}")
            continue
        result["run_key"] = key
        if adapter is not None:
            result["adapter"] = str(adapter)
        store.save(task.name, result, samples if log_samples else None)
        results[task.name] = result
    if failures:
        raise DtmError("some tasks failed (the others are saved; rerun to retry):\n  " + "\n  ".join(failures))
    return results


def evaluate(
    model: ModelRef | list[ModelRef],
    tasks: list[str | os.PathLike],
    out: str | os.PathLike | None = None,
    batch_size: int = 16,
    ensemble: bool = False,
    adapter: str | os.PathLike | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    *,
    suites: Mapping[str, list[str | os.PathLike]] | None = None,
    data_dir: str | os.PathLike | None = None,
    device: str | None = "auto",
    dtype: str | None = None,
    allow_code_execution: bool = False,
    log_samples: bool = False,
    progress: bool = True,
    share_context: bool | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate one model (or an ensemble of several) on tasks; returns {task name: result}.

    `tasks`: task files (YAML/JSON spec or MC JSONL), suite names (`suites` first, then the
    built-in `knowledge`/`reasoning`/`code`/`paper`) or benchmark names. `out`: a `.json` file
    or a directory; each task's result is written as it finishes and reused on a rerun.
    `max_new_tokens`: generation length for tasks whose spec sets none (default 64).
    """
    paths = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(paths) > 1 and not ensemble:
        raise DtmError(f"{len(paths)} models given: pass ensemble=True (CLI: --ensemble) to average their predictions, "
                       "or use evaluate_many to score each one")
    if batch_size < 1:
        raise DtmError(f"batch_size must be >= 1, got {batch_size}")
    check_limit(limit)
    store = ResultStore(out)
    if isinstance(tasks, (str, os.PathLike)):
        tasks = [tasks]
    task_list = resolve_tasks(list(tasks), suites=dict(suites) if suites else None, data_dir=data_dir)

    def factory() -> Scorer:
        return load_scorer(paths, adapter=adapter, device=device, dtype=dtype, share_context=share_context, trust_remote_code=trust_remote_code)

    return _run_tasks(factory, paths, task_list, store, adapter=adapter, batch_size=batch_size, limit=limit,
                      max_new_tokens=max_new_tokens, allow_code_execution=allow_code_execution, progress=progress,
                      log_samples=log_samples, dtype=dtype)


def peak_memory_line() -> str:
    """This process's peak resident memory (Linux/macOS `getrusage`), for `dtm eval` to print:
    the number a user sizes a machine by (models, activations and the tokenizer together)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    gib = peak / 2**30 if sys.platform == "darwin" else peak / 2**20
    return f"peak memory (RSS) of this process: {gib:.2f} GiB"


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise DtmError(f"limit must be >= 1, got {limit} (it is the number of items scored per task; leave it out for all)")


def _model_entries(models: Mapping[str, Any] | Sequence[ModelRef]) -> dict[str, dict[str, Any]]:
    """Normalise {name: path | [paths] | {"model":..., "adapter":...}} or [paths] to named entries."""
    if not isinstance(models, Mapping):
        named: dict[str, Any] = {}
        for p in models:
            base = Path(p).name or "model"
            name, n = base, 2
            while name in named:
                name, n = f"{base}-{n}", n + 1
            named[name] = p
        models = named
    out = {}
    for name, ref in models.items():
        if isinstance(ref, Mapping):
            m = ref["model"]
            out[name] = {"paths": list(m) if isinstance(m, (list, tuple)) else [m], "adapter": ref.get("adapter")}
        else:
            out[name] = {"paths": list(ref) if isinstance(ref, (list, tuple)) else [ref], "adapter": None}
    return out


def evaluate_many(
    models: Mapping[str, Any] | Sequence[ModelRef],
    tasks: list[str | os.PathLike] | list[Task],
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate several models (base, vanilla checkpoints, DTM, ensembles) on one task list.

    Tasks are loaded and validated once. `models`: {name: model dir | [dirs] (an ensemble) |
    {"model": dir, "adapter": dir}} or a list of dirs (named by directory). Results go to
    `out_dir/<name>.json`; returns {name: {task: result}}.
    """
    if out_dir is not None and Path(out_dir).suffix == ".json":
        raise DtmError(f"{out_dir}: several models write one results file each; pass a directory, not a .json file")
    if out_dir is not None:
        ResultStore(out_dir)  # refuses an existing file where the results directory would go
    check_limit(limit)
    suites = kwargs.pop("suites", None)
    data_dir = kwargs.pop("data_dir", None)
    if isinstance(tasks, (str, os.PathLike)):
        tasks = [tasks]
    if tasks and all(isinstance(t, Task) for t in tasks):
        task_list = list(tasks)  # type: ignore[arg-type]
    else:
        task_list = resolve_tasks(list(tasks), suites=dict(suites) if suites else None, data_dir=data_dir)  # type: ignore[arg-type]
    opts = {k: kwargs.pop(k) for k in ("device", "dtype", "share_context", "trust_remote_code") if k in kwargs}
    allow_code = kwargs.pop("allow_code_execution", False)
    log_samples = kwargs.pop("log_samples", False)
    progress = kwargs.pop("progress", True)
    if kwargs:
        raise TypeError(f"evaluate_many: unexpected arguments {sorted(kwargs)}")
    results = {}
    for name, entry in _model_entries(models).items():
        store = ResultStore(Path(out_dir) / f"{name}.json" if out_dir is not None else None)

        def factory(entry=entry) -> Scorer:
            return load_scorer(entry["paths"], adapter=entry["adapter"], **opts)

        results[name] = _run_tasks(factory, entry["paths"], task_list, store, adapter=entry["adapter"], batch_size=batch_size,
                                   limit=limit, max_new_tokens=max_new_tokens, allow_code_execution=allow_code,
                                   progress=progress, log_samples=log_samples, dtype=opts.get("dtype"))
    return results


def evaluate_models(
    models: Sequence[ModelRef],
    tasks: list[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    ensemble: bool = False,
    adapter: str | os.PathLike | None = None,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_include: str | os.PathLike | None = None,
    **opts: Any,
) -> dict[str, dict[str, Any]]:
    """`dtm eval`: each model on its own (`evaluate_many`), or one model or an ensemble
    (`evaluate`), then lm-evaluation-harness tasks on the single model; -> {label: {task: result}}."""
    if not tasks and not lm_eval_tasks:
        raise DtmError("no tasks: pass --task FILE (or a suite/benchmark name) or --suite NAME")
    if lm_eval_tasks and len(models) > 1:
        raise DtmError("lm-eval tasks take one model")
    by_model: dict[str, dict[str, Any]] = {}
    if tasks and len(models) > 1 and not ensemble:
        by_model = evaluate_many(list(models), tasks, out, **opts)
    elif tasks:
        by_model[str(models[0]) if len(models) == 1 else "ensemble"] = evaluate(list(models), tasks, out, ensemble=ensemble, adapter=adapter, **opts)
    if lm_eval_tasks:
        from dtm.evaluation.lmeval import run_lm_eval

        results = run_lm_eval(models[0], list(lm_eval_tasks), out, opts.get("batch_size", 16), opts.get("limit"),
                              device=opts.get("device", "auto"), include_path=lm_eval_include)
        by_model.setdefault(str(models[0]), {}).update(results)
    return by_model


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """One line per task: the headline metrics with standard errors, items, truncations, time."""
    lines = []
    for name, r in results.items():
        m = r.get("metrics", {})
        shown = []
        for k, v in m.items():
            if k.endswith("_stderr") or not isinstance(v, (int, float)) or k == "pattern_items":
                continue
            se = m.get(f"{k}_stderr")
            shown.append(f"{k}={v:.4f}" + (f"±{se:.4f}" if isinstance(se, (int, float)) else ""))
        counts = r.get("counts", {})
        extra = f", {counts['truncated']} truncated" if counts.get("truncated") else ""
        lines.append(f"{name}: {' '.join(shown)}  ({counts.get('items')} items{extra}, {r.get('seconds', 0):.2f}s)")
    return lines
