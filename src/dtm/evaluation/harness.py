"""The scoring engine: log-likelihood multiple choice, greedy generation, perplexity.

One `Scorer` holds one model, or K models of an ensemble that share a tokenizer (the
ensemble's next-token distribution is the average of the members' probabilities). Every
scoring function works on token ids and returns plain numbers; metrics live in `metrics.py`.

Speed. The lab runs hundreds of evaluations of tiny models, where Python overhead, not
FLOPs, is the cost. So:
- multiple choice packs a question's context and *all* its choices into one row: the
  choices sit after the context, each attending to the context and to itself only (a 4D
  attention mask) with position ids restarting after the context, so the context is
  computed once per question and one forward scores a whole batch of questions. A model
  that does not honour custom 4D masks is detected by a probe at load and scored with one
  row per (context, choice) instead, the lm-eval layout;
- rows are length-sorted (longest first, so memory trouble shows at once) and tokenised in
  bulk;
- generation is our own KV-cached greedy loop (not `generate`), batched with left padding,
  because an ensemble must average the members' distributions at every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from dtm import lora_moe
from dtm.errors import DtmError

log = logging.getLogger(__name__)


class NonFiniteScores(DtmError):
    """A model produced nan/inf log-probabilities: its scores would be a silent, wrong accuracy."""

    def __init__(self, message: str, index: int | None = None, step: int | None = None):
        self.index, self.step = index, step  # the prompt and generation step, for the caller's message
        super().__init__(message)


# ---------------------------------------------------------------- loading


@dataclass
class Scorer:
    """Models (one, or an ensemble) + their shared tokenizer, ready to score token ids."""

    models: list[Any]
    tokenizer: Any
    device: torch.device
    max_length: int
    names: list[str]
    share_context: bool = True
    # run a prefix that many prompts of a task share (few-shot examples) once, from a KV cache
    prefix_cache: bool = True
    # put several short multiple-choice questions in one row instead of padding them (`pack_rows`)
    pack_questions: bool = True
    stop_token_ids: set[int] = field(default_factory=set)
    # Identifies the tokenizer by its files, so that the next model with the same ones reuses
    # a task's token ids (`runner.task_encoding`); "" = never reuse (remote tokenizer code).
    tokenizer_key: str = ""

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    @property
    def prefix_id(self) -> int:
        """The token before a text with no context (lm-eval uses the EOT token; BOS where there is one)."""
        tok = self.tokenizer
        for cand in (tok.bos_token_id, tok.eos_token_id, self.pad_id):
            if cand is not None:
                return int(cand)
        return 0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None): the GPU when there is one, else the CPU; any other name as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_max_length(model: Any, tokenizer: Any) -> int:
    """The longest sequence the model takes (lm-eval's rule: config first, then the tokenizer)."""
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        return tml
    return 2048


def _load_one(path: str | os.PathLike, adapter: str | os.PathLike | None, device: torch.device, dtype: str | None, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype or "", None)
    if torch_dtype is None:
        torch_dtype = torch.float32 if device.type == "cpu" else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=torch_dtype)
    except Exception as e:  # noqa: BLE001 - transformers and safetensors raise many types for a damaged directory
        from dtm.io import bad_safetensors

        bad = bad_safetensors(path)
        if bad:
            raise DtmError(bad) from None
        if not isinstance(e, (OSError, ValueError)):
            raise
        raise DtmError(f"{path}: cannot load the model: {e}") from None
    if adapter is not None and lora_moe.is_lora_moe(adapter):
        return lora_moe.load_lora_moe(model, adapter).to(device).eval()
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise DtmError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
        # merged into the weights: exact up to rounding, and as fast as a plain model
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.to(device).eval()


