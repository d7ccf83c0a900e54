"""Snapshots: `vmsup snapshot VM FILE` of a running VM, `vmsup launch GUEST --restore FILE` to go on.

Real KVM, real supervisor and worker processes, real files: a guest is launched in the
background, snapshotted through the control socket, stopped, and restored in a new run whose
trace is compared with the original's.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from tracetool import schema
from tracetool.trace import TraceReader
from vmworker import snapshot_file

DEADLINE = 30.0


def wait_for(condition, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def vm_exits(vmsup, name: str) -> int:
    proc = vmsup("ps", "--json")
    if proc.returncode != 0:
        return 0
    for run in json.loads(proc.stdout):
        for vm in run.get("vms", []):
            if vm.get("name") == name and vm.get("state") == "running":
                return vm.get("exits") or 0
    return 0


def snapshot_running(vmsup, tmp_path, guest: str, ready, *flags: str) -> tuple[str, str, dict]:
    """Launch `guest` in the background, snapshot it once `ready()` holds, stop it: (trace, file, reply)."""
    trace, snap = str(tmp_path / "original.trace"), str(tmp_path / "vm.vmsnap")
    proc = vmsup("launch", guest, "--quiet", "--timeout", "60", "--trace", trace, "--detach", *flags)
    assert proc.returncode == 0, proc.stderr
    try:
        wait_for(ready, f"{guest} to get going")
        proc = vmsup("snapshot", guest, snap, "--json")
        assert proc.returncode == 0, proc.stderr
        reply = json.loads(proc.stdout)
    finally:
        vmsup("stop", "--all")
    wait_for(lambda: vmsup("ps", "--json").stdout.strip() in ("", "[]"), "the run to end")
    return trace, snap, reply


def io_rows(trace: str) -> tuple[np.ndarray, np.ndarray]:
    """(seq, data) of the port writes of VM 0's stream in a trace."""
    with TraceReader(trace) as reader:
        ex = reader.exits(vm=0)
    io = ex["reason"] == schema.REASON_IO
    return ex["seq"][io], ex["data"][io]


