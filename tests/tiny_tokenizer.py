"""A word-level tokenizer built in memory (no Hub): the most common WikiText-2 words, the rest <unk>.

Enough to run the text paths (WikiText-2 perplexity, saving and pushing a tokenizer) on the tiny
models of tiny_models.py, whose vocabulary it matches.
"""

from __future__ import annotations

from collections import Counter

from tiny_models import VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_prune.calibration.data import wikitext2_test_text


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = [word for word, _ in Counter(wikitext2_test_text().split()).most_common(VOCAB - 1)]
    vocab = {"<unk>": 0, **{word: index + 1 for index, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