def _load_tokenizer(path: str | os.PathLike, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DtmError(f"{path}: cannot load a tokenizer ({e}); save one next to the model with tokenizer.save_pretrained") from None


def check_vocabulary(where: str | os.PathLike, model: Any, tokenizer: Any) -> None:
    """Refuse a tokenizer whose token ids run past the model's embedding rows (it would score
    garbage or fail with an IndexError deep in the model)."""
    rows = model.get_input_embeddings().weight.shape[0]
    n_tokens = len(tokenizer)
    if n_tokens > rows:
        raise DtmError(f"{where}: the tokenizer has {n_tokens} tokens but the model has {rows} embedding rows; "
                       "use the tokenizer the model was trained with (or resize the model's embeddings and train it)")


def resolve_model_dir(path: str | os.PathLike, adapter: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """-> (full model dir, adapter dir or None). An adapter-only dir names its base model."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path, Path(adapter) if adapter is not None else None
    if lora_moe.is_lora_moe(path):  # experts and routers on a base model its config names
        base = lora_moe.read_config(path)["base_model_name_or_path"]
        if adapter is not None or not (Path(base) / "config.json").is_file():
            raise DtmError(f"{path}: a LoRA-MoE directory whose base {base!r} is not a local model directory "
                           f"(fix base_model_name_or_path in {lora_moe.CONFIG_FILE}), or an adapter was given with it")
        return Path(base), path
    if (path / "adapter_config.json").is_file():
        if adapter is not None:
            raise DtmError(f"{path} is itself an adapter; pass its base model as the model, or drop `adapter`")
        try:
            base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        except (KeyError, json.JSONDecodeError) as e:
            raise DtmError(f"{path}/adapter_config.json: cannot read base_model_name_or_path ({e}); pass the base model and adapter=") from None
        if not base or not (Path(base) / "config.json").is_file():
            raise DtmError(f"{path}: the adapter's base model {base!r} is not a local model directory; pass the base model and adapter=")
        return Path(base), path
    raise DtmError(f"{path}: not a model directory (no config.json) nor a PEFT adapter (no adapter_config.json); pass a `save_pretrained` directory")


# The files a Hugging Face tokenizer is loaded from: same bytes, same token ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def tokenizer_fingerprint(directory: Path) -> str:
    """A hash of the tokenizer files in `directory` (which model dir holds them does not matter)."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.name in TOKENIZER_FILES or p.suffix == ".tiktoken"):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _tokenizer_dir(model_dir: Path, adapter_dir: Path | None) -> Path:
    """The adapter's own tokenizer if it saved one, else the base model's."""
    if adapter_dir is not None and any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return adapter_dir
    return model_dir


def load_scorer(
    model: str | os.PathLike | Sequence[str | os.PathLike],
    adapter: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | None = None,
    share_context: bool | None = None,
    trust_remote_code: bool = False,
) -> Scorer:
    """Load a model directory (or several, an ensemble) and the first one's tokenizer.

    A directory may also be a PEFT adapter (`adapter_config.json`, no `config.json`): it is
    applied to the base model its config names.
    """
    paths = [model] if isinstance(model, (str, os.PathLike)) else list(model)
    if not paths:
        raise DtmError("no model given")
    refs = [resolve_model_dir(p, adapter) for p in paths]
    dev = resolve_device(device)
    tokenizer_dir = _tokenizer_dir(*refs[0])
    tokenizer = _load_tokenizer(tokenizer_dir, trust_remote_code)
    for p, ref in zip(paths[1:], refs[1:], strict=True):
        other = _load_tokenizer(_tokenizer_dir(*ref), trust_remote_code)
        if other.get_vocab() != tokenizer.get_vocab():
            raise DtmError(f"{p}: its tokenizer differs from {paths[0]}'s; an ensemble averages next-token probabilities, so members need one vocabulary")
    models = [_load_one(base, ad, dev, dtype, trust_remote_code) for base, ad in refs]
    sizes = {m.get_output_embeddings().weight.shape[0] for m in models}
    if len(sizes) > 1:
        raise DtmError(f"ensemble members have different vocabulary sizes {sorted(sizes)}")
    for p, m in zip(paths, models, strict=True):
        check_vocabulary(p, m, tokenizer)
    stop_ids = set()
    if tokenizer.eos_token_id is not None:
        stop_ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(models[0], "generation_config", None), "eos_token_id", None)
    stop_ids |= {int(t) for t in ([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))}
    scorer = Scorer(
        models=models, tokenizer=tokenizer, device=dev,
        max_length=min(model_max_length(m, tokenizer) for m in models),
        names=[str(p) for p in paths], stop_token_ids=stop_ids,
        tokenizer_key="" if trust_remote_code else tokenizer_fingerprint(tokenizer_dir),
    )
    scorer.share_context = probe_packing(scorer) if share_context is None else share_context
    return scorer


# ---------------------------------------------------------------- log-probabilities


@torch.inference_mode()
def _token_logprobs(scorer: Scorer, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
                    rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                    prefix: SharedPrefix | None = None, exact_keep: bool = False) -> torch.Tensor:
    """log p(target | prefix) at (row, position) pairs, averaged over the ensemble in probability space.

    With `prefix`, every row continues that shared prefix: its keys and values come from the
    cache (expanded over the batch) and `attention_mask` covers prefix + rows. `exact_keep`:
    logits at exactly the scored positions (rows that pack several questions), else at the
    last positions from the first scored one on (any model that takes an integer)."""
    per_model = []
    # Only the scored positions need logits: the LM head (the biggest matmul of a small model,
    # 49k x 576 on SmolLM2) skips everything else. `logits_to_keep` is the model's own argument:
    # an integer keeps the last n positions; a boolean [B, T] mask (transformers'
    # `slice_logits_to_keep`) keeps exactly the scored ones, for rows of several questions
    # (a model that does not take it fails the packing probe and is scored one row per choice).
    B, T = input_ids.shape
    first = int(positions.min())
    keep: int | torch.Tensor = T - first
    rank = None
    if exact_keep:
        keep = torch.zeros((B, T), dtype=torch.bool, device=input_ids.device)
        keep[rows, positions] = True
        rank = keep.flatten().cumsum(0) - 1  # (row, position) -> its row in the flattened kept logits
    for k, model in enumerate(scorer.models):
        kwargs: dict[str, Any] = {"position_ids": position_ids} if position_ids is not None else {}
        if prefix is not None:
            kwargs[_cache_kwarg(model)] = prefix.cache(k, model, input_ids.shape[0])
        if _accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = keep
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=prefix is not None, **kwargs).logits
        if rank is not None and logits.dim() == 2 and logits.shape[0] == int(rank[-1]) + 1:  # kept positions, row-major
            picked = logits[rank[rows * T + positions]]
        elif logits.dim() == 3 and logits.shape[1] in (T, T - first):  # all positions, or the last ones (an older model)
            picked = logits[rows, positions - (T - logits.shape[1])]
        else:
            raise DtmError(f"{scorer.names[k]}: logits of shape {tuple(logits.shape)} for a batch of {B} x {T} tokens; "
                           "the model handles `logits_to_keep` in a way not known here (pass share_context=False)")
        picked = picked.float().log_softmax(-1)
        per_model.append(picked.gather(-1, targets[:, None]).squeeze(-1))
    if len(per_model) == 1:
        return per_model[0]
    return torch.logsumexp(torch.stack(per_model), 0) - math.log(len(per_model))


