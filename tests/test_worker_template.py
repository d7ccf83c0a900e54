"""Workers forked from the pre-imported worker template (vmworker/forkserver.py,
supervisor/worker_template.py), with real processes: a fleet forked and recorded, forked workers
adopted by the supervisor and controlled by signals, kill -9 of the supervisor and of the template.
"""

from __future__ import annotations

import os
import signal

import pytest

from conftest import REPO  # noqa: F401  (tests/ on sys.path, as for the helpers below)
from supervisor.guests import resolve_guest
from supervisor.launch import Launch
from test_supervisor_faults import (children, cli, counts_up_from_zero, gone, launches, lifecycle, ps, recorder_events,  # noqa: F401
                                    recorder_pid, vm_row, wait_for)
from tracetool import schema
from tracetool.trace import TraceReader
from vmworker.spec import VmSpec

pytestmark = pytest.mark.kvm

FORKED = b"vmworker.forkserver"  # a forked worker keeps the template's command line
SPAWNED = b"--spec-json"
TEMPLATE_NAME = "vmsup-template"  # its name once ready, as the README says (ps -o comm)


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def template_pid(supervisor: int, workers: list[int]) -> int:
    found = [pid for pid, cmd in children(supervisor).items() if FORKED in cmd and pid not in workers]
    assert len(found) == 1, children(supervisor)
    return found[0]


def test_a_fleet_of_eight_is_forked_from_a_template_without_threads_and_every_vm_records(tmp_path):
    trace = tmp_path / "fleet.vmtrace"
    guest = resolve_guest("seed16").path
    specs = [VmSpec(name=f"seed16-{i}", guest=guest, vm_id=i, max_exits=1000, quiet=True) for i in range(8)]
    launch = Launch(specs, str(trace), foreground=False)
    launch.start()
    outcome = launch.wait()
    # Each child says how it started: forked, with one thread (the forking one) in the template.
    assert [r.get("worker_start") for r in outcome.results] == [{"forked": True, "template_threads": 1}] * 8
    assert [(r["status"], r["exits"], r["worker_returncode"]) for r in outcome.results] == [("max-exits", 1000, 0)] * 8
    with TraceReader(trace) as r:
        assert r.closed_cleanly and r.gaps == []
        for vm in range(8):  # each VM's guest counted from 0 without a hole, its 1000 port writes all recorded
            counts_up_from_zero(r, vm, 0)
            assert int((r.exits(vm=vm, epoch=0)["reason"] == schema.REASON_IO).sum()) == 1000


def test_forked_workers_are_adopted_by_the_supervisor_and_obey_pause_resume_kill_and_stop(launches, tmp_path):
    trace = tmp_path / "control.vmtrace"
    launch = launches("seed16", "--vms", "2", "-q", "--timeout", "60", "--trace", str(trace))
    rd = launch.run_dir()
    wait_for(lambda: all(recorder_events(rd, vm).get("events", 0) > 0 for vm in (0, 1)), "both VMs' first exits")
    pids = [vm["pid"] for vm in ps(rd)["vms"]]
    for name, pid in zip(("seed16-0", "seed16-1"), pids):
        # Never exec'd (the template's command line), yet the supervisor's own child, named by prctl.
        assert FORKED in cmdline(pid) and SPAWNED not in cmdline(pid)
        assert parent(pid) == launch.pid
        assert comm(pid) == f"vm {name}"
        assert os.getpgid(pid) == pid  # a background worker owns its process group
    assert template_pid(launch.pid, pids) not in pids

    assert cli("pause", "seed16-0").returncode == 0
    samples = [vm_row(rd, "seed16-0")["exits"]]

    def settled():
        samples.append(recorder_events(rd, 0).get("events", 0))
        return len(samples) >= 3 and samples[-1] == samples[-2] == samples[-3]
    wait_for(settled, "the paused VM's count to settle", interval=0.1)
    assert vm_row(rd, "seed16-0")["state"] == "paused"
    assert cli("resume", "seed16-0").returncode == 0
    wait_for(lambda: recorder_events(rd, 0).get("events", 0) > samples[-1], "the count to grow after resume")

    assert cli("kill", "seed16-1").returncode == 0
    wait_for(lambda: vm_row(rd, "seed16-1")["state"] == "stopped", "the killed VM to be stopped")
    assert cli("stop", "seed16-0").returncode == 0
    launch.wait()
    with TraceReader(trace) as r:
        exits = {x["vm"]: x for x in lifecycle(r) if x["event"] == "exit"}
    # The exit status comes from waitpid as for a spawned worker: a signal death is told apart.
    assert (exits[1]["pid"], exits[1]["signal"], exits[1]["code"]) == (pids[1], signal.SIGKILL, None)
    assert (exits[0]["pid"], exits[0]["signal"], exits[0]["status"]) == (pids[0], None, "stopped")
    assert all(gone(pid) for pid in pids)


