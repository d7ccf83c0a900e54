"""ACPI tables describing the CPUs: an RSDP, an RSDT and a MADT (Multiple APIC Description Table).

Source: ACPI Specification 6.5 — §5.2.5.3 (RSDP, revision 0 = ACPI 1.0: signature, checksum,
OEM ID, revision, RSDT address), §5.2.6 (the common table header), §5.2.7 (RSDT), §5.2.12 (MADT)
with §5.2.12.2 (Processor Local APIC), §5.2.12.3 (I/O APIC) and §5.2.12.7 (Local APIC NMI).
Where they sit: vmworker/layout.py (ACPI_RSDP, ACPI_RSDT, ACPI_MADT).

Only what a kernel needs to find and start its CPUs: there is no FADT or DSDT (no ACPI hardware,
no AML), so a kernel that insists on full ACPI falls back to the MP table (vmworker.mptable), which
describes the same machine: local APIC IDs = vCPU indexes, the I/O APIC with the ISA IRQs on its
first 16 pins, the 8259s present (PCAT_COMPAT).
"""

from __future__ import annotations

import struct

from . import layout
from .mptable import MAX_CPUS, checksummed

OEM_ID = b"VMSUP "
OEM_TABLE_ID = b"VMSUPMCH"
CREATOR_ID = b"VMSP"
MADT_REVISION = 5  # ACPI 6.2+ MADT layout; the entries used here are unchanged since ACPI 1.0
MADT_PCAT_COMPAT = 1  # flags bit 0: dual 8259s are present as well
PROCESSOR_LOCAL_APIC, IO_APIC, LOCAL_APIC_NMI = 0, 1, 4
LAPIC_ENABLED = 1
ALL_PROCESSORS = 0xFF  # ACPI processor UID meaning "every processor" in a Local APIC NMI entry

_RSDP = struct.Struct("<8sB6sBI")  # "RSD PTR ", checksum, OEM ID, revision 0, RSDT address
_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # signature, length, revision, checksum, OEM, table ID, ...


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = _HEADER.pack(signature, _HEADER.size + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    return checksummed(header + body, 9)


def madt(cpus: int) -> bytes:
    cpus = min(cpus, MAX_CPUS)
    body = struct.pack("<II", layout.LAPIC_BASE, MADT_PCAT_COMPAT)
    body += b"".join(struct.pack("<BBBBI", PROCESSOR_LOCAL_APIC, 8, i, i, LAPIC_ENABLED) for i in range(cpus))
    body += struct.pack("<BBBBII", IO_APIC, 12, cpus, 0, layout.IOAPIC_BASE, 0)  # ID after the LAPICs', GSI base 0
    body += struct.pack("<BBBHB", LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 1)  # NMI on LINT1, as the MP table says
    return _table(b"APIC", MADT_REVISION, body)


def write_acpi_tables(memory, cpus: int) -> None:
    table = madt(cpus)
    if layout.ACPI_MADT + len(table) > layout.FIRMWARE_TABLES_END:
        raise ValueError(f"MADT of {len(table)} bytes does not fit below {layout.FIRMWARE_TABLES_END:#x}")
    memory.write(layout.ACPI_MADT, table)
    memory.write(layout.ACPI_RSDT, _table(b"RSDT", 1, struct.pack("<I", layout.ACPI_MADT)))
    memory.write(layout.ACPI_RSDP, checksummed(_RSDP.pack(b"RSD PTR ", 0, OEM_ID, 0, layout.ACPI_RSDT), 8))
