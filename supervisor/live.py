"""The live viewers' end of the bus: a SUB socket on a run's best-effort live stream.

The recorder republishes every bus message on a PUB socket (`RunDir.live_endpoint`). PUB drops
silently at its high-water mark when a subscriber is slow — that is what keeps a live viewer from
ever slowing a VM (docs/ARCHITECTURE.md, the sockets table) — so a subscriber can only notice loss as a
jump in a stream's sequence numbers. `LiveSubscriber` decodes and validates messages (they are
untrusted bytes: sizes are bounded, malformed messages are counted and skipped) and keeps the
missed-event accounting per stream, stream = (vm, vcpu, epoch).

Library code: returns data, prints nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import zmq

from tracetool import messages, schema

from .runtime import RunDir, pid_alive

# Messages queued on our side before PUB starts dropping for us. A batch is up to ~160 KiB
# (4096 events × 40 B), so this bounds what a stalled viewer holds to a few tens of MiB.
DEFAULT_HWM = 256
# Once every known VM has ended, how long to wait for batches still in flight: a worker's vCPU
# threads and its lifecycle records travel on different sockets, so the last batches may arrive
# after vm-end. Whatever has not arrived by then is counted as missed.
END_DRAIN_SECONDS = 0.5
# How often to look at the run directory (a stat and a small read) to see if the run is gone.
RUN_CHECK_SECONDS = 0.5
# Most messages taken per poll() call, so a flood cannot keep a caller from its other duties.
MAX_MESSAGES_PER_POLL = 1024


def live_socket(context: zmq.Context, run_dir: RunDir, hwm: int = DEFAULT_HWM) -> zmq.Socket:
    """A SUB socket on the run's live stream, every message, at most `hwm` queued for us."""
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, hwm)
    socket.setsockopt(zmq.LINGER, 0)
    # A peer sending more than this is disconnected by ZeroMQ before we ever buffer it.
    messages.BUS.apply(socket)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    # Connecting to an ipc path that does not exist yet is fine: ZeroMQ retries, so a viewer
    # may attach before the recorder has bound its socket.
    socket.connect(run_dir.live_endpoint)
    return socket


@dataclass
class StreamState:
    """What we saw of one (vm, vcpu, epoch) stream."""

    next_seq: int  # sequence number we expect next
    events: int = 0  # events received (rows; a record-time filter may have dropped some)
    missed: int = 0  # sequence numbers skipped: events PUB dropped for us
    recorded_gaps: int = 0  # events the recording itself lost (gap records), not counted as missed


@dataclass
class VmState:
    vm: int
    epoch: int
    name: str = ""
    vcpus: int | None = None
    start_seen: bool = False  # vm-start of this epoch seen: its streams count from seq 0
    end: dict | None = None  # the vm-end message of this epoch
    ended_at: float = 0.0  # monotonic time we saw vm-end


