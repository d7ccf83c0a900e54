"""Several CPUs for real kernels: the MP table and the ACPI MADT describe `--vcpus` CPUs, and a kernel
starts its APs with INIT/SIPI through the in-kernel LAPIC.

Library tests parse the tables as a kernel would (signatures, checksums, pointers, entries); the
KVM tests run the bundled mpstart kernel, which counts the CPUs in both tables and starts every AP.
"""

from __future__ import annotations

import re
import struct

import pytest

from vmworker import acpi, layout, mptable
from vmworker.memory import GuestMemory


def tables(cpus: int) -> dict:
    memory = GuestMemory.with_ram(16 << 20)
    try:
        mptable.write_mp_table(memory, cpus, 0x000806F8, 0x0781ABFD)
        acpi.write_acpi_tables(memory, cpus)
        floating = memory.read(layout.MP_FLOATING_POINTER, 16)
        config_at = struct.unpack_from("<I", floating, 4)[0]
        length = struct.unpack_from("<H", memory.read(config_at, 6), 4)[0]
        config = memory.read(config_at, length)
        rsdp = memory.read(layout.ACPI_RSDP, 20)
        rsdt_at = struct.unpack_from("<I", rsdp, 16)[0]
        rsdt = memory.read(rsdt_at, struct.unpack_from("<I", memory.read(rsdt_at, 8), 4)[0])
        madt_at = struct.unpack_from("<I", rsdt, 36)[0]
        madt = memory.read(madt_at, struct.unpack_from("<I", memory.read(madt_at, 8), 4)[0])
        return {"floating": floating, "config": config, "rsdp": rsdp, "rsdt": rsdt, "madt": madt}
    finally:
        memory.close()


@pytest.mark.parametrize("cpus", [1, 4, 64])
def test_mp_table_lists_every_vcpu_and_the_io_apic_with_good_checksums(cpus):
    t = tables(cpus)
    assert t["floating"][:4] == b"_MP_" and sum(t["floating"]) % 256 == 0 and t["floating"][9] == 4
    config = t["config"]
    assert config[:4] == b"PCMP" and sum(config) % 256 == 0
    count, lapic = struct.unpack_from("<HI", config, 34)
    assert lapic == layout.LAPIC_BASE
    at, processors, ioapics, irqs = 44, [], [], []
    for _ in range(count):
        kind = config[at]
        if kind == 0:
            _, apic_id, _, flags, signature, _ = struct.unpack_from("<BBBBII", config, at)
            processors.append((apic_id, flags))
            assert signature == 0x000806F8
            at += 20
        else:
            if kind == 2:
                ioapics.append(struct.unpack_from("<BBBBI", config, at)[1:])
            elif kind == 3:
                irqs.append(config[at + 5])  # source bus IRQ
            at += 8
    assert at == len(config)
    assert processors == [(0, 3)] + [(i, 1) for i in range(1, cpus)]  # enabled; the BSP flagged
    assert ioapics == [(cpus, mptable.IOAPIC_VERSION, 1, layout.IOAPIC_BASE)]
    assert irqs == [i for i in range(16) if i != 2]


@pytest.mark.parametrize("cpus", [1, 4, 64])
def test_rsdp_leads_through_the_rsdt_to_a_madt_with_every_local_apic(cpus):
    t = tables(cpus)
    assert t["rsdp"][:8] == b"RSD PTR " and sum(t["rsdp"]) % 256 == 0 and layout.ACPI_RSDP % 16 == 0
    assert t["rsdt"][:4] == b"RSDT" and sum(t["rsdt"]) % 256 == 0
    madt = t["madt"]
    assert madt[:4] == b"APIC" and sum(madt) % 256 == 0
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_BASE, acpi.MADT_PCAT_COMPAT)
    at, lapics, ioapics = 44, [], []
    while at < len(madt):
        kind, length = madt[at], madt[at + 1]
        if kind == 0:
            lapics.append(struct.unpack_from("<BBI", madt, at + 2))  # UID, APIC ID, flags
        elif kind == 1:
            ioapics.append(struct.unpack_from("<BxII", madt, at + 2))
        at += length
    assert at == len(madt)
    assert lapics == [(i, i, 1) for i in range(cpus)]
    assert ioapics == [(cpus, layout.IOAPIC_BASE, 0)]


def test_tables_fit_below_1_mib_for_the_most_cpus_they_describe():
    t = tables(1024)  # capped at the 8-bit APIC IDs
    assert len(t["config"]) < layout.ACPI_RSDP - layout.MP_CONFIG_TABLE
    assert struct.unpack_from("<H", t["config"], 34)[0] == mptable.MAX_CPUS + 1 + 1 + 15 + 2


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_mpstart_finds_its_cpus_and_starts_every_ap_with_init_sipi(vmsup, vcpus):
    proc = vmsup("launch", "mpstart", "--quiet", "--no-trace", "--vcpus", str(vcpus))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith(f"mp: {vcpus:02x} cpus\nmadt: {vcpus:02x} cpus\n"), out
    assert sorted(re.findall(r"^ap (\w\w) up$", out, re.M)) == [f"{i:02x}" for i in range(1, vcpus)]
    assert out.endswith(f"bsp: {vcpus - 1:02x} aps up\n")
