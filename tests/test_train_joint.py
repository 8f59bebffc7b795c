"""The joint executor (`dtm.training.joint`): K models stepped together train exactly as K
separate `train_model` runs (within float tolerance), stop on their own when their portion
ends, resume after kill -9, and refuse a job that will not fit in memory.

Tolerance: 1e-5 absolute on every weight. The two paths do the same arithmetic in a different
order (a batched matmul over K models against one model's matmul; per-model loss sums), so
they differ by float32 rounding (measured: about 1e-7). Every AdamW update moves a weight by
up to the learning rate (1e-3 here, 1e-2 on the pico model), so any difference in semantics (a
wrong batch, learning rate, clipping or normalisation) changes some weight by far more than
1e-5; the tests also check that training moved the weights by more than 100x the tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtm import lab
from dtm.config import ExperimentConfig
from dtm.data.formats import load_conversations
from dtm.data.template import conversation
from dtm.errors import TrainingError
from dtm.rundir import (
    COMPLETE_FILE,
    LOG_FILE,
    TENSORBOARD_DIR,
    attempts_file,
    fraction_dirs,
    fractions_file,
    is_complete,
    joint_checkpoints,
)
from dtm.training.executors import Job, JointGroup, joint_groups, redone_steps, run_job
from dtm.training.joint import JointJob, batch_order, check_memory, length_grouped_order, train_joint
from dtm.training.sft import train_model

torch.set_num_threads(1)
TOLERANCE = 1e-5
LAB_BASE = lab.base_model_dir()


def lab_config(**train) -> ExperimentConfig:
    """The lab's recipe (packed batches, frozen tied embeddings) for a few steps."""
    cfg = ExperimentConfig(seed=3)
    cfg.model.model_name_or_path = str(LAB_BASE)
    for k, v in lab.DATA_RECIPE.items():
        setattr(cfg.data, k, v)
    for k, v in (lab.SFT_RECIPE | {"num_train_epochs": 2, "logging_steps": 2, "save_steps": 100} | train).items():
        setattr(cfg.train, k, v)
    return cfg


def pico_config(**train) -> ExperimentConfig:
    """The pico Llama (GQA, untied head, everything trained) with padded batches, gradient
    accumulation and weight decay: the paths the lab recipe does not take."""
    cfg = ExperimentConfig(seed=7)
    cfg.data.cutoff_len = 64
    settings = {"finetuning_type": "full", "num_train_epochs": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                "warmup_steps": 1, "learning_rate": 1e-2, "weight_decay": 0.1, "max_grad_norm": 0.5, "group_by_length": False,
                "logging_steps": 1, "save_steps": 100}
    for k, v in (settings | train).items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module")
def lab_portions(tmp_path_factory) -> list[list]:
    """Three unequal portions of the lab's SFT data (40, 40 and 24 examples)."""
    path = lab.write_sft_data(tmp_path_factory.mktemp("lab") / "sft.jsonl", seed=1, scale=0.05)
    convs = load_conversations(path, format="auto", source_field="source").conversations
    return [convs[:40], convs[40:80], convs[80:104]]


def qa(n: int, offset: int) -> list:
    return [conversation(f"What is {i} + {i}?", f"{2 * i} is the sum of {i} and {i}.", id=str(i)) for i in range(offset, offset + n)]


def weights(d: Path) -> dict[str, torch.Tensor]:
    adapter = d / "adapter_model.safetensors"
    return load_file(adapter if adapter.exists() else d / "model.safetensors")


def moved(d: Path, base: Path) -> float:
    """How far training moved the weights: from the base (full), from B = 0 (LoRA)."""
    w = weights(d)
    if (d / "adapter_config.json").exists():
        return max(float(v.abs().max()) for n, v in w.items() if "lora_B" in n)
    start = load_file(base / "model.safetensors")
    return max(float((w[n] - start[n]).abs().max()) for n in w)


def scalars(model_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a model's TensorBoard events (`logs/`), tag -> [(step, value)], read by
    TensorBoard's own reader (which hides what a restart marker purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(model_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_files(model_dir: Path) -> list[Path]:
    return sorted((model_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[n] - wb[n]).abs().max()) for n in wa)


