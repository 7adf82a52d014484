"""Data order as a pure function of (seed, epoch), so a resumed run sees the same batches.

Each epoch is a permutation drawn from a generator seeded with :func:`epoch_seed`, or the
batches a caller's :data:`BatchOrder` gives for ``(seed, epoch)``. The position in the data
is the step alone: step ``s`` is batch ``s % batches_per_epoch`` of epoch
``s // batches_per_epoch``, so resuming skips the consumed batches of the current epoch
without loading them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

BatchOrder = Callable[[int, int], Sequence[Sequence[int]]]
"""``order(seed, epoch)``: the batches of epoch ``epoch`` as lists of dataset indices. It must
be a function of its arguments alone (a resumed run asks for the same epoch again), and
every epoch must have as many batches."""

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: epochs of nearby seeds do not collide


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the generator that orders epoch ``epoch`` of a run seeded ``seed``."""
    return (seed * _MIX + epoch) % (1 << 63)


def check_dataset(dataset: Any) -> int:
    """The dataset's length; a clear error when it is not a map-style dataset."""
    if isinstance(dataset, IterableDataset) or not (
        hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    ):
        raise TypeError(
            f"train_data must be a map-style dataset (with __len__ and __getitem__, e.g. a list "
            f"or a torch Dataset), got {type(dataset).__name__}: the trainer orders it by seed "
            "so that a resumed run sees the same batches"
        )
    n = len(dataset)
    if n == 0:
        from .state import TrainingError

        raise TrainingError("train_data is empty; give the trainer at least one example")
    return n


class EpochOrder(Sampler[int]):
    """The indices of one epoch, shuffled by a generator seeded ``seed``, from ``start`` on."""

    def __init__(self, size: int, seed: int, start: int = 0) -> None:
        self.size, self.seed, self.start = size, seed, start

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.size - self.start


def batches_per_epoch(size: int, batch_size: int) -> int:
    return math.ceil(size / batch_size)


def epoch_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader[Any]:
    """A DataLoader over epoch ``epoch``, starting after its first ``skip_batches`` batches."""
    order_seed = epoch_seed(seed, epoch)
    sampler = EpochOrder(len(dataset), order_seed, skip_batches * batch_size)  # type: ignore[arg-type]
    # the loader's own generator: an iterator draws its base seed from it, and would otherwise
    # draw from torch's global generator (dropout's), once per epoch started or resumed
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=0,
        generator=torch.Generator().manual_seed(order_seed),
    )


def order_loader(
    dataset: Dataset[Any],
    order: BatchOrder,
    *,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader[Any]:
    """A DataLoader over the batches ``order(seed, epoch)``, after its first ``skip_batches``."""
    batches = [[int(i) for i in b] for b in order(seed, epoch)[skip_batches:]]
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn,
        num_workers=0,
        generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)),
    )
