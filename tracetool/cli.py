"""`vmtrace`: offline analysis of vmsup exit traces.

Only wiring: each command is one module of tracetool/commands (its data function, its renderer
and its options); a new command is one new module there and one line in COMMANDS below. Bad
input ends in one `vmtrace: error: …` line and exit code 2 (see commands/_common.py).
"""

from __future__ import annotations

import sys
from importlib import import_module

import typer
from typer.exceptions import TyperException

from .commands._common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, err

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Analyse vmsup exit traces.")


@app.command()
def version() -> None:
    """Print the vmsup version."""
    from importlib.metadata import version as dist_version
    typer.echo(dist_version("vmsup"))


# Each name is a module of tracetool/commands and the command's name, in `vmtrace --help` order.
COMMANDS = (
    "info",
    "show",
    "summary",
    "console",
    "verify",
    "diff",
    "export",
    "replay",
    "plot",
    "screen",
    "sql",
)
for _name in COMMANDS:
    app.command(_name)(import_module(f".commands.{_name}", __package__).run)


@app.callback()
def _root() -> None:
    """Analyse vmsup exit traces."""


def main() -> None:
    """Console-script entry: expected failures become one line and an exit code, never a traceback."""
    from ._alloc import keep_freed_memory
    keep_freed_memory()  # decoding block after block reuses memory instead of faulting in fresh pages
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except TyperException as e:  # usage errors: bad flag values, missing arguments
        err(e.format_message())
        sys.exit(getattr(e, "exit_code", EXIT_BAD_INPUT))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(EXIT_INTERRUPTED)
