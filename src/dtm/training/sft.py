"""Train one sub-model: a causal LM fine-tuned from a base on one portion (LoRA or full).

Built on the Hugging Face `Trainer`, which already does what a sub-model needs: gradient
accumulation, mixed precision, gradient checkpointing, length-grouped batching, periodic
checkpoints with optimizer/scheduler/RNG state, and resume that skips the batches already
seen, so a resumed run ends with the same weights as an uninterrupted one. What this
module adds around it:

- the data: response-only labels from `dtm.data.template`, optionally mixed with other
  examples (the replay baseline's text), right-padded or padding-free (packed) batches;
- the output directory (names from `dtm.rundir`): a `save_pretrained` model (safetensors;
  a PEFT adapter dir for LoRA) with its tokenizer, `train_log.jsonl` and TensorBoard events
  in `logs/`, checkpoints in `checkpoints/` while training, snapshots at fractions of
  training in `fractions/`, and `training_complete.json` written last (atomically): a
  directory without it is unfinished;
- crash safety by time: a checkpoint at least every `train.checkpoint_minutes` and at every
  `save_fractions` point (besides `save_steps`), and a summary that covers every resumed
  segment (the running loss sum and seconds travel in each checkpoint's `trainer_state.json`);
- clear errors (`TrainingError`) for a missing base model, LoRA targets the model lacks,
  a portion empty after truncation, a non-finite loss (with the step) and a full disk.

Why the Trainer and not a loop of our own: a step costs the same as a bare PyTorch loop's
(the step is the maths; `benchmarks/bench_train_overhead.py` times a bare loop, the plain
Trainer and this module), and no more than TRL's SFTTrainer on identical batches
(`benchmarks/bench_train_throughput.py`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from dtm.config import ExperimentConfig
from dtm.data.formats import Conversation, load_conversations
from dtm.data.template import tokenize_conversations
from dtm.errors import OutputError, TrainingError
from dtm.io import (
    atomic_directory,
    atomic_write_json,
    atomic_write_jsonl,
    bad_safetensors,
    is_disk_full,
    make_dirs,
    remove_stale_temporaries,
    temp_prefix,
)
from dtm.rundir import (
    CHECKPOINT_DIR,
    COMPLETE_FILE,
    LOG_FILE,
    TENSORBOARD_DIR,
    fraction_dir,
    fractions_file,
    is_complete,
)
from dtm.training import checkpointing
from dtm.training.batches import REAL_TOKENS, Example, ExampleDataset, make_collator, mean_loss
from dtm.training.chunked_loss import ENV_SWITCH, Parts, causal_lm_loss, chunked_loss_enabled, model_parts

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- output directory layout


def last_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint in `out/checkpoints/`, or None.

    The Trainer writes `trainer_state.json` last, so a checkpoint without a readable one was
    cut off mid-save (e.g. by `kill -9`) and is skipped.
    """
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    found = []
    for d in root.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-")[1])
            json.loads((d / "trainer_state.json").read_text())
        except (ValueError, IndexError, OSError, json.JSONDecodeError):
            continue
        found.append((step, d))
    return max(found)[1] if found else None


# ---------------------------------------------------------------- model


