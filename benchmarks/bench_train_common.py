"""Shared pieces of the training benchmarks: machine facts, tiny bases, synthetic data, a step timer."""

from __future__ import annotations

import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tokenizer

from dtm.config import ExperimentConfig
from dtm.data.template import conversation

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import transformers

    return {
        "cores": os.cpu_count(),
        "load_avg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
        "threads_per_process": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }


def save_base(out: Path, hidden: int, layers: int, vocab: int, intermediate: int | None = None, heads: int = 4,
              tie: bool = False, seed: int = 0) -> tuple[Path, int]:
    """A Llama built from a config (random weights) plus the test tokenizer, saved as a model dir."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=1024, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


WORDS = ["the", "cat", "sat", "on", "mat", "what", "is", "capital", "of", "france", "paris", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "plus", "minus", "equals"]


def synthetic_data(n: int, seed: int = 0, mean_words: float = 12.0, spread: float = 0.8, max_words: int = 200) -> list:
    """Instruction/response pairs with log-normal response lengths (a realistic long-tailed spread)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        instr = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        words = min(max_words, max(1, int(rng.lognormvariate(0, spread) * mean_words)))
        out.append(conversation(f"{instr} {i}?", " ".join(rng.choice(WORDS) for _ in range(words)), id=str(i)))
    return out


def bench_config(**train) -> ExperimentConfig:
    cfg = ExperimentConfig(seed=0)
    cfg.data.cutoff_len = 512
    settings = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "warmup_steps": 0, "learning_rate": 1e-4, "logging_steps": 5, "save_steps": 10**6, "group_by_length": False}
    for k, v in (settings | train).items():
        setattr(cfg.train, k, v)
    return cfg


class TrainTimer(TrainerCallback):
    """Wall time of the training loop only (from train begin to train end), and the process's CPU time
    (user + system) over it: on a shared machine the CPU time moves less with other jobs."""

    def __init__(self):
        self.start = self.seconds = self.cpu_start = self.cpu_seconds = 0.0
        self.first_loss: float | None = None

    def on_train_begin(self, *a, **kw):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_end(self, *a, **kw):
        self.seconds, self.cpu_seconds = time.perf_counter() - self.start, time.process_time() - self.cpu_start

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs and self.first_loss is None:
            self.first_loss = float(logs["loss"])
