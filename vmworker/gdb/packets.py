"""RSP framing (GDB manual, "Overview" of the Remote Protocol): `$data#cs`, cs = sum of the data
bytes mod 256 as two hex digits; `+`/`-` acknowledge; a lone 0x03 byte is an interrupt request.

In data, `$`, `#`, `}` and `*` are escaped as `}` followed by the byte XOR 0x20. Replies never use
run-length encoding, and escaping `*` keeps a literal `*` from being read as one by gdb.
"""

from __future__ import annotations

import logging

log = logging.getLogger("vmsup.gdb")

INTERRUPT = 0x03
ESCAPE = 0x7D
_MUST_ESCAPE = frozenset(b"$#}*")
# A packet longer than this is refused (we announce PacketSize below it); bounds our buffer.
MAX_PACKET = 0x4000


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in _MUST_ESCAPE:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Binary data of an incoming packet (X, vFile...) back to bytes; a dangling `}` is dropped."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == ESCAPE:
            nxt = next(it, None)
            if nxt is not None:
                out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(data: bytes) -> bytes:
    """A whole packet for `data` (escaped here)."""
    body = escape(data)
    return b"$" + body + b"#" + f"{checksum(body):02x}".encode()


class PacketReader:
    """Splits a byte stream from gdb into events: ("packet", data), ("interrupt", None),
    ("ack", b"+"/b"-"). Bad checksums yield ("bad", data) so the stub can answer `-`."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[str, bytes | None]]:
        self._buf += chunk
        events: list[tuple[str, bytes | None]] = []
        buf = self._buf
        while buf:
            first = buf[0]
            if first == INTERRUPT:
                events.append(("interrupt", None))
                del buf[0]
            elif first in (0x2B, 0x2D):  # '+', '-'
                events.append(("ack", bytes(buf[:1])))
                del buf[0]
            elif first == 0x24:  # '$'
                end = buf.find(b"#", 1)
                if end < 0:
                    if len(buf) > MAX_PACKET + 4:
                        log.debug("gdb: dropping an unterminated packet of %d bytes", len(buf))
                        events.append(("bad", bytes(buf[:64])))
                        buf.clear()
                    break
                if len(buf) < end + 3:
                    break  # the two checksum digits have not arrived yet
                body = bytes(buf[1:end])
                given = bytes(buf[end + 1:end + 3])
                del buf[:end + 3]
                try:
                    ok = int(given, 16) == checksum(body)
                except ValueError:
                    ok = False
                events.append(("packet", body) if ok else ("bad", body))
            else:
                del buf[0]  # noise between packets (the GDB manual says to ignore it)
        return events