def test_batch_order_is_the_trainers(tmp_path):
    """`batch_order` against the batches a real Trainer's dataloader yields, epoch by epoch."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from dtm.training.batches import ExampleDataset

    data = ExampleDataset([{"index": i} for i in range(37)])
    args = TrainingArguments(output_dir=str(tmp_path), seed=11, data_seed=11, per_device_train_batch_size=8, use_cpu=True,
                             report_to=[], remove_unused_columns=False)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(LAB_BASE), args=args, train_dataset=data,
                      data_collator=lambda batch: {"index": [b["index"] for b in batch]})
    loader = trainer.accelerator.prepare(trainer.get_train_dataloader())
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert [b["index"] for b in loader] == batch_order(37, 8, 11, epoch)


def test_length_grouped_order_is_the_trainers(tmp_path):
    """`length_grouped_order` against the batches of a real Trainer's dataloader under
    `group_by_length` (megabatches of batch x gradient accumulation), epoch by epoch."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from dtm.training.batches import ExampleDataset

    lengths = [(7 * i) % 23 + 1 for i in range(53)]
    data = ExampleDataset([{"index": i, "input_ids": [0] * n} for i, n in enumerate(lengths)])
    args = TrainingArguments(output_dir=str(tmp_path), seed=5, data_seed=5, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                             use_cpu=True, report_to=[], remove_unused_columns=False, train_sampling_strategy="group_by_length")
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(LAB_BASE), args=args, train_dataset=data,
                      data_collator=lambda batch: {"index": [b["index"] for b in batch]})
    loader = trainer.get_train_dataloader()  # prepared by accelerate, as the Trainer trains with it
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert [b["index"] for b in loader] == length_grouped_order(lengths, 3, 2, 5, epoch)
    assert length_grouped_order(lengths, 3, 2, 5, 0) != length_grouped_order(lengths, 3, 2, 5, 1)


