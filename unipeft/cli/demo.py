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
    seeds: Annotated[
        str | None,
        typer.Option(
            help="several seeds, e.g. 0,1,2: every row runs once per seed and the table "
            "gives mean ± std (overrides --seed)"
        ),
    ] = None,
    select: Annotated[
        bool,
        typer.Option(
            "--select",
            help="choose every learning rate on a validation split carved from the training "
            "data first (the stored choices otherwise; docs/demo.md)",
        ),
    ] = False,
    jobs: Annotated[
        int | None,
        typer.Option(help="processes on CPU (default 2; more than 2: one row per process)"),
    ] = None,
    tasks: Annotated[
        str, typer.Option(help="some of text,vision,clip (comma-separated)")
    ] = "text,vision,clip",
    quick: Annotated[
        bool, typer.Option("--quick", help="a CI-sized run (small data, few epochs; < 60 s)")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu, or cuda to run on the GPU")] = "cpu",
) -> None:
    """Compare PEFT methods of every family with full fine-tuning and a linear probe, at
    matched trainable budgets: pretrained all-MiniLM-L6-v2 on VADER word polarity, small
    timm / open_clip ViTs pretrained on digits 0-4 and adapted to digits 5-9, and a small
    CLIP adapted few-shot on 5 digits of a shifted domain and scored on those and the 5
    others (base-to-novel)."""
    from ..demo import DemoError, run_demo
    from ._common import cli_errors

    with cli_errors():
        try:
            seed_list = [int(s) for s in seeds.split(",")] if seeds else None
        except ValueError:
            raise DemoError(f"--seeds takes integers separated by commas, got {seeds!r}") from None
        run_demo(
            output,
            seed=seed,
            seeds=seed_list,
            quick=quick,
            device=device,
            jobs=jobs,
            select=select,
            tasks=[t.strip() for t in tasks.split(",") if t.strip()],
        )
