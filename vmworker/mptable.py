"""The MultiProcessor table: how a kernel written for the Intel MP Specification (version 1.4)
finds its CPUs, local APICs and I/O APIC.

Source: Intel MultiProcessor Specification 1.4 — §4.1 (the MP floating pointer structure), §4.2
(the MP configuration table header), §4.3 (base table entries: processor, bus, I/O APIC, I/O
interrupt and local interrupt assignment). Where it sits: vmworker/layout.py (MP_FLOATING_POINTER,
MP_CONFIG_TABLE).

The machine is what KVM's in-kernel irqchip gives: one local APIC per vCPU (APIC ID = vCPU index),
an I/O APIC at 0xFEC00000 with the ISA IRQs 0-15 on its pins 0-15 (KVM's default GSI routing, so
no override), and the 8259s behind LINT0 (ExtINT) with NMI on LINT1.
"""

from __future__ import annotations

import struct

from . import layout

SPEC_REV = 4  # MP spec 1.4
LAPIC_VERSION = 0x14  # an integrated xAPIC (the version register's value KVM reports)
IOAPIC_VERSION = 0x11  # the 82093AA's, which KVM's I/O APIC reports
MAX_CPUS = 254  # APIC IDs are 8-bit and the I/O APIC takes the next one (§4.3.1: IDs are unique)
ISA_IRQS = 16
# §4.3.1 processor entry CPU flags: EN (usable), BP (the bootstrap processor).
CPU_ENABLED, CPU_BOOTSTRAP = 1, 2
# §4.3.4 interrupt types: INT (vectored by the APIC), NMI, ExtINT (vectored by the 8259).
INT_VECTORED, INT_NMI, INT_EXTINT = 0, 1, 3
ALL_LAPICS = 0xFF  # destination "all local APICs" in a local interrupt entry

_FLOATING = struct.Struct("<4sIBBB5s")  # "_MP_", table address, length (16-byte units), rev, checksum, features
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")  # "PCMP", length, rev, checksum, OEM, product, OEM table,
#                                                 its size, entry count, LAPIC address, extended length/checksum
_PROCESSOR = struct.Struct("<BBBBII8x")  # type 0, APIC ID, APIC version, flags, signature, features
_BUS = struct.Struct("<BB6s")  # type 1, bus ID, bus type
_IOAPIC = struct.Struct("<BBBBI")  # type 2, ID, version, flags (EN), address
_INTERRUPT = struct.Struct("<BBHBBBB")  # type 3/4, interrupt type, flags, bus, bus IRQ, APIC ID, pin
ISA_BUS = 0


def checksummed(table: bytes, at: int) -> bytes:
    """`table` with the byte at `at` set so all its bytes sum to 0 mod 256 (MP spec and ACPI alike)."""
    out = bytearray(table)
    out[at] = (-sum(out)) & 0xFF
    return bytes(out)


def config_table(cpus: int, cpu_signature: int, cpu_features: int) -> bytes:
    """The §4.2 configuration table (header and base entries) for `cpus` processors."""
    cpus = min(cpus, MAX_CPUS)
    ioapic_id = cpus
    entries = [_PROCESSOR.pack(0, i, LAPIC_VERSION, CPU_ENABLED | (CPU_BOOTSTRAP if i == 0 else 0),
                               cpu_signature, cpu_features) for i in range(cpus)]
    entries.append(_BUS.pack(1, ISA_BUS, b"ISA   "))
    entries.append(_IOAPIC.pack(2, ioapic_id, IOAPIC_VERSION, 1, layout.IOAPIC_BASE))
    # IRQ 2 is the 8259 cascade: no device raises it, so it gets no entry (as PC firmware does).
    entries += [_INTERRUPT.pack(3, INT_VECTORED, 0, ISA_BUS, irq, ioapic_id, irq) for irq in range(ISA_IRQS) if irq != 2]
    entries.append(_INTERRUPT.pack(4, INT_EXTINT, 0, ISA_BUS, 0, ALL_LAPICS, 0))  # 8259 → LINT0
    entries.append(_INTERRUPT.pack(4, INT_NMI, 0, ISA_BUS, 0, ALL_LAPICS, 1))  # NMI → LINT1
    body = b"".join(entries)
    header = _HEADER.pack(b"PCMP", _HEADER.size + len(body), SPEC_REV, 0, b"VMSUP   ", b"VMSUP MACHINE", 0, 0,
                          len(entries), layout.LAPIC_BASE, 0, 0, 0)
    return checksummed(header + body, 7)


def write_mp_table(memory, cpus: int, cpu_signature: int = 0, cpu_features: int = 0) -> None:
    """The floating pointer and the configuration table it points to, into guest RAM."""
    table = config_table(cpus, cpu_signature, cpu_features)
    if layout.MP_CONFIG_TABLE + len(table) > layout.ACPI_RSDP:
        raise ValueError(f"MP table of {len(table)} bytes does not fit below {layout.ACPI_RSDP:#x}")
    # Feature byte 1 = 0: a configuration table is present (no default configuration); feature
    # byte 2 bit 7 (IMCR) clear: virtual wire mode, the 8259s reach LINT0 directly.
    floating = _FLOATING.pack(b"_MP_", layout.MP_CONFIG_TABLE, 1, SPEC_REV, 0, bytes(5))
    memory.write(layout.MP_CONFIG_TABLE, table)
    memory.write(layout.MP_FLOATING_POINTER, checksummed(floating, 10))