def load_base(base: str | Path, config: ExperimentConfig, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, Any]:
    """The base causal LM and its tokenizer, with a clear error when `base` is not a model."""
    base = str(base)
    looks_local = base.startswith((".", "/", "~")) or os.sep in base and not _looks_like_hub_id(base)
    if looks_local and not Path(base).expanduser().is_dir():
        raise TrainingError(f"base model {base!r}: directory not found; give a `save_pretrained` directory or a hub id")
    kwargs: dict[str, Any] = {"trust_remote_code": config.model.trust_remote_code, "revision": config.model.revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, **kwargs)
        attn = {"attn_implementation": config.model.attn_implementation} if config.model.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32, **attn, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers and safetensors raise many types for a damaged directory
        bad = bad_safetensors(base)
        if bad:
            raise TrainingError(f"base model: {bad}") from None
        if attn and isinstance(e, (ImportError, ValueError)) and ("attn" in str(e).lower() or "attention" in str(e).lower()):
            raise TrainingError(f"{config.where('model.attn_implementation')}: model.attn_implementation={attn['attn_implementation']!r} "
                                f"cannot be used here ({str(e).strip().splitlines()[0]}); choose eager or sdpa, or unset it") from None
        if not isinstance(e, (OSError, ValueError)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"base model {base!r}: cannot load it as a causal LM with a tokenizer ({first}); "
            "give a local `save_pretrained` directory (the hub is not reachable offline)"
        ) from None
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise TrainingError(
            f"base model {base!r}: the tokenizer has {len(tokenizer)} tokens but the model has {rows} embedding rows; "
            "use the tokenizer the model was trained with (or resize the model's embeddings with resize_token_embeddings)"
        )
    if tokenizer.pad_token_id is None:  # padding positions carry label -100, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    # No KV cache in training. It also matters for padding-free batches: transformers builds
    # the per-example (block-diagonal) mask from position_ids only when there is no cache;
    # with one, flattened examples silently attend to each other.
    model.config.use_cache = False
    return model, tokenizer


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def check_freeze_modules(config: ExperimentConfig) -> None:
    """`train.freeze_modules` with LoRA is an error: the base is frozen anyway, and silently ignoring it would hide a mistake."""
    if config.train.freeze_modules and config.train.finetuning_type == "lora":
        raise TrainingError("train.freeze_modules applies to full fine-tuning; with LoRA only the adapters train")


def freeze_modules(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Stop gradients for parameters whose dotted name contains a pattern as whole components.

    `embed_tokens` freezes `model.embed_tokens.weight`; with tied embeddings that is the same
    tensor as `lm_head.weight`, so the output layer is frozen too. A pattern that matches
    nothing is an error (a typo must not silently train everything).
    """
    frozen: list[str] = []
    for pattern in patterns:
        parts = pattern.split(".")
        hits = [
            name for name, _ in model.named_parameters(remove_duplicate=False)
            if any(name.split(".")[i : i + len(parts)] == parts for i in range(len(name.split("."))))
        ]
        if not hits:
            raise TrainingError(f"train.freeze_modules: {pattern!r} matches no parameter of the model (names look like {next(iter(dict(model.named_parameters())))!r})")
        frozen += hits
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {id(params[name]) for name in frozen}
    for p in params.values():
        if id(p) in tensors:
            p.requires_grad_(False)
    # report every name of a frozen tensor (a tied lm_head.weight is embed_tokens.weight)
    return sorted(name for name, p in params.items() if id(p) in tensors)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the Linear layers (what LoRA `target_modules` may name)."""
    return sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def apply_lora(model: PreTrainedModel, config: ExperimentConfig) -> torch.nn.Module:
    """Wrap the model with PEFT LoRA adapters on `train.lora.target_modules`."""
    from peft import LoraConfig, get_peft_model

    lora = config.train.lora
    available = linear_module_names(model)
    missing = [t for t in lora.target_modules if t not in available]
    if missing:
        raise TrainingError(
            f"train.lora.target_modules: {missing} not found in the model; its linear layers are {available}"
        )
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none",
    )
    with warnings.catch_warnings():
        # PEFT reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
        # FutureWarning in every training job's log; the attribute's value is still right, and
        # dtm turns checkpointing on itself afterwards (`checkpointing.enable`)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
        return get_peft_model(model, peft_config)


# ---------------------------------------------------------------- data


def as_conversations(data: str | Path | list[Conversation], config: ExperimentConfig) -> list[Conversation]:
    if isinstance(data, (str, Path)):
        # "auto": portions are written in `messages` form whatever the user's data format was
        return load_conversations(data, format="auto", on_bad_example=config.data.on_bad_example,
                                  source_field=config.data.source_field).conversations
    return list(data)


