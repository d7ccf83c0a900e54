"""What interrupts a rerun's loop (vmworker/rerun_loop.py): a divergence from the recording (and
the text of the exit that made it), gdb asking to run backwards, the VM ending, and the watchdog
that kicks a guest making no exit where the trace has one."""

from __future__ import annotations

import signal
import threading
import time

from tracetool import schema

from . import exits as ex
from . import kvm_abi as abi
from .signals import KICK_SIGNAL


class Divergence(Exception):
    def __init__(self, seq: int, field: str, recorded, now, recorded_exit: str, now_exit: str) -> None:
        super().__init__(field)
        self.seq, self.field, self.recorded, self.now = seq, field, recorded, now
        self.recorded_exit, self.now_exit = recorded_exit, now_exit

    def line(self) -> str:
        return (f"the rerun diverged at seq {self.seq}: {self.field} recorded {as_hex(self.recorded)}, "
                f"now {as_hex(self.now)} (recorded {self.recorded_exit}; now {self.now_exit})")


class TravelRequest(Exception):
    """gdb asked to run backwards (`bs` or `bc`): raised out of the loop to the time travel."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class VmEnded(Exception):
    """The machine is stopping (gdb killed it) while the loop waited."""


def as_hex(value) -> str:
    return f"{value:#x}" if isinstance(value, int) else str(value)


class Watchdog(threading.Thread):
    """Kicks the vCPU out of KVM_RUN when the guest makes no exit where the trace has one."""

    def __init__(self, vcpu, target: int) -> None:
        super().__init__(name="rerun-watchdog", daemon=True)
        self.vcpu, self.target = vcpu, target
        self.deadline_ns = 0  # 0: not inside KVM_RUN
        self.fired = False
        self._quit = threading.Event()

    def run(self) -> None:
        while not self._quit.wait(0.2):
            deadline = self.deadline_ns
            if deadline and time.monotonic_ns() > deadline and not self.fired:
                self.fired = True
                self.vcpu.set_immediate_exit(True)
                signal.pthread_kill(self.target, KICK_SIGNAL)

    def rearm(self) -> None:
        self.vcpu.set_immediate_exit(False)
        self.fired = False

    def stop(self) -> None:
        self._quit.set()
        self.join()


def now_text(run, reason: int) -> str:
    """The exit in the kvm_run page `run`, described as the trace describes a recorded one."""
    if reason == abi.KVM_EXIT_IO:
        _, direction, size, port, count, off = ex.read_head(run)
        write = direction == abi.KVM_EXIT_IO_OUT
        value = int.from_bytes(run[off:off + size], "little") if write else 0
        return schema.describe_exit(reason, int(write), port, size, value, count)
    if reason == abi.KVM_EXIT_MMIO:
        addr, raw, length, write = ex.mmio_fields(run)
        return schema.describe_exit(reason, int(write), addr, length,
                                    int.from_bytes(raw[:length], "little") if write else 0, 1)
    return schema.reason_name(reason)
