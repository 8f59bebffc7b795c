"""The merge YAML: mergekit's format, for the methods dtm shares with it.

    merge_method: ties            # linear, task_arithmetic, ties, dare_linear, dare_ties; or dtm's
    base_model: runs/base         #   average, wise_ft, fisher ...
    models:
      - model: runs/base          # mergekit lists the base among the models: it is not an input
      - model: runs/sub-1
        parameters: {weight: 1.0, density: 0.5}   # per-model density, as mergekit allows
      - model: runs/sub-2
        parameters: {weight: 0.5}
    parameters: {density: 0.7, lambda: 1.0, normalize: true}   # defaults for every model
    dtype: bfloat16               # mergekit: the computation and output dtype
    out_dtype: bfloat16           # optional

A mergekit recipe for a shared method runs unchanged and computes the same merge. Two
differences, both deliberate: dtm always computes in float32 (or float64), so `dtype: bfloat16`
means "write bfloat16" (as mergekit, `dtype` is the output dtype unless `out_dtype` says
otherwise) with one rounding at the end; and DARE rescales survivors by 1/density (see
`methods.dare_drop`). Relative paths are read against the YAML file's directory. Whatever dtm
does not do (`slices`, `tokenizer_source`, gradient or filtered parameter values, ...) is refused
with the key and its line, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dtm.config import key_lines
from dtm.merging.checkpoint import TORCH_DTYPES, MergeError

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "lora_merge"}
# mergekit keys dtm does not read, and why (refused by name)
MERGEKIT_ONLY = {
    "slices": "dtm merges whole models (no layer slices or frankenmerges)",
    "modules": "dtm merges whole models (no per-module configs)",
    "tokenizer_source": "dtm copies the first model's tokenizer (the base's for adapters); build a union tokenizer yourself",
    "tokenizer": "dtm copies the first model's tokenizer (the base's for adapters)",
    "chat_template": "dtm copies the first model's tokenizer and chat template",
    "embed_slerp": "dtm has no slerp",
}
MODEL_PARAMS = {"weight", "density"}
IGNORED_PARAMS = {"int8_mask"}  # mergekit's memory saving for masks; dtm's masks are boolean already


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
    lines = key_lines(text)

    def where(key: str) -> str:
        while key and key not in lines:
            key = key.rpartition(".")[0]
        return f"{path}:{lines[key]}" if key in lines else str(path)

    for key in tree:
        if key in MERGEKIT_ONLY:
            raise MergeError(f"{where(key)}: {key!r} is a mergekit key dtm does not support: {MERGEKIT_ONLY[key]}")
        if key not in TOP_KEYS:
            raise MergeError(f"{where(key)}: unknown key {key!r}; dtm reads {', '.join(sorted(TOP_KEYS))}")
    here = path.resolve().parent

    def resolve(p: Any, key: str) -> Path:
        if not isinstance(p, str) or not p:
            raise MergeError(f"{where(key)}: {key}: expected a model directory path, got {p!r}")
        q = Path(p)
        q = q if q.is_absolute() else here / q
        if "+" in p and not q.exists():
            raise MergeError(f"{where(key)}: {key}: {p!r}: mergekit's 'model+lora' syntax is not supported; "
                             "merge the LoRA adapter directories themselves (dtm merges adapters on their base)")
        return q

    def scalar(value: Any, key: str) -> Any:
        if isinstance(value, (list, dict)):
            raise MergeError(f"{where(key)}: {key}: {value!r}: dtm takes one value per parameter "
                             "(mergekit's gradients and filtered values are not supported)")
        return value

    base = resolve(tree["base_model"], "base_model") if tree.get("base_model") is not None else None
    parameters = tree.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise MergeError(f"{where('parameters')}: parameters: expected a mapping, e.g. {{density: 0.5}}")
    parameters = {k: scalar(v, f"parameters.{k}") for k, v in parameters.items() if k not in IGNORED_PARAMS}
    default_weight = parameters.pop("weight", None)
    entries = tree.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeError(f"{where('models')}: models: expected a list of {{model: path, parameters: {{weight: w}}}}")
    models: list[Path] = []
    weights: list[Any] = []
    densities: list[Any] = []
    for i, entry in enumerate(entries):
        at = f"models.{i}"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeError(f"{where(at)}: models[{i}]: expected {{model: path, parameters: {{weight: w}}}}")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise MergeError(f"{where(at)}: models[{i}]: unknown key(s) {sorted(extra)}")
        model = resolve(entry["model"], f"{at}.model")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergeError(f"{where(at)}: models[{i}].parameters: expected a mapping, e.g. {{weight: 1.0}}")
        params = {k: v for k, v in params.items() if k not in IGNORED_PARAMS}
        for key in params:
            if key not in MODEL_PARAMS:
                raise MergeError(
                    f"{where(f'{at}.parameters.{key}')}: models[{i}].parameters.{key}: dtm takes a per-model "
                    f"'weight' and 'density'; put other method parameters under the top-level parameters"
                )
            scalar(params[key], f"{at}.parameters.{key}")
        if base is not None and model.resolve() == base.resolve() and "weight" not in params:
            continue  # mergekit lists the base among the models; it is not a merge input
        models.append(model)
        weights.append(params.get("weight", default_weight))
        densities.append(params.get("density"))
    if any(w is None for w in weights) and not all(w is None for w in weights):
        raise MergeError(f"{where('models')}: give a weight to every model or to none")
    if any(d is not None for d in densities):
        default = parameters.get("density", 1.0)
        parameters["density"] = [float(default if d is None else d) for d in densities]
    method = str(tree.get("merge_method", "average"))
    from dtm.merging.methods import method_names

    if method not in method_names():
        raise MergeError(f"{where('merge_method')}: merge_method: unknown merge method {method!r}; "
                         f"choose one of {', '.join(method_names())}")
    for i, w in enumerate(weights):
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float))):
            raise MergeError(f"{where(f'models.{i}.parameters.weight')}: models[{i}].parameters.weight: {w!r} is not a number")
    if method in ("linear", "average") and "normalize" in parameters:
        if parameters["normalize"] is not True:
            raise MergeError(f"{where('parameters.normalize')}: parameters.normalize: dtm always normalizes average weights; remove it")
        parameters.pop("normalize")
    out: dict[str, Any] = {
        "models": models, "method": method, "base": base, "parameters": parameters,
        "weights": None if all(w is None for w in weights) else [float(w) for w in weights],
    }
    for key in ("dtype", "out_dtype", "lora_merge"):
        if key in tree:
            out[key] = tree[key]
    for key in ("dtype", "out_dtype"):
        if key in out and out[key] not in TORCH_DTYPES:
            raise MergeError(f"{where(key)}: {key}: unknown dtype {out[key]!r}; use one of {', '.join(TORCH_DTYPES)}")
    if "dtype" in out:
        # mergekit computes in `dtype` and writes it unless out_dtype is set; dtm computes in
        # float32 at least and writes that dtype (one rounding at the end instead of one per op)
        out.setdefault("out_dtype", out["dtype"])
        if out["dtype"] not in ("float32", "float64"):
            out["dtype"] = "float32"
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
