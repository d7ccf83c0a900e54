"""What real programs probe: the PCI host bridge (0xCF8/0xCFC), the CMOS RTC (0x70/0x71), POST codes
(0x80). Library tests drive the devices through the standard port bus, the RTC with a clock of our
own; the KVM test runs the bundled pcirtc guest, which scans PCI bus 0 and reads the RTC, and holds
what it printed against the host's clock read before and after the run.
"""

from __future__ import annotations

import calendar
import io
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO
from vmworker import layout
from vmworker.devices.console import Console
from vmworker.devices.pci_host import config_address
from vmworker.devices.rtc import CmosRtc
from vmworker.devices.serial_input import SerialInput
from vmworker.devices.standard import StandardDevices

# 2026-12-04 (a Friday) 21:07:09.5 UTC
FIXED = calendar.timegm((2026, 12, 4, 21, 7, 9, 0, 0, 0)) + 0.5


def port_bus():
    devices = StandardDevices(Console(io.BytesIO(), line_buffered=False), SerialInput.empty())
    return devices, devices.port_bus


def pci_read(bus, address: int, size: int = 4, offset: int = 0) -> int:
    bus.write(layout.PCI_CONFIG_PORT, address.to_bytes(4, "little"))
    return int.from_bytes(bus.read(layout.PCI_CONFIG_PORT + 4 + offset, size), "little")


def rtc_read(rtc: CmosRtc, register: int) -> int:
    rtc.write(0, bytes([register]))
    return rtc.read(1, 1)[0]


def rtc_write(rtc: CmosRtc, register: int, value: int) -> None:
    rtc.write(0, bytes([register]))
    rtc.write(1, bytes([value]))


# --- PCI -----------------------------------------------------------------------------------------

def test_bus_0_holds_only_an_i440fx_host_bridge():
    _, bus = port_bus()
    assert pci_read(bus, config_address(0, 0, 0, 0)) == 0x1237_8086
    assert pci_read(bus, config_address(0, 0, 0, 8)) >> 8 == 0x060000  # class: bridge, host bridge
    assert pci_read(bus, config_address(0, 0, 0, 0x0C), 1, 2) == 0  # header type 0
    assert pci_read(bus, config_address(0, 0, 0, 0), 2, 2) == 0x1237  # a word at 0xCFE
    found = [(b, d, f) for b in range(4) for d in range(32) for f in range(8)
             if pci_read(bus, config_address(b, d, f, 0)) != 0xFFFF_FFFF]
    assert found == [(0, 0, 0)]
    assert pci_read(bus, config_address(0, 0, 0, 0) & ~(1 << 31)) == 0xFFFF_FFFF  # enable bit clear


def test_config_address_reads_back_and_config_writes_change_nothing():
    _, bus = port_bus()
    bus.write(layout.PCI_CONFIG_PORT, config_address(0, 0, 0, 0x10).to_bytes(4, "little"))
    assert int.from_bytes(bus.read(layout.PCI_CONFIG_PORT, 4), "little") == config_address(0, 0, 0, 0x10)
    bus.write(layout.PCI_CONFIG_PORT + 4, b"\xff\xff\xff\xff")  # a BAR-sizing write: no BARs here
    assert pci_read(bus, config_address(0, 0, 0, 0x10)) == 0
    assert bus.statistics() == {"unclaimed_reads": 0, "unclaimed_writes": 0}


# --- RTC -----------------------------------------------------------------------------------------

def test_rtc_tells_the_clock_in_bcd_24_hour_by_default():
    rtc = CmosRtc(clock=lambda: FIXED)
    assert [rtc_read(rtc, r) for r in (0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00, 0x06)] == \
        [0x20, 0x26, 0x12, 0x04, 0x21, 0x07, 0x09, 6]  # day of week 6 = Friday (1 = Sunday)
    assert rtc_read(rtc, 0x0B) == 0x02 and rtc_read(rtc, 0x0D) == 0x80 and rtc_read(rtc, 0x0C) == 0
    assert rtc_read(rtc, 0x0A) == 0x26  # no update in progress half a second before the next


def test_rtc_binary_and_12_hour_modes_follow_register_b():
    rtc = CmosRtc(clock=lambda: FIXED)
    rtc_write(rtc, 0x0B, 0x06)  # binary, 24-hour
    assert [rtc_read(rtc, r) for r in (0x32, 0x09, 0x04, 0x02)] == [20, 26, 21, 7]
    rtc_write(rtc, 0x0B, 0x00)  # BCD, 12-hour: 21 h is 9 PM
    assert rtc_read(rtc, 0x04) == 0x80 | 0x09


