"""`vmsup gdb VM`: a gdb stub opened on a VM that is already running, through the run's control
socket (supervisor/commands.py `Gdb` → GDB_SIGNAL → vmworker/gdb/on_request.py). Real runs, real
workers, Debian's real gdb."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import pytest

from conftest import REPO, VMSUP
from tracetool import schema
from tracetool.trace import TraceReader

GDB_TIMEOUT = 60
DEADLINE = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vmsup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VMSUP, *args], cwd=REPO, capture_output=True, text=True, timeout=GDB_TIMEOUT)


def wait_running(name: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        ps = vmsup("ps", "--json")
        if ps.returncode == 0 and any(vm["name"] == name and vm["state"] == "running"
                                      for run in json.loads(ps.stdout or "[]") for vm in run["vms"]):
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never ran")


@pytest.mark.kvm
@pytest.mark.skipif(shutil.which("gdb") is None, reason="no gdb on PATH (apt-get install gdb)")
def test_vmsup_gdb_opens_a_stub_on_a_running_vm_which_stops_for_gdb_and_runs_on_after_detach(tmp_path):
    trace = tmp_path / "late.vmtrace"
    launch = subprocess.Popen([*VMSUP, "launch", "seed16", "--timeout", "60", "-q", "--serial-in", "none",
                               "--trace", str(trace)], cwd=REPO, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_running("seed16")
        port = free_port()
        opened = vmsup("gdb", "seed16", "--gdb", str(port))
        assert opened.returncode == 0, opened.stderr
        assert f"seed16: gdb stub on 127.0.0.1:{port}: gdb -ex 'target remote 127.0.0.1:{port}'" in opened.stderr
        again = vmsup("gdb", "seed16", "--gdb", str(free_port()))
        assert again.returncode == 0 and f"127.0.0.1:{port} (it already had one)" in again.stderr
        out = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{port}",
                              "-ex", "p/x $pc", "-ex", "stepi", "-ex", "p/x $pc", "-ex", "detach"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=GDB_TIMEOUT).stdout
        pcs = [int(line.split(" = ")[1], 16) for line in out.splitlines() if line.startswith("$")]
        loop = [0x10002, 0x10004, 0x10005]  # the seed's out/inc/jmp (guest/seed16.S)
        assert len(pcs) == 2 and pcs[0] in loop and pcs[1] == loop[(loop.index(pcs[0]) + 1) % 3], out
        assert "detached" in out
        stop = vmsup("stop", "seed16")
        assert stop.returncode == 0, stop.stderr
        launch.communicate(timeout=GDB_TIMEOUT)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    with TraceReader(trace) as reader:
        events = [r["event"] for r in reader.records(schema.MSG_LIFECYCLE)]
        last_exit_t = max(r.t_last for r in reader.exit_blocks() if r.n_rows)
        detach_t = next(r["t"] for r in reader.records(schema.MSG_LIFECYCLE) if r["event"] == "gdb-detach")
    assert "gdb-attach" in events and "gdb-detach" in events
    assert last_exit_t > detach_t  # the VM ran on after gdb left, recorded as before


def test_vmsup_gdb_without_a_running_vm_is_one_line_and_exit_2():
    proc = vmsup("gdb", "seed16")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("vmsup: error: ") and "Traceback" not in proc.stderr
