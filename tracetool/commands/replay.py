"""`vmtrace replay`: events in time order, released at the pace they were recorded (or X times
faster), so a trace can be watched like the live `vmsup tail`.

The pacing is a seam: `paced()` takes the clock and the sleep function, so tests run it on a
fake clock, and `max_sleep` caps any one wait (idle stretches are skipped, later events keep
their spacing relative to each other).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import typer

from ..screen import Snapshot, trace_snapshots
from . import _common as c
from ._symbols import SYMBOLS_OPT
from .show import json_lines, selected_events, text_lines

_SLACK_S = 1e-6


def paced(chunks: Iterable[dict[str, np.ndarray]], speed: float = 1.0, max_sleep: float | None = None,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> Iterator[dict[str, np.ndarray]]:
    """Yield slices of the time-ordered chunks once their recorded time (scaled by 1/speed,
    from the first event) has come. Every event is yielded exactly once, in order."""
    if not speed > 0:
        raise ValueError("speed must be > 0")
    start = None
    t_first = 0
    skipped = 0.0  # seconds of waiting dropped by max_sleep
    for chunk in chunks:
        t = chunk["t_exit"]
        n = len(t)
        if not n:
            continue
        if start is None:
            t_first = int(t[0])
            start = clock()
        due_at = (t - np.int64(t_first)).astype(np.float64) / 1e9 / speed  # inf speed: all zeros
        i = 0
        while i < n:
            now = clock() - start + skipped
            # due within a microsecond counts as due: a clock that can't resolve the last wait
            # (float rounding) must not leave the loop sleeping for nothing
            j = int(np.searchsorted(due_at, now + _SLACK_S, "right"))
            if j > i:
                yield {name: col[i:j] for name, col in chunk.items()}
                i = j
                continue
            wait = float(due_at[i]) - now
            if max_sleep is not None and wait > max_sleep:
                skipped += wait - max_sleep
                wait = max_sleep
            if wait > 0:
                sleep(wait)


def screen_snapshots(reader, vm: str | None, lo: int | None, hi: int | None) -> list[Snapshot]:
    """The screen snapshots to show beside the exits: of the --vm VMs, within the time window."""
    want = None if vm is None else {int(v, 0) for v in vm.replace(",", "|").split("|") if v.strip()}
    return [s for s in trace_snapshots(reader)
            if (want is None or s.vm in want) and (lo is None or s.t >= lo) and (hi is None or s.t <= hi)]


def screen_block(snap: Snapshot, t0: int | None, as_json: bool) -> str:
    """A snapshot as replay prints it between the exits (text lines, or one JSON object)."""
    if as_json:
        return json.dumps(dict(snap.to_json(t0), type="screen")) + "\n"
    when = (snap.t - (t0 or snap.t)) / 1e9
    head = f"--- screen vm {snap.vm} epoch {snap.epoch} at {when:.6f} s ---"
    lines = snap.lines()
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join([head, *lines, "-" * len(head)]) + "\n"


def run(
    trace: str = c.TRACE_ARG,
    speed: float = typer.Option(1.0, "--speed", help="Replay X times faster than recorded (inf: no waiting)."),
    max_sleep: Optional[float] = typer.Option(None, "--max-sleep", min=0,
                                              help="Never wait longer than this many seconds between events."),
    vm: Optional[str] = c.VM_OPT, vcpu: Optional[str] = c.VCPU_OPT, epoch: Optional[str] = c.EPOCH_OPT,
    reason: Optional[str] = c.REASON_OPT, port: Optional[str] = c.PORT_OPT, addr: Optional[str] = c.ADDR_OPT,
    where: Optional[str] = c.FILTER_OPT,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event, one per line."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=0, help="Stop after N events."),
    t_from: Optional[str] = typer.Option(None, "--from", help="Start at this time since the first event (1.5, 250ms)."),
    t_to: Optional[str] = typer.Option(None, "--to", help="Stop after this time since the first event."),
    show_screen: bool = typer.Option(False, "--screen", help="Print each VGA screen snapshot as it comes, beside the exits."),
    symbols: Optional[str] = SYMBOLS_OPT,
) -> None:
    """Print events at their recorded pace (or X times faster), one line each as `show` does."""
    if not speed > 0:
        c.bad_input(f"--speed must be greater than 0, not {speed}")
    event_filter = c.event_filter(vm, vcpu, epoch, reason, port, addr, where)
    span = c.time_window(t_from, t_to)
    with selected_events(trace, event_filter, limit, span, symbols) as (reader, names, t0, chunks):
        render = json_lines if as_json else text_lines
        out = sys.stdout
        lo, hi = c.absolute(span, t0)
        snaps = screen_snapshots(reader, vm, lo, hi) if show_screen else []
        for chunk in paced(chunks, speed, max_sleep):
            while snaps and snaps[0].t <= int(chunk["t_exit"][-1]):
                out.write(screen_block(snaps.pop(0), t0, as_json))
            out.write("".join(render(chunk, t0, names)))
            out.flush()  # each event as it comes due
        for snap in snaps:  # drawn after the last matching exit
            out.write(screen_block(snap, t0, as_json))
        out.flush()
