"""A worker's end under a slow recorder (issue 11, R1): batches a vCPU queued while the recorder
was stopped reach the trace once it resumes — the vm-end goes out only after them, so it can no
longer arrive alone and turn the queued batches into a gap the worker never counted."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.test_supervisor_faults import gone, launches, ps, recorder_pid, wait_for  # noqa: F401 (fixture)
from tracetool import schema
from tracetool.trace import TraceReader
from vmworker.recording import DRAIN_BOUND

pytestmark = pytest.mark.kvm

# How long the recorder stays stopped at most (the fault's length, not a wait for a condition):
# past the VM's end plus the 5 s linger after which a worker used to discard its queued batches,
# and short of the bound a worker now waits for them.
STOPPED_SECONDS = 12.0
assert STOPPED_SECONDS < DRAIN_BOUND


def _stop_the_recorder_while_the_vm_ends(launches, trace, stopped_until_worker_gone) -> tuple[dict, list, int]:
    """seed16 for 100k exits with the recorder SIGSTOPped once the first batch arrived (the worker's
    sockets are connected by then); `stopped_until_worker_gone(worker)` waits while it stays stopped.
    100k exits fit in the worker's queues (publisher.SEND_HWM batches of up to 4096 events) without
    blocking the vCPU, so the VM ends while the recorder is stopped. Returns (vm-end, gaps, events recorded)."""
    launch = launches("seed16", "-q", "--trace", str(trace), "--max-exits", "100000")
    rd = launch.run_dir()
    worker = wait_for(lambda: ps(rd)["vms"][0]["exits"] and ps(rd)["vms"][0]["pid"], "the first batch",
                      interval=0.001)
    recorder = recorder_pid(launch.pid)
    os.kill(recorder, signal.SIGSTOP)
    try:
        stopped_until_worker_gone(worker)
    finally:
        os.kill(recorder, signal.SIGCONT)
    launch.wait()
    with TraceReader(trace) as r:
        assert r.unexplained_gaps == []
        return next(iter(r.records(schema.MSG_VM_END))), list(r.gaps), len(r.exits(vm=0, epoch=0)["seq"])


def test_batches_queued_while_the_recorder_is_stopped_at_the_vms_end_all_reach_the_trace(launches, tmp_path):
    def stopped_a_while(worker):  # the VM runs to its end meanwhile
        stopped_until = time.monotonic() + STOPPED_SECONDS
        wait_for(lambda: time.monotonic() >= stopped_until or gone(worker), "the recorder's stop to last")
    end, gaps, recorded = _stop_the_recorder_while_the_vm_ends(launches, tmp_path / "slow.vmtrace", stopped_a_while)
    assert end["dropped_batches"] == 0, end
    assert gaps == [], gaps
    assert recorded == end["final_seq"][0], end


def test_a_recorder_stopped_past_the_drain_bound_leaves_a_gap_the_worker_says_it_could_not_drain(launches, tmp_path):
    def stopped_until_the_worker_gives_up(worker):  # after DRAIN_BOUND it sends its vm-end and ends
        wait_for(lambda: gone(worker), "the worker to give up on the stopped recorder", timeout=DRAIN_BOUND + 30)
    end, gaps, recorded = _stop_the_recorder_while_the_vm_ends(launches, tmp_path / "stalled.vmtrace",
                                                               stopped_until_the_worker_gives_up)
    assert end["undrained"] is True, end
    assert [(g["first_missing"], g["count"], g["count_known"]) for g in gaps] == [
        (recorded, end["final_seq"][0] - recorded, True)], gaps