@pytest.mark.parametrize("kind", ["lab", pytest.param("pico", marks=pytest.mark.slow), "lora", "lora-grouped"])
def test_joint_training_equals_separate_training(kind, lab_portions, base_dir, tmp_path):
    """K=3 models of unequal portions: the same weights, steps, losses and files as three
    `train_model` runs; the shortest one stops first while the others go on. LoRA: one base,
    three adapters (dropout 0: PEFT's dropout masks are random draws the joint step cannot
    repeat), saved as PEFT adapter directories."""
    from dtm.training.executors import train_jobs

    if kind == "lab":
        base, portions, cfg = LAB_BASE, lab_portions, lab_config(save_fractions=[0.5])
    else:
        base, portions, cfg = base_dir, [qa(24, 0), qa(20, 30), qa(14, 60)], pico_config(save_fractions=[0.5])
    if kind.startswith("lora"):
        cfg.train.finetuning_type, cfg.train.weight_decay = "lora", 0.0
        cfg.train.group_by_length = kind == "lora-grouped"  # the config default: the Trainer's length-grouped sampler
        cfg.train.lora.r, cfg.train.lora.lora_dropout = 4, 0.0
        cfg.train.lora.target_modules = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    separate = [train_model(base, p, tmp_path / f"separate-{i}", cfg, progress=False, name=f"m-{i}") for i, p in enumerate(portions)]
    data = []
    for i, p in enumerate(portions):
        path = tmp_path / f"portion-{i}.jsonl"
        path.write_text("".join(json.dumps(c.to_record()) + "\n" for c in p))
        data.append(path)
    cfg.train.executor, cfg.train.num_workers = "joint", 1
    train_jobs(cfg, base, {f"m-{i}": {"data": str(d), "seed": cfg.seed} for i, d in enumerate(data)}, tmp_path / "joint")
    joint = [tmp_path / "joint" / f"m-{i}" for i in range(3)]
    steps = []
    for s, j in zip(separate, joint):
        assert is_complete(j)
        a, b = json.loads((s / COMPLETE_FILE).read_text()), json.loads((j / COMPLETE_FILE).read_text())
        assert b["executor"] == "joint" and set(a) <= set(b)
        assert (a["steps"], a["examples"], a["trained_tokens"]) == (b["steps"], b["examples"], b["trained_tokens"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert max_difference(s, j) < TOLERANCE
        assert moved(j, Path(base)) > 100 * TOLERANCE
        assert (j / "adapter_config.json").exists() == kind.startswith("lora")
        rows_a = [json.loads(x) for x in (s / LOG_FILE).read_text().splitlines()]
        rows_b = [json.loads(x) for x in (j / LOG_FILE).read_text().splitlines()]
        assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
        for key in ("loss", "lr", "grad_norm", "epoch"):
            assert [r[key] for r in rows_b] == pytest.approx([r[key] for r in rows_a], rel=1e-5), key
        # TensorBoard: one event file per model, the Trainer's tags (but its FLOP estimate), the same values per step
        assert len(event_files(j)) == 1
        tb_a, tb_b = scalars(s), scalars(j)
        assert set(tb_b) == set(tb_a) - {"train/total_flos"}
        for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "train/train_loss"):
            assert [step for step, _ in tb_b[tag]] == [step for step, _ in tb_a[tag]], tag
            assert [v for _, v in tb_b[tag]] == pytest.approx([v for _, v in tb_a[tag]], rel=1e-5), tag
        assert [step for step, _ in tb_b["train/loss"]] == [r["step"] for r in rows_b]
        assert [label for label, _ in fraction_dirs(j)] == ["0.50"]
        assert max_difference(fraction_dirs(s)[0][1], fraction_dirs(j)[0][1]) < TOLERANCE
        assert [r["step"] for r in json.loads(fractions_file(j).read_text())] == [0, a["steps"] // 2]
        assert not (j / "checkpoints").exists()
        steps.append(b["steps"])
    assert steps[2] < steps[0]  # unequal portions: the smallest stopped earlier


def test_data_baselines_join_and_equal_their_separate_training(base_dir, tmp_path):
    """Replay (plain text mixed in) and curation (the base-loss top half) change only the data:
    in one joint job they train as `train_baseline` trains each alone (LoRA, length-grouped)."""
    from dtm.training.executors import train_jobs

    cfg = pico_config(finetuning_type="lora", weight_decay=0.0, group_by_length=True, num_train_epochs=1)
    cfg.train.lora.r, cfg.train.lora.lora_dropout = 4, 0.0
    corpus = tmp_path / "replay.txt"
    corpus.write_text("".join(f"the cat sat on the mat {i} times.\n" for i in range(30)))
    cfg.baselines.replay_path, cfg.baselines.curation_fraction = str(corpus), 0.5
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(c.to_record()) + "\n" for c in qa(24, 0)))
    jobs = {name: {"data": str(data), "seed": cfg.seed, "baseline": name} for name in ("replay", "curation")}
    cfg.train.executor = "local"
    train_jobs(cfg, base_dir, jobs, tmp_path / "separate")
    cfg.train.executor = "joint"
    train_jobs(cfg, base_dir, jobs, tmp_path / "joint")
    for name in jobs:
        a, b = (json.loads((tmp_path / mode / name / COMPLETE_FILE).read_text()) for mode in ("separate", "joint"))
        assert b["executor"] == "joint" and b["joint_with"] == [n for n in jobs if n != name]
        assert (a["steps"], a["examples"], a["replay_examples"]) == (b["steps"], b["examples"], b["replay_examples"])
        assert max_difference(tmp_path / "separate" / name, tmp_path / "joint" / name) < TOLERANCE
        assert moved(tmp_path / "joint" / name, base_dir) > 100 * TOLERANCE
    separate = [json.loads((tmp_path / "separate" / n / COMPLETE_FILE).read_text()) for n in jobs]
    assert (separate[0]["replay_examples"], separate[1]["examples"]) == (24, 12)  # the hooks did act


