"""Shared fixtures: a tiny tokenizer and tiny Llama models built from configs (no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with BOS/EOS/PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from dtm.data.template import ALPACA_PROMPT

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [ALPACA_PROMPT, "the cat sat on the mat.", "What is the capital of France? Paris.", "1 2 3 4 5 6 7 8 9 0 + - = ?"] * 10
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_llama(vocab_size: int = 400, hidden: int = 32, layers: int = 2, seed: int = 0, tie: bool = False):
    """A pico Llama (about 50k parameters) with random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer):
    """A pico Llama (seed 0) with the tiny tokenizer, saved as a `save_pretrained` directory (read only)."""
    d = tmp_path_factory.mktemp("base")
    make_llama(seed=0).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def read_all(model_dir):
    """Every tensor of a model directory's safetensors files, by name."""
    from pathlib import Path

    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def compute_table(report: str) -> dict[str, dict[str, str]]:
    """A report's compute table (markdown): model -> column header -> cell."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | sums |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def pico_finetunes(tmp_path_factory, first_seed: int) -> dict:
    """{"float32" | "bfloat16": (base dir, [3 fine-tune dirs])}: a pico Llama and three copies of it
    plus small seeded noise, each sharded differently (the merge tests' inputs)."""
    import torch

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        root = tmp_path_factory.mktemp(str(dtype).removeprefix("torch."))
        model = make_llama(seed=0)
        model.to(dtype).save_pretrained(root / "base")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        dirs = []
        for i in range(3):
            g = torch.Generator().manual_seed(first_seed + i)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(state[name] + 0.02 * torch.randn(p.shape, generator=g))
            model.to(dtype).save_pretrained(root / f"m{i}", max_shard_size=["1GB", "40KB", "70KB"][i])
            model.float()
            dirs.append(root / f"m{i}")
        out[str(dtype).removeprefix("torch.")] = (root / "base", dirs)
    return out


def merged_files(d) -> dict:
    """A merge output directory's files by name (bytes), without its merge record."""
    from dtm.merging.engine import RECORD

    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.name != RECORD}


def task_vector(seed: int, n: int, kind: str):
    """A merge test's task vector: continuous, coarse (many equal magnitudes, zeros and -0.0) or bf16-valued."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, generator=g) * 0.02
    if kind == "coarse":
        d = torch.round(d * 200) / 4
        d[torch.rand(n, generator=g) < 0.1] = -0.0
    elif kind == "bf16":
        d = d.to(torch.bfloat16).float()
    return d
