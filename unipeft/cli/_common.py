"""What every command module shares: errors, output helpers and the exit codes.

Every refusal is one line on stderr, ``error: ...``, and at most one ``hint: ...`` line
after it. :func:`report` writes them for any exception and returns the exit code:
:data:`EXIT_USAGE` (2) for bad input, :data:`EXIT_INTERNAL` (1) for anything else (a bug).
With the global ``--debug`` flag (:data:`STATE`), the traceback is printed first.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click
import typer
from rich.console import Console
from rich.text import Text

from ..contract.errors import UnipeftError

EXIT_OK = 0
EXIT_INTERNAL = 1
"""Exit code of an unexpected error: a bug in unipeft or a plugin, not in the input."""
EXIT_USAGE = 2
"""Exit code of every error the CLI reports (bad input, unknown names, unmet budgets)."""
DEBUG_HINT = "rerun with --debug for the traceback, and report it if it looks like a bug"


@dataclass
class _State:
    debug: bool = False


STATE = _State()
"""Per-invocation settings of the root command (``--debug``)."""


class CliError(Exception):
    """An error in what the user asked the CLI for; its text is shown as is."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def stdout_console() -> Console:
    """A console on the current stdout (created per call, so test runners can capture it)."""
    return Console(highlight=False)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout, without any rich markup."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def one_line(message: object) -> str:
    """``message`` with its lines joined by spaces (blank lines dropped)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _stderr_line(text: str, style: str) -> None:
    Console(stderr=True, soft_wrap=True, highlight=False).print(Text(one_line(text), style=style))


def fail(message: str, hint: str | None = None) -> typer.Exit:
    """Print ``message`` as one red line on stderr (and ``hint`` as a second line); return
    the exit to raise (code 2). Use as ``raise fail("...")``."""
    _stderr_line(f"error: {message}", "bold red")
    if hint:
        _stderr_line(f"hint: {hint}", "dim")
    return typer.Exit(code=EXIT_USAGE)


def warn(message: str) -> None:
    """Print ``message`` as one yellow line on stderr."""
    _stderr_line(f"warning: {message}", "yellow")


# ------------------------------------------------------------------------------ errors


def _validation_summary(exc: Exception) -> str:
    """A pydantic ``ValidationError`` as one line naming each field path."""
    parts = []
    for err in exc.errors():  # type: ignore[attr-defined]
        path = ".".join(str(p) for p in err.get("loc", ())) or "<top level>"
        got = err.get("input")
        shown = f" (got {got!r})" if isinstance(got, str | int | float | bool) else ""
        parts.append(f"{path}: {err.get('msg', 'invalid')}{shown}")
    title = getattr(exc, "title", "the input")
    return f"invalid {title}: " + "; ".join(parts)


def _os_message(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or type(exc).__name__
    if isinstance(exc, IsADirectoryError):
        reason = "is a folder, not a file"
    elif isinstance(exc, FileNotFoundError):
        reason = "does not exist"
    elif isinstance(exc, NotADirectoryError):
        reason = "goes through a file as if it were a folder"
    return f"{name}: {reason}" if name else str(exc) or reason


def is_bad_input(exc: BaseException) -> bool:
    """Whether ``exc`` reports bad input (exit 2) rather than a bug (exit 1).

    unipeft's errors, the CLI's own, pydantic's validation errors, ``ValueError`` and
    ``TypeError`` (how the library refuses a value), and ``OSError`` (a file that is
    missing, unreadable or in the way) are bad input; everything else is a bug."""
    from pydantic import ValidationError

    return isinstance(
        exc, UnipeftError | CliError | ValidationError | ValueError | TypeError | OSError
    )


def describe_error(exc: BaseException) -> tuple[str, str | None]:
    """The one-line message of ``exc`` and its hint (or None)."""
    from pydantic import ValidationError

    hint = getattr(exc, "hint", None) if isinstance(exc, CliError) else None
    if isinstance(exc, UnipeftError | CliError):
        text = str(exc)
    elif isinstance(exc, ValidationError):
        text = _validation_summary(exc)
    elif isinstance(exc, OSError):
        text = _os_message(exc)
    elif isinstance(exc, UnicodeDecodeError):
        text = f"not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    elif isinstance(exc, ValueError | TypeError):
        text = str(exc) or type(exc).__name__
    else:
        text = f"internal error: {type(exc).__name__}: {exc}"
        hint = DEBUG_HINT
    return one_line(text) or type(exc).__name__, hint


def report(exc: BaseException, argv: Sequence[str] = ()) -> int:
    """Print ``exc`` as the one-line refusal (after its traceback with ``--debug``);
    return the exit code. ``argv``, the command line, lets an option's bad value be quoted."""
    if STATE.debug:
        traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.flush()
    if _is_usage_error(exc):
        return _report_click(exc, argv)
    message, hint = describe_error(exc)
    if STATE.debug and hint == DEBUG_HINT:
        hint = None
    fail(message, hint)
    return EXIT_USAGE if is_bad_input(exc) else EXIT_INTERNAL


_CLICK_ERRORS = (typer.TyperException, click.exceptions.ClickException)
"""Typer's command-line parsing errors (its bundled click's) and click's own."""
_PASS_THROUGH = (
    typer.Exit,
    typer.Abort,
    click.exceptions.Exit,
    click.exceptions.Abort,
    *_CLICK_ERRORS,
)


def _is_usage_error(exc: BaseException) -> bool:
    return isinstance(exc, _CLICK_ERRORS) and hasattr(exc, "format_message")


def _report_click(exc: Any, argv: Sequence[str]) -> int:
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed already
        return exc.exit_code
    ctx = getattr(exc, "ctx", None)
    hint = f"see '{ctx.command_path} --help'" if ctx is not None else None
    message = exc.format_message()
    value = _option_value(getattr(exc, "param", None), argv)
    if value is not None and repr(value) not in message:
        message = f"{message.rstrip('.')} (got {value!r})"
    fail(message, hint)
    return EXIT_USAGE


def _option_value(param: Any, argv: Sequence[str]) -> str | None:
    """The value given on the command line to the option ``param`` (its last use)."""
    names = [o for o in getattr(param, "opts", ()) if o.startswith("-")]
    found = None
    for i, word in enumerate(argv):
        for name in names:
            if word == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif word.startswith(f"{name}="):
                found = word.partition("=")[2]
    return found


@contextmanager
def cli_errors() -> Iterator[None]:
    """Report bad input (:func:`is_bad_input`) as one line on stderr and exit with code 2.

    Other exceptions, and every exception under ``--debug``, propagate: :func:`unipeft.cli.main`
    reports them (an internal error: exit 1; with ``--debug``, after the traceback)."""
    try:
        yield
    except _PASS_THROUGH:
        raise
    except Exception as exc:
        if STATE.debug or not is_bad_input(exc):
            raise
        message, hint = describe_error(exc)
        raise fail(message, hint) from None
