"""``unipeft demo``: the project's main job on its embedded data and models (docs/demo.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to ``app``."""
    app.command("demo")(demo)


def demo(
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="folder for results.json and accuracy_vs_trainable.png"
        ),
    ],
    seed: Annotated[int, typer.Option(help="seed of the data splits, inits and shuffles")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="a CI-sized run (small data, few epochs; < 60 s)")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu, or cuda to run on the GPU")] = "cpu",
) -> None:
    """Compare PEFT methods of every family with full fine-tuning and a linear probe, at
    matched trainable budgets: pretrained all-MiniLM-L6-v2 on VADER word polarity, and
    small timm / open_clip ViTs pretrained on digits 0-4 and adapted to digits 5-9."""
    from ..demo import run_demo
    from ._common import cli_errors

    with cli_errors():
        run_demo(output, seed=seed, quick=quick, device=device)
