"""What every command module shares: errors, output helpers and the exit code."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from ..contract.errors import UnipeftError

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
