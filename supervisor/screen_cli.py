"""`vmsup screen VM` and the screen of `vmsup launch --screen`. `register(app)` adds the command."""

from __future__ import annotations

import sys
import time
from typing import Optional

import typer

from vmworker import status
from vmworker.errors import VmsupError

from .screen_view import NO_SCREEN_WAIT, PANEL_COLS, ScreenFeed, ScreenView, TerminalKeys, framed, render_panel


def _console():
    from rich.console import Console
    console = Console()
    # Piped: the panel is printed once at the end; give it its full width rather than 80 columns.
    return console if console.is_terminal else Console(width=PANEL_COLS)


def _end_line(console) -> None:
    if not console.is_terminal:
        console.file.write("\n")


def _fail(message: str, code: int = status.EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"vmsup: error: {message}", err=True)
    return typer.Exit(code)


def serial_note(console_path: str | None) -> str:
    """Where the guest's serial (UART) and debug-port text goes while the screen has the terminal."""
    if console_path is None:
        return "the guest's serial output is not kept (--no-trace)"
    return f"the guest's serial output goes to {console_path}"


def watch_launch(run, vm: int, name: str, console_path: str | None = None):
    """Run a foreground launch with its VM's screen in the terminal; the launch's outcome."""
    from rich.live import Live

    feed = ScreenFeed(run.run_dir, vm)
    console = _console()
    typer.echo(f"vmsup: {serial_note(console_path)}", err=True)
    try:
        with TerminalKeys() as keys, Live(render_panel(None, name, frame=framed(console)), console=console,
                                          auto_refresh=False, transient=False) as live:
            view = ScreenView(feed, keys, live, name)
            outcome = run.wait(on_tick=view.tick, tick=0.05)
            feed.poll(100)  # the last snapshot, taken as the VM ended
            view.draw()
        _end_line(console)
        typer.echo(f"vmsup: {serial_note(console_path)}", err=True)  # said again: the screen hid the first
        return outcome
    finally:
        feed.close()


def _vm_id(run_dir, target: str) -> tuple[int, str]:
    names = run_dir.read_info().get("vms") or []
    for i, n in enumerate(names):
        if target == str(n):
            return i, str(n)
    if target.isdigit() and int(target) < len(names):
        return int(target), str(names[int(target)])
    raise _fail(f"run {run_dir.run_id} has no VM {target!r} (VMs: {', '.join(map(str, names)) or 'none'})")


def screen(
    vm: str = typer.Argument(..., help="VM name or id."),
    run: Optional[str] = typer.Option(None, "--run", help="The launch (default: the only one running)."),
    once: bool = typer.Option(False, "--once", help="Print the current screen as text and exit."),
    wait: float = typer.Option(NO_SCREEN_WAIT, "--wait", min=0.1, help="Seconds to wait for a first snapshot."),
) -> None:
    """Show a running VM's VGA text screen live; keys typed here go to its keyboard."""
    from rich.live import Live

    from .runtime import find_run
    try:
        run_dir = find_run(run)
    except VmsupError as e:
        raise _fail(str(e)) from None
    vm_id, name = _vm_id(run_dir, vm)
    feed = ScreenFeed(run_dir, vm_id)
    try:
        # A screen that does not change sends nothing: ask the worker for its current one.
        deadline = time.monotonic() + wait
        next_ask = 0.0
        while feed.latest is None and time.monotonic() < deadline:
            if time.monotonic() >= next_ask:
                feed.request_refresh()
                next_ask = time.monotonic() + 0.5
            feed.poll(100)
        if feed.latest is None:
            raise _fail(f"VM {name} has no VGA screen (no snapshot within {wait:g} s)")
        if once:
            sys.stdout.write("\n".join(feed.latest.lines()) + "\n")
            return
        console = _console()
        with TerminalKeys() as keys, Live(render_panel(feed.latest, name, frame=framed(console)), console=console,
                                          auto_refresh=False, transient=False) as live:
            view = ScreenView(feed, keys, live, name)
            try:
                while not feed.ended and run_dir.path.is_dir():
                    view.tick()
                    feed.socket.poll(50)
                feed.poll(100)
                view.draw()
            except KeyboardInterrupt:
                view.draw()
        _end_line(console)
    finally:
        feed.close()


def register(app: typer.Typer) -> None:
    app.command("screen")(screen)
