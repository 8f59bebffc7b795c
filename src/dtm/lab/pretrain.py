"""Pretrain the lab's tiny Llama on its world, nanoGPT style: one short loop you can read.

The corpus is an endless, seeded stream of short documents: facts about one entity (75%),
one sum of the addition table (10%), "web text" (5%): the Alpaca template's wording and bare
instructions without answers, as a real pretraining corpus contains them, so that every
word the instruction data uses has a trained embedding (the lab's SFT recipe freezes the
embeddings), and repetitions (10%): a short run of words said twice ("chair tower lenox :
chair tower lenox ."), the generic copying that real text is full of and that real base
models have (induction heads). Without them the base could copy only what its fact
sentences repeat, and no sub-model learned to put the instruction's entity or words at the
start of its response. Each training row starts with BOS at a sentence boundary, as prompts do.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dtm.errors import DtmError
from dtm.io import atomic_directory, atomic_write_json
from dtm.lab import sft_data as S
from dtm.lab.tokenizer import train_tokenizer
from dtm.lab.world import ATTRIBUTES, QA_QUESTION, World, arithmetic_sentences, build_world, entity_sentences, fact_sentences, sum_sentences

log = logging.getLogger(__name__)

ALPACA_PREAMBLE = "below is an instruction that describes a task . write a response that appropriately completes the request ."
MODEL_SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=192, max_position_embeddings=256, tie_word_embeddings=True)
MIX = {"facts": 0.75, "arithmetic": 0.10, "web": 0.05, "copy": 0.10}
MAX_COPY_WORDS = 6


def web_sentences(world: World, seed: int) -> list[str]:
    """Template wording and bare instructions (questions without answers) over the world.

    The sources' habits (the chat opening, the wiki closing) are common web phrases, and
    they must be: the SFT recipe freezes the (tied) embeddings, so a word the base never saw
    keeps its random vector and a model can hardly ever emit it. A base that saw the
    opening once garbled it ("sure ! ! is what i know") in every 1/4-data sub-model."""
    rng = random.Random(f"web-{seed}")
    out = [ALPACA_PREAMBLE, "### instruction :", "### response :", S.OPENING]
    for _ in range(400):
        e, attr = rng.choice(world.entities), rng.choice(list(ATTRIBUTES))
        a, b = rng.randint(0, world.max_addend), rng.randint(0, world.max_addend)
        words = " ".join(rng.choices(S.FILLER_WORDS, k=rng.randint(1, 6)))
        options = " , ".join(rng.sample(ATTRIBUTES[attr], 2)) + " or " + rng.choice(ATTRIBUTES[attr])
        out += [S.QA[0].format(attr=attr, e=e), S.DESCRIBE[0].format(e=e), S.PROFILE[0].format(e=e),
                S.CHOOSE[0].format(attr=attr, e=e, options=options), S.ADD[0].format(a=a, b=b),
                S.REPEAT[0].format(words=words), S.CLOSING.format(e=e), S.OPENING, "the answer is " + rng.choice(ATTRIBUTES[attr]) + " or " + rng.choice(ATTRIBUTES[attr]) + " ."]
    return out


def build_tokenizer(world: World, seed: int) -> PreTrainedTokenizerFast:
    """Vocabulary = every word of the corpus plus the words of the instruction data's templates."""
    numbers = " ".join(str(n) for n in range(4 * world.max_addend + 8))
    extra = [numbers, " ".join(S.FILLER_WORDS), S.OPENING, "the answer is sure ! here is what i know"]
    return train_tokenizer(fact_sentences(world) + arithmetic_sentences(world) + web_sentences(world, seed) + extra)


