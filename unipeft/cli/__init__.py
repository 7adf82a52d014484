"""The ``unipeft`` console command.

``app`` is a :class:`typer.Typer` application; :func:`main` (the ``[project.scripts]`` entry
point) runs it. Commands live in modules of this package, each exposing
``register(app: typer.Typer) -> None``. :func:`_register_commands` imports and registers
them, so adding a command module takes one import and one register call there::

    def _register_commands(app: typer.Typer) -> None:
        from . import _registry_cmds, mycommands  # <- the import

        _registry_cmds.register(app)
        mycommands.register(app)  # <- the register call

Command modules share the helpers defined here: :func:`stdout_console` for tables,
:func:`print_json` for machine-readable output, and :func:`cli_errors`, a context manager
that turns a :class:`unipeft.UnipeftError` or :class:`CliError` into a one-line red message
on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from .._version import __version__
from ..contract.errors import UnipeftError

__all__ = [
    "EXIT_USAGE",
    "CliError",
    "app",
    "cli_errors",
    "fail",
    "main",
    "print_json",
    "stdout_console",
    "warn",
]

EXIT_USAGE = 2
"""Exit code of every error the CLI reports (bad input, unknown names, unmet budgets)."""


class CliError(Exception):
    """An error in what the user asked the CLI for; its text is shown as is."""


def stdout_console() -> Console:
    """A console on the current stdout (created per call, so test runners can capture it)."""
    return Console(highlight=False)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout, without any rich markup."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _stderr_line(text: str, style: str) -> None:
    Console(stderr=True, soft_wrap=True, highlight=False).print(Text(_one_line(text), style=style))


def fail(message: str) -> typer.Exit:
    """Print ``message`` as one red line on stderr; return the exit to raise (code 2).

    Use as ``raise fail("...")``.
    """
    _stderr_line(f"error: {message}", "bold red")
    return typer.Exit(code=EXIT_USAGE)


def warn(message: str) -> None:
    """Print ``message`` as one yellow line on stderr."""
    _stderr_line(f"warning: {message}", "yellow")


@contextmanager
def cli_errors() -> Iterator[None]:
    """Report unipeft's and the CLI's own errors as :func:`fail` does."""
    try:
        yield
    except (UnipeftError, CliError) as exc:
        raise fail(str(exc)) from None


app = typer.Typer(
    name="unipeft",
    no_args_is_help=True,
    add_completion=False,
    help=(
        "Parameter-efficient fine-tuning across transformers, timm and open_clip: list the "
        "methods, see the plugins that provide them, and inspect what a method would add "
        "to a backbone."
    ),
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"unipeft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Parameter-efficient fine-tuning across transformers, timm and open_clip."""


def _register_commands(app: typer.Typer) -> None:
    """Import every command module and let it add its commands to ``app``."""
    from . import _registry_cmds, bench, demo, train

    _registry_cmds.register(app)
    train.register(app)
    demo.register(app)
    bench.register(app)


_register_commands(app)


def main() -> None:
    """Run the ``unipeft`` command (the console-script entry point)."""
    app()