def packed_mask(segments: torch.Tensor, dtype: torch.dtype, questions: torch.Tensor | None = None) -> torch.Tensor:
    """Additive [B, 1, T, T] mask from segment ids (0 = context, k = choice k, -1 = padding)
    and, where a row packs several questions, their ids (-1 = padding): a token sees earlier
    tokens of its own segment and its own question's context; padding sees padding."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    key, query = segments[:, None, :], segments[:, :, None]
    allowed = causal & ((key == query) | (key == 0))
    if questions is not None:
        allowed &= questions[:, None, :] == questions[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def packed_length(ctx: Sequence[int], choices: Sequence[Sequence[int]]) -> int:
    """Tokens a question takes in a packed row: its context and each choice but its last token."""
    return len(ctx) + sum(max(len(c) - 1, 0) for c in choices)


def score_packed(scorer: Scorer, items: Sequence[tuple[list[int], list[list[int]]]],
                 prefix: SharedPrefix | None = None, rows_of: Sequence[Sequence[int]] | None = None) -> list[list[float]]:
    """Sum log p(choice | context) for a batch of questions.

    A question is its context, then each choice without its last token (a last token is only a
    target, predicted from the token before it): single-token choices, MMLU's letters, add
    nothing. `rows_of` puts several questions in one row (lists of item indices; default one
    question per row): each sees only itself, its positions restart at 0, so the row is
    padding-free packing and the scores equal one row per question. With `prefix`, each
    question continues the cached shared prefix."""
    dtype = next(scorer.models[0].parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    start = prefix.length if prefix is not None else 0
    layout = [list(r) for r in rows_of] if rows_of is not None else [[i] for i in range(len(items))]
    total = max(sum(packed_length(*items[i]) for i in row) for row in layout)
    ids, pos, seg, qid = [], [], [], []
    rows, positions, targets, owner = [], [], [], []
    first_choice = [0] * len(items)  # index of each question's first choice in the flat choice list
    n_choices = sum(len(choices) for _, choices in items)
    k0 = 0
    for i, (_, choices) in enumerate(items):
        first_choice[i] = k0
        k0 += len(choices)
    for b, row in enumerate(layout):
        row_ids: list[int] = []
        row_pos: list[int] = []
        row_seg: list[int] = []
        row_q: list[int] = []
        for q in row:
            ctx, choices = items[q]
            L, base = len(ctx), len(row_ids)
            row_ids += ctx
            row_pos += range(start, start + L)
            row_seg += [0] * L
            row_q += [q] * L
            for k, choice in enumerate(choices, 1):
                m = len(choice)
                if m == 0:  # nothing to score (a choice whose text added no token)
                    continue
                cursor = len(row_ids)
                row_ids += choice[:-1]
                row_pos += range(start + L, start + L + m - 1)
                row_seg += [k] * (m - 1)
                row_q += [q] * (m - 1)
                rows += [b] * m
                positions.append(base + L - 1)
                positions += range(cursor, cursor + m - 1)
                targets += choice
                owner += [first_choice[q] + k - 1] * m
        pad = total - len(row_ids)
        ids.append(row_ids + [scorer.pad_id] * pad)
        pos.append(row_pos + [0] * pad)
        seg.append(row_seg + [-1] * pad)
        qid.append(row_q + [-1] * pad)
    dev = scorer.device
    several = any(len(row) > 1 for row in layout)
    mask = packed_mask(torch.tensor(seg), dtype, torch.tensor(qid) if several else None)
    if prefix is not None:  # every row (padding too) sees the whole prefix
        mask = torch.cat([torch.zeros((len(layout), 1, total, start), dtype=dtype), mask], -1)
    lp = _token_logprobs(scorer, torch.tensor(ids, device=dev), mask.to(dev), torch.tensor(pos, device=dev),
                         torch.tensor(rows, device=dev), torch.tensor(positions, device=dev), torch.tensor(targets, device=dev),
                         prefix, exact_keep=several)
    sums = torch.zeros(n_choices, dtype=torch.float64).index_add_(0, torch.tensor(owner, dtype=torch.long), lp.double().cpu()).tolist()
    return [sums[first_choice[i]:first_choice[i] + len(choices)] for i, (_, choices) in enumerate(items)]


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices packed into rows of at most `capacity` tokens, first-fit decreasing (longest
    first; ties keep input order, so it is deterministic). An item longer than `capacity`
    gets a row of its own.

    Why our own: the bin packing is ten lines and must be deterministic and index-preserving;
    TRL's and the `binpacking` package's packers work on datasets or lose the order of ties."""
    rows: list[list[int]] = []
    room: list[int] = []
    open_rows: list[int] = []  # rows with room for the shortest item (the others are full)
    shortest = min(lengths, default=0)
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        for r in open_rows:
            if n <= room[r]:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
            open_rows.append(len(rows) - 1)
        open_rows = [r for r in open_rows if room[r] >= shortest]
    return rows