def test_uip_is_set_in_the_last_244_microseconds_of_a_second():
    now = [FIXED - 0.5 + 0.9999]
    rtc = CmosRtc(clock=lambda: now[0])
    assert rtc_read(rtc, 0x0A) & 0x80
    now[0] = FIXED - 0.5 + 0.999
    assert not rtc_read(rtc, 0x0A) & 0x80


def test_setting_the_time_moves_this_rtc_only():
    now = [FIXED]
    rtc = CmosRtc(clock=lambda: now[0])
    rtc_write(rtc, 0x0B, 0x82)  # SET: updates stop while the guest writes
    for register, value in ((0x32, 0x19), (0x09, 0x99), (0x08, 0x12), (0x07, 0x31), (0x04, 0x23), (0x02, 0x59),
                            (0x00, 0x58)):
        rtc_write(rtc, register, value)
    now[0] += 5  # time passes while SET: the registers hold what was written
    assert rtc_read(rtc, 0x00) == 0x58
    rtc_write(rtc, 0x0B, 0x02)  # SET cleared: the clock runs on from the time set
    now[0] += 3
    assert [rtc_read(rtc, r) for r in (0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00)] == \
        [0x20, 0x00, 0x01, 0x01, 0x00, 0x00, 0x01]  # 1999-12-31 23:59:58 + 3 s
    assert CmosRtc(clock=lambda: now[0]).offset == 0


def test_cmos_ram_keeps_what_is_written_and_the_nmi_bit_does_not_change_the_register():
    rtc = CmosRtc(clock=lambda: FIXED)
    rtc_write(rtc, 0x80 | 0x40, 0x5A)  # index with bit 7 (NMI mask) set
    assert rtc_read(rtc, 0x40) == 0x5A
    rtc_write(rtc, 0x0D, 0x00)  # register D is read-only
    assert rtc_read(rtc, 0x0D) == 0x80


def test_cmos_ram_holds_the_memory_sizes_firmware_leaves_there():
    rtc = CmosRtc(clock=lambda: FIXED, mem_size=32 << 20)

    def word(register: int) -> int:
        return rtc_read(rtc, register) | rtc_read(rtc, register + 1) << 8

    assert word(0x15) == 640  # KiB of base memory
    assert word(0x17) == word(0x30) == 31 << 10  # KiB above 1 MiB
    assert word(0x34) == 256  # 64 KiB blocks above 16 MiB
    assert rtc_read(rtc, 0x2E) << 8 | rtc_read(rtc, 0x2F) == sum(rtc_read(rtc, r) for r in range(0x10, 0x2E))
    assert CmosRtc(mem_size=1 << 30).ram[0x17:0x19] == b"\xff\xff"  # at most 0xFFFF KiB


def test_post_codes_are_claimed_and_the_last_reads_back():
    devices, bus = port_bus()
    for code in (0x11, 0x22):
        bus.write(layout.POST_PORT, bytes([code]))
    assert bus.read(layout.POST_PORT, 1) == b"\x22"
    assert devices.post.last == 0x22
    assert bus.statistics() == {"unclaimed_reads": 0, "unclaimed_writes": 0}


# --- the bundled guest ---------------------------------------------------------------------------

RTC_LINE = re.compile(r"^rtc (bcd|bin) (\w\w) (\w\w)-(\w\w)-(\w\w) (\w\w):(\w\w):(\w\w) b (\w\w)", re.M)


@pytest.mark.kvm
def test_pcirtc_finds_the_host_bridge_and_reads_the_host_time(vmsup):
    before = int(time.time())
    proc = vmsup("launch", "pcirtc", "--quiet", "--no-trace")
    after = int(time.time())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pci 00:00.0 8086:1237 class 060000\npci: 01 devices\n"), proc.stdout
    lines = RTC_LINE.findall(proc.stdout)
    assert [line[0] for line in lines] == ["bcd", "bin"]
    for mode, *fields, b in lines:
        values = [int(f, 16) if mode == "bin" else int(f) for f in fields]  # BCD digits read as decimal
        century, year, month, day, hour, minute, second = values
        told = calendar.timegm((century * 100 + year, month, day, hour, minute, second, 0, 0, 0))
        assert before <= told <= after, (proc.stdout, before, after)
        assert b == ("02" if mode == "bcd" else "06")
    assert " d 80\n" in proc.stdout


@pytest.mark.kvm
def test_post_codes_are_in_the_trace_as_port_0x80_writes(vmsup, tmp_path):
    trace = tmp_path / "pcirtc.vmtrace"
    proc = vmsup("launch", "pcirtc", "--quiet", "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    shown = subprocess.run([sys.executable, "-m", "tracetool", "show", str(trace), "--port", "0x80"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    assert re.findall(r"io out port=0x80 size=1 data=(0x\w+)", shown.stdout) == ["0x11", "0x22", "0x33"]
