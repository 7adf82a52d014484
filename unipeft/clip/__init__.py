"""CLIP tools: a classifier head built from class names, for zero-shot use and for training
the CLIP methods (``coop``, ``cocoop``, ``maple``, ``clip_adapter``) few-shot.

A tool built on unipeft's public API; the core never imports it.

- :func:`zero_shot_head` / :class:`ClipHead`: ``head(images) -> (B, C)`` logits;
- :func:`init_context`: CoOp/CoCoOp context from a phrase (``"a photo of a"``);
- :class:`WordTokenizer`: a word-level tokenizer for small CLIPs trained from scratch.
"""

from .head import OPENAI_TEMPLATES, ClipHead, default_tokenizer, init_context, zero_shot_head
from .tokenizer import WordTokenizer

__all__ = [
    "OPENAI_TEMPLATES",
    "ClipHead",
    "WordTokenizer",
    "default_tokenizer",
    "init_context",
    "zero_shot_head",
]
