"""The demo's hyperparameters as chosen on validation splits, never on test splits.

Each recipe of the demo names a starting learning rate; its grid is that rate times
:data:`FACTORS`. ``unipeft demo --select`` trains every grid point on a validation split
carved from the task's training data (text: the last 10% of the training words; vision:
the last 20% of the adaptation training images; CLIP: 8 held-out shots per base class),
keeps the best validation accuracy (the first of equals), and only then trains on the
training data with it and scores on the test split. :data:`CHOSEN` holds what such a run
with seed 0 chose (``python -m unipeft.demo --output DIR --select``; the ``validation``
field of its ``results.json`` rows lists every score), so a plain run trains once per row
with those rates. A row not listed here trains at its starting rate.
"""

from __future__ import annotations

from collections.abc import Sequence

from .train import Recipe

__all__ = ["CHOSEN", "FACTORS", "chosen"]

FACTORS = (0.5, 1.0, 2.0)
"""A recipe's learning-rate grid: its starting rate times these."""

_TEXT = "text: VADER polarity / all-MiniLM-L6-v2"
_TIMM = "vision: digits 0-4 -> 5-9 / timm ViT"
_TOWER = "vision: digits 0-4 -> 5-9 / open_clip image tower"
_CLIP = "clip: digits base-to-novel / open_clip CLIP"
_RESNET = "vision: digits 0-4 -> 5-9 / timm ResNet"

