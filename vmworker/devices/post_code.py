"""Port 0x80: the POST code port. Firmware and kernels write progress codes here (a POST card on a
real PC shows them) and Linux writes to it as a short I/O delay (`outb %al, $0x80`, io_delay).

Claimed so those writes are a device's and not counted as unclaimed; the vCPU loop already records
each one as an io exit, so the trace holds every code in order. A read returns the last code
written, as the PC/AT's DMA page register at 0x80 latches it.
"""

from __future__ import annotations


class PostCodePort:
    # Writes may wait in KVM's coalesced ring (vmworker/coalesce.py): nothing the guest sees changes
    # before its next exit, which drains the ring first.
    deferrable_writes = True

    def __init__(self, name: str = "post") -> None:
        self.name = name
        self.last = 0xFF

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.last]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.last = data[0]  # a wider write reaches 0x81.. too, not this port
