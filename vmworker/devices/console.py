"""The VM's text output sink, shared by every device that prints (UART THR, debugcon)."""

from __future__ import annotations

import threading
from typing import BinaryIO

# How much guest output `captured()` keeps: enough for a test or an end-of-run summary,
# small enough that a guest printing forever costs a fixed amount of memory.
CAPTURE_LIMIT = 64 * 1024

# A guest that never prints a newline must still be seen (and must not grow the pending tail
# without bound): past this many bytes the partial line is emitted as it is.
MAX_PENDING_LINE = 4096


class Console:
    """Writes guest text to a binary stream and keeps the last `CAPTURE_LIMIT` bytes of it.

    With ``line_buffered`` only whole lines reach the stream (the partial tail waits for its
    newline or `flush()`), so the VMM's own log lines on the same terminal never land in the
    middle of a guest's line. ``stream=None`` only captures. Several vCPU threads may write.
    """

    def __init__(self, stream: BinaryIO | None, line_buffered: bool, file_limit: int | None = None) -> None:
        self._stream = stream
        # A stream that is a regular file (a console file) stops at file_limit bytes, with a note.
        self.file_limit = file_limit if file_limit and _file_size(stream) is not None else None
        self._file_bytes = _file_size(stream) or 0
        # A restarted VM appends to its file: an earlier epoch may have written the note already.
        self._note_due = self.file_limit is not None and self._file_bytes < self.file_limit
        self.limit_reached = False
        self.on_limit = None  # called once (no arguments) when the file reaches its limit
        self.line_buffered = line_buffered
        self._lock = threading.Lock()
        self._pending = bytearray()
        # Grows to twice the limit before trimming, so per-byte writes stay O(1) amortised.
        self._capture = bytearray()
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            self.bytes_written += len(data)
            self._capture += data
            if len(self._capture) > 2 * CAPTURE_LIMIT:
                del self._capture[: len(self._capture) - CAPTURE_LIMIT]
            if not self.line_buffered:
                self._emit(data)
                return
            self._pending += data
            cut = self._pending.rfind(b"\n") + 1
            if cut == 0 and len(self._pending) >= MAX_PENDING_LINE:
                cut = len(self._pending)
            if cut:
                chunk = bytes(self._pending[:cut])
                del self._pending[:cut]
                self._emit(chunk)

    def flush(self) -> None:
        """Emit the partial line held back by line buffering (end of run, before a log line)."""
        with self._lock:
            if self._pending:
                chunk = bytes(self._pending)
                self._pending.clear()
                self._emit(chunk)

    def captured(self) -> bytes:
        """The last `CAPTURE_LIMIT` bytes the guest wrote, emitted or still pending."""
        with self._lock:
            return bytes(self._capture[-CAPTURE_LIMIT:])

    def _emit(self, chunk: bytes) -> None:
        # Called with the lock held: chunks from different threads never interleave.
        if self._stream is None or self.limit_reached:
            return
        if self.file_limit is not None and self._file_bytes + len(chunk) > self.file_limit:
            self._stop_at_limit(chunk)
            return
        self._file_bytes += len(chunk)
        self._stream.write(chunk)
        self._stream.flush()

    def _stop_at_limit(self, chunk: bytes) -> None:
        room = max(0, self.file_limit - self._file_bytes)
        self.limit_reached = True
        if self._note_due:
            self._stream.write(chunk[:room] + LIMIT_NOTE.format(limit=self.file_limit).encode())
            self._stream.flush()
        if self.on_limit is not None:
            self.on_limit()


LIMIT_NOTE = ("\n[vmsup: this console file reached its limit of {limit} bytes (console_limit); the guest's "
              "further output is only in the trace's exits]\n")


def _file_size(stream) -> int | None:
    """The size of a stream that is a regular file; None for a terminal, pipe or no stream."""
    import os
    import stat
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None
