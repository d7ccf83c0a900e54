"""`vmsup`: launch KVM guests and see every exit they make."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Optional

import typer
from typer.exceptions import TyperException

from vmworker import status
from vmworker.errors import VmsupError
from vmworker.spec import VmSpec, parse_address, parse_size

from . import render
from .guests import resolve_guest
from .launch import run_worker

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Run tiny KVM virtual machines and see every exit they make.")


class Mode(str, Enum):
    real = "real"
    protected = "protected"
    long = "long"


@app.callback()
def _root() -> None:
    """Run tiny KVM virtual machines and see every exit they make."""


def _err(message: str) -> None:
    typer.echo(f"vmsup: error: {message}", err=True)


@app.command()
def launch(
    guest: str = typer.Argument(..., help="A guest image (flat binary or ELF) or a bundled guest name, e.g. seed16."),
    mem: str = typer.Option("16M", "--mem", help="Guest RAM: bytes or K/M/G suffix (16M, 512000000, 1G)."),
    load_addr: Optional[str] = typer.Option(None, "--load-addr", help="Flat binaries: guest-physical load address [0x10000]."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Entry address [the load address, or the ELF's]."),
    mode: Optional[Mode] = typer.Option(None, "--mode", help="CPU mode for flat binaries [real, or the bundled guest's]."),
    vcpus: Optional[int] = typer.Option(None, "--vcpus", help="Number of vCPUs, one thread each [1, or the bundled guest's]."),
    max_exits: Optional[int] = typer.Option(None, "--max-exits", help="Stop after this many VM exits."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop after this many seconds (status: timeout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print a line per exit."),
    serial_in: str = typer.Option("-", "--serial-in", help="UART input: a file, '-' for stdin, or 'none'."),
) -> None:
    """Run one VM in the foreground, in its own worker process, printing every exit."""
    try:
        found = resolve_guest(guest)
        spec = VmSpec(
            guest=found.path, name=found.name, mem_size=parse_size(mem, "--mem"),
            vcpus=found.vcpus if vcpus is None else vcpus,
            mode=mode.value if mode is not None else found.mode,
            load_addr=None if load_addr is None else parse_address(load_addr, "--load-addr"),
            entry=None if entry is None else parse_address(entry, "--entry"),
            max_exits=max_exits, timeout=timeout, quiet=quiet,
            serial_input=None if serial_in == "none" else serial_in,
        ).validate()
        # Check the image here too, so bad input fails before any process or VM exists.
        from vmworker.loader import load_image
        from vmworker.memory import validate_mem_size
        validate_mem_size(spec.mem_size)
        load_image(spec.guest, load_addr=spec.load_addr, entry=spec.entry, mode=spec.mode).check_fits(spec.mem_size)
    except VmsupError as e:
        _err(str(e))
        raise typer.Exit(status.EXIT_BAD_INPUT)

    result = run_worker(spec)
    if result.get("status") == status.ERROR:
        _err(result.get("error", "the VM could not start"))
        raise typer.Exit(int(result.get("exit_code", status.EXIT_BAD_INPUT)))
    if result.get("registers"):
        for line in render.register_lines(result["registers"]):
            typer.echo(line, err=True)
    typer.echo(render.status_line(result), err=True)
    raise typer.Exit(int(result.get("exit_code", status.EXIT_VM_ERROR)))


def main() -> None:
    """Console-script entry: expected failures become one line and an exit code, never a traceback."""
    try:
        # standalone_mode=False: click returns a command's exit code instead of exiting itself.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except TyperException as e:  # usage errors: bad flag values, missing arguments
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        _err(message)
        sys.exit(getattr(e, "exit_code", status.EXIT_BAD_INPUT))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _err("aborted")
        sys.exit(status.EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(status.EXIT_INTERRUPTED)