def score_separate(scorer: Scorer, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
    """Sum log p(continuation | context), one right-padded row per (context, continuation)
    (the lm-eval layout: input = (context + continuation)[:-1])."""
    total = max(len(c) + len(t) - 1 for c, t in pairs)
    ids, attn = [], []
    rows, positions, targets, owner = [], [], [], []
    for b, (ctx, cont) in enumerate(pairs):
        seq = (ctx + cont)[:-1]  # the last token is only a target, never an input
        pad = total - len(seq)
        ids.append(seq + [scorer.pad_id] * pad)
        attn.append([1] * len(seq) + [0] * pad)
        L, m = len(ctx), len(cont)
        rows += [b] * m
        positions += range(L - 1, L + m - 1)
        targets += cont
        owner += [b] * m
    ids, attn = torch.tensor(ids), torch.tensor(attn)
    lp = _token_logprobs(scorer, ids.to(scorer.device), attn.to(scorer.device), None,
                         torch.tensor(rows, device=scorer.device), torch.tensor(positions, device=scorer.device),
                         torch.tensor(targets, device=scorer.device))
    return torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, torch.tensor(owner), lp.double().cpu()).tolist()


def probe_packing(scorer: Scorer) -> bool:
    """Does this model honour a custom 4D mask with position ids? Compare packed scores with
    one-row-per-choice scores on a made-up question; fall back to the latter if they differ."""
    vocab = scorer.models[0].get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, vocab, (7,), generator=g).tolist()
    choices = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 1, 4)]
    other = (torch.randint(3, vocab, (5,), generator=g).tolist(), [torch.randint(3, vocab, (2,), generator=g).tolist()])
    try:  # two questions in one row, as `score_choices` packs them
        both = score_packed(scorer, [other, (ctx, choices)], rows_of=[[0, 1]])
    except Exception as e:  # any model that rejects 4D masks or position ids
        log.info("packed scoring unsupported (%s); scoring one row per choice", e)
        return False
    packed = both[0] + both[1]
    separate = score_separate(scorer, [(other[0], other[1][0])] + [(ctx, c) for c in choices])
    ok = all(abs(a - b) < 1e-3 * max(1.0, abs(b)) for a, b in zip(packed, separate, strict=True))
    if not ok:
        log.info("packed scores differ from per-choice scores for %s; scoring one row per choice", scorer.names[0])
    return ok


