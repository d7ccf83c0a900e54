"""The CMOS real-time clock of the PC/AT: a Motorola MC146818A behind index port 0x70 and data port
0x71, telling the time from a clock (the host's, by default).

Registers (MC146818A datasheet, "Address Map" and "Registers A-D"):

    0x00 seconds   0x02 minutes   0x04 hours   0x06 day of week (1 = Sunday)
    0x07 day of month   0x08 month   0x09 year (two digits)
    0x01/0x03/0x05 the alarm's seconds/minutes/hours (stored, no alarm fires)
    0x0A register A: bit 7 UIP (an update is in progress, or begins within 244 µs: the time
         registers are about to change), bits 6-4 the divider, 3-0 the periodic rate
    0x0B register B: bit 7 SET (updates stopped while the guest sets the time), bit 2 DM
         (1 = binary, 0 = BCD), bit 1 24/12 (1 = 24-hour), bits 6-4 interrupt enables
    0x0C register C: interrupt flags, cleared by reading (no interrupt is raised here: 0)
    0x0D register D: bit 7 VRT, "valid RAM and time" (the battery is good)
    0x0E-0x7F battery-backed RAM; by the IBM PC/AT convention 0x32 holds the century, which here
         follows the clock and register B's DM bit like the time registers (as QEMU's, and as
         Linux's mc146818_get_time decodes it), and the memory sizes firmware leaves there (binary,
         little-endian pairs; IBM PC/AT Technical Reference, "CMOS RAM Address Map"): 0x15/0x16
         base memory in KiB, 0x17/0x18 and 0x30/0x31 KiB above 1 MiB (at most 0xFFFF), 0x34/0x35
         64 KiB blocks above 16 MiB (the Bochs/QEMU/SeaBIOS extension); 0x2E/0x2F the checksum
         of 0x10-0x2D, big-endian

The index port's bit 7 is the PC's NMI mask, kept and ignored. Time is UTC, as QEMU's default
(`-rtc base=utc`) and Linux expect. A guest that sets the time (SET, write, clear SET) moves this
clock by the difference; the host's clock is never touched. The clock is a seam (`clock`): tests
and a future deterministic mode give their own.
"""

from __future__ import annotations

import calendar
import time
from typing import Callable

from .saved_state import SavedFields

LENGTH = 2  # 0x70 index, 0x71 data
REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32  # IBM PC/AT CMOS map (also ACPI FADT's default CENTURY index)
CMOS_SIZE = 0x80
INDEX_MASK = 0x7F  # bit 7 of the index port masks NMI
A_UIP = 0x80
A_DEFAULT = 0x26  # divider 010 (32.768 kHz time base), rate 0110 (1024 Hz), as firmware leaves it
B_SET, B_DM_BINARY, B_24H = 0x80, 0x04, 0x02
B_DEFAULT = B_24H  # BCD, 24-hour: the PC/AT BIOS's setting
D_VRT = 0x80
HOUR_PM = 0x80  # 12-hour mode: bit 7 of the hours register
UPDATE_CYCLE = 244e-6  # seconds before each update during which UIP reads 1 (datasheet: tBUC)
CMOS_BASE_MEMORY, CMOS_EXTENDED_MEMORY, CMOS_EXTENDED_MEMORY_POST, CMOS_MEMORY_ABOVE_16M = 0x15, 0x17, 0x30, 0x34
CMOS_CHECKSUM, CHECKSUMMED = 0x2E, range(0x10, 0x2E)
BASE_MEMORY_KIB = 640  # conventional memory: RAM below the VGA window at 0xA0000
TIME_REGISTERS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)


def to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0xF)


