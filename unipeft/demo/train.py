"""How the demo trains and scores a row: its recipes and rows, its data order, and the bridge
to :class:`unipeft.training.Trainer`, which runs every training loop of the demo."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..training import Trainer, TrainerConfig, TrainResult

Batch = tuple[dict[str, Tensor], Tensor]
"""Model inputs (keyword arguments) and labels."""
Draw = Callable[[torch.Generator], list[list[int]]]
"""One epoch's batches (lists of example indices), drawn from a generator."""

WEIGHT_DECAY = 0.01
WARMUP = 0.06
"""The share of the steps over which the learning rate warms up (then it decays linearly)."""

ROW_KEYS = (
    "task",
    "method",
    "family",
    "trainable_fraction",
    "accuracy",
    "train_seconds",
    "peak_memory_bytes",
    "seed",
    "hyperparameters",
    "validation",
    "base_accuracy",
    "novel_accuracy",
)


@dataclass(frozen=True)
class Row:
    """One line of the results table (the keys of ``results.json``).

    On the CLIP base-to-novel task ``accuracy`` is the harmonic mean of ``base_accuracy``
    and ``novel_accuracy`` (both None on the other tasks). ``hyperparameters`` are the
    values the row trained with; ``validation`` maps each value tried by a selection run
    (``--select``) to its validation accuracy (empty when the stored choice was used)."""

    task: str
    method: str
    family: str
    trainable_fraction: float
    accuracy: float
    train_seconds: float
    peak_memory_bytes: int
    seed: int = 0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    base_accuracy: float | None = None
    novel_accuracy: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recipe:
    """How one row is trained: a unipeft method (or ``full`` / ``probe``) and its schedule.

    ``config`` holds fixed method fields; the method's size field is chosen by
    :func:`unipeft.plan_budget` for the task's budget unless ``config`` already fixes it.
    """

    name: str
    family: str
    method: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    targets: list[str] | None = None
    lr: float = 1e-3
    epochs: int = 1
    head_lr: float | None = None
    """Learning rate of the head (default: ``lr``)."""
    grid: tuple[float, ...] = ()
    """The learning rates a selection run (``--select``) tries on the validation split;
    ``lr`` is the one stored from the last selection (see :mod:`unipeft.demo.chosen`)."""

    def with_lr(self, lr: float) -> Recipe:
        """This recipe at learning rate ``lr`` (the head's scaled alike, if it has its own)."""
        head = None if self.head_lr is None else self.head_lr * lr / self.lr
        return replace(self, lr=lr, head_lr=head)

    def hyperparameters(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the row trains with: learning rate(s), epochs, targets and the method's
        configuration (``config``: the planned one, with the budget-sized field)."""
        out: dict[str, Any] = {"lr": self.lr, "epochs": self.epochs}
        if self.head_lr is not None:
            out["head_lr"] = self.head_lr
        if self.targets is not None:
            out["targets"] = list(self.targets)
        out.update(config if config is not None else self.config)
        return out


def set_determinism(seed: int, threads: int) -> None:
    """Seed every RNG, fix the thread count and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


class TensorExamples(Dataset[Batch]):
    """Examples ``({key: x[i]}, y[i])``; a batch is fetched in one indexing
    (``__getitems__``, which the DataLoader prefers), so pass :func:`fetched` as its
    collate function."""

    def __init__(self, key: str, x: Tensor, y: Tensor) -> None:
        self.key, self.x, self.y = key, x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Batch:
        return {self.key: self.x[i]}, self.y[i]

    def __getitems__(self, indices: list[int]) -> Batch:
        i = torch.tensor(indices, dtype=torch.long)
        return {self.key: self.x[i]}, self.y[i]


def fetched(batch: Batch) -> Batch:
    """The collate function of :class:`TensorExamples`: the batch as it was fetched."""
    return batch


def shuffled(n: int, batch_size: int) -> Draw:
    """Draw a permutation of ``n`` examples, cut into batches of ``batch_size``."""

    def draw(gen: torch.Generator) -> list[list[int]]:
        return [b.tolist() for b in torch.randperm(n, generator=gen).split(batch_size)]

    return draw


class DrawnInSequence:
    """The demo's data order as the trainer's ``batch_order(seed, epoch)``: one generator,
    seeded once with ``seed``, draws epoch after epoch. The last epoch drawn is kept, so a
    run asking for its epochs in turn draws each once."""

    def __init__(self, draw: Draw) -> None:
        self.draw = draw
        self._seed: int | None = None
        self._gen = torch.Generator()
        self._next = 0
        self._last: list[list[int]] = []

    def __call__(self, seed: int, epoch: int) -> list[list[int]]:
        if seed != self._seed or epoch < self._next - 1:
            self._seed, self._next = seed, 0
            self._gen.manual_seed(seed)
        while self._next <= epoch:
            self._last = self.draw(self._gen)
            self._next += 1
        return self._last


def _loss(model: nn.Module, batch: Batch) -> Tensor:
    inputs, labels = batch
    return nn.functional.cross_entropy(model(**inputs), labels)


def train(
    model: nn.Module,
    data: Dataset[Any] | Sequence[Any],
    draw: Draw,
    collate: Callable[[Any], Batch],
    *,
    lr: float,
    head_lr: float | None,
    epochs: int,
    seed: int,
    device: torch.device,
    weight_decay: float = WEIGHT_DECAY,
    measure_memory: bool = True,
) -> TrainResult:
    """Train ``model``'s trainable parameters with :class:`~unipeft.training.Trainer`, in
    memory: AdamW, a linear warm-up over 6% of the steps then a linear decay, cross-entropy
    plus the model's ``aux_loss()`` (MoE load balancing). ``head_lr`` is the learning rate
    of ``model.head`` (default: ``lr``). Torch's generator is not reseeded: the caller seeds
    it before building the model, and dropout continues that stream."""
    order = DrawnInSequence(draw)
    steps = epochs * len(order(seed, 0))
    config = TrainerConfig(
        steps=steps,
        lr=lr,
        group_lr={"head": head_lr} if head_lr is not None else {},
        weight_decay=weight_decay,
        schedule="linear",
        warmup=WARMUP,
        seed=seed,
        seed_generators=False,
        device=str(device),
        log_every=steps,
        measure_memory=measure_memory,
    )
    trainer = Trainer(
        model,
        _loss,
        data,
        config,
        output_dir=None,
        collate_fn=collate,
        batch_order=order,
        progress=False,
    )
    result = trainer.train()
    model.eval()
    return result


@torch.no_grad()
def accuracy(model: nn.Module, batches: Sequence[Batch], device: torch.device) -> float:
    """The fraction of correct argmax predictions over ``batches``."""
    model.eval()
    correct = seen = 0
    for inputs, labels in batches:
        logits = model(**{k: v.to(device) for k, v in inputs.items()})
        correct += int((logits.argmax(-1).cpu() == labels).sum())
        seen += len(labels)
    return correct / max(1, seen)
