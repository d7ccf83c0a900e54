"""The live viewers' end of the bus: a SUB socket on a run's best-effort live stream.

The recorder republishes every bus message on a PUB socket (`RunDir.live_endpoint`). PUB drops
silently at its high-water mark when a subscriber is slow — that is what keeps a live viewer from
ever slowing a VM (DESIGN.md, "Delivery and loss") — so a subscriber can only notice loss as a
jump in a stream's sequence numbers. `LiveSubscriber` decodes and validates messages (they are
untrusted bytes: sizes are bounded, malformed messages are counted and skipped) and keeps the
missed-event accounting per stream, stream = (vm, vcpu, epoch).

Library code: returns data, prints nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import msgpack
import numpy as np
import zmq

from tracetool import schema

from .runtime import RunDir

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

_MAX_INT = (1 << 63) - 1


def _unpack(raw: bytes):
    # Bounded like every reader of untrusted bytes: no container or string can claim more than
    # the message itself could hold, no ext types (the schema uses none).
    return msgpack.unpackb(
        raw, raw=False, strict_map_key=False, use_list=True,
        max_bin_len=schema.MAX_MESSAGE_BYTES, max_str_len=1 << 20,
        max_array_len=schema.MAX_BATCH_EVENTS, max_map_len=1 << 16, max_ext_len=0,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _int(msg: dict, key: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    value = msg.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise schema.SchemaError(f"field {key!r} is missing or out of range")
    return value


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
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        # A peer sending more than this is disconnected by ZeroMQ before we ever buffer it.
        self.socket.setsockopt(zmq.MAXMSGSIZE, schema.MAX_MESSAGE_BYTES)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        # Connecting to an ipc path that does not exist yet is fine: ZeroMQ retries, so a viewer
        # may attach before the recorder has bound its socket.
        self.socket.connect(run_dir.live_endpoint)
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
        raw = frames[0]
        if len(raw) > schema.MAX_MESSAGE_BYTES:
            self._reject(f"message of {len(raw)} bytes is too large")
            return None
        try:
            msg = _unpack(raw)
        except Exception as e:  # msgpack raises several types for bad bytes; all mean "malformed"
            self._reject(f"not msgpack: {type(e).__name__}")
            return None
        if not isinstance(msg, dict):
            self._reject("not a map")
            return None
        if msg.get("v") != schema.SCHEMA_VERSION:
            self._reject(f"schema version {msg.get('v')!r}, expected {schema.SCHEMA_VERSION}")
            return None
        kind = msg.get("type")
        try:
            if kind == schema.MSG_EXITS:
                result = self._on_exits(msg)
            elif kind == schema.MSG_VM_START:
                result = self._on_vm_start(msg)
            elif kind == schema.MSG_VM_END:
                result = self._on_vm_end(msg)
            elif kind == schema.MSG_GAP:
                result = self._on_gap(msg)
            elif kind == schema.MSG_SCREEN:
                from tracetool.screen import validate_screen
                result = dict(msg, snapshot=validate_screen(msg))
            elif kind == schema.MSG_INPUT:
                from tracetool.screen import validate_input
                result = validate_input(msg)
            else:
                raise schema.SchemaError(f"unknown message type {kind!r}")
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

    def _on_exits(self, msg: dict) -> dict:
        vm, vcpu, epoch = _int(msg, "vm"), _int(msg, "vcpu"), _int(msg, "epoch")
        first_seq = _int(msg, "first_seq")
        count = _int(msg, "count", 0, schema.MAX_BATCH_EVENTS)
        cols = msg.get("cols")
        if not isinstance(cols, dict):
            raise schema.SchemaError("cols is not a map")
        seq_raw = cols.get("seq")
        if seq_raw is None:
            rows = count
            columns = schema.decode_columns(cols, rows)
            columns["seq"] = np.arange(first_seq, first_seq + count, dtype=np.uint64)
        else:
            # A record-time filter dropped rows: the seq column says which sequence numbers remain.
            if not isinstance(seq_raw, bytes) or len(seq_raw) % 8:
                raise schema.SchemaError("seq column is not a whole number of u64")
            rows = len(seq_raw) // 8
            if rows > count:
                raise schema.SchemaError(f"{rows} rows in a batch covering {count} sequence numbers")
            columns = schema.decode_columns(cols, rows, with_seq=True)
            seq = columns["seq"]
            if rows and (int(seq[0]) < first_seq or int(seq[-1]) >= first_seq + count
                         or (rows > 1 and not bool(np.all(seq[1:] > seq[:-1])))):
                raise schema.SchemaError("seq column outside the batch's range or not increasing")
        payloads = {}
        raw_payloads = msg.get("payloads", [])
        if not isinstance(raw_payloads, list) or len(raw_payloads) > schema.MAX_PAYLOADS:
            raise schema.SchemaError("payloads is not a bounded list")
        for item in raw_payloads:
            if (not isinstance(item, list) or len(item) != 2 or type(item[0]) is not int
                    or not 0 <= item[0] < rows or not isinstance(item[1], bytes)):
                raise schema.SchemaError("a payload is not [row, bytes]")
            payloads[item[0]] = item[1]

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

    def _on_vm_start(self, msg: dict) -> dict:
        vm, epoch = _int(msg, "vm"), _int(msg, "epoch")
        state = self._vm(vm, epoch)
        if state.epoch == epoch:
            state.start_seen = True
            if isinstance(msg.get("name"), str):
                state.name = msg["name"]
            if type(msg.get("vcpus")) is int:
                state.vcpus = msg["vcpus"]
        return msg

    def _on_vm_end(self, msg: dict) -> dict:
        vm, epoch = _int(msg, "vm"), _int(msg, "epoch")
        final = msg.get("final_seq") or []  # None: the worker died before it could say
        # final_seq: one count per vCPU, as a list (index = vcpu) or a map {vcpu: count}.
        items = final.items() if isinstance(final, dict) else enumerate(final) if isinstance(final, list) else None
        if items is None:
            raise schema.SchemaError("final_seq is neither a list nor a map")
        final_seq = {}
        for vcpu, n in items:
            if type(vcpu) is not int or type(n) is not int or vcpu < 0 or not 0 <= n <= _MAX_INT:
                raise schema.SchemaError("final_seq has a bad entry")
            final_seq[vcpu] = n
        state = self._vm(vm, epoch)
        msg = dict(msg, final_seq=final_seq)
        if state.epoch == epoch:
            state.end = msg
            state.ended_at = self.clock()
            if isinstance(msg.get("name"), str) and not state.name:
                state.name = msg["name"]
        return msg

    def _on_gap(self, msg: dict) -> dict:
        vm, vcpu, epoch = _int(msg, "vm"), _int(msg, "vcpu"), _int(msg, "epoch")
        first, count = _int(msg, "first_missing"), _int(msg, "count")
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
        return msg

    # --- the run's end --------------------------------------------------------------------

    def missed_by_stream(self) -> dict[tuple[int, int, int], int]:
        return {key: s.missed for key, s in self.streams.items() if s.missed}

    def run_gone(self) -> bool:
        """The run directory vanished or its supervisor is dead (checked at most every 0.5 s)."""
        now = self.clock()
        if not self._run_gone and now - self._run_checked_at >= RUN_CHECK_SECONDS:
            self._run_checked_at = now
            pid = self.run_dir.read_info().get("pid")
            self._run_gone = not self.run_dir.path.is_dir() or not (isinstance(pid, int) and _alive(pid))
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