KILLED_JOINT_RUN = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_train_joint import killed_jobs
    from dtm.training.joint import train_joint

    def stall(name, step):
        if name == "m-0" and step == 11:
            open({marker!r}, "w").close()
            time.sleep(120)  # killed here: m-0 and m-1 checkpointed at step 10, m-2 finished at 6

    train_joint({base!r}, killed_jobs({root!r}), progress=False, on_step=stall)
    """
)


def killed_jobs(root: str) -> list[JointJob]:
    cfg = pico_config(num_train_epochs=6, gradient_accumulation_steps=1, per_device_train_batch_size=8, save_steps=5,
                      checkpoint_minutes=None)  # checkpoints by steps only, whatever the machine's speed
    portions = [qa(24, 0), qa(20, 30), qa(8, 60)]  # 3, 3 and 1 steps per epoch
    return [JointJob(f"m-{i}", p, Path(root) / f"m-{i}", cfg.seed, cfg) for i, p in enumerate(portions)]


@pytest.mark.slow  # a second Python process with torch: 10-30 s
def test_killed_joint_job_resumes_to_the_same_weights(base_dir, tmp_path):
    root, marker = tmp_path / "killed", tmp_path / "at-step-11"
    script = KILLED_JOINT_RUN.format(tests=str(Path(__file__).parent), marker=str(marker), base=str(base_dir), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, "the joint training process died before step 11"
        assert time.time() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [is_complete(root / f"m-{i}") for i in range(3)] == [False, False, True]
    assert [s for s, _ in joint_checkpoints(root / "m-0")] == [5, 10]
    assert [s for s, _ in scalars(root / "m-0")["train/loss"]] == list(range(1, 12))  # logged up to the kill
    # resumed as the executors run a joint group, which records the attempt and its redone steps
    jobs = killed_jobs(str(root))
    run_job(JointGroup("m-0+m-1+m-2", [Job(j.name, j.data, j.out, j.seed) for j in jobs]), jobs[0].config, str(base_dir), progress=False)
    resumed = [j.out for j in jobs]
    straight = train_joint(base_dir, killed_jobs(str(tmp_path / "straight")), progress=False)
    for a, b in zip(resumed, straight):
        assert max_difference(a, b) == 0.0, f"{a.name}: the resumed run differs from the uninterrupted one"
    assert json.loads((root / "m-0" / COMPLETE_FILE).read_text())["resumed_from_step"] == 10
    steps = [json.loads(line)["step"] for line in (root / "m-0" / LOG_FILE).read_text().splitlines()]
    assert steps == list(range(1, 19))  # the killed run's row of step 11 was dropped, not duplicated
    # TensorBoard alike: two event files (one per attempt), the killed one's step 11 purged by the restart marker
    assert len(event_files(root / "m-0")) == 2
    tb, tb_straight = scalars(root / "m-0"), scalars(tmp_path / "straight" / "m-0")
    assert [s for s, _ in tb["train/loss"]] == list(range(1, 19))
    assert [v for _, v in tb["train/loss"]] == [v for _, v in tb_straight["train/loss"]]  # the resumed run's values, bitwise
    # the work lost: m-0 had logged step 11 past its checkpoint at 10, m-1 nothing past 10; m-2 had finished
    rows = {j.name: [json.loads(x) for x in attempts_file(j.out).read_text().splitlines()] for j in jobs[:2]}
    assert [(r["resumed_from_step"], r["redone_steps"]) for r in rows["m-0"]] == [(10, 1)]
    assert [(r["resumed_from_step"], r["redone_steps"]) for r in rows["m-1"]] == [(10, 0)]
    assert not attempts_file(jobs[2].out).exists()
    assert redone_steps(resumed) == {"m-0": 1, "m-1": 0}  # what the train stage's manifest, `dtm status` and the report show


def test_joint_checkpoints_at_least_every_checkpoint_minutes(base_dir, tmp_path):
    """As the Trainer's run (`sft.CheckpointClock`): a model shorter than save_steps still
    checkpoints by time (here: after every step), so a kill loses under checkpoint_minutes of work."""
    cfg = pico_config(num_train_epochs=1, gradient_accumulation_steps=1, save_steps=100, checkpoint_minutes=1e-9,
                      save_total_limit=10, keep_checkpoints=True)
    out = train_joint(base_dir, [JointJob(f"m-{i}", qa(12, 20 * i), tmp_path / f"m-{i}", cfg.seed, cfg) for i in range(2)],
                      progress=False)
    for d in out:
        assert [s for s, _ in joint_checkpoints(d)] == [1, 2]  # 3 steps: every one but the last (the model itself)


def test_a_joint_job_refuses_models_of_other_shapes_and_lora_with_frozen_modules(base_dir, tmp_path):
    lora, full = pico_config(finetuning_type="lora"), pico_config()
    with pytest.raises(TrainingError, match="only models of one shape train together"):
        train_joint(base_dir, [JointJob("a", qa(4, 0), tmp_path / "a", 7, lora), JointJob("b", qa(4, 0), tmp_path / "b", 7, full)],
                    progress=False)
    lora.train.freeze_modules = ["embed_tokens"]
    with pytest.raises(TrainingError, match="freeze_modules applies to full fine-tuning"):
        train_joint(base_dir, [JointJob("a", qa(4, 0), tmp_path / "a", 7, lora)], progress=False)


def _hf_summed_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """transformers' own forward: the summed next-token loss of a collated batch (shifted within rows)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs).logits
    labels = batch["labels"][:, 1:]
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100, reduction="sum"))


