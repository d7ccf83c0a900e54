"""Typed VM exits, decoded from the kvm_run page: the one decoder of kvm_run.

Decoding starts the same way on both paths: one precompiled read (`read_head`) gives the exit
reason and, for the common IO exit, its fields. The vCPU loop's hot path stops there for IO, MMIO
(`mmio_fields`) and HLT and handles them without building objects; every other exit, and every
caller of `Vcpu.run()`, goes on through `decode_exit`, which dispatches on the reason through
`_DECODERS` to a typed exit. Offsets come from kvm_abi, the ctypes mirror of linux/kvm.h.

A typed exit also says what it means for the VM (`ending()`: the End status and detail, or None
to carry on) and what the trace records in the event's data field (`event_data`), so the vCPU
loop handles exits it has no special case for generically. Adding an exit reason: its KVM_EXIT_*
constant in kvm_abi, and here a class, a decoder and a row of `_DECODERS`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from . import kvm_abi as abi
from .status import End

# Precompiled readers of kvm_run (field layouts: struct kvm_run's exit union in linux/kvm.h).
EXIT_REASON_OFFSET = abi.run_offset("exit_reason")
IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
IO_OFFSET = abi.run_offset("io")
# exit_reason and the io member in one read: (reason, direction, size, port, count, data_offset);
# the io fields are meaningless unless reason is KVM_EXIT_IO.
HEAD = struct.Struct(f"<I{IO_OFFSET - EXIT_REASON_OFFSET - 4}x" + IO.format.lstrip("<"))
MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
MMIO_OFFSET = abi.run_offset("mmio")
MMIO_DATA_OFFSET = abi.run_offset("mmio", "data")
MMIO_DATA_MAX = 8  # kvm_run.mmio.data is 8 bytes; never trust len beyond it
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

# Where the guest was at an exit. With kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS
# (api.rst, "kvm_valid_regs"; KVM_CAP_SYNC_REGS) the kernel copies regs and sregs into kvm_run.s at
# every return of KVM_RUN, for no ioctl. One read takes rip, cs.base and cs.l (rflags and the
# rest of cs skipped); the guest may change mode at any instruction, so nothing is cached.
SYNC_REGS_MASK = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
VALID_REGS_OFFSET = abi.run_offset("kvm_valid_regs")
RIP_OFFSET = abi.run_offset("s", "regs", "regs", "rip")
_CS_BASE_OFFSET = abi.run_offset("s", "regs", "sregs", "cs", "base")
_CS_L_OFFSET = abi.run_offset("s", "regs", "sregs", "cs", "l")
SYNC_ADDRESS = struct.Struct(f"<Q{_CS_BASE_OFFSET - RIP_OFFSET - 8}xQ{_CS_L_OFFSET - _CS_BASE_OFFSET - 8}xB")
LINEAR_32 = 0xFFFF_FFFF  # outside 64-bit code, CS base + EIP wraps at 4 GiB (SDM Vol. 3A §3.4.4)


def sync_exit_registers(run) -> None:
    """Ask KVM to fill kvm_run.s with regs and sregs at every exit of this vCPU from now on."""
    struct.pack_into("<Q", run, VALID_REGS_OFFSET, SYNC_REGS_MASK)


def linear_rip(run) -> int:
    """The linear address of the instruction the guest is at (after sync_exit_registers).

    CS base + RIP; in 64-bit code (cs.l = 1) the CS base is ignored by the CPU (SDM Vol. 3A §3.4.4),
    so the address is RIP itself. The vCPU loop inlines this.
    """
    rip, cs_base, cs_l = SYNC_ADDRESS.unpack_from(run, RIP_OFFSET)
    return rip if cs_l else (cs_base + rip) & LINEAR_32


def read_head(run) -> tuple[int, int, int, int, int, int]:
    """(reason, io direction, io size, io port, io count, io data_offset) of the exit in `run`."""
    return HEAD.unpack_from(run, EXIT_REASON_OFFSET)


def mmio_fields(run) -> tuple[int, bytes, int, int]:
    """(phys_addr, data, length, is_write) of an MMIO exit; data is all 8 bytes of the field."""
    addr, data, length, is_write = MMIO.unpack_from(run, MMIO_OFFSET)
    return addr, data, min(length, MMIO_DATA_MAX), is_write


def _u64(value: int) -> bytes:
    """An exit's number as the 8 little-endian bytes of the event's data field."""
    return (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")


class _Exit:
    """What every typed exit answers. `ending()` and `event_data` are consulted for the exits the
    hot path leaves to the generic handling (all but IO, MMIO and HLT)."""

    __slots__ = ()
    event_data = b""  # what the trace's data field records for this exit

    def ending(self) -> tuple[End, str] | None:
        """(End status, detail) when this exit ends the VM; None when the vCPU carries on."""
        return None

    def log_text(self) -> str:
        """The exit's line in the per-exit log (vmworker/exit_log.py) when the VM is not --quiet."""
        return type(self).__name__.lower()