def sft_examples(conversations: list[Conversation], tokenizer: Any, config: ExperimentConfig, name: str = "data") -> list[Example]:
    """Tokenised examples with response-only labels; an empty result is an error."""
    examples, stats = tokenize_conversations(
        conversations, tokenizer, config.data.template, config.data.cutoff_len, config.data.first_turn_only
    )
    if not examples:
        raise TrainingError(
            f"{name}: no example left to train on ({stats.examples} examples, {stats.dropped} with no response token "
            f"left after truncation to data.cutoff_len={config.data.cutoff_len}); raise data.cutoff_len or check the data"
        )
    if stats.dropped:
        log.warning("%s: %d of %d examples dropped (no response token left after truncation to %d), e.g. %s",
                    name, stats.dropped, stats.examples, config.data.cutoff_len, stats.dropped_ids[:5])
    return examples


# ---------------------------------------------------------------- trainer


class Penalty(Protocol):
    """A weight penalty added to the loss once per optimizer step (`regularizers.WeightPenalty`)."""

    kind: str  # recorded as `regularizer` in training_complete.json
    coef: float  # recorded as `penalty_coef`

    def __call__(self, model: torch.nn.Module) -> torch.Tensor: ...


# (model wrapped for training, tokenizer, the SFT conversations) -> the penalty
PenaltyFactory = Callable[[torch.nn.Module, Any, list[Conversation]], Penalty]
# (the SFT examples, tokenizer) -> the examples to train on, in training order
MixIn = Callable[[list[Example], Any], list[Example]]


@dataclass(frozen=True)
class ModelForm:
    """A model other than plain or PEFT fine-tuning (LoRA-MoE): `wrap` changes the loaded base in
    place before training (which parameters train is its choice), `save` writes the trained
    model's files into a directory instead of `save_pretrained`."""

    wrap: Callable[[torch.nn.Module], Any]
    save: Callable[[torch.nn.Module, Path], Any]


TOTALS_KEY = "DtmTotals"  # where a checkpoint's trainer_state.json carries the totals of the segments so far


@dataclass
class Totals:
    """What the training up to a checkpoint added up to, over every segment (a resume starts a segment)."""

    loss_sum: float = 0.0  # the Trainer's per-step losses summed: train_loss = loss_sum / steps
    seconds: float = 0.0  # training seconds up to the checkpoint (work a kill threw away is not counted)
    segments: int = 0

    @classmethod
    def of_checkpoint(cls, checkpoint: Path | None) -> Totals | None:
        """The totals saved with `checkpoint` (zero for none: a fresh start); None when the checkpoint predates them."""
        if checkpoint is None:
            return cls()
        saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("stateful_callbacks", {}).get(TOTALS_KEY)
        return cls(**saved) if isinstance(saved, dict) else None


