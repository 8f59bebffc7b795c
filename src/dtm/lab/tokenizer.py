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


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word in `texts` (plus the specials)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1, show_progress=False))
    # A BOS before every text, as Llama tokenizers do; training and evaluation rely on it.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left",  # generation pads on the left
    )