def test_padding_free_forward_equals_transformers_per_model():
    """The joint forward on two models' micro-batches, one padded and one packed, laid out
    padding-free (`flat_tokens`): only real tokens of sequences with a label are kept (a packed
    row's padding and an unlabelled sequence are dropped), and each model's summed loss equals
    transformers' own forward of that model on its batch (stacked weights: each model its own)."""
    from conftest import make_llama

    from dtm.training.batches import pack_batch, pad_batch
    from dtm.training.joint import flat_tokens, forward_name, llama_hidden, lm_head_weight, token_losses

    models = [make_llama(seed=s).eval() for s in (1, 2)]
    for m in models:
        m.config.use_cache = False  # as `load_base` sets: transformers then reads packed sequences from position_ids

    def example(n: int, start: int, labelled: bool = True) -> dict[str, list[int]]:
        ids = [(start + 7 * i) % 390 + 5 for i in range(n)]
        return {"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:] if labelled else [-100] * n, "attention_mask": [1] * n}

    padded = pad_batch([example(9, 0), example(4, 3), example(6, 5, labelled=False)], pad_id=0)
    packed = pack_batch([example(11, 1), example(5, 2), example(3, 4)], pad_id=0, row_tokens=12)
    assert packed["input_ids"].numel() > 19  # the packed batch has padding too
    tokens = flat_tokens([padded, packed])
    assert tokens.bounds == [(0, 13), (13, 32)]  # 9 + 4 (the unlabelled 6 left out), 11 + 5 + 3
    assert tokens.grid == (5, 11)
    params = {forward_name(n): torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              for n, _ in models[0].named_parameters()}
    with torch.no_grad():
        hidden = llama_hidden(params, models[0].config, tokens)
        losses = token_losses(hidden, lm_head_weight(params), tokens)
        expected = [_hf_summed_loss(models[0], padded), _hf_summed_loss(models[1], packed)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)


def test_memory_model_on_hand_computed_numbers():
    """2 layers of hidden 10 and MLP 20, vocabulary 100; K=3 models of 50 trained weights each,
    micro-batches of 5 tokens, fp32 (the coefficients are bench_joint_memory.py's fit)."""
    from types import SimpleNamespace

    from dtm.training.joint import memory_plan

    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=10, intermediate_size=20, vocab_size=100)
    assert memory_plan(1000, 50, 3, 5, cfg) == {
        "base": 1000 * 4,
        "trained": 3 * 50 * 8 * 4,  # weight, gradient, 2 moments, the forward's copy, 3 update temporaries
        "activations": 3 * 5 * 2 * (13 * 10 + 11 * 20) * 4,  # 13 hidden + 11 MLP widths per token and layer
        "loss": 3 * 256 * 100 * 4,  # one chunk of 256 rows: fp32 logits, softmax, gradient
    }


