"""`vmtrace`: offline analysis of vmsup exit traces."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Analyse vmsup exit traces.")


@app.command()
def version() -> None:
    """Print the vmsup version."""
    from importlib.metadata import version as dist_version
    typer.echo(dist_version("vmsup"))


@app.callback()
def _root() -> None:
    """Analyse vmsup exit traces."""


def main() -> None:
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
