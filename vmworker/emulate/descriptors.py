"""Segment descriptors, IDT gates and TSS stack pointers, read from guest memory as the CPU does.

Layouts: SDM Vol. 3A §3.4.5 (segment descriptors), §6.11 and §6.14.1 (32- and 64-bit IDT gates),
§7.2.1 and §7.7 (32- and 64-bit TSS). These are the CPU's own (supervisor) accesses, allowed
whatever the CPL. Only the GDT is supported: a selector with TI = 1 (the LDT) is refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import kvm_abi as abi
from .cpu import GuestCpu, Unsupported

# Descriptor type bits for code/data segments (S = 1): bit 3 = code, bit 2 = conforming (code) or
# expand-down (data), bit 1 = readable (code) / writable (data), bit 0 = accessed.
TYPE_CODE, TYPE_CONFORMING, TYPE_WRITABLE, TYPE_ACCESSED = 8, 4, 2, 1
# System descriptor and gate types (S = 0).
GATE_TASK, GATE_INTERRUPT16, GATE_TRAP16, GATE_INTERRUPT, GATE_TRAP = 0x5, 0x6, 0x7, 0xE, 0xF
TSS32_BUSY = 0xB


def load_segment(cpu: GuestCpu, selector: int, what: str) -> abi.kvm_segment:
    """The GDT descriptor `selector` names, as KVM's segment register form, with the accessed bit
    set in memory too (the CPU sets it when it loads a segment register)."""
    if selector & 4:
        raise Unsupported(f"{what} selector {selector:#x} is in the LDT (only GDT selectors are done)")
    index = selector & ~7
    if index == 0 or index + 7 > cpu.sregs.gdt.limit:
        raise Unsupported(f"{what} selector {selector:#x} is null or beyond the GDT limit {cpu.sregs.gdt.limit:#x}")
    at = cpu.linear(cpu.sregs.gdt.base, index)
    low, high = struct.unpack("<II", cpu.read(at, 8, what=f"{what} descriptor"))
    if not high & (1 << 15):
        raise Unsupported(f"{what} segment {selector:#x} is not present")
    if not (high >> 12) & 1:
        raise Unsupported(f"{what} selector {selector:#x} names a system descriptor")
    if not high & (TYPE_ACCESSED << 8):
        high |= TYPE_ACCESSED << 8
        cpu.write(at + 4, struct.pack("<I", high), what=f"{what} descriptor")
    limit = (low & 0xFFFF) | (high & 0xF0000)
    g = (high >> 23) & 1
    return abi.kvm_segment(
        base=(low >> 16) | ((high & 0xFF) << 16) | (high & 0xFF00_0000),
        limit=(limit << 12) | 0xFFF if g else limit, selector=selector, type=(high >> 8) & 0xF,
        present=1, dpl=(high >> 13) & 3, db=(high >> 22) & 1, s=1, l=(high >> 21) & 1, g=g,
        avl=(high >> 20) & 1, unusable=0)


def null_stack_segment(cpl: int) -> abi.kvm_segment:
    """SS loaded with a null selector in 64-bit mode (allowed at CPL < 3, SDM Vol. 3A §5.2.1).

    KVM keeps the CPL in SS.DPL, so like KVM's own emulator (load_segment_descriptor) this is a
    usable flat data segment whose selector is null with RPL = CPL.
    """
    return abi.kvm_segment(base=0, limit=0xFFFF_FFFF, selector=cpl, type=3, present=1, dpl=cpl, db=1, s=1,
                           l=0, g=1, avl=0, unusable=0)


def null_data_segment(old: abi.kvm_segment) -> abi.kvm_segment:
    """A data segment register nulled by a return to an outer privilege level (IRET operation)."""
    return abi.kvm_segment(base=old.base, limit=0, selector=0, type=0, present=0, dpl=0, db=0, s=0, l=0, g=0,
                           avl=0, unusable=1)


def is_code(seg: abi.kvm_segment) -> bool:
    return bool(seg.type & TYPE_CODE)


def is_conforming_code(seg: abi.kvm_segment) -> bool:
    return bool(seg.type & TYPE_CODE and seg.type & TYPE_CONFORMING)


def is_writable_data(seg: abi.kvm_segment) -> bool:
    return not seg.type & TYPE_CODE and bool(seg.type & TYPE_WRITABLE)


@dataclass(frozen=True)
class Gate:
    vector: int
    type: int
    dpl: int
    present: bool
    selector: int
    offset: int
    ist: int  # 64-bit gates only: Interrupt Stack Table index, 0 = none

    @property
    def clears_if(self) -> bool:
        return self.type in (GATE_INTERRUPT, GATE_INTERRUPT16)


def read_gate(cpu: GuestCpu, vector: int) -> Gate:
    """IDT entry `vector`: 8-byte gates in protected mode, 16-byte gates in IA-32e mode."""
    size = 16 if cpu.long_mode else 8
    if vector * size + size - 1 > cpu.sregs.idt.limit:
        raise Unsupported(f"vector {vector:#x} is beyond the IDT limit {cpu.sregs.idt.limit:#x} (a #GP)")
    raw = cpu.read(cpu.linear(cpu.sregs.idt.base, vector * size), size, what=f"IDT entry {vector:#x}")
    low, high = struct.unpack_from("<II", raw)
    offset = (low & 0xFFFF) | (high & 0xFFFF_0000)
    if size == 16:
        offset |= struct.unpack_from("<I", raw, 8)[0] << 32
    return Gate(vector=vector, type=(high >> 8) & 0xF, dpl=(high >> 13) & 3, present=bool(high & (1 << 15)),
                selector=low >> 16, offset=offset, ist=high & 7 if size == 16 else 0)


def tss_stack(cpu: GuestCpu, cpl: int) -> tuple[int, int]:
    """(SSn, ESPn) from the 32-bit TSS for privilege level `cpl` (SDM Vol. 3A Figure 7-2)."""
    if cpu.sregs.tr.type != TSS32_BUSY:
        raise Unsupported(f"task register type {cpu.sregs.tr.type:#x} is not a busy 32-bit TSS")
    raw = cpu.read(cpu.linear(cpu.sregs.tr.base, 4 + 8 * cpl), 8, what="TSS stack pointer")
    esp, ss = struct.unpack("<II", raw)
    return ss & 0xFFFF, esp


def tss64_stack(cpu: GuestCpu, cpl: int, ist: int) -> int:
    """RSPn (ist = 0) or ISTn from the 64-bit TSS (SDM Vol. 3A Figure 7-11)."""
    at = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * cpl
    return struct.unpack("<Q", cpu.read(cpu.linear(cpu.sregs.tr.base, at), 8, what="TSS stack pointer"))[0]
