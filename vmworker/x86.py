"""x86 CPU state at entry: real, 32-bit protected and 64-bit long mode.

The VMM writes a GDT (and, for long mode, identity-mapping page tables) into guest memory and
sets every segment, control and general register explicitly, so a guest never runs on whatever
KVM_CREATE_VCPU happened to leave behind. Descriptor bits: Intel SDM Vol. 3A §3.4.5 (segment
descriptors), §4.5 (4-level paging), §9.8.5 (initializing IA-32e mode).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import kvm_abi as abi
from . import layout

# Control-register and EFER bits (SDM Vol. 3A §2.5, §2.2.1).
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 always reads 1

# Page-table entry bits (SDM Vol. 3A §4.5): present, writable, 2 MiB page.
PTE_P, PTE_RW, PTE_PS = 1 << 0, 1 << 1, 1 << 7
HUGE_PAGE = 2 << 20


@dataclass(frozen=True)
class GdtLayout:
    """Where the GDT the VMM writes keeps its code, data and TSS descriptors (selectors = index * 8)."""

    code: int
    data: int
    tss: int

    @property
    def limit(self) -> int:
        return max(self.code, self.data, self.tss) + 7


# vmsup's own guests: code, data, TSS in slots 1-3.
VMSUP_GDT = GdtLayout(code=0x08, data=0x10, tss=0x18)
# The Linux boot protocol (Documentation/arch/x86/boot.rst, "32-bit Boot Protocol" and "64-bit Boot
# Protocol"): CS must be __BOOT_CS (0x10) and DS, ES, SS __BOOT_DS (0x18), both flat 4 GiB.
LINUX_BOOT_GDT = GdtLayout(code=0x10, data=0x18, tss=0x20)
SEL_CODE, SEL_DATA, SEL_TSS = VMSUP_GDT.code, VMSUP_GDT.data, VMSUP_GDT.tss


@dataclass(frozen=True)
class Descriptor:
    """A segment descriptor in the SDM's terms; `encode` is the GDT form, `to_kvm` the KVM form."""

    base: int
    limit: int  # 20-bit limit field (pages when g=1)
    access: int  # P | DPL | S | type
    flags: int  # G | D/B | L | AVL

    def encode(self) -> bytes:
        b, l = self.base, self.limit
        value = ((l & 0xFFFF) | ((b & 0xFFFFFF) << 16) | (self.access << 40) | (((l >> 16) & 0xF) << 48)
                 | ((self.flags & 0xF) << 52) | (((b >> 24) & 0xFF) << 56))
        return struct.pack("<Q", value)

    def to_kvm(self, selector: int) -> abi.kvm_segment:
        g = (self.flags >> 3) & 1
        return abi.kvm_segment(
            base=self.base, limit=(self.limit << 12) | 0xFFF if g else self.limit, selector=selector,
            type=self.access & 0xF, present=(self.access >> 7) & 1, dpl=(self.access >> 5) & 3,
            db=(self.flags >> 2) & 1, s=(self.access >> 4) & 1, l=(self.flags >> 1) & 1, g=g,
            avl=self.flags & 1, unusable=0)


# Access bytes: 0x9B = present, code, execute/read, accessed; 0x93 = present, data, read/write,
# accessed; 0x8B = present, system, busy 32/64-bit TSS. Flags: 0xC = 4 KiB granular, 32-bit;
# 0xA = 4 KiB granular, 64-bit code (L=1, D=0).
CODE32 = Descriptor(0, 0xFFFFF, 0x9B, 0xC)
CODE64 = Descriptor(0, 0xFFFFF, 0x9B, 0xA)
DATA = Descriptor(0, 0xFFFFF, 0x93, 0xC)
TSS = Descriptor(0, 0x67, 0x8B, 0x0)  # never used (no privilege changes) but VM entry wants a valid TR


def write_boot_tables(memory, mode: str, gdt: GdtLayout = VMSUP_GDT) -> None:
    """GDT (protected/long) and the identity map of the first 4 GiB (long)."""
    if mode == "real":
        return
    code = CODE64 if mode == "long" else CODE32
    table = bytearray(gdt.limit + 1)  # unused slots stay null descriptors
    for selector, descriptor in ((gdt.code, code), (gdt.data, DATA), (gdt.tss, TSS)):
        table[selector:selector + 8] = descriptor.encode()
    memory.write(layout.BOOT_GDT, bytes(table))
    if mode == "long":
        memory.write(layout.BOOT_PML4, struct.pack("<Q", layout.BOOT_PDPT | PTE_P | PTE_RW))
        pdpt = b"".join(struct.pack("<Q", (layout.BOOT_PD + i * layout.PAGE_SIZE) | PTE_P | PTE_RW) for i in range(4))
        memory.write(layout.BOOT_PDPT, pdpt)
        pds = b"".join(struct.pack("<Q", (i * HUGE_PAGE) | PTE_P | PTE_RW | PTE_PS) for i in range(4 * 512))
        memory.write(layout.BOOT_PD, pds)


