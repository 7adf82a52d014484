"""The demo's outputs: the output folder check, results.json, the plot and the table."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..contract.errors import UnipeftError
from .train import ROW_KEYS, Row

RESULTS = "results.json"
PLOT = "accuracy_vs_trainable.png"
_MARKERS = "os^Dv<>PX*"


class DemoError(UnipeftError):
    """What the demo was asked for cannot be done (reported before any training)."""


class OutputError(DemoError):
    """The demo's output folder cannot be used."""


def check_output(directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove it is writable; raise :class:`OutputError`
    with the reason otherwise. Runs before any training."""
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(
            f"output folder {str(path)!r} cannot be created: it or a parent is a file"
        ) from None
    except OSError as exc:
        raise OutputError(
            f"output folder {str(path)!r} cannot be created: {exc.strerror}"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"output folder {str(path)!r} is not writable ({exc.strerror}); choose another "
            "with --output"
        ) from None
    return path.resolve()


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then ``os.replace`` it into place:
    readers see the old file or the complete new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(directory: Path, rows: Sequence[Row]) -> Path:
    """``results.json``: a list of rows with exactly the keys of :data:`ROW_KEYS`."""
    data = [{k: row.as_dict()[k] for k in ROW_KEYS} for row in rows]
    target = directory / RESULTS

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    _atomic_write(target, write)
    return target


def read_results(directory: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``results.json`` written by :func:`write_results`."""
    return json.loads((Path(directory) / RESULTS).read_text(encoding="utf-8"))


def write_plot(directory: Path, rows: Sequence[Row]) -> Path:
    """Accuracy against trainable fraction (log x): one panel per task, one marker per
    method (the same marker for a method in every panel); dashed: full fine-tuning's
    accuracy, dotted: one point below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, task in zip(axes[0], tasks):
        for row in (r for r in rows if r.task == task):
            i = methods.index(row.method)
            ax.scatter(
                row.trainable_fraction,
                row.accuracy,
                marker=_MARKERS[i % len(_MARKERS)],
                color=cmap(i % 10),
                s=60,
                label=row.method,
            )
        full = [r.accuracy for r in rows if r.task == task and r.family == "full"]
        if full:
            ax.axhline(full[0], color="grey", lw=0.8, ls="--")
            ax.axhline(full[0] - 0.01, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("trainable fraction of parameters (log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(task, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    target = directory / PLOT

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    try:
        _atomic_write(target, write)
    finally:
        plt.close(fig)
    return target


def print_table(rows: Sequence[Row], title: str) -> None:
    """The results as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name, justify in [
        ("task", "left"),
        ("method", "left"),
        ("family", "left"),
        ("trainable", "right"),
        ("accuracy", "right"),
        ("train s", "right"),
        ("peak mem MiB", "right"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            r.task,
            r.method,
            r.family,
            f"{100 * r.trainable_fraction:.3g}%",
            f"{r.accuracy:.4f}",
            f"{r.train_seconds:.1f}",
            f"{r.peak_memory_bytes / 2**20:.0f}",
        )
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: room for the whole table
        console = Console(width=160)
    console.print(table)
