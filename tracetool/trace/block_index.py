"""The writer's list of every block it wrote, kept for the index footer without growing memory.

A recorder writes blocks for as long as a run lasts (a 19-minute soak: 165k blocks, ~145 a
second), and the footer lists each one (format.INDEX_FIELDS, 48 bytes). Held in memory that is
the one part of the writer that grows with the file, so entries are gathered in a fixed-size
buffer and spilled, packed, to an unnamed temporary file beside the trace; close() reads them
back once to write the footer. Memory stays at one buffer however long the run; the spill file
costs one fd and 48 bytes of disk per block, and vanishes when closed (or when the process dies).

When the spill file cannot be made or written (disk full), the index is given up: the footer
then keeps only the totals, as it does for a file of more than MAX_INDEX_ENTRIES blocks, and
readers scan the file instead (they do for a torn file anyway).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from .format import INDEX_FIELDS, MAX_INDEX_ENTRIES

ENTRY = np.dtype([(name, dt) for name, dt in INDEX_FIELDS])
BUFFER_ENTRIES = 4096  # 192 KiB: blocks listed in memory before they go to the spill file


class BlockIndex:
    """Entries (offset, type, vm, vcpu, epoch, first_seq, count, n_rows), in file order.

    `entries` counts what was added; `columns()` gives the footer's columns (None once the index
    was given up). `close()` drops the spill file."""

    def __init__(self, directory: str, limit: int = MAX_INDEX_ENTRIES) -> None:
        self._directory = directory or "."
        self._limit = limit
        self._buffer = np.zeros(BUFFER_ENTRIES, dtype=ENTRY)
        self._buffered = 0
        self._spill = None  # opened at the first spill: a short trace never touches the disk
        self._spilled = 0
        self.entries = 0
        self.given_up = False

    @property
    def in_memory(self) -> int:
        return self._buffered

    def add(self, entry: tuple) -> None:
        self.entries += 1
        if self.given_up:
            return
        if self.entries > self._limit:  # too many to list: the footer keeps the totals only
            self._give_up()
            return
        self._buffer[self._buffered] = entry
        self._buffered += 1
        if self._buffered == BUFFER_ENTRIES:
            self._spill_buffer()

    def _spill_buffer(self) -> None:
        try:
            if self._spill is None:
                # Unnamed (O_TMPFILE where the filesystem has it) and 0600, in the trace's own
                # directory: the same disk the trace is on, never a shared /tmp.
                self._spill = tempfile.TemporaryFile(dir=self._directory, prefix=".vmtrace-index-")
            self._spill.write(self._buffer[:self._buffered].tobytes())
        except OSError:
            self._give_up()
            return
        self._spilled += self._buffered
        self._buffered = 0

    def _give_up(self) -> None:
        self.given_up = True
        self._buffered = 0
        self.close()

    def columns(self) -> dict[str, bytes] | None:
        """Every entry, column by column as the footer stores them (packed little-endian)."""
        if self.given_up:
            return None
        rows = self._buffer[:self._buffered]
        if self._spilled:
            try:
                spilled = self._read_spill()
            except OSError:
                return None
            rows = np.concatenate([spilled, rows])
        return {name: np.ascontiguousarray(rows[name]).tobytes() for name, _ in INDEX_FIELDS}

    def _read_spill(self) -> np.ndarray:
        self._spill.flush()
        raw = os.pread(self._spill.fileno(), self._spilled * ENTRY.itemsize, 0)
        if len(raw) != self._spilled * ENTRY.itemsize:
            raise OSError("the index spill file is short")
        return np.frombuffer(raw, dtype=ENTRY)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
