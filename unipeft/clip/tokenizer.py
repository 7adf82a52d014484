"""A word-level tokenizer for small CLIP models trained from scratch (tests, the demo).

open_clip's own tokenizer (``open_clip.get_tokenizer``, 49,408 BPE tokens, shipped in the
wheel) is the one to use with a pretrained CLIP. A model built with a small vocabulary (the
conformance kit's tiny CLIP has 100 tokens) needs ids below its ``vocab_size``:
:class:`WordTokenizer` gives them, in open_clip's conventions: ``0`` pads, the start token
is ``vocab_size - 2`` and the end token ``vocab_size - 1``, the largest id, so that CLIP's
pooling at ``text.argmax(-1)`` finds it.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """``tokenizer(texts) -> LongTensor (N, context_length)``: lower-cased words and single
    punctuation marks, each one id. Words listed in ``words`` get the ids ``1, 2, ...`` in
    that order; any other word a stable hash of it among the remaining ids (collisions are
    possible, so list the words that matter)."""

    def __init__(
        self, vocab_size: int, context_length: int, words: Sequence[str] | None = None
    ) -> None:
        if vocab_size < 4:
            raise ValueError(
                f"vocab_size must be at least 4 (pad, start, end, a word); got {vocab_size}"
            )
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2; got {context_length}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.sot_token_id = vocab_size - 2
        self.eot_token_id = vocab_size - 1
        self.words: dict[str, int] = {}
        for w in words or ():
            w = w.lower()
            if w not in self.words:
                self.words[w] = len(self.words) + 1
        if len(self.words) > vocab_size - 3:
            raise ValueError(
                f"{len(self.words)} listed words do not fit a vocabulary of {vocab_size} "
                f"(ids 1..{vocab_size - 3} are for words)"
            )

    def token_id(self, word: str) -> int:
        known = self.words.get(word)
        if known is not None:
            return known
        free = self.vocab_size - 3 - len(self.words)
        if free <= 0:
            return 1 + zlib.crc32(word.encode()) % (self.vocab_size - 3)
        return len(self.words) + 1 + zlib.crc32(word.encode()) % free

    def encode(self, text: str) -> list[int]:
        return [self.token_id(w) for w in _WORD.findall(text.lower())]

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)[: self.context_length - 2]
            row = [self.sot_token_id, *ids, self.eot_token_id]
            out[i, : len(row)] = torch.tensor(row)
        return out
