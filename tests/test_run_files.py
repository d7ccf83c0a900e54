"""A run's files: one mode for all of them (the trace, each VM's console file, a detached
launch's log), and console files bounded by the VM's console_limit (issue 11 items 7, 8)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tracetool.run_files import RUN_FILE_MODE

pytestmark = pytest.mark.kvm

DEADLINE = 30.0


def wait_for(condition, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_of_a_run_is_private_like_the_trace(vmsup, tmp_path):
    old = os.umask(0o022)  # the usual umask: files a run opens without a mode would come out 0644
    try:
        trace = tmp_path / "t.vmtrace"
        (tmp_path / "t.hello.console").write_bytes(b"an earlier run's console, world-readable\n")
        os.chmod(tmp_path / "t.hello.console", 0o644)
        proc = vmsup("launch", "hello", "mmio", "-q", "--detach", "--trace", str(trace))
        assert proc.returncode == 0, proc.stderr
        [log] = tmp_path.glob("vmsup-*.log")
        wait_for(lambda: "summary" in log.read_text(errors="replace"), "the detached run's summary in its log")
    finally:
        os.umask(old)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(["t.vmtrace", "t.hello.console", "t.mmio.console", log.name]), files
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {name: RUN_FILE_MODE for name in files}


def test_a_serial_flood_stops_at_the_console_limit_with_a_note_and_the_trace_keeps_every_byte(vmsup, tmp_path):
    from tests.test_supervisor_faults import SERIAL_FLOOD
    from tracetool import schema
    from tracetool.trace import TraceReader
    from vmworker.devices.console import LIMIT_NOTE

    limit = 16 << 10
    (tmp_path / "flood.bin").write_bytes(SERIAL_FLOOD)
    trace = tmp_path / "t.vmtrace"
    proc = vmsup("launch", str(tmp_path / "flood.bin"), "hello", "-q", "--trace", str(trace),
                 "--console-limit", "16K", "--timeout", "4")
    assert "Traceback" not in proc.stderr, proc.stderr
    console = (tmp_path / "t.flood.console").read_bytes()
    note = LIMIT_NOTE.format(limit=limit).encode()
    assert len(console) == limit + len(note) and console.endswith(note)
    assert console[:limit] == b"A" * limit
    assert (tmp_path / "t.hello.console").read_bytes().startswith(b"Hello")  # the other VM's file is its own
    with TraceReader(trace) as r:
        marks = [rec for rec in r.records(schema.MSG_LIFECYCLE) if rec["event"] == "console-limit"]
        flood = r.exits(vm=0)
    assert [(m["vm"], m["epoch"]) for m in marks] == [(0, 0)]
    assert f"stopped at {limit} bytes" in marks[0]["detail"]
    written = (flood["reason"] == schema.REASON_IO) & (flood["addr"] == 0x3F8)
    assert int(written.sum()) > limit  # every byte is in the trace, past the cap too


def test_console_limit_none_means_no_cap(vmsup, tmp_path):
    from tests.test_supervisor_faults import SERIAL_FLOOD

    (tmp_path / "flood.bin").write_bytes(SERIAL_FLOOD)
    proc = vmsup("launch", str(tmp_path / "flood.bin"), "hello", "-q", "--no-trace", "--console-limit", "none",
                 "--timeout", "2")
    assert "Traceback" not in proc.stderr, proc.stderr
