"""The `vmsup tail` and `vmsup top` commands: attach to a running launch's live stream.

Both only subscribe (ZeroMQ SUB to the recorder's PUB), so a slow terminal never slows a VM: the
recorder drops for us instead, and we say how much. `register(app)` adds them to `vmsup`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import typer

from tracetool import filters
from vmworker import status
from vmworker.errors import VmsupError

from .terminal_mode import cbreak


LIVE_VIEW_NICENESS = 10
# How long `top --once` waits to hear from the live stream before its sample begins. Subscribing
# is asynchronous (ZeroMQ's SUB connects and subscribes in the background; what the recorder
# publishes before it has our subscription never reaches us) and a viewer runs niced: on a loaded
# machine that took longer than a 0.5 s sample, which then showed a running VM making no exits.
# A VM that runs is heard within a batch flush or its kvm-stats (every stats_interval, 1 s by
# default); a run that says nothing for this long is quiet, and we print what we know.
HEAR_WAIT_SECONDS = 10.0
# States (`vmsup ps`) in which a VM sends nothing: no need to wait to hear from it.
_SILENT_STATES = ("paused", "stopped", "exited", "fatal")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"vmsup: error: {message}", err=True)
    return typer.Exit(status.EXIT_BAD_INPUT)


def _attach(run: Optional[str]):
    from .live import LiveSubscriber
    from .runtime import find_run
    try:
        run_dir = find_run(run)
    except VmsupError as e:
        raise _fail(str(e)) from None
    # Live viewers are best effort: at a lower priority they only take CPU the VMs leave idle
    # (on a 2-core machine a busy viewer would otherwise slow a VM); when they fall behind, the
    # PUB socket drops for them and they say how much they missed.
    os.nice(LIVE_VIEW_NICENESS)
    return run_dir, LiveSubscriber(run_dir)


class _StdoutClosed(Exception):
    pass


def _write_lines(stream, lines: list[str]) -> None:
    if not lines:
        return
    try:
        stream.write("\n".join(lines) + "\n")
        stream.flush()
    except BrokenPipeError:
        raise _StdoutClosed() from None


def _quiet_stdout() -> None:
    # The reader went away (`vmsup tail | head`): point stdout at /dev/null so the interpreter's
    # final flush does not complain, and end normally.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def tail(
    run: Optional[str] = typer.Option(None, "--run", help="The launch to attach to (default: the only one running)."),
    vm: Optional[str] = filters.option("vm"), vcpu: Optional[str] = filters.option("vcpu"),
    epoch: Optional[str] = filters.option("epoch"), reason: Optional[str] = filters.option("reason"),
    port: Optional[str] = filters.option("port"), addr: Optional[str] = filters.option("addr"),
    where: Optional[str] = filters.option("where"),
    json_lines: bool = typer.Option(False, "--json", help="One JSON object per event, with the schema's field names."),
    count: Optional[int] = typer.Option(None, "-n", "--count", min=1, help="Stop after printing this many events."),
) -> None:
    """Print every exit of a running launch as it happens (best effort: missed events are counted on stderr)."""
    from . import tail as tail_mod
    event_filter = _event_filter(vm, vcpu, epoch, reason, port, addr, where)
    run_dir, subscriber = _attach(run)
    follower = tail_mod.Tail(event_filter, json_lines=json_lines, limit=count)
    unknown = follower.unknown_vm(subscriber.vm_names)
    if unknown is not None:  # it would wait for events that can never come
        subscriber.close()
        raise _fail(f"run {run_dir.run_id}: {unknown}")

    def err(lines: list[str]) -> None:
        for line in lines:
            typer.echo(line, err=True)

    try:
        with subscriber:
            try:
                tail_mod.run(subscriber, follower, lambda lines: _write_lines(sys.stdout, lines), err)
            except KeyboardInterrupt:  # Ctrl-C is how one normally stops a tail
                err(follower.final_notes(subscriber))
    except _StdoutClosed:
        _quiet_stdout()


def _event_filter(*flags) -> "filters.EventFilter":
    try:
        return filters.from_flags(*flags)
    except filters.FilterError as e:
        raise _fail(str(e)) from None


def top(
    run: Optional[str] = typer.Option(None, "--run", help="The launch to attach to (default: the only one running)."),
    vm: Optional[str] = filters.option("vm"), vcpu: Optional[str] = filters.option("vcpu"),
    epoch: Optional[str] = filters.option("epoch"), reason: Optional[str] = filters.option("reason"),
    port: Optional[str] = filters.option("port"), addr: Optional[str] = filters.option("addr"),
    where: Optional[str] = filters.option("where"),
    sort: str = typer.Option("rate", "--sort", help="Sort exit reasons by: rate or total."),
    interval: float = typer.Option(1.0, "--interval", min=0.05, help="Seconds between refreshes (with --once: how long to sample)."),
    once: bool = typer.Option(False, "--once", help=f"Sample for --interval seconds from when the live stream is first heard "
                              f"(waiting up to {HEAR_WAIT_SECONDS:g} s for it), print one table, exit."),
    json_out: bool = typer.Option(False, "--json", help="Print the data as JSON instead of a table (one object per refresh)."),
    by: str = typer.Option("reason", "--by", help="Group each VM's exits by reason, or by guest symbol (from the "
                           "image its vm-start names: VMs that start while top watches)."),
) -> None:
    """Exits per VM and exit reason, live, like kvm_stat: total, share and rate."""
    from .top import GROUPINGS, SORT_KEYS
    if sort not in SORT_KEYS:
        raise _fail(f"--sort must be one of {', '.join(SORT_KEYS)}, not {sort!r}")
    if by not in GROUPINGS:
        raise _fail(f"--by must be one of {', '.join(GROUPINGS)}, not {by!r}")
    event_filter = _event_filter(vm, vcpu, epoch, reason, port, addr, where)
    run_dir, subscriber = _attach(run)
    try:
        with subscriber:
            if once:
                _top_once(run_dir, subscriber, sort, interval, json_out, event_filter, by)
            else:
                _top_live(run_dir, subscriber, sort, interval, json_out, event_filter, by)
    except KeyboardInterrupt:
        pass
    except _StdoutClosed:
        _quiet_stdout()


def _drain(subscriber, model, timeout_ms: int) -> None:
    for msg in subscriber.poll(timeout_ms):
        model.feed(msg)


def _hear(subscriber, model, seconds: float) -> bool:
    """Wait up to `seconds` for the stream's first messages; the rates' interval starts when they
    come. False if the run has ended."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        heard = subscriber.poll(max(1, min(200, int(left * 1000))))
        if heard or subscriber.malformed:
            model.tick()  # nothing counted yet: this only starts the interval now
            for msg in heard:
                model.feed(msg)
            return True
        if subscriber.finished():
            subscriber.account_trailing()
            return False
    return True


