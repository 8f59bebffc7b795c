"""A model trained data-parallel on 2 Ray Train workers (gloo, CPU) equals one worker's training.

Real Ray, real `TorchTrainer`, real DDP: `train.workers_per_model: 2` runs the same job
function (`executors.train_job_here` -> `sft.train_model`) in two worker processes.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dtm.config import ExperimentConfig
from dtm.rundir import COMPLETE_FILE, LOG_FILE, RAY_TRAIN_DIR
from dtm.training import train_model
from dtm.training.executors import Job, run_job

pytest.importorskip("ray.train.torch")


def config(per_device: int, workers: int) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=3)
    cfg.data.cutoff_len = 64
    for k, v in {"finetuning_type": "full", "max_steps": 3, "per_device_train_batch_size": per_device, "gradient_accumulation_steps": 1,
                 "warmup_steps": 0, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100, "group_by_length": False,
                 "workers_per_model": workers, "num_cpus_per_model": 2}.items():
        setattr(cfg.train, k, v)
    return cfg


def test_a_workers_user_error_is_raised_as_itself():
    """Ray Train reports the workers' exceptions by rank (`WorkerGroupError.worker_failures`,
    unwrapped from their traceback holder); the lowest rank's is raised, so a `DtmError` stays
    one (final for `Retries`) and anything else is the crash that gets retried."""
    from ray.train import ControllerError, WorkerGroupError

    from dtm.errors import TrainingError
    from dtm.training.raytrain import first_cause

    bad_data = TrainingError("portion-1.jsonl: no example left to train on")
    assert first_cause(WorkerGroupError("2 workers failed", {1: RuntimeError("gloo: connection reset"), 0: bad_data})) is bad_data
    crash = RuntimeError("placement group timed out")
    assert first_cause(ControllerError(crash)) is crash
    assert isinstance(first_cause(WorkerGroupError("1 worker failed", {1: crash})), RuntimeError)


def test_fsdp_needs_workers_to_shard_over_and_gpus(tmp_path):
    """`train.fsdp` alone (one worker) is refused at load time naming the key; on workers without a
    GPU it is refused before training (accelerate would quietly run DDP on CPU), naming where it was set."""
    from dtm.config import load_config
    from dtm.errors import ConfigError, TrainingError
    from dtm.training.raytrain import check_fsdp_has_gpus

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  max_steps: 3\n  fsdp: full_shard\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: train\.fsdp: .*workers_per_model to 2"):
        load_config(yaml_file)
    with pytest.raises(ConfigError, match=r"train\.fsdp: Input should be False, 'full_shard' or 'shard_grad_op'"):
        load_config(None, ["train.fsdp=zero3", "train.workers_per_model=2"])
    cfg = load_config(yaml_file, ["train.workers_per_model=2"])
    with pytest.raises(TrainingError, match=r"c\.yaml:3: train\.fsdp: full_shard needs GPUs.*train\.fsdp: false"):
        check_fsdp_has_gpus(cfg, gpu=False)
    check_fsdp_has_gpus(cfg, gpu=True)
    check_fsdp_has_gpus(load_config(None, ["train.workers_per_model=2"]), gpu=False)  # DDP on CPU is fine


def test_fsdp_arguments_reach_the_trainers_fsdp_plugin(tmp_path):
    """What `train.fsdp` turns into: the Trainer's FSDP2 plugin, sharding as named, saving whole weights."""
    from dtm.training.sft import choose_precision, training_arguments

    cfg = config(8, 2)
    assert training_arguments(cfg, tmp_path, 3, choose_precision(cfg), False).fsdp_plugin_args is None  # DDP
    for fsdp, reshard in (("full_shard", True), ("shard_grad_op", False)):
        cfg.train.fsdp = fsdp
        plugin = training_arguments(cfg, tmp_path, 3, choose_precision(cfg), False).fsdp_plugin_args
        assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is reshard
        assert plugin["state_dict_type"] == "FULL_STATE_DICT"


def test_gathered_weights_are_saved_as_an_ordinary_model(tmp_path, tokenizer):
    """A sharded model is saved from its gathered state dict (what every FSDP worker helps build):
    those weights, not the wrapper's, are written, checked for non-finite values first."""
    from conftest import make_llama
    from transformers import AutoModelForCausalLM

    from dtm.errors import TrainingError
    from dtm.rundir import is_complete
    from dtm.training.sft import save_final

    model = make_llama(seed=0)
    expected = {k: v + 1.0 for k, v in make_llama(seed=1).state_dict().items()}
    out = tmp_path / "m"
    out.mkdir()
    save_final(model, tokenizer, out, {"name": "m"}, state_dict=dict(expected))  # save_pretrained empties the dict it is given
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert is_complete(out) and saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    gathered = dict(expected)
    gathered["lm_head.weight"][0, 0] = float("inf")
    (tmp_path / "n").mkdir()
    with pytest.raises(TrainingError, match=r"lm_head\.weight.*non-finite"):
        save_final(model, tokenizer, tmp_path / "n", {"name": "n"}, state_dict=gathered)


@pytest.mark.slow  # starts Ray and two training processes: 1.5-2 minutes on 2 busy cores
def test_two_workers_equal_one_worker_with_the_same_global_batch(base_dir, tmp_path):
    """16 examples, global batch 16 (1 x 16 against 2 x 8): every step sees the whole data set
    in both runs, whatever order each sampler draws (DDP's DistributedSampler and the single
    run's RandomSampler use different permutations, so a smaller batch would compare different
    batches). The loss is the mean over the global batch's tokens in both (the Trainer counts
    tokens across workers), so the runs differ only in float summation order: each worker sums
    its half and gloo adds the halves. After 3 Adam steps the largest difference measured was
    2e-8 (absolute, on weights of order 0.02-1); we allow rtol 1e-4, atol 1e-6 (Adam's
    normalisation can amplify reassociation for gradients near zero; the tolerance is the one
    the gradient-accumulation test uses)."""
    import ray

    data_file = tmp_path / "data.jsonl"  # lengths differ, so the workers' halves hold different token counts
    data_file.write_text("".join(json.dumps({"instruction": f"What is {i} + {i}?", "output": f"{2 * i} is the sum of {i} and {i}." + " Indeed." * (i % 4)}) + "\n"
                                 for i in range(16)))
    single = train_model(base_dir, data_file, tmp_path / "one", config(16, 1), progress=False)
    job = Job("two", data_file, tmp_path / "two", seed=3)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # run_job uses a running instance
    try:
        run_job(job, config(8, 2), str(base_dir))
    finally:
        ray.shutdown()

    a, b = load_file(single / "model.safetensors"), load_file(job.out / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    assert a.keys() == b.keys()
    assert sum(not torch.equal(a[k], base[k]) for k in a) == len(a)  # every tensor trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    summary = json.loads((job.out / COMPLETE_FILE).read_text())
    assert summary["workers"] == 2 and summary["steps"] == 3 and summary["examples"] == 16 and summary["device"] == "cpu"
    one_log = [json.loads(line) for line in (single / LOG_FILE).read_text().splitlines()]
    two_log = [json.loads(line) for line in (job.out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in two_log] == [r["step"] for r in one_log] == [1, 2, 3]  # written once, by the first worker
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-4)
    assert not (job.out / RAY_TRAIN_DIR).exists() and not (job.out / "checkpoints").exists()