class DtmTrainer(Trainer):
    """`Trainer` plus the loss computed only at labelled positions in chunks (`chunked_loss`, where the
    model's structure is known), an optional weight penalty (L2/EWC), a finite-loss check, token counts,
    and totals over resumed segments saved in each checkpoint."""

    def __init__(self, *args: Any, penalty: Penalty | None = None, prior: Totals | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.penalty = penalty
        self.prior = prior or Totals()  # the segments before this one (from the checkpoint resumed from)
        self.segment_start = time.perf_counter()
        self._penalty_sum = 0.0
        self._penalty_n = 0
        self._window_tokens = 0
        self._window_start = time.perf_counter()
        self._parts: Parts | str | None = None  # chunked loss: the model's parts, or why it is not used (decided once)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        self._window_tokens += inputs.pop(REAL_TOKENS)
        parts = None if return_outputs else self._chunked_parts(model)
        if parts is not None:
            # the LM head only where labels are, in chunks (`chunked_loss`); the Trainer's normalisation:
            # num_items_in_batch reaches the loss only when the model accepts loss kwargs
            with self.accelerator.autocast():
                result = causal_lm_loss(parts, inputs, num_items_in_batch if self.model_accepts_loss_kwargs else None)
        else:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if not torch.isfinite(loss.detach()).item():
            raise TrainingError(
                f"loss is {float(loss)} at step {self.state.global_step + 1}; lower train.learning_rate, "
                "check the base model's weights for NaN/inf, or use fp32 (train.bf16: false)"
            )
        if self.penalty is not None:
            penalty = self.penalty(model)
            scaled_for_ga = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
                (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
            )
            # once per optimizer step, whatever the gradient accumulation
            loss = loss + (penalty / self.current_gradient_accumulation_steps if scaled_for_ga else penalty)
            self._penalty_sum += float(penalty.detach())
            self._penalty_n += 1
        return (loss, result[1]) if return_outputs else loss

    def _chunked_parts(self, model: torch.nn.Module) -> Parts | None:
        """The model's decoder and LM head when the chunked loss applies to this trainer, else None
        (the reason logged once)."""
        if self._parts is None:
            if not chunked_loss_enabled():
                why: Parts | str = f"{ENV_SWITCH}=0"
            elif self.accelerator.unwrap_model(model) is not model or self.args.n_gpu > 1 or self.accelerator.num_processes > 1:
                why = "the model is wrapped for data-parallel training (its forward must run through the wrapper)"
            elif self.label_smoother is not None or self.compute_loss_func is not None:
                why = "a label smoother or custom loss function is set"
            else:
                why = model_parts(model)
            if isinstance(why, str):
                log.info("training loss: the plain path (logits at every position): %s", why)
            self._parts = why
        return self._parts if isinstance(self._parts, Parts) else None

    def totals(self) -> Totals:
        """The totals up to now. The loss sum is the Trainer's own accounting (`_total_loss_scalar` plus the
        not yet logged `_tr_loss`): what its `training_loss` divides, so an uninterrupted run's value is matched."""
        return Totals(self.prior.loss_sum + self._total_loss_scalar + float(self._tr_loss.item()),
                      self.prior.seconds + time.perf_counter() - self.segment_start, self.prior.segments + 1)

    def _save_checkpoint(self, model, trial):  # type: ignore[override]
        # in the state the Trainer writes last into the checkpoint: a checkpoint without it is never resumed from
        self.state.stateful_callbacks[TOTALS_KEY] = vars(self.totals())
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        if "loss" in logs:
            logs["tokens_per_second"] = round(self._window_tokens / max(now - self._window_start, 1e-9), 1)
            if self._penalty_n:
                logs["penalty"] = self._penalty_sum / self._penalty_n
            self._window_tokens = 0
            self._window_start = now
            self._penalty_sum, self._penalty_n = 0.0, 0
        super().log(logs, *args, **kwargs)


class JsonlLogCallback(TrainerCallback):
    """Append every training log (step, loss, lr, tokens/s, ...) to `train_log.jsonl`."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        # Drop rows a killed run logged after its last checkpoint: the resumed run redoes them.
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            atomic_write_jsonl(path, [r for r in rows if r.get("step", 0) <= resume_step])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        row |= {("lr" if k == "learning_rate" else k): v for k, v in logs.items() if k != "epoch"}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class CheckpointClock(TrainerCallback):
    """Ask for a checkpoint at least every `minutes` of training and at each fraction of training.

    `save_steps` alone bounds the work a kill loses by steps, which says nothing of time and
    nothing at all for a model shorter than `save_steps` (it restarts from step 0). The save
    itself is the Trainer's (atomic by its `trainer_state.json` written last, old ones pruned
    by `save_total_limit`)."""

    def __init__(self, minutes: float | None, fractions: Sequence[float]):
        self.seconds = minutes * 60 if minutes else math.inf
        self.fractions = list(fractions)
        self.steps: dict[int, float] = {}
        self.last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = fraction_steps(self.fractions, state.max_steps)
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        due = time.monotonic() - self.last >= self.seconds
        if args.world_size > 1:  # data-parallel workers must save together: any worker's clock decides for all
            flag = torch.tensor([float(due)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            due = bool(flag.item())
        if state.global_step in self.steps or due:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()


def fraction_steps(fractions: Sequence[float], max_steps: int) -> dict[int, float]:
    """step -> fraction: where the `save_fractions` snapshots are taken (at least step 1)."""
    return {max(1, math.ceil(f * max_steps)): f for f in fractions}


class ProgressBarCallback(ProgressCallback):
    """The Trainer's tqdm bar (steps, ETA) with loss and tokens/s in its postfix."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs.get('tokens_per_second', 0):.0f}", refresh=False)