def _top_once(run_dir, subscriber, sort: str, interval: float, json_out: bool, event_filter, by: str) -> None:
    from rich.console import Console

    from .top import TopModel, render_table
    model = TopModel(event_filter, by=by)
    going = True
    if any(vm.get("state") not in _SILENT_STATES for vm in _run_vms(run_dir, subscriber)):
        going = _hear(subscriber, model, HEAR_WAIT_SECONDS)
    deadline = time.monotonic() + interval
    # Sample for the interval, or less if the run ends first (its numbers are then complete).
    while going and (left := deadline - time.monotonic()) > 0:
        _drain(subscriber, model, max(1, min(200, int(left * 1000))))
        if subscriber.finished():
            subscriber.account_trailing()
            going = False
    if going:
        _drain(subscriber, model, 0)  # what was already queued when the time ran out belongs to it
    model.tick()
    model.know_vms(_run_vms(run_dir, subscriber))
    snap = model.snapshot(sort=sort, subscriber=subscriber, run_id=run_dir.run_id)
    if json_out:
        _write_lines(sys.stdout, [json.dumps(snap)])
    else:
        Console().print(render_table(snap))


def _run_vms(run_dir, subscriber) -> list[dict]:
    """Every VM of the run with its state, from the supervisor (`vmsup ps`); just the names from
    run.json when it does not answer (the run is ending)."""
    from .commands import COMMANDS, call
    try:
        if (run_dir.path / "control.sock").exists():  # a supervisor that has gone has none
            return call(run_dir, COMMANDS["ps"].request(), timeout=2.0).get("vms") or []
    except VmsupError:
        pass
    return [{"vm": vm, "name": name} for vm, name in enumerate(subscriber.vm_names)]


