"""The byte source behind the UART's receive side: host stdin, a file, or fixed test bytes."""

from __future__ import annotations

import threading
from typing import BinaryIO

# Past this many unread bytes the reader thread stops reading the host stream, so a guest that
# never reads its UART cannot make the VMM buffer a whole file (the host pipe applies backpressure).
BUFFER_LIMIT = 64 * 1024

# One read of the host stream; a pipe hands back whatever is there, up to this.
CHUNK_SIZE = 4096

# Consumed bytes are dropped from the front once this many pile up (amortises the memmove).
_COMPACT_AT = 4096


class SerialInput:
    """Bytes for the guest, read ahead by a daemon thread; the vCPU side never blocks.

    `at_eof()` is True only once the stream has ended *and* every byte was consumed, so the
    UART can drop DCD exactly after the guest read the last byte. A read error counts as EOF
    (it is kept in `error` so the end-of-run summary can say why input stopped).
    """

    def __init__(self, data: bytes = b"", eof: bool = False) -> None:
        self._cond = threading.Condition()
        self._buf = bytearray(data)
        self._pos = 0  # next unread byte in _buf
        self._eof = eof
        self.error: BaseException | None = None
        self.bytes_read = 0  # taken from the host stream
        self._thread: threading.Thread | None = None

    @classmethod
    def from_stream(cls, stream: BinaryIO) -> SerialInput:
        self = cls()
        self._thread = threading.Thread(target=self._pump, args=(stream,), name="serial-input", daemon=True)
        self._thread.start()
        return self

    @classmethod
    def from_bytes(cls, data: bytes) -> SerialInput:
        return cls(data, eof=True)

    @classmethod
    def empty(cls) -> SerialInput:
        return cls(b"", eof=True)

    def poll(self) -> int | None:
        """The next byte, or None if none is buffered right now."""
        with self._cond:
            if self._pos >= len(self._buf):
                return None
            byte = self._buf[self._pos]
            self._pos += 1
            if self._pos >= _COMPACT_AT:
                del self._buf[: self._pos]
                self._pos = 0
            if len(self._buf) - self._pos == BUFFER_LIMIT:
                self._cond.notify_all()  # the reader may be waiting for room
            return byte

    def has_data(self) -> bool:
        with self._cond:
            return self._pos < len(self._buf)

    def at_eof(self) -> bool:
        with self._cond:
            return self._eof and self._pos >= len(self._buf)

    def buffered(self) -> int:
        """Unread bytes held now (at most `BUFFER_LIMIT` + one chunk)."""
        with self._cond:
            return len(self._buf) - self._pos

    def wait(self, timeout: float) -> bool:
        """Wait until a byte is buffered or input has ended; False on timeout. For tests and idle loops."""
        with self._cond:
            return self._cond.wait_for(lambda: self._eof or self._pos < len(self._buf), timeout)

    def _pump(self, stream: BinaryIO) -> None:
        # read1 returns what one read of the pipe gives instead of waiting for a full chunk.
        read = getattr(stream, "read1", None) or stream.read
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._buf) - self._pos <= BUFFER_LIMIT)
            try:
                chunk = read(CHUNK_SIZE)
            except (OSError, ValueError) as exc:  # ValueError: the stream was closed under us
                with self._cond:
                    self.error = exc
                    self._eof = True
                    self._cond.notify_all()
                return
            with self._cond:
                if not chunk:
                    self._eof = True
                else:
                    self._buf += chunk
                    self.bytes_read += len(chunk)
                self._cond.notify_all()
            if not chunk:
                return
