"""The recorder's memory follows what is live, not how long the run has lasted (issue 11, R6).

A real Recorder (its real events socket, credentials and TraceWriter) takes a VM that restarts
hundreds of times: what it holds per stream and per epoch stays that of the live epoch, while
every count it reports and the trace it writes stay exact. Sizes of the structures are measured,
not time.
"""

from __future__ import annotations

import zmq

from supervisor.recorder import Recorder
from supervisor.runtime import RunDir
from tracetool import messages, schema
from tracetool.bus_credentials import BusKeys
from tracetool.exit_tally import RunTally
from tracetool.trace import TraceReader

EPOCHS = 300
VCPUS = 2
BATCHES = 2  # per stream and epoch
ROWS = 10  # per batch


def _batch(vm: int, vcpu: int, epoch: int, first_seq: int) -> messages.ExitBatch:
    cols = schema.columns_from_rows(bytes(schema.ROW_SIZE * ROWS), ROWS)
    return messages.ExitBatch(vm=vm, vcpu=vcpu, epoch=epoch, first_seq=first_seq, count=ROWS, cols=cols)


class _Feeder:
    """Sends [credential, message] frames on the recorder's real events socket and has the
    recorder take each one off it."""

    def __init__(self, recorder: Recorder, keys: BusKeys, endpoint: str) -> None:
        self.recorder, self.keys = recorder, keys
        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.push.connect(endpoint)

    def send(self, message: messages.Message, supervisor: bool = False) -> None:
        cred = self.keys.supervisor() if supervisor else self.keys.worker(message.vm, message.epoch)
        self.push.send_multipart([cred.frame(), messages.pack(message)])
        if not self.recorder.events.poll(10_000):
            raise AssertionError("the message never reached the recorder's socket")
        self.recorder.receive(self.recorder.events)

    def close(self) -> None:
        self.push.close(linger=0)
        self.context.term()


def _run_epoch(feed: _Feeder, vm: int, epoch: int) -> None:
    feed.send(messages.VmStart(vm=vm, epoch=epoch, name="restarter", vcpus=VCPUS))
    for vcpu in range(VCPUS):
        for b in range(BATCHES):
            feed.send(_batch(vm, vcpu, epoch, b * ROWS))
    feed.send(messages.VmEnd(vm=vm, epoch=epoch, name="restarter", status="halted", exits=VCPUS * BATCHES * ROWS,
                             final_seq=[BATCHES * ROWS] * VCPUS))
    feed.send(messages.Lifecycle(vm=vm, epoch=epoch, event="exit", status="halted", no_record=False), supervisor=True)


def _per_epoch_state(rec: Recorder) -> dict[str, int]:
    return {"streams": len(rec.next_seq), "final_seq": len(rec.final_seq), "started": len(rec.started),
            "ended": len(rec.ended), "exited": len(rec.exited), "cut": len(rec.cut),
            "tally epochs": sum(len(t.epochs) for t in rec.tally.vms.values())}


def test_a_recorder_holds_state_for_live_epochs_only_however_many_have_ended(tmp_path):
    run_path = tmp_path / "run"
    run_path.mkdir(mode=0o700)
    keys = BusKeys.new("memory")
    trace = tmp_path / "t.vmtrace"
    rec = Recorder(RunDir("memory", run_path), str(trace), {"vms": [{"vm_id": 0}]}, keys)
    feed = _Feeder(rec, keys, RunDir("memory", run_path).events_endpoint)
    try:
        held = []
        for epoch in range(EPOCHS):
            _run_epoch(feed, 0, epoch)
            held.append(_per_epoch_state(rec))
        # The last epoch (and only it) is kept whole: a late message may still concern it.
        assert held[-1] == held[9] == {"streams": VCPUS, "final_seq": 1, "started": 1, "ended": 1, "exited": 1,
                                       "cut": 0, "tally epochs": 1}
        assert rec.tally.vm(0).folded.ranges == [(0, EPOCHS - 1)]  # one range, however many epochs
        per_epoch = VCPUS * BATCHES * ROWS
        assert rec.tally.vm(0).exits == EPOCHS * per_epoch  # the counts stay exact
        assert rec.tally.vm(0).to_json()["epochs"] == EPOCHS
        assert rec.stats()["vms"]["0"]["exits"] == EPOCHS * per_epoch

        # A stale batch for an ended epoch changes nothing: it is refused and counted.
        feed.send(_batch(0, 0, 5, BATCHES * ROWS))
        assert rec.stats()["bad_messages"] == {"exits for an epoch that has ended": 1}
        assert rec.tally.vm(0).exits == EPOCHS * per_epoch
        rec.finish([])
    finally:
        feed.close()
        rec.close()
    with TraceReader(trace) as r:
        assert r.closed_cleanly and r.gaps == [] and r.unexplained_gaps == []
        assert r.event_count == EPOCHS * per_epoch
        assert RunTally.from_trace(r).vm(0).exits == EPOCHS * per_epoch


def test_an_ended_epoch_whose_last_batches_never_came_is_declared_and_folded_once_the_vm_restarted(tmp_path):
    run_path = tmp_path / "run"
    run_path.mkdir(mode=0o700)
    keys = BusKeys.new("short")
    trace = tmp_path / "t.vmtrace"
    rec = Recorder(RunDir("short", run_path), str(trace), {"vms": [{"vm_id": 0}]}, keys)
    feed = _Feeder(rec, keys, RunDir("short", run_path).events_endpoint)
    try:
        # Epoch 0's vm-end says its stream reached seq 20; only seqs 0..9 ever arrive.
        feed.send(messages.VmStart(vm=0, epoch=0, name="short", vcpus=1))
        feed.send(_batch(0, 0, 0, 0))
        feed.send(messages.VmEnd(vm=0, epoch=0, name="short", status="halted", exits=2 * ROWS, final_seq=[2 * ROWS]))
        _run_epoch(feed, 0, 1)
        assert rec.stats()["gaps"] == 0  # one restart later a straggler could still be on its way
        _run_epoch(feed, 0, 2)
        assert rec.stats()["gaps"] == 1 and rec.stats()["gap_events"] == ROWS
        assert rec.tally.vm(0).folded.ranges == [(0, 2)] and len(rec.next_seq) == VCPUS
        rec.finish([])
    finally:
        feed.close()
        rec.close()
    with TraceReader(trace) as r:
        assert [(g["epoch"], g["first_missing"], g["count"], g["cause"]) for g in r.gaps] == [
            (0, ROWS, ROWS, "not received before the VM restarted")]
        assert r.unexplained_gaps == []
        assert RunTally.from_trace(r).vm(0).exits == 2 * ROWS + 2 * VCPUS * BATCHES * ROWS
