"""The ``unipeft`` console command.

``app`` is a :class:`typer.Typer` application; :func:`main` (the ``[project.scripts]`` entry
point) runs it. Commands live in modules of this package, each exposing
``register(app: typer.Typer) -> None``. :func:`_register_commands` imports and registers
them, so adding a command module takes one import and one register call there::

    def _register_commands(app: typer.Typer) -> None:
        from . import _registry_cmds, mycommands  # <- the import

        _registry_cmds.register(app)
        mycommands.register(app)  # <- the register call

Command modules share the helpers of ``_common`` (re-exported here): :func:`stdout_console`
for tables, :func:`print_json` for machine-readable output, and :func:`cli_errors`, a context
manager that turns bad input (a :class:`unipeft.UnipeftError`, :class:`CliError`, pydantic
validation error, ``ValueError``, ``TypeError`` or ``OSError``) into a one-line red message on
stderr and exit code 2 (no traceback).

:func:`main` runs the command line in-process and returns the exit code: 0 when it worked,
2 for bad input (every refusal, click's usage errors included, is one ``error:`` line and at
most one ``hint:`` line), 1 for an unexpected error (``error: internal error: ...``). The
global ``--debug`` flag prints the traceback before that line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
import typer

from .._version import __version__
from ._common import (
    EXIT_INTERNAL,
    EXIT_USAGE,
    STATE,
    CliError,
    cli_errors,
    fail,
    print_json,
    report,
    stdout_console,
    warn,
)

__all__ = [
    "EXIT_INTERNAL",
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
    debug: bool = typer.Option(
        False, "--debug", help="On an error, print the traceback before the one-line message."
    ),
) -> None:
    """Parameter-efficient fine-tuning across transformers, timm and open_clip."""
    STATE.debug = debug


def _register_commands(app: typer.Typer) -> None:
    """Import every command module and let it add its commands to ``app``."""
    from . import _registry_cmds, analyze, bench, demo, train

    _registry_cmds.register(app)
    train.register(app)
    analyze.register(app)
    demo.register(app)
    bench.register(app)


_register_commands(app)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``unipeft`` command on ``argv`` (default: ``sys.argv[1:]``); return the exit
    code. The console script passes it to :func:`sys.exit`.

    Nothing escapes as a traceback: bad input is reported in one line with exit code 2, any
    other exception as ``error: internal error: ...`` with exit code 1 (with ``--debug``,
    after its traceback)."""
    args = list(sys.argv[1:] if argv is None else argv)
    STATE.debug = False
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="unipeft", standalone_mode=False)
    except (typer.Abort, click.exceptions.Abort):
        fail("interrupted")
        return 130
    except Exception as exc:  # every refusal and every bug ends here as one line
        return report(exc, args)
    finally:
        STATE.debug = False
        sys.stdout.flush()
    return code if isinstance(code, int) else 0