class CmosRtc(SavedFields):
    """Index (offset 0) and data (offset 1) ports of the CMOS RTC."""

    SAVED = ("index", "offset", "ram")  # guest-visible state a snapshot keeps

    def __init__(self, name: str = "rtc", clock: Callable[[], float] = time.time, mem_size: int | None = None) -> None:
        self.name = name
        self.clock = clock
        self.index = 0
        self.offset = 0  # seconds the guest moved its clock from `clock`
        self.ram = bytearray(CMOS_SIZE)
        self.ram[REG_A], self.ram[REG_B], self.ram[REG_D] = A_DEFAULT, B_DEFAULT, D_VRT
        self._frozen: dict[int, int] | None = None  # the time registers while SET is 1
        if mem_size is not None:
            self._store_memory_sizes(mem_size)

    def _store_memory_sizes(self, mem_size: int) -> None:
        above_1m = min(max(0, mem_size - (1 << 20)) >> 10, 0xFFFF)
        above_16m = min(max(0, mem_size - (16 << 20)) >> 16, 0xFFFF)
        for register, value in ((CMOS_BASE_MEMORY, BASE_MEMORY_KIB), (CMOS_EXTENDED_MEMORY, above_1m),
                                (CMOS_EXTENDED_MEMORY_POST, above_1m), (CMOS_MEMORY_ABOVE_16M, above_16m)):
            self.ram[register:register + 2] = value.to_bytes(2, "little")
        self.ram[CMOS_CHECKSUM:CMOS_CHECKSUM + 2] = sum(self.ram[r] for r in CHECKSUMMED).to_bytes(2, "big")

    def _now(self) -> float:
        return self.clock() + self.offset

    def _time_registers(self, now: float) -> dict[int, int]:
        """The time registers' values (binary) at `now`."""
        t = time.gmtime(now)
        return {REG_SECONDS: t.tm_sec, REG_MINUTES: t.tm_min, REG_HOURS: t.tm_hour,
                REG_WEEKDAY: (t.tm_wday + 1) % 7 + 1,  # tm_wday 0 = Monday; the RTC's 1 = Sunday
                REG_DAY: t.tm_mday, REG_MONTH: t.tm_mon, REG_YEAR: t.tm_year % 100, REG_CENTURY: t.tm_year // 100}

    def _encode(self, register: int, value: int) -> int:
        b = self.ram[REG_B]
        pm = 0
        if register == REG_HOURS and not b & B_24H:
            pm = HOUR_PM if value >= 12 else 0
            value = value % 12 or 12
        return (value if b & B_DM_BINARY else to_bcd(value)) | pm

    def _decode(self, register: int, raw: int) -> int:
        b = self.ram[REG_B]
        pm = register == REG_HOURS and not b & B_24H and raw & HOUR_PM
        raw &= 0x7F if register == REG_HOURS else 0xFF
        value = raw if b & B_DM_BINARY else from_bcd(raw)
        if register == REG_HOURS and not b & B_24H:
            value = value % 12 + (12 if pm else 0)
        return value

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            return b"\xff" * size  # the index port is write-only
        return bytes([self._read_register(self.index)]) * size

    def _read_register(self, register: int) -> int:
        if register in TIME_REGISTERS:
            if self._frozen is not None:
                return self._encode(register, self._frozen[register])
            return self._encode(register, self._time_registers(self._now())[register])
        if register == REG_A:
            now = self._now()
            uip = A_UIP if now - int(now) >= 1 - UPDATE_CYCLE and not self.ram[REG_B] & B_SET else 0
            return self.ram[REG_A] & 0x7F | uip
        if register == REG_C:
            return 0  # no interrupt flag is ever set: no IRQ 8 here
        return self.ram[register]

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.index = data[0] & INDEX_MASK
            if len(data) > 1:  # `out %ax, $0x70`: AH goes to the data port
                self.write(1, data[1:2])
            return
        value, register = data[0], self.index
        if register in TIME_REGISTERS:
            current = dict(self._frozen or self._time_registers(self._now()))
            current[register] = self._decode(register, value)
            if self._frozen is not None:
                self._frozen = current
            else:
                self._set_time(current)
        elif register == REG_B:
            was_set = self.ram[REG_B] & B_SET
            self.ram[REG_B] = value
            if value & B_SET and not was_set:
                self._frozen = self._time_registers(self._now())
            elif was_set and not value & B_SET and self._frozen is not None:
                self._set_time(self._frozen)
                self._frozen = None
        elif register == REG_A:
            self.ram[REG_A] = value & 0x7F  # UIP is read-only
        elif register in (REG_C, REG_D):
            pass  # read-only
        else:
            self.ram[register] = value

    def _set_time(self, regs: dict[int, int]) -> None:
        """Move the clock so that it reads `regs` now (the day of week follows from the date)."""
        year = regs[REG_CENTURY] * 100 + regs[REG_YEAR]
        try:
            wanted = calendar.timegm((year, regs[REG_MONTH], regs[REG_DAY], regs[REG_HOURS], regs[REG_MINUTES],
                                      regs[REG_SECONDS], 0, 0, 0))
        except (ValueError, OverflowError):
            return  # a date that does not exist: a real chip would count on from nonsense; we keep time
        now = self.clock()
        self.offset = wanted - int(now)