# ---------------------------------------------------------------- shared prefixes (few-shot)

# Few-shot prompts repeat the same examples before every question of a task (5-shot MMLU: the
# same ~500 tokens per subject; GSM8K's 8-shot prompt for every question). The prefix is
# computed once, its keys and values kept, and only each question's suffix is run, batched
# over the cache expanded along the batch. Shorter shared prefixes than this are not worth
# a cache copy per batch.
MIN_SHARED_PREFIX = 32


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_groups(seqs: Sequence[Sequence[int]], min_prefix: int = MIN_SHARED_PREFIX) -> list[tuple[int, list[int]]]:
    """Indices grouped by a shared token prefix -> [(prefix length, indices)].

    In lexicographic order, a run of sequences that share at least `min_prefix` tokens with
    the run's first one is a group; its prefix is what its first and last members share (in
    sorted order, what all share), cut so that every member keeps at least one token of its
    own (the token the first target is predicted from). Everything else goes in one group
    with prefix length 0 (scored without a cache).
    """
    order = sorted(range(len(seqs)), key=lambda i: (tuple(seqs[i]), i))
    groups: list[tuple[int, list[int]]] = []
    plain: list[int] = []
    s = 0
    while s < len(order):
        e = s + 1
        while e < len(order) and common_prefix_len(seqs[order[s]], seqs[order[e]]) >= min_prefix:
            e += 1
        members = order[s:e]
        shared = min(common_prefix_len(seqs[members[0]], seqs[members[-1]]), min(len(seqs[i]) for i in members) - 1)
        if len(members) > 1 and shared >= min_prefix:
            groups.append((shared, sorted(members)))
        else:
            plain += members
        s = e
    if plain:
        groups.append((0, sorted(plain)))
    return groups


