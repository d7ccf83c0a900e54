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


# --- The address in recorded traces -----------------------------------------------------------------
from tracetool import schema  # noqa: E402
from tracetool.symbols import symbols_for_vm  # noqa: E402
from tracetool.trace import TraceReader  # noqa: E402

needs_binutils = pytest.mark.skipif(any(shutil.which(t) is None for t in ("as", "ld", "objcopy", "objdump")),
                                    reason="needs GNU binutils (as, ld, objcopy, objdump)")


def record(vmsup, tmp_path, *args: str):
    trace = tmp_path / "t.vmtrace"
    proc = vmsup("launch", *args, "-q", "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    with TraceReader(trace) as r:
        exits = r.exits()
        vm_start, = r.records(schema.MSG_VM_START)
    return exits, vm_start


@needs_binutils
def test_seed16_out_exits_carry_the_linear_address_from_its_listing(vmsup, tmp_path):
    start, end = out_instruction_span("seed16.elf")
    exits, vm_start = record(vmsup, tmp_path, "seed16", "--max-exits", "500")
    assert set(exits["reason"].tolist()) == {schema.REASON_IO}
    rips = set(exits["rip"].tolist())
    assert len(rips) == 1 and rips <= {LOAD + start, LOAD + end}
    symbols = symbols_for_vm(vm_start)
    assert symbols.warnings == []
    loc = symbols.table.resolve(rips.pop())
    assert loc.symbol == "loop1" and loc.file == "seed16.S"


# A real-mode guest that moves CS (same code, another segment base), then enters protected mode
# with a flat CS, then with a CS based at 0x10000. Each `out` (and the final hlt) must come back
# with the linear address of its label, whatever CS and mode it ran in.
MODE_SWITCH_S = r"""
	.code16
	.globl _start
_start:
	out %al, $0x10
real_out_end:
	ljmp $0x0fff, $(cs0fff + 0x10)     # CS base 0xfff0: the same linear code, IP 0x10 higher
cs0fff:
	out %al, $0x10
cs0fff_out_end:
	cli
	lgdtl gdt_desc
	mov %cr0, %eax
	or $1, %eax                        # CR0.PE
	mov %eax, %cr0
	ljmpl $0x08, $(0x10000 + pm_flat)
	.code32
pm_flat:
	out %al, $0x10
pm_flat_out_end:
	ljmp $0x18, $pm_based               # CS base 0x10000: EIP is the offset linked here
pm_based:
	out %al, $0x10
pm_based_out_end:
	hlt
hlt_end:
	.p2align 3
gdt:                                    # SDM Vol. 3A §3.4.5 descriptors
	.quad 0
	.quad 0x00CF9A000000FFFF            # 0x08: code, base 0, 4 GiB, 32-bit
	.quad 0x00CF92000000FFFF            # 0x10: data, base 0
	.quad 0x00CF9A010000FFFF            # 0x18: code, base 0x10000
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long 0x10000 + gdt
"""


def build_flat_guest(tmp_path, name: str, source: str):
    """Assemble and link like guest/Makefile does for real-mode guests: NAME.elf beside NAME.bin."""
    (tmp_path / f"{name}.S").write_text(source)
    obj, elf, image = tmp_path / f"{name}.o", tmp_path / f"{name}.elf", tmp_path / f"{name}.bin"
    subprocess.run(["as", "--32", "-g", "-o", str(obj), str(tmp_path / f"{name}.S")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0", "--build-id=none", "-z", "noexecstack", "-e", "_start",
                    "-n", "-z", "noseparate-code", "-o", str(elf), str(obj)], check=True)
    subprocess.run(["objcopy", "-O", "binary", str(elf), str(image)], check=True)
    return image, elf


@needs_binutils
def test_addresses_stay_right_when_the_guest_changes_cs_and_mode(vmsup, tmp_path):
    image, elf = build_flat_guest(tmp_path, "modeswitch", MODE_SWITCH_S)
    nm = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    label = {name: int(addr, 16) for addr, _, name in (line.split() for line in nm.splitlines())}
    exits, vm_start = record(vmsup, tmp_path, str(image), "--mode", "real", "--timeout", "20")
    assert exits["reason"].tolist() == [schema.REASON_IO] * 4 + [schema.REASON_HLT]
    # Port I/O and hlt exits report RIP past the instruction, here as in seed16.
    ends = ["real_out_end", "cs0fff_out_end", "pm_flat_out_end", "pm_based_out_end", "hlt_end"]
    assert exits["rip"].tolist() == [LOAD + label[name] for name in ends]
    symbols = symbols_for_vm(vm_start)  # modeswitch.elf beside the image, its offsets based at CS 0x1000
    assert [symbols.table.resolve(rip).symbol for rip in exits["rip"].tolist()] == ends
    assert all(symbols.table.resolve(rip).file.endswith("modeswitch.S") for rip in exits["rip"].tolist()[:4])


def test_mbkernel_exits_resolve_to_its_c_functions_and_lines(vmsup, tmp_path):
    exits, vm_start = record(vmsup, tmp_path, "mbkernel", "--cmdline", "maxticks=5", "--timeout", "60")
    table = symbols_for_vm(vm_start).table
    rips = exits["rip"][exits["reason"] != schema.REASON_INTR]
    ids = table.symbol_ids(rips)
    assert (ids >= 0).all(), [hex(r) for r in rips[ids < 0][:5].tolist()]
    functions = {table.symbol_name(i) for i in set(ids.tolist())}
    c_source = (GUEST / "mbkernel.c").read_text()
    in_c = {f for f in functions if re.search(rf"\b{re.escape(f)}\s*\(", c_source)}
    assert {"kmain", "print"} <= in_c, functions
    io = rips[exits["reason"][exits["reason"] != schema.REASON_INTR] == schema.REASON_IO]
    files = {table.resolve(r).file for r in set(io.tolist())}
    assert "mbkernel.c" in files and files <= {"mbkernel.c", "mbkernel_entry.S"}
