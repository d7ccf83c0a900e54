"""When is a VM with an in-kernel irqchip halted for good?

Without an irqchip, HLT exits to userspace and the vCPU loop ends that vCPU. With one, KVM handles
HLT itself: the vCPU sleeps inside KVM_RUN until an interrupt arrives, so a guest that waits with
`sti; hlt` keeps running, as on real hardware. But a vCPU that executed HLT with interrupts disabled
(IF=0), or an AP still waiting for INIT/SIPI, can only be woken by another vCPU; when every vCPU is
in such a state, nothing ever will (vmsup injects no NMIs), and the VM ends "halted".

Finding that out must cost nothing per exit, and KVM_GET_MP_STATE cannot be asked from outside: it
waits for the vCPU's mutex, which KVM_RUN holds while the vCPU sleeps. So the machine's idle loop
(every IDLE_CHECK_SECONDS) samples each vCPU's binary statistics, which any thread may read:
`blocking` (asleep in the kernel) and `halt_exits` (HLTs executed). Only when every vCPU is asleep
and no counter moved for a whole idle period does it *probe*: it kicks the vCPUs out of KVM_RUN,
and each vCPU thread answers from its own side (KVM_GET_MP_STATE and RFLAGS.IF) before going back
to sleep. If all are blocked for good and the counters still have not moved, the VM is stopped.
A guest halted with IF=1 is probed once per distinct state, never again while it keeps sleeping;
a guest taking timer interrupts moves `halt_exits` every tick and is never probed.
"""

from __future__ import annotations

import threading

from . import kvm_abi as abi
from .status import End
from .errors import KvmError

RFLAGS_IF = 1 << 9  # SDM Vol. 1 §3.4.3.3: interrupt enable flag
# mp_state values of a vCPU only another vCPU can wake: waiting for INIT or SIPI.
_WAITING_FOR_IPI = (abi.KVM_MP_STATE_UNINITIALIZED, abi.KVM_MP_STATE_INIT_RECEIVED)
# Without usable statistics, probe this many idle periods apart.
FALLBACK_PROBE_PERIODS = 10


class HaltProbe:
    """One round of questions to the vCPU threads; answered from the EINTR path of the vCPU loop."""

    def __init__(self, vcpus: int) -> None:
        self._lock = threading.Lock()
        self.answers: dict[int, bool] = {}
        self.waiting_for_ipi = 0  # of the answers, vCPUs (APs) still waiting for INIT/SIPI
        self.vcpus = vcpus
        self.error = ""

    def answer(self, vcpu) -> bool:
        """Called by `vcpu`'s own thread, outside KVM_RUN: is this vCPU blocked for good?"""
        waiting = False
        try:
            mp_state = vcpu.get_mp_state()
            waiting = mp_state in _WAITING_FOR_IPI
            forever = waiting or (mp_state == abi.KVM_MP_STATE_HALTED and not vcpu.get_regs().rflags & RFLAGS_IF)
        except KvmError as e:
            forever = False
            self.error = str(e)
        with self._lock:
            if vcpu.id not in self.answers and waiting:
                self.waiting_for_ipi += 1
            self.answers[vcpu.id] = forever
        return forever

    def complete(self) -> bool:
        with self._lock:
            return len(self.answers) == self.vcpus


class HaltWatch:
    """Driven by the machine's idle loop (`tick`); stops the machine once every vCPU is halted for good."""

    def __init__(self, machine) -> None:
        self.machine = machine
        self.stats = []
        try:
            for vcpu in machine.vm.vcpus:
                self.stats.append(vcpu.stats())
            self.usable = all({"blocking", "halt_exits"} <= s.names for s in self.stats)
        except KvmError:
            self.usable = False
        self._previous: tuple | None = None
        self._probed: tuple | None = None  # the sample a finished probe answered "not for good" for
        self._probe: HaltProbe | None = None
        self._probe_sample: tuple | None = None
        self._periods = 0
        self.probes = 0

    def _sample(self) -> tuple | None:
        """(blocking, halt_exits) per vCPU, or None when some vCPU is not asleep in the kernel."""
        sample = []
        for s in self.stats:
            if not s.read("blocking"):
                return None
            sample.append(s.read("halt_exits"))
        return tuple(sample)

    def tick(self) -> None:
        ctx = self.machine.ctx
        if ctx.stopping:
            return
        probe = self._probe
        if probe is not None:
            if not probe.complete():
                return
            ctx.halt_probe = None
            self._probe = None
            settled = not self.usable or self._sample() == self._probe_sample
            if settled and all(probe.answers.values()):
                detail = "every vCPU halted with interrupts disabled"
                if probe.waiting_for_ipi:
                    detail += f"; {probe.waiting_for_ipi} never started, waiting for INIT/SIPI"
                self.machine.stop(End.HALTED, detail=detail)
                return
            self._probed = self._probe_sample
            return
        if self.usable:
            sample = self._sample()
            previous, self._previous = self._previous, sample
            if sample is None or sample != previous or sample == self._probed:
                return
        else:
            self._periods += 1
            if self._periods % FALLBACK_PROBE_PERIODS:
                return
            sample = None
        self._probe_sample = sample
        self._probe = HaltProbe(len(self.stats))
        ctx.halt_probe = self._probe
        self.probes += 1
        self.machine.kick_vcpus()

    def close(self) -> None:
        for s in self.stats:
            s.close()
        self.stats.clear()
