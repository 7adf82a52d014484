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


_SWEEP_LINES = (("unipeft_to_floor", "-", "unipeft"), ("peft_to_floor", "--", "PEFT"))


def sweep_chart(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """The sweep's ratio to the floor against the sequence length: one panel per hidden
    size, one colour per rank, unipeft solid and PEFT dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hiddens = sorted({r["hidden"] for r in rows})
    ranks = sorted({r["rank"] for r in rows})
    colours = plt.get_cmap("viridis")
    fig, axes = plt.subplots(
        1, len(hiddens), figsize=(5.5 * len(hiddens), 4.2), squeeze=False, sharey=True
    )
    for ax, hidden in zip(axes[0], hiddens, strict=True):
        for i, rank in enumerate(ranks):
            colour = colours(i / max(1, len(ranks) - 1) * 0.9)
            mine = sorted(
                (r for r in rows if r["hidden"] == hidden and r["rank"] == rank),
                key=lambda r: r["length"],
            )
            for key, style, lib in (
                ("unipeft_to_floor", "-", "unipeft"),
                ("peft_to_floor", "--", "PEFT"),
            ):
                pts = [(r["length"], r[key]) for r in mine if r[key] is not None]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        style,
                        marker="o",
                        color=colour,
                        label=f"{lib} r={rank}",
                    )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] for r in rows if r["hidden"] == hidden})
        ax.set_xticks(lengths, labels=[str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length")
        ax.set_title(f"hidden {hidden}")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("training step ÷ frozen floor")
    axes[0][-1].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