def test_memory_model_refuses_a_job_that_will_not_fit_and_suggests_a_micro_batch():
    plan = {"base": 100 << 20, "trained": 4 * (40 << 20), "activations": 16 * (10 << 20), "loss": 40 << 20}
    assert "fit" not in check_memory(plan, 10 << 30, 16, ["a", "b", "c", "d"])
    with pytest.raises(TrainingError, match=r"will not fit; set train.per_device_train_batch_size to 6 "):
        check_memory(plan, 400 << 20, 16, ["a", "b", "c", "d"])  # 0.9 x 400 - 300 = 60 MiB: 6 examples of 10 MiB
    with pytest.raises(TrainingError, match=r"train fewer models per joint job \(train.models_per_job: 2\)"):
        check_memory(plan, 200 << 20, 16, ["a", "b", "c", "d"])


def test_joint_groups_split_the_demo_jobs_over_the_workers(tmp_path):
    """The lab's jobs: vanilla alone (4x longer: a joint group of one where lone jobs join, as
    `run_joint` on a CPU asks, else the Trainer), L2 alone (a penalty, the Trainer), the eight
    quarter-length jobs in two groups of four for two workers, one group for one worker."""
    from dtm.training.executors import Job, JointGroup, joint_groups

    cfg = lab_config(num_train_epochs=12)
    full, quarter = tmp_path / "train.jsonl", tmp_path / "portion.jsonl"
    full.write_text("x" * 4000)
    quarter.write_text("x" * 1000)
    jobs = [Job("vanilla", full, tmp_path / "vanilla", 3), Job("l2", full, tmp_path / "l2", 3, baseline="l2")]
    jobs += [Job(f"sub-{i}", quarter, tmp_path / f"sub-{i}", 3) for i in range(1, 5)]
    jobs += [Job(name, full, tmp_path / name, 3, {"num_train_epochs": 3}) for name in ("short", "soup-2", "soup-3", "soup-4")]
    two = joint_groups(jobs, cfg, workers=2, on_gpu=False, lone_joins=True)
    assert [u.name for u in two if isinstance(u, Job)] == ["l2"]
    assert sorted(len(u.jobs) for u in two if isinstance(u, JointGroup)) == [1, 4, 4]
    assert [u.name for u in joint_groups(jobs, cfg, workers=2, on_gpu=False) if isinstance(u, Job)] == ["l2", "vanilla"]
    one = joint_groups(jobs, cfg, workers=1, on_gpu=False, lone_joins=True)
    assert sorted(len(u.jobs) for u in one if isinstance(u, JointGroup)) == [1, 8]


def test_joint_groups_follow_models_per_job_and_leave_jobs_alone_with_one(tmp_path):
    from dtm.training.executors import Job, JointGroup, joint_groups

    cfg = lab_config()
    portion = tmp_path / "portion.jsonl"
    portion.write_text("x" * 1000)
    jobs = [Job(f"sub-{i}", portion, tmp_path / f"sub-{i}", 3) for i in range(1, 9)]
    cfg.train.models_per_job = 3
    assert [len(u.jobs) for u in joint_groups(jobs, cfg, workers=1)] == [3, 3, 2]
    cfg.train.models_per_job = 1
    assert all(isinstance(u, Job) for u in joint_groups(jobs, cfg, workers=2))
    cfg.train.models_per_job = None
    assert [len(u.jobs) for u in joint_groups(jobs, cfg, workers=2) if isinstance(u, JointGroup)] == [4, 4]


def test_mixed_precision_keeps_jobs_out_of_joint_groups_and_says_so(tmp_path, caplog):
    """On a GPU the Trainer trains under bf16/fp16 autocast (the default there) and the joint step
    in fp32 only: such jobs train one at a time with the Trainer, with a warning that names them
    and the key to set; with train.bf16: false (or on CPU) they join."""
    from dtm.training.joint import mixed_precision

    portion = tmp_path / "portion.jsonl"
    portion.write_text("x" * 1000)
    jobs = [Job(f"sub-{i}", portion, tmp_path / f"sub-{i}", 3) for i in range(1, 5)]
    cfg = lab_config()
    for bf16, fp16, key in ((None, False, "train.bf16 unset"), (True, False, "train.bf16: true"), (False, True, "train.fp16: true")):
        cfg.train.bf16, cfg.train.fp16 = bf16, fp16
        caplog.clear()
        with caplog.at_level("WARNING", logger="dtm.training.executors"):
            assert all(isinstance(u, Job) for u in joint_groups(jobs, cfg, workers=1, on_gpu=True))
        assert f"sub-1, sub-2, sub-3, sub-4: {key}" in caplog.text and "set train.bf16: false" in caplog.text
        assert mixed_precision(cfg, on_gpu=False) is None  # on CPU the Trainer trains in fp32 too
    cfg.train.bf16, cfg.train.fp16 = False, False
    caplog.clear()
    with caplog.at_level("WARNING", logger="dtm.training.executors"):
        assert [len(u.jobs) for u in joint_groups(jobs, cfg, workers=1, on_gpu=True)] == [4]
    assert caplog.text == ""


