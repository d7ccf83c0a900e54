"""--deterministic: a user-space PIC/PIT on a virtual clock, interrupts only at exits, rerun exactly.

Real KVM, real guests: mbkernel (guest/mbkernel.c) programs the PIT at 100 Hz and sleeps in
`sti; hlt` counting ticks; its timer interrupts come from vmworker/deterministic.py here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from supervisor.guests import bundled_guests
from tests.conftest import REPO
from tracetool import schema
from tracetool.trace import TraceReader

pytestmark = pytest.mark.kvm


def vmtrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetool", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_mbkernel_recorded_deterministic_reruns_identical_with_every_tick_in_place(vmsup, tmp_path):
    trace = str(tmp_path / "det.trace")
    proc = vmsup("launch", "mbkernel", "--deterministic", "--cmdline", "maxticks=50", "--quiet", "--trace", trace)
    assert proc.returncode == 0, proc.stderr
    assert "ticks: 50" in proc.stdout
    with TraceReader(trace) as reader:
        interrupts = reader.records(schema.MSG_INTERRUPT)
        spec = reader.records(schema.MSG_VM_START)[0]["spec"]
    assert spec["deterministic"] is True
    ticks = [r for r in interrupts if r["vector"] == 0x20]
    assert len(ticks) >= 50
    assert [r["at"] for r in interrupts] == sorted(r["at"] for r in interrupts)
    for _ in range(2):
        rerun = vmtrace("rerun", trace, "--json")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert json.loads(rerun.stdout)["identical"] is True


def test_a_recording_with_the_in_kernel_pit_diverges_and_names_interrupt_timing(vmsup, tmp_path):
    keys = tmp_path / "enter.keys"
    keys.write_text("Enter\n")
    trace = str(tmp_path / "pit.trace")
    proc = vmsup("launch", "mbkernel", "--keys", str(keys), "--cmdline", "maxticks=50", "--quiet", "--trace", trace)
    assert proc.returncode == 0, proc.stderr
    rerun = vmtrace("rerun", trace, "--json")
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr
    result = json.loads(rerun.stdout)
    assert result["cause"] == "interrupt timing: the in-kernel PIT was in use; record with --deterministic"


@pytest.mark.parametrize("flags, words", [
    (("--vcpus", "2"), "--vcpus 2"),
    (("--record-only", "reason=io"), "--record-only"),
    (("--irqchip",), "--irqchip"),
])
def test_deterministic_refuses_what_it_cannot_honour_before_start(vmsup, flags, words):
    proc = vmsup("launch", "mbkernel", "--deterministic", *flags)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--deterministic" in proc.stderr and words in proc.stderr


# --- the CMOS RTC on the virtual clock --------------------------------------------------------------

RTC_LINE = re.compile(r"^rtc (bcd|bin) (\w\w) (\w\w)-(\w\w)-(\w\w) (\w\w):(\w\w):(\w\w) b", re.M)


def rtc_times(stdout: str) -> list[tuple[int, ...]]:
    """pcirtc's two RTC lines as (century, year, month, day, hour, minute, second), decoded."""
    out = []
    for mode, *fields in RTC_LINE.findall(stdout):
        out.append(tuple(int(f, 16) if mode == "bin" else int(f) for f in fields))  # BCD digits read as decimal
    return out


def port_reads(trace: str, port: int) -> list[int]:
    with TraceReader(trace) as reader:
        ex = reader.exits(vm=0)
    keep = (ex["reason"] == schema.REASON_IO) & (ex["addr"] == port) & (ex["flags"] & schema.FLAG_WRITE == 0)
    return ex["data"][keep].tolist()


def test_two_deterministic_recordings_of_a_guest_reading_the_rtc_make_identical_exits(vmsup, tmp_path):
    # pcirtc waits for the RTC's update-in-progress bit to clear, then reads the time twice (BCD, binary).
    traces = [str(tmp_path / f"rtc{i}.trace") for i in range(2)]
    for trace in traces:
        proc = vmsup("launch", "pcirtc", "--deterministic", "--quiet", "--trace", trace)
        assert proc.returncode == 0, proc.stderr
        assert rtc_times(proc.stdout) == [(20, 0, 1, 1, 0, 0, 0)] * 2  # 2000-01-01 00:00:00, the fixed start
    assert len(port_reads(traces[0], 0x71)) > 10
    assert port_reads(traces[0], 0x71) == port_reads(traces[1], 0x71)
    proc = vmtrace("diff", *traces, "--json")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert json.loads(proc.stdout)["same"] is True
    with TraceReader(traces[0]) as reader:
        assert reader.records(schema.MSG_VM_START)[0]["spec"]["rtc_base"] is None  # the fixed default