@dataclass
class SharedPrefix:
    """The keys and values of a token prefix, per model and layer (batch dimension 1)."""

    length: int
    kv: list[list[tuple[torch.Tensor, torch.Tensor]]]

    def cache(self, k: int, model: Any, batch: int) -> Any:
        """A fresh cache for model `k` holding the prefix for `batch` rows (the forward appends to it)."""
        from transformers import DynamicCache

        return DynamicCache([(key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)) for key, value in self.kv[k]],
                            config=model.config)


@torch.inference_mode()
def encode_prefix(scorer: Scorer, ids: list[int]) -> SharedPrefix | None:
    """Run every model on `ids` once and keep the keys and values; None where a model's cache
    is not a plain per-layer key/value store (sliding windows, recurrent state, ...): those
    are scored without a prefix cache."""
    from transformers.cache_utils import DynamicLayer

    kv = []
    x = torch.tensor([ids], device=scorer.device)
    for model in scorer.models:
        name = _cache_kwarg(model)
        extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        try:
            res = model(input_ids=x, use_cache=True, **extra)
        except Exception as e:  # noqa: BLE001 - a model without a usable cache: score without one
            log.info("no prefix cache for %s (%s)", scorer.names[0], e)
            return None
        cache = getattr(res, name, None)
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return None
        kv.append([(layer.keys, layer.values) for layer in layers])
    return SharedPrefix(len(ids), kv)


# ---------------------------------------------------------------- batching helpers