class SentenceStream:
    """Seeded batches of BOS + short documents, cut to `seq_len + 1` tokens.

    A document is 2-4 sentences about one entity (or one sum), as real text keeps to its
    subject; a web document is one sentence. Repeating the subject teaches the model to
    copy a name or number from its context, which every instruction task needs ("what is
    the job of X ?" -> "the job of X is ...") and which a stream of unrelated sentences
    never asks for.
    """

    def __init__(self, world: World, tokenizer: PreTrainedTokenizerFast, seed: int):
        enc = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
        self.docs = {
            "facts": [enc(entity_sentences(world, e)) for e in world.entities],
            "arithmetic": [enc(sum_sentences(a, b)) for a, b, _ in world.sums()],
            "web": [[ids] for ids in enc(web_sentences(world, seed))],
        }
        self.copy_words = [tokenizer.convert_tokens_to_ids(w) for w in (*S.FILLER_WORDS, *world.entities, *(v for vs in ATTRIBUTES.values() for v in vs))]
        self.marks = [tokenizer.convert_tokens_to_ids(m) for m in (":", ".", ",")]
        self.stop = tokenizer.convert_tokens_to_ids(".")
        self.bos = tokenizer.bos_token_id
        self.rng = random.Random(f"stream-{seed}")

    def repetition(self) -> list[int]:
        words = self.rng.choices(self.copy_words, k=self.rng.randint(1, MAX_COPY_WORDS))
        return [*words, self.rng.choice(self.marks), *words, self.stop]

    def document(self) -> list[int]:
        kind = self.rng.choices(list(MIX), list(MIX.values()))[0]
        if kind == "copy":
            return self.repetition()
        sentences = self.rng.choice(self.docs[kind])
        n = min(len(sentences), self.rng.randint(2, 4))
        return [t for ids in self.rng.sample(sentences, n) for t in ids]

    def row(self, length: int) -> list[int]:
        ids = [self.bos]
        while len(ids) < length:
            ids += self.document()
        return ids[:length]

    def batch(self, batch_size: int, seq_len: int) -> torch.Tensor:
        return torch.tensor([self.row(seq_len + 1) for _ in range(batch_size)])


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def fact_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, world: World, form: str = "raw",
                  limit: int | None = None) -> float:
    """Share of facts whose true value is the model's top next token among all values of
    the attribute (stricter than the 4-option benchmark). form: raw QA or the lab's
    instruction prompt (its chat template)."""
    from dtm.data.template import format_prompt

    model.eval()
    correct = 0
    facts = world.fact_list()[:limit]
    for start in range(0, len(facts), 256):
        chunk = facts[start:start + 256]
        if form == "raw":
            texts = [QA_QUESTION.format(attr=a, e=e) for e, a, _ in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True)
        else:  # the template writes the BOS itself
            texts = [format_prompt(S.QA[0].format(attr=a, e=e), "chat", tokenizer) + f" the {a} of {e} is" for e, a, _ in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        logits = model(**batch.to(model.device)).logits[:, -1]  # left padding: the last position is the next token
        for (_, a, v), row in zip(chunk, logits):
            ids = tokenizer.convert_tokens_to_ids(list(ATTRIBUTES[a]))
            correct += ATTRIBUTES[a][int(row[ids].argmax())] == v
    model.train()
    return correct / len(facts)


def _save_checkpoint(ckpt: Path, step: int, model: LlamaForCausalLM, opt: torch.optim.Optimizer,
                     stream: SentenceStream, recipe: dict) -> None:
    """Everything needed to continue exactly: weights (safetensors), optimizer, stream RNG."""
    from safetensors.torch import save_model

    with atomic_directory(ckpt, overwrite=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding
        torch.save(opt.state_dict(), tmp / "optimizer.pt")  # tensors and numbers only: loads with weights_only
        atomic_write_json(tmp / "state.json", {"step": step, "recipe": recipe, "stream_rng": stream.rng.getstate()})


def _load_checkpoint(ckpt: Path, model: LlamaForCausalLM, opt: torch.optim.Optimizer, stream: SentenceStream,
                     recipe: dict) -> int:
    """-> the step to continue from (0 when there is no checkpoint of this very recipe)."""
    from safetensors.torch import load_model

    state_path = ckpt / "state.json"
    if not state_path.is_file():
        return 0
    state = json.loads(state_path.read_text())
    if state.get("recipe") != recipe:
        log.warning("ignoring pretraining checkpoint %s: made with another recipe %s", ckpt, state.get("recipe"))
        return 0
    load_model(model, str(ckpt / "model.safetensors"))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    version, internal, gauss = state["stream_rng"]
    stream.rng.setstate((version, tuple(internal), gauss))
    log.info("resuming lab pretraining from step %d (%s)", state["step"], ckpt)
    return int(state["step"])


def pretrain_base(out: str | Path, seed: int = 0, steps: int = 3000, batch_size: int = 64, seq_len: int = 48,
                  lr: float = 3e-3, overwrite: bool = False, progress: bool = True, checkpoint_every: int = 250,
                  shape: dict | None = None, device: str = "cpu") -> Path:
    """Build the world, train the tokenizer, pretrain the model and save both in `out`.

    `shape` overrides `MODEL_SHAPE` keys (a larger lab model, e.g. for `benchmarks/gpu_check.py`);
    `device` is where the model trains (fp32 weights; bf16 autocast on CUDA, as a GPU run would).

    Writes `save_pretrained` files (safetensors), the tokenizer, `world.json` and `lab.json`
    (recipe, timings, knowledge accuracy). About 5 minutes on one idle CPU thread. An
    interrupted run continues from its last checkpoint (`.<out>.pretrain-ckpt` beside `out`).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists() and not overwrite:
        raise DtmError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    if steps < 1:
        raise DtmError(f"steps must be at least 1, got {steps}")
    torch.manual_seed(seed)
    world = build_world(seed)
    tokenizer = build_tokenizer(world, seed)
    shape = MODEL_SHAPE | (shape or {})
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    model = LlamaForCausalLM(config).to(device)
    stream = SentenceStream(world, tokenizer, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    recipe = {"seed": seed, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "shape": shape, "vocab": len(tokenizer)}
    ckpt = out.parent / f".{out.name}.pretrain-ckpt"
    first = _load_checkpoint(ckpt, model, opt, stream, recipe)
    start = time.time()
    bar = tqdm(range(first, steps), desc="pretrain lab base", disable=not progress, initial=first, total=steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=100)
        rows = stream.batch(batch_size, seq_len).to(device)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
            loss = model(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.info("pretrain step %d loss %.4f", step, loss.item())
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, step + 1, model, opt, stream, recipe)
    seconds = time.time() - start
    model.eval()
    info = {
        "world_seed": seed, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
        "pretrain_seconds": round(seconds, 1), "resumed_from_step": first, "torch_threads": torch.get_num_threads(), "final_loss": round(loss.item(), 4),
        "device": str(model.device), "shape": shape,
        "fact_accuracy_raw": fact_accuracy(model, tokenizer, world, "raw"),
        "fact_accuracy_instruct": fact_accuracy(model, tokenizer, world, "instruct"),
        "regenerate": f"dtm lab pretrain --out DIR --seed {seed} --steps {steps}",
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "world.json", world.to_dict())
        atomic_write_json(tmp / "lab.json", info)
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("lab base saved to %s: %s", out, json.dumps(info))
    return out