def test_a_ray_joint_group_declares_the_memory_of_its_models_and_fits_a_node(tmp_path):
    """A joint group of n models is one Ray task: n x `memory_per_model`, one model's CPUs and
    GPU (the models share the process and its device); no group asks for more memory than the
    largest node has, which Ray would leave pending for ever."""
    from dtm.cluster import Resources, models_per_node
    from dtm.training.executors import joint_groups, task_resources

    portion = tmp_path / "portion.jsonl"
    portion.write_text("x" * 1000)
    jobs = [Job(f"sub-{i}", portion, tmp_path / f"sub-{i}", 3) for i in range(1, 9)]
    per_model = Resources(cpus=2.0, gpus=1.0, memory=3 << 30)
    assert task_resources(JointGroup("g", jobs[:3]), per_model).options() == {"num_cpus": 2.0, "num_gpus": 1.0, "memory": 9 << 30}
    assert task_resources(jobs[0], per_model).options() == {"num_cpus": 2.0, "num_gpus": 1.0, "memory": 3 << 30}
    assert task_resources(JointGroup("g", jobs[:3]), Resources(cpus=1.0)).options() == {"num_cpus": 1.0, "num_gpus": 0.0}
    nodes = [{"NodeID": "a", "Resources": {"CPU": 8.0, "memory": 10 << 30}}, {"NodeID": "b", "Resources": {"CPU": 8.0, "memory": 7 << 30}}]
    assert models_per_node(per_model, nodes) == 3  # 10 GiB / 3 GiB
    assert models_per_node(Resources(memory=20 << 30), nodes) == 1  # one model alone: Ray's own placement decides
    assert models_per_node(Resources(cpus=2.0), nodes) is None  # no memory declared: no limit
    cfg = lab_config()
    assert [len(u.jobs) for u in joint_groups(jobs, cfg, workers=2)] == [4, 4]
    assert [len(u.jobs) for u in joint_groups(jobs, cfg, workers=2, most=3)] == [3, 3, 2]


def test_gradient_checkpointing_trains_alone_with_the_trainer_and_says_so(tmp_path, caplog):
    """The joint step has no activation checkpointing: with train.gradient_checkpointing every
    job goes to the Trainer (which honours it), and the log says why."""
    from dtm.training.executors import Job, joint_groups

    cfg = lab_config()
    portion = tmp_path / "portion.jsonl"
    portion.write_text("x" * 1000)
    jobs = [Job(f"sub-{i}", portion, tmp_path / f"sub-{i}", 3) for i in range(1, 5)]
    cfg.train.models_per_job = 2
    assert not any(isinstance(u, Job) for u in joint_groups(jobs, cfg, workers=1))
    cfg.train.gradient_checkpointing = True
    with caplog.at_level("INFO", logger="dtm.training.executors"):
        assert all(isinstance(u, Job) for u in joint_groups(jobs, cfg, workers=1))
    assert "sub-1: trains alone with the Trainer: train.gradient_checkpointing" in caplog.text


