"""``unipeft analyze CONFIG.yaml``: sensitivity scores per site and a placement under a
budget for the method of a ``unipeft train`` run configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    """Add the ``analyze`` command to ``app``."""

    @app.command(
        "analyze",
        help="Score every projection of the run's backbone on calibration batches from its "
        "training data and place the run's method under a budget (docs/analysis.md).",
    )
    def analyze(
        config: Annotated[Path, typer.Argument(help="a unipeft train run configuration (YAML)")],
        batches: Annotated[int, typer.Option(min=1, help="calibration batches")] = 8,
        score: Annotated[
            str, typer.Option(help="taylor, fisher, grad_norm, or probe (a trained probe LoRA)")
        ] = "taylor",
        by: Annotated[str, typer.Option(help="place by site, or by role (whole roles)")] = "site",
        probe_steps: Annotated[
            int, typer.Option(min=1, help="steps the probe LoRA trains (--score probe)")
        ] = 32,
        probe_lr: Annotated[float, typer.Option(help="the probe's Adam learning rate")] = 1e-3,
        budget: Annotated[
            str | None, typer.Option(help="e.g. 0.5%; default: the YAML's budget, else 0.5%")
        ] = None,
        rank: Annotated[
            int | None, typer.Option(min=1, help="rank for the taylor score; default config.r")
        ] = None,
        output: Annotated[
            Path | None, typer.Option(help="folder for analysis.json and the heat-map PNG")
        ] = None,
        top: Annotated[int, typer.Option(min=1, help="rows of the printed table")] = 15,
    ) -> None:
        from ..analysis.run import analyze_run
        from ..training.spec import load_run_config
        from ._common import cli_errors

        with cli_errors():
            cfg = load_run_config(config)
            result = analyze_run(
                cfg, batches=batches, rank=rank, score=score, budget=budget, by=by,
                probe_steps=probe_steps, probe_lr=probe_lr,
            )  # fmt: skip
            written = result.write(output, score) if output is not None else []
        out = Console()
        table = Table(title=f"{score} per site ({result.calibration['examples']} examples)")
        shown = ["taylor", "fisher", "grad_norm"] + (["probe"] if score == "probe" else [])
        for col in ("site", *shown, f"{score} rank"):
            table.add_column(col, justify="left" if col == "site" else "right")
        ranked = sorted(result.scores, key=lambda s: -s.score(score))
        for i, s in enumerate(ranked[:top]):
            table.add_row(s.name, *(f"{s.score(c):.3g}" for c in shown), str(i + 1))
        out.print(table)
        p = result.placement
        out.print(
            f"placement of {p.method} {p.config}: targets {p.targets}, {p.parameters} "
            f"parameters ({100 * p.fraction:.3g}% of {p.total})",
            soft_wrap=True,
        )
        for path in written:
            out.print(f"wrote {path}")
