"""The recorder process: takes event batches from every worker, writes the trace, feeds live views.

    python -m supervisor.recorder_process --run-dir DIR [--trace PATH] [--run-meta JSON]
    vmsup record --listen tcp://HOST:PORT --trace PATH   (standalone: supervisor/record_cli.py)

Workers PUSH msgpack messages (tracetool.messages) to the run's events socket, each after its
sender's credential (tracetool/bus_credentials.py). The recorder checks each one (bounded by
messages.BUS, then its message class's from_msg, then that its sender owns the stream), keeps per-stream
sequence numbers, writes an explicit gap record for any sequence it never received, writes blocks
to the trace file, and republishes every valid message on the live PUB socket, where slow viewers
may drop but never slow anyone. Refused messages are counted by cause in `stats` and in the
trace's `refused` records. A control REP
socket answers supervisor.commands.RECORDER_COMMANDS (`stats`; `finish`: drain, close the file, exit).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from tracetool import messages, schema
from tracetool.exit_tally import RunTally
from tracetool.bus_credentials import BusKeys, CredentialError, check_sender
from tracetool.trace.format import DEFAULT_BLOCK_EVENTS
from vmworker.event_batch import DEFAULT_BATCH_EVENTS
from vmworker.publisher import SEND_HWM
from vmworker.status import End

from .commands import RECORDER_COMMANDS, control_socket, serve_one
from .remote_runs import HandshakeWatch, RemoteRuns, check_first_speaker
from .runtime import RunDir

# Live PUB queue per subscriber before ZeroMQ drops for it (drops are silent by design: viewers
# detect them from sequence numbers).
LIVE_HWM = 1000
# Messages queued on our side per connected sender before its sends block (backpressure; the
# sender's own queue holds more). Bounds what one peer can make us hold: this × messages.BUS.
EVENTS_RCVHWM = 32
# How far a stream's first_seq may run ahead of where it stands: what can be in flight between a
# worker and the trace — the worker's queue and ours (batches), a ZeroMQ pipe's slack, and what a
# killed predecessor held gathered but unwritten (the writer's block, bounded by seqs covered).
# A bigger jump is refused, not made a giant gap; a smaller one is an explicit gap.
_PIPE_SLACK_BATCHES = 16
MAX_SEQ_JUMP = (SEND_HWM + EVENTS_RCVHWM + _PIPE_SLACK_BATCHES) * DEFAULT_BATCH_EVENTS + 2 * DEFAULT_BLOCK_EVENTS
# On `finish`: wait for announced events at most this long, and stop early after this much quiet.
FINISH_DEADLINE = 5.0
FINISH_QUIET = 0.2
WRITER_FLUSH_SECONDS = 1.0


class BadMessage(ValueError):
    """A well-formed message the recorder refuses in its context (e.g. a sequence overlap)."""


class VmStats:
    """What the recorder has seen of one VM (all epochs), for status tables."""

    def __init__(self, vm: int) -> None:
        self.vm = vm
        self.name = f"vm{vm}"
        self.state = "starting"
        self.events = 0
        # Sequence numbers its batches covered: every exit counted, kept or filtered out by
        # --record-only, so "no exit for a while" (supervisor/quiet.py) is not fooled by a filter.
        self.covered = 0
        self.by_reason: dict[str, int] = {}
        self.last: dict | None = None
        self.epoch = 0

    def to_json(self) -> dict:
        return {"vm": self.vm, "name": self.name, "state": self.state, "events": self.events,
                "covered": self.covered, "by_reason": self.by_reason, "last": self.last, "epoch": self.epoch}


class Recorder:
    def __init__(self, run_dir: RunDir, trace_path: str | None, run_meta: dict, bus_keys: BusKeys,
                 writer_factory=None, listen: str | None = None, keys_dir: str | None = None,
                 resume: bool = False, watch_handshakes: bool = False) -> None:
        self.bus_keys = bus_keys
        self.context = zmq.Context()
        self.events = self.context.socket(zmq.PULL)
        self.events.setsockopt(zmq.RCVHWM, EVENTS_RCVHWM)
        messages.BUS.apply(self.events)
        self.events.bind(run_dir.events_endpoint)
        # --listen tcp://…: a second events socket for other hosts, CURVE-only (supervisor/keys.py).
        self.auth = self.remote = None
        if listen:
            from .keys import curve_server
            self.auth, self.remote = curve_server(self.context, zmq.PULL, listen, keys_dir, messages.BUS)
            self.remote.setsockopt(zmq.RCVHWM, EVENTS_RCVHWM)
        # Clients refused at the CURVE handshake (vmsup record): counted like refused messages.
        self.handshakes = HandshakeWatch(self.remote) if self.remote is not None and watch_handshakes else None
        self.event_sockets = [s for s in (self.events, self.remote, self.handshakes and self.handshakes.socket)
                              if s is not None]
        # Remote senders (--listen) are CURVE-authenticated. A remote launch registers its run and
        # its VMs get trace vm ids of their own (supervisor/remote_runs.py); a sender without a run
        # owns the VM ids it first speaks for. This run's own VMs stay the local workers' alone.
        self.local_vms = {v.get("vm_id", i) for i, v in enumerate(run_meta.get("vms") or []) if isinstance(v, dict)}
        self.remote_owners: dict[int, str] = {}
        self.runs = RemoteRuns(self.remote_owners, self.local_vms)
        self.live = self.context.socket(zmq.PUB)
        self.live.setsockopt(zmq.SNDHWM, LIVE_HWM)
        self.live.bind(run_dir.live_endpoint)
        self.control = control_socket(self.context, run_dir.recorder_endpoint)
        self.trace_path = trace_path
        self.writer = None
        self.tally = RunTally()  # every VM's exits, all epochs (tracetool/exit_tally.py)
        prior: dict[str, list[dict]] | None = None  # a resumed trace's records
        if trace_path:
            from tracetool.trace import TraceReader, TraceWriter
            if resume and os.path.exists(trace_path):
                with TraceReader(trace_path) as reader:  # what the predecessors accounted for
                    self.tally = RunTally.from_trace(reader)
                    prior = {kind: reader.records(kind) for kind in
                             (schema.MSG_VM_START, schema.MSG_VM_END, schema.MSG_GAP, schema.MSG_LIFECYCLE)}
                # A restarted recorder continues the file its predecessor left; sequence numbers
                # pick up where the file ends, so whatever died with it becomes a gap record.
                self.writer = TraceWriter(trace_path, resume=True)
                resumed_seq = self.writer.resumed_seq
            else:
                self.writer, resumed_seq = (writer_factory or TraceWriter)(trace_path, run_meta), {}
        else:
            resumed_seq = {}
        self.next_seq: dict[tuple[int, int, int], int] = dict(resumed_seq)
        self.final_seq: dict[tuple[int, int], list[int]] = {}  # (vm, epoch) -> per-vCPU final seq
        # (vm, epoch) -> vCPUs, from vm-start: a worker killed before its first batch still had streams.
        self.started: dict[tuple[int, int], int] = {}
        self.cut: set[tuple[int, int]] = set()  # (vm, epoch) whose streams got a count-unknown gap
        self.exited: set[tuple[int, int]] = set()  # (vm, epoch) the supervisor saw end (lifecycle exit)
        self.ended: set[tuple[int, int]] = set()  # (vm, epoch) with a vm-end record
        if prior is not None:
            self._take_over(prior)
        self.vms: dict[int, VmStats] = {}
        self.events_recorded = 0
        self.batches = 0
        self.bad_messages: dict[str, int] = {}
        self.unwritten_refusals: dict[str, int] = {}  # since the last `refused` record
        self.gaps = self.gap_events = 0  # gap records this recorder wrote, and the events they declared lost
        self.recording_error: str | None = None
        self.finished = False
        self.terminate_requested = False  # set from a SIGTERM handler; serve() then finishes
        for (vm, _vcpu, epoch), covered in resumed_seq.items():
            # A restarted recorder counts what its predecessor wrote, so `ps` and the end line
            # go on from there (sequence numbers covered: exact unless --record-only filtered).
            stats = self._vm(vm)
            stats.events += covered
            stats.epoch = max(stats.epoch, epoch)
            self.events_recorded += covered
        for vm in list(self.tally.vms):
            self._fold_done_epochs(vm)

    def _take_over(self, prior: dict[str, list[dict]]) -> None:
        """What the predecessors wrote decides what this recorder still owes: epochs already cut,
        ended or seen to end get no second gap or vm-end (one cause per gap)."""
        for rec in prior[schema.MSG_VM_START]:
            self.started[(rec["vm"], rec["epoch"])] = rec.get("vcpus") or 1
        for rec in prior[schema.MSG_VM_END]:
            self.ended.add((rec["vm"], rec["epoch"]))
            if rec.get("final_seq") is not None:
                finals = messages.VmEnd.from_msg(rec).final_seq_map()
                self.final_seq[(rec["vm"], rec["epoch"])] = [finals.get(v, 0) for v in range(max(finals, default=-1) + 1)]
        for rec in prior[schema.MSG_GAP]:
            if rec.get("count_known") is False:
                self.cut.add((rec["vm"], rec["epoch"]))
        for rec in prior[schema.MSG_LIFECYCLE]:
            if rec.get("event") == "exit":
                self.exited.add((rec["vm"], rec["epoch"]))
        # Where each stream stands: its blocks and its gaps (a gap may reach past the last block).
        for vm, tally in self.tally.vms.items():
            for epoch, e in tally.epochs.items():
                for vcpu, reached in e.reached.items():
                    key = (vm, vcpu, epoch)
                    self.next_seq[key] = max(self.next_seq.get(key, 0), reached)

    # Messages ------------------------------------------------------------------------------------
    def receive(self, sock) -> None:
        """Take one message off an events socket (zmq.Again when there is none)."""
        if sock is self.remote:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            self.handle([f.bytes for f in frames], remote_key=frames[-1].get("User-Id") or "")
        elif self.handshakes is not None and sock is self.handshakes.socket:
            for cause in self.handshakes.refusals():
                self._refuse(cause)
        else:
            self.handle(sock.recv_multipart(flags=zmq.NOBLOCK, copy=True))

    def handle(self, frames: list[bytes], remote_key: str | None = None) -> None:
        """One message off an events socket: [credential, message] (tracetool/bus_credentials.py),
        or [message] from a CURVE-authenticated remote sender whose public key is `remote_key`, or
        [credential, message] from a remote launch's run (supervisor/remote_runs.py)."""
        raw = frames[-1]
        from_run = remote_key is not None and len(frames) == 2  # a remote launch's (supervisor/remote_runs.py)
        try:
            if from_run:
                msg = self.runs.admit(remote_key, frames[0], raw)  # its run's credential checked, renumbered
                if msg is None:
                    return  # a run-start: the run is registered
            else:
                msg = messages.unpack(raw)
                if isinstance(msg, (messages.Gap, messages.Refused)):  # the recorder's to write, never a sender's
                    raise BadMessage(f"{msg.TYPE} from a sender")
                if remote_key is not None:
                    check_first_speaker(self.remote_owners, self.local_vms, remote_key, msg)
                elif len(frames) != 2:
                    raise CredentialError("no credential")
                else:
                    check_sender(self.bus_keys.verify(frames[0]), msg)
            if isinstance(msg, (messages.ExitBatch, messages.VmStart, messages.VmEnd)) and self._folded(msg.vm, msg.epoch):
                raise BadMessage(f"{msg.TYPE} for an epoch that has ended")  # a stale or replayed message
            if isinstance(msg, messages.ExitBatch):
                self._exits(msg)
            elif isinstance(msg, messages.VmStart):
                self._vm_start(msg)
            elif isinstance(msg, messages.VmEnd):
                self._vm_end(msg)
            elif isinstance(msg, messages.Lifecycle):
                self._lifecycle(msg)
            else:  # a record the recorder only stores (screen, input, …), checked by its class
                self._write(lambda w: w.write_record(msg.TYPE, msg.to_msg()))
        except (BadMessage, schema.SchemaError) as e:
            self._refuse(str(e).split(" (")[0])
            return
        except Exception as e:
            # A message that trips the recorder itself (a bug, or a case no check foresaw) is
            # dropped and counted like any bad message: one message must never end the recording.
            cause = f"recorder error: {type(e).__name__}: {e}"
            if cause not in self.bad_messages:
                print(f"vmsup recorder: dropped a message: {cause}", file=sys.stderr, flush=True)
            self._refuse(cause)
            return
        # Live viewers get a remote run's messages as the trace has them (its trace vm ids).
        self.live.send(messages.pack(msg) if from_run else raw, flags=zmq.NOBLOCK, copy=False)

    def _refuse(self, cause: str) -> None:
        cause = cause[:messages.MAX_CAUSE_LEN]
        if cause not in self.bad_messages and len(self.bad_messages) >= messages.MAX_REFUSAL_CAUSES:
            cause = "other"
        self.bad_messages[cause] = self.bad_messages.get(cause, 0) + 1
        self.unwritten_refusals[cause] = self.unwritten_refusals.get(cause, 0) + 1
        self.tally.refused += 1

    def _write_refusals(self) -> None:
        """Refusals since the last record, as one `refused` record (written at most once per
        flush, so a flood of forgeries costs the trace a record a second, not one per message)."""
        if self.unwritten_refusals:
            record = messages.Refused(causes=self.unwritten_refusals, total=sum(self.unwritten_refusals.values()),
                                      t=time.monotonic_ns(), wall=time.time_ns())
            self.unwritten_refusals = {}
            self._write(lambda w: w.write_record(record.TYPE, record.to_msg()))

    def _vm(self, vm: int) -> VmStats:
        stats = self.vms.get(vm)
        if stats is None:
            stats = self.vms[vm] = VmStats(vm)
        return stats

    def _exits(self, batch: messages.ExitBatch) -> None:
        vm, vcpu, epoch, first_seq, count = batch.vm, batch.vcpu, batch.epoch, batch.first_seq, batch.count
        arrays, rows = batch.cols, batch.rows
        key = (vm, vcpu, epoch)
        expected = self.next_seq.get(key, 0)
        if first_seq < expected:
            raise BadMessage("sequence overlap")
        if first_seq - expected > MAX_SEQ_JUMP:
            raise BadMessage(f"sequence jump of more than {MAX_SEQ_JUMP} events (more than can be in flight)")
        if first_seq > expected:
            self._gap(vm, vcpu, epoch, expected, first_seq - expected, "lost before reaching the recorder")
        self.next_seq[key] = first_seq + count
        self.tally.reached(vm, vcpu, epoch, first_seq + count)
        columns = {name: arrays[name] for name in (*schema.COLUMN_NAMES, schema.HANDLE_COLUMN.name) if name in arrays}
        self._write(lambda w: w.write_exits(vm, vcpu, epoch, first_seq, count, columns,
                                            seq=arrays.get("seq"), payloads=batch.payloads))
        self.events_recorded += rows
        self.batches += 1
        stats = self._vm(vm)
        stats.events += rows
        stats.covered += count
        stats.epoch = epoch
        if stats.state == "starting":
            stats.state = "running"
        if rows:
            reasons = np.bincount(arrays["reason"], minlength=1)
            for code in np.flatnonzero(reasons):
                name = schema.reason_name(code)
                stats.by_reason[name] = stats.by_reason.get(name, 0) + int(reasons[code])
            stats.last = {"reason": schema.reason_name(arrays["reason"][-1]), "addr": int(arrays["addr"][-1]),
                          "vcpu": vcpu, "t_exit": int(arrays["t_exit"][-1])}

    def _vm_start(self, start: messages.VmStart) -> None:
        stats = self._vm(start.vm)
        stats.name = start.name or stats.name
        stats.state = "running"
        stats.epoch = start.epoch
        self.started[(start.vm, start.epoch)] = start.vcpus or 1
        first = start.first_seq()
        for vcpu, n in first.items():  # a restored epoch carries on its snapshot's numbering
            self.next_seq.setdefault((start.vm, vcpu, start.epoch), n)
        self.tally.started(start.vm, start.epoch, start.name, first)
        self._write(lambda w: w.write_record(start.TYPE, start.to_msg()))
        self._fold_done_epochs(start.vm)

    def _vm_end(self, end: messages.VmEnd) -> None:
        if end.final_seq is not None:
            finals = end.final_seq_map()
            self.final_seq[(end.vm, end.epoch)] = [finals.get(vcpu, 0) for vcpu in range(max(finals, default=-1) + 1)]
        self._vm(end.vm).state = end.status or "ended"
        self.ended.add((end.vm, end.epoch))
        self.tally.ended(end.to_msg())
        self._write(lambda w: w.write_record(end.TYPE, end.to_msg()))
        self._fold_done_epochs(end.vm)

    def _lifecycle(self, event: messages.Lifecycle) -> None:
        vm, epoch = event.vm, event.epoch
        stats = self._vm(vm)
        if event.name:
            stats.name = event.name
        if event.event in ("exit", "give-up", "stop"):
            stats.state = event.status or event.event
        if event.event == "exit" and not self._folded(vm, epoch):
            self.exited.add((vm, epoch))
        self._write(lambda w: w.write_record(event.TYPE, event.to_msg()))
        if event.event == "exit" and event.no_record and (vm, epoch) not in self.final_seq:
            # The worker died without saying how far it got: whatever it had not yet flushed is
            # lost, and only the kernel knew how much. Say so explicitly, per stream.
            self._cut(vm, epoch, f"worker died ({event.detail or 'no result'})")

    def _cut(self, vm: int, epoch: int, why: str) -> None:
        """A count-unknown gap at the end of each stream of (vm, epoch): every vCPU its vm-start
        announced (even one whose first batch never came) and every stream seen."""
        if (vm, epoch) in self.cut or self._folded(vm, epoch):
            return  # one cause per gap: the first one to see the cut says why
        streams = {vcpu: 0 for vcpu in range(self.started.get((vm, epoch), 0))}
        streams.update({vcpu: n for (svm, vcpu, sepoch), n in self.next_seq.items() if (svm, sepoch) == (vm, epoch)})
        self.cut.add((vm, epoch))
        if not streams and (vm, epoch) not in self.ended:
            # Killed before its vm-start: no stream to cut, but the epoch was: say it never ran.
            self._vm_end(messages.VmEnd(vm=vm, epoch=epoch, status=str(End.WORKER_DIED),
                                        detail=f"{why} before its VM started: no guest code ran"))
            return
        for vcpu, next_seq in sorted(streams.items()):
            self._gap(vm, vcpu, epoch, next_seq, 0, f"{why}: events after this point were lost, count unknown",
                      count_known=False)
        self._fold_done_epochs(vm)

    # Epochs the recorder is done with --------------------------------------------------------------
    # A VM that restarts all the time makes thousands of epochs in a long run; each one's streams,
    # final sequence numbers and tally would stay for the whole run. Once an epoch is done — its
    # vm-end said how far each stream went and they got there, or its streams were cut — and a later
    # epoch of the VM has begun (its worker is gone, so only a stale message could still name it), its
    # state is folded into the VM's totals (exit_tally.VmTally.fold), and messages that would change
    # it are refused. What is held then follows the live epochs, not the run's length.
    def _folded(self, vm: int, epoch: int) -> bool:
        tally = self.tally.vms.get(vm)
        return tally is not None and epoch in tally.folded

    def _fold_done_epochs(self, vm: int) -> None:
        tally = self.tally.vm(vm)
        latest = tally.last_epoch
        for epoch in [e for e in tally.epochs if e < latest]:
            if not self._epoch_done(vm, epoch):
                # Ended with streams short of its vm-end's final_seq, and the VM has restarted
                # twice since: its worker is long gone, so what never came never will. Say so now.
                if epoch >= latest - 1 or (vm, epoch) not in self.ended:
                    continue
                self._declare_unreceived(vm, epoch, "not received before the VM restarted")
            key = (vm, epoch)
            vcpus = max(len(self.final_seq.get(key, ())), self.started.get(key, 0),
                        max(tally.epochs[epoch].reached, default=-1) + 1)
            for vcpu in range(vcpus):
                self.next_seq.pop((vm, vcpu, epoch), None)
            self.final_seq.pop(key, None)
            self.started.pop(key, None)
            for done in (self.cut, self.exited, self.ended):
                done.discard(key)
            tally.fold(epoch)

    def _declare_unreceived(self, vm: int, epoch: int, why: str) -> None:
        """A gap for each stream of an ended epoch that falls short of its final sequence number."""
        for vcpu, final in enumerate(self.final_seq.get((vm, epoch), ())):
            got = self.next_seq.get((vm, vcpu, epoch), 0)
            if got < final:
                self._gap(vm, vcpu, epoch, got, final - got, why)
                self.next_seq[(vm, vcpu, epoch)] = final

    def _epoch_done(self, vm: int, epoch: int) -> bool:
        key = (vm, epoch)
        if key in self.cut:
            return True
        if key not in self.ended:
            return False
        return all(self.next_seq.get((vm, vcpu, epoch), 0) >= final
                   for vcpu, final in enumerate(self.final_seq.get(key, ())))

    def _gap(self, vm: int, vcpu: int, epoch: int, first_missing: int, count: int, cause: str,
             count_known: bool = True) -> None:
        gap = messages.Gap(vm=vm, vcpu=vcpu, epoch=epoch, first_missing=first_missing, count=count, cause=cause,
                           count_known=count_known)
        self.gaps += 1
        self.gap_events += count
        self.tally.gap(gap.to_msg())
        self._write(lambda w: w.write_record(gap.TYPE, gap.to_msg()))
        self.live.send(messages.pack(gap), flags=zmq.NOBLOCK)

    def _write(self, action) -> None:
        if self.writer is None:
            return
        try:
            action(self.writer)
        except OSError as e:  # disk full and friends: stop recording, keep serving live views
            self._stop_recording(f"{e.strerror or e}")
        except Exception as e:
            from tracetool.trace import TraceWriteError
            if not isinstance(e, TraceWriteError):
                raise
            self._stop_recording(str(e))

    def _stop_recording(self, why: str) -> None:
        self.recording_error = f"recording stopped after {self.events_recorded} events: {why}"
        print(f"vmsup recorder: {self.recording_error}", file=sys.stderr, flush=True)
        try:
            self.writer.close()
        except Exception:
            pass
        self.writer = None

    # Control -------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"events": self.events_recorded, "batches": self.batches, "bad_messages": self.bad_messages,
                "refused": sum(self.bad_messages.values()),
                "gaps": self.gaps, "gap_events": self.gap_events,
                "trace": self.trace_path, "recording_error": self.recording_error, "runs": self.runs.to_json(),
                "vms": {str(vm): {**s.to_json(), "exits": self.tally.vm(vm).exits,
                                  "unclaimed": self.tally.vm(vm).unclaimed} for vm, s in self.vms.items()},
                "tally": self.tally.to_json()}

    def _drain(self, until: float) -> None:
        quiet_since = time.monotonic()
        poller = zmq.Poller()
        for sock in self.event_sockets:
            poller.register(sock, zmq.POLLIN)
        while time.monotonic() < until:
            ready = poller.poll(50)
            if ready:
                for sock, _ in ready:
                    while True:
                        try:
                            self.receive(sock)
                        except zmq.Again:
                            break
                quiet_since = time.monotonic()
            elif self._complete() and time.monotonic() - quiet_since > FINISH_QUIET:
                return

    def _complete(self) -> bool:
        for (vm, epoch), finals in self.final_seq.items():
            for vcpu, final in enumerate(finals):
                if self.next_seq.get((vm, vcpu, epoch), 0) < final:
                    return False
        return True

    def finish(self, ended_without_record: list[messages.VmEnd], cut_unended: str | None = None) -> dict:
        """Drain, account for what never arrived, close the file. cut_unended: the run is ending
        under VMs that have not (the supervisor died): each of their streams gets a gap saying why."""
        self._drain(time.monotonic() + FINISH_DEADLINE)
        if cut_unended:
            seen = {*self.started, *((vm, epoch) for vm, _, epoch in self.next_seq)}
            for vm, epoch in sorted(seen - set(self.final_seq) - self.cut - self.exited):
                self._cut(vm, epoch, cut_unended)
        for vm, epoch in list(self.final_seq):
            self._declare_unreceived(vm, epoch, "not received before the recorder closed")
        for end in ended_without_record:  # workers that died without a vm-end record
            if (end.vm, end.epoch) not in self.ended:
                self._vm_end(end)
        self._write_refusals()
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                self.recording_error = f"closing the trace failed: {e.strerror or e}"
            self.writer = None
        self.finished = True
        return self.stats()

    def serve(self) -> None:
        poller = zmq.Poller()
        for sock in (*self.event_sockets, self.control):
            poller.register(sock, zmq.POLLIN)
        next_flush = time.monotonic() + WRITER_FLUSH_SECONDS
        while not self.finished:
            if self.terminate_requested:  # SIGTERM: from PR_SET_PDEATHSIG when the supervisor died
                self.finish([], cut_unended="the recording ended before the VM did (the recorder was terminated)")
                break
            if time.monotonic() >= next_flush:
                # The writer gathers batches into large blocks (better compression); pushing them
                # out once a second bounds what a kill -9 of the recorder can lose.
                self._write_refusals()
                self._write(lambda w: w.flush())
                next_flush = time.monotonic() + WRITER_FLUSH_SECONDS
            for sock, _ in poller.poll(200):
                if sock is not self.control:
                    for _ in range(256):  # bounded, so control requests are never starved
                        try:
                            self.receive(sock)
                        except zmq.Again:
                            break
                else:
                    serve_one(self, self.control, RECORDER_COMMANDS)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.handshakes is not None:
            self.handshakes.close()
        if self.auth is not None:
            self.auth.stop()  # before the context goes: the authenticator's thread has sockets in it
        self.context.destroy(linger=0)

