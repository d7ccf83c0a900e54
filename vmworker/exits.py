"""Typed VM exits, decoded from the kvm_run page.

`decode_exit` is the readable path (tests, the slow path of the vCPU loop). The hot path of the
vCPU loop reads the same fields with the precompiled `struct.Struct`s below, so the kvm_run
layout is known in exactly one place: here (offsets come from kvm_abi, the ctypes mirror).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import kvm_abi as abi

# Precompiled readers of kvm_run, shared by decode_exit and the vCPU loop.
EXIT_REASON = struct.Struct("<I")
EXIT_REASON_OFFSET = abi.run_offset("exit_reason")
IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
IO_OFFSET = abi.run_offset("io")
# exit_reason and the io member in one read, for the vCPU loop's hot path.
REASON_AND_IO = struct.Struct(f"<I{IO_OFFSET - EXIT_REASON_OFFSET - 4}x" + IO.format.lstrip("<"))
MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
MMIO_OFFSET = abi.run_offset("mmio")
MMIO_DATA_OFFSET = abi.run_offset("mmio", "data")
FAIL_ENTRY = struct.Struct("<QI")
FAIL_ENTRY_OFFSET = abi.run_offset("fail_entry")
HW = struct.Struct("<Q")
HW_OFFSET = abi.run_offset("hw")
INTERNAL_HEAD = struct.Struct("<II")  # suberror, ndata; then ndata u64s (at most 16)
INTERNAL_OFFSET = abi.run_offset("internal")
SYSTEM_EVENT_HEAD = struct.Struct("<II")  # type, ndata; then data[16]
SYSTEM_EVENT_OFFSET = abi.run_offset("system_event")
DEBUG = struct.Struct("<IIQQQ")  # exception, pad, pc, dr6, dr7
DEBUG_OFFSET = abi.run_offset("debug")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class IoOut:
    port: int
    size: int
    count: int
    data: bytes  # count * size bytes, as the guest wrote them


@dataclass(frozen=True, slots=True)
class IoIn:
    port: int
    size: int
    count: int
    data_offset: int  # where in kvm_run the VMM must put count * size bytes


@dataclass(frozen=True, slots=True)
class MmioRead:
    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Hlt:
    pass


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault (or an explicit shutdown): the CPU cannot continue."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SystemEvent:
    type: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Debug:
    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned EINTR: a signal (a kick) or immediate_exit, not a guest action."""


@dataclass(frozen=True, slots=True)
class Unsupported:
    code: int
    hardware_exit_reason: int = 0


VcpuExit = (IoOut | IoIn | MmioRead | MmioWrite | Hlt | Shutdown | FailEntry | InternalError
            | SystemEvent | Debug | Interrupted | Unsupported)


def _u64s(run, offset: int, count: int) -> tuple[int, ...]:
    count = min(count, 16)  # the header's arrays hold 16; a larger ndata must not read past them
    return struct.unpack_from(f"<{count}Q", run, offset)


def decode_exit(run, interrupted: bool = False) -> VcpuExit:
    """The typed exit now described by the kvm_run page `run` (an mmap or bytes)."""
    if interrupted:
        return Interrupted()
    (reason,) = EXIT_REASON.unpack_from(run, EXIT_REASON_OFFSET)
    if reason == abi.KVM_EXIT_IO:
        direction, size, port, count, data_offset = IO.unpack_from(run, IO_OFFSET)
        if direction == abi.KVM_EXIT_IO_OUT:
            return IoOut(port, size, count, bytes(run[data_offset:data_offset + size * count]))
        return IoIn(port, size, count, data_offset)
    if reason == abi.KVM_EXIT_MMIO:
        addr, data, length, is_write = MMIO.unpack_from(run, MMIO_OFFSET)
        length = min(length, 8)
        return MmioWrite(addr, data[:length]) if is_write else MmioRead(addr, length)
    if reason == abi.KVM_EXIT_HLT:
        return Hlt()
    if reason == abi.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(*FAIL_ENTRY.unpack_from(run, FAIL_ENTRY_OFFSET))
    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = INTERNAL_HEAD.unpack_from(run, INTERNAL_OFFSET)
        return InternalError(suberror, _u64s(run, INTERNAL_OFFSET + INTERNAL_HEAD.size, ndata))
    if reason == abi.KVM_EXIT_SYSTEM_EVENT:
        type_, ndata = SYSTEM_EVENT_HEAD.unpack_from(run, SYSTEM_EVENT_OFFSET)
        return SystemEvent(type_, _u64s(run, SYSTEM_EVENT_OFFSET + SYSTEM_EVENT_HEAD.size, ndata))
    if reason == abi.KVM_EXIT_DEBUG:
        exception, _pad, pc, dr6, dr7 = DEBUG.unpack_from(run, DEBUG_OFFSET)
        return Debug(exception, pc, dr6, dr7)
    (hw_reason,) = HW.unpack_from(run, HW_OFFSET)
    return Unsupported(reason, hw_reason if reason == abi.KVM_EXIT_UNKNOWN else 0)
