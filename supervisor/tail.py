"""`vmsup tail`: every exit of a running launch, one line each, as it happens.

Filtering is one numpy mask per batch (tracetool.filters.EventFilter, the filter language shared
with record-time filters and `vmtrace`); only the events that pass are formatted. Missed events
(the live stream is best effort) are reported as notes, at most once a second per run of notes,
each with the running total. Library code: the loop writes to the sinks it is given.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np

from tracetool import exit_rows, handling, schema

from .live import LiveSubscriber

# How often missed-event notes may be written (the running total makes up for the ones held back).
MISSED_NOTE_SECONDS = 1.0
_POLL_MS = 200
_FINAL_DRAIN_MS = 100  # after the run is gone: take what is still queued, until a quiet 100 ms


def format_duration(ns: int) -> str:
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.1f}us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.2f}ms"
    return f"{ns / 1e9:.3f}s"


def event_text(vm: int, vcpu: int, seq: int, t_exit: int, guest_ns: int, addr: int, data: int, count: int,
               reason: int, size: int, flags: int) -> str:
    """`vm=0 vcpu=0 seq=17 t=12.345678901 io out port=0x10 size=2 data=0x11 guest=5.1us`"""
    what = schema.describe_exit(reason, flags, addr, size, data, count)
    secs, ns = divmod(t_exit, 1_000_000_000)
    return f"vm={vm} vcpu={vcpu} seq={seq} t={secs}.{ns:09d} {what} guest={format_duration(guest_ns)}"


class Tail:
    """Turns live messages into output lines and missed-event notes.

    event_filter: a tracetool.filters.EventFilter (its `mask` per batch, `matches_stream` to
    decide whose missed events are worth a note).
    """

    def __init__(self, event_filter, *, json_lines: bool = False, limit: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.filter = event_filter
        self.json_lines = json_lines
        self.limit = limit
        self.printed = 0
        self.clock = clock
        self._reported: dict[tuple[int, int, int], int] = {}  # missed events already in a note
        self._noted_at = float("-inf")

    @property
    def done(self) -> bool:
        return self.limit is not None and self.printed >= self.limit

    def lines(self, msg: dict) -> list[str]:
        """The lines for one decoded message (only `exits` batches produce any)."""
        if msg.get("type") != schema.MSG_EXITS or self.done or not msg["rows"]:
            return []
        vm, vcpu = msg["vm"], msg["vcpu"]
        cols = msg["columns"]
        index = np.flatnonzero(self.filter.mask(cols, vm=vm, vcpu=vcpu, epoch=msg["epoch"]))
        if self.limit is not None:
            index = index[:self.limit - self.printed]
        if not len(index):
            return []
        self.printed += len(index)
        if self.json_lines:
            return self._json(msg, cols, index)
        picked = {name: cols[name][index].tolist() for name in (*schema.COLUMN_NAMES, "seq")}
        return [event_text(vm, vcpu, *values) for values in zip(
            picked["seq"], picked["t_exit"], picked["guest_ns"], picked["addr"], picked["data"],
            picked["count"], picked["reason"], picked["size"], picked["flags"])]

    @staticmethod
    def _json(msg: dict, cols: dict, index: np.ndarray) -> list[str]:
        """The picked events in the one JSON shape (tracetool/exit_rows.py); handle_ns is known
        where the event's successor is in the same batch (a live view does not wait for the next),
        and `payload` holds the whole data of string I/O."""
        stored = cols.get(schema.HANDLE_COLUMN.name)  # kept by a record-time filter
        handles = handling.BlockHandles(*handling.within(cols["t_exit"], cols["guest_ns"], cols["seq"], stored), None)
        picked = {name: col[index] for name, col in cols.items()}
        picked["handle_ns"] = handles.full(handling.stored_last(cols))[index]
        rows = exit_rows.json_rows(picked, {"vm": msg["vm"], "vcpu": msg["vcpu"], "epoch": msg["epoch"]})
        payloads = msg["payloads"]
        for row, event in zip(index.tolist(), rows):
            if row in payloads:
                event["payload"] = payloads[row].hex()
        return [json.dumps(event, separators=(",", ":")) for event in rows]

    def unknown_vm(self, vm_names: list[str]) -> str | None:
        """Why the filter can never match, when it names only VMs the run does not have (vm ids
        are indexes into the run's VM list, run.json's "vms"); None while the list is unknown."""
        wanted = self.filter.vm
        if wanted is None or not vm_names or set(wanted) & set(range(len(vm_names))):
            return None
        have = ", ".join(f"{i} ({name})" for i, name in enumerate(vm_names))
        return f"no vm {'|'.join(map(str, wanted))} in this run; its VMs: {have}"

    def missed_notes(self, subscriber: LiveSubscriber, *, force: bool = False) -> list[str]:
        """Notes for streams that missed events since the last note; at most one round a second."""
        now = self.clock()
        if not force and now - self._noted_at < MISSED_NOTE_SECONDS:
            return []
        new = []
        for key, missed in sorted(subscriber.missed_by_stream().items()):
            if self.filter.matches_stream(*key) and missed > self._reported.get(key, 0):
                new.append((key, missed - self._reported.get(key, 0)))
                self._reported[key] = missed
        if not new:
            return []
        self._noted_at = now
        total = self.missed_total()
        return [f"vmsup tail: missed {n} events (vm {vm} vcpu {vcpu}), {total} in total"
                for (vm, vcpu, _epoch), n in new]

    def missed_total(self) -> int:
        return sum(self._reported.values())

    def final_notes(self, subscriber: LiveSubscriber) -> list[str]:
        notes = self.missed_notes(subscriber, force=True)
        total = self.missed_total()
        if total:
            notes.append(f"vmsup tail: missed {total} events in total")
        if subscriber.malformed:
            notes.append(f"vmsup tail: ignored {subscriber.malformed} malformed messages "
                         f"(last: {subscriber.last_malformed})")
        return notes


def run(subscriber: LiveSubscriber, tail: Tail, out: Callable[[list[str]], None],
        err: Callable[[list[str]], None]) -> str:
    """Follow the live stream until -n is reached or the run is over; returns why it ended.

    `out` gets the event lines of each poll, `err` the notes.
    """
    why = None
    while why is None:
        messages = subscriber.poll(_POLL_MS)
        lines: list[str] = []
        for msg in messages:
            lines.extend(tail.lines(msg))
            if tail.done:
                break
        if lines:
            out(lines)
        if tail.done:
            why = "count"
            break
        notes = tail.missed_notes(subscriber)
        if notes:
            err(notes)
        why = subscriber.finished()
    if why == "run-gone":
        # The recorder is gone; what reached our queue before is still worth showing.
        while not tail.done and (messages := subscriber.poll(_FINAL_DRAIN_MS)):
            lines = [line for msg in messages for line in tail.lines(msg)]
            if lines:
                out(lines)
    if why != "count":
        subscriber.account_trailing()
    err(tail.final_notes(subscriber))
    return why
