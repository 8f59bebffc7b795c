"""The run directory: the one module that spells its paths, its model names and its manifests.

    <output_dir>/                        RunDir
      config.json                        the resolved config the run was made with
      manifests/report.json              the report stage's record
      report.md, report.html, *.png      the report (written by `dtm.report`)
      seed-<s>/                          one seed's run (SeedRun)
      control-nobias/seed-<s>/           the lab's no-bias control, first `lab.control_seeds` seeds
      sweep/<cell>/                      a sweep's cells (`sweep:` in the config), each a RunDir of its own:
                                         `center` (the main config) and `key=value[,key=value]` cells;
                                         the sweep's report is the top report.md

    seed-<s>/                            SeedRun
      lab/                               the lab's SFT data and task files (lab runs only)
      data/train.jsonl, validation.jsonl the hold-out split (`data.val_size`)
      portions/portion-<k>.jsonl         the dispersal (`dtm.dispersal.portion_path`), stats.json
      models/<name>/                     one `save_pretrained` directory per model (names below)
      fisher/<name>.safetensors          a sub-model's diagonal Fisher (`merge.method: fisher`)
      eval/<name>.json                   one result file per evaluated model
      diagnostics/token_losses.json      the token-level diagnostic on vanilla's snapshots (`eval.token_losses`)
      manifests/<stage>.json             what each stage did (`write_manifest`)
      reused.json                        in a sweep's cell: model or stage -> the sibling it was linked from
      manifests/<stage>.attempts.json    while a stage runs: the seconds of its attempts so far

    models/<name>/                       a trained model (written by `dtm.training`)
      training_complete.json             written last: a directory without it is unfinished
      train_log.jsonl, logs/             JSONL and TensorBoard logs
      checkpoints/                       while training (kept with `train.keep_checkpoints`)
      fractions/frac-0.10/               snapshots along training, fractions/fractions.json

Model names (the directory under `models/` and the file under `eval/`):
  base            the base model (evaluated, not written)
  sub-1..sub-K    one per portion                 DTM          the merge of the sub-models
  vanilla         all data, K=1                   vanilla@0.10 its snapshot at a fraction of training
  short           all data, 1/K of the compute    soup-2..     the soup's other ingredients
  soup            uniform soup of short-like runs wise_ft-0.5  base/vanilla interpolation
  ensemble        the sub-models' averaged outputs (evaluated, not written)
  l2, ewc, replay, curation, lora_moe             training baselines

Nothing here imports torch: `dtm status` and the report read a run without it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm.errors import DtmError
from dtm.io import atomic_write_json

# ---------------------------------------------------------------- model names

BASE = "base"
VANILLA = "vanilla"
SHORT = "short"
SOUP = "soup"
DTM = "DTM"
ENSEMBLE = "ensemble"
SUB_PREFIX = "sub-"
SOUP_PREFIX = "soup-"
WISE_FT_PREFIX = "wise_ft-"
TRAINING_BASELINES = ("l2", "ewc", "replay", "curation", "lora_moe")  # `baselines.methods` trained on all the data


def sub_model_name(index: int) -> str:
    """sub-1 .. sub-K (index is 0-based, like `dtm.dispersal.portion_path`)."""
    return f"{SUB_PREFIX}{index + 1}"


def is_sub_model(name: str) -> bool:
    return name.startswith(SUB_PREFIX) and name.removeprefix(SUB_PREFIX).isdigit()


def sub_models(names: Iterable[str]) -> list[str]:
    """The sub-model names among `names`, in numeric order (sub-2 before sub-10)."""
    return sorted((n for n in names if is_sub_model(n)), key=lambda n: int(n.removeprefix(SUB_PREFIX)))


def soup_ingredient_name(index: int) -> str:
    """The soup's ingredients: `short` is the first (index 0), then soup-2, soup-3, ..."""
    return SHORT if index == 0 else f"{SOUP_PREFIX}{index + 1}"


def is_soup_ingredient(name: str) -> bool:
    return name.startswith(SOUP_PREFIX) and name.removeprefix(SOUP_PREFIX).isdigit()


def soup_ingredients(names: Iterable[str]) -> list[str]:
    """`short` and soup-2.. among `names`, in soup order."""
    names = list(names)
    rest = sorted((n for n in names if is_soup_ingredient(n)), key=lambda n: int(n.removeprefix(SOUP_PREFIX)))
    return [n for n in names if n == SHORT] + rest


def wise_ft_name(alpha: float) -> str:
    return f"{WISE_FT_PREFIX}{alpha:g}"


def is_wise_ft(name: str) -> bool:
    return name.startswith(WISE_FT_PREFIX)