def batches_by_length(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches, longest first (ties keep input order: deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def truncate_mc(ctx: list[int], choices: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Fit context + the longest choice into `max_length` by dropping context tokens from the
    left (at least one context token stays; an over-long choice keeps its first tokens)."""
    longest = max(len(c) for c in choices)
    if len(ctx) + longest <= max_length:
        return ctx, choices, False
    keep_choice = min(longest, max_length - 1)
    choices = [c[:keep_choice] for c in choices]
    keep_ctx = max(1, max_length - keep_choice)
    return ctx[-keep_ctx:], choices, True


def score_choices(scorer: Scorer, items: Sequence[tuple[list[int], list[list[int]]]], batch_size: int,
                  progress: bool = False, desc: str = "mc") -> list[list[float]]:
    """log p(choice | context) for every question's choices (items already fit max_length).

    Packed scoring runs a shared context prefix (few-shot examples) once per group of
    questions (`prefix_groups`) when `scorer.prefix_cache` is on."""
    results: list[list[float]] = [[] for _ in items]
    if scorer.share_context:
        bar = _progress(len(items), desc, progress)
        groups = prefix_groups([ctx for ctx, _ in items]) if scorer.prefix_cache else [(0, list(range(len(items))))]
        for shared, members in groups:
            prefix = encode_prefix(scorer, items[members[0]][0][:shared]) if shared else None
            cut = prefix.length if prefix is not None else 0
            sub = [(items[i][0][cut:], items[i][1]) for i in members]
            lengths = [packed_length(c, ch) for c, ch in sub]
            # Padding-free packing: short questions share a row up to the longest question's
            # length, so a batch is at most batch_size x that many tokens, as without packing.
            layout = pack_rows(lengths, max(lengths)) if scorer.pack_questions else [[j] for j in range(len(sub))]
            for batch in batches_by_length([sum(lengths[j] for j in row) for row in layout], batch_size):
                qs = [j for r in batch for j in layout[r]]
                local = {j: n for n, j in enumerate(qs)}
                scored = score_packed(scorer, [sub[j] for j in qs], prefix, [[local[j] for j in layout[r]] for r in batch])
                for j, scores in zip(qs, scored, strict=True):
                    results[members[j]] = scores
                bar.update(len(qs))
    else:
        pairs = [(i, j, ctx, cont) for i, (ctx, choices) in enumerate(items) for j, cont in enumerate(choices)]
        for i, (_, choices) in enumerate(items):
            results[i] = [0.0] * len(choices)
        bar = _progress(len(pairs), desc, progress)
        lengths = [len(p[2]) + len(p[3]) for p in pairs]
        for batch in batches_by_length(lengths, batch_size):
            scores = score_separate(scorer, [(pairs[k][2], pairs[k][3]) for k in batch])
            for k, s in zip(batch, scores, strict=True):
                results[pairs[k][0]][pairs[k][1]] = s
            bar.update(len(batch))
    bar.close()
    return results


# ---------------------------------------------------------------- generation


@dataclass
class _StopCheck:
    stop: list[str]

    def cut(self, text: str) -> tuple[str, bool]:
        """Text up to the first stop sequence, and whether one was found."""
        hits = [text.find(s) for s in self.stop if s and s in text]
        if not hits:
            return text, False
        return text[:min(hits)], True


def generate_greedy(scorer: Scorer, prompts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = (),
                    batch_size: int = 16, progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy continuations of token-id prompts, cut at EOS or the first stop sequence.

    Prompts must already fit `max_length - max_new_tokens` (see `truncate_left`). Batched with
    left padding and a KV cache per model; an ensemble picks argmax of the averaged probabilities.
    A prefix many prompts share (few-shot examples) is run once per group (`prefix_groups`)
    and each batch starts from its cache: [prefix][padding][prompt's own tokens].
    """
    check = _StopCheck(list(stop))
    out: list[str] = [""] * len(prompts)
    bar = _progress(len(prompts), desc, progress)
    groups = prefix_groups(prompts) if scorer.prefix_cache else [(0, list(range(len(prompts))))]
    for shared, members in groups:
        prefix = encode_prefix(scorer, list(prompts[members[0]][:shared])) if shared else None
        cut = prefix.length if prefix is not None else 0
        sub = [list(prompts[i][cut:]) for i in members]
        for batch in batches_by_length([len(p) for p in sub], batch_size):
            try:
                texts = _generate_batch(scorer, [sub[j] for j in batch], prefix, max_new_tokens, check)
            except NonFiniteScores as e:  # name the prompt by its index in `prompts`
                index = members[batch[e.index or 0]]
                raise NonFiniteScores(f"{', '.join(scorer.names)}: non-finite logits (nan/inf) for prompt {index} at generation step {e.step}",
                                      index, e.step) from None
            for j, text in zip(batch, texts, strict=True):
                out[members[j]] = text
            bar.update(len(batch))
    bar.close()
    return out


@torch.inference_mode()
def _generate_batch(scorer: Scorer, prompts: list[list[int]], prefix: SharedPrefix | None, max_new_tokens: int,
                    check: _StopCheck) -> list[str]:
    """One batch of `generate_greedy` (prompts continue `prefix` when one is given)."""
    tok = scorer.tokenizer
    eos = torch.tensor(sorted(scorer.stop_token_ids), dtype=torch.long, device=scorer.device)
    cache_names = [_cache_kwarg(m) for m in scorer.models]
    last_only = [{"logits_to_keep": 1} if _accepts(m, "logits_to_keep") else {} for m in scorer.models]
    B = len(prompts)
    T = max(len(p) for p in prompts)
    ids = torch.full((B, T), scorer.pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        attn[b, T - len(p):] = 1
    caches: list[Any] = [None] * len(scorer.models)
    if prefix is not None:
        attn = torch.cat([torch.ones((B, prefix.length), dtype=attn.dtype), attn], 1)
        caches = [prefix.cache(k, m, B) for k, m in enumerate(scorer.models)]
    ids, attn = ids.to(scorer.device), attn.to(scorer.device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, -T:]
    generated: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=scorer.device)
    step_ids = ids
    for step in range(max_new_tokens):
        per_model = []
        for k, (model, name) in enumerate(zip(scorer.models, cache_names, strict=True)):
            res = model(input_ids=step_ids, attention_mask=attn, position_ids=pos, use_cache=True, **{name: caches[k]}, **last_only[k])
            caches[k] = getattr(res, name)
            per_model.append(res.logits[:, -1].float().log_softmax(-1))
        logp = per_model[0] if len(per_model) == 1 else torch.logsumexp(torch.stack(per_model), 0)
        finite = torch.isfinite(logp).all(-1) | done
        if not bool(finite.all()):
            raise NonFiniteScores("non-finite logits", int((~finite).nonzero()[0]), step + 1)  # the caller names the prompt
        nxt = logp.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, scorer.pad_id), nxt)
        hit_eos = torch.isin(nxt, eos) if len(eos) else torch.zeros_like(done)
        for b in (~done & ~hit_eos).nonzero().flatten().tolist():
            generated[b].append(int(nxt[b]))
            if check.stop:
                _, found = check.cut(tok.decode(generated[b], skip_special_tokens=True))
                if found:
                    done[b] = True
        done |= hit_eos
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=attn.device)], 1)
        pos = pos[:, -1:] + 1
    return [check.cut(tok.decode(g, skip_special_tokens=True))[0] for g in generated]


