"""Streams belong to their worker (issue 11.1): on a real run, well-formed messages forged on the
real events socket — without a credential, with one this run did not issue, with a worker's own
credential for another VM's stream, a lifecycle record only the supervisor may send, a sequence
number far ahead of what can be in flight — are refused, counted by cause in the recorder's stats
and in the trace's `refused` records, and the real stream stays whole."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgpack
import pytest

from tests.test_bus_messages import EXAMPLES, Run
from tracetool import messages, schema
from tracetool.bus_credentials import CREDENTIAL_ENV, Credential
from tracetool.trace import TraceReader

pytestmark = pytest.mark.kvm


def worker_credential(run: Run) -> bytes:
    """The real worker's credential, as a compromised worker (or anyone of its uid) could read it."""
    for entry in Path("/proc").iterdir():
        try:
            if b"vmworker" not in (entry / "cmdline").read_bytes():
                continue
            env = dict(line.split(b"=", 1) for line in (entry / "environ").read_bytes().split(b"\0") if b"=" in line)
        except (OSError, ValueError):
            continue
        if run.run_dir.run_id.encode() in bytes.fromhex(env.get(CREDENTIAL_ENV.encode(), b"").decode() or ""):
            return bytes.fromhex(env[CREDENTIAL_ENV.encode()].decode())
    raise AssertionError("no worker of this run")


def wire(message: messages.Message) -> bytes:
    return msgpack.packb(message.to_msg(), use_bin_type=True)


def test_messages_for_streams_the_sender_does_not_own_are_refused_recorded_and_harmless(tmp_path):
    run = Run(tmp_path, seconds=6)
    run.wait_for(lambda: (run.stats().get("vms") or {}).get("0", {}).get("events", 0) > 0, "the VM's first exits")
    mine = worker_credential(run)
    cred = Credential.from_frame(mine)
    assert (cred.vm, cred.epoch) == (0, 0)
    stolen_mac = Credential(cred.run, 1, 0, cred.mac).frame()  # vm 0's MAC claimed for vm 1
    far_ahead = dataclasses.replace(EXAMPLES[messages.ExitBatch], vm=0, epoch=0, first_seq=10**9, payloads=None)
    exit_lifecycle = messages.Lifecycle(vm=0, epoch=0, event="exit", status="halted", no_record=True)
    fake_vm = messages.VmStart(vm=77, epoch=0, name="fake", vcpus=1)
    other_vm = dataclasses.replace(far_ahead, vm=1, first_seq=0)
    forged = {  # (frames, the cause the recorder gives)
        "no credential": [wire(far_ahead)],
        "no credential ": [b"not a credential", wire(exit_lifecycle)],
        "a credential this run did not issue": [stolen_mac, wire(other_vm)],
        "exits for a stream the sender does not own": [mine, wire(other_vm)],
        "vm-start for a stream the sender does not own": [mine, wire(fake_vm)],
        "lifecycle 'exit' not from the supervisor": [mine, wire(exit_lifecycle)],
        "sequence jump of more than": [mine, wire(far_ahead)],
    }
    sock = run.context.socket(__import__("zmq").PUSH)
    sock.connect(run.run_dir.events_endpoint)
    for frames in forged.values():
        sock.send_multipart(frames)
    sock.close(linger=30_000)
    run.wait_for(lambda: run.stats().get("refused") == len(forged), f"{len(forged)} refusals")
    causes = run.stats()["bad_messages"]
    for want in forged:
        assert any(c.startswith(want.strip()) for c in causes), (want, causes)
    err = run.finish()
    run.assert_streams_intact()  # seq 0, 1, … to the end, no gap: the 10**9 batch made none
    with TraceReader(run.trace) as r:
        refused = r.records(schema.MSG_REFUSED)
        assert sum(rec["total"] for rec in refused) == len(forged)
        written: dict[str, int] = {}
        for rec in refused:
            for cause, n in rec["causes"].items():
                written[cause] = written.get(cause, 0) + n
        assert written == causes
        assert {rec["vm"] for rec in r.records(schema.MSG_VM_START)} == {0}  # no VM 77
        assert [rec["event"] for rec in r.records(schema.MSG_LIFECYCLE)] == ["spawn", "exit"]
        assert not [rec for rec in r.records(schema.MSG_LIFECYCLE) if rec.get("no_record")]
    assert f"{len(forged)} malformed messages dropped" in err
