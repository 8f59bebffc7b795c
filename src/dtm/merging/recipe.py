"""The merge YAML: a small form a mergekit user reads at a glance.

    merge_method: linear          # or average, task_arithmetic, ties, dare_ties, wise_ft, fisher ...
    base_model: runs/base         # for methods on task vectors and for LoRA adapters
    models:
      - model: runs/sub-1
        parameters: {weight: 1.0}
      - model: runs/sub-2
    parameters: {density: 0.5, lambda: 1.0}
    dtype: float32                # computation
    out_dtype: bfloat16           # optional

Relative paths are read against the YAML file's directory. Only what dtm does is accepted:
per-model parameters other than `weight`, `slices` and other mergekit keys are refused with
the key and line, not silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dtm.config import key_lines
from dtm.merging.checkpoint import MergeError

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "lora_merge"}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Parse a merge YAML into keyword arguments of `dtm.merge` (models, method, weights, base, ...)."""
    path = Path(path)
    if not path.is_file():
        raise MergeError(f"{path}: merge config not found")
    text = path.read_text(encoding="utf-8")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise MergeError(f"{path}: expected a mapping with merge_method and models")
    lines = key_lines(text)  # dotted keys; top-level ones are what is looked up here

    def where(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else str(path)

    for key in tree:
        if key not in TOP_KEYS:
            raise MergeError(f"{where(key)}: unknown key {key!r}; dtm reads {', '.join(sorted(TOP_KEYS))}")
    here = path.resolve().parent

    def resolve(p: Any, key: str) -> Path:
        if not isinstance(p, str) or not p:
            raise MergeError(f"{where(key)}: {key}: expected a model directory path, got {p!r}")
        q = Path(p)
        return q if q.is_absolute() else here / q

    base = resolve(tree["base_model"], "base_model") if tree.get("base_model") is not None else None
    entries = tree.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeError(f"{where('models')}: models: expected a list of {{model: path, parameters: {{weight: w}}}}")
    models: list[Path] = []
    weights: list[float | None] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeError(f"{where('models')}: models[{i}]: expected {{model: path, parameters: {{weight: w}}}}")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise MergeError(f"{where('models')}: models[{i}]: unknown key(s) {sorted(extra)}")
        model = resolve(entry["model"], f"models[{i}].model")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict) or set(params) - {"weight"}:
            raise MergeError(
                f"{where('models')}: models[{i}].parameters: dtm takes only a per-model 'weight' "
                f"(got {sorted(params) if isinstance(params, dict) else params!r}); put method parameters under the top-level parameters"
            )
        if base is not None and model.resolve() == base.resolve() and "weight" not in params:
            continue  # mergekit lists the base among the models; it is not a merge input
        models.append(model)
        weights.append(params.get("weight"))
    if any(w is None for w in weights) and not all(w is None for w in weights):
        raise MergeError(f"{where('models')}: give a weight to every model or to none")
    parameters = tree.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise MergeError(f"{where('parameters')}: parameters: expected a mapping, e.g. {{density: 0.5}}")
    parameters = dict(parameters)
    method = str(tree.get("merge_method", "average"))
    if "normalize" in parameters:
        if method not in ("linear", "average") or parameters["normalize"] is not True:
            raise MergeError(f"{where('parameters')}: parameters.normalize: dtm always normalizes average weights and never others; remove it")
        parameters.pop("normalize")
    out: dict[str, Any] = {
        "models": models, "method": method, "base": base, "parameters": parameters,
        "weights": None if all(w is None for w in weights) else [float(w) for w in weights],  # type: ignore[arg-type]
    }
    for key in ("dtype", "out_dtype", "lora_merge"):
        if key in tree:
            out[key] = tree[key]
    return out


def merge_with_recipe(recipe: str | Path | None, out: str | Path, models: list[str] | None = None,
                      parameters: dict[str, Any] | None = None, **flags: Any) -> Path:
    """`dtm merge`: the recipe's arguments (if any), then the given models, parameters and
    flags (method, weights, base, dtype, out_dtype, lora_merge, overwrite, allow_pickle, ...)
    on top of them; flags that are None keep the recipe's value."""
    from dtm.merging.engine import merge

    kw: dict[str, Any] = read_recipe(recipe) if recipe else {"models": [], "parameters": {}}
    if models:
        kw["models"] = list(models)
    if not kw["models"]:
        raise MergeError("no models: give MODEL directories or --config merge.yaml")
    kw["parameters"] = {**kw.get("parameters", {}), **(parameters or {})}
    kw |= {key: value for key, value in flags.items() if value is not None}
    return merge(out=out, **kw)