class FractionCallback(TrainerCallback):
    """Save a full `save_pretrained` snapshot at fixed fractions of training.

    For the alignment-tax curve: each `fractions/frac-0.10/` is a model the evaluator can
    load, with `metrics.json` holding the train loss (on a fixed sample of the training
    examples) and, when a validation set is given, the validation loss, so the ratio of
    their reductions can be plotted. Step 0 (the base) is recorded in `fractions.json` too.
    Evaluation runs in eval mode without touching any RNG, so it does not change training.
    """

    def __init__(self, out: Path, fractions: Sequence[float], tokenizer: Any, train_sample: list[Example],
                 val_examples: list[Example] | None, pad_id: int):
        self.out, self.fractions, self.tokenizer = out, list(fractions), tokenizer
        self.train_sample, self.val_examples, self.pad_id = train_sample, val_examples, pad_id
        self.summary_path = fractions_file(out)
        self.targets: dict[int, float] = {}

    def _losses(self, model) -> dict[str, float]:
        row = {"train_loss": mean_loss(model, self.train_sample, self.pad_id)}
        if self.val_examples:
            row["val_loss"] = mean_loss(model, self.val_examples, self.pad_id)
        return row

    def _record(self, row: dict) -> None:
        rows = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else []
        rows = [r for r in rows if r["step"] != row["step"]] + [row]
        atomic_write_json(self.summary_path, sorted(rows, key=lambda r: r["step"]))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.targets = fraction_steps(self.fractions, state.max_steps)
        if state.global_step == 0 and not self.summary_path.exists():
            self._record({"step": 0, "fraction": 0.0} | self._losses(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        fraction = self.targets.get(state.global_step)
        if fraction is None or fraction_dir(self.out, fraction).exists():
            return
        row = {"step": state.global_step, "fraction": fraction} | self._losses(model)
        with atomic_directory(fraction_dir(self.out, fraction)) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "metrics.json", row)
        self._record(row)


def fraction_sample(examples: list[Example], seed: int, n: int) -> list[Example]:
    """The fixed sample of training examples whose loss every `save_fractions` snapshot records
    (a function of the seed alone, so the joint executor draws the same one)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    return [examples[i] for i in order[:n].tolist()]


# ---------------------------------------------------------------- arguments


@dataclass
class Precision:
    bf16: bool
    fp16: bool
    load_dtype: torch.dtype


def choose_precision(config: ExperimentConfig) -> Precision:
    """bf16 on a GPU that has it (fp16 on older GPUs), fp32 on CPU; `train.bf16` / `train.fp16` force it."""
    if not torch.cuda.is_available():
        if config.train.bf16 or config.train.fp16:
            key = "train.bf16" if config.train.bf16 else "train.fp16"
            raise TrainingError(f"{config.where(key)}: {key}: true needs a GPU; leave it unset to train in fp32 on CPU")
        return Precision(False, False, torch.float32)
    bf16_ok = torch.cuda.is_bf16_supported()
    bf16 = not config.train.fp16 and (bf16_ok if config.train.bf16 is None else config.train.bf16)
    fp16 = config.train.fp16 or (not bf16 and config.train.bf16 is None)
    # LoRA keeps the frozen base in half precision; full fine-tuning keeps fp32 master weights.
    half = torch.bfloat16 if bf16 else torch.float16
    load = half if config.train.finetuning_type == "lora" and (bf16 or fp16) else torch.float32
    return Precision(bf16, fp16, load)


def training_arguments(config: ExperimentConfig, out: Path, seed: int, precision: Precision, progress: bool) -> TrainingArguments:
    t = config.train
    return TrainingArguments(
        output_dir=str(out / CHECKPOINT_DIR),
        seed=seed,
        data_seed=seed,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=not torch.cuda.is_available(),
        # train.gradient_checkpointing is turned on by `checkpointing.enable`, not here: its selective
        # policy is a function, and these arguments are written out as JSON
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to=[],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **fsdp_arguments(t.fsdp),
    )


def fsdp_arguments(fsdp: str | bool) -> dict[str, Any]:
    """The Trainer's FSDP arguments for `train.fsdp` (none for DDP). FULL_STATE_DICT: the
    checkpoints and the final model hold the whole weights (gathered from the shards), so a model
    trained sharded is an ordinary `save_pretrained` directory like any other."""
    if not fsdp:
        return {}
    return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": fsdp == "full_shard",
                                          "state_dict_type": "FULL_STATE_DICT"}}


# ---------------------------------------------------------------- the entry point


def train_model(
    base: str | Path,
    data: str | Path | list[Conversation],
    out: str | Path,
    config: ExperimentConfig,
    seed: int | None = None,
    *,
    val_data: str | Path | list[Conversation] | None = None,
    mix_in: MixIn | None = None,
    penalty: PenaltyFactory | None = None,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
    name: str | None = None,
    form: ModelForm | None = None,
) -> Path:
    """Fine-tune `base` on `data` and save the result in `out`; returns `out`.

    Resumes from the last checkpoint in `out` if one exists; a finished `out` (with
    `training_complete.json`) is returned as is. The baselines plug in here without this
    module knowing them (`baselines.train_baseline` builds both): `mix_in` turns the SFT
    examples into the training set (replay), `penalty` builds a weight penalty on the model
    once it is wrapped for training (L2, EWC), `form` wraps and saves a model of another form
    (LoRA-MoE).
    """
    out = Path(out)
    name = name or out.name
    if is_complete(out):
        log.info("%s: already trained (%s), skipping", name, out / COMPLETE_FILE)
        return out
    seed = config.seed if seed is None else seed
    t = config.train
    check_freeze_modules(config)
    from transformers import set_seed

    set_seed(seed)
    precision = choose_precision(config)
    conversations = as_conversations(data, config)  # before the (slow) model load: fail fast
    model, tokenizer = load_base(base, config, precision.load_dtype)
    examples = sft_examples(conversations, tokenizer, config, name=f"{name} ({data if isinstance(data, (str, Path)) else 'given data'})")
    examples_sft, n_sft = examples, len(examples)
    if mix_in is not None:
        examples = mix_in(examples, tokenizer)
    val_examples = sft_examples(as_conversations(val_data, config), tokenizer, config, name="validation data") if val_data is not None else None

    if form is not None and t.fsdp:
        raise TrainingError(f"{config.where('train.fsdp')}: train.fsdp: {name} trains a model of its own form, which is saved "
                            "from whole weights; set train.fsdp: false for it (DDP)")
    if form is not None:  # its own trainable parameters (the rest frozen)
        form.wrap(model)
    elif t.finetuning_type == "lora":
        model = apply_lora(model, config)
    elif t.freeze_modules:
        frozen = freeze_modules(model, t.freeze_modules)
        log.info("%s: froze %d parameter tensors: %s", name, len(frozen), frozen)
    weight_penalty = penalty(model, tokenizer, conversations) if penalty is not None else None
    checkpointing.enable(model, t.gradient_checkpointing)

    make_dirs(out, "creating the model's output directory")
    remove_stale_temporaries(out)  # what a killed run of this model left (a live writer's are kept)
    resume = last_checkpoint(out)
    resume_step = int(resume.name.split("-")[1]) if resume else 0
    prior = Totals.of_checkpoint(resume)
    args = training_arguments(config, out, seed, precision, progress)
    train_sample = fraction_sample(examples_sft, seed, t.fraction_eval_samples)  # SFT examples only, not replay text
    trainer = DtmTrainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(examples),
        data_collator=make_collator(t.packing, tokenizer.pad_token_id, getattr(model.config, "_attn_implementation", None)),
        penalty=weight_penalty,
        prior=prior,
    )
    # Data-parallel (Ray Train, `train.workers_per_model`): every worker runs this function;
    # only the first writes the output directory's files, the Trainer's checkpoints are its own.
    main = trainer.is_world_process_zero()
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(CheckpointClock(t.checkpoint_minutes, t.save_fractions))  # every worker: a save is collective
    if main:
        trainer.add_callback(JsonlLogCallback(out / LOG_FILE, resume_step))
        trainer.add_callback(tensorboard_callback(out / TENSORBOARD_DIR, resume_step))
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ProgressBarCallback())
    if t.save_fractions and main:
        trainer.add_callback(FractionCallback(out, t.save_fractions, tokenizer, train_sample, val_examples, tokenizer.pad_token_id))
    for cb in callbacks:
        trainer.add_callback(cb)
    if resume is not None:
        log.info("%s: resuming from %s", name, resume)
    trainer.segment_start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (OSError, SafetensorError) as e:
        raise _disk_error(e, out, "training (writing a checkpoint)") from None
    steps = trainer.state.global_step
    segment_steps = steps - resume_step
    if prior is None:  # resumed from a checkpoint written before totals were saved: this segment's only
        log.warning("%s: checkpoint %s has no loss totals; train_loss covers steps %d-%d only", name, resume, resume_step + 1, steps)
        prior, loss_steps = Totals(segments=1), segment_steps
    else:
        loss_steps = steps
    summary = training_record(
        name, base, config, seed, examples, n_sft, steps, trainer.state.epoch or 0.0,
        # over every segment of a resumed training: the mean loss of all its steps, its seconds summed
        (prior.loss_sum + result.training_loss * segment_steps) / max(loss_steps, 1),
        prior.seconds + time.perf_counter() - trainer.segment_start, prior.segments + 1, resume_step,
    )
    summary["regularizer"] = weight_penalty.kind if weight_penalty is not None else None
    if weight_penalty is not None:
        summary["penalty_coef"] = weight_penalty.coef
    # where and how it trained (a GPU run under autocast says so; `workers` > 1: data-parallel)
    summary |= {"device": str(args.device), "precision": "bf16" if precision.bf16 else "fp16" if precision.fp16 else "fp32",
                "workers": args.world_size}
    # FSDP: each worker holds a shard; gathering the whole weights is collective (every worker
    # takes part) and only the first worker receives them, to write
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if main:
        model_out = trainer.accelerator.unwrap_model(trainer.model) if state_dict is not None else trainer.model
        save_final(model_out, tokenizer, out, summary, form.save if form is not None else None, state_dict=state_dict)
        if not t.keep_checkpoints:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # no worker returns before the model is saved
    del trainer, model
    return out


def training_record(name: str, base: str | Path, config: ExperimentConfig, seed: int, examples: Sequence[Example], n_sft: int,
                    steps: int, epoch: float, train_loss: float, seconds: float, segments: int, resumed_from: int) -> dict[str, Any]:
    """The common part of `training_complete.json` (the joint executor writes the same): what trained on
    what, for how long. `examples` are all it trained on, of which the first-listed `n_sft` SFT examples."""
    tokens_per_epoch = sum(len(e["input_ids"]) for e in examples)
    return {
        "name": name, "base": str(base), "finetuning_type": config.train.finetuning_type, "seed": seed,
        "examples": n_sft, "replay_examples": len(examples) - n_sft, "regularizer": None, "steps": steps,
        # compute, in real tokens (padding excluded): what the report's cost table sums
        "tokens_per_epoch": tokens_per_epoch, "trained_tokens": round(tokens_per_epoch * epoch),
        "train_loss": train_loss, "seconds": round(seconds, 2), "segments": segments, "resumed_from_step": resumed_from,
        "config": config.train.model_dump(mode="json"),
    }


def tensorboard_callback(log_dir: Path, resume_step: int) -> TrainerCallback:
    """transformers' own TensorBoard callback (its tags: `train/loss`, `train/learning_rate`, ...), writing
    a new event file into `log_dir` (the joint executor calls it with the Trainer's arguments too).

    `purge_step`: the file starts with TensorBoard's restart marker at the first step this run
    trains, so TensorBoard (and `EventAccumulator`) drop what a killed run logged past the
    checkpoint resumed from (this run logs those steps again), as `JsonlLogCallback` drops
    those rows from the JSONL log; on a fresh start it hides nothing."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    _after_existing_event_files(log_dir)
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1))


