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

Other input comes at exits too: the i8042's IRQ 1 (`connect_keyboard`; raised from any thread,
folded into the PIC at the next exit), and a key script is typed on the virtual clock
(`keys`: devices/keyboard.py's ClockedKeyScript, ticked here; a HLT may jump to its next stroke).
Serial input is read whole before the VM starts (vmworker/__main__.py). The CMOS RTC reads this
clock too (`rtc_clock`): a fixed start (the `rtc_base` setting, recorded in the spec) plus virtual
time, so no host time reaches the guest. A snapshot (vmworker/snapshot.py) keeps `state()`: the
clock's reading and HLT's skipped time (the PIC pair and the PIT sit on the port bus and are saved
with the devices); a restored VM goes on from there (`restore`), so its interrupt records carry
on the original's clock values.
"""

from __future__ import annotations

import calendar
import fcntl
from array import array
import threading
import time

from tracetool.messages import INSN_COUNTS_PER_RECORD

from . import kvm_abi as abi
from .errors import SpecError
from .devices.pic8259 import PicPair
from .devices.pit8254 import Pit8254
from .layout import I8042_IRQ, PIC_MASTER_PORT, PIC_SLAVE_PORT, PIT_PORT

_REQUEST_WINDOW = abi.run_offset("request_interrupt_window")
_READY = abi.run_offset("ready_for_interrupt_injection")
_IF_FLAG = abi.run_offset("if_flag")
NS_PER_INSN = 1  # virtual time: a 1 GHz CPU that runs one instruction per cycle
NS_PER_EXIT = 1000  # where instructions cannot be counted: a microsecond per exit
RTC_BASE_DEFAULT = "2000-01-01T00:00:00"  # the RTC's start in this mode unless rtc_base says otherwise
RTC_BASE_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


def parse_rtc_base(text: str) -> int:
    """rtc_base (UTC, YYYY-MM-DD[THH:MM:SS]) → seconds since the epoch; SpecError if it does not read."""
    for fmt in RTC_BASE_FORMATS:
        try:
            return calendar.timegm(time.strptime(text, fmt))
        except ValueError:
            continue
    raise SpecError(f"{text!r} is not a UTC time (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)")


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
        self.rtc_base: int | None = None  # seconds since the epoch the RTC started at (rtc_clock)
        # IRQs a device raised (from any thread: `vmsup screen`'s keys come on their own), folded
        # into the PIC at the next exit, so an interrupt's place is always an exit's
        self._requested = 0
        self._request_lock = threading.Lock()
        self.keys = None  # keyboard.ClockedKeyScript: a key script on the virtual clock
        # The instruction count at each guest exit (exact counter only), sent every
        # INSN_COUNTS_PER_RECORD exits as an insn-counts record: record_counts(first, counts).
        self.record_counts = None
        self._counts = array("q")
        self._counts_first = 0

    def connect_keyboard(self, i8042) -> None:
        """The i8042's IRQ 1 into the user-space PIC (an edge on each rising level), at exits."""
        i8042.connect_irq(lambda level: self.request_irq(I8042_IRQ) if level else None)

    def request_irq(self, irq: int) -> None:
        with self._request_lock:
            self._requested |= 1 << irq

    def _take_requests(self) -> None:
        with self._request_lock:
            bits, self._requested = self._requested, 0
        for irq in range(16):
            if bits >> irq & 1:
                self.pics.raise_irq(irq)

    def _wake_deadline(self) -> int | None:
        """Where a HLT with interrupts on jumps the clock to: the next PIT tick (IRQ 0 unmasked) or
        the key script's next stroke, whichever comes first; None if nothing will ever come."""
        times = []
        deadline = self.pit.next_deadline()
        if deadline is not None and not self.pics.master.imr & 1:
            times.append(deadline)
        if self.keys is not None:
            due = self.keys.next_due()
            if due is not None:
                times.append(due)
        return min(times) if times else None

    def clock(self) -> int:
        """The vCPU's clock now: instructions since start, or guest exits."""
        if self.counter is not None:
            return self.counter.read() - self._base
        return self._exits

    def finish(self) -> None:
        """Send the instruction counts not yet sent (at the end of the run, and every record's worth)."""
        if self._counts and self.record_counts is not None:
            self.record_counts(self._counts_first, self._counts.tobytes())
        self._counts = array("q")

    def virtual_ns(self, at: int) -> int:
        return at * (NS_PER_INSN if self.counter is not None else NS_PER_EXIT) + self.skipped_ns

    def rtc_clock(self, base_seconds: int):
        """The CMOS RTC's clock (devices/rtc.py's seam): `base_seconds` plus the virtual time."""
        self.rtc_base = base_seconds
        return lambda: base_seconds + self.virtual_ns(self.clock()) / 1e9

    # Snapshots ------------------------------------------------------------------------------------
    def state(self, vcpu) -> dict:
        """What a snapshot keeps, read while the vCPU is parked outside KVM_RUN."""
        return {"clock": self.clock_name, "at": self.clock(), "exits": self._exits, "skipped_ns": self.skipped_ns,
                "injected": self.injected, "window": vcpu.run_page[_REQUEST_WINDOW], "rtc_base": self.rtc_base,
                "requested": self._requested}

    def restore(self, state: dict, vcpu, path: str) -> None:
        """Go on from a snapshot's `state()` (before the vCPU first runs); SpecError if it does not fit."""
        def number(name: str) -> int:
            value = state.get(name)
            if not isinstance(value, int) or value < 0:
                raise SpecError(f"{path}: corrupt snapshot (deterministic {name})")
            return value
        if not isinstance(state, dict):
            raise SpecError(f"{path}: corrupt snapshot (deterministic state)")
        if state.get("clock") != self.clock_name:
            raise SpecError(f"{path}: the snapshot's virtual clock counts {state.get('clock')}, this host's "
                            f"counts {self.clock_name}: the guest's interrupts would move")
        if state.get("rtc_base") != self.rtc_base:  # the RTC would jump
            when = state.get("rtc_base")
            shown = time.strftime(RTC_BASE_FORMATS[0], time.gmtime(when)) if isinstance(when, int) else when
            raise SpecError(f"{path}: the snapshot's RTC started at {shown}; give --rtc-base {shown}")
        at = number("at")
        if self.counter is not None:
            self._base = self.counter.read() - at  # the clock reads `at` now and counts on
        self._exits = number("exits")
        self.skipped_ns, self.injected = number("skipped_ns"), number("injected")
        self._requested = state.get("requested", 0) if isinstance(state.get("requested", 0), int) else 0
        request_window(vcpu.run_page, bool(number("window")))

    def after_exit(self, vcpu, rip: int, halted: bool) -> bool:
        """Called after each guest exit is handled; returns True when a HLT ends the vCPU for good
        (interrupts off, or nothing that could ever wake it)."""
        self._exits += 1
        run = vcpu.run_page
        at = self.clock()
        if self.record_counts is not None and self.counter is not None:
            if not self._counts:
                self._counts_first = self._exits - 1
            self._counts.append(at)
            if len(self._counts) >= INSN_COUNTS_PER_RECORD:
                self.finish()
        now = self.virtual_ns(at)
        if self._requested:
            self._take_requests()
        if halted:
            if not run[_IF_FLAG]:
                return True
            if not self.pics.has_pending():
                deadline = self._wake_deadline()
                if deadline is None:
                    return True  # neither the timer nor a key can wake it: halted for good
                if deadline > now:
                    self.skipped_ns += deadline - now
                    now = deadline
        if self.keys is not None and not self.keys.done():
            self.keys.tick(now)
            if self._requested:
                self._take_requests()
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
        det.record_counts = recording.insn_counts
    return det
