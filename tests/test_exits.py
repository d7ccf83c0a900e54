"""The one kvm_run decoder (vmworker/exits.py), driven with kvm_run pages filled through the ctypes
mirror of linux/kvm.h: what Vcpu.run() returns, what the hot path reads, and how each exit the
vCPU loop handles generically ends the VM."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vmworker import exits as ex
from vmworker import kvm_abi as abi
from vmworker.status import End

PAGE = 4096


def run_page(reason: int, **members) -> bytearray:
    """A kvm_run page with `exit_reason` set and each given union member's fields filled."""
    page = bytearray(PAGE)
    run = abi.kvm_run.from_buffer(page)
    run.exit_reason = reason
    for member, fields in members.items():
        target = getattr(run, member)
        for name, value in fields.items():
            if isinstance(value, (bytes, tuple)):
                array = getattr(target, name)
                for i, v in enumerate(value):
                    array[i] = v
            else:
                setattr(target, name, value)
    del run  # release the buffer export before the page is used as bytes
    return page


def test_io_out_is_read_the_same_by_the_hot_path_and_decode_exit():
    data_offset = PAGE - 8
    page = run_page(abi.KVM_EXIT_IO, io=dict(direction=abi.KVM_EXIT_IO_OUT, size=2, port=0x10, count=1,
                                                data_offset=data_offset))
    page[data_offset:data_offset + 2] = b"\x34\x12"
    assert ex.read_head(page) == (abi.KVM_EXIT_IO, abi.KVM_EXIT_IO_OUT, 2, 0x10, 1, data_offset)
    assert ex.decode_exit(page) == ex.IoOut(port=0x10, size=2, count=1, data=b"\x34\x12")


def test_mmio_length_is_clamped_to_the_eight_data_bytes_on_both_paths():
    page = run_page(abi.KVM_EXIT_MMIO, mmio=dict(phys_addr=0xD000_0000, data=bytes(range(1, 9)), len=4096,
                                                 is_write=1))
    addr, data, length, is_write = ex.mmio_fields(page)
    assert (addr, length, is_write) == (0xD000_0000, 8, 1)
    assert ex.decode_exit(page) == ex.MmioWrite(0xD000_0000, bytes(range(1, 9)))


@pytest.mark.parametrize("page, end, detail, data", [
    (run_page(abi.KVM_EXIT_SHUTDOWN), End.SHUTDOWN, "triple fault", b""),
    (run_page(abi.KVM_EXIT_FAIL_ENTRY, fail_entry=dict(hardware_entry_failure_reason=0x21, cpu=1)),
     End.FAIL_ENTRY, "hardware entry failure reason 0x21 on cpu 1", (0x21).to_bytes(8, "little")),
    (run_page(abi.KVM_EXIT_INTERNAL_ERROR, internal=dict(suberror=1, ndata=2, data=(0xAB, 0xCD))),
     End.INTERNAL_ERROR, "suberror 1 (emulation failure), data 0xab 0xcd", (1).to_bytes(8, "little")),
    (run_page(abi.KVM_EXIT_SYSTEM_EVENT, system_event=dict(type=abi.KVM_SYSTEM_EVENT_SHUTDOWN, ndata=0)),
     End.POWEROFF, "system event: shutdown", (1).to_bytes(8, "little")),
    (run_page(abi.KVM_EXIT_SYSTEM_EVENT, system_event=dict(type=abi.KVM_SYSTEM_EVENT_CRASH, ndata=0)),
     End.SYSTEM_EVENT, "crash", (3).to_bytes(8, "little")),
    (run_page(abi.KVM_EXIT_UNKNOWN, hw=dict(hardware_exit_reason=0x30)),
     End.UNSUPPORTED_EXIT, "exit reason 0 (unknown)", (0x30).to_bytes(8, "little")),
    (run_page(abi.KVM_EXIT_X86_RDMSR), End.UNSUPPORTED_EXIT, "exit reason 29 (x86_rdmsr)", bytes(8)),
], ids=["shutdown", "fail-entry", "internal-error", "poweroff", "system-event", "unknown", "rdmsr"])
def test_a_rare_exit_says_how_it_ends_the_vm_and_what_the_trace_records(page, end, detail, data):
    exit_ = ex.decode_exit(page)
    assert exit_.ending() == (end, detail)
    assert exit_.event_data == data


def test_exits_that_do_not_end_the_vm_say_so():
    debug = ex.decode_exit(run_page(abi.KVM_EXIT_DEBUG, debug=dict()))
    assert isinstance(debug, ex.Debug) and debug.ending() is None
    assert ex.decode_exit(run_page(abi.KVM_EXIT_HLT)).ending() is None
    assert ex.decode_exit(bytes(PAGE), interrupted=True) == ex.Interrupted()


def test_internal_error_data_never_reads_past_the_sixteen_words():
    exit_ = ex.decode_exit(run_page(abi.KVM_EXIT_INTERNAL_ERROR, internal=dict(suberror=1, ndata=1000)))
    assert len(exit_.data) == 16


def test_the_vcpu_loop_reads_kvm_run_only_through_exits():
    """No struct formats or kvm_run offsets of its own in the loop: the decoder is exits.py."""
    tree = ast.parse((Path(ex.__file__).parent / "vcpu_loop.py").read_text())
    calls = {node.func.attr for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not calls & {"Struct", "unpack_from", "unpack", "run_offset"}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "struct" not in imported
