"""Port 0x10, where the kvmsample seed guest writes its counter (`out %ax, $0x10`)."""

from __future__ import annotations

import threading


class SeedPort:
    """Remembers the last value written and counts writes; reads give that value back.

    Prints nothing: the vCPU loop already records every exit with its port and data.
    """

    def __init__(self, name: str = "seed") -> None:
        self.name = name
        self._lock = threading.Lock()
        self.last_value = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self.last_value
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.last_value = int.from_bytes(data, "little")
            self.writes += 1