def test_rtc_base_sets_the_clock_a_guest_reads_with_and_without_deterministic(vmsup):
    proc = vmsup("launch", "pcirtc", "--deterministic", "--rtc-base", "2031-07-04T12:30:59", "--quiet", "--no-trace")
    assert proc.returncode == 0, proc.stderr
    assert rtc_times(proc.stdout) == [(20, 31, 7, 4, 12, 30, 59)] * 2
    proc = vmsup("launch", "pcirtc", "--rtc-base", "2031-07-04", "--quiet", "--no-trace")
    assert proc.returncode == 0, proc.stderr
    for time_read in rtc_times(proc.stdout):  # host time runs on from the base: a second or two at most
        assert time_read[:6] == (20, 31, 7, 4, 0, 0) and time_read[6] < 30, proc.stdout


def test_a_bad_rtc_base_is_one_line_before_start(vmsup):
    proc = vmsup("launch", "pcirtc", "--rtc-base", "2031-17-04")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--rtc-base" in proc.stderr and "2031-17-04" in proc.stderr


# --- keys and serial input: no host timing --------------------------------------------------------

def test_mbkernel_with_a_key_script_records_the_same_exits_twice_and_reruns_identical_10_times(vmsup, tmp_path):
    # The script is typed at exits on the virtual clock and IRQ 1 goes through the user-space PIC:
    # where each key lands depends on the guest's work only.
    keys = tmp_path / "typing.keys"
    keys.write_text('Enter\nwait:50\ntext:"ab"\nEnter\n')
    traces = [str(tmp_path / f"keys{i}.trace") for i in range(2)]
    for trace in traces:
        proc = vmsup("launch", "mbkernel", "--deterministic", "--keys", str(keys), "--cmdline", "maxticks=100",
                     "--quiet", "--trace", trace)
        assert proc.returncode == 0, proc.stderr
        assert re.search(r"enter at tick \d+\nab\nenter at tick \d+\n", proc.stdout), proc.stdout
    proc = vmtrace("diff", *traces, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["same"] is True, proc.stdout[-2000:]
    with TraceReader(traces[0]) as reader:
        assert 0x21 in {r["vector"] for r in reader.records(schema.MSG_INTERRUPT)}  # IRQ 1, as remapped
    for _ in range(10):
        rerun = vmtrace("rerun", traces[0], "--json")
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr
        assert json.loads(rerun.stdout)["identical"] is True


def test_serial_input_of_a_deterministic_vm_is_read_whole_before_it_starts(vmsup, tmp_path):
    # echo reads COM1 and writes back what it got: with the input all there from the start, two
    # recordings read the same bytes at the same exits.
    text = tmp_path / "in.txt"
    text.write_bytes(b"hello, deterministic world\n")
    traces = [str(tmp_path / f"echo{i}.trace") for i in range(2)]
    for trace in traces:
        proc = vmsup("launch", "echo", "--deterministic", "--serial-in", str(text), "--quiet", "--timeout", "20",
                     "--trace", trace)
        assert proc.returncode == 1 and "HELLO, DETERMINISTIC WORLD" in proc.stdout, proc.stdout + proc.stderr  # one line
    proc = vmtrace("diff", *traces, "--json")
    assert json.loads(proc.stdout)["same"] is True, proc.stdout[-2000:]


# Guests that never run long enough to rerun: a malformed image, and the multi-vCPU ones
# (--deterministic runs one vCPU). Every other bundled guest must rerun identical.
_REFUSED = {"mbbadsum": "bad checksum"}
_RUN_FLAGS = {"seed16": ("--max-exits", "20000"), "mbkernel": ("--cmdline", "maxticks=50")}


@pytest.mark.parametrize("guest", sorted(bundled_guests()))
def test_every_bundled_guest_recorded_deterministic_reruns_identical(vmsup, tmp_path, guest):
    trace = tmp_path / "det.trace"
    proc = vmsup("launch", guest, "--deterministic", "--quiet", "--timeout", "20", "--trace", str(trace),
                 *_RUN_FLAGS.get(guest, ()))
    refusal = _REFUSED.get(guest) or ("runs one vCPU" if bundled_guests()[guest].vcpus > 1 else None)
    if refusal:
        assert proc.returncode == 2 and refusal in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        return
    assert trace.exists(), proc.stderr
    rerun = vmtrace("rerun", str(trace), "--json")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    result = json.loads(rerun.stdout)
    with TraceReader(str(trace)) as reader:
        guest_exits = int((reader.exits()["reason"] != schema.REASON_INTR).sum())
    assert result["identical"] is True and result["exits"] == guest_exits > 0
