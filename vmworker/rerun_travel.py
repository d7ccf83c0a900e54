"""Time travel in a rerun: checkpoints, and gdb's reverse-stepi and reverse-continue.

A rerun served to gdb (`vmtrace rerun --gdb`) keeps checkpoints: in-memory copies of the whole
machine every `interval` recorded exits — registers, sregs, XSAVE (FPU where XSAVE is not
readable), vCPU events, MP state, all of guest RAM as one bytes copy (the bundled guests are a few
MiB: ~1 ms per MiB to copy) and the rerun's position (batch, row, exits taken, next interrupt,
instruction count). A checkpoint is taken between exits, after the pending I/O is completed
(KVM_RUN with immediate_exit, api.rst) and never right after a KVM_INTERRUPT (a queued external
vector is not part of KVM_GET_VCPU_EVENTS). Memory is bounded: at most `budget` bytes of
checkpoints; when full, every second one goes (never the first) and the interval doubles, so they
keep covering the whole run, sparser the longer it gets.

The timeline is the exact instruction count (`insn_emulation`, vmworker/insn_counter.py; probed
here: a single step raises it by exactly 1, an exit's instruction is counted by the time the exit
returns, and its completion adds nothing). Going to count T: restore the last checkpoint at or
before T, run freely (no guest debug) through the recorded exits whose counts are ≤ T (the rerun
learnt them on its way forward), then single-step to T.
- reverse-stepi (`bs`): go to now - 1.
- reverse-continue (`bc`): the last breakpoint hit before now. From the newest checkpoint
  backwards, each stretch is re-executed with gdb's breakpoints in the debug registers (its int3s
  taken out meanwhile), remembering the counts of hits; the newest hit found wins. With none, the
  start of the recording: `T05replaylog:begin;` (GDB manual, "Stop Reply Packets").
- reverse-finish is gdb's composition of these; nothing of its own here.
Without an exact counter there is no timeline: bs/bc get a stop with a note saying so.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from . import kvm_abi as abi
from .errors import KvmError
from .gdb.control import SIGTRAP, Stop
from .rerun_loop import Replay

DEFAULT_INTERVAL = 1000  # recorded exits between checkpoints (~12 ms of rerun at ~80k exits/s)
DEFAULT_BUDGET = 256 << 20  # bytes of checkpoints at most
MAX_DEBUG_REGISTERS = 4  # DR0-DR3 (SDM Vol. 3B §17.2)
BEGIN, END_OF_LOG = "replaylog:begin", "replaylog:end"


@dataclass
class Checkpoint:
    count: int  # instructions since the start
    ordinal: int  # recorded exits taken
    batch_no: int
    row: int
    next_interrupt: int
    regs: object
    sregs: object
    fpu: object  # kvm_xsave, or kvm_fpu where XSAVE is not readable
    events: object
    mp_state: int
    memory: bytes

    @property
    def size(self) -> int:
        return len(self.memory)


class TimeTravel:
    def __init__(self, replay: Replay, debugger, interval: int = DEFAULT_INTERVAL, budget: int = DEFAULT_BUDGET) -> None:
        self.replay = replay
        self.dbg = debugger
        self.interval = max(1, interval)
        self.limit = max(2, budget // max(1, replay.machine.memory.size))
        self.checkpoints: list[Checkpoint] = []
        self.restores = 0
        self.exact = replay.counter is not None
        replay.at_exit_boundary = self.at_exit_boundary

    # Checkpoints -------------------------------------------------------------------------------------
    def at_exit_boundary(self) -> None:
        """Before each recorded exit: a checkpoint when one is due."""
        r = self.replay
        last = self.checkpoints[-1].ordinal if self.checkpoints else None
        if last is not None and (r.ordinal - last < self.interval or r.ordinal <= last):
            return
        if r.injected_at_last_exit:
            return  # the next boundary
        self.take()

    def take(self) -> None:
        r = self.replay
        vcpu = r.vcpu
        run = vcpu.run_page
        held = run[_IMMEDIATE_EXIT]
        vcpu.complete_pending_io()  # the last exit's instruction finishes (an IN's value reaches its register)
        vcpu.set_immediate_exit(bool(held))
        if self.dbg is not None:
            self.dbg.unplant_all()  # the guest's own bytes, never gdb's int3s
        try:
            memory = bytes(r.machine.memory.regions[0].mapping)
        finally:
            if self.dbg is not None:
                self.dbg.plant_all()
        try:
            fpu = vcpu.get_xsave()
        except KvmError:
            fpu = vcpu.get_fpu()
        ck = Checkpoint(r.count_now(), r.ordinal, r.batch_no, r.row, r.next_interrupt, vcpu.get_regs(),
                        vcpu.get_sregs(), fpu, vcpu.get_vcpu_events(), vcpu.get_mp_state(), memory)
        if self.checkpoints and self.checkpoints[-1].ordinal == ck.ordinal:
            self.checkpoints[-1] = ck
        else:
            self.checkpoints.append(ck)
        if len(self.checkpoints) > self.limit:  # thin out: keep the first and every second one
            self.checkpoints = self.checkpoints[:1] + self.checkpoints[2::2]
            self.interval *= 2

    def restore(self, ck: Checkpoint) -> None:
        r = self.replay
        vcpu = r.vcpu
        vcpu.complete_pending_io()  # an exit left pending (a divergence) must not complete into the restored state
        vcpu.set_immediate_exit(False)
        r.machine.memory.regions[0].mapping[:] = ck.memory
        vcpu.set_sregs(ck.sregs)
        vcpu.set_regs(ck.regs)
        if isinstance(ck.fpu, abi.kvm_xsave):
            vcpu.set_xsave(ck.fpu)
        else:
            vcpu.set_fpu(ck.fpu)
        vcpu.set_mp_state(ck.mp_state)
        vcpu.set_vcpu_events(ck.events)
        r.seek(ck.batch_no, ck.row)
        r.ordinal, r.next_interrupt, r.injected_at_last_exit = ck.ordinal, ck.next_interrupt, False
        if r.counter is not None:
            r.count_base = r.counter.read() - ck.count
        self.restores += 1

    def memory_bytes(self) -> int:
        return sum(ck.size for ck in self.checkpoints)

    # Moving on the timeline ------------------------------------------------------------------------
    def goto(self, target: int) -> None:
        """Put the machine at instruction count `target` (≤ now)."""
        r = self.replay
        i = bisect.bisect_right([ck.count for ck in self.checkpoints], target) - 1
        self.restore(self.checkpoints[max(i, 0)])
        r.vcpu.set_guest_debug(0)
        self._run_to(target)

    def _run_to(self, target: int) -> None:
        r = self.replay
        k = bisect.bisect_right(r.exit_counts, target)  # exits before ordinal k end at or before target
        r.advance(stop_before=k)
        while r.count_now() < target and r.step():
            pass

    def serve(self, kind: str) -> None:
        """Do gdb's `bs` or `bc` on the vCPU thread, then report where it stopped."""
        dbg, r = self.dbg, self.replay
        if not self.exact:
            dbg.notes.append("no time travel: this host's instruction counter is not exact")
            dbg.report(Stop(0, SIGTRAP))
            return
        dbg.unplant_all()
        try:
            stop = self.reverse_step() if kind == "step" else self.reverse_continue(dbg.breakpoint_addresses())
        finally:
            dbg.plant_all()
            r.vcpu.set_guest_debug(*dbg.guest_debug(0))
        dbg.report(stop)

    def reverse_step(self) -> Stop:
        now = self.replay.count_now()
        if now <= 0:
            return Stop(0, SIGTRAP, BEGIN)
        self.goto(now - 1)
        return Stop(0, SIGTRAP)

    def reverse_continue(self, breakpoints: set[int]) -> Stop:
        now = self.replay.count_now()
        if breakpoints:
            end = now
            for ck in reversed([ck for ck in self.checkpoints if ck.count < now]):
                hits = self._hits(ck, end, breakpoints)
                if hits:
                    self.goto(hits[-1])
                    return Stop(0, SIGTRAP, "swbreak")
                end = ck.count
        self.goto(0)
        return Stop(0, SIGTRAP, BEGIN)

    def _hits(self, ck: Checkpoint, end: int, breakpoints: set[int]) -> list[int]:
        """Counts in [ck.count, end) where the guest was at one of `breakpoints`, re-executed from `ck`."""
        r = self.replay
        self.restore(ck)
        hits: list[int] = []
        addrs = sorted(breakpoints)
        if len(addrs) > MAX_DEBUG_REGISTERS:  # more than the debug registers hold: look at every instruction
            while r.count_now() < end:
                if self._pc() in breakpoints:
                    hits.append(r.count_now())
                if not r.step():
                    break
            return hits
        dr7 = 0
        for i in range(len(addrs)):
            dr7 |= 1 << (2 * i)  # Ln: local enable, R/Wn = LENn = 0: instruction execution (SDM Vol. 3B §17.2.4)
        debugreg = (*addrs, *[0] * (MAX_DEBUG_REGISTERS - len(addrs)), 0, 0, 0, dr7)
        armed = (abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW_BP, debugreg)

        def hit(exit_) -> bool:
            if self._pc() not in breakpoints:  # (DR6's bits are sticky: the pc says which stop this is)
                return True
            count = r.count_now()
            if count < end:
                hits.append(count)
            # Past it: one instruction without the breakpoints, then armed again.
            r.on_debug = None
            try:
                r.step()
            finally:
                r.on_debug = hit
            r.vcpu.set_guest_debug(*armed)
            return True

        k = bisect.bisect_right(r.exit_counts, end - 1)
        r.vcpu.set_guest_debug(*armed)
        r.on_debug = hit
        try:
            r.advance(stop_before=k)
        finally:
            r.on_debug = None
            r.vcpu.set_guest_debug(0)
        while r.count_now() < end:  # the last stretch, after the last exit: instruction by instruction
            if self._pc() in breakpoints and (not hits or hits[-1] != r.count_now()):
                hits.append(r.count_now())
            if not r.step():
                break
        return [h for h in hits if h < end]

    def _pc(self) -> int:
        from .gdb.regs import linear_pc
        v = self.replay.vcpu
        return linear_pc(v.get_regs(), v.get_sregs())


_IMMEDIATE_EXIT = abi.run_offset("immediate_exit")
