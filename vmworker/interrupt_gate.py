"""Where an interrupt vector leads: the handler's linear address, read from the guest's IDT (or IVT).

Used by the rerun to stop on a handler's first instruction with a debug register instead of
single-stepping the interrupt's delivery. Layouts: real-mode IVT entries are offset:segment
(SDM Vol. 3A §20.1.4); protected-mode gates are 8 bytes with the offset split at bytes 0-1 and
6-7 and the selector at 2-3 (§6.11); long-mode gates are 16 bytes with offset bits 32-63 at
bytes 8-11 (§6.14.1). A segment's base comes from its GDT descriptor (§3.4.5).
"""

from __future__ import annotations

import struct

from .errors import GuestMemoryError

CR0_PE, CR0_PG = 1 << 0, 1 << 31
EFER_LMA = 1 << 10


def handler_address(vcpu, memory, vector: int) -> int | None:
    """The linear address vector `vector` enters the guest at, or None where it cannot be read."""
    sregs = vcpu.get_sregs()

    def read(linear: int, n: int) -> bytes:
        gpa = vcpu.translate(linear) if sregs.cr0 & CR0_PG else linear
        if gpa is None:
            raise GuestMemoryError(f"{linear:#x} is not mapped")
        return memory.read(gpa, n)

    try:
        base = sregs.idt.base
        if not sregs.cr0 & CR0_PE:
            offset, segment = struct.unpack("<HH", read(base + 4 * vector, 4))
            return segment * 16 + offset
        if sregs.efer & EFER_LMA:
            gate = read(base + 16 * vector, 16)
            low, _, mid, high = struct.unpack_from("<HHxxHI", gate)
            return low | mid << 16 | high << 32
        low, selector, high = struct.unpack("<HHxxH", read(base + 8 * vector, 8))
        descriptor = read(sregs.gdt.base + (selector & ~7), 8)
        segment_base = descriptor[2] | descriptor[3] << 8 | descriptor[4] << 16 | descriptor[7] << 24
        return (segment_base + (low | high << 16)) & 0xFFFF_FFFF
    except (GuestMemoryError, struct.error):
        return None
