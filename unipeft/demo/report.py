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
SUMMARY = "summary.json"
PLOT = "accuracy_vs_trainable.png"
_MARKERS = "os^Dv<>PX*hpd8H"


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


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (n - 1; None for one value), min and max."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def summarise(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """One entry per (task, method) over the seeds that ran it: ``seeds``, the method's
    ``family``, ``hyperparameters`` (the first seed's), and for ``accuracy``,
    ``base_accuracy``, ``novel_accuracy`` (when measured), ``trainable_fraction``,
    ``train_seconds`` and ``peak_memory_bytes`` a dict of ``mean``, ``std`` (sample
    standard deviation over seeds, None for one seed), ``min`` and ``max``."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.task, row.method), []).append(row)
    out = []
    for (task, method), group in groups.items():
        entry: dict[str, Any] = {
            "task": task,
            "method": method,
            "family": group[0].family,
            "seeds": [r.seed for r in group],
            "hyperparameters": group[0].hyperparameters,
        }
        for key in (
            "accuracy",
            "base_accuracy",
            "novel_accuracy",
            "trainable_fraction",
            "train_seconds",
            "peak_memory_bytes",
        ):
            values = [getattr(r, key) for r in group]
            entry[key] = None if any(v is None for v in values) else _stats(values)
        out.append(entry)
    return out


def write_summary(directory: Path, rows: Sequence[Row]) -> Path:
    """``summary.json``: :func:`summarise` of the rows."""
    data = summarise(rows)
    target = directory / SUMMARY

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    _atomic_write(target, write)
    return target


def write_plot(directory: Path, rows: Sequence[Row]) -> Path:
    """Accuracy (CLIP task: the harmonic mean of base and novel accuracy) against trainable
    fraction (log x): one panel per task, one marker per method (the same marker for a
    method in every panel), the mean over seeds with a bar of one standard deviation;
    zero-shot, which trains nothing, is a dash-dotted line; dashed: full fine-tuning's
    accuracy, dotted: one point below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    tasks = list(dict.fromkeys(e["task"] for e in summary))
    methods = list(dict.fromkeys(e["method"] for e in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4), squeeze=False)
    cmap = plt.get_cmap("tab20")
    legend: dict[str, Any] = {}
    for ax, task in zip(axes[0], tasks):
        for entry in (e for e in summary if e["task"] == task):
            i = methods.index(entry["method"])
            acc, frac = entry["accuracy"], entry["trainable_fraction"]["mean"]
            if frac == 0:  # nothing trains (zero-shot): a line, not a point on a log axis
                ax.axhline(acc["mean"], color=cmap(i % 20), lw=0.9, ls="-.")
                legend[entry["method"]] = ax.plot([], [], color=cmap(i % 20), ls="-.")[0]
                continue
            spread = acc["std"] if acc["std"] is not None else 0.0
            legend[entry["method"]] = ax.errorbar(
                frac,
                acc["mean"],
                yerr=spread,
                marker=_MARKERS[i % len(_MARKERS)],
                color=cmap(i % 20),
                ms=7,
                capsize=3,
                ls="none",
            )
        full = [
            e["accuracy"]["mean"] for e in summary if e["task"] == task and e["family"] == "full"
        ]
        if full:
            ax.axhline(full[0], color="grey", lw=0.8, ls="--")
            ax.axhline(full[0] - 0.01, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("trainable fraction of parameters (log)")
        hm = any(e["base_accuracy"] is not None for e in summary if e["task"] == task)
        ax.set_ylabel("harmonic mean of base and novel accuracy" if hm else "test accuracy")
        ax.set_title(task, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="lower center",
        ncol=min(len(legend), 8),
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    target = directory / PLOT

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    try:
        _atomic_write(target, write)
    finally:
        plt.close(fig)
    return target


def _cell(stats: dict[str, Any] | None) -> str:
    """``mean`` with one seed, ``mean ± std`` with several; ``-`` when not measured."""
    if stats is None:
        return "-"
    if stats["std"] is None:
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def _lr(hyper: dict[str, Any]) -> str:
    return f"{hyper['lr']:g}" if "lr" in hyper else "-"


def print_table(rows: Sequence[Row], title: str) -> None:
    """The results as a rich table on stdout: per (task, method) the mean (and, with
    several seeds, ± the standard deviation) over the seeds; on the CLIP task accuracy is
    the harmonic mean of the base and novel accuracies shown beside it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name, justify in [
        ("task", "left"),
        ("method", "left"),
        ("family", "left"),
        ("trainable", "right"),
        ("accuracy (HM)", "right"),
        ("base", "right"),
        ("novel", "right"),
        ("lr", "right"),
        ("train s", "right"),
        ("peak mem MiB", "right"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for e in summarise(rows):
        table.add_row(
            e["task"],
            e["method"],
            e["family"],
            f"{100 * e['trainable_fraction']['mean']:.3g}%",
            _cell(e["accuracy"]),
            _cell(e["base_accuracy"]),
            _cell(e["novel_accuracy"]),
            _lr(e["hyperparameters"]),
            f"{e['train_seconds']['mean']:.1f}",
            f"{e['peak_memory_bytes']['mean'] / 2**20:.0f}",
        )
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: room for the whole table
        console = Console(width=200)
    console.print(table)
