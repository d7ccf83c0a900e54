"""`vmtrace screen`: the VGA text screen of a VM at a moment, from the trace's screen snapshots
(the snapshot format itself is tracetool.screen's)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .. import analysis
from ..screen import Snapshot, ansi_lines, snapshot_at, trace_snapshots
from ..trace import TraceReader
from . import _common as c


class NoScreen(Exception):
    """No snapshot answers the question; the message is one line."""


def screen_at(reader: TraceReader, trace: str, vm: int | None, t_rel: int | None,
              at: str | None) -> tuple[Snapshot, int, list[Snapshot]]:
    """(snapshot, t0, all snapshots of the VM): the last snapshot at or before t_rel since the
    trace's first event (the last of all when None)."""
    snaps = trace_snapshots(reader, vm)
    t0 = analysis.trace_start(reader)
    if not snaps:
        raise NoScreen(f"{trace}: no screen snapshots" + (f" of VM {vm}" if vm is not None else "") +
                       " (the guest never drew on the VGA text screen)")
    vms = sorted({s.vm for s in snaps})
    if len(vms) > 1:
        raise NoScreen(f"{trace}: VMs {', '.join(map(str, vms))} drew screens: pick one with --vm")
    t0 = snaps[0].t if t0 is None else min(t0, snaps[0].t)
    snap = snapshot_at(snaps, None if t_rel is None else t0 + t_rel)
    if snap is None:
        raise NoScreen(f"no screen snapshot at or before {at}: the first is at {(snaps[0].t - t0) / 1e9:.3f} s")
    return snap, t0, snaps


def render(snap: Snapshot, t0: int, snaps: list[Snapshot], color: bool) -> None:
    """A line about the snapshot on stderr, the 25 rows on stdout."""
    cur = f"cursor row {snap.cursor[0]} col {snap.cursor[1]}" if snap.cursor else "cursor off"
    typer.echo(f"vmtrace: VM {snap.vm} epoch {snap.epoch}, screen at {(snap.t - t0) / 1e9:.3f} s "
               f"(snapshot {snaps.index(snap) + 1} of {len(snaps)}), {cur}", err=True)
    lines = ansi_lines(snap.cells) if color else snap.lines()
    sys.stdout.write("\n".join(lines) + "\n")


def run(
    trace: str = c.TRACE_ARG,
    vm: Optional[int] = typer.Option(None, "--vm", min=0, help="The VM (needed when several drew a screen)."),
    at: Optional[str] = typer.Option(None, "--at", help="The moment, as time since the first event (1.5, 250ms) "
                                     "[the end]: the last snapshot at or before it is shown."),
    color: bool = typer.Option(False, "--color", help="VGA colours as ANSI escapes."),
    as_json: bool = typer.Option(False, "--json", help="The snapshot as JSON: lines, cursor, attributes (hex)."),
) -> None:
    """The VGA text screen of a VM at a moment, from the trace's screen snapshots."""
    t_rel = None if at is None else c.parse_time(at, "--at")
    with c.reading(trace) as reader:
        try:
            snap, t0, snaps = screen_at(reader, trace, vm, t_rel, at)
        except NoScreen as e:
            c.bad_input(str(e))
    if as_json:
        c.dump_json(dict(snap.to_json(t0), snapshots=len(snaps)))
    else:
        render(snap, t0, snaps, color)