@dataclass(frozen=True, slots=True)
class IoOut(_Exit):
    port: int
    size: int
    count: int
    data: bytes  # count * size bytes, as the guest wrote them


@dataclass(frozen=True, slots=True)
class IoIn(_Exit):
    port: int
    size: int
    count: int
    data_offset: int  # where in kvm_run the VMM must put count * size bytes


@dataclass(frozen=True, slots=True)
class MmioRead(_Exit):
    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class MmioWrite(_Exit):
    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Hlt(_Exit):
    """This vCPU stops (the vCPU loop's hot path handles it); the VM ends halted when all have."""


@dataclass(frozen=True, slots=True)
class Shutdown(_Exit):
    """Triple fault (or an explicit shutdown): the CPU cannot continue."""

    def ending(self) -> tuple[End, str] | None:
        return End.SHUTDOWN, "triple fault"

    def log_text(self) -> str:
        return "shutdown"


@dataclass(frozen=True, slots=True)
class FailEntry(_Exit):
    hardware_entry_failure_reason: int
    cpu: int

    def ending(self) -> tuple[End, str] | None:
        return End.FAIL_ENTRY, f"hardware entry failure reason {self.hardware_entry_failure_reason:#x} on cpu {self.cpu}"

    def log_text(self) -> str:
        return "fail entry: " + self.ending()[1]

    @property
    def event_data(self) -> bytes:
        return _u64(self.hardware_entry_failure_reason)


_INTERNAL_SUBERRORS = {
    abi.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    abi.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
    abi.KVM_INTERNAL_ERROR_DELIVERY_EV: "unexpected exit while delivering an event",
    abi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}


@dataclass(frozen=True, slots=True)
class InternalError(_Exit):
    suberror: int
    data: tuple[int, ...]

    def ending(self) -> tuple[End, str] | None:
        what = _INTERNAL_SUBERRORS.get(self.suberror, "unknown suberror")
        words = " ".join(f"{d:#x}" for d in self.data)
        return End.INTERNAL_ERROR, f"suberror {self.suberror} ({what}){', data ' + words if words else ''}"

    def log_text(self) -> str:
        return "internal error: " + self.ending()[1]

    @property
    def event_data(self) -> bytes:
        return _u64(self.suberror)


_SYSTEM_EVENTS = {abi.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", abi.KVM_SYSTEM_EVENT_RESET: "reset",
                  abi.KVM_SYSTEM_EVENT_CRASH: "crash"}


@dataclass(frozen=True, slots=True)
class SystemEvent(_Exit):
    type: int
    data: tuple[int, ...]

    def ending(self) -> tuple[End, str] | None:
        if self.type == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
            return End.POWEROFF, "system event: shutdown"
        return End.SYSTEM_EVENT, _SYSTEM_EVENTS.get(self.type, f"type {self.type}")

    def log_text(self) -> str:
        return "system event: " + _SYSTEM_EVENTS.get(self.type, f"type {self.type}")

    @property
    def event_data(self) -> bytes:
        return _u64(self.type)


@dataclass(frozen=True, slots=True)
class Debug(_Exit):
    exception: int
    pc: int
    dr6: int
    dr7: int

    @property
    def event_data(self) -> bytes:
        return _u64(self.pc)

    def log_text(self) -> str:
        return f"debug exception: {self.exception}, pc: {self.pc:#x}"


@dataclass(frozen=True, slots=True)
class IrqWindowOpen(_Exit):
    """The guest can take an interrupt now: the exit kvm_run.request_interrupt_window asked for
    (api.rst; vmworker/deterministic.py injects its pending vector after it). The vCPU goes on."""

    def log_text(self) -> str:
        return "irq window open"


