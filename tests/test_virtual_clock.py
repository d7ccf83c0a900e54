"""The virtual clock of --deterministic runs (vmworker/deterministic.py) as the devices see it:
the CMOS RTC's time and the user-space PIC/PIT state a snapshot keeps. No KVM: the clock counts
exits here (no instruction counter), which is the same arithmetic."""

from __future__ import annotations

import calendar

import pytest

from vmworker.deterministic import Deterministic, parse_rtc_base
from vmworker.devices.bus import Bus
from vmworker.devices.rtc import REG_HOURS, REG_MINUTES, REG_SECONDS, CmosRtc
from vmworker.errors import SpecError


def read_register(rtc: CmosRtc, register: int) -> int:
    rtc.write(0, bytes([register]))
    return rtc.read(1, 1)[0]


def test_the_rtc_of_a_deterministic_vm_tells_its_base_plus_virtual_time():
    det = Deterministic(Bus("port"))
    rtc = CmosRtc(clock=det.rtc_clock(parse_rtc_base("2000-01-01")))
    assert [read_register(rtc, r) for r in (REG_HOURS, REG_MINUTES, REG_SECONDS)] == [0, 0, 0]
    det.skipped_ns += 3_661 * 10**9  # HLT jumped an hour, a minute and a second of virtual time
    assert [read_register(rtc, r) for r in (REG_HOURS, REG_MINUTES, REG_SECONDS)] == [0x01, 0x01, 0x01]  # BCD


@pytest.mark.parametrize("text, seconds", [
    ("2000-01-01", calendar.timegm((2000, 1, 1, 0, 0, 0))),
    ("2031-07-04T12:30:59", calendar.timegm((2031, 7, 4, 12, 30, 59))),
])
def test_rtc_base_reads_as_utc(text, seconds):
    assert parse_rtc_base(text) == seconds


@pytest.mark.parametrize("text", ["2031-17-04", "yesterday", "2031-07-04 12:30"])
def test_an_rtc_base_that_is_not_a_utc_time_is_refused_naming_it(text):
    with pytest.raises(SpecError, match="is not a UTC time"):
        parse_rtc_base(text)


def test_the_pic_pair_and_pit_state_goes_back_into_fresh_ones():
    before = Deterministic(Bus("port"))
    before.pics.master.write(0, b"\x11")  # ICW1: initialise, ICW4 follows
    for icw in (b"\x20", b"\x04", b"\x01"):
        before.pics.master.write(1, icw)
    before.pics.master.write(1, b"\xfe")  # OCW1: only IRQ 0 unmasked
    before.pit.write(3, b"\x34")  # channel 0, LSB then MSB, mode 2
    before.pit.write(0, b"\x9c")
    before.pit.write(0, b"\x2e")  # 11932: 100 Hz
    before.pit.advance(25_000_000)  # 25 ms of virtual time: IRQ 0 raised
    assert before.pics.take_vector() == 0x20

    after = Deterministic(Bus("port"))
    after.pics.master.restore(before.pics.master.state())
    after.pics.slave.restore(before.pics.slave.state())
    after.pit.restore(before.pit.state())
    assert after.pics.master.state() == before.pics.master.state()
    assert after.pit.state() == before.pit.state()
    assert after.pit.next_deadline() == 3 * (11932 * 10**9 // 1_193_182)  # the third tick, as before
    for det in (before, after):  # both go on alike: the tick in service ends, the next one comes
        det.pics.master.write(0, b"\x20")  # OCW2: non-specific EOI
        assert det.pics.take_vector() is None
        det.pit.advance(31_000_000)
        assert det.pics.take_vector() == 0x20
