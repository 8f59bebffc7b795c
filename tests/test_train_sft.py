"""Sub-model training on tiny Llamas: outputs, resume after kill -9, freezing, batching, bad input."""

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
from conftest import make_llama
from safetensors.torch import load_file
from transformers import TrainerCallback

from dtm.config import ExperimentConfig
from dtm.data.template import conversation, tokenize_conversations
from dtm.rundir import COMPLETE_FILE, LOG_FILE, TENSORBOARD_DIR
from dtm.training import TrainingError, fraction_dir, is_complete, train_model
from dtm.training.batches import REAL_TOKENS, make_collator, pack_batch, packed_row_tokens, pad_batch
from dtm.training.sft import freeze_modules, last_checkpoint

torch.set_num_threads(1)


def tiny_config(**train) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=7)
    cfg.data.cutoff_len = 64
    settings = {"max_steps": 8, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "warmup_steps": 0, "learning_rate": 1e-2, "logging_steps": 2, "save_steps": 4}
    for k, v in (settings | train).items():
        setattr(cfg.train, k, v)
    return cfg


def qa_data(n: int = 32, offset: int = 0) -> list:
    return [conversation(f"What is {i} + {i}?", f"{2 * i} is the sum of {i} and {i}.", id=str(i)) for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def tied_base_dir(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tied")
    make_llama(seed=1, tie=True).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def weights(d: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (d / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(d / name)


# ---------------------------------------------------------------- batching


def test_pad_batch_pads_right_with_ignored_labels():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pack_batch_restarts_positions_and_masks_boundaries():
    examples = [{"input_ids": [8, 9], "labels": [-100, 9]}, {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    batch = pack_batch(examples, pad_id=0)  # one row, longest first
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]


def test_pack_batch_fills_rows_first_fit_and_pads_the_rest():
    lengths = [4, 3, 2, 2, 1]
    examples = [{"input_ids": [10 * n + i for i in range(n)], "labels": [10 * n + i for i in range(n)]} for n in lengths]
    batch = pack_batch(examples, pad_id=0, row_tokens=5)  # rows: 4+1, 3+2, 2 (+3 padding)
    assert batch["input_ids"].tolist() == [[40, 41, 42, 43, 10], [30, 31, 32, 20, 21], [20, 21, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 41, 42, 43, -100], [-100, 31, 32, -100, 21], [-100, 21, -100, -100, -100]]
    # the trainer's token count excludes the row padding (the collator adds it; the trainer removes it)
    collated = make_collator(True, pad_id=0)(examples)
    assert int(collated.pop(REAL_TOKENS)) == 12 and collated["input_ids"].shape == (2, 8)  # rows 4+3+1 and 2+2, at most 2 x 4 tokens
    padded = make_collator(False, pad_id=0)(examples)
    assert padded.pop(REAL_TOKENS) == 12 and padded["input_ids"].shape == (5, 4)  # padding excluded here too


def test_padding_free_loss_equals_padded_loss(tokenizer):
    """Packed batches, in one row or several, must give the padded batch's loss: no
    cross-example attention, response-only labels intact."""
    model = make_llama(seed=3)
    examples, _ = tokenize_conversations(qa_data(5), tokenizer, "alpaca", 64)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # really different lengths
    padded = model(**pad_batch(examples, tokenizer.pad_token_id)).loss
    for row_tokens in (None, packed_row_tokens("sdpa", examples)):
        packed = pack_batch(examples, tokenizer.pad_token_id, row_tokens)
        assert 1 < len(packed["input_ids"]) < len(examples) or row_tokens is None
        torch.testing.assert_close(model(**packed, use_cache=False).loss, padded, rtol=1e-5, atol=1e-5)
    # with a KV cache transformers skips the per-example mask and examples see each other
    assert abs(float(model(**pack_batch(examples, 0), use_cache=True).loss) - float(padded)) > 1e-4


# ---------------------------------------------------------------- a run and its outputs


def test_lora_run_writes_adapter_logs_fractions_and_is_skipped_when_done(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(save_fractions=[0.5, 1.0])
    out = train_model(base_dir, qa_data(), tmp_path / "m", cfg, val_data=qa_data(8, offset=100), progress=False)
    assert is_complete(out)
    assert (out / "adapter_config.json").exists() and (out / "tokenizer.json").exists()
    assert not (out / "checkpoints").exists()  # removed once complete
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4, 6, 8]
    assert all({"loss", "lr", "tokens_per_second"} <= set(r) and r["tokens_per_second"] > 0 for r in rows)
    assert list((out / "logs").glob("events.out.tfevents.*"))
    done = json.loads((out / COMPLETE_FILE).read_text())
    steps_per_epoch = -(-done["examples"] // cfg.train.per_device_train_batch_size)
    assert done["trained_tokens"] == round(done["tokens_per_epoch"] * done["steps"] / steps_per_epoch) > 0
    summary = json.loads((out / "fractions" / "fractions.json").read_text())
    assert [r["step"] for r in summary] == [0, 4, 8]
    assert all("train_loss" in r and "val_loss" in r for r in summary)
    assert summary[-1]["train_loss"] < summary[0]["train_loss"]
    for f in (0.5, 1.0):
        assert json.loads((fraction_dir(out, f) / "metrics.json").read_text())["fraction"] == f
    # loadable by PEFT on top of the base, and the adapter changed the model
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # a finished directory is returned as is
    stamp = (out / COMPLETE_FILE).stat().st_mtime_ns
    assert train_model(base_dir, qa_data(), out, cfg, progress=False) == out
    assert (out / COMPLETE_FILE).stat().st_mtime_ns == stamp


def test_same_seed_same_weights_and_packing_trains(base_dir, tmp_path):
    cfg = tiny_config(max_steps=4, save_steps=100)
    a = weights(train_model(base_dir, qa_data(), tmp_path / "a", cfg, progress=False))
    b = weights(train_model(base_dir, qa_data(), tmp_path / "b", cfg, progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = weights(train_model(base_dir, qa_data(), tmp_path / "c", cfg, seed=8, progress=False))
    assert any(not torch.equal(a[k], c[k]) for k in a)
    cfg_packed = tiny_config(max_steps=4, save_steps=100, packing=True, group_by_length=False)
    cfg_padded = tiny_config(max_steps=4, save_steps=100, packing=False, group_by_length=False)
    for c in (cfg_packed, cfg_padded):  # dropout masks depend on the batch's shape
        c.train.lora.lora_dropout = 0.0
    packed = weights(train_model(base_dir, qa_data(), tmp_path / "p", cfg_packed, progress=False))
    padded = weights(train_model(base_dir, qa_data(), tmp_path / "q", cfg_padded, progress=False))
    for k in packed:  # same batches, same maths: equal up to float reassociation
        torch.testing.assert_close(packed[k], padded[k], rtol=1e-3, atol=1e-5)


class LayerCalls(TrainerCallback):
    """Counts calls of the first decoder layer's MLP over training: activation checkpointing
    runs each layer's insides twice per micro-batch (forward, then again in backward), without it
    once. (Counted by wrapping the instance's `forward`: module hooks do not fire in the recompute.)"""

    def __init__(self):
        self.calls = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        mlp = next(m for name, m in model.named_modules() if name.endswith("layers.0.mlp"))
        forward = mlp.forward

        def counted(*a, **k):
            self.calls += 1
            return forward(*a, **k)

        mlp.forward = counted


def test_gradient_accumulation_and_checkpointing_keep_the_maths(base_dir, tmp_path):
    """Batch 4 = 2 micro-batches of 2 accumulated; activation checkpointing, whole layers and
    selective (LoRA, the chunked loss), really reruns the layers in backward, and exactly."""
    def run(name: str, calls: LayerCalls | None = None, **train) -> dict[str, torch.Tensor]:
        cfg = tiny_config(max_steps=3, save_steps=100, group_by_length=False, **train)
        cfg.train.lora.lora_dropout = 0.0
        return weights(train_model(base_dir, qa_data(), tmp_path / name, cfg, progress=False, callbacks=[calls] if calls else ()))

    plain_calls, checkpointed_calls, selective_calls = LayerCalls(), LayerCalls(), LayerCalls()
    whole = run("whole", plain_calls, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    accumulated = run("accumulated", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    checkpointed = run("checkpointed", checkpointed_calls, per_device_train_batch_size=4, gradient_checkpointing=True)
    selective = run("selective", selective_calls, per_device_train_batch_size=4, gradient_checkpointing="selective")
    assert (plain_calls.calls, checkpointed_calls.calls, selective_calls.calls) == (3, 6, 6)
    for k in whole:
        torch.testing.assert_close(accumulated[k], whole[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(checkpointed[k], whole[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(selective[k], whole[k], rtol=1e-4, atol=1e-6)


def kept_and_computed(mode: bool | str, dropout: float = 0.0) -> tuple[int, int, dict[str, torch.Tensor]]:
    """One LoRA training step of a pico Llama (hidden 64, r=4 on the MLP: LoRA's rank small against
    the hidden size, as on real models) on a padded batch with `train.gradient_checkpointing: mode`:
    the bytes its forward leaves allocated for backward (the profiler's allocation record, frees
    subtracted), the FLOPs of forward and backward together (torch's counter: matrix products,
    the recomputed ones included), and the LoRA gradients."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from dtm.training import checkpointing
    from dtm.training.sft import apply_lora

    cfg = tiny_config()
    cfg.train.lora.r, cfg.train.lora.lora_dropout = 4, dropout
    model = apply_lora(make_llama(hidden=64, layers=2, seed=1), cfg)
    checkpointing.enable(model, mode)
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (4, 48), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 40:] = mask[3, 30:] = 0  # right padding: the attention mask of real batches
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(5)  # the dropout masks
    with FlopCounterMode(display=False) as flops:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    # each allocation and free is counted in every event around it: the outermost events hold each once
    kept = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return kept, flops.get_total_flops(), grads


def test_selective_checkpointing_keeps_less_and_recomputes_little():
    """What the modes of train.gradient_checkpointing buy and cost, measured on one step: every
    layer recomputed (true) keeps least and adds a forward's products; "selective" keeps the
    projections' and attention's outputs only, which saves 0.40 of what true saves here
    ((none - selective) / (none - true) of the kept bytes), and recomputes only LoRA's rank-4
    products (0.03 of the FLOPs true adds); the gradients are the same, with dropout too
    (replayed with the forward's RNG state)."""
    (none, none_flops, none_grads), (full, full_flops, full_grads), (sel, sel_flops, sel_grads) = (
        kept_and_computed(m, dropout=0.1) for m in (False, True, "selective"))
    assert full < sel < none
    assert none - sel >= 0.25 * (none - full), (none, sel, full)
    assert full_flops > none_flops
    assert sel_flops - none_flops <= 0.1 * (full_flops - none_flops), (none_flops, sel_flops, full_flops)
    for k in none_grads:
        torch.testing.assert_close(full_grads[k], none_grads[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sel_grads[k], none_grads[k], rtol=1e-5, atol=1e-7)


def test_full_finetuning_freezes_tied_embeddings(tied_base_dir, tmp_path):
    base = load_file(tied_base_dir / "model.safetensors")
    cfg = tiny_config(finetuning_type="full", freeze_modules=["embed_tokens"], max_steps=4, save_steps=100)
    out = train_model(tied_base_dir, qa_data(), tmp_path / "full", cfg, progress=False)
    trained = load_file(out / "model.safetensors")
    assert torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_freeze_modules_matches_whole_name_components():
    model = make_llama(tie=True)
    frozen = freeze_modules(model, ["embed_tokens"])
    assert "model.embed_tokens.weight" in frozen and "lm_head.weight" in frozen  # tied: one tensor
    assert not model.lm_head.weight.requires_grad
    with pytest.raises(TrainingError, match="embed_token"):
        freeze_modules(make_llama(), ["embed_token"])  # a typo is an error, not a no-op


# ---------------------------------------------------------------- kill -9 and resume

KILLED_RUN = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from test_train_sft import qa_data, tiny_config
    from dtm.training import train_model

    class Stall(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 11:
                open({marker!r}, "w").close()
                time.sleep(120)  # killed here, between checkpoints 8 and 12

    train_model({base!r}, qa_data(), {out!r}, tiny_config(max_steps=16), progress=False, callbacks=[Stall()])
    """
)


def test_killed_training_resumes_to_the_same_weights(base_dir, tmp_path):
    out, marker = tmp_path / "killed", tmp_path / "at-step-11"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), marker=str(marker), base=str(base_dir), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, "the training process died before step 11"
        assert time.time() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not is_complete(out)
    assert last_checkpoint(out).name == "checkpoint-8"
    resumed = train_model(base_dir, qa_data(), out, tiny_config(max_steps=16), progress=False)
    straight = train_model(base_dir, qa_data(), tmp_path / "straight", tiny_config(max_steps=16), progress=False)
    a, b = weights(resumed), weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    assert json.loads((resumed / COMPLETE_FILE).read_text())["resumed_from_step"] == 8
    steps = [json.loads(line)["step"] for line in (resumed / LOG_FILE).read_text().splitlines()]
    assert steps == sorted(set(steps))  # the killed run's rows after step 8 were replaced, not duplicated
    # TensorBoard alike (by TensorBoard's own reader): the killed attempt's steps 9-11 hidden by the resumed one's restart marker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumed / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    assert len(list((resumed / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    assert [e.step for e in events.Scalars("train/loss")] == steps


# ---------------------------------------------------------------- bad input and faults


def test_base_model_not_found(tmp_path):
    with pytest.raises(TrainingError, match="no-such-model.*directory not found"):
        train_model(tmp_path / "no-such-model", qa_data(), tmp_path / "m", tiny_config(), progress=False)


def test_incompatible_lora_targets_name_the_key_and_the_real_layers(base_dir, tmp_path):
    cfg = tiny_config()
    cfg.train.lora.target_modules = ["c_fc", "up_proj"]
    with pytest.raises(TrainingError, match=r"train.lora.target_modules: \['c_fc'\] not found.*gate_proj"):
        train_model(base_dir, qa_data(), tmp_path / "m", cfg, progress=False)


def test_portion_empty_after_truncation(base_dir, tmp_path):
    cfg = tiny_config()
    cfg.data.cutoff_len = 10  # the Alpaca prompt alone is longer: no response token survives
    with pytest.raises(TrainingError, match="no example left.*cutoff_len=10"):
        train_model(base_dir, qa_data(4), tmp_path / "m", cfg, progress=False)


def test_nan_loss_stops_with_the_step(tmp_path, tokenizer):
    d = tmp_path / "nan-base"
    model = make_llama(seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    with pytest.raises(TrainingError, match="loss is nan at step 1"):
        train_model(d, qa_data(), tmp_path / "m", tiny_config(), progress=False)
    assert not is_complete(tmp_path / "m")


DISK_FULL_RUN = textwrap.dedent(
    """
    import resource, signal, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from test_train_sft import qa_data, tiny_config
    from dtm.training import train_model, TrainingError

    class FillDisk(TrainerCallback):
        def on_train_end(self, *a, **kw):  # from now on no file may grow past 4 KiB
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    try:
        train_model({base!r}, qa_data(), {out!r}, tiny_config(max_steps=2, save_steps=100), progress=False, callbacks=[FillDisk()])
    except TrainingError as e:
        print("TrainingError:", e)
    """
)


def test_disk_full_while_saving_leaves_nothing_marked_complete(base_dir, tmp_path):
    out = tmp_path / "m"
    script = DISK_FULL_RUN.format(tests=str(Path(__file__).parent), base=str(base_dir), out=str(out))
    res = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert "TrainingError:" in res.stdout and "could not write while saving the trained model" in res.stdout, res.stdout + res.stderr
    assert "disk is full" in res.stdout
    assert not is_complete(out)
    assert not (out / "adapter_model.safetensors").exists()
    assert not list(out.glob(".final.tmp-*"))


def test_cli_trains_one_model_and_reports_bad_input(base_dir, tmp_path, capsys):
    from dtm.cli import main

    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {i} + {i}?", "output": f"{2 * i}."}) + "\n" for i in range(12)))
    args = ["train", "--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "m"), "--full", "--max-steps", "2",
            "--no-progress", "data.cutoff_len=64", "train.per_device_train_batch_size=4"]
    assert main(args) == 0
    assert is_complete(tmp_path / "m") and (tmp_path / "m" / "model.safetensors").exists()
    assert main(["train", "--base", str(tmp_path / "missing"), "--data", str(data), "--out", str(tmp_path / "n")]) == 2
    assert "base model" in capsys.readouterr().err


def test_non_finite_weights_are_never_marked_complete(tmp_path, tokenizer):
    from dtm.training.sft import save_final

    model = make_llama(seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[1, 2] = float("nan")
    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(TrainingError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*non-finite.*not marked complete"):
        save_final(model, tokenizer, out, {"name": "m"})
    assert not is_complete(out) and not (out / "model.safetensors").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tokenizer):
    d = tmp_path / "small-vocab"
    make_llama(vocab_size=256).save_pretrained(d)
    tokenizer.save_pretrained(d)  # 373 tokens
    with pytest.raises(TrainingError, match=r"small-vocab.*tokenizer has \d+ tokens.*256 embedding rows"):
        train_model(d, qa_data(), tmp_path / "m", tiny_config(), progress=False)


def test_a_resumed_runs_event_file_sorts_after_the_killed_ones(tmp_path):
    """TensorBoard reads event files in name order, and a name starts with its second: a run
    resumed within the second of a killed one must still come after it, or the killed run's
    restart marker (read last) hides the resumed run's steps."""
    import socket

    from dtm.training.sft import tensorboard_callback

    now = int(time.time())
    killed = tmp_path / f"events.out.tfevents.{now:010d}.{socket.gethostname()}.999999999.0"  # a later process id
    killed.write_bytes(b"")
    callback = tensorboard_callback(tmp_path, resume_step=10)
    callback.tb_writer.close()
    files = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2 and files[-1] != killed.name


def test_lora_wrapping_logs_no_deprecation_warning():
    """PEFT reads transformers' deprecated `is_gradient_checkpointing`: one FutureWarning in every
    LoRA job's log (issue #14's noise); `apply_lora` keeps it out, and only that warning."""
    import warnings

    from dtm.training.sft import apply_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(make_llama(hidden=64, layers=2, seed=1), tiny_config())
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
