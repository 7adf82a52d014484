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
manager that turns a :class:`unipeft.UnipeftError` or :class:`CliError` into a one-line red message
on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import typer

from .._version import __version__
from ._common import EXIT_USAGE, CliError, cli_errors, fail, print_json, stdout_console, warn

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
