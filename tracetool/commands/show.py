"""`vmtrace show`: events of every stream in time order, one line each (or one JSON object)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import typer

from .. import analysis, exit_rows, schema, side_rows
from ..emulated import by_exit
from ..filters import EventFilter
from ..handling import NO_HANDLE
from ..trace import TraceReader
from . import _common as c
from ._symbols import SYMBOLS_OPT, AddressNames, vm_tables


@contextmanager
def selected_events(trace: str, where: EventFilter | None, limit: int | None, span: tuple[int | None, int | None],
                    symbols: str | None) -> Iterator[tuple[TraceReader, AddressNames, int | None, Iterator[dict]]]:
    """The trace open (as `show` and `replay` read it): (reader, names of guest addresses, t0,
    chunks), t0 the zero of relative times and chunks the matching events in time order, in chunks
    of columns; `span` is the --from/--to window relative to t0."""
    with c.reading(trace) as reader:
        c.require_vms(reader, trace, where)
        names = AddressNames(vm_tables(reader, symbols))
        t0 = analysis.trace_start(reader)
        yield reader, names, t0, analysis.events_in_time_order(reader, where, limit, *c.absolute(span, t0))


def _event_rows(chunk: dict):
    """One tuple of plain ints per event (tolist() converts a whole column at once)."""
    names = ("t_exit", "vm", "vcpu", "epoch", "seq", "reason", "flags", "addr", "size", "count", "data",
             "guest_ns", "handle_ns", "rip")
    return zip(*(chunk[n].tolist() for n in names))


def _us(ns: int) -> str:
    return f"{ns / 1000:.1f}us"


def text_lines(chunk: dict, t0: int, names: AddressNames, emulated: dict | None = None) -> list[str]:
    """One line per event, for people; under an exit, the instructions vmsup emulated during it
    (`emulated`: emulated.by_exit), one indented line each."""
    lines = []
    for t, vm, vcpu, epoch, seq, reason, flags, addr, size, count, data, guest, handle, rip in _event_rows(chunk):
        rel = t - t0
        sign = "+" if rel >= 0 else "-"
        rel = abs(rel)
        head = f"t={sign}{rel // 1_000_000_000}.{rel % 1_000_000_000:09d} vm={vm} vcpu={vcpu} "
        if epoch:
            head += f"epoch={epoch} "
        what = schema.describe_exit(reason, flags, addr, size, data, count) + names.text(vm, rip)
        tail = f" guest={_us(guest)} handle={'-' if handle == NO_HANDLE else _us(handle)}\n"
        lines.append(f"{head}seq={seq} {what}{tail}")
        if emulated:
            lines += [f"  emulated by vmsup: {text}\n" for text in emulated.get((vm, vcpu, epoch, seq), ())]
    return lines


def json_lines(chunk: dict, t0: int, names: AddressNames, side: dict | None = None) -> list[str]:
    """One JSON object per event and line, for scripts (the one shape: tracetool/exit_rows.py,
    with the address as `rip` and its `symbol` and `line` where known). With `side`
    (side_rows.by_exit), an exit with coalesced writes drained before it or instructions
    emulated while it was handled carries them as lists under "coalesced" and "emulated"."""
    exit_rows.add_places(chunk, names.tables)
    if not side:
        return exit_rows.json_lines(chunk)
    keys = zip(*(chunk[n].tolist() for n in ("vm", "vcpu", "epoch", "seq")))
    return [json.dumps({**row, **side.get(key, {})}, separators=(",", ":")) + "\n"
            for row, key in zip(exit_rows.json_rows(chunk), keys)]


def run(
    trace: str = c.TRACE_ARG,
    vm: Optional[str] = c.VM_OPT, vcpu: Optional[str] = c.VCPU_OPT, epoch: Optional[str] = c.EPOCH_OPT,
    reason: Optional[str] = c.REASON_OPT, port: Optional[str] = c.PORT_OPT, addr: Optional[str] = c.ADDR_OPT,
    where: Optional[str] = c.FILTER_OPT,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event, one per line."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=0, help="Show at most N events."),
    t_from: Optional[str] = typer.Option(None, "--from", help="Only events at or after this time since the trace's "
                                         "first event: seconds, or with a unit (250ms, 40us, 1500ns)."),
    t_to: Optional[str] = typer.Option(None, "--to", help="Only events at or before this time (as --from)."),
    symbols: Optional[str] = SYMBOLS_OPT,
) -> None:
    """Events of every stream in time order, one line each; guest addresses with symbol and source line."""
    event_filter = c.event_filter(vm, vcpu, epoch, reason, port, addr, where)
    span = c.time_window(t_from, t_to)
    with selected_events(trace, event_filter, limit, span, symbols) as (reader, names, t0, chunks):
        # Not exits: shown with the exit they link to (emulated instructions under the exit that
        # led to them; with --json, coalesced writes drained before an exit in its object too).
        emulated = None if as_json else by_exit(reader)
        side = side_rows.by_exit(reader, event_filter) if as_json else None
        out = sys.stdout
        for chunk in chunks:
            out.write("".join(json_lines(chunk, t0, names, side) if as_json else text_lines(chunk, t0, names, emulated)))
        out.flush()
