"""--deterministic: interrupts only at exits, on a virtual clock the guest's own work defines.

The in-kernel PIT and PIC deliver timer interrupts at host-timed moments, which no rerun can
reproduce. In this mode the VM has no in-kernel irqchip; a user-space 8259 pair and 8254 PIT
(vmworker/devices/) sit on the port bus, and time is virtual: the vCPU's exact instruction count
(`insn_emulation`, where the run's insn_count_exact holds; else its count of guest exits) plus
whatever HLT skipped. At every guest exit (never at a kick, which comes at a host-timed moment)
`after_exit` moves the PIT to the clock, and if the PIC has a vector and the guest can take it
(kvm_run.ready_for_interrupt_injection) injects it with KVM_INTERRUPT, or asks KVM for an exit
when the guest's interrupt window opens (kvm_run.request_interrupt_window: api.rst). A HLT with
the timer armed jumps the clock to the timer's next deadline at once (a timer-driven guest runs
faster than real time). Each injection is an `interrupt` record: (clock, rip, vector), which a
rerun (vmworker/rerun.py) gives again at the same place. One vCPU only (settings refuse more).
"""

from __future__ import annotations

import fcntl

from . import kvm_abi as abi
from .devices.pic8259 import PicPair
from .devices.pit8254 import Pit8254
from .layout import PIC_MASTER_PORT, PIC_SLAVE_PORT, PIT_PORT

_REQUEST_WINDOW = abi.run_offset("request_interrupt_window")
_READY = abi.run_offset("ready_for_interrupt_injection")
_IF_FLAG = abi.run_offset("if_flag")
NS_PER_INSN = 1  # virtual time: a 1 GHz CPU that runs one instruction per cycle
NS_PER_EXIT = 1000  # where instructions cannot be counted: a microsecond per exit


def inject(vcpu, vector: int) -> None:
    """KVM_INTERRUPT: the vector is taken at the next entry (a userspace irqchip only)."""
    fcntl.ioctl(vcpu.fd, abi.KVM_INTERRUPT, abi.kvm_interrupt(irq=vector))


def request_window(run, on: bool) -> None:
    run[_REQUEST_WINDOW] = 1 if on else 0


class Deterministic:
    """The PIC/PIT pair, the virtual clock and the injection policy of one vCPU."""

    def __init__(self, port_bus, counter=None, record=None) -> None:
        self.pics = PicPair()
        self.pit = Pit8254(lambda: self.pics.raise_irq(0))
        port_bus.attach(PIC_MASTER_PORT, 2, self.pics.master)
        port_bus.attach(PIC_SLAVE_PORT, 2, self.pics.slave)
        port_bus.attach(PIT_PORT, 4, self.pit)
        self.counter = counter  # InsnCounter, or None: the clock counts exits
        self.clock_name = "insns" if counter is not None else "exits"
        self._base = counter.read() if counter is not None else 0
        self._exits = 0
        self.skipped_ns = 0  # virtual time HLT jumped over
        self.record = record  # record(at, rip, vector, virtual_ns)
        self.injected = 0

    def clock(self) -> int:
        """The vCPU's clock now: instructions since start, or guest exits."""
        if self.counter is not None:
            return self.counter.read() - self._base
        return self._exits

    def virtual_ns(self, at: int) -> int:
        return at * (NS_PER_INSN if self.counter is not None else NS_PER_EXIT) + self.skipped_ns

    def after_exit(self, vcpu, rip: int, halted: bool) -> bool:
        """Called after each guest exit is handled; returns True when a HLT ends the vCPU for good
        (interrupts off, or nothing that could ever wake it)."""
        self._exits += 1
        run = vcpu.run_page
        at = self.clock()
        now = self.virtual_ns(at)
        if halted:
            if not run[_IF_FLAG]:
                return True
            if not self.pics.has_pending():
                deadline = self.pit.next_deadline()
                if deadline is None or self.pics.master.imr & 1:
                    return True  # the timer cannot wake it: halted for good
                if deadline > now:
                    self.skipped_ns += deadline - now
                    now = deadline
        self.pit.advance(now)
        if not self.pics.has_pending():
            request_window(run, False)
            return False
        if run[_READY]:
            vector = self.pics.take_vector()
            if vector is not None:
                inject(vcpu, vector)
                self.injected += 1
                if self.record is not None:
                    self.record(at, rip, vector, now)
            request_window(run, False)
        else:
            request_window(run, True)
        return False


def for_machine(machine, port_bus, recording=None) -> Deterministic:
    """The --deterministic controller of a one-vCPU machine (before its vCPU first runs)."""
    from .insn_counter import InsnCounter, counts_exactly
    counter = None
    if counts_exactly():
        try:
            counter = InsnCounter(machine.vm.vcpus[0])
        except KeyError:
            counter = None
    det = Deterministic(port_bus, counter)
    if recording is not None:
        det.record = lambda at, rip, vector, now: recording.interrupt(
            at=at, clock=det.clock_name, rip=rip, vector=vector, virtual_ns=now)
    return det
