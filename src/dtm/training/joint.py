"""Train several models of one shape in one process: K stacked parameter sets stepped together.

The lab's sub-models are tiny (0.24M parameters); K of them stepped together pay the per-operation
overhead once (the step is mostly arithmetic all the same: `benchmarks/results/bench_lab_step.md`
measures where it goes). Every trainable weight is held as one tensor
of shape [K, ...]; a forward pass runs over the real tokens of all K models' micro-batches,
padding-free (`Tokens`: model after model, each model's rows through its own weights), and
one backward gives every model its own gradient (the K losses are summed; model k's loss
depends only on row k of each stacked weight). Frozen weights (the lab's embeddings) are held
once.

LoRA (the paper's setting) is the same step with one frozen base held once and K stacked
adapters: the base's matmul runs once over all K micro-batches' tokens, each adapter on its own rows.

Each model keeps exactly the semantics of its separate training by `sft.train_model` (the HF
`Trainer`): its own portion (after a data baseline's hooks: replay, curation), in the order
the Trainer's sampler gives it (`batch_order`: the seeded `SeedableRandomSampler` accelerate
installs, reseeded with seed + epoch; `length_grouped_order` under `group_by_length`), its own batches
from the same collator, the Trainer's loss normalisation (summed token loss over the labelled
tokens of the whole optimizer step), its own gradient-norm clipping, its own AdamW state and
learning-rate schedule (`transformers.get_scheduler`, warmup as `TrainingArguments` computes
it). A model whose data ends earlier stops and is saved while the others go on. Outputs are
the ordinary model directories (`save_pretrained`, tokenizer, `train_log.jsonl` and the
TensorBoard events in `logs/` with the Trainer's tags, `fractions/`, `training_complete.json`
last), so later stages read them unchanged. Each model checkpoints
into its own `checkpoints/joint-<step>/` (atomically), so a killed job resumes every model
from its own last checkpoint, and the models need not be at the same step.

Why our own batched forward and not `torch.func.vmap` over the HF model: the HF Llama builds
its attention mask with data-dependent Python control flow (packed-sequence detection), which
vmap cannot trace. The forward here is the Llama architecture written with batched matmuls
(`supported_model`: the checks that keep it equal to transformers'); a test compares its
trained weights with the Trainer's.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dtm.config import ExperimentConfig
from dtm.data.template import IGNORE_INDEX
from dtm.errors import TrainingError
from dtm.io import atomic_directory, atomic_write_json, make_dirs
from dtm.rundir import CHECKPOINT_DIR, LOG_FILE, TENSORBOARD_DIR, is_complete, joint_checkpoint_dir, joint_checkpoints
from dtm.training.baselines import DATA_BASELINES, data_hooks
from dtm.training.batches import REAL_TOKENS, Example, make_collator
from dtm.training.chunked_loss import CHUNK_ROWS, summed_ce
from dtm.training.sft import (
    FractionCallback,
    JsonlLogCallback,
    apply_lora,
    as_conversations,
    check_freeze_modules,
    choose_precision,
    fraction_sample,
    fraction_steps,
    freeze_modules,
    load_base,
    save_final,
    sft_examples,
    tensorboard_callback,
    training_arguments,
    training_record,
)

log = logging.getLogger(__name__)


@dataclass
class JointJob:
    """One model of a joint job: what `executors.Job` says, with its config resolved."""

    name: str
    data: str | Path
    out: Path
    seed: int
    config: ExperimentConfig  # the job's config (its `train` overrides applied)
    val_data: str | Path | None = None
    baseline: str | None = None  # None or vanilla: plain SFT; a data baseline (`baselines.DATA_BASELINES`) changes the data


# ---------------------------------------------------------------- which models may join


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the batched forward's adapters


def joinable(config: ExperimentConfig, baseline: str | None, on_gpu: bool | None = None) -> bool:
    """A job can join a joint job: plain SFT (a sub-model, vanilla, short, a soup ingredient),
    full fine-tuning or LoRA on the layers' projections, random or length-grouped batches; and
    the baselines that change only the data (replay, curation: the same `baselines.data_hooks`).
    Weight penalties (L2/EWC) keep the Trainer: they are functions of an `nn.Module`'s parameters
    (`regularizers.WeightPenalty`), which the stacked step does not have. And only in fp32
    (`mixed_precision`; `on_gpu`: where it will train; None: on this machine's GPU if it has one)."""
    t = config.train
    shape_ok = t.finetuning_type == "full" or set(t.lora.target_modules) <= set(LORA_TARGETS)
    plain = (baseline in (None, "vanilla", *DATA_BASELINES) and shape_ok and not t.gradient_checkpointing
             and t.workers_per_model <= 1)
    return plain and mixed_precision(config, on_gpu) is None


def mixed_precision(config: ExperimentConfig, on_gpu: bool | None = None) -> str | None:
    """Why a job cannot train in a joint job: on a GPU the Trainer trains it under bf16/fp16
    autocast (the default there) and the joint step runs in fp32 only (its batched forward has
    no autocast path; a half-precision base would not give the Trainer's weights). None: it
    trains in fp32 (on CPU, or with `train.bf16: false`). `on_gpu` as in `joinable`."""
    t = config.train
    gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if not gpu or (t.bf16 is False and not t.fp16):
        return None
    key = "train.fp16: true" if t.fp16 else "train.bf16: true" if t.bf16 else "train.bf16 unset (mixed precision on a GPU)"
    return (f"{key}: the joint executor trains in fp32 only; set train.bf16: false to train these models together in "
            "fp32, or keep mixed precision and they train one at a time with the Trainer")


def shape_key(config: ExperimentConfig) -> tuple:
    """Jobs with equal keys have parameters of one shape and can be stacked."""
    t = config.train
    lora = t.lora.model_dump() if t.finetuning_type == "lora" else None
    return (config.model.model_name_or_path, t.finetuning_type, tuple(t.freeze_modules), json.dumps(lora, sort_keys=True))


def supported_model(model_config: Any) -> str | None:
    """Why the batched forward cannot stand in for this model (None: it can)."""
    c = model_config
    rope = getattr(c, "rope_parameters", None) or {}
    checks = {
        "model_type is llama": c.model_type == "llama",
        "hidden_act is silu": getattr(c, "hidden_act", None) == "silu",
        "no attention bias": not getattr(c, "attention_bias", False),
        "no MLP bias": not getattr(c, "mlp_bias", False),
        "default RoPE": rope.get("rope_type", "default") == "default",
        "no attention dropout": not getattr(c, "attention_dropout", 0.0),
        "pretraining_tp is 1": getattr(c, "pretraining_tp", 1) == 1,
    }
    failed = [k for k, ok in checks.items() if not ok]
    return None if not failed else "the joint executor's batched forward needs " + ", ".join(failed)


# ---------------------------------------------------------------- the Trainer's batch order and schedule


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each batch of `epoch`, as the HF Trainer draws them (random sampler).

    The Trainer's dataloader goes through accelerate, which replaces the `RandomSampler` by a
    `SeedableRandomSampler(data_seed=seed)` whose generator is reseeded with seed + epoch at
    each epoch (`Trainer._inner_training_loop` calls `set_epoch(epoch)`); batches are
    consecutive slices, the last one short. `test_batch_order_is_the_trainers` checks it
    against a real Trainer's dataloader.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return _batches(order, batch_size)


def length_grouped_order(lengths: Sequence[int], batch_size: int, ga: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each batch of `epoch` under `train.group_by_length`, as the Trainer draws them.

    The Trainer's `LengthGroupedSampler` (megabatches of batch x gradient-accumulation examples,
    each sorted longest first, transformers' `get_length_grouped_indices`) draws its permutation
    from torch's global generator, which `Trainer.__init__` seeds with the seed. Each epoch makes
    two draws from it: the DataLoader's iterator first draws its workers' base seed (one int64),
    then the sampler its permutation; nothing else draws while training without dropout. We
    replay those draws on a private generator, so the joint step's own random draws (LoRA
    dropout) cannot shift them. With dropout > 0 the Trainer's later epochs also depend on its
    dropout draws; there the joint order is the same sampler's order without them (the dropout
    masks differ anyway). `test_length_grouped_order_is_the_trainers` checks it against a real
    Trainer's dataloader, and `test_joint_training_equals_separate_training[lora-grouped]` the weights.
    """
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    for e in range(epoch + 1):
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader iterator's base seed
        if e < epoch:
            torch.randperm(len(lengths), generator=generator)  # an earlier epoch's permutation
    order = get_length_grouped_indices(list(lengths), batch_size * ga, generator=generator)
    return _batches(order, batch_size)


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive slices of `batch_size` (the last one short), as the Trainer's `BatchSampler` cuts them."""
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class Schedule:
    """A model's steps as the Trainer counts them, and the learning rate at each."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    lr: list[float]  # lr[s]: the learning rate of optimizer step s (0-based)

    def micro_batches(self, step: int, ga: int) -> tuple[int, list[int]]:
        """(epoch, batch indices within the epoch) of optimizer step `step`."""
        epoch, u = divmod(step, self.steps_per_epoch)
        return epoch, list(range(u * ga, min((u + 1) * ga, self.batches_per_epoch)))

    def epoch_after(self, step: int, ga: int) -> float:
        """`TrainerState.epoch` once `step` optimizer steps are done."""
        if step == 0:
            return 0.0
        epoch, batches = self.micro_batches(step - 1, ga)
        return epoch + (batches[-1] + 1) / self.batches_per_epoch


def schedule(n_examples: int, config: ExperimentConfig, out: Path, seed: int) -> Schedule:
    """Steps and learning rates exactly as `Trainer.train` sets them up for this job."""
    from transformers import get_scheduler

    t = config.train
    batches = math.ceil(n_examples / t.per_device_train_batch_size)
    per_epoch = max(batches // t.gradient_accumulation_steps + int(batches % t.gradient_accumulation_steps > 0), 1)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    args = training_arguments(config, out, seed, choose_precision(config), progress=False)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.learning_rate)
    sched = get_scheduler(t.lr_scheduler_type, dummy, num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total)
    lrs = [t.learning_rate * sched.lr_lambdas[0](s) for s in range(total)]
    return Schedule(batches, per_epoch, total, lrs)


# ---------------------------------------------------------------- the batched Llama forward


@dataclass
class Tokens:
    """The real tokens of K models' micro-batches, padding-free: every model's sequences one
    after another, model after model (model k's tokens are rows `bounds[k]`).

    Why flat: padding the K x b sequences of a joint micro-batch to one length made every
    projection compute the padding of the longest of all K x b sequences (29% more rows than
    real tokens on the LoRA benchmark's data, where a separate run of batch 2 pays 12%), and the
    projections are nearly all of a step's FLOPs. Flat, the base's matmul runs over real tokens
    only; attention, which needs its sequences apart, puts them in a small [S, T] grid
    (`slots`, `_attention`).
    """

    ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N] each token's position (RoPE), as the collator gave it
    targets: torch.Tensor  # [N] the label each position predicts (transformers' shift within a collated row); -100: none
    slots: torch.Tensor  # [N] each token's place in the attention grid: sequence * T + its index in the sequence
    grid: tuple[int, int]  # (S, T): sequences, the longest one's length
    bounds: list[tuple[int, int]]  # model k's tokens: [start, end)

    def to(self, device: torch.device) -> Tokens:
        move = {n: getattr(self, n).to(device) for n in ("ids", "positions", "targets", "slots")}
        return Tokens(**move, grid=self.grid, bounds=self.bounds)


def _sequences(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One collated batch's sequences with a labelled target: (ids, positions, targets, lengths).

    Sequences: transformers' packed sequences (a new one wherever a position does not follow the
    previous one; `batches.pack_batch`) or each row's real tokens (`batches.pad_batch`
    right-pads: attention_mask 1 then 0). A sequence without a labelled target adds no loss and
    attends to nothing else, so it is left out (a packed row's padding is one).
    """
    ids, labels = batch["input_ids"], batch["labels"]
    rows, width = ids.shape
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # as `chunked_loss.labelled_hidden` shifts
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    if "position_ids" in batch:  # packed
        positions = batch["position_ids"]
        real = torch.ones_like(starts)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    else:  # padded: positions 0..T-1, as transformers makes them without position_ids
        positions = torch.arange(width).expand(rows, width)
        real = batch["attention_mask"].bool()
    seq = starts.flatten().cumsum(0) - 1
    labelled = (targets.ne(IGNORE_INDEX) & real).flatten()
    count = int(seq[-1]) + 1 if seq.numel() else 0
    has_target = torch.zeros(count, dtype=torch.long).index_add_(0, seq, labelled.long()) > 0
    keep = real.flatten() & has_target[seq]
    lengths = torch.bincount(seq[keep], minlength=count)
    return ids.flatten()[keep], positions.flatten()[keep], targets.flatten()[keep], lengths[lengths > 0]


def flat_tokens(batches: Sequence[dict[str, Any]]) -> Tokens:
    """K collated batches (one per model, from its own collator) as one padding-free `Tokens`."""
    parts = [_sequences(b) for b in batches]
    sizes = [len(p[0]) for p in parts]
    ends = list(itertools.accumulate(sizes))
    lengths = torch.cat([p[3] for p in parts])
    longest = int(lengths.max()) if lengths.numel() else 0
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    first = lengths.cumsum(0) - lengths
    index = torch.arange(int(lengths.sum())) - first[seq]
    return Tokens(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
                  seq * longest + index, (len(lengths), longest), [(e - s, e) for s, e in zip(sizes, ends)])


def _per_model(x: torch.Tensor, bounds: Sequence[tuple[int, int]], f: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """f(model k's rows of x, k) for every model, concatenated in row order: how a stacked
    weight or an adapter reaches its own model's rows (their counts differ, so a loop of K
    matmuls, not a batched matmul over padded rows). Callers take a stacked weight's K rows
    with one `unbind` (backward: one stack of K gradients; K `w[k]` would each zero-fill a
    gradient of all K rows)."""
    if len(bounds) == 1:
        return f(x, 0)
    return torch.cat([f(x[a:b], k) for k, (a, b) in enumerate(bounds)])


def _linear(x: torch.Tensor, w: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """x [N, in] times a shared weight [out, in] (one matmul over every model's rows) or a stacked one [K, out, in]."""
    if w.dim() == 2:
        return x @ w.T
    ws = w.unbind(0)
    return _per_model(x, bounds, lambda rows, k: rows @ ws[k].T)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """LlamaRMSNorm, with a stacked [K, D] or shared [D] weight."""
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if w.dim() == 1:
        return w * h
    ws = w.unbind(0)
    return _per_model(h, bounds, lambda rows, k: ws[k] * rows)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens, scale: float) -> torch.Tensor:
    """Causal attention within each sequence: q [N, heads, hd], k and v [N, kv_heads, hd] -> [N, heads * hd].

    The tokens go into a zero [S, T] grid, a sequence a row from its first token, for one sdpa
    call with `is_causal`: a real token sees exactly the earlier tokens of its own sequence (the
    grid's padding comes after them; its rows' outputs are never read back, so no mask is built).
    """
    s, t = tokens.grid

    def grid(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(s * t, *x.shape[1:]).index_copy(0, tokens.slots, x).view(s, t, *x.shape[1:]).transpose(1, 2)

    q, k, v = grid(q), grid(k), grid(v)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: transformers' repeat_kv
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1), v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(1, 2).reshape(s * t, -1).index_select(0, tokens.slots)


@dataclass
class Lora:
    """LoRA's scale (alpha / r) and dropout, as PEFT applies them: W x + B A dropout(x) * scale."""

    scale: float
    dropout: float


def _proj(x: torch.Tensor, params: dict[str, torch.Tensor], name: str, lora: Lora | None,
          bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """A projection layer: its (shared or stacked) weight, plus model k's adapter on model k's rows when it has one."""
    y = _linear(x, params[name + ".weight"], bounds)
    a = params.get(name + ".lora_A")
    if a is None or lora is None:
        return y
    a, b = a.unbind(0), params[name + ".lora_B"].unbind(0)
    x = F.dropout(x, lora.dropout) if lora.dropout else x
    return y + _per_model(x, bounds, lambda rows, k: rows @ a[k].T @ b[k].T) * lora.scale


def llama_hidden(params: dict[str, torch.Tensor], cfg: Any, tokens: Tokens, lora: Lora | None = None) -> torch.Tensor:
    """Final hidden states [N, H] of K Llama models on their own tokens (`Tokens`: model k's
    rows `tokens.bounds[k]`); the LM head is applied by `token_losses`, only where labels are.

    Every weight in `params` is stacked [K, ...] (trained) or shared (frozen, held once);
    `<layer>.lora_A` [K, r, in] and `<layer>.lora_B` [K, out, r] are the K models' adapters
    (LoRA: the base's matmul runs once over all K models' tokens, each adapter on its own model's rows).
    The same operations as transformers' `LlamaForCausalLM` with sdpa attention (and PEFT's LoRA).
    """
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    n, bounds = tokens.ids.shape[0], tokens.bounds
    emb = params["model.embed_tokens.weight"]
    if emb.dim() == 3:
        embs = emb.unbind(0)
        h = _per_model(tokens.ids, bounds, lambda ids, k: F.embedding(ids, embs[k]))
    else:
        h = F.embedding(tokens.ids, emb)
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=h.device) / hd))
    freqs = tokens.positions[:, None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [N, 1, hd]
    cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
    eps = cfg.rms_norm_eps
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = _rms_norm(h, params[p + "input_layernorm.weight"], eps, bounds)
        q = _proj(x, params, p + "self_attn.q_proj", lora, bounds).view(n, heads, hd)
        kk = _proj(x, params, p + "self_attn.k_proj", lora, bounds).view(n, kv_heads, hd)
        v = _proj(x, params, p + "self_attn.v_proj", lora, bounds).view(n, kv_heads, hd)
        q, kk = q * cos + _rotate_half(q) * sin, kk * cos + _rotate_half(kk) * sin
        h = h + _proj(_attention(q, kk, v, tokens, hd**-0.5), params, p + "self_attn.o_proj", lora, bounds)
        x = _rms_norm(h, params[p + "post_attention_layernorm.weight"], eps, bounds)
        gate = _proj(x, params, p + "mlp.gate_proj", lora, bounds)
        h = h + _proj(F.silu(gate) * _proj(x, params, p + "mlp.up_proj", lora, bounds), params, p + "mlp.down_proj", lora, bounds)
    return _rms_norm(h, params["model.norm.weight"], eps, bounds)


def lm_head_weight(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output layer's weight, stacked [K, V, H] or shared [V, H] (the embedding when tied)."""
    return params.get("lm_head.weight", params["model.embed_tokens.weight"])


def token_losses(hidden: torch.Tensor, head: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """Summed next-token cross-entropy per model ([K]) of hidden states [N, H] through the head
    (stacked [K, V, H] or shared) against `tokens.targets`. The logits exist only for labelled
    positions, a chunk at a time (`chunked_loss.summed_ce`), in the order the Trainer's loss takes them."""
    heads = head.unbind(0) if head.dim() == 3 else [head] * len(tokens.bounds)
    out = []
    for w, (a, b) in zip(heads, tokens.bounds):
        targets = tokens.targets[a:b]
        keep = targets != IGNORE_INDEX
        out.append(summed_ce(functools.partial(F.linear, weight=w), hidden[a:b][keep], targets[keep]))
    return torch.stack(out)


# ---------------------------------------------------------------- the K models' weights and AdamW


@dataclass
class Stack:
    """The trained weights of K models as one [K, P] buffer (one row per model), their
    gradients and AdamW's moments alike, and the frozen weights once.

    One buffer, so that clipping and the AdamW update are a few calls per model and step over
    all its weights (a row: `clip_rows`, `adamw_rows`), not a few per weight tensor.
    Autograd sees one leaf per weight, a view into the buffer whose `.grad` is a view into
    the gradient buffer: a flat leaf sliced in the forward would cost a buffer-sized zero
    fill and add per weight in the backward (measured: 60% of a lab step).
    """

    flat: torch.Tensor  # [K, P]
    grad: torch.Tensor  # [K, P]
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    layout: dict[str, tuple[int, int, torch.Size]]  # trained weight -> (start, end, shape) in a row
    shared: dict[str, torch.Tensor]  # frozen weights, held once
    decayed: dict[bool, list[tuple[int, int]]]  # the (start, end) spans of a row with/without weight decay (none for biases and norms, as the Trainer)
    names: dict[str, str]  # a trained weight's name in the carrier -> its name in `llama_hidden`
    leaves: dict[str, torch.Tensor] = field(default_factory=dict)  # forward name -> [K, ...] view of `flat`

    def __post_init__(self) -> None:
        for n, (a, b, shape) in self.layout.items():
            leaf = self.flat[:, a:b].view(-1, *shape).requires_grad_()
            leaf.grad = self.grad[:, a:b].view(-1, *shape)
            self.leaves[self.names[n]] = leaf

    @classmethod
    def of(cls, model: torch.nn.Module, rows: Sequence[dict[str, torch.Tensor]], decayed: set[str]) -> Stack:
        """The stack of len(rows) models: model k starts from rows[k] (its trained weights by
        name; for LoRA its own adapter initialisation), the frozen weights from `model`."""
        named = dict(model.named_parameters())
        layout, start = {}, 0
        for n, p in named.items():
            if p.requires_grad:
                layout[n] = (start, start + p.numel(), p.shape)
                start += p.numel()
        flat = torch.stack([torch.cat([r[n].reshape(-1) for n in layout]) for r in rows]).to(next(model.parameters()).device)
        return cls(flat, torch.zeros_like(flat), torch.zeros_like(flat), torch.zeros_like(flat), layout,
                   {forward_name(n): p.detach() for n, p in named.items() if n not in layout},
                   {d: [(a, b) for n, (a, b, _) in layout.items() if (n in decayed) == d] for d in (True, False)},
                   {n: forward_name(n) for n in layout})

    def weights(self, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Every weight by name for `llama_hidden`: trained ones [k, ...] for the rows (models) given."""
        # the leaves themselves: a model's row of a leaf is contiguous, and the forward takes rows one model at a time
        return self.shared | {n: (leaf if rows is None else leaf[rows]) for n, leaf in self.leaves.items()}

    def gradients(self) -> torch.Tensor:
        """The gradient buffer after a backward (autograd adds into each leaf's `.grad` view in
        place; should it ever replace one, its values are copied back)."""
        for n, (a, b, _) in self.layout.items():
            g = self.leaves[self.names[n]].grad
            if g.data_ptr() != self.grad[:, a:b].data_ptr():
                self.grad[:, a:b] = g.reshape(g.shape[0], -1)
                self.leaves[self.names[n]].grad = self.grad[:, a:b].view(g.shape)
        return self.grad

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """Model i's trained weights by their names in the carrier (views)."""
        return {n: self.flat[i, a:b].view(shape) for n, (a, b, shape) in self.layout.items()}


def forward_name(name: str) -> str:
    """A carrier parameter's name in `llama_hidden`: PEFT's `base_model.model.X.base_layer.weight`
    is X.weight, `X.lora_A.default.weight` is X.lora_A."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.default.weight", f".{part}")
    return name


def clip_rows(s: Stack, rows: Sequence[int], max_norm: Sequence[float]) -> list[float]:
    """Clip each model's gradient (a row of `s.grad`) to its own `max_norm`, in place, as
    `clip_grad_norm_` does for one model (never a norm across models); returns the norms
    before clipping. In place on the rows: a clipped copy of the [K, P] buffer was a
    buffer-sized allocation and two passes more per step."""
    norms = torch.linalg.vector_norm(s.grad[list(rows)] if len(rows) < s.grad.shape[0] else s.grad, dim=1)
    coef = (torch.tensor(max_norm, dtype=norms.dtype, device=norms.device) / (norms + 1e-6)).clamp(max=1.0)
    for r, c in zip(rows, coef.tolist()):
        if c < 1.0:  # times 1.0 is the identity: skip the pass
            s.grad[r].mul_(c)
    return norms.tolist()


def adamw_rows(s: Stack, rows: Sequence[int], lr: Sequence[float], step: Sequence[int], beta1: Sequence[float],
               beta2: Sequence[float], eps: Sequence[float], wd: Sequence[float]) -> None:
    """`torch.optim.AdamW(fused=True)`'s update (the Trainer's default optimizer,
    `adamw_torch_fused`), in place, on the rows (models) `rows` of the stack with their
    (clipped) gradients in `s.grad`, each row with its own hyperparameters and step count.
    One fused kernel call per row: torch's optimizer keeps one learning rate and step count
    per tensor, and a row is a model; the kernel updates weights and moments in one pass
    (the same formula as torch's unfused AdamW, which cost a dozen buffer-sized passes)."""
    for j, r in enumerate(rows):
        groups = [(s.decayed[True], wd[j]), (s.decayed[False], 0.0)] if wd[j] else [([(0, s.flat.shape[1])], 0.0)]
        for spans, decay in groups:
            if spans:
                torch._fused_adamw_(
                    [s.flat[r, a:b] for a, b in spans], [s.grad[r, a:b] for a, b in spans],
                    [s.exp_avg[r, a:b] for a, b in spans], [s.exp_avg_sq[r, a:b] for a, b in spans], [],
                    [torch.tensor(float(step[j]), device=s.flat.device) for _ in spans],
                    lr=lr[j], beta1=beta1[j], beta2=beta2[j], weight_decay=decay, eps=eps[j], amsgrad=False, maximize=False)


# ---------------------------------------------------------------- memory model


# The memory model's coefficients, fitted to the peak RSS of joint LoRA jobs on CPU (fp32; K=4,
# `benchmarks/bench_joint_memory.py`, results in benchmarks/results/bench_joint_memory.json):
# growing the layers, the hidden size or the MLP width of a small Llama one at a time, the
# peak grew by about 13 hidden + 11 MLP widths per token and layer (the tensors autograd saves
# are about 5.5 hidden + 4 MLP widths; the rest is the backward's gradients and what the
# allocator keeps of them), and by nothing measurable per token outside the layers.
HIDDEN_PER_LAYER = 13  # hidden widths per token and layer
MLP_PER_LAYER = 11  # MLP (intermediate) widths per token and layer
# Per trained weight: the weight, its gradient, AdamW's two moments, the forward's copy of the
# stacked rows (now only while some models have finished: `Stack.weights`), and about three
# weight-sized temporaries of clipping and the AdamW update (full fine-tuning of the small
# Llama: 8 fits its peak; LoRA's adapters are too small to tell).
# Fitted before the AdamW update became fused and in place (`adamw_rows`): it has no temporaries
# now, so 8 is on the safe side (not refitted).
COPIES_PER_TRAINED = 8
LOGIT_COPIES = 3  # a chunk's fp32 logits, their softmax and their gradient (`chunked_loss`), one chunk alive at a time


def memory_plan(n_params: int, trainable: int, k: int, tokens: int, model_config: Any, bytes_per: int = 4) -> dict[str, int]:
    """Bytes a joint job needs at its peak: the base once, K x the trained weights' state
    (`COPIES_PER_TRAINED`), the activations of K micro-batches of `tokens` tokens alive together
    (`HIDDEN_PER_LAYER`, `MLP_PER_LAYER`), and the logits of one chunk of the chunked loss (fp32,
    whatever the model's dtype). Not counted: the interpreter, torch and the data (the process's
    memory before the job starts)."""
    c = model_config
    per_token = c.num_hidden_layers * (HIDDEN_PER_LAYER * c.hidden_size + MLP_PER_LAYER * c.intermediate_size)
    return {"base": n_params * bytes_per, "trained": k * trainable * COPIES_PER_TRAINED * bytes_per,
            "activations": k * tokens * per_token * bytes_per, "loss": LOGIT_COPIES * CHUNK_ROWS * c.vocab_size * 4}


def available_memory(device: torch.device) -> int:
    """Free bytes on the device (CUDA), or the system's available memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def check_memory(plan: dict[str, int], free: int, batch_size: int, names: Sequence[str]) -> str:
    """The plan as one line; a `TrainingError` with a micro-batch that fits when it does not."""
    total = sum(plan.values())
    line = (f"joint job {', '.join(names)}: memory {total / 2**20:.0f} MiB = base {plan['base'] / 2**20:.0f} + "
            f"{len(names)} x trained state {plan['trained'] / len(names) / 2**20:.0f} + activations "
            f"{plan['activations'] / 2**20:.0f} + loss {plan.get('loss', 0) / 2**20:.0f} MiB (free {free / 2**20:.0f} MiB)")
    if total > 0.9 * free:
        fixed = total - plan["activations"]  # what a smaller micro-batch does not shrink
        per_example = plan["activations"] / max(batch_size, 1)
        fits = int((0.9 * free - fixed) // per_example) if per_example else 0
        hint = (f"set train.per_device_train_batch_size to {fits} (and raise gradient_accumulation_steps to keep the batch)"
                if fits >= 1 else f"train fewer models per joint job (train.models_per_job: {max(1, len(names) // 2)}) or use train.executor: local")
        raise TrainingError(f"{line}: it will not fit; {hint}")
    return line


# ---------------------------------------------------------------- one model's bookkeeping


@dataclass
class Member:
    job: JointJob
    examples: list[Example]
    n_sft: int
    sched: Schedule
    collate: Any
    fractions: FractionCallback | None
    logger: JsonlLogCallback
    tensorboard: Any = None  # transformers' TensorBoardCallback as the Trainer's run has it, once training starts
    step: int = 0
    resumed_from: int = 0
    segments: int = 1  # training segments: 1 + the times it was resumed (as train_model counts them)
    loss_sum: float = 0.0  # summed step losses since step 0 (train_loss = loss_sum / steps)
    seconds: float = 0.0  # its share of the joint job's time (an iteration's time split over its models)
    window: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0})
    last_save: float = field(default_factory=time.monotonic)  # when it last checkpointed (or started)
    _order: tuple[int, list[list[int]]] = (-1, [])  # (epoch, its batches), drawn once per epoch

    @property
    def t(self):
        return self.job.config.train

    def step_batches(self) -> list[list[int]]:
        """The example indices of each micro-batch of this model's next optimizer step."""
        epoch, which = self.sched.micro_batches(self.step, self.t.gradient_accumulation_steps)
        if self._order[0] != epoch:
            t, seed = self.t, self.job.seed
            order = (length_grouped_order([len(e["input_ids"]) for e in self.examples], t.per_device_train_batch_size,
                                          t.gradient_accumulation_steps, seed, epoch) if t.group_by_length
                     else batch_order(len(self.examples), t.per_device_train_batch_size, seed, epoch))
            self._order = (epoch, order)
        return [self._order[1][i] for i in which]


# ---------------------------------------------------------------- the entry point


def train_joint(base: str | Path, jobs: Sequence[JointJob], progress: bool = True,
                on_step: Callable[[str, int], None] | None = None) -> list[Path]:
    """Train `jobs` (models of one shape on one base) together; returns their output dirs.

    Finished models are skipped; unfinished ones resume from their own last joint checkpoint.
    `on_step(name, step)` is called after each model's step (once its checkpoint is written).
    """
    every = [j.out for j in jobs]
    jobs = [j for j in jobs if not is_complete(j.out)]
    if not jobs:
        return every
    cfg0 = jobs[0].config
    shapes = {j.name: shape_key(j.config) for j in jobs}
    if len(set(shapes.values())) > 1:  # the stack holds one shape, and the first job's LoRA scale is used for all
        raise TrainingError(f"joint job {', '.join(shapes)}: the models differ in base, fine-tuning type, frozen modules or "
                            "LoRA settings; only models of one shape train together (executors.joint_groups groups them)")
    check_freeze_modules(cfg0)
    mixed = {j.name: why for j in jobs if (why := mixed_precision(j.config))}
    if mixed:  # `executors.joint_groups` leaves such jobs to the Trainer; a direct call is refused, not run in fp32 unasked
        raise TrainingError(f"joint job {', '.join(mixed)}: {next(iter(mixed.values()))}")
    from transformers import Trainer, set_seed

    set_seed(jobs[0].seed)  # as train_model: the carrier's LoRA initialisation is the first job's
    carrier, tokenizer = load_base(base, cfg0, choose_precision(cfg0).load_dtype)
    why = supported_model(carrier.config)
    if why:
        raise TrainingError(f"{base}: {why}; use train.executor: local")
    t0 = cfg0.train
    lora = Lora(t0.lora.lora_alpha / t0.lora.r, t0.lora.lora_dropout) if t0.finetuning_type == "lora" else None
    if lora is not None:
        carrier = apply_lora(carrier, cfg0)
    elif t0.freeze_modules:
        freeze_modules(carrier, t0.freeze_modules)
    carrier.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    members = [_member(j, tokenizer, base) for j in jobs]
    starts = {jobs[0].seed: _trained(carrier)}
    for j in jobs:  # LoRA jobs with another seed (soup ingredients) start from their own adapters
        if j.seed not in starts:
            starts[j.seed] = _initial_weights(base, j.config, j.seed) if lora else starts[jobs[0].seed]
    stack = Stack.of(carrier, [starts[j.seed] for j in jobs], set(Trainer.get_decay_parameter_names(None, carrier)))
    batch = max(m.t.per_device_train_batch_size for m in members)
    longest = max(len(e["input_ids"]) for m in members for e in m.examples)
    plan = memory_plan(sum(p.numel() for p in carrier.parameters()), stack.flat.shape[1], len(members), batch * longest, carrier.config)
    line = check_memory(plan, available_memory(stack.flat.device), batch, [j.name for j in jobs])
    log.info("%s", line)
    if progress:
        print(line, flush=True)
    for i, m in enumerate(members):
        _resume(m, i, stack)
        # its event file only now that the job will train (a refused one leaves none); from the step resumed
        # from, it hides what a killed run logged past it (`sft.tensorboard_callback`), as `m.logger` drops those rows
        m.tensorboard = tensorboard_callback(m.job.out / TENSORBOARD_DIR, m.step)
        args = training_arguments(m.job.config, m.job.out, m.job.seed, choose_precision(m.job.config), progress=False)
        m.tensorboard.on_train_begin(args, _log_state(m), None, model=carrier)  # the Trainer's `args` and `model_config` texts
        if m.fractions is not None:
            _load_row(carrier, stack, i)
            m.fractions.on_train_begin(None, SimpleNamespace(max_steps=m.sched.total_steps, global_step=m.step), None, model=carrier)
    bar = _bar(members, progress)
    # Our leaves' gradients are strided views into one buffer (on purpose; see `Stack`), which
    # autograd warns about once per weight; the values are right (`Stack.gradients`).
    warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
    try:
        while active := [i for i, m in enumerate(members) if m.step < m.sched.total_steps]:
            started = time.perf_counter()
            norms = _one_step(members, active, stack, carrier.config, lora)
            share = (time.perf_counter() - started) / len(active)
            for i, norm in zip(active, norms):
                m = members[i]
                m.step += 1
                m.seconds += share
                m.window["seconds"] += share
                _after_step(m, i, norm, carrier, stack)
                if on_step is not None:
                    on_step(m.job.name, m.step)
                if m.step == m.sched.total_steps:
                    _finish(m, i, base, carrier, tokenizer, stack, [j.name for j in jobs])
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(" ".join(f"{m.job.name} {m.step}/{m.sched.total_steps}" for m in members), refresh=False)
    finally:
        if bar is not None:
            bar.close()
        for m in members:  # the event files of models a failure left unfinished (a finished one's is closed)
            if m.tensorboard is not None:
                m.tensorboard.on_train_end(None, None, None)
    return every


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _initial_weights(base: str | Path, config: ExperimentConfig, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA model's adapters as `train_model` initialises them: the same calls in the same
    order after `set_seed(seed)` (PEFT draws A from the global generator), so that model k
    starts where its separate training would. It loads the base a second time, for a moment:
    only for a job whose seed differs from the first job's (soup ingredients)."""
    from transformers import set_seed

    set_seed(seed)
    model, _ = load_base(base, config, choose_precision(config).load_dtype)
    return _trained(apply_lora(model, config))


def _bar(members: list[Member], progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    left = max(m.sched.total_steps - m.step for m in members)
    return tqdm(total=left, desc=f"joint x{len(members)}", unit="step")


def _member(job: JointJob, tokenizer: Any, base: str | Path) -> Member:
    """A job's data, schedule and output bookkeeping (the same as `train_model` builds, with a
    data baseline's hooks as `baselines.train_baseline` applies them)."""
    cfg = job.config
    select, mix_in = data_hooks(job.baseline, cfg, base, job.seed) if job.baseline else (None, None)
    conversations = as_conversations(job.data, cfg)
    sft = sft_examples(select(conversations) if select else conversations, tokenizer, cfg, name=f"{job.name} ({job.data})")
    examples = mix_in(sft, tokenizer) if mix_in else sft
    val = sft_examples(as_conversations(job.val_data, cfg), tokenizer, cfg, name="validation data") if job.val_data else None
    make_dirs(job.out, "creating the model's output directory")
    t = cfg.train
    fractions = None
    if t.save_fractions:
        fractions = FractionCallback(job.out, t.save_fractions, tokenizer, fraction_sample(sft, job.seed, t.fraction_eval_samples),
                                     val, tokenizer.pad_token_id)
    resume = last_joint_checkpoint(job.out)
    logger = JsonlLogCallback(job.out / LOG_FILE, resume[0] if resume else 0)  # drops what a killed run logged past it
    return Member(job, examples, len(sft), schedule(len(examples), cfg, job.out, job.seed),
                  make_collator(t.packing, tokenizer.pad_token_id), fractions, logger)


def _one_step(members: list[Member], active: list[int], stack: Stack, model_config: Any, lora: Lora | None) -> list[float]:
    """One optimizer step of every active model; returns their gradient norms before clipping."""
    device = stack.flat.device
    micro = {i: members[i].step_batches() for i in active}
    collated = {i: [members[i].collate([members[i].examples[j] for j in b]) for b in micro[i]] for i in active}
    # the Trainer's normalisation: the step's summed token loss over its labelled (shifted) tokens
    items = {i: sum(int(x["labels"][..., 1:].ne(IGNORE_INDEX).sum()) for x in collated[i]) for i in active}
    step_loss = dict.fromkeys(active, 0.0)
    everyone = list(range(len(members)))
    for j in range(max(len(v) for v in micro.values())):
        rows = [i for i in active if j < len(micro[i])]
        tokens = flat_tokens([collated[i][j] for i in rows]).to(device)
        if tokens.ids.numel():
            weights = stack.weights(None if rows == everyone else torch.tensor(rows, device=device))
            hidden = llama_hidden(weights, model_config, tokens, lora)
            losses = token_losses(hidden, lm_head_weight(weights), tokens) / torch.tensor([max(items[i], 1) for i in rows], device=device)
        else:  # no labelled token in any model's micro-batch: no loss and no gradient, as in the Trainer
            losses = torch.zeros(len(rows))
        values = losses.detach().tolist()
        bad = [f"{members[i].job.name} (step {members[i].step + 1})" for i, x in zip(rows, values) if not math.isfinite(x)]
        if bad:  # each at its own step: resumed models need not be at the same one
            raise TrainingError(f"{', '.join(bad)}: loss is not finite; lower train.learning_rate, "
                                "or check the base model's weights for NaN/inf")
        if losses.requires_grad:
            losses.sum().backward()
        for i, x in zip(rows, values):
            step_loss[i] += x
            members[i].window["tokens"] += collated[i][j][REAL_TOKENS]
    stack.gradients()
    t = [members[i].t for i in active]
    with torch.no_grad():
        # per model, never across models: the norm of model k's gradients alone (clip_grad_norm_'s rule)
        norms = clip_rows(stack, active, [x.max_grad_norm for x in t])
        adamw_rows(stack, active, [members[i].sched.lr[members[i].step] for i in active], [members[i].step + 1 for i in active],
                   [x.adam_beta1 for x in t], [x.adam_beta2 for x in t], [x.adam_epsilon for x in t], [x.weight_decay for x in t])
        stack.grad.zero_()
    for i in active:
        members[i].loss_sum += step_loss[i]
        members[i].window["loss"] += step_loss[i]
        members[i].window["steps"] += 1
    return norms


def _load_row(carrier: torch.nn.Module, stack: Stack, i: int) -> None:
    """Put model i's trained weights into the carrier (an HF model that saves and evaluates them)."""
    named = dict(carrier.named_parameters())
    with torch.no_grad():
        for n, w in stack.row(i).items():
            named[n].copy_(w)


def _after_step(m: Member, i: int, norm: float, carrier: torch.nn.Module, stack: Stack) -> None:
    """Log, snapshot at save_fractions, checkpoint: what the Trainer's callbacks do after a step."""
    t = m.t
    epoch = m.sched.epoch_after(m.step, t.gradient_accumulation_steps)
    if m.step == 1 or m.step % t.logging_steps == 0:
        w = m.window
        logs = {"loss": w["loss"] / max(w["steps"], 1), "grad_norm": norm, "learning_rate": m.sched.lr[m.step - 1],
                "tokens_per_second": round(w["tokens"] / max(w["seconds"], 1e-9), 1), "epoch": epoch}
        _log(m, logs)
        m.window = {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}
    if m.fractions is not None and m.step in m.fractions.targets:
        _load_row(carrier, stack, i)
        m.fractions.on_step_end(None, SimpleNamespace(global_step=m.step), None, model=carrier)
    # when the Trainer's run would checkpoint (`sft.CheckpointClock`): every save_steps, at each
    # save_fractions step, and at least every checkpoint_minutes
    due = (m.step % t.save_steps == 0 or m.step in fraction_steps(t.save_fractions, m.sched.total_steps)
           or (t.checkpoint_minutes is not None and time.monotonic() - m.last_save >= 60 * t.checkpoint_minutes))
    if due and m.step < m.sched.total_steps:
        _checkpoint(m, i, stack)
        m.last_save = time.monotonic()


def _log_state(m: Member) -> SimpleNamespace:
    """The parts of the Trainer's `TrainerState` its logging callbacks read, for model m now."""
    return SimpleNamespace(global_step=m.step, epoch=m.sched.epoch_after(m.step, m.t.gradient_accumulation_steps),
                           is_world_process_zero=True, is_hyper_param_search=False)


def _log(m: Member, logs: dict[str, float]) -> None:
    """One log row of model m to its JSONL log and its TensorBoard events, as `Trainer.log` hands it to both."""
    state = _log_state(m)
    m.logger.on_log(None, state, None, logs=logs)
    m.tensorboard.on_log(None, state, None, logs=logs)


def _end_of_training_logs(m: Member) -> dict[str, float]:
    """What the Trainer logs once training ends (its `speed_metrics` and `train_loss`), over every
    segment of the model's training (the Trainer's: this segment's). Not `total_flos`: the
    Trainer's estimate counts the padded tokens of each batch, which this loop does not keep."""
    t, seconds = m.t, max(m.seconds, 1e-9)
    samples = (m.sched.total_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps if t.max_steps > 0
               else len(m.examples) * t.num_train_epochs)
    return {"train_runtime": round(m.seconds, 4), "train_samples_per_second": round(samples / seconds, 3),
            "train_steps_per_second": round(m.step / seconds, 3), "train_loss": m.loss_sum / max(m.step, 1),
            "epoch": m.sched.epoch_after(m.step, t.gradient_accumulation_steps)}


def _checkpoint(m: Member, i: int, stack: Stack) -> None:
    """Model i's weights, AdamW moments and counters into `checkpoints/joint-<step>/`, atomically;
    older ones beyond `save_total_limit` are removed."""
    tensors = {"param": stack.flat[i].detach().cpu(), "exp_avg": stack.exp_avg[i].cpu(), "exp_avg_sq": stack.exp_avg_sq[i].cpu()}
    state = {"step": m.step, "loss_sum": m.loss_sum, "seconds": m.seconds, "segments": m.segments, "weights": list(stack.layout)}
    with atomic_directory(joint_checkpoint_dir(m.job.out, m.step), overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
        atomic_write_json(tmp / "state.json", state)
    for _, old in joint_checkpoints(m.job.out)[: -m.t.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def last_joint_checkpoint(out: Path) -> tuple[int, Path] | None:
    """The newest joint checkpoint with a readable state.json (written inside the atomic dir)."""
    for step, d in reversed(joint_checkpoints(out)):
        try:
            json.loads((d / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        return step, d
    return None


def _resume(m: Member, i: int, stack: Stack) -> None:
    found = last_joint_checkpoint(m.job.out)
    if found is None:
        return
    step, d = found
    state = json.loads((d / "state.json").read_text())
    if state.get("weights") != list(stack.layout):
        raise TrainingError(f"{d}: this checkpoint holds other weights than the model now trains "
                            "(train.freeze_modules changed?); delete the checkpoints directory to start afresh")
    tensors = load_file(d / "state.safetensors")
    with torch.no_grad():
        stack.flat[i].copy_(tensors["param"])
        stack.exp_avg[i].copy_(tensors["exp_avg"])
        stack.exp_avg_sq[i].copy_(tensors["exp_avg_sq"])
    m.step = m.resumed_from = step
    m.loss_sum, m.seconds, m.segments = state["loss_sum"], state["seconds"], state.get("segments", 1) + 1
    log.info("%s: resuming from %s", m.job.name, d)


def _finish(m: Member, i: int, base: str | Path, carrier: torch.nn.Module, tokenizer: Any, stack: Stack, group: list[str]) -> None:
    """Save model i as `train_model` would: weights, tokenizer, then the completion marker."""
    _load_row(carrier, stack, i)
    t = m.t
    epoch = m.sched.epoch_after(m.step, t.gradient_accumulation_steps)
    summary = training_record(m.job.name, base, m.job.config, m.job.seed, m.examples, m.n_sft, m.step, epoch,
                              m.loss_sum / max(m.step, 1), m.seconds, m.segments, m.resumed_from)
    summary |= {"device": "cuda:0" if stack.flat.is_cuda else "cpu", "precision": "fp32", "workers": 1,
                "executor": "joint", "joint_with": [n for n in group if n != m.job.name]}
    save_final(carrier, tokenizer, m.job.out, summary)
    _log(m, _end_of_training_logs(m))
    m.tensorboard.on_train_end(None, None, None)
    if not t.keep_checkpoints:
        shutil.rmtree(m.job.out / CHECKPOINT_DIR, ignore_errors=True)
