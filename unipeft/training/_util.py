"""Small helpers of the trainer: the progress bar, moving batches, the metrics log."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn


@contextlib.contextmanager
def progress_bar(total: int, start: int, enabled: bool) -> Iterator[Callable[[Tensor], None]]:
    """A rich progress bar on stderr, shown only when ``enabled`` and stderr is a terminal.
    Yields ``advance(loss)``, to call once per step."""
    console = Console(stderr=True)
    show = enabled and console.is_terminal
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=not show) as bar:
        task = bar.add_task("train", total=total, completed=start)

        def advance(loss: Tensor) -> None:
            if show:  # float() syncs with the GPU: only when someone looks
                bar.update(task, advance=1, description=f"train loss {float(loss):.4f}")

        yield advance


def to_device(batch: Any, device: str) -> Any:
    """``batch`` with every tensor (in nested dicts, lists, tuples) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (those a resumed run will not write again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and 0 < record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)  # a kill here leaves the old log, which the next resume trims


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def find_delta_model(model: nn.Module) -> Any:
    """``model`` itself or the first :class:`~unipeft.DeltaModel` inside it; None if none."""
    from ..model import DeltaModel

    return next((m for m in model.modules() if isinstance(m, DeltaModel)), None)
