"""The lab's word-level tokenizer, trained with `tokenizers`, saved as `PreTrainedTokenizerFast`.

Word level because every entity and every value must be exactly one token (a fact is then one
next-token prediction, and multiple-choice options differ in one token). Text is lower-cased
and split on whitespace and punctuation, so the Alpaca template's words and marks tokenise too.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]

# The lab's prompt format, shipped as the tokenizer's chat template (so `data.template: chat`
# and the evaluator's `prompt_format: chat` use it through the standard HF mechanism): the
# Alpaca turn markers without Alpaca's one-sentence preamble. The preamble was 18 of a lab
# example's 42 tokens on average: pure compute (the step time is linear in tokens), no signal.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}### instruction : {{ m['content'] }} ### response :"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word in `texts` (plus the specials)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1, show_progress=False))
    # A BOS before every text, as Llama tokenizers do; training and evaluation rely on it.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left",  # generation pads on the left
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
