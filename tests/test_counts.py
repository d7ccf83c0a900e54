"""One count of a VM's exits (issue 11.2 and 10.2): ps, the end line and the end-of-run table
agree with the trace's own accounting (`vmtrace info --json`) across epochs and recorder
restarts, an ended VM is counted once, and a killed VM keeps the exits it made."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.test_supervisor_faults import (children, launches, ps, recorder_pid, vm_row,  # noqa: F401 (fixture)
                                          wait_for)
from conftest import REPO
from tracetool import schema
from tracetool.trace import TraceReader

pytestmark = pytest.mark.kvm


def info(trace) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tracetool", "info", str(trace), "--json"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def table_exits(stderr: str, name: str) -> int:
    """The exits cell of a VM's row in the end-of-run table."""
    row = next(line for line in stderr.splitlines() if re.search(rf"[│|]\s*{re.escape(name)}\s*[│|]", line))
    return int(row.split("│")[3].strip().replace(",", ""))


def end_line(stderr: str, trace) -> re.Match:
    line = next(line for line in stderr.splitlines() if line.startswith(f"vmsup: trace {trace}:"))
    m = re.search(r": (\d+) events in \d+ batches, (?:no gaps|(\d+) gaps? \((\d+) events lost(?:, (\d+) cut with the "
                  r"count unknown)?\))", line)
    assert m, line
    return m


def test_end_line_and_table_after_three_recorder_kills_are_the_traces_own_figures(launches, tmp_path):
    trace = tmp_path / "restarts.vmtrace"
    total = 400_000
    launch = launches("seed16", "--vms", "2", "--max-exits", str(total), "-q", "--trace", str(trace))
    rd = launch.run_dir()
    for kill in range(3):
        wait_for(lambda: all(vm["exits"] > (kill + 1) * total // 8 for vm in ps(rd)["vms"]),
                 f"both VMs past {(kill + 1) * total // 8} exits")
        old = recorder_pid(launch.pid)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: any(p != old and b"supervisor.recorder" in cmd and b"--resume" in cmd
                             for p, cmd in children(launch.pid).items()), "a new recorder")
    assert launch.wait() == 0, launch.stderr
    err = launch.stderr
    assert err.count("the recorder died (-9) and was restarted") == 3

    data = info(trace)
    assert data["file"]["closed_cleanly"]
    recorded = data["gaps"]["recorded"]
    m = end_line(err, trace)
    assert int(m.group(1)) == data["events"]["total"]
    assert int(m.group(2) or 0) == len(recorded)
    assert int(m.group(3) or 0) == sum(g["count"] for g in recorded if g.get("count_known", True))
    assert data["gaps"]["unexplained"] == []
    for vm in (0, 1):
        [end] = [v for v in data["vms"] if v["vm"] == vm]
        assert end["exits"] == total
        assert table_exits(err, f"seed16-{vm}") == total


def test_ps_counts_an_ended_vm_once_and_a_killed_vm_keeps_its_exits(launches, tmp_path, vmsup):
    trace = tmp_path / "kill.vmtrace"
    # A third VM keeps the run alive after the kill, so ps can be asked about the killed one.
    launch = launches("hello", "seed16", "seed16", "-q", "--trace", str(trace), "--max-exits", "2000000")
    rd = launch.run_dir()
    hello, killed, other = (vm["name"] for vm in ps(rd)["vms"])
    wait_for(lambda: vm_row(rd, hello)["state"] == "exited", "hello to end")
    wait_for(lambda: vm_row(rd, killed)["exits"] > 50_000, "seed16's exits")
    hello_ps = vm_row(rd, hello)["exits"]
    proc = vmsup("kill", killed)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: vm_row(rd, killed)["state"] == "stopped", "seed16 killed")
    wait_for(lambda: vm_row(rd, killed)["exits"] == data_exits(trace, 1, live=True), "the killed VM's count to settle")
    killed_ps = vm_row(rd, killed)["exits"]
    vmsup("kill", other)
    launch.wait()
    err = launch.stderr
    with TraceReader(trace) as r:
        hello_end = next(e for e in r.records(schema.MSG_VM_END) if e["name"] == hello)
        [seed] = [s for s in r.streams() if s.vm == 1]
        cut = [g for g in r.gaps if g["vm"] == 1]
    assert hello_ps == hello_end["exits"] == table_exits(err, hello) == data_exits(trace, 0)
    # The killed VM: what its stream reached, in ps after the kill, in the table and in the trace.
    assert killed_ps == seed.last_seq + 1 == table_exits(err, killed) == data_exits(trace, 1) > 50_000
    assert len(cut) == 1 and not cut[0]["count_known"]
    assert end_line(err, trace).group(4) == "2"  # both cuts said, not counted as "0 events lost"


def data_exits(trace, vm: int, live: bool = False) -> int:
    """The VM's exits by the trace's own accounting (live: of a file still being written)."""
    from tracetool.exit_tally import RunTally
    with TraceReader(trace) as r:
        return RunTally.from_trace(r).vm(vm).exits


UNCLAIMED = bytes.fromhex(  # real mode: accesses to a port no device claims, then hlt
    "ba3412"  # mov dx, 0x1234
    "ec"  # in al, dx
    "ee"  # out dx, al
    "ee"  # out dx, al
    "f4")  # hlt


def test_unclaimed_accesses_are_in_the_vm_end_the_status_line_summary_info_and_ps(launches, tmp_path, vmsup):
    image = tmp_path / "unclaimed.bin"
    image.write_bytes(UNCLAIMED)
    trace = tmp_path / "u.vmtrace"
    proc = vmsup("launch", str(image), "-q", "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("; unclaimed: 1 port read, 2 port writes")
    with TraceReader(trace) as r:
        [end] = r.records(schema.MSG_VM_END)
    assert end["unclaimed"] == {"pio_unclaimed_reads": 1, "pio_unclaimed_writes": 2,
                                "mmio_unclaimed_reads": 0, "mmio_unclaimed_writes": 0}
    assert info(trace)["vms"][0]["unclaimed"] == end["unclaimed"]
    text = subprocess.run([sys.executable, "-m", "tracetool", "info", str(trace)], cwd=REPO, capture_output=True,
                          text=True).stdout
    assert "vm 0 epoch 0: unclaimed accesses (no device there): 1 port read, 2 port writes" in text
    summary = subprocess.run([sys.executable, "-m", "tracetool", "summary", str(trace)], cwd=REPO,
                             capture_output=True, text=True).stdout
    assert "vm 0: unclaimed accesses (no device there): 1 port read, 2 port writes" in summary

    launch = launches(str(image), "seed16", "-q", "--no-trace")
    rd = launch.run_dir()
    wait_for(lambda: vm_row(rd, "unclaimed")["state"] == "exited", "the unclaimed guest to end")
    assert vm_row(rd, "unclaimed")["unclaimed"] == 3
    proc = vmsup("ps")
    assert "3 unclaimed accesses" in proc.stdout
    vmsup("kill", "--all")
    launch.wait()