@pytest.mark.kvm
def test_seed16_restored_from_a_snapshot_continues_the_uninterrupted_runs_exits(vmsup, tmp_path):
    trace, snap, reply = snapshot_running(vmsup, tmp_path, "seed16", lambda: vm_exits(vmsup, "seed16") > 3000)
    (next_seq,) = reply["next_seq"]
    restored = str(tmp_path / "restored.trace")
    proc = vmsup("launch", "seed16", "--quiet", "--max-exits", "5000", "--trace", restored, "--restore", snap)
    assert proc.returncode == 0, proc.stderr

    seq_a, data_a = io_rows(trace)
    seq_b, data_b = io_rows(restored)
    assert seq_b[0] == next_seq  # the restored stream carries on the snapshot's numbering
    before = data_a[seq_a < next_seq]
    assert int(data_b[0]) == (int(before[-1]) + 1) & 0xFFFF  # the counter goes on from the last recorded exit
    assert np.array_equal(np.diff(data_b.astype(np.int64)) % 0x10000, np.ones(len(data_b) - 1))
    # The uninterrupted run's continuation (it ran on after the snapshot until stopped), exit by exit.
    after = seq_a >= next_seq
    n = min(int(after.sum()), len(data_b))
    assert n > 100
    assert np.array_equal(seq_a[after][:n], seq_b[:n])
    assert np.array_equal(data_a[after][:n], data_b[:n])

    # vmtrace diff compares the restored epoch with the matching range of the original.
    proc = subprocess.run([sys.executable, "-m", "tracetool", "diff", trace, restored, "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    report = json.loads(proc.stdout)
    (span,) = report["restored_ranges"]
    assert span["first_seq"] == next_seq and span["last_seq"] >= next_seq + 100
    assert report["first_divergence"] is None

    proc = subprocess.run([sys.executable, "-m", "tracetool", "info", restored], capture_output=True, text=True,
                          timeout=120)
    assert f"restored from snapshot {snap}" in proc.stdout and f"from seq {next_seq}" in proc.stdout, proc.stdout

    with TraceReader(restored) as reader:
        (start,) = reader.records("vm-start")
        assert start["parent"]["next_seq"] == [next_seq] and start["parent"]["snapshot"] == snap
        assert not reader.unexplained_gaps  # a stream that starts at next_seq is whole


@pytest.mark.kvm
def test_mbkernel_restored_from_a_snapshot_keeps_its_timer_ticking(vmsup, tmp_path):
    console = tmp_path / "original.trace.mbkernel.console"  # launch: TRACE.NAME.console

    def ticks() -> int:
        found = re.findall(rb"tick (\d+)", console.read_bytes()) if console.exists() else []
        return int(found[-1]) if found else 0

    trace, snap, reply = snapshot_running(vmsup, tmp_path, "mbkernel", lambda: ticks() >= 30,
                                          "--cmdline", "maxticks=100000 report=10")
    at_snapshot = ticks()
    proc = vmsup("launch", "mbkernel", "--quiet", "--timeout", "2", "--trace", str(tmp_path / "restored.trace"),
                 "--restore", snap)
    assert "timeout" in proc.stderr, proc.stderr
    restored = [int(n) for n in re.findall(r"tick (\d+)", proc.stdout)]
    # In-kernel PIT, PIC and LAPIC came back: ticks go on from the snapshot's count, not from boot.
    assert len(restored) >= 5, proc.stdout
    assert 30 <= restored[0] <= at_snapshot + 10
    assert restored == list(range(restored[0], restored[0] + 10 * len(restored), 10))
    assert "hello from a multiboot kernel" not in proc.stdout  # no second boot


def _one_line_refusal(proc, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("vmsup: error")]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def _rewrite_header(path, version: int | None = None) -> None:
    data = bytearray(open(path, "rb").read())
    head = snapshot_file._HEADER
    fields = list(head.unpack_from(data))
    if version is not None:
        fields[1] = version
    packed = head.pack(*fields)
    data[:head.size + 4] = packed + struct.pack("<I", zlib.crc32(packed))
    open(path, "wb").write(bytes(data))


def _small_snapshot(tmp_path, mem: int = 1 << 20) -> str:
    path = str(tmp_path / "small.vmsnap")
    snapshot_file.write_snapshot(path, mem, "00" * 32, {"meta": {"next_seq": [0]}, "memory": bytes(mem)})
    return path


def test_snapshot_sections_read_back_as_written(tmp_path):
    path = str(tmp_path / "s.vmsnap")
    memory = bytes(range(256)) * (40 << 12)  # over one compression chunk
    snapshot_file.write_snapshot(path, len(memory), "ab" * 32, {"meta": {"a": [1, 2]}, "memory": memory})
    header, sections = snapshot_file.read_snapshot(path)
    assert (header.version, header.mem_size, header.image_sha256) == (snapshot_file.FORMAT_VERSION, len(memory), "ab" * 32)
    assert sections["memory"] == memory
    assert snapshot_file.unpack_section(path, sections, "meta") == {"a": [1, 2]}


@pytest.mark.parametrize("damage, words", [
    ("foreign", ["not a vmsup snapshot"]),
    ("version", ["format version 99", "reads version 1"]),
    ("section", ["corrupt snapshot", "crc32"]),
    ("truncated", ["corrupt snapshot", "cut short"]),
])
def test_a_damaged_snapshot_file_is_refused_with_one_line(tmp_path, damage, words):
    path = _small_snapshot(tmp_path)
    data = bytearray(open(path, "rb").read())
    if damage == "foreign":
        open(path, "wb").write(b"\x7fELF" + bytes(200))
    elif damage == "version":
        _rewrite_header(path, version=99)
    elif damage == "section":
        data[-5] ^= 0xFF
        open(path, "wb").write(bytes(data))
    else:
        open(path, "wb").write(bytes(data[:-3]))
    with pytest.raises(snapshot_file.SnapshotError) as e:
        snapshot_file.read_snapshot(path)
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


@pytest.mark.kvm
@pytest.mark.parametrize("damage, words", [
    ("foreign", ["--restore", "not a vmsup snapshot"]),
    ("version", ["--restore", "format version 99"]),
    ("memory", ["--restore", "16M", "--mem 32M"]),
    ("section", ["corrupt snapshot", "crc32"]),
])
def test_launch_refuses_a_snapshot_it_cannot_use_before_the_vm_starts(vmsup, tmp_path, damage, words):
    path = _small_snapshot(tmp_path, mem=16 << 20)
    flags = []
    if damage == "foreign":
        open(path, "wb").write(b"not a snapshot at all\n")
    elif damage == "version":
        _rewrite_header(path, version=99)
    elif damage == "memory":
        flags = ["--mem", "32M"]
    else:
        data = bytearray(open(path, "rb").read())
        data[-5] ^= 0xFF
        open(path, "wb").write(bytes(data))
    trace = tmp_path / "t.trace"
    proc = vmsup("launch", "seed16", "--quiet", "--max-exits", "10", "--trace", str(trace), "--restore", path, *flags)
    _one_line_refusal(proc, *words)


def test_device_state_goes_back_into_a_fresh_device_set():
    import io

    from vmworker.devices.console import Console
    from vmworker.devices.serial_input import SerialInput
    from vmworker.devices.standard import StandardDevices

    def fresh() -> StandardDevices:
        return StandardDevices(Console(io.BytesIO(), line_buffered=False), SerialInput.empty(), mem_size=16 << 20)

    before = fresh()
    before.com1.write(3, b"\x83")  # LCR: DLAB on, 8 bits
    before.com1.write(0, b"\x0c")  # divisor 12
    before.vga.write(0, b"\x0e")
    before.vga.write(1, b"\x07")  # cursor high byte
    before.rtc.write(0, b"\x20")
    before.rtc.write(1, b"\x5a")  # a CMOS RAM byte
    before.i8042.write(4, b"\x60")
    before.i8042.write(0, b"\x45")  # command byte
    saved = before.saved_state()
    assert {"com1", "i8042", "rtc", "vga"} <= set(saved)

    after = fresh()
    after.restore_saved_state(saved, "s.vmsnap")
    assert after.saved_state() == saved
    assert (after.com1.lcr, after.com1.dll) == (0x83, 0x0C)
    assert after.vga.regs[0x0E] == 0x07 and after.rtc.ram[0x20] == 0x5A and after.i8042.command_byte == 0x45


def test_a_device_state_that_does_not_fit_is_a_corrupt_snapshot():
    import io

    from vmworker.devices.console import Console
    from vmworker.devices.serial_input import SerialInput
    from vmworker.devices.standard import StandardDevices
    from vmworker.errors import SpecError

    devices = StandardDevices(Console(io.BytesIO(), line_buffered=False), SerialInput.empty())
    with pytest.raises(SpecError, match=r"s.vmsnap: corrupt snapshot \(device rtc: saved ram has the wrong size\)"):
        devices.restore_saved_state({"rtc": {"ram": b"short"}}, "s.vmsnap")


@pytest.mark.kvm
def test_snapshot_of_a_vm_the_run_lacks_is_one_line(vmsup, tmp_path):
    trace = str(tmp_path / "t.trace")
    proc = vmsup("launch", "seed16", "--quiet", "--timeout", "60", "--trace", trace, "--detach")
    assert proc.returncode == 0, proc.stderr
    try:
        wait_for(lambda: vm_exits(vmsup, "seed16") > 0, "seed16 to run")
        proc = vmsup("snapshot", "nosuchvm", str(tmp_path / "s.vmsnap"))
        _one_line_refusal(proc, "nosuchvm")
        proc = vmsup("snapshot", "seed16", str(tmp_path / "no" / "dir" / "s.vmsnap"))
        _one_line_refusal(proc, "no directory")
    finally:
        vmsup("stop", "--all")
    wait_for(lambda: vmsup("ps", "--json").stdout.strip() in ("", "[]"), "the run to end")


# --- --deterministic VMs --------------------------------------------------------------------------

def _interrupts(trace: str) -> list[tuple]:
    with TraceReader(trace) as reader:
        return [(r["at"], r["clock"], r["rip"], r["vector"], r["virtual_ns"])
                for r in reader.records(schema.MSG_INTERRUPT)]


def _vmtrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetool", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.kvm
def test_deterministic_mbkernel_restored_from_a_snapshot_makes_the_uninterrupted_runs_exits_and_ticks(vmsup, tmp_path):
    # mbkernel's timer comes from the user-space PIT on the virtual clock: a restored VM whose PIT,
    # PIC or clock did not come back would tick at other exits.
    trace, snap, reply = snapshot_running(vmsup, tmp_path, "mbkernel", lambda: vm_exits(vmsup, "mbkernel") > 3000,
                                          "--deterministic", "--cmdline", "maxticks=0 report=1000")
    (next_seq,) = reply["next_seq"]
    restored = str(tmp_path / "restored.trace")
    proc = vmsup("launch", "mbkernel", "--deterministic", "--quiet", "--max-exits", "4000", "--trace", restored,
                 "--restore", snap)
    assert proc.returncode == 0, proc.stderr
    assert "hello from a multiboot kernel" not in proc.stdout  # no second boot

    proc = _vmtrace("diff", trace, restored, "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    report = json.loads(proc.stdout)
    (span,) = report["restored_ranges"]
    assert span["first_seq"] == next_seq and span["last_seq"] >= next_seq + 3000
    assert report["first_divergence"] is None

    # The restored epoch's interrupts carry on the original's clock: the same (count, rip, vector).
    original, after = _interrupts(trace), _interrupts(restored)
    assert len(after) > 100 and after[0][0] > 0
    start = original.index(after[0])
    assert original[start:start + len(after)] == after[:len(original) - start]
    assert len(original) - start > 100

    # A rerun of the restored epoch starts from its snapshot and gives each interrupt at its place.
    proc = _vmtrace("rerun", restored, "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    result = json.loads(proc.stdout)
    assert result["identical"] is True and result["exits"] == 4000


@pytest.mark.kvm
def test_a_rerun_of_a_restored_epoch_whose_snapshot_is_gone_or_changed_is_one_line(vmsup, tmp_path):
    trace, snap, reply = snapshot_running(vmsup, tmp_path, "seed16", lambda: vm_exits(vmsup, "seed16") > 1000)
    restored = str(tmp_path / "restored.trace")
    proc = vmsup("launch", "seed16", "--quiet", "--max-exits", "500", "--trace", restored, "--restore", snap)
    assert proc.returncode == 0, proc.stderr
    proc = _vmtrace("rerun", restored, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["identical"] is True, proc.stdout[-2000:]

    data = bytearray(open(snap, "rb").read())
    data[-5] ^= 0xFF
    open(snap, "wb").write(bytes(data))
    proc = _vmtrace("rerun", restored)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has changed since the epoch was restored from it" in proc.stderr + proc.stdout
    import os
    os.unlink(snap)
    proc = _vmtrace("rerun", restored)
    assert proc.returncode == 2 and f"snapshot {snap}, which is gone" in proc.stderr + proc.stdout


@pytest.mark.kvm
def test_a_snapshot_goes_back_only_into_a_vm_of_the_same_determinism(vmsup, tmp_path):
    trace, snap, reply = snapshot_running(vmsup, tmp_path, "mbkernel", lambda: vm_exits(vmsup, "mbkernel") > 500,
                                          "--deterministic", "--cmdline", "maxticks=0")
    proc = vmsup("launch", "mbkernel", "--no-irqchip", "--quiet", "--max-exits", "10", "--no-trace", "--restore", snap)
    _one_line_refusal(proc, "taken with --deterministic")
    proc = vmsup("launch", "mbkernel", "--deterministic", "--rtc-base", "2030-01-01", "--quiet", "--max-exits", "10",
                 "--no-trace", "--restore", snap)
    _one_line_refusal(proc, "RTC started at 2000-01-01T00:00:00", "--rtc-base 2000-01-01T00:00:00")


def test_the_snapshot_a_restored_epoch_names_must_be_that_very_file(tmp_path):
    from vmworker.snapshot import parent_snapshot
    path = str(tmp_path / "whole.vmsnap")
    snapshot_file.write_snapshot(path, 1 << 20, "00" * 32, {"meta": {"next_seq": [7]}, "vcpus": [{}], "devices": {},
                                                             "memory": bytes(1 << 20)})
    sha = snapshot_file.file_sha256(path)
    assert parent_snapshot({"snapshot": path, "sha256": sha}, 1 << 20, "00" * 32).path == path
    for parent, words in [
        ({}, "does not name"),
        ({"snapshot": path}, "did not record its sha256"),
        ({"snapshot": path, "sha256": "ab" * 32}, "has changed since the epoch was restored from it"),
        ({"snapshot": str(tmp_path / "gone.vmsnap"), "sha256": sha}, "which is gone"),
    ]:
        with pytest.raises(snapshot_file.SnapshotError, match=words) as e:
            parent_snapshot(parent, 1 << 20, "00" * 32)
        assert "\n" not in str(e.value)
