"""A user-space 8254 PIT channel 0 on a virtual clock, for --deterministic runs.

Intel 8254 datasheet: the control word at 0x43 selects a counter (bits 6-7), its access (bits
4-5: latch, LSB, MSB, LSB then MSB) and its mode (bits 1-3); data at 0x40-0x42. Channel 0's output
drives IRQ 0. Modes 2 (rate generator) and 3 (square wave) raise IRQ 0 every `reload` input clocks
(1.193182 MHz); mode 0 once. Time is the VM's virtual clock in ns (vmworker/deterministic.py), never
the host's: `advance(now)` raises the IRQs whose deadlines have passed, `next_deadline()` is where
a HLT jumps the clock to.
"""

from __future__ import annotations

from .saved_state import SavedFields

INPUT_HZ = 1_193_182  # the PC's PIT input clock (14.31818 MHz / 12)
NS = 1_000_000_000


class Pit8254(SavedFields):
    # what a snapshot of a --deterministic VM keeps (on the port bus, it is saved with the devices):
    # the programming and where channel 0 stands on the virtual clock
    SAVED = ("now_ns", "mode", "reload", "access", "_low_next", "_partial", "start_ns", "deadline", "_latched")

    def __init__(self, raise_irq0, name: str = "pit") -> None:
        self.name = name
        self._raise = raise_irq0
        self.now_ns = 0  # the virtual clock as of the last advance
        self.mode = 0
        self.reload = 0  # 0: not programmed
        self.access = 3
        self._low_next = True
        self._partial = 0
        self.start_ns = 0
        self.deadline: int | None = None  # next IRQ 0, virtual ns
        self._latched: list[int] = []

    def _period_ns(self) -> int:
        return max(1, (self.reload or 0x10000) * NS // INPUT_HZ)

    def count_now(self) -> int:
        """Channel 0's counter at the virtual time (it counts down from reload)."""
        if not self.reload:
            return 0
        clocks = (self.now_ns - self.start_ns) * INPUT_HZ // NS
        return (self.reload - clocks % self.reload) & 0xFFFF

    # Port interface (offset 0-2: counters, 3: control)
    def read(self, offset: int, size: int) -> bytes:
        if offset != 0:
            return b"\x00" * size
        if not self._latched:
            self._latched = list((self.count_now()).to_bytes(2, "little"))
        return bytes([self._latched.pop(0)]) * size

    def write(self, offset: int, data: bytes) -> None:
        value = data[0]
        if offset == 3:
            if value >> 6 != 0:  # channels 1, 2 and read-back: not modelled
                return
            access = (value >> 4) & 0x3
            if access == 0:  # counter latch
                self._latched = list(self.count_now().to_bytes(2, "little"))
                return
            self.access, self.mode = access, (value >> 1) & 0x7
            self._low_next = True
            self.deadline = None
            return
        if offset != 0:
            return
        if self.access == 1:
            self._load(value)
        elif self.access == 2:
            self._load(value << 8)
        elif self._low_next:
            self._partial, self._low_next = value, False
        else:
            self._low_next = True
            self._load(self._partial | value << 8)

    def _load(self, reload: int) -> None:
        self.reload = reload or 0x10000
        self.start_ns = self.now_ns
        self.deadline = self.now_ns + self._period_ns()

    # The virtual clock
    def advance(self, now_ns: int) -> None:
        self.now_ns = max(self.now_ns, now_ns)
        if self.deadline is None or self.deadline > self.now_ns:
            return
        self._raise()  # ticks that passed together are one edge, as on the real chip's IRR
        if self.mode in (2, 3):
            period = self._period_ns()
            missed = (self.now_ns - self.deadline) // period + 1
            self.deadline += missed * period
        else:
            self.deadline = None

    def next_deadline(self) -> int | None:
        return self.deadline