def _real_segment(selector: int, type_: int) -> abi.kvm_segment:
    # Real mode: base = selector * 16, 64 KiB limit (SDM Vol. 3A §20.1.1).
    return abi.kvm_segment(base=selector << 4, limit=0xFFFF, selector=selector, type=type_, present=1, dpl=0,
                           db=0, s=1, l=0, g=0, avl=0, unusable=0)


def initial_sregs(current: abi.kvm_sregs, mode: str, load_addr: int, gdt: GdtLayout = VMSUP_GDT) -> abi.kvm_sregs:
    """Segment/control registers for `mode`. Only apic_base is kept from `current` (KVM's reset value)."""
    s = abi.kvm_sregs()
    s.apic_base = current.apic_base
    s.cr2 = s.cr8 = 0
    if mode == "real":
        seg = load_addr >> 4
        s.cs = _real_segment(seg, 0xB)  # code, execute/read, accessed
        s.ds = s.es = s.fs = s.gs = s.ss = _real_segment(seg, 0x3)  # data, read/write, accessed
        # Reset values (SDM Vol. 3A Table 9-1): TR busy 32-bit TSS, LDT present, IDT at 0 with limit 0xffff.
        s.tr = abi.kvm_segment(base=0, limit=0xFFFF, selector=0, type=0xB, present=1, s=0)
        s.ldt = abi.kvm_segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1, s=0)
        s.gdt = abi.kvm_dtable(base=0, limit=0xFFFF)
        s.idt = abi.kvm_dtable(base=0, limit=0xFFFF)
        s.cr0 = CR0_ET
        s.cr3 = s.cr4 = s.efer = 0
        return s
    code = CODE64 if mode == "long" else CODE32
    s.cs = code.to_kvm(gdt.code)
    s.ds = s.es = s.fs = s.gs = s.ss = DATA.to_kvm(gdt.data)
    s.tr = TSS.to_kvm(gdt.tss)
    s.ldt = abi.kvm_segment(base=0, limit=0, selector=0, type=0x2, present=0, s=0, unusable=1)
    s.gdt = abi.kvm_dtable(base=layout.BOOT_GDT, limit=gdt.limit)
    # IDT limit 0: no handlers, so any exception escalates to a triple fault (a clean shutdown exit).
    s.idt = abi.kvm_dtable(base=0, limit=0)
    s.cr0 = CR0_PE | CR0_ET | CR0_NE
    s.cr3 = s.cr4 = s.efer = 0
    if mode == "long":
        s.cr0 |= CR0_PG
        s.cr3 = layout.BOOT_PML4
        s.cr4 = CR4_PAE
        s.efer = EFER_LME | EFER_LMA
    return s


def stack_pointer(mode: str, vcpu_id: int, mem_size: int) -> int:
    if mode == "real":
        return (0x10000 - vcpu_id * layout.REAL_MODE_STACK_SLOT) & 0xFFFF
    return mem_size - vcpu_id * layout.STACK_SLOT


def initial_regs(mode: str, entry: int, load_addr: int, vcpu_id: int, mem_size: int) -> abi.kvm_regs:
    """General registers: all zero but RIP, RSP, RFLAGS and the vCPU index in RDI (our boot ABI)."""
    r = abi.kvm_regs()  # ctypes zero-fills every field
    r.rip = entry - load_addr if mode == "real" else entry
    r.rsp = stack_pointer(mode, vcpu_id, mem_size)
    r.rdi = vcpu_id
    r.rflags = RFLAGS_RESERVED
    return r


def min_mem_for_stacks(mode: str, vcpus: int) -> int:
    return 0 if mode == "real" else layout.BOOT_TABLES_END + vcpus * layout.STACK_SLOT


def max_real_mode_vcpus() -> int:
    return 0x10000 // layout.REAL_MODE_STACK_SLOT


def cpu_signature(supported) -> tuple[int, int]:
    """CPUID leaf 01H's EAX (family, model, stepping) and EDX (feature flags): what an MP table's
    processor entries say (MP spec 1.4 §4.3.1)."""
    for entry in supported.entries[:supported.nent]:
        if entry.function == 0x1:
            return entry.eax, entry.edx
    return 0, 0


def cpuid_for_vcpu(supported, vcpu_id: int):
    """KVM_GET_SUPPORTED_CPUID's table with the per-CPU fields made this vCPU's (a copy).

    The supported table describes the host's view; what differs per logical processor is its APIC ID
    (SDM Vol. 2A, CPUID: leaf 01H EBX[31:24] "Initial APIC ID", leaves 0BH/1FH EDX "x2APIC ID"), which
    must match the vCPU id KVM gave the in-kernel LAPIC.
    """
    cpuid = type(supported).from_buffer_copy(supported)
    for entry in cpuid.entries[:cpuid.nent]:
        if entry.function == 0x1:
            entry.ebx = (entry.ebx & 0x00FF_FFFF) | ((vcpu_id & 0xFF) << 24)
        elif entry.function in (0xB, 0x1F):
            entry.edx = vcpu_id
    return cpuid
