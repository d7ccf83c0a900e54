"""Where each exit came from: the guest's linear instruction address (CS base + RIP) at an exit.

Real KVM: with kvm_run.kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS the kernel fills
kvm_run.s.regs at every exit; the address is checked against the guest's own listing (objdump).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from tests.conftest import REPO
from vmworker import kvm_abi as abi
from vmworker import layout, x86
from vmworker.exits import IoOut
from vmworker.kvm import Kvm
from vmworker.memory import GuestMemory

pytestmark = pytest.mark.kvm

GUEST = REPO / "guest"
LOAD = layout.DEFAULT_LOAD_ADDR


def out_instruction_span(elf: str) -> tuple[int, int]:
    """(offset of seed16's `out %ax,$0x10`, offset just past it) in its code segment, from objdump."""
    listing = subprocess.run(["objdump", "-d", "-m", "i8086", str(GUEST / elf)],
                             capture_output=True, text=True, check=True).stdout
    at = int(re.search(r"^\s*([0-9a-f]+):\s+e7 10\s+out", listing, re.M).group(1), 16)
    return at, at + 2  # e7 10: two bytes


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump for the guest's listing")
def test_synced_registers_give_seed16_out_exits_their_linear_address():
    rip_at = abi.run_offset("s", "regs", "regs", "rip")
    cs_base_at = abi.run_offset("s", "regs", "sregs", "cs", "base")
    start, end = out_instruction_span("seed16.elf")
    with Kvm() as kvm, kvm.create_vm() as vm:
        memory = GuestMemory.with_ram(layout.MEM_MIN)
        try:
            vm.set_tss_addr(layout.TSS_ADDR)
            memory.register(vm)
            memory.write(LOAD, (GUEST / "seed16.bin").read_bytes())
            vcpu = vm.create_vcpu(0)
            vcpu.set_sregs(x86.initial_sregs(vcpu.get_sregs(), "real", LOAD))
            vcpu.set_regs(x86.initial_regs("real", LOAD, LOAD, 0, layout.MEM_MIN))
            struct.pack_into("<Q", vcpu.run_page, abi.run_offset("kvm_valid_regs"),
                             abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS)
            addresses = set()
            for _ in range(20):
                assert isinstance(vcpu.run(), IoOut)
                rip, = struct.unpack_from("<Q", vcpu.run_page, rip_at)
                cs_base, = struct.unpack_from("<Q", vcpu.run_page, cs_base_at)
                assert cs_base == LOAD  # real mode: CS = 0x1000
                addresses.add(cs_base + rip)
        finally:
            vm.close()
            memory.close()
    # The kernel reports the out itself or the instruction after it; the same one every time.
    assert len(addresses) == 1 and addresses <= {LOAD + start, LOAD + end}
