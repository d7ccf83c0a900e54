"""`vmsup`: launch KVM guests and see every exit they make."""

from __future__ import annotations

import os
import sys
import time
from enum import Enum
from typing import Optional

import typer
from typer.exceptions import TyperException

from vmworker import status
from vmworker.errors import KvmError, SpecError, VmsupError
from vmworker.machine import check_vm_shape
from vmworker.spec import VmSpec, parse_address, parse_size

from . import render
from .fleet import fleet_specs
from .guests import resolve_guest
from .keys import check_listen
from .launch import Launch, check_trace_path

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
    ctx: typer.Context,
    guests: Optional[list[str]] = typer.Argument(None, help="Guest images (flat binary or ELF) or bundled guest names, e.g. seed16."),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="A fleet file (TOML) describing the VMs, instead of GUESTS and per-VM flags."),
    mem: str = typer.Option("16M", "--mem", help="Guest RAM: bytes or K/M/G suffix (16M, 512000000, 1G)."),
    load_addr: Optional[str] = typer.Option(None, "--load-addr", help="Flat binaries: guest-physical load address [0x10000]."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Entry address [the load address, or the ELF's]."),
    mode: Optional[Mode] = typer.Option(None, "--mode", help="CPU mode for flat binaries [real, or the bundled guest's]."),
    vcpus: Optional[int] = typer.Option(None, "--vcpus", help="Number of vCPUs, one thread each [1, or the bundled guest's]."),
    vms: int = typer.Option(1, "--vms", help="Run this many copies of each guest, one worker process each."),
    max_exits: Optional[int] = typer.Option(None, "--max-exits", help="Stop each VM after this many exits."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop each VM after this many seconds (status: timeout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print a line per exit."),
    serial_in: str = typer.Option("-", "--serial-in", help="UART input: a file, '-' for stdin, or 'none'."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Trace file to record to [traces/NAME-TIME.vmtrace]."),
    no_trace: bool = typer.Option(False, "--no-trace", help="Do not write a trace file (live views still work)."),
    record_only: Optional[str] = typer.Option(None, "--record-only",
                                              help="Record only matching exits, e.g. reason=io,port=0x3f8."),
    listen: Optional[str] = typer.Option(None, "--listen", help="Also take events on tcp://HOST:PORT, CURVE-encrypted (needs 'vmsup keys')."),
    keys_dir: Optional[str] = typer.Option(None, "--keys-dir", help="CURVE keys for --listen [~/.config/vmsup/keys]."),
) -> None:
    """Run VMs, one worker process each, recording every exit. One VM runs in the foreground,
    printing every exit; several show a live status table."""
    try:
        if listen is not None:
            listen, keys_dir = check_listen(listen, keys_dir)
        if guests and fleet is None:
            specs = _build_specs(guests, vms=vms, mem=mem, load_addr=load_addr, entry=entry, mode=mode, vcpus=vcpus,
                                 max_exits=max_exits, timeout=timeout, quiet=quiet, serial_in=serial_in,
                                 record_only=record_only)
        else:
            specs = fleet_specs(ctx, fleet, guests, quiet=quiet)
        trace_path = None if no_trace else (trace or _default_trace_path(specs[0].name))
        if trace_path:
            check_trace_path(trace_path)
        foreground = len(specs) == 1
        consoles = None if foreground else [_console_path(trace_path, s.name) for s in specs]
        run = Launch(specs, trace_path, console_paths=consoles, foreground=foreground, listen=listen, keys_dir=keys_dir)
        run.start()
    except KvmError as e:
        _err(str(e))
        raise typer.Exit(status.EXIT_NO_KVM if e.ioctl.startswith("open ") else status.EXIT_VM_ERROR)
    except VmsupError as e:
        _err(str(e))
        raise typer.Exit(status.EXIT_BAD_INPUT)
    _info(f"run {run.run_dir.run_id}: " + (f"recording to {trace_path}" if trace_path else "not recording (--no-trace)"))
    if foreground:
        outcome = run.wait()
    else:
        outcome = render.watch_fleet(run, err_console())
    raise typer.Exit(_report(outcome, foreground))


def _build_specs(guests: list[str], *, vms: int, mem: str, load_addr, entry, mode, vcpus, max_exits, timeout,
                 quiet: bool, serial_in: str, record_only: str | None) -> list[VmSpec]:
    from vmworker.loader import load_image
    from vmworker.memory import validate_mem_size

    if vms < 1:
        raise SpecError(f"--vms must be at least 1, not {vms}")
    if record_only is not None:
        from tracetool.filters import FilterError, parse_filter
        try:
            parse_filter(record_only)
        except FilterError as e:
            raise SpecError(f"--record-only: {e}") from None
    mem_size = validate_mem_size(parse_size(mem, "--mem"))
    specs: list[VmSpec] = []
    several = len(guests) * vms > 1
    for guest in guests:
        found = resolve_guest(guest)
        base = VmSpec(
            guest=found.path, name=found.name, mem_size=mem_size,
            vcpus=found.vcpus if vcpus is None else vcpus,
            mode=mode.value if mode is not None else found.mode,
            load_addr=None if load_addr is None else parse_address(load_addr, "--load-addr"),
            entry=None if entry is None else parse_address(entry, "--entry"),
            max_exits=max_exits, timeout=timeout,
            # Several VMs share one terminal: no per-exit lines, and no shared stdin.
            quiet=quiet or several, serial_input=None if serial_in == "none" or (several and serial_in == "-") else serial_in,
            record_filter=record_only,
        ).validate()
        # Check everything here, so bad input fails in one line before any process or VM exists.
        image = load_image(base.guest, load_addr=base.load_addr, entry=base.entry, mode=base.mode)
        check_vm_shape(image, mem_size, base.vcpus, host_max_vcpus())
        if base.serial_input not in (None, "-"):
            _check_readable(base.serial_input, "serial input")
        for copy in range(vms):
            spec = VmSpec.from_json(base.to_json())
            spec.vm_id = len(specs)
            if several:
                spec.name = f"{base.name}-{copy}" if vms > 1 else base.name
            specs.append(spec)
    names = [s.name for s in specs]
    for i, s in enumerate(specs):  # the same guest named twice: keep names unique
        if names.count(s.name) > 1:
            s.name = f"{s.name}#{i}"
    return specs


def _check_readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise SpecError(f"{what} {path}: {e.strerror or e}") from None


_max_vcpus: list[int] = []


def host_max_vcpus() -> int:
    """KVM's vCPU limit, asked once; opening /dev/kvm here also reports a missing KVM early."""
    if not _max_vcpus:
        from vmworker.kvm import Kvm
        with Kvm() as kvm:
            _max_vcpus.append(kvm.max_vcpus())
    return _max_vcpus[0]


def _default_trace_path(name: str) -> str:
    directory = os.environ.get("VMSUP_TRACE_DIR") or "traces"
    return os.path.join(directory, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.vmtrace")


def _console_path(trace_path: str | None, name: str) -> str | None:
    if trace_path is None:
        return None
    return f"{trace_path.removesuffix('.vmtrace')}.{name}.console"


def _info(message: str) -> None:
    typer.echo(f"vmsup: {message}", err=True)


def _report(outcome, foreground: bool) -> int:
    rec = outcome.recorder
    if outcome.trace:
        if rec is None:
            _err(f"the recorder did not report; {outcome.trace} may be incomplete")
        else:
            _info(render.recording_line(outcome.trace, rec))
            if rec.get("recording_error"):
                _err(rec["recording_error"])
    codes = []
    for result in outcome.results:
        if result.get("status") == status.ERROR:
            _err(f"{result.get('name', 'vm')}: {result.get('error', 'the VM could not start')}")
            codes.append(int(result.get("exit_code", status.EXIT_BAD_INPUT)))
            continue
        if foreground and result.get("registers"):
            for line in render.register_lines(result["registers"]):
                typer.echo(line, err=True)
        if foreground:
            typer.echo(render.status_line(result), err=True)  # the last line: why the VM ended
        codes.append(int(result.get("exit_code", status.EXIT_VM_ERROR)))
    if not foreground:
        render.summary_table(outcome, err_console())
    return max(codes) if codes else 0


def err_console():
    from rich.console import Console
    return Console(stderr=True, highlight=False)


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

from .live_cli import register as _register_live  # noqa: E402
_register_live(app)
from .keys import register as _register_keys  # noqa: E402
_register_keys(app)
