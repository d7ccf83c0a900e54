"""Handling time: derived from the next event of the same stream, stitched across blocks.

A trace stores t_exit (KVM_RUN returned) and guest_ns (time inside the KVM_RUN that ended in
this exit) of each event, not its handling time (see schema). The vCPU entered KVM_RUN again at
t_exit - guest_ns of its stream's *next* event, so the handling time of event i is

    handle[i] = (t_exit[i + 1] - guest_ns[i + 1]) - t_exit[i]

known only where event i + 1 is the next sequence number of the stream (a loss leaves a hole), and
for a block's last event only once the stream's next block is read. A record-time filter keeps,
next to the events it keeps, their handling times (the `handle_ns` column of a filtered batch,
schema.HANDLE_COLUMN, computed by the same formula from the events it dropped); where present,
that stored value stands wherever the successor is not in the trace.
This module is the one place that formula and its stitching across blocks are written; summary,
show/replay/export (events in time order), verify and plot all get their handling times here.

Arithmetic wraps like the int64 columns do: a hostile file's overflowing values give wrong
numbers (which verify reports), never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import schema

# handle_ns of an event whose successor in its stream is not in the trace (the stream's last
# event, or the next one was dropped by a record-time filter or lost).
NO_HANDLE = np.iinfo(np.int64).min
_SEQ = schema.SEQ_COLUMN[0]
_STORED = schema.HANDLE_COLUMN.name


def _wrap(value: int) -> int:
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


def _across(last_seq: int, last_t: int, seq: np.ndarray, t: np.ndarray, g: np.ndarray) -> int | None:
    """Handling time of a block's last event (seq, t_exit) from the first event of the stream's
    next block; None when that first event is not its successor."""
    if not len(seq) or int(seq[0]) != last_seq + 1:
        return None
    return _wrap((int(t[0]) - int(g[0])) - last_t)


@dataclass
class BlockHandles:
    """Handling times of one block's events.

    inner: int64, inner[i] for rows 0 .. n-2 (from row i + 1); the last row's comes later.
    follows: which of those rows have their successor as row i + 1 (None: all of them).
    previous: the handling time of the stream's previous block's last event, now that this block
      holds its successor (None: no previous block, or its successor is not in the trace).
    """

    inner: np.ndarray
    follows: np.ndarray | None
    previous: int | None

    def full(self, last: int | None = None) -> np.ndarray:
        """One value per row, NO_HANDLE where unknown; `last`: the last row's, if known."""
        n = len(self.inner) + 1
        out = np.full(n, NO_HANDLE, np.int64)
        out[:-1] = self.inner if self.follows is None else np.where(self.follows, self.inner, NO_HANDLE)
        if last is not None:
            out[-1] = last
        return out


def within(t: np.ndarray, g: np.ndarray, seq: np.ndarray,
           stored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(inner, follows) of one block's columns (see BlockHandles); `stored`: the handle_ns column a
    record-time filter kept, if the block has one."""
    with np.errstate(all="ignore"):
        inner = (t[1:] - g[1:]) - t[:-1]
    n = len(seq)
    if not n or int(seq[-1]) - int(seq[0]) == n - 1:  # no sequence number dropped inside the block
        return inner, None
    follows = seq[1:] == seq[:-1] + np.uint64(1)
    if stored is not None:
        kept = stored[:-1]
        inner = np.where(follows, inner, kept)
        follows = follows | (kept != NO_HANDLE)
    return inner, follows


def stored_last(cols) -> int | None:
    """The handling time a record-time filter kept for a block's last event (None: none kept)."""
    stored = cols.get(_STORED)
    if stored is None or not len(stored) or int(stored[-1]) == NO_HANDLE:
        return None
    return int(stored[-1])


def with_lookahead(batch, following) -> np.ndarray:
    """Every row's handling time (NO_HANDLE where unknown) of a block, given the stream's next
    block (`following`, None at the stream's end) read ahead."""
    cols = batch.columns
    t, g, seq = cols["t_exit"], cols["guest_ns"], cols[_SEQ]
    if not len(t):
        return np.empty(0, np.int64)
    inner, follows = within(t, g, seq, cols.get(_STORED))
    last = stored_last(cols)
    if last is None and following is not None and following.n_rows:
        nxt = following.columns
        last = _across(int(seq[-1]), int(t[-1]), nxt[_SEQ], nxt["t_exit"], nxt["guest_ns"])
    return BlockHandles(inner, follows, None).full(last)


class Stitcher:
    """Handling times of exit blocks read in file order (sequence order within each stream,
    streams interleaved): it remembers each stream's last event until its next block comes."""

    def __init__(self) -> None:
        # stream → (seq, t_exit, the handling time a filter kept or None) of its last event so far
        self._last: dict[tuple[int, int, int], tuple[int, int, int | None]] = {}

    def block(self, batch) -> BlockHandles:
        cols = batch.columns
        t, g, seq = cols["t_exit"], cols["guest_ns"], cols[_SEQ]
        stream = (batch.vm, batch.vcpu, batch.epoch)
        before = self._last.pop(stream, None)
        if not len(t):
            if before is not None:
                self._last[stream] = before
            return BlockHandles(np.empty(0, np.int64), None, None)
        previous = None if before is None else before[2] if before[2] is not None else _across(
            before[0], before[1], seq, t, g)
        inner, follows = within(t, g, seq, cols.get(_STORED))
        self._last[stream] = (int(seq[-1]), int(t[-1]), stored_last(cols))
        return BlockHandles(inner, follows, previous)

    def unclaimed(self) -> dict[tuple[int, int, int], int]:
        """After the last block: {stream: handling time} of each stream's last event whose time a
        record-time filter kept (no later block came to give it as `previous`)."""
        return {stream: last[2] for stream, last in self._last.items() if last[2] is not None}