def snapshot_name(label: str) -> str:
    """vanilla's snapshot at a fraction of training: `vanilla@0.10` (label as in `frac-0.10`)."""
    return f"{VANILLA}@{label}"


def is_snapshot(name: str) -> bool:
    return name.startswith(VANILLA + "@")


def snapshot_fraction(name: str) -> float:
    """0.0 for the base, 1.0 for vanilla, f for vanilla@f: where a model lies on the tax curve."""
    if name == BASE:
        return 0.0
    if name == VANILLA:
        return 1.0
    return float(name.split("@", 1)[1])


# ---------------------------------------------------------------- a trained model's directory

COMPLETE_FILE = "training_complete.json"
LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "logs"
CHECKPOINT_DIR = "checkpoints"
RAY_TRAIN_DIR = ".ray_train"  # Ray Train's run records while a data-parallel model trains (removed after)
FRACTION_DIR = "fractions"
FRACTIONS_FILE = "fractions.json"
FRACTION_PREFIX = "frac-"
ATTEMPTS_FILE = "attempts.jsonl"  # one row per attempt that resumed an interrupted one (node lost, run killed)


def is_complete(model_dir: str | Path) -> bool:
    """A model directory is finished only once its completion marker exists."""
    return (Path(model_dir) / COMPLETE_FILE).is_file()


def is_merged(model_dir: str | Path) -> bool:
    """A merged model is written atomically (`io.atomic_directory`): one that has its config is complete."""
    return (Path(model_dir) / "config.json").is_file() or (Path(model_dir) / "adapter_config.json").is_file()


def training_summary(model_dir: str | Path) -> dict[str, Any] | None:
    """What training recorded when it finished (steps, examples, tokens, seconds, config), or None."""
    path = Path(model_dir) / COMPLETE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def train_log(model_dir: str | Path) -> Path:
    """Every training log row (step, loss, lr, ...): `model/train_log.jsonl`."""
    return Path(model_dir) / LOG_FILE


def attempts_file(model_dir: str | Path) -> Path:
    """The attempts that resumed an interrupted training of this model and the steps each redid."""
    return Path(model_dir) / ATTEMPTS_FILE


def fraction_dir(model_dir: str | Path, fraction: float) -> Path:
    """Where the snapshot at `fraction` of training lives: `model/fractions/frac-0.10/`."""
    return Path(model_dir) / FRACTION_DIR / f"{FRACTION_PREFIX}{fraction:.2f}"


def fraction_dirs(model_dir: str | Path) -> list[tuple[str, Path]]:
    """(label, dir) of every snapshot written, in order of their label ('0.10', ...)."""
    return [(d.name.removeprefix(FRACTION_PREFIX), d) for d in sorted((Path(model_dir) / FRACTION_DIR).glob(FRACTION_PREFIX + "*"))]


def fractions_file(model_dir: str | Path) -> Path:
    """Train (and validation) loss at step 0 and at every snapshot: `fractions/fractions.json`."""
    return Path(model_dir) / FRACTION_DIR / FRACTIONS_FILE


JOINT_CHECKPOINT_PREFIX = "joint-"


def joint_checkpoint_dir(model_dir: str | Path, step: int) -> Path:
    """A model's checkpoint written by the joint executor after `step`: `checkpoints/joint-<step>/`."""
    return Path(model_dir) / CHECKPOINT_DIR / f"{JOINT_CHECKPOINT_PREFIX}{step}"


