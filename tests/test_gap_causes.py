"""One cause per gap (issue 11.4): after a worker kill, a recorder kill and a supervisor kill, each
stream that was cut has exactly one count-unknown gap, with the cause of the kill that cut it; a
worker killed before its VM started leaves a vm-end saying it never ran."""

from __future__ import annotations

import os
import signal

import pytest

from tests.test_supervisor_faults import (children, gone, launches, ps, recorder_pid,  # noqa: F401 (fixture)
                                          wait_for)
from tracetool import schema
from tracetool.trace import TraceReader

pytestmark = pytest.mark.kvm


def test_kills_of_worker_recorder_and_supervisor_leave_one_gap_per_cut_with_its_own_cause(launches, tmp_path):
    trace = tmp_path / "cuts.vmtrace"
    launch = launches("seed16", "seed16", "-q", "--trace", str(trace), "--restart", "always", "--backoff-max", "0.1")
    rd = launch.run_dir()
    wait_for(lambda: all(vm["exits"] > 20_000 for vm in ps(rd)["vms"]), "both VMs' exits")
    victim = ps(rd)["vms"][1]
    os.kill(victim["pid"], signal.SIGKILL)  # vm 1 epoch 0: cut by the worker's death
    wait_for(lambda: ps(rd)["vms"][1]["epoch"] == 1 and ps(rd)["vms"][1]["exits"] > victim["exits"] + 20_000,
             "vm 1's restart to run")
    old = recorder_pid(launch.pid)
    os.kill(old, signal.SIGKILL)  # the new recorder must know vm 1 epoch 0 was cut and ended
    wait_for(lambda: any(p != old and b"supervisor.recorder" in cmd for p, cmd in children(launch.pid).items()),
             "a new recorder")
    wait_for(lambda: all(vm["exits"] > 0 for vm in ps(rd)["vms"]), "the new recorder's counts")
    new = recorder_pid(launch.pid)
    workers = [vm["pid"] for vm in ps(rd)["vms"]]
    os.kill(launch.pid, signal.SIGKILL)  # every epoch still running is cut by the recorder's SIGTERM
    launch.proc.wait()
    wait_for(lambda: all(gone(p) for p in (new, *workers)), "the recorder and workers to end")

    with TraceReader(trace) as r:
        assert r.unexplained_gaps == []
        cuts = [g for g in r.gaps if not g["count_known"]]
    by_stream: dict[tuple, list[dict]] = {}
    for g in cuts:
        by_stream.setdefault((g["vm"], g["vcpu"], g["epoch"]), []).append(g)
    assert sorted(by_stream) == [(0, 0, 0), (1, 0, 0), (1, 0, 1)], cuts
    assert all(len(gs) == 1 for gs in by_stream.values()), cuts
    assert by_stream[(1, 0, 0)][0]["cause"].startswith("worker died")
    for key in ((0, 0, 0), (1, 0, 1)):
        assert by_stream[key][0]["cause"].startswith("the recording ended before the VM did"), by_stream[key]


def test_a_worker_killed_before_its_vm_started_leaves_a_record_that_it_never_ran(launches, tmp_path):
    trace = tmp_path / "early.vmtrace"
    launch = launches("seed16", "-q", "--trace", str(trace), "--restart", "always", "--backoff-max", "0.1",
                      "--max-exits", "1000")
    rd = launch.run_dir()
    # The worker spends a while importing before its vm-start: a kill as soon as its pid shows lands first.
    pid = wait_for(lambda: ps(rd)["vms"][0]["pid"], "the first worker's pid", interval=0.001)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: ps(rd)["vms"][0]["epoch"] >= 1, "the restart")
    launch.kill()  # --restart always: the run goes on until stopped
    with TraceReader(trace) as r:
        started = {rec["epoch"] for rec in r.records(schema.MSG_VM_START)}
        ends = {rec["epoch"]: rec for rec in r.records(schema.MSG_VM_END)}
    if 0 in started:
        pytest.skip("the kill landed after epoch 0's vm-start this time (the machine was quick)")
    assert ends[0]["status"] == "worker-died"
    assert ends[0]["detail"].endswith("before its VM started: no guest code ran")


def test_a_recorder_killed_while_it_restarts_is_restarted_again(launches, tmp_path):
    trace = tmp_path / "twice.vmtrace"
    launch = launches("seed16", "--max-exits", "300000", "-q", "--trace", str(trace))
    rd = launch.run_dir()
    wait_for(lambda: ps(rd)["vms"][0]["exits"] > 20_000, "the first exits")
    first = recorder_pid(launch.pid)
    os.kill(first, signal.SIGKILL)
    # Kill the new one as soon as it exists: before it has read the trace and said "ready".
    second = wait_for(lambda: next((p for p, cmd in children(launch.pid).items()
                                    if p != first and b"supervisor.recorder" in cmd), None), "a new recorder",
                      interval=0.001)
    os.kill(second, signal.SIGKILL)
    assert launch.wait() == 0, launch.stderr
    assert "could not be restarted" not in launch.stderr
    with TraceReader(trace) as r:
        assert r.closed_cleanly and r.unexplained_gaps == []
        [end] = r.records(schema.MSG_VM_END)
    assert end["exits"] == 300_000