def test_a_killed_supervisor_leaves_no_forked_worker_and_no_template(launches, tmp_path):
    launch = launches("seed16", "--vms", "2", "-q", "--trace", str(tmp_path / "orphans.vmtrace"))
    rd = launch.run_dir()
    wait_for(lambda: all(recorder_events(rd, vm).get("events", 0) > 0 for vm in (0, 1)), "both VMs' first exits")
    workers = [vm["pid"] for vm in ps(rd)["vms"]]
    assert all(FORKED in cmdline(pid) for pid in workers)
    pids = [*workers, template_pid(launch.pid, workers), recorder_pid(launch.pid)]
    os.kill(launch.pid, signal.SIGKILL)
    launch.proc.wait()
    wait_for(lambda: all(gone(p) for p in pids), "the workers, the template and the recorder to end", timeout=2.0)


def test_a_killed_template_falls_back_to_spawn_is_restarted_and_running_vms_carry_on(launches, tmp_path):
    trace = tmp_path / "template.vmtrace"
    launch = launches("seed16", "--vms", "2", "-q", "--timeout", "60", "--restart", "always",
                      "--backoff-max", "0.5", "--trace", str(trace))
    rd = launch.run_dir()
    wait_for(lambda: all(recorder_events(rd, vm).get("events", 0) > 0 for vm in (0, 1)), "both VMs' first exits")
    first = [vm["pid"] for vm in ps(rd)["vms"]]
    template = template_pid(launch.pid, first)
    os.kill(template, signal.SIGKILL)
    wait_for(lambda: gone(template), "the template to end")

    def restarted(vm: str, epoch: int):
        row = vm_row(rd, vm)
        return row["pid"] if row["epoch"] == epoch and row["pid"] and row["state"] in ("starting", "running") else None

    os.kill(first[0], signal.SIGKILL)  # its restart finds no template: spawned, and the template restarted
    spawned = wait_for(lambda: restarted("seed16-0", 1), "seed16-0's restart")
    assert SPAWNED in cmdline(spawned)
    # seed16-1's worker never depended on the template: same pid, still counting.
    before = recorder_events(rd, 1)["events"]
    wait_for(lambda: recorder_events(rd, 1)["events"] > before, "seed16-1 to carry on")
    assert vm_row(rd, "seed16-1")["pid"] == first[1]

    new_template = wait_for(lambda: next((pid for pid, cmd in children(launch.pid).items()
                                          if FORKED in cmd and pid not in first), None), "a new template")
    assert new_template != template
    wait_for(lambda: comm(new_template) == TEMPLATE_NAME, "the new template to be ready (its name says so)")
    os.kill(spawned, signal.SIGKILL)  # the next restart forks again, from the new template (once ready)
    forked = wait_for(lambda: restarted("seed16-0", 2), "seed16-0's second restart")
    assert FORKED in cmdline(forked) and parent(forked) == launch.pid
    wait_for(lambda: recorder_events(rd, 0).get("epoch") == 2 and recorder_events(rd, 0).get("events", 0) > 0,
             "the forked worker's first exits")
    assert cli("stop", "--all").returncode == 0
    launch.wait()
