"""The recorder's registry of remote runs (supervisor/remote_runs.py): what a remote launch may
say, and how its VMs are kept apart in the trace. Real messages and credentials, no sockets."""

from __future__ import annotations

import time

import pytest

from supervisor.remote_runs import RemoteRuns, RunStart
from tracetool import messages
from tracetool.bus_credentials import BusKeys, CredentialError

ALICE, BOB = "alice-key", "bob-key"  # CURVE client keys (z85 in real life)


def run_start(keys: BusKeys, vms) -> list[bytes]:
    start = RunStart(run=keys.run, secret=bytes.fromhex(keys.secret_hex), vms=[list(v) for v in vms], host="h",
                     t=time.monotonic_ns(), wall=time.time_ns())
    return [keys.supervisor().frame(), messages.pack(start)]


def vm_start(keys: BusKeys, vm: int, name: str, epoch: int = 0) -> list[bytes]:
    msg = messages.VmStart(vm=vm, epoch=epoch, name=name, vcpus=1)
    return [keys.worker(vm, epoch).frame(), messages.pack(msg)]


def test_two_runs_each_with_a_vm_0_get_trace_vm_ids_of_their_own():
    runs = RemoteRuns(owners={}, reserved=set())
    a, b = BusKeys.new("run-a"), BusKeys.new("run-b")
    assert runs.admit(ALICE, *run_start(a, [(0, "seed16-0"), (1, "seed16-1")])) is None
    assert runs.admit(BOB, *run_start(b, [(0, "hello")])) is None
    got = [runs.admit(ALICE, *vm_start(a, 0, "seed16-0")), runs.admit(ALICE, *vm_start(a, 1, "seed16-1")),
           runs.admit(BOB, *vm_start(b, 0, "hello"))]
    assert [(m.vm, m.name) for m in got] == [(0, "seed16-0@run-a"), (1, "seed16-1@run-a"), (2, "hello@run-b")]
    assert got[2].run == {"id": "run-b", "host": "h", "vm": 0}
    assert got[2].to_msg()["run"] == {"id": "run-b", "host": "h", "vm": 0}
    assert runs.to_json() == {"run-a": {"host": "h", "vms": {"0": 0, "1": 1}}, "run-b": {"host": "h", "vms": {"0": 2}}}


def test_trace_vm_ids_skip_those_the_recorder_already_gave_away():
    owners = {0: "a sender without a run"}
    runs = RemoteRuns(owners=owners, reserved={1})
    keys = BusKeys.new("r")
    runs.admit(ALICE, *run_start(keys, [(0, "x")]))
    assert runs.admit(ALICE, *vm_start(keys, 0, "x")).vm == 2
    assert owners[2] == "run r"


@pytest.mark.parametrize("why, forge, cause", [
    ("a run that never registered", lambda a, b: (ALICE, *vm_start(BusKeys.new("ghost"), 0, "x")), "never registered"),
    ("another client's run", lambda a, b: (BOB, *vm_start(a, 0, "x")), "another client registered"),
    ("a VM its run-start did not name", lambda a, b: (ALICE, *vm_start(a, 7, "x")), "did not name"),
    ("a credential made with another secret", lambda a, b: (ALICE, vm_start(BusKeys.new("run-a"), 0, "x")[0],
                                                            vm_start(a, 0, "x")[1]), "did not issue"),
    ("a worker speaking for another VM", lambda a, b: (ALICE, vm_start(a, 1, "x")[0], vm_start(a, 0, "x")[1]),
     "does not own"),
    ("a gap record from a sender", lambda a, b: (ALICE, a.worker(0, 0).frame(), messages.pack(messages.Gap(
        vm=0, vcpu=0, epoch=0, first_missing=0, count=1))), "gap from a sender"),
    ("taking over a run id with another secret", lambda a, b: (BOB, *run_start(BusKeys.new("run-a"), [(0, "x")])),
     "another client registered"),
    ("a run-start signed as a worker", lambda a, b: (ALICE, a.worker(0, 0).frame(), run_start(a, [(0, "x")])[1]),
     "not from its run's supervisor"),
])
def test_remote_messages_a_run_does_not_own_are_refused(why, forge, cause):
    runs = RemoteRuns(owners={}, reserved=set())
    a = BusKeys.new("run-a")
    runs.admit(ALICE, *run_start(a, [(0, "x"), (1, "y")]))
    with pytest.raises(CredentialError, match=cause):
        runs.admit(*forge(a, None))


@pytest.mark.parametrize("vms", [[], [[0, "x"], [0, "y"]], [[-1, "x"]], [["0", "x"]], "0"])
def test_a_run_start_with_bad_vms_is_refused(vms):
    keys = BusKeys.new("r")
    raw = messages.pack(RunStart(run="r", secret=bytes.fromhex(keys.secret_hex), vms=vms))
    with pytest.raises(messages.MessageError, match="vms"):
        RemoteRuns(owners={}, reserved=set()).admit(ALICE, keys.supervisor().frame(), raw)
