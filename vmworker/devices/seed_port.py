"""Port 0x10, where the kvmsample seed guest writes its counter (`out %ax, $0x10`)."""

from __future__ import annotations


class SeedPort:
    """Remembers the last value written; reads give that value back.

    Prints nothing: the vCPU loop already logs every exit with its port and data. This port is
    the seed guest's whole hot path, so a write only stores the guest's bytes (one attribute
    store, atomic under the GIL); `last_value` decodes them when someone asks. The number of
    writes is the number of port-0x10 exits, which the vCPU loop and the trace count already.
    """

    # Writes may wait in KVM's coalesced ring (vmworker/coalesce.py): nothing the guest sees changes
    # before its next exit, which drains the ring first.
    deferrable_writes = True

    def __init__(self, name: str = "seed") -> None:
        self.name = name
        self._last = b"\0"

    @property
    def last_value(self) -> int:
        return int.from_bytes(self._last, "little")

    def read(self, offset: int, size: int) -> bytes:
        return (self.last_value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self._last = data
