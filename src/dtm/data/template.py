"""Prompt formatting and tokenisation with response-only labels.

A conversation becomes a list of segments (text, trained?) which are tokenised one by one
and concatenated, so the boundary between prompt and response is exact in token space:
labels are the token ids inside response segments and -100 everywhere else. Training and
evaluation both build prompts with `prompt_ids`, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from dtm.data.formats import Conversation, Message
from dtm.errors import DataError

Template = Literal["alpaca", "chat"]
IGNORE_INDEX = -100

# The paper's template (Stanford Alpaca, no-input variant).
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT = ALPACA_SYSTEM + "\n\n" + ALPACA_TURN


def format_prompt(instruction: str, template: Template = "alpaca", tokenizer: Any = None, system: str | None = None) -> str:
    """The prompt text a model sees before its response, as in training."""
    if template == "alpaca":
        return (system or ALPACA_SYSTEM) + "\n\n" + ALPACA_TURN.format(instruction=instruction)
    if template == "chat":
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
        return _chat_template(tokenizer)(msgs, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}")


def _chat_template(tokenizer: Any):
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("template 'chat' needs a tokenizer with a chat template; use data.template: alpaca for base models")
    return tokenizer.apply_chat_template


@lru_cache(maxsize=32)
def _special_prefix_cached(tokenizer_id: int, tokenizer: Any) -> tuple[int, ...]:
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(without)
    if n > 0 and with_special[n:] == without:
        return tuple(with_special[:n])
    return ()


def special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before a text by default (e.g. Llama's BOS), else []."""
    return list(_special_prefix_cached(id(tokenizer), tokenizer))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def prompt_ids(tokenizer: Any, instruction: str, template: Template = "alpaca", system: str | None = None) -> list[int]:
    """Token ids of the prompt exactly as training sees it (special prefix included)."""
    if template == "chat":  # the chat template writes its own BOS text
        return _encode(tokenizer, format_prompt(instruction, "chat", tokenizer, system))
    return special_prefix(tokenizer) + _encode(tokenizer, format_prompt(instruction, "alpaca", system=system))


def _turns(conv: Conversation, first_turn_only: bool) -> tuple[str | None, list[tuple[str, str]]]:
    """(system, [(user, assistant), ...]); consecutive turns of one role are joined."""
    system = next((m.content for m in conv.messages if m.role == "system"), None)
    pairs: list[tuple[str, str]] = []
    user: list[str] = []
    assistant: list[str] = []
    for m in conv.messages:
        if m.role == "system":
            continue
        if m.role == "user":
            if assistant:
                pairs.append(("\n".join(user), "\n".join(assistant)))
                user, assistant = [], []
            user.append(m.content)
        elif user:
            assistant.append(m.content)
    if user and assistant:
        pairs.append(("\n".join(user), "\n".join(assistant)))
    return system, (pairs[:1] if first_turn_only else pairs)


def segments(conv: Conversation, template: Template, tokenizer: Any, first_turn_only: bool = True) -> list[tuple[str, bool]]:
    """The conversation as (text, is_response) pieces in order."""
    system, pairs = _turns(conv, first_turn_only)
    eos = tokenizer.eos_token
    if template == "alpaca":
        if eos is None:
            raise DataError("the tokenizer has no EOS token; the Alpaca template ends each response with it")
        out: list[tuple[str, bool]] = []
        for i, (user, assistant) in enumerate(pairs):
            prompt = format_prompt(user, "alpaca", system=system) if i == 0 else "\n\n" + ALPACA_TURN.format(instruction=user)
            out += [(prompt, False), (assistant, True), (eos, True)]
        return out
    # chat template: render growing prefixes; each new piece is a prompt or a response.
    apply = _chat_template(tokenizer)
    msgs: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    out, done = [], ""
    for user, assistant in pairs:
        msgs.append({"role": "user", "content": user})
        with_prompt = apply(msgs, tokenize=False, add_generation_prompt=True)
        msgs.append({"role": "assistant", "content": assistant})
        full = apply(msgs, tokenize=False)
        if not (with_prompt.startswith(done) and full.startswith(with_prompt)):
            raise DataError("the tokenizer's chat template does not render conversations as growing prefixes; use data.template: alpaca")
        out += [(with_prompt[len(done):], False), (full[len(with_prompt):], True)]
        done = full
    return out


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train on after truncation
    tokens: int = 0
    response_tokens: int = 0
    max_length: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "dropped_ids"} | {"dropped_ids": self.dropped_ids[:20]}


def tokenize_conversation(
    conv: Conversation,
    tokenizer: Any,
    template: Template = "alpaca",
    cutoff_len: int = 1024,
    first_turn_only: bool = True,
) -> tuple[dict[str, list[int]] | None, bool]:
    """-> ({"input_ids", "labels", "attention_mask"} or None if nothing is left to train on, truncated?)."""
    input_ids: list[int] = [] if template == "chat" else special_prefix(tokenizer)
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    for text, is_response in segments(conv, template, tokenizer, first_turn_only):
        ids = _encode(tokenizer, text)
        input_ids += ids
        labels += ids if is_response else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > cutoff_len
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None, truncated
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}, truncated


def tokenize_conversations(
    conversations: list[Conversation],
    tokenizer: Any,
    template: Template = "alpaca",
    cutoff_len: int = 1024,
    first_turn_only: bool = True,
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Tokenise many; examples with no response token left after truncation are dropped and counted."""
    stats = TokenizeStats()
    out = []
    for conv in conversations:
        example, truncated = tokenize_conversation(conv, tokenizer, template, cutoff_len, first_turn_only)
        stats.examples += 1
        stats.truncated += truncated
        if example is None:
            stats.dropped += 1
            stats.dropped_ids.append(conv.id)
            continue
        out.append(example)
        stats.tokens += len(example["input_ids"])
        stats.response_tokens += sum(label != IGNORE_INDEX for label in example["labels"])
        stats.max_length = max(stats.max_length, len(example["input_ids"]))
    return out, stats


def conversation(instruction: str, response: str, id: str = "0") -> Conversation:
    """A one-turn conversation (handy in tests and the lab)."""
    return Conversation([Message("user", instruction), Message("assistant", response)], id=id)
