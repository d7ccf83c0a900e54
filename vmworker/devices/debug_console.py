"""The Bochs/QEMU debug console (port 0xE9): one `out` per character, no UART setup needed."""

from __future__ import annotations

import threading

from .console import Console

# Bochs convention: reading the port returns 0xE9, so a guest can tell the port is there.
DETECT_VALUE = 0xE9


class DebugConsole:
    """Writes go to the console; reads return 0xE9.

    Only the low byte of a wider write is a character: like QEMU's debugcon, the port is one byte
    wide and the upper bytes of an ``out %ax`` belong to the next port, which is not this device.
    """

    # Writes may wait in KVM's coalesced ring (vmworker/coalesce.py): nothing the guest sees changes
    # before its next exit, which drains the ring first.
    deferrable_writes = True

    def __init__(self, console: Console, name: str = "debugcon") -> None:
        self.name = name
        self._console = console
        self._lock = threading.Lock()
        self.bytes_out = 0

    def read(self, offset: int, size: int) -> bytes:
        # Bytes past the first belong to the (unclaimed) next ports and float high.
        return bytes((DETECT_VALUE,)) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        self._console.write(data[:1])
        with self._lock:
            self.bytes_out += 1