def joint_checkpoints(model_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every joint checkpoint of a model, oldest first (unfinished ones included)."""
    found = []
    for d in (Path(model_dir) / CHECKPOINT_DIR).glob(JOINT_CHECKPOINT_PREFIX + "*"):
        tail = d.name.removeprefix(JOINT_CHECKPOINT_PREFIX)
        if tail.isdigit():
            found.append((int(tail), d))
    return sorted(found)


# ---------------------------------------------------------------- manifests

MANIFEST_DIR = "manifests"


def manifest_path(root: str | Path, stage: str) -> Path:
    """Where a stage records what it did: a seed run's stages in its dir, the report in the run's."""
    return Path(root) / MANIFEST_DIR / f"{stage}.json"


def read_manifest(root: str | Path, stage: str) -> dict[str, Any] | None:
    """A stage's manifest, or None when the stage has not finished; a damaged one is a `DtmError` naming it."""
    path = manifest_path(root, stage)
    if not path.is_file():
        return None
    fix = f"delete it and the {stage} stage is redone (treated as not done) by the next `dtm run`"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DtmError(f"{path}: the {stage} stage's manifest is not valid JSON ({e}; truncated or edited?); {fix}") from None
    if not isinstance(manifest, dict):
        raise DtmError(f"{path}: the {stage} stage's manifest is not a JSON object (not written by dtm?); {fix}")
    return manifest


def manifest_outputs(root: str | Path, stage: str) -> dict[str, Any]:
    """The `outputs` a finished stage recorded ({} if it has no manifest yet)."""
    return (read_manifest(root, stage) or {}).get("outputs", {})


def write_manifest(root: str | Path, stage: str, hash: str, seconds: float, outputs: dict[str, Any], attempts: int = 1) -> Path:
    """Record a finished stage (written last, atomically: a stage without a manifest is unfinished);
    `seconds` cover all its `attempts` (a killed attempt's too)."""
    return atomic_write_json(manifest_path(root, stage), {
        "stage": stage, "hash": hash, "seconds": round(seconds, 2), "attempts": attempts,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": outputs})


def attempts_path(root: str | Path, stage: str) -> Path:
    """While a stage runs: the seconds of its attempts so far (a killed attempt's included)."""
    return Path(root) / MANIFEST_DIR / f"{stage}.attempts.json"


HEARTBEAT_SECONDS = 5.0  # how much of a killed attempt's time may go uncounted


# ---------------------------------------------------------------- one seed's run


class StageRecords:
    """A directory whose stages record what they did in `manifests/<stage>.json` (a seed's run:
    its five stages; the whole run: the report)."""

    root: Path

    def manifest_path(self, stage: str) -> Path:
        return manifest_path(self.root, stage)

    def manifest(self, stage: str) -> dict[str, Any] | None:
        return read_manifest(self.root, stage)

    def outputs(self, stage: str) -> dict[str, Any]:
        return manifest_outputs(self.root, stage)

    def write_manifest(self, stage: str, hash: str, seconds: float, outputs: dict[str, Any], attempts: int = 1) -> Path:
        return write_manifest(self.root, stage, hash, seconds, outputs, attempts)

    def attempts_path(self, stage: str) -> Path:
        return attempts_path(self.root, stage)

    def earlier_attempts(self, stage: str) -> tuple[float, int]:
        """(seconds, count) of the attempts at `stage` that ended without finishing it (0, 0 if none or unreadable)."""
        try:
            rec = json.loads(self.attempts_path(stage).read_text(encoding="utf-8"))
            return float(rec["seconds"]), int(rec["attempts"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0, 0

    def record_attempts(self, stage: str, seconds: float, attempts: int) -> None:
        atomic_write_json(self.attempts_path(stage), {"stage": stage, "seconds": round(seconds, 2), "attempts": attempts})

    @contextmanager
    def attempt(self, stage: str, interval: float = HEARTBEAT_SECONDS) -> Iterator[Callable[[], tuple[float, int]]]:
        """Time one attempt at `stage`, added to the attempts before it; yields () -> (seconds, attempts).

        A `kill -9` runs no cleanup, so the seconds so far are written every `interval` seconds (by
        a thread) to the stage's attempts record, which the next attempt reads: a stage's seconds
        in its manifest are those of all its attempts, as the report's compute table needs."""
        before, attempts = self.earlier_attempts(stage)
        t0 = time.perf_counter()

        def so_far() -> tuple[float, int]:
            return before + time.perf_counter() - t0, attempts + 1

        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                self.record_attempts(stage, *so_far())

        thread = threading.Thread(target=beat, name=f"dtm-{stage}-clock", daemon=True)
        thread.start()
        try:
            yield so_far
        except BaseException:
            stop.set()
            thread.join()
            self.record_attempts(stage, *so_far())  # failed: the next attempt counts this one's time
            raise
        finally:
            stop.set()
            thread.join()


@dataclass(frozen=True)
class SeedRun(StageRecords):
    """One seed's run directory: `<output_dir>/seed-<s>/` (or `control-nobias/seed-<s>/`)."""

    root: Path
    seed: int
    control: bool = False  # the lab's no-bias control

    @property
    def label(self) -> str:
        """How status and logs name it: `seed-1`, `control-nobias/seed-1`."""
        return f"{CONTROL_DIR}/{self.root.name}" if self.control else self.root.name

    # inputs
    @property
    def lab(self) -> Path:
        return self.root / "lab"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_split(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def validation_split(self) -> Path:
        return self.data_dir / "validation.jsonl"

    @property
    def portions(self) -> Path:
        return self.root / "portions"

    def portion(self, index: int) -> Path:
        """Portion `index` (0-based); the file name is the dispersal's own (`portion_path`)."""
        from dtm.dispersal import portion_path

        return portion_path(self.portions, index)

    # models
    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> Path:
        return self.models / name

    def sub_model(self, index: int) -> Path:
        return self.model(sub_model_name(index))

    @property
    def fisher_dir(self) -> Path:
        """Each sub-model's diagonal Fisher, for `merge.method: fisher` (the merge stage's)."""
        return self.root / "fisher"

    def fisher_file(self, name: str) -> Path:
        return self.fisher_dir / f"{name}.safetensors"

    # evaluation
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_result(self, name: str) -> Path:
        return self.eval_dir / f"{name}.json"

    def eval_results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """model -> task -> result, from every `eval/<model>.json`."""
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.eval_dir.glob("*.json"))}

    @property
    def reused_file(self) -> Path:
        """What a sweep linked into this run from a sibling cell instead of making it again."""
        return self.root / "reused.json"

    def reused(self) -> dict[str, str]:
        """model (or `stage:<name>`) -> the directory it was linked from ({} if nothing was)."""
        return json.loads(self.reused_file.read_text()) if self.reused_file.is_file() else {}

    @property
    def diagnostics_dir(self) -> Path:
        """Diagnostics the eval stage computes besides the benchmarks."""
        return self.root / "diagnostics"

    @property
    def token_losses_file(self) -> Path:
        """Which tokens' training loss fell most between vanilla's snapshots (`eval.token_losses`)."""
        return self.diagnostics_dir / "token_losses.json"

    def finished(self, stage: str, names: Iterable[str], tasks: int = 0) -> list[str]:
        """Which of the models `names` a stage has finished: trained (completion marker), merged (its
        config), evaluated (a result file with at least `tasks` results); for `dtm status`'s progress."""
        def evaluated(name: str) -> bool:
            try:
                return len(json.loads(self.eval_result(name).read_text(encoding="utf-8"))) >= tasks
            except (OSError, ValueError, TypeError):
                return False

        done = {"train": lambda n: is_complete(self.model(n)), "merge": lambda n: is_merged(self.model(n)), "eval": evaluated}[stage]
        return [n for n in names if done(n)]

    def stage_outputs_on_disk(self, stage: str) -> list[Path]:
        """What a stage writes (removed before the stage is redone); the merge stage's models are
        the pipeline's to name (`merge` is not listed here)."""
        return {"data": [self.lab, self.data_dir], "disperse": [self.portions], "train": [self.models],
                "eval": [self.eval_dir, self.diagnostics_dir]}.get(stage, [])


# ---------------------------------------------------------------- the whole run

CONTROL_DIR = "control-nobias"
SHARED_STORAGE_MARKER = ".dtm-shared-storage-check"


def shared_storage_marker(root: str | Path) -> Path:
    """The file the driver writes into the run directory and every Ray node must read back."""
    return Path(root) / SHARED_STORAGE_MARKER


SWEEP_DIR = "sweep"
SWEEP_CENTER = "center"  # one_at_a_time: the main config's own cell


def sweep_cell_name(settings: dict[str, Any]) -> str:
    """A sweep cell's directory name: `disperse.k=2`, `disperse.strategy=kmeans,disperse.embed_on=both`
    (a mapping value is spelled as its dotted keys, nested ones too), `center` for no settings."""
    if not settings:
        return SWEEP_CENTER
    parts = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in _dotted(settings).items()]
    return ",".join(parts).replace("/", "_").replace(" ", "")


def _dotted(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"merge": {"parameters": {"lambda": 0.3}}} -> {"merge.parameters.lambda": 0.3}."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        out |= _dotted(value, name + ".") if isinstance(value, dict) and value else {name: value}
    return out


@dataclass(frozen=True)
class RunDir(StageRecords):
    """`<output_dir>/`: every seed's run, the config it was made with, and the report."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    def report_plot(self, name: str) -> Path:
        """A plot of the report, beside it: `tax_curve.png`, ... (linked from report.md)."""
        return self.root / f"{name}.png"

    @property
    def sweep_dir(self) -> Path:
        return self.root / SWEEP_DIR

    def sweep_cell(self, name: str) -> RunDir:
        """One cell of a sweep: an ordinary run directory (`sweep_cell_name`)."""
        return RunDir(self.sweep_dir / name)

    def seed_run(self, seed: int, control: bool = False) -> SeedRun:
        return SeedRun((self.root / CONTROL_DIR if control else self.root) / f"seed-{seed}", seed, control)

    def seed_runs(self, cfg: Any) -> list[SeedRun]:
        """Every seed's run of `cfg` (an `ExperimentConfig`), then the lab's no-bias control on the
        first `lab.control_seeds` seeds."""
        seeds = list(cfg.seeds or [cfg.seed])
        runs = [self.seed_run(s) for s in seeds]
        if cfg.data.path == "lab" and cfg.lab.control:
            runs += [self.seed_run(s, control=True) for s in seeds[: cfg.lab.control_seeds]]
        return runs