@pytest.mark.slow  # a local Ray instance and two task processes: about 30 s
def test_ray_runs_one_joint_job_per_task_slot_equal_to_local_joint(base_dir, tmp_path):
    """K=4 LoRA sub-models on a local Ray of 2 CPUs (a task per CPU): two joint jobs of two,
    whose adapters equal one local joint job of four within the tolerance."""
    ray = pytest.importorskip("ray")
    from dtm.training.executors import train_jobs

    cfg = pico_config(finetuning_type="lora", weight_decay=0.0, max_steps=4, num_train_epochs=1, gradient_accumulation_steps=1)
    cfg.train.lora.r, cfg.train.lora.lora_dropout = 4, 0.0
    jobs = {}
    for i in range(4):
        path = tmp_path / f"portion-{i}.jsonl"
        path.write_text("".join(json.dumps(c.to_record()) + "\n" for c in qa(16, 20 * i)))
        jobs[f"sub-{i + 1}"] = {"data": str(path), "seed": cfg.seed}
    cfg.train.executor, cfg.train.num_workers = "joint", 1
    train_jobs(cfg, base_dir, jobs, tmp_path / "local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg.train.executor, cfg.train.num_cpus_per_model, cfg.train.num_gpus_per_model = "ray", 1, 0
        cfg.train.memory_per_model = 0.25  # each group declares 0.5 GiB (`task_resources`)
        train_jobs(cfg, base_dir, jobs, tmp_path / "ray")
    finally:
        ray.shutdown()
    groups = set()
    for name in jobs:
        a, b = tmp_path / "local" / name, tmp_path / "ray" / name
        summary = json.loads((b / COMPLETE_FILE).read_text())
        assert summary["executor"] == "joint"
        groups.add(tuple(sorted([name, *summary["joint_with"]])))
        assert len(json.loads((a / COMPLETE_FILE).read_text())["joint_with"]) == 3  # local: one job of four
        assert max_difference(a, b) < TOLERANCE
        assert moved(b, base_dir) > 100 * TOLERANCE
    assert sorted(len(g) for g in groups) == [2, 2] and set().union(*groups) == set(jobs)


def test_stacked_clip_and_adamw_equal_torch_per_model():
    """`clip_rows` + `adamw_rows` on two stacked models, each with its own learning rate, step
    count, max norm and weight decay (decay on weights, not biases), equal clip_grad_norm_ +
    torch's fused AdamW (the Trainer's `adamw_torch_fused`) run on each model alone, over
    three steps; model 1 (a small gradient) is not clipped, model 0 is. Tolerance 1e-6: the
    same kernel, only the norm's summation order differs."""
    from dtm.training.joint import Stack, adamw_rows, clip_rows

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)) for _ in range(2)]
    decayed = {n for n, _ in models[0].named_parameters() if n.endswith("weight")}
    stack = Stack.of(models[0], [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models], decayed)
    hyper = [dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, max_norm=1.0),
             dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.0, max_norm=100.0)]
    optims = [torch.optim.AdamW([{"params": [p for n, p in m.named_parameters() if n in decayed], "weight_decay": h["weight_decay"]},
                                 {"params": [p for n, p in m.named_parameters() if n not in decayed], "weight_decay": 0.0}],
                                lr=h["lr"], betas=h["betas"], eps=h["eps"], fused=True) for m, h in zip(models, hyper)]
    for step in range(1, 4):
        grads = [{n: torch.randn_like(p) * (3.0 if i == 0 else 0.01) for n, p in m.named_parameters()} for i, m in enumerate(models)]
        for i, (m, opt) in enumerate(zip(models, optims)):
            for n, p in m.named_parameters():
                p.grad = grads[i][n].clone()
            expected_norm = float(torch.nn.utils.clip_grad_norm_(m.parameters(), hyper[i]["max_norm"]))
            opt.step()
            for n, (a, b, _) in stack.layout.items():
                stack.grad[i, a:b] = grads[i][n].reshape(-1)
        norms = clip_rows(stack, [0, 1], [h["max_norm"] for h in hyper])
        assert norms[0] > hyper[0]["max_norm"] and norms[1] < hyper[1]["max_norm"]
        assert norms[1] == pytest.approx(expected_norm, rel=1e-6)
        adamw_rows(stack, [0, 1], [h["lr"] for h in hyper], [step, step], [h["betas"][0] for h in hyper],
                   [h["betas"][1] for h in hyper], [h["eps"] for h in hyper], [h["weight_decay"] for h in hyper])
        stack.grad.zero_()
        for i, m in enumerate(models):
            for n, w in stack.row(i).items():
                torch.testing.assert_close(w, dict(m.named_parameters())[n].detach(), rtol=0, atol=1e-6)
