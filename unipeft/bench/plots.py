"""PNG charts for the benchmark rows (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def bar_chart(rows: list[dict[str, Any]], value: str, label: str, title: str, path: Path) -> None:
    """One bar per row (``row['variant']``), skipping rows without ``value``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [r for r in rows if r.get(value) is not None]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["variant"] for r in kept], [r[value] for r in kept], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def line_chart(
    rows: list[dict[str, Any]], x: str, y: str, xlabel: str, ylabel: str, title: str, path: Path
) -> None:
    """``y`` against ``x`` (log x), one marker per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
