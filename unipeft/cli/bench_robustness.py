"""``unipeft bench robustness``: the demo's recipes on clean and corrupted test inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ._common import cli_errors, fail

_console = Console()


def _names(value: str | None, option: str) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise fail(f"{option} {value!r} names nothing; give a comma-separated list")
    return names


def _tables(result: dict[str, Any]) -> list[Table]:
    """One table per task: clean accuracy, mCA and the two ratios of each recipe."""

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    tables: dict[str, Table] = {}
    for r in result["rows"]:
        table = tables.get(r["task"])
        if table is None:
            table = tables[r["task"]] = Table(title=r["task"])
            for col in ("recipe", "clean", "mCA", "mCA / clean", "mCA / full FT"):
                table.add_column(col, justify="left" if col == "recipe" else "right")
        table.add_row(
            r["method"], cell(r["clean"]), cell(r["mca"]), cell(r["relative"]), cell(r["vs_full"])
        )
    return list(tables.values())


def robustness_cmd(
    output: Annotated[
        Path,
        typer.Option(
            "--output", help="folder for robustness.json, robustness.md and robustness.png"
        ),
    ],
    quick: Annotated[
        bool, typer.Option(help="the demo's quick mode: small data, few epochs (for CI)")
    ] = False,
    seed: Annotated[int, typer.Option(min=0, help="the demo's seed: split, init, order")] = 0,
    tasks: Annotated[
        str | None, typer.Option(help="some of text,vision,clip (default: all three)")
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="some of the demo's recipes, e.g. 'full fine-tuning,lora' (default: all)"
        ),
    ] = None,
) -> None:
    """Accuracy of every demo recipe on clean test data and under corruptions at three
    severities (images: noise, blur, contrast, rotation, occlusion; words: swaps, casing,
    repeated letters; CLIP: prompt templates too): mean corruption accuracy, relative to
    clean and to full fine-tuning (JSON, markdown, PNG). See docs/robustness.md."""
    from ..bench import check_writable
    from ..bench.robustness import TASKS, check_request, run_robustness, write_outputs

    with cli_errors():  # every check before check_writable creates the folder
        chosen = _names(tasks, "--tasks") or list(TASKS)
        picked = _names(methods, "--methods")
        check_request(chosen, picked)
        if output.exists() and not output.is_dir():
            raise fail(f"--output {output} is a file; give a folder")
        out = check_writable(output)
    result = run_robustness(
        seed=seed,
        quick=quick,
        tasks=chosen,
        methods=picked,
        progress=lambda line: _console.print(f"[dim]{line}[/]", highlight=False),
    )
    written = write_outputs(result, out)
    mode = "quick" if result["quick"] else "full"
    _console.print(f"robustness ({mode} run, seed {result['seed']}): {result['seconds']:.0f} s")
    for table in _tables(result):
        _console.print(table)
    _console.print(f"written to {out}: {', '.join(p.name for p in written)}")


def summary_cmd(
    runs: Annotated[
        list[Path],
        typer.Argument(help="the --output folders (or robustness.json files) of the seeds' runs"),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", help="folder for robustness-seeds.json and robustness-seeds.md"),
    ],
) -> None:
    """Mean ± standard deviation over seeds of each recipe's clean accuracy, mCA and the two
    ratios, from runs of `unipeft bench robustness --seed N` (one seed per run; a seed may
    come as several runs over different tasks). See docs/robustness.md."""
    from ..bench import check_writable
    from ..bench.robustness_summary import (
        read_results,
        summarise,
        summary_markdown,
        write_summary,
    )

    with cli_errors():
        summary = summarise(read_results(runs))
        if output.exists() and not output.is_dir():
            raise fail(f"--output {output} is a file; give a folder")
        out = check_writable(output)
    written = write_summary(summary, out)
    _console.print(summary_markdown(summary), highlight=False, markup=False)
    _console.print(f"written to {out}: {', '.join(p.name for p in written)}")


def register(bench: typer.Typer) -> None:
    """Add ``robustness`` and ``robustness-summary`` to the ``unipeft bench`` group."""
    bench.command("robustness")(robustness_cmd)
    bench.command("robustness-summary")(summary_cmd)
