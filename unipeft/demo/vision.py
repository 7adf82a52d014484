"""The vision tasks: pretrain a small tower on digits 0-4, adapt it to the held-out 5-9."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .chosen import chosen
from .data import DigitsSplit, DigitsTransfer, digits_transfer_split
from .models import ImageClassifier, small_clip_image_tower, small_timm_resnet, small_timm_vit
from .runner import Task, run_recipes
from .train import Batch, Recipe, Row, TensorExamples, accuracy, fetched, shuffled, train

BACKBONES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "timm": ("vision: digits 0-4 -> 5-9 / timm ViT", small_timm_vit),
    "clip": ("vision: digits 0-4 -> 5-9 / open_clip image tower", small_clip_image_tower),
    "convnet": ("vision: digits 0-4 -> 5-9 / timm ResNet", small_timm_resnet),
}
FEATURES = 64  # the width of every tower's pooled embedding
CONVNET_BUDGET = 0.05
"""The ConvNet's trainable budget: a rank-1 LoRA on its 3x3 convolutions already trains
2.3% of it (A spans in_channels x 9 kernel taps), more than the ViTs' 2%."""
BATCH = 64


def image_batches(x: Tensor, y: Tensor) -> list[Batch]:
    """Batches of ``BATCH`` images, in order (evaluation)."""
    return [({"pixels": x[i]}, y[i]) for i in torch.arange(len(y)).split(BATCH)]


VALIDATION_FRACTION = 0.2
"""The share of the adaptation training images held out to choose hyperparameters."""


def budget_for(kind: str, budget: float) -> float:
    """The trainable budget of the ``kind`` tower's rows (the ConvNet's is at least
    :data:`CONVNET_BUDGET`)."""
    return max(budget, CONVNET_BUDGET) if kind == "convnet" else budget


def recipes(quick: bool, kind: str = "timm") -> list[Recipe]:
    """The rows of the vision task on the ``kind`` tower (``quick``: a few epochs only), at
    the learning rates that ``--select`` chose on seed 0's validation split
    (:data:`unipeft.demo.chosen.CHOSEN`)."""
    e = 3 if quick else 20
    rows = _convnet_recipes(e) if kind == "convnet" else _recipes(e)
    return chosen(BACKBONES[kind][0], rows, quick)


def _convnet_recipes(e: int) -> list[Recipe]:
    """The ConvNet's rows: the methods that apply to convolutions, stages and batch norms,
    and a visual prompt at the stem (token prompts need tokens, and UniPELT's and
    MoE-LoRA's routers read channels last)."""
    return [
        Recipe("full fine-tuning", "full", lr=1e-3, head_lr=5e-3, epochs=e),
        Recipe("linear probe", "probe", lr=3e-2, epochs=5 * e),
        Recipe("lora", "reparameterized", "lora", lr=1e-2, epochs=e),
        Recipe("dora", "reparameterized", "dora", lr=1e-2, epochs=e),
        Recipe("bottleneck_adapter", "additive", "bottleneck_adapter", lr=1e-2, epochs=e),
        Recipe("ssf", "additive", "ssf", lr=1e-2, epochs=e),
        Recipe("bitfit", "selective", "bitfit", lr=2e-2, epochs=e),
        Recipe(
            "visual_prompt",
            "additive",
            "visual_prompt",
            {"padding": 4, "resolution": 32},  # the paper's 30 of 224, on 32-pixel digits
            lr=5e-2,
            epochs=e,
        ),
    ]


def _recipes(e: int) -> list[Recipe]:
    return [
        Recipe("full fine-tuning", "full", lr=1e-3, head_lr=5e-3, epochs=e),
        Recipe("linear probe", "probe", lr=3e-2, epochs=5 * e),
        Recipe("lora", "reparameterized", "lora", lr=1e-2, epochs=e),
        Recipe("bottleneck_adapter", "additive", "bottleneck_adapter", lr=1e-2, epochs=e),
        Recipe("prompt_tuning", "additive", "prompt_tuning", {"num_tokens": 8}, lr=2e-2, epochs=e),
        Recipe("bitfit", "selective", "bitfit", lr=2e-2, epochs=e),
        Recipe(
            "unipelt", "hybrid", "unipelt", {"bottleneck": 1, "prefix_tokens": 3}, lr=1e-2, epochs=e
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

    n_fit = len(adapt.train_y) - round(VALIDATION_FRACTION * len(adapt.train_y))
    return _task(name, make, (adapt.train_x, adapt.train_y), (adapt.test_x, adapt.test_y), n_fit)


def _task(
    name: str,
    make: Callable[[], ImageClassifier],
    train_set: tuple[Tensor, Tensor],
    test_set: tuple[Tensor, Tensor],
    n_fit: int | None,
) -> Task:
    """A task; with ``n_fit``, its validation task trains on the first ``n_fit`` training
    images (already in the seed's shuffled order) and scores on the rest."""
    (x, y), (tx, ty) = train_set, test_set
    return Task(
        name=name,
        make=make,
        train_data=TensorExamples("pixels", x, y),
        collate=fetched,
        draw=shuffled(len(y), BATCH),
        test_batches=image_batches(tx, ty),
        probe_batches=image_batches(x, y),
        validation=None
        if n_fit is None
        else lambda: _task(name, make, (x[:n_fit], y[:n_fit]), (x[n_fit:], y[n_fit:]), None),
    )


def run(
    seed: int,
    quick: bool,
    device: torch.device,
    budget: float,
    progress: Callable[[str], None],
    kinds: Sequence[str] = ("timm", "clip"),
    only: Sequence[str] | None = None,
    select: bool = False,
) -> list[Row]:
    """Every vision recipe (or those in ``only``) on each tower in ``kinds``; ``select``:
    choose each learning rate on the validation split first."""
    data = digits_transfer_split(seed, max_adapt_train=160 if quick else None)
    rows: list[Row] = []
    for kind in kinds:
        picked = [r for r in recipes(quick, kind) if only is None or r.name in only]
        task = build_task(kind, data, seed, quick, device, progress)
        at = budget_for(kind, budget)
        rows += run_recipes(task, picked, seed, device, at, progress, select=select)
    return rows
