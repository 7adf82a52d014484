"""Data order as a pure function of (seed, epoch), so a resumed run sees the same batches;
and the data files of ``unipeft train``, read with errors that name the file and the line.

Each epoch is a permutation drawn from a generator seeded with :func:`epoch_seed`, or the
batches a caller's :data:`BatchOrder` gives for ``(seed, epoch)``. The position in the data
is the step alone: step ``s`` is batch ``s % batches_per_epoch`` of epoch
``s // batches_per_epoch``, so resuming skips the consumed batches of the current epoch
without loading them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from .spec import RunConfigError, read_text

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


# ------------------------------------------------------------------------ data files

Example = tuple[str, str, int]
"""``(text, label, line)``: one example of a data file, with the 1-based line it starts on."""

_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def read_examples(
    path: Path, text_column: str, label_column: str, key: str = "data.path"
) -> list[Example]:
    """The examples of a CSV (with a header row) or JSONL file, labels as strings.

    Raises :class:`~unipeft.training.RunConfigError` in one line naming the file, the line
    and the column, and what would be accepted: a missing file or a folder (``key`` names the
    YAML key that gave the path), text that is not UTF-8, an empty file, a missing column, a
    row without its label, a value that is not text or a number.
    """
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise RunConfigError(
            f"data file {path} has suffix {path.suffix!r}; use a .csv (with a header) or a "
            f".jsonl file (fix {key} in the YAML)"
        )
    if not path.exists():
        raise RunConfigError(f"data file {path} does not exist; fix {key} in the YAML")
    text = read_text(path, "the data file")
    if not text.strip():
        shape = f"a header row '{text_column},{label_column}'" if kind == "csv" else "a JSON object"
        raise RunConfigError(f"data file {path} is empty; it needs {shape} and examples")
    columns = (text_column, label_column)
    rows = _read_csv(path, text, columns) if kind == "csv" else _read_jsonl(path, text, columns)
    if not rows:
        raise RunConfigError(f"data file {path} holds no examples, only its header")
    return rows


def _missing_columns(path: Path, where: str, found: list[str], wanted: tuple[str, ...]) -> None:
    for col in wanted:
        if col not in found:
            raise RunConfigError(
                f"{path}{where}: column {col!r} not found; the columns are: "
                f"{', '.join(map(repr, found)) or 'none'}. Fix data.text_column / "
                "data.label_column in the YAML, or the file"
            )


def _read_csv(path: Path, text: str, columns: tuple[str, str]) -> list[Example]:
    import csv
    import io

    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[Example] = []
    try:
        header = next(reader)
        _missing_columns(path, ":1", header, columns)
        index = [header.index(c) for c in columns]
        start = reader.line_num + 1
        for values in reader:
            line, start = start, reader.line_num + 1
            if not values or not any(v.strip() for v in values):
                continue  # a blank line
            if len(values) < len(header):
                missing = header[len(values)]
                raise RunConfigError(
                    f"{path}:{line}: the row has no value for column {missing!r} ({len(values)} "
                    f"of the header's {len(header)} columns: {', '.join(header)})"
                )
            if len(values) > len(header):
                raise RunConfigError(
                    f"{path}:{line}: the row has {len(values)} values but the header has "
                    f"{len(header)} columns ({', '.join(header)}); quote a text holding a comma"
                )
            text_value, label = (values[i] for i in index)
            if not label.strip():
                raise RunConfigError(f"{path}:{line}: the row has no {columns[1]!r}")
            rows.append((text_value, label.strip(), line))
    except csv.Error as exc:
        raise RunConfigError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    return rows


def _read_jsonl(path: Path, text: str, columns: tuple[str, str]) -> list[Example]:
    import json

    rows: list[Example] = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError as exc:
            raise RunConfigError(f"{path}:{line}: not valid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise RunConfigError(
                f"{path}:{line}: each line must be a JSON object with the keys "
                f"{columns[0]!r} and {columns[1]!r}, not a {type(rec).__name__}"
            )
        _missing_columns(path, f":{line}", list(rec), columns)
        values = []
        for col in columns:
            value = rec[col]
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise RunConfigError(
                    f"{path}:{line}: {col!r} must be a string or a number, got {json.dumps(value)}"
                )
            values.append(str(value))
        if not values[1].strip():
            raise RunConfigError(f"{path}:{line}: the {columns[1]!r} is empty")
        rows.append((values[0], values[1].strip(), line))
    return rows


def check_labels(path: Path, rows: list[Example], labels: list[str]) -> None:
    """Every row's label is one of ``labels`` (the training data's): else the first that is
    not, with its line."""
    known = set(labels)
    for _, label, line in rows:
        if label not in known:
            raise RunConfigError(
                f"{path}:{line}: label {label!r} is not among the training data's labels "
                f"({', '.join(map(repr, labels))})"
            )