def _after_existing_event_files(log_dir: Path) -> None:
    """Wait (until the next second, two at most) until a new event file's name sorts after every file already in
    `log_dir`. TensorBoard reads a directory's files in name order, and a name starts with the
    second it was made in, then the host and the process id: a run resumed within the second of
    the killed one (a small model on a fast machine) could sort first, and then the killed run's
    steps would purge the resumed run's (its restart marker read last)."""
    seconds = (f.name.split(".")[3] for f in log_dir.glob("events.out.tfevents.*"))
    newest = max((int(x) for x in seconds if x.isdigit()), default=None)
    deadline = time.monotonic() + 2  # a file from a clock ahead of ours is not waited for longer
    while newest is not None and int(time.time()) <= newest and time.monotonic() < deadline:
        time.sleep(0.05)


def _disk_error(e: BaseException, out: Path, what: str) -> TrainingError:
    """A failed write while training (an `OSError`, or safetensors' `SafetensorError`, which carries the OS error in its text)."""
    hint = "the disk is full or the file size limit was hit; free space and " if is_disk_full(e) else ""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return TrainingError(
        f"{out}: could not write while {what} ({reason}); nothing was marked complete; {hint}rerun to resume from the last checkpoint"
    )


def save_final(model: torch.nn.Module, tokenizer: Any, out: Path, summary: dict,
               save: Callable[[torch.nn.Module, Path], Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model files into `out` (`save_pretrained`, or `save`), then the completion marker, last and atomically.

    A model with a non-finite weight is refused before anything is written. `state_dict`: the
    weights to write instead of the model's own (a sharded model's, gathered).

    Files are written into a staging directory first and moved in only when all of them are
    complete, so a full disk never leaves a half-written model in `out` (at most a stale
    staging directory, removed here on failure).
    """
    for name, param in state_dict.items() if state_dict is not None else model.named_parameters():
        if not torch.isfinite(param.detach()).all():
            raise TrainingError(f"{out}: trained weight {name} holds non-finite values (nan/inf); not marked complete. "
                                "Lower train.learning_rate or train.max_grad_norm, then retrain (delete the directory to start afresh)")
    try:
        staging = Path(tempfile.mkdtemp(dir=out, prefix=temp_prefix("final")))
    except OSError as e:
        raise _disk_error(e, out, "saving the trained model") from None
    try:
        if save is not None:
            save(model, staging)
        else:
            model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
        atomic_write_json(out / COMPLETE_FILE, summary)
    except (OSError, SafetensorError, OutputError) as e:
        raise _disk_error(e, out, "saving the trained model") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
