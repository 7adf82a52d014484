"""The vision tasks: pretrain a small tower on digits 0-4, adapt it to the held-out 5-9."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .data import DigitsSplit, DigitsTransfer, digits_transfer_split
from .models import ImageClassifier, small_clip_image_tower, small_timm_vit
from .runner import Task, run_recipes
from .train import Batch, Recipe, Row, TensorExamples, accuracy, fetched, shuffled, train

BACKBONES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "timm": ("vision: digits 0-4 -> 5-9 / timm ViT", small_timm_vit),
    "clip": ("vision: digits 0-4 -> 5-9 / open_clip image tower", small_clip_image_tower),
}
FEATURES = 64  # the width of both towers' pooled embedding
BATCH = 64


def image_batches(x: Tensor, y: Tensor) -> list[Batch]:
    """Batches of ``BATCH`` images, in order (evaluation)."""
    return [({"pixels": x[i]}, y[i]) for i in torch.arange(len(y)).split(BATCH)]


def recipes(quick: bool) -> list[Recipe]:
    """The rows of a vision task, at the learning rates picked by a sweep on seed 1 (see
    docs/demo.md); ``quick`` trains a few epochs only."""
    e = 3 if quick else 20
    return [
        Recipe("full fine-tuning", "full", lr=1e-3, head_lr=5e-3, epochs=e),
        Recipe("linear probe", "probe", lr=3e-2, epochs=5 * e),
        Recipe("lora", "reparameterized", "lora", lr=1e-2, epochs=e),
        Recipe("bottleneck_adapter", "additive", "bottleneck_adapter", lr=1e-2, epochs=e),
        Recipe("prompt_tuning", "additive", "prompt_tuning", {"num_tokens": 8}, lr=2e-2, epochs=e),
        Recipe("bitfit", "selective", "bitfit", lr=2e-2, epochs=e),
        Recipe(
            "unipelt", "hybrid", "unipelt", {"bottleneck": 1, "prompt_tokens": 4}, lr=1e-2, epochs=e
        ),
        Recipe("moe_lora", "moe", "moe_lora", {"num_experts": 2}, lr=5e-3, epochs=e),
    ]


def pretrain(
    backbone: nn.Module, data: DigitsSplit, seed: int, epochs: int, device: torch.device
) -> float:
    """Train ``backbone`` fully on ``data`` with a temporary head; its test accuracy."""
    torch.manual_seed(seed)
    clf = ImageClassifier(backbone, FEATURES, data.num_classes).to(device)
    train(
        clf,
        TensorExamples("pixels", data.train_x, data.train_y),
        shuffled(len(data.train_y), BATCH),
        fetched,
        lr=2e-3,
        head_lr=None,
        epochs=epochs,
        seed=seed,
        device=device,
        weight_decay=0.05,
        measure_memory=False,
    )
    return accuracy(clf, image_batches(data.test_x, data.test_y), device)


def build_task(
    kind: str,
    data: DigitsTransfer,
    seed: int,
    quick: bool,
    device: torch.device,
    progress: Callable[[str], None],
) -> Task:
    """Pretrain the ``kind`` tower on the pretraining digits; the task adapts it."""
    name, make_backbone = BACKBONES[kind]
    torch.manual_seed(seed)
    proto = make_backbone()
    acc = pretrain(proto, data.pretrain, seed, 4 if quick else 25, device)
    proto = proto.cpu().eval()
    digits = ", ".join(map(str, data.pretrain.classes))
    progress(f"{name} | pretrained on digits {digits}: test accuracy {acc:.4f}")
    adapt = data.adapt

    def make() -> ImageClassifier:
        return ImageClassifier(copy.deepcopy(proto), FEATURES, adapt.num_classes)

    return Task(
        name=name,
        make=make,
        train_data=TensorExamples("pixels", adapt.train_x, adapt.train_y),
        collate=fetched,
        draw=shuffled(len(adapt.train_y), BATCH),
        test_batches=image_batches(adapt.test_x, adapt.test_y),
        probe_batches=image_batches(adapt.train_x, adapt.train_y),
    )


def run(
    seed: int,
    quick: bool,
    device: torch.device,
    budget: float,
    progress: Callable[[str], None],
    kinds: Sequence[str] = ("timm", "clip"),
    only: Sequence[str] | None = None,
) -> list[Row]:
    """Every vision recipe (or those in ``only``) on each tower in ``kinds``."""
    data = digits_transfer_split(seed, max_adapt_train=160 if quick else None)
    chosen = [r for r in recipes(quick) if only is None or r.name in only]
    rows: list[Row] = []
    for kind in kinds:
        task = build_task(kind, data, seed, quick, device, progress)
        rows += run_recipes(task, chosen, seed, device, budget, progress)
    return rows