CHOSEN: dict[str, dict[str, float]] = {
    _TEXT: {
        "full fine-tuning": 4e-4,  # validation 0.9449 / 0.9467 / 0.9522 at 1e-4 / 2e-4 / 4e-4
        "linear probe": 2e-2,  # 0.8952 / 0.9026 / 0.9062 at 5e-3 / 1e-2 / 2e-2
        "lora": 2.5e-3,  # 0.9412 / 0.9393 / 0.5754 at 2.5e-3 / 5e-3 / 1e-2
        "bottleneck_adapter": 3e-3,  # 0.9301 / 0.9357 / 0.9320 at 1.5e-3 / 3e-3 / 6e-3
        "prompt_tuning": 3e-2,  # 0.9136 / 0.9265 / 0.9118 at 1.5e-2 / 3e-2 / 6e-2
        "bitfit": 5e-3,  # 0.9136 / 0.9173 / 0.9173 at 2.5e-3 / 5e-3 / 1e-2
        "unipelt": 6e-3,  # 0.9338 / 0.9375 / 0.9412 at 1.5e-3 / 3e-3 / 6e-3
        "moe_lora": 5e-3,  # 0.9246 / 0.9412 / 0.9320 at 2.5e-3 / 5e-3 / 1e-2
    },
    _TIMM: {
        "full fine-tuning": 2e-3,  # 0.9040 / 0.9200 / 0.9280 at 5e-4 / 1e-3 / 2e-3
        "linear probe": 6e-2,  # 0.7840 / 0.7920 / 0.8080 at 1.5e-2 / 3e-2 / 6e-2
        "lora": 2e-2,  # 0.8960 / 0.9200 / 0.9280 at 5e-3 / 1e-2 / 2e-2
        "bottleneck_adapter": 5e-3,  # 0.8400 / 0.8080 / 0.8320 at 5e-3 / 1e-2 / 2e-2
        "prompt_tuning": 4e-2,  # 0.7040 / 0.7520 / 0.7600 at 1e-2 / 2e-2 / 4e-2
        "bitfit": 1e-2,  # 0.7680 / 0.6640 / 0.5280 at 1e-2 / 2e-2 / 4e-2
        "unipelt": 2e-2,  # 0.8720 / 0.8480 / 0.9040 at 5e-3 / 1e-2 / 2e-2
        "moe_lora": 1e-2,  # 0.8240 / 0.8880 / 0.9040 at 2.5e-3 / 5e-3 / 1e-2
    },
    _TOWER: {
        "full fine-tuning": 2e-3,  # 0.9520 / 0.9600 / 0.9680 at 5e-4 / 1e-3 / 2e-3
        "linear probe": 6e-2,  # 0.8800 / 0.8880 / 0.9040 at 1.5e-2 / 3e-2 / 6e-2
        "lora": 5e-3,  # 0.9680 / 0.9600 / 0.9680 at 5e-3 / 1e-2 / 2e-2
        "bottleneck_adapter": 1e-2,  # 0.9200 / 0.9520 / 0.9200 at 5e-3 / 1e-2 / 2e-2
        "prompt_tuning": 2e-2,  # 0.8640 / 0.8800 / 0.8640 at 1e-2 / 2e-2 / 4e-2
        "bitfit": 4e-2,  # 0.8560 / 0.8960 / 0.9120 at 1e-2 / 2e-2 / 4e-2
        "unipelt": 5e-3,  # 0.9680 / 0.9600 / 0.9520 at 5e-3 / 1e-2 / 2e-2
        "moe_lora": 1e-2,  # 0.9360 / 0.9600 / 0.9760 at 2.5e-3 / 5e-3 / 1e-2
    },
    _RESNET: {
        "full fine-tuning": 2e-3,  # 0.9680 / 0.9760 / 0.9840 at 5e-4 / 1e-3 / 2e-3
        "linear probe": 3e-2,  # 0.8480 / 0.8800 / 0.8720 at 1.5e-2 / 3e-2 / 6e-2
        "lora": 1e-2,  # 0.9920 / 1.0000 / 0.9920 at 5e-3 / 1e-2 / 2e-2
        "dora": 1e-2,  # 0.9920 / 1.0000 / 1.0000 at 5e-3 / 1e-2 / 2e-2
        "bottleneck_adapter": 2e-2,  # 0.9600 / 0.9840 / 1.0000 at 5e-3 / 1e-2 / 2e-2
        "ssf": 2e-2,  # 0.9280 / 0.9520 / 0.9680 at 5e-3 / 1e-2 / 2e-2
        "bitfit": 4e-2,  # 0.8960 / 0.9360 / 0.9440 at 1e-2 / 2e-2 / 4e-2
        "visual_prompt": 1e-1,  # 0.9280 / 0.9280 / 0.9520 at 2.5e-2 / 5e-2 / 1e-1
    },
    _CLIP: {  # base accuracy on the 40 held-out base shots (the novel classes play no part)
        "linear probe": 2e-2,  # 0.875 / 0.875 / 0.900 at 5e-3 / 1e-2 / 2e-2
        "full fine-tuning": 2e-4,  # 0.850 / 0.850 / 0.900 at 5e-5 / 1e-4 / 2e-4
        "lora": 2e-3,  # 0.825 / 0.850 / 0.850 at 1e-3 / 2e-3 / 4e-3
        "coop": 1e-2,  # 0.700 / 0.675 / 0.725 at 2.5e-3 / 5e-3 / 1e-2
        "cocoop": 1e-2,  # 0.725 / 0.700 / 0.750 at 2.5e-3 / 5e-3 / 1e-2
        "clip_adapter": 4e-3,  # 0.750 / 0.800 / 0.850 at 1e-3 / 2e-3 / 4e-3
        "maple": 2e-3,  # 0.825 / 0.850 / 0.825 at 1e-3 / 2e-3 / 4e-3 (chosen on the 2-core
        # machine of docs/demo.md, torch 2.14: MaPLe arrived after the 16-core selection)
    },
}
"""Task name -> recipe name -> the learning rate ``--select`` chose on seed 0 (the comments:
the validation accuracies at the grid's rates). Chosen by
``python -m unipeft.demo --output DIR --select --jobs 16`` on a 16-core x86 CPU (torch
2.11, transformers 5.17); a rerun elsewhere may round differently and, where two rates are
close, choose the other."""


def chosen(task: str, recipes: Sequence[Recipe], quick: bool) -> list[Recipe]:
    """``recipes`` with their grids set and, in a full run, their chosen learning rates
    (a quick run keeps the starting rates: its schedules are not the ones chosen for)."""
    out = []
    for recipe in recipes:
        grid = tuple(recipe.lr * f for f in FACTORS)
        lr = recipe.lr if quick else CHOSEN.get(task, {}).get(recipe.name, recipe.lr)
        out.append(Recipe(**{**recipe.__dict__, "grid": grid}).with_lr(lr))
    return out
