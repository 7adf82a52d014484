"""``python -m unipeft.demo --output DIR [--seed N] [--quick]``: the demo on its own."""

from __future__ import annotations

import typer

from ..cli.demo import register


def main() -> None:
    """Run the demo command as a program of its own."""
    app = typer.Typer(add_completion=False)
    register(app)
    app(prog_name="python -m unipeft.demo")


if __name__ == "__main__":
    main()
