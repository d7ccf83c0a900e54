"""The library layer in-process, on the real /dev/kvm: Kvm → Vm → Vcpu, typed exits from hand-built
VMs, guest memory bounds, and image/mode detection by the loader.

Guest code is assembled by hand; each byte string carries its AT&T source in a comment.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import struct
import threading
from contextlib import contextmanager

import pytest

from conftest import GUEST_DIR
from vmworker import kvm_abi as abi
from vmworker import layout, x86
from vmworker.errors import GuestImageError, GuestMemoryError, KvmError, SpecError
from vmworker.exits import Hlt, Interrupted, IoIn, IoOut, MmioRead, MmioWrite
from vmworker.kvm import Kvm
from vmworker.loader import load_image
from vmworker.memory import GuestMemory, validate_mem_size

kvm = pytest.mark.kvm
LOAD = layout.DEFAULT_LOAD_ADDR  # 0x10000
MEM = 1 << 20
MMIO_DATA = abi.run_offset("mmio", "data")


@contextmanager
def one_vcpu_vm(code: bytes, mode: str = "real"):
    """A 1 MiB VM with `code` at 0x10000 and one vCPU set up by vmworker.x86 to enter it."""
    with Kvm() as k, k.create_vm() as vm:
        memory = GuestMemory.with_ram(MEM)
        try:
            vm.set_tss_addr(layout.TSS_ADDR)
            memory.register(vm)
            memory.write(LOAD, code)
            x86.write_boot_tables(memory, mode)
            vcpu = vm.create_vcpu(0)
            vcpu.set_sregs(x86.initial_sregs(vcpu.get_sregs(), mode, LOAD))
            vcpu.set_regs(x86.initial_regs(mode, LOAD, LOAD, 0, MEM))
            yield vcpu, memory
        finally:
            vm.close()  # the VM goes before the RAM it maps
            memory.close()


# --- Kvm, Vm, Vcpu: the fds ---------------------------------------------------------------------

@kvm
def test_kvm_reports_api_version_12_and_the_capabilities_vmsup_needs():
    with Kvm() as k:
        assert fcntl.ioctl(k.fd, abi.KVM_GET_API_VERSION) == 12 == abi.KVM_API_VERSION
        max_vcpus = k.check_extension(abi.KVM_CAP_MAX_VCPUS)
        assert max_vcpus > 0
        assert k.max_vcpus() == max_vcpus
        for cap in (abi.KVM_CAP_IMMEDIATE_EXIT, abi.KVM_CAP_USER_MEMORY, abi.KVM_CAP_SET_TSS_ADDR):
            assert k.check_extension(cap) > 0, cap
        assert k.check_extension(0x7FFF_0000) == 0  # an unknown capability is absent, not an error
        assert k.vcpu_mmap_size >= 4096  # at least the kvm_run page


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError) as raised:
        os.fstat(fd)
    assert raised.value.errno == errno.EBADF


@kvm
def test_context_managers_close_the_kvm_vm_and_vcpu_fds_on_exit():
    with Kvm() as k, k.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        fds = {"kvm": k.fd, "vm": vm.fd, "vcpu": vcpu.fd}
        for fd in fds.values():
            os.fstat(fd)  # open while inside
        run_page = vcpu.run_page
    for fd in fds.values():
        assert_closed(fd)
    assert run_page.closed
    assert (k.fd, vm.fd, vcpu.fd) == (-1, -1, -1)
    k.close()
    vm.close()
    vcpu.close()  # closing twice is harmless


@kvm
def test_closing_a_vm_closes_its_vcpus_but_not_kvm():
    with Kvm() as k:
        vm = k.create_vm()
        vcpus = [vm.create_vcpu(i) for i in range(2)]
        fds = [v.fd for v in vcpus] + [vm.fd]
        vm.close()
        for fd in fds:
            assert_closed(fd)
        os.fstat(k.fd)


# --- Vcpu.run: typed exits -------------------------------------------------------------------------

@kvm
def test_port_io_and_hlt_come_back_as_typed_exits():
    code = bytes.fromhex("b042"  # mov $0x42,%al
                         "e610"  # out %al,$0x10
                         "e411"  # in $0x11,%al
                         "f4")  # hlt
    with one_vcpu_vm(code) as (vcpu, _):
        assert vcpu.run() == IoOut(port=16, size=1, count=1, data=b"B")
        exit_ = vcpu.run()
        assert isinstance(exit_, IoIn)
        assert (exit_.port, exit_.size, exit_.count) == (17, 1, 1)
        vcpu.run_page[exit_.data_offset] = 0x77  # the VMM's answer to the IN
        assert vcpu.run() == Hlt()
        assert vcpu.get_regs().rax & 0xFF == 0x77


@kvm
def test_rep_insb_arrives_as_one_exit_with_the_whole_count():
    code = bytes.fromhex("bae900"  # mov $0xe9,%dx
                         "b90800"  # mov $8,%cx
                         "bf0001"  # mov $0x100,%di   (ES base 0x10000: gpa 0x10100)
                         "f36c"  # rep insb (%dx),%es:(%di)
                         "f4")  # hlt
    with one_vcpu_vm(code) as (vcpu, memory):
        exit_ = vcpu.run()
        # Measured on this host: KVM reads `rep ins` ahead, so all 8 elements come in one exit.
        assert isinstance(exit_, IoIn)
        assert (exit_.port, exit_.size, exit_.count) == (0xE9, 1, 8)
        vcpu.run_page[exit_.data_offset:exit_.data_offset + 8] = b"12345678"
        assert vcpu.run() == Hlt()
        assert memory.read(LOAD + 0x100, 8) == b"12345678"
        regs = vcpu.get_regs()
        assert (regs.rcx & 0xFFFF, regs.rdi & 0xFFFF) == (0, 0x108)


@kvm
def test_rep_outsb_arrives_one_element_per_exit():
    code = bytes.fromhex("bae900"  # mov $0xe9,%dx
                         "b90800"  # mov $8,%cx
                         "be0001"  # mov $0x100,%si   (DS base 0x10000: gpa 0x10100)
                         "f36e"  # rep outsb %ds:(%si),(%dx)
                         "f4")  # hlt
    with one_vcpu_vm(code) as (vcpu, memory):
        memory.write(LOAD + 0x100, b"ABCDEFGH")
        exits = [vcpu.run() for _ in range(9)]
    # Measured on this host (and documented in guest/README.md): KVM emulates `rep outs` one
    # element per exit, count 1 each; nothing is batched on the way out.
    assert exits == [IoOut(port=0xE9, size=1, count=1, data=bytes([c])) for c in b"ABCDEFGH"] + [Hlt()]


@kvm
def test_mmio_outside_ram_comes_back_as_typed_read_and_write():
    code = bytes.fromhex("a1000000d0"  # mov 0xd0000000,%eax
                         "a3040000d0"  # mov %eax,0xd0000004
                         "f4")  # hlt
    with one_vcpu_vm(code, mode="protected") as (vcpu, _):
        assert vcpu.run() == MmioRead(addr=0xD000_0000, length=4)
        vcpu.run_page[MMIO_DATA:MMIO_DATA + 4] = b"\x11\x22\x33\x44"  # the VMM's answer to the read
        assert vcpu.run() == MmioWrite(addr=0xD000_0004, data=b"\x11\x22\x33\x44")
        assert vcpu.run() == Hlt()
        assert vcpu.get_regs().rax == 0x44332211


@kvm
def test_immediate_exit_returns_interrupted_without_running_the_guest():
    with one_vcpu_vm(b"\xf4") as (vcpu, _):  # hlt
        vcpu.set_immediate_exit(True)
        assert vcpu.run() == Interrupted()
        assert vcpu.get_regs().rip == 0  # the guest did not execute its hlt
        vcpu.set_immediate_exit(False)
        assert vcpu.run() == Hlt()


@kvm
def test_signal_with_immediate_exit_kicks_a_spinning_vcpu_out_of_kvm_run():
    code = bytes.fromhex("e610"  # out %al,$0x10
                         "ebfe")  # jmp .  (never exits again on its own)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # a handler, so KVM_RUN sees EINTR
    try:
        with one_vcpu_vm(code) as (vcpu, _):
            results = []
            spinning = threading.Event()

            def vcpu_thread():
                results.append(vcpu.run())
                spinning.set()
                results.append(vcpu.run())

            thread = threading.Thread(target=vcpu_thread, daemon=True)
            thread.start()
            assert spinning.wait(30)
            # The kick of machine.py: immediate_exit covers a signal that lands before KVM_RUN.
            vcpu.set_immediate_exit(True)
            signal.pthread_kill(thread.ident, signal.SIGUSR1)
            thread.join(30)
            assert not thread.is_alive()
            assert results == [IoOut(port=16, size=1, count=1, data=b"\0"), Interrupted()]
            assert vcpu.get_regs().rip == 2  # parked on the jmp
    finally:
        signal.signal(signal.SIGUSR1, previous)


@kvm
def test_set_tss_addr_passes_addresses_above_int_max_unchanged():
    with Kvm() as k:
        with k.create_vm() as vm:
            vm.set_tss_addr(layout.TSS_ADDR)  # 0xfffbd000 does not fit a C int
        with k.create_vm() as vm:
            # x86.c kvm_vm_ioctl_set_tss_addr refuses addr > 4 GiB - 3 pages with EINVAL. Truncated
            # to 32 bits this would be 0x1000 and accepted, so EINVAL proves all 64 bits arrived.
            with pytest.raises(KvmError) as raised:
                vm.set_tss_addr(0x1_0000_1000)
            assert raised.value.errno == errno.EINVAL
            assert "KVM_SET_TSS_ADDR" in str(raised.value)


# --- GuestMemory ---------------------------------------------------------------------------------

@pytest.fixture
def ram():
    memory = GuestMemory.with_ram(MEM)
    yield memory
    memory.close()


def test_guest_memory_reads_back_what_was_written_up_to_the_last_byte(ram):
    ram.write(0x1234, b"vmsup")
    assert ram.read(0x1234, 5) == b"vmsup"
    ram.write(MEM - 4, b"\xde\xad\xbe\xef")
    assert ram.read(MEM - 4, 4) == b"\xde\xad\xbe\xef"
    ram.fill(MEM - 4, 4)
    assert ram.read(MEM - 4, 4) == bytes(4)
    assert ram.contains(0, MEM) and not ram.contains(0, MEM + 1)


@pytest.mark.parametrize("gpa, length", [(MEM - 2, 4), (MEM, 1), (0x4000_0000, 8), (-1, 1)])
def test_guest_memory_access_outside_ram_names_the_gpa_and_length(ram, gpa, length):
    for access in (lambda: ram.read(gpa, length), lambda: ram.write(gpa, b"x" * length)):
        with pytest.raises(GuestMemoryError) as raised:
            access()
        assert f"gpa={gpa:#x}" in str(raised.value)
        assert f"length={length}" in str(raised.value)


def test_guest_memory_rejects_overlapping_and_unaligned_regions(ram):
    with pytest.raises(GuestMemoryError, match="overlaps"):
        ram.add_region(0x80000, 0x1000)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        ram.add_region(MEM - 0x1000, 0x2000)
    with pytest.raises(GuestMemoryError, match="not page-aligned"):
        ram.add_region(MEM + 0x10, 0x1000)
    ram.add_region(MEM, 0x1000)  # adjacent is fine
    ram.write(MEM, b"second")
    assert ram.read(MEM, 6) == b"second"
    with pytest.raises(GuestMemoryError):
        ram.read(MEM - 1, 2)  # but one access may not straddle two regions (two host mappings)
    assert ram.size == MEM + 0x1000


@pytest.mark.parametrize("size", [1 << 20, 16 << 20, 512000000, layout.MEM_CAP])
def test_validate_mem_size_accepts_page_aligned_sizes_from_1_mib_to_the_cap(size):
    assert validate_mem_size(size) == size


@pytest.mark.parametrize("size, message", [
    (0, "greater than 0"), (-4096, "greater than 0"), (12345, "page size"),
    ((1 << 20) - 4096, "below the minimum"), (layout.MEM_CAP + 4096, "above the cap"), (4 << 30, "above the cap"),
])
def test_validate_mem_size_rejects_with_a_reason(size, message):
    with pytest.raises(SpecError, match=message):
        validate_mem_size(size)


# --- loader: format, mode and entry detection ------------------------------------------------------

def e_entry(path, bits: int) -> int:
    data = path.read_bytes()
    return struct.unpack_from("<I" if bits == 32 else "<Q", data, 24)[0]  # e_entry follows e_version


@pytest.mark.parametrize("name, mode", [("hello.bin", None), ("seed16.bin", "real"),
                                        ("protected32.bin", "protected"), ("long64.bin", "long")])
def test_flat_binary_loads_at_0x10000_in_the_mode_given(name, mode):
    path = GUEST_DIR / name
    image = load_image(str(path), mode=mode)
    assert (image.format, image.mode, image.entry) == ("flat", mode or "real", LOAD)
    assert len(image.segments) == 1
    assert image.segments[0].gpa == LOAD
    assert image.segments[0].data == path.read_bytes()
    assert image.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_flat_binary_entry_follows_the_load_address():
    image = load_image(str(GUEST_DIR / "protected32.bin"), mode="protected", load_addr=0x20000)
    assert (image.entry, image.segments[0].gpa) == (0x20000, 0x20000)
    image = load_image(str(GUEST_DIR / "protected32.bin"), mode="protected", load_addr=0x20000, entry=0x20004)
    assert image.entry == 0x20004


@pytest.mark.parametrize("name, bits, fmt, mode", [("elfhello32.elf", 32, "elf32", "protected"),
                                                    ("elfhello64.elf", 64, "elf64", "long")])
def test_elf_format_decides_the_mode_and_entry(name, bits, fmt, mode):
    path = GUEST_DIR / name
    image = load_image(str(path))
    assert (image.format, image.mode) == (fmt, mode)
    assert image.entry == e_entry(path, bits)
    assert any(s.gpa <= image.entry < s.gpa + s.memsz for s in image.segments)
    assert load_image(str(path), mode=mode).mode == mode  # naming its own mode is allowed
    with pytest.raises(GuestImageError, match="runs in"):
        load_image(str(path), mode="real")


def _runtime_imports(module: str) -> set[str]:
    """The sibling vmworker modules `module` imports when it runs (TYPE_CHECKING blocks aside)."""
    import ast
    from pathlib import Path

    import vmworker

    tree = ast.parse((Path(vmworker.__file__).parent / f"{module}.py").read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in type_only:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
    return found


def test_image_loading_modules_import_one_way():
    """loader → multiboot → elf → image and loader → flat → image; never back up the chain."""
    chain = ("image", "elf", "flat", "multiboot", "loader")
    allowed = {"image": set(), "elf": {"image"}, "flat": {"image"}, "multiboot": {"image", "elf"},
               "loader": {"image", "elf", "flat", "multiboot"}}
    for module in chain:
        assert _runtime_imports(module) & set(chain) == allowed[module], module