def _accepts(model: Any, name: str) -> bool:
    """Does `model.forward` take the keyword `name`? (cached per model class)"""
    return name in _forward_params(type(model))


@lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(cls.forward).parameters)


def _cache_kwarg(model: Any) -> str:
    """transformers >= 5.2x calls the KV cache `cache`; earlier versions `past_key_values`."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def truncate_left(ids: list[int], limit: int) -> tuple[list[int], bool]:
    limit = max(1, limit)
    return (ids[-limit:], True) if len(ids) > limit else (ids, False)


# ---------------------------------------------------------------- perplexity


def rolling_windows(tokens: list[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint prediction windows over a text: (input ids, target ids), each at most
    `max_length`; the first token is predicted from `prefix_id` (lm-eval's rolling loglik)."""
    seq = [prefix_id] + tokens
    return [(seq[s:s + len(tokens[s:s + max_length])], tokens[s:s + max_length]) for s in range(0, len(tokens), max_length)]


def score_texts(scorer: Scorer, texts: Sequence[list[int]], batch_size: int, progress: bool = False) -> list[float]:
    """Total log-likelihood of each token sequence (rolling windows past max_length)."""
    windows: list[tuple[int, list[int], list[int]]] = []
    for i, toks in enumerate(texts):
        for inp, tgt in rolling_windows(toks, scorer.prefix_id, scorer.max_length):
            windows.append((i, inp, tgt))
    totals = [0.0] * len(texts)
    bar = _progress(len(windows), "perplexity", progress)
    for batch in batches_by_length([len(w[1]) for w in windows], batch_size):
        # a window scores its targets from an empty context: context = first input token
        pairs = [([windows[k][1][0]], windows[k][2]) for k in batch]
        for k, s in zip(batch, score_separate(scorer, pairs), strict=True):
            totals[windows[k][0]] += s
        bar.update(len(batch))
    bar.close()
    return totals
