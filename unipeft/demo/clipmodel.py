"""The CLIP task's model: a small open_clip CLIP (both towers) with a word-level tokenizer,
its contrastive pretraining on captioned digits.

* :class:`WordTokenizer`: the captions' words, one id each; ``[SOT] words [EOT]`` padded
  with 0, EOT the highest id (open_clip's text tower pools at the argmax of the ids).
* :func:`small_clip`: an open_clip ``CLIP`` (random init, ``pretrained=False``).
* :func:`pretrain_clip`: contrastive pretraining of both towers on clean images of every
  digit against all 40 captions (:data:`TEMPLATES` x the digit names); an image's matches
  are its digit's 4 captions.

The classifier of the adapted rows is :func:`unipeft.clip.zero_shot_head` (see
:mod:`unipeft.demo.clip`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .data import DIGIT_NAMES
from .train import TensorExamples, fetched, shuffled, train

__all__ = [
    "CONTEXT_LENGTH",
    "TEMPLATES",
    "CaptionTargets",
    "ContrastiveCLIP",
    "WordTokenizer",
    "default_tokenizer",
    "pretrain_clip",
    "small_clip",
]

TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a drawing of the digit {}.",
)
"""Caption templates of the pretraining and prompts of the hand-written-prompt rows."""
CONTEXT_LENGTH = 16
"""Token positions of the text tower: room for learned context tokens (CoOp, MaPLe)."""
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """Token ids of texts over a fixed word list: ``tokenizer(texts)`` returns a
    ``(len(texts), context_length)`` long tensor ``[SOT] w1 .. wn [EOT] 0 ...``. Id 0 pads,
    the words take ``1..V-3``, SOT is ``V-2`` and EOT ``V-1`` (the largest id, which open_clip's
    text tower pools at). An unknown word is an error that names it."""

    def __init__(self, words: Sequence[str], context_length: int = CONTEXT_LENGTH) -> None:
        self.words = tuple(dict.fromkeys(words))
        self.ids = {w: i + 1 for i, w in enumerate(self.words)}
        self.sot = len(self.words) + 1
        self.eot = len(self.words) + 2
        self.vocab_size = len(self.words) + 3
        self.context_length = context_length

    @classmethod
    def for_texts(cls, texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> WordTokenizer:
        """A tokenizer whose words are those of ``texts`` (in order of first use)."""
        return cls([w for t in texts for w in _WORD.findall(t.lower())], context_length)

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise ValueError(f"words {unknown} of {text!r} are not in the tokenizer's list")
            ids = [self.sot, *(self.ids[w] for w in words), self.eot][: self.context_length]
            ids[-1] = self.eot
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def default_tokenizer() -> WordTokenizer:
    """The task's tokenizer: every word of every template with every digit name."""
    return WordTokenizer.for_texts([t.format(n) for t in TEMPLATES for n in DIGIT_NAMES])


def small_clip(
    vocab_size: int,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 64,
    depth: int = 4,
    text_width: int = 64,
    text_depth: int = 3,
    embed_dim: int = 64,
) -> nn.Module:
    """A small open_clip ``CLIP``, both towers, random init."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(
        embed_dim=embed_dim,
        vision_cfg=CLIPVisionCfg(
            layers=depth, width=width, head_width=16, patch_size=patch_size, image_size=image_size
        ),
        text_cfg=CLIPTextCfg(
            context_length=CONTEXT_LENGTH,
            vocab_size=vocab_size,
            width=text_width,
            heads=4,
            layers=text_depth,
        ),
    )


def _normed(x: Tensor) -> Tensor:
    return nn.functional.normalize(x, dim=-1)


class ContrastiveCLIP(nn.Module):
    """CLIP's image-to-text contrastive objective with every caption of :data:`TEMPLATES`
    and :data:`DIGIT_NAMES` as the text batch: ``forward(pixels)`` returns ``(B, 40)``
    logits, ``logit_scale * cos(image, caption)``; the labels (:class:`CaptionTargets`)
    spread each image's probability evenly over its digit's captions."""

    def __init__(self, clip: nn.Module, tokenizer: WordTokenizer) -> None:
        super().__init__()
        self.clip = clip
        captions = [t.format(n) for n in DIGIT_NAMES for t in TEMPLATES]
        self.register_buffer("captions", tokenizer(captions), persistent=False)

    def forward(self, pixels: Tensor) -> Tensor:
        image = _normed(self.clip.encode_image(pixels))
        words = _normed(self.clip.encode_text(self.captions))
        return self.clip.logit_scale.exp().clamp(max=100) * image @ words.T


class CaptionTargets(TensorExamples):
    """The pretraining images and, as labels, ``(B, 40)`` targets: ``1/4`` on each of the
    image's digit's captions (digit-major, as :class:`ContrastiveCLIP` orders them)."""

    def __getitems__(self, indices: list[int]) -> tuple[dict[str, Tensor], Tensor]:
        inputs, digits = super().__getitems__(indices)
        targets = torch.zeros(len(digits), len(DIGIT_NAMES), len(TEMPLATES))
        targets[torch.arange(len(digits)), digits] = 1.0 / len(TEMPLATES)
        return inputs, targets.flatten(1)


def pretrain_clip(
    clip: nn.Module,
    x: Tensor,
    digits: Tensor,
    tokenizer: WordTokenizer,
    *,
    seed: int,
    epochs: int,
    device: torch.device,
    batch: int = 128,
    lr: float = 2e-3,
) -> None:
    """Contrastive pretraining of both towers on clean captioned digits (in place)."""
    torch.manual_seed(seed)
    train(
        ContrastiveCLIP(clip, tokenizer).to(device),
        CaptionTargets("pixels", x, digits),
        shuffled(len(digits), batch),
        fetched,
        lr=lr,
        head_lr=None,
        epochs=epochs,
        seed=seed,
        device=device,
        weight_decay=0.05,
        measure_memory=False,
    )
    clip.eval()