class LiveSubscriber:
    """Subscribe to a run's live stream; `poll()` returns decoded, validated messages.

    An `exits` message comes back as a dict with "vm", "vcpu", "epoch", "first_seq", "count",
    "rows" (events present; fewer than count when a record-time filter dropped some), "columns"
    ({column: numpy array}, always including "seq"), "payloads" ({row: bytes}) and "missed"
    (events of this stream skipped just before this batch). Other message types come back as
    the validated message map.
    """

    def __init__(self, run_dir: RunDir, hwm: int = DEFAULT_HWM, *, clock=time.monotonic) -> None:
        self.run_dir = run_dir
        self.clock = clock
        self.context = zmq.Context()
        self.socket = live_socket(self.context, run_dir, hwm)
        self.streams: dict[tuple[int, int, int], StreamState] = {}
        self.vms: dict[int, VmState] = {}  # latest epoch of each VM
        # run.json names the run's VMs (vm id = index): their names before any vm-start reaches
        # us, and how many VMs must end before the stream is over.
        names = run_dir.read_info().get("vms")
        self.vm_names: list[str] = [str(n) for n in names] if isinstance(names, list) else []
        self.received = 0  # valid messages
        self.events = 0  # events received, all streams
        self.missed_total = 0
        self.malformed = 0
        self.last_malformed = ""  # why the last malformed message was rejected
        self._run_checked_at = -RUN_CHECK_SECONDS
        self._run_gone = False
        self._trailing_done = False

    # --- receiving ------------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> list[dict]:
        """Wait up to timeout_ms for messages; return every valid one queued (bounded per call)."""
        out: list[dict] = []
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return out
        for _ in range(MAX_MESSAGES_PER_POLL):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            msg = self._decode(frames)
            if msg is not None:
                out.append(msg)
        return out

    def _reject(self, why: str) -> None:
        self.malformed += 1
        self.last_malformed = why

    def _decode(self, frames: list[bytes]) -> dict | None:
        if len(frames) != 1:
            self._reject(f"{len(frames)} frames, expected 1")
            return None
        try:
            msg = messages.unpack(frames[0])
            if isinstance(msg, messages.ExitBatch):
                result = self._on_exits(msg)
            elif isinstance(msg, messages.VmStart):
                result = self._on_vm_start(msg)
            elif isinstance(msg, messages.VmEnd):
                result = self._on_vm_end(msg)
            elif isinstance(msg, messages.Gap):
                result = self._on_gap(msg)
            elif isinstance(msg, messages.Screen):
                result = dict(msg.to_msg(), snapshot=msg.snapshot())
            else:
                result = msg.to_msg()
        except schema.SchemaError as e:
            self._reject(str(e))
            return None
        self.received += 1
        return result

    # --- message types --------------------------------------------------------------------

    def _vm(self, vm: int, epoch: int) -> VmState:
        state = self.vms.get(vm)
        if state is None or epoch > state.epoch:
            state = self.vms[vm] = VmState(vm, epoch)
        return state

    def _on_exits(self, batch: messages.ExitBatch) -> dict:
        vm, vcpu, epoch, first_seq, count = batch.vm, batch.vcpu, batch.epoch, batch.first_seq, batch.count
        rows, columns = batch.rows, dict(batch.cols)
        if "seq" not in columns:
            columns["seq"] = np.arange(first_seq, first_seq + count, dtype=np.uint64)
        payloads = {row: data for row, data in batch.payloads or ()}

        state = self._vm(vm, epoch)
        key = (vm, vcpu, epoch)
        stream = self.streams.get(key)
        if stream is None:
            # Attached mid-run, the first batch we see is where we start; after seeing this
            # epoch's vm-start, anything before first_seq was dropped on the way to us.
            start = 0 if state.epoch == epoch and state.start_seen else first_seq
            stream = self.streams[key] = StreamState(next_seq=start)
        missed = max(0, first_seq - stream.next_seq)
        stream.missed += missed
        self.missed_total += missed
        stream.next_seq = max(stream.next_seq, first_seq + count)
        stream.events += rows
        self.events += rows
        return {"type": schema.MSG_EXITS, "vm": vm, "vcpu": vcpu, "epoch": epoch, "first_seq": first_seq,
                "count": count, "rows": rows, "columns": columns, "payloads": payloads, "missed": missed}

    def _on_vm_start(self, start: messages.VmStart) -> dict:
        state = self._vm(start.vm, start.epoch)
        if state.epoch == start.epoch:
            state.start_seen = True
            if start.name is not None:
                state.name = start.name
            if start.vcpus is not None:
                state.vcpus = start.vcpus
        return start.to_msg()

    def _on_vm_end(self, end: messages.VmEnd) -> dict:
        # final_seq: one count per vCPU (absent: the worker died before it could say).
        msg = dict(end.to_msg(), final_seq=end.final_seq_map())
        state = self._vm(end.vm, end.epoch)
        if state.epoch == end.epoch:
            state.end = msg
            state.ended_at = self.clock()
            if end.name is not None and not state.name:
                state.name = end.name
        return msg

    def _on_gap(self, gap: messages.Gap) -> dict:
        vm, vcpu, epoch, first, count = gap.vm, gap.vcpu, gap.epoch, gap.first_missing, gap.count
        key = (vm, vcpu, epoch)
        stream = self.streams.get(key)
        if stream is None:
            state = self.vms.get(vm)
            start = 0 if state is not None and state.epoch == epoch and state.start_seen else first
            stream = self.streams[key] = StreamState(next_seq=start)
        if first >= stream.next_seq:
            # Lost before the recorder: the jump the next batch shows is not ours to report.
            stream.missed += max(0, first - stream.next_seq)
            self.missed_total += max(0, first - stream.next_seq)
            stream.next_seq = first + count
            stream.recorded_gaps += count
        else:
            # The batch after the gap came first and we counted the jump as missed: re-file it.
            moved = min(count, stream.missed)
            stream.missed -= moved
            self.missed_total -= moved
            stream.recorded_gaps += count
        return gap.to_msg()

    # --- the run's end --------------------------------------------------------------------

    def missed_by_stream(self) -> dict[tuple[int, int, int], int]:
        return {key: s.missed for key, s in self.streams.items() if s.missed}

    def run_gone(self) -> bool:
        """The run directory vanished or its supervisor is dead (checked at most every 0.5 s)."""
        now = self.clock()
        if not self._run_gone and now - self._run_checked_at >= RUN_CHECK_SECONDS:
            self._run_checked_at = now
            pid = self.run_dir.read_info().get("pid")
            self._run_gone = not self.run_dir.path.is_dir() or not (isinstance(pid, int) and pid_alive(pid))
        return self._run_gone

    def _unfinished_streams(self, state: VmState):
        """Streams of an ended VM that have not reached their final sequence number."""
        for vcpu, final in state.end["final_seq"].items():
            stream = self.streams.get((state.vm, vcpu, state.epoch))
            start = stream.next_seq if stream else (0 if state.start_seen else None)
            if start is not None and start < final:
                yield (state.vm, vcpu, state.epoch), start, final

    def all_vms_ended(self) -> bool:
        """Every VM we know of has ended and its last batches arrived (or stopped arriving)."""
        if not self.vms or any(vm not in self.vms for vm in range(len(self.vm_names))):
            return False
        now = self.clock()
        for state in self.vms.values():
            if state.end is None:
                return False
            if now - state.ended_at < END_DRAIN_SECONDS and any(True for _ in self._unfinished_streams(state)):
                return False
        return True

    def finished(self) -> str | None:
        """Why the live stream is over ("vms-ended" or "run-gone"), or None while it goes on."""
        if self.all_vms_ended():
            return "vms-ended"
        if self.run_gone():
            return "run-gone"
        return None

    def account_trailing(self) -> list[tuple[tuple[int, int, int], int]]:
        """At the end: the events of ended VMs that never reached us count as missed too."""
        if self._trailing_done:
            return []
        self._trailing_done = True
        added = []
        for state in self.vms.values():
            if state.end is None:
                continue
            for key, start, final in list(self._unfinished_streams(state)):
                stream = self.streams.get(key)
                if stream is None:
                    stream = self.streams[key] = StreamState(next_seq=start)
                stream.missed += final - start
                stream.next_seq = final
                self.missed_total += final - start
                added.append((key, final - start))
        return added

    def statistics(self) -> dict:
        return {"received": self.received, "events": self.events, "missed_total": self.missed_total,
                "malformed": self.malformed,
                "missed": [{"vm": k[0], "vcpu": k[1], "epoch": k[2], "missed": n}
                           for k, n in sorted(self.missed_by_stream().items())]}

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()

    def __enter__(self) -> "LiveSubscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
