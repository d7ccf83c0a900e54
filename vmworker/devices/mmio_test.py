"""A small MMIO device for testing the MMIO exit path end to end."""

from __future__ import annotations

import threading

LENGTH = 0x1000
ID_OFFSET = 0x0
ID_VALUE = 0x75736D76  # little-endian bytes spell "vmsu"
ID_BYTES = ID_VALUE.to_bytes(4, "little")
SCRATCH_OFFSET = 0x8
SCRATCH_SIZE = 8


class MmioTestDevice:
    """A 4-byte ID at 0x0, an 8-byte scratch register at 0x8-0xF, a known pattern elsewhere.

    Every byte is decoded on its own, so any access width or alignment gives a predictable
    answer: byte i of an access at offset o reads the ID byte, the scratch byte, or the pattern
    ``(o + i) & 0xFF``. Writes outside the scratch register are ignored. `reads` and `writes`
    count accesses, so a test can check each guest access reached the device once.
    """

    def __init__(self, name: str = "mmio-test") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._scratch = bytearray(SCRATCH_SIZE)
        self.reads = 0
        self.writes = 0

    @property
    def scratch(self) -> int:
        with self._lock:
            return int.from_bytes(self._scratch, "little")

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            self.reads += 1
            return bytes(self._read_byte(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.writes += 1
            for i, value in enumerate(data):
                k = offset + i - SCRATCH_OFFSET
                if 0 <= k < SCRATCH_SIZE:
                    self._scratch[k] = value

    def _read_byte(self, off: int) -> int:
        if ID_OFFSET <= off < ID_OFFSET + len(ID_BYTES):
            return ID_BYTES[off - ID_OFFSET]
        if SCRATCH_OFFSET <= off < SCRATCH_OFFSET + SCRATCH_SIZE:
            return self._scratch[off - SCRATCH_OFFSET]
        return off & 0xFF