@dataclass(frozen=True, slots=True)
class Interrupted(_Exit):
    """KVM_RUN returned EINTR: a signal (a kick) or immediate_exit, not a guest action."""


@dataclass(frozen=True, slots=True)
class Unsupported(_Exit):
    code: int
    hardware_exit_reason: int = 0

    def ending(self) -> tuple[End, str] | None:
        return End.UNSUPPORTED_EXIT, f"exit reason {self.code} ({abi.EXIT_REASON_NAMES.get(self.code, 'unknown')})"

    def log_text(self) -> str:
        return "unsupported exit: " + self.ending()[1]

    @property
    def event_data(self) -> bytes:
        return _u64(self.hardware_exit_reason)


VcpuExit = (IoOut | IoIn | MmioRead | MmioWrite | Hlt | Shutdown | FailEntry | InternalError
            | SystemEvent | Debug | IrqWindowOpen | Interrupted | Unsupported)


# Decoders: (kvm_run, the read_head tuple) -> typed exit, one per exit reason.

def _u64s(run, offset: int, count: int) -> tuple[int, ...]:
    count = min(count, 16)  # the header's arrays hold 16; a larger ndata must not read past them
    return struct.unpack_from(f"<{count}Q", run, offset)


def _io(run, head) -> VcpuExit:
    _reason, direction, size, port, count, data_offset = head
    if direction == abi.KVM_EXIT_IO_OUT:
        return IoOut(port, size, count, bytes(run[data_offset:data_offset + size * count]))
    return IoIn(port, size, count, data_offset)


def _mmio(run, head) -> VcpuExit:
    addr, data, length, is_write = mmio_fields(run)
    return MmioWrite(addr, data[:length]) if is_write else MmioRead(addr, length)


def _internal(run, head) -> VcpuExit:
    suberror, ndata = INTERNAL_HEAD.unpack_from(run, INTERNAL_OFFSET)
    return InternalError(suberror, _u64s(run, INTERNAL_OFFSET + INTERNAL_HEAD.size, ndata))


def _system_event(run, head) -> VcpuExit:
    type_, ndata = SYSTEM_EVENT_HEAD.unpack_from(run, SYSTEM_EVENT_OFFSET)
    return SystemEvent(type_, _u64s(run, SYSTEM_EVENT_OFFSET + SYSTEM_EVENT_HEAD.size, ndata))


def _debug(run, head) -> VcpuExit:
    exception, _pad, pc, dr6, dr7 = DEBUG.unpack_from(run, DEBUG_OFFSET)
    return Debug(exception, pc, dr6, dr7)


def _unsupported(run, head) -> VcpuExit:
    reason = head[0]
    (hw_reason,) = HW.unpack_from(run, HW_OFFSET)  # kvm_run.hw: only KVM_EXIT_UNKNOWN fills it
    return Unsupported(reason, hw_reason if reason == abi.KVM_EXIT_UNKNOWN else 0)


_DECODERS: dict[int, Callable[[object, tuple], VcpuExit]] = {
    abi.KVM_EXIT_IO: _io,
    abi.KVM_EXIT_MMIO: _mmio,
    abi.KVM_EXIT_HLT: lambda run, head: Hlt(),
    abi.KVM_EXIT_SHUTDOWN: lambda run, head: Shutdown(),
    abi.KVM_EXIT_FAIL_ENTRY: lambda run, head: FailEntry(*FAIL_ENTRY.unpack_from(run, FAIL_ENTRY_OFFSET)),
    abi.KVM_EXIT_INTERNAL_ERROR: _internal,
    abi.KVM_EXIT_SYSTEM_EVENT: _system_event,
    abi.KVM_EXIT_DEBUG: _debug,
    abi.KVM_EXIT_IRQ_WINDOW_OPEN: lambda run, head: IrqWindowOpen(),
}


def decode_exit(run, interrupted: bool = False) -> VcpuExit:
    """The typed exit now described by the kvm_run page `run` (an mmap or bytes)."""
    if interrupted:
        return Interrupted()
    head = read_head(run)
    return _DECODERS.get(head[0], _unsupported)(run, head)