def _top_live(run_dir, subscriber, sort: str, interval: float, json_out: bool, event_filter, by: str) -> None:
    import zmq
    from rich.console import Console
    from rich.live import Live

    from .top import SORT_KEYS, TopModel, render_table
    model = TopModel(event_filter, by=by)
    # Every VM of the run from the first table on, as --once shows them, not only those heard from;
    # asked again at each refresh, since states change (paused, exited) and restarts add none.
    model.know_vms(_run_vms(run_dir, subscriber))
    stdin_fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() and not json_out else None
    poller = zmq.Poller()
    poller.register(subscriber.socket, zmq.POLLIN)
    if stdin_fd is not None:
        poller.register(stdin_fd, zmq.POLLIN)
    view: dict = {"sort": sort, "vm": None}

    def snapshot() -> dict:
        return model.snapshot(sort=view["sort"], vm=view["vm"], subscriber=subscriber, run_id=run_dir.run_id)

    def handle_key(key: str) -> bool:
        """False to quit."""
        if key == "q":
            return False
        if key == "s":
            view["sort"] = SORT_KEYS[(SORT_KEYS.index(view["sort"]) + 1) % len(SORT_KEYS)]
        elif key == "v":
            cycle = [None, *sorted(model.vms)]
            view["vm"] = cycle[(cycle.index(view["vm"]) + 1) % len(cycle)] if view["vm"] in cycle else None
        return True

    def loop(show) -> None:
        try:
            follow(show)
        except KeyboardInterrupt:  # Ctrl-C: leave the latest numbers on screen
            model.tick()
            show(snapshot())

    def follow(show) -> None:
        next_tick = time.monotonic() + interval
        while True:
            wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            ready = dict(poller.poll(min(wait_ms, 200)))
            if subscriber.socket in ready:
                _drain(subscriber, model, 0)
            if stdin_fd is not None and stdin_fd in ready:
                keys = os.read(stdin_fd, 64).decode(errors="replace")
                if not keys:  # stdin closed: no more keys, keep going
                    poller.unregister(stdin_fd)
                for key in keys:
                    if not handle_key(key.lower()):
                        return
                show(snapshot())
            ended = subscriber.finished()
            if ended:
                _drain(subscriber, model, 0)
                subscriber.account_trailing()
            if ended or time.monotonic() >= next_tick:
                model.tick()
                model.know_vms(_run_vms(run_dir, subscriber))
                show(snapshot())
                next_tick = time.monotonic() + interval
            if ended:
                return

    if json_out:
        loop(lambda snap: _write_lines(sys.stdout, [json.dumps(snap)]))
        return
    console = Console()
    with cbreak(stdin_fd), Live(render_table(snapshot(), keys_help=stdin_fd is not None), console=console,
                                  auto_refresh=False, transient=False) as live:
        loop(lambda snap: live.update(render_table(snap, keys_help=stdin_fd is not None), refresh=True))


def register(app: typer.Typer) -> None:
    """Add `tail` and `top` to the `vmsup` app."""
    app.command("tail")(tail)
    app.command("top")(top)
