"""Bus messages: one frozen dataclass per message, the one place their fields are checked.

Every message on the bus (worker → recorder → live viewers) and every record in a trace is a
msgpack map with "v" (schema.SCHEMA_VERSION), "type" (one of schema.MESSAGE_TYPES) and the
fields of its class below. A sender builds the dataclass and sends `to_msg()`; a receiver calls
`decode(msg)` (or `unpack(raw)` for bytes off a socket), which dispatches on "type" to the class's
`from_msg`, the only code that checks the fields (type, range, size) and raises MessageError.

A message carries exactly the fields its sender gave (an explicit None included), so the wire
stays what it was before these classes; a field not given reads as None and is not sent. Only
the fields marked required must be there: old traces and older senders that lack one still decode.

Adding a message: a class here (its fields with their checks, `TYPE`), its name in
schema.MESSAGE_TYPES, and, if the trace stores it, a block type in the trace writer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import msgpack

from . import schema, step_schema
from .screen import COLS, ENCODING, ROWS, Snapshot, decode_cells


from .message_fields import (  # noqa: F401 (re-exported: messages.Int, messages.MessageError, …)
    MAX_BUS_MESSAGE_BYTES, _U63, _U64, _VCPU_LIMIT, ABSENT, Bool, Bytes, Cursor, Equals, Int, Map, MessageError, Number,
    PerVcpu, Str, _Check, _epoch, _is_int, _vcpu, _vm, checked)


# --- Bounds for untrusted bytes ---------------------------------------------------------------
@dataclass(frozen=True)
class WireLimits:
    """How large one message of a socket may be: ZeroMQ drops a peer that sends more before it is
    buffered (ZMQ_MAXMSGSIZE), and msgpack refuses containers and strings that claim more."""

    max_bytes: int
    max_str: int
    max_array: int
    max_map: int

    def apply(self, socket) -> None:
        """Set ZMQ_MAXMSGSIZE on a receiving socket (before bind/connect)."""
        import zmq
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)

    def unpack(self, raw: bytes):
        """Bytes → a msgpack object within these bounds; MessageError otherwise."""
        if len(raw) > self.max_bytes:
            raise MessageError(f"message of more than {self.max_bytes} bytes")
        try:
            # strict_map_key=False: final_seq may be a map keyed by vCPU number (an int).
            return msgpack.unpackb(raw, raw=False, strict_map_key=False, max_bin_len=self.max_bytes,
                                   max_str_len=self.max_str, max_array_len=self.max_array,
                                   max_map_len=self.max_map, max_ext_len=0)
        except Exception as e:  # msgpack raises several unrelated types for bad bytes
            raise MessageError(f"not msgpack ({type(e).__name__})") from None


# The bus (events.sock, the --listen tcp socket, the live stream). A real batch is at most
# 4096 rows × 48 B plus MAX_PAYLOAD_BYTES of string-I/O data; 4 MiB leaves room and keeps what a
# flood can queue in the recorder (EVENTS_RCVHWM messages per peer) small.
MAX_PAYLOAD_BYTES = 2 << 20
BUS = WireLimits(max_bytes=MAX_BUS_MESSAGE_BYTES, max_str=1 << 20, max_array=1 << 16, max_map=1 << 12)
# Control sockets (vmsup ps/stop/…, the recorder's stats/finish): small requests and replies.
CONTROL = WireLimits(max_bytes=1 << 20, max_str=1 << 16, max_array=1 << 12, max_map=1 << 12)

# A VM's key input socket (vmsup screen → worker): {"keys": [name, …]} or {"text": …}.
KEY_INPUT = WireLimits(max_bytes=4096, max_str=4096, max_array=64, max_map=8)

# --- Messages -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """Base: `from_msg` checks every field through its `checked(...)` metadata."""

    TYPE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        # Which fields the sender gave: those go on the wire; the others read as None.
        given = []
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is ABSENT:
                object.__setattr__(self, f.name, None)
            else:
                given.append(f.name)
        object.__setattr__(self, "_given", tuple(given))

    @classmethod
    def from_msg(cls, msg) -> "Message":
        if not isinstance(msg, dict):
            raise MessageError(f"{cls.TYPE} is not a map")
        values = {}
        for f in dataclasses.fields(cls):
            try:
                values[f.name] = f.metadata["check"](f.name, msg.get(f.name, ABSENT))
            except MessageError as e:
                raise MessageError(f"{cls.TYPE}: {e}") from None
        return cls(**values)

    def to_msg(self) -> dict:
        """The wire map: "v", "type" and every field the sender gave."""
        out = {"v": schema.SCHEMA_VERSION, "type": self.TYPE}
        for name in self._given:
            out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class VmStart(Message):
    """A worker's VM is about to run (written before its first batch)."""

    TYPE: ClassVar[str] = schema.MSG_VM_START
    vm: int = _vm()
    epoch: int = _epoch()
    name: str | None = checked(Str())
    spec: dict | None = checked(Map())
    sha256: str | None = checked(Str(max_len=64))
    mem_size: int | None = checked(Int())
    mode: str | None = checked(Str(max_len=32))
    format: str | None = checked(Str(max_len=32))
    vcpus: int | None = checked(Int(lo=1, hi=_VCPU_LIMIT))
    pid: int | None = checked(Int(hi=1 << 32))
    t: int | None = checked(Int())
    wall: int | None = checked(Int())
    # A VM restored from a snapshot (vmsup launch --restore): the snapshot and the epoch it was
    # taken of ({"snapshot", "vm", "name", "epoch", "next_seq", "wall"}); its streams carry on
    # that epoch's sequence numbers from next_seq (per vCPU).
    parent: dict | None = checked(Map())
    # A VM of a remote launch (vmsup record): {"id": its run, "host": its host, "vm": its own vm id}
    # there; the recorder gives it a trace vm id of its own (supervisor/remote_runs.py).
    run: dict | None = checked(Map())

    def first_seq(self) -> dict[int, int]:
        """Per vCPU, the first sequence number of this epoch's streams (0 unless restored)."""
        seqs = (self.parent or {}).get("next_seq")
        if not isinstance(seqs, list):
            return {}
        return {vcpu: n for vcpu, n in enumerate(seqs) if isinstance(n, int) and 0 <= n < 1 << 63}


@dataclass(frozen=True)
class VmEnd(Message):
    """A worker's VM ended (from the worker; from the supervisor when the worker could not say:
    then final_seq is absent)."""

    TYPE: ClassVar[str] = schema.MSG_VM_END
    vm: int = _vm()
    epoch: int = _epoch()
    name: str | None = checked(Str())
    status: str | None = checked(Str(max_len=64))
    guest_code: int | None = checked(Int(lo=-_U63, hi=_U64))
    detail: str | None = checked(Str(max_len=1 << 16))
    registers: dict | None = checked(Map())
    exits: int | None = checked(Int())
    kicks: int | None = checked(Int())
    by_reason: dict | None = checked(Map(counts=True))
    final_seq: list | dict | None = checked(PerVcpu())  # per vCPU: the next sequence number
    filtered_out: int | None = checked(Int())
    dropped_batches: int | None = checked(Int())
    blocked_seconds: float | None = checked(Number())
    unclaimed: dict | None = checked(Map(counts=True))  # port/MMIO accesses no device claimed
    t: int | None = checked(Int())
    wall: int | None = checked(Int())

    def final_seq_map(self) -> dict[int, int]:
        final = self.final_seq or []
        return dict(final.items() if isinstance(final, dict) else enumerate(final))


@dataclass(frozen=True)
class Gap(Message):
    """Events of a stream that never reached the trace (written by the recorder)."""

    TYPE: ClassVar[str] = schema.MSG_GAP
    vm: int = _vm()
    vcpu: int = _vcpu()
    epoch: int = _epoch()
    first_missing: int = checked(Int(required=True, hi=_U64))
    count: int = checked(Int(required=True, hi=_U64))  # 0 with count_known False: unknown
    cause: str | None = checked(Str(max_len=1 << 12))
    count_known: bool | None = checked(Bool())


# From the supervisor, then from the worker's gdb stub (vmworker/gdb/).
# What a worker reports of itself (its gdb stub; its console file reaching console_limit); every
# other lifecycle event is the supervisor's to send (tracetool/bus_credentials.py checks).
WORKER_LIFECYCLE_EVENTS = ("gdb-attach", "gdb-stop", "gdb-continue", "gdb-step", "gdb-detach", "gdb-gone",
                           "console-limit")
LIFECYCLE_EVENTS = ("spawn", "exit", "restart", "give-up", "stop", "pause", "resume", "kill", *WORKER_LIFECYCLE_EVENTS)


@dataclass(frozen=True)
class Lifecycle(Message):
    """What the supervisor did to or saw of a worker."""

    TYPE: ClassVar[str] = schema.MSG_LIFECYCLE
    vm: int = _vm()
    epoch: int = _epoch()
    event: str = checked(Str(required=True, max_len=32, choices=LIFECYCLE_EVENTS))
    name: str | None = checked(Str())
    pid: int | None = checked(Int(hi=1 << 32))
    status: str | None = checked(Str(max_len=64))
    code: int | None = checked(Int(hi=255))  # the worker's exit code
    signal: int | None = checked(Int(hi=255))  # the signal that ended the worker; gdb: the stop signal
    detail: str | None = checked(Str(max_len=1 << 16))
    no_record: bool | None = checked(Bool())  # the worker died without a vm-end
    vcpu: int | None = checked(Int(lo=-1, hi=_VCPU_LIMIT - 1))  # gdb: the vCPU stopped or resumed (-1: all)
    why: str | None = checked(Str(max_len=64))  # gdb-stop: what stopped it (breakpoint, step, …)
    peer: str | None = checked(Str(max_len=256))  # gdb-attach: the debugger's address
    t: int | None = checked(Int())
    wall: int | None = checked(Int())


@dataclass(frozen=True)
class Screen(Message):
    """The VGA text screen, sampled when it changed (tracetool/screen.py has the encoding)."""

    TYPE: ClassVar[str] = schema.MSG_SCREEN
    vm: int = _vm()
    epoch: int = _epoch()
    t: int = checked(Int(required=True))
    cols: int = checked(Equals(required=True, value=COLS), default=COLS)
    rows: int = checked(Equals(required=True, value=ROWS), default=ROWS)
    cursor: list | None = checked(Cursor())
    enc: str | None = checked(Equals(value=ENCODING), default=ENCODING)
    cells: bytes = checked(Bytes(required=True), default=b"")  # zlib of COLS×ROWS (char, attribute) pairs

    @classmethod
    def from_msg(cls, msg) -> "Screen":
        screen = super().from_msg(msg)
        decode_cells(screen.cells)  # raises SchemaError unless exactly one screen's cells
        return screen

    def snapshot(self) -> Snapshot:
        cursor = (self.cursor[0], self.cursor[1]) if self.cursor else None
        return Snapshot(self.vm, self.epoch, self.t, decode_cells(self.cells), cursor, len(self.cells))


@dataclass(frozen=True)
class Input(Message):
    """A key pressed on the VM's keyboard (typed or from a key script)."""

    TYPE: ClassVar[str] = schema.MSG_INPUT
    vm: int = _vm()
    epoch: int = _epoch()
    t: int = checked(Int(required=True))
    key: str = checked(Str(required=True, max_len=64), default="")
    scancodes: bytes = checked(Bytes(required=True, min_len=1, max_len=64), default=b"")  # set 1


# A guest image embedded in a trace: the bundled guests are a few KiB; a record stays under
# schema.MAX_RECORD_BYTES with room for the rest of it.
MAX_EMBEDDED_IMAGE = 768 << 10


INTERRUPT_CLOCKS = ("insns", "exits")


@dataclass(frozen=True)
class Interrupt(Message):
    """An interrupt vector a --deterministic VM's vCPU was given (KVM_INTERRUPT, vmworker/deterministic.py),
    at an exit: `at` is the vCPU's clock then — guest instructions since its start where the run's
    insn_count_exact holds, else guest exits — and `rip` the guest's linear address. A rerun gives
    the same vector at the same (at, rip)."""

    TYPE: ClassVar[str] = schema.MSG_INTERRUPT
    vm: int = _vm()
    vcpu: int = _vcpu()
    epoch: int = _epoch()
    at: int = checked(Int(required=True, hi=_U64), default=0)
    clock: str = checked(Str(required=True, max_len=8, choices=INTERRUPT_CLOCKS), default="insns")
    rip: int = checked(Int(required=True, hi=_U64), default=0)
    vector: int = checked(Int(required=True, hi=255), default=0)
    virtual_ns: int | None = checked(Int(hi=_U64))
    t: int | None = checked(Int())
    wall: int | None = checked(Int())


INSN_COUNTS_PER_RECORD = 4096  # guest exits per insn-counts record (8 bytes each)


@dataclass(frozen=True)
class InsnCounts(Message):
    """The instruction count (the clock of an `interrupt` record, "insns") of a --deterministic vCPU
    at each of its guest exits, `first` being the exit clock's reading of the first one (the
    exits the vCPU loop hands to the clock: kicks and the exit that ends the VM are not among
    them): little-endian int64 each. A rerun compares every exit's count with it (field
    "instructions") and time travel takes its positions from it (vmworker/rerun_loop.py)."""

    TYPE: ClassVar[str] = schema.MSG_INSN_COUNTS
    vm: int = _vm()
    vcpu: int = _vcpu()
    epoch: int = _epoch()
    first: int = checked(Int(required=True, hi=_U64), default=0)
    counts: bytes = checked(Bytes(required=True, max_len=8 * INSN_COUNTS_PER_RECORD), default=b"")
    t: int | None = checked(Int())
    wall: int | None = checked(Int())

    @classmethod
    def from_msg(cls, msg) -> "InsnCounts":
        base = super().from_msg(msg)
        if len(base.counts) % 8:
            raise MessageError(f"{cls.TYPE}: counts is not a whole number of int64s")
        return base


@dataclass(frozen=True)
class VmImage(Message):
    """Everything a re-execution needs that the exits do not carry (written after vm-start): the
    guest image's bytes (absent with --no-embed or when too large: then its path and sha256 only),
    the CPUID table the vCPUs were given and vCPU 0's first registers (vmworker/rerun.py)."""

    TYPE: ClassVar[str] = schema.MSG_VM_IMAGE
    vm: int = _vm()
    epoch: int = _epoch()
    sha256: str = checked(Str(required=True, max_len=64), default="")
    path: str | None = checked(Str(max_len=4096))
    size: int | None = checked(Int())
    image: bytes | None = checked(Bytes(max_len=MAX_EMBEDDED_IMAGE))
    not_embedded: str | None = checked(Str(max_len=200))  # why the bytes are absent
    cpuid: bytes | None = checked(Bytes(max_len=64 << 10))  # kvm_cpuid_entry2 × n, as KVM_SET_CPUID2 took them
    registers: dict | None = checked(Map())  # vCPU 0 before its first instruction (machine.register_dump)
    t: int | None = checked(Int())
    wall: int | None = checked(Int())


@dataclass(frozen=True)
class KvmStats(Message):
    """The kernel's own counters of a VM (vcpu -1) or a vCPU (KVM_GET_STATS_FD), sampled by the
    worker every `stats_interval` seconds: {name as the kernel gives it: value}. The first sample of
    a (vm, epoch, vcpu) holds every counter, later ones only those that changed since the one
    before (a reader carries the others forward); `last` marks the worker's final sample."""

    TYPE: ClassVar[str] = schema.MSG_KVM_STATS
    vm: int = _vm()
    epoch: int = _epoch()
    vcpu: int = checked(Int(required=True, lo=-1, hi=_VCPU_LIMIT - 1), default=-1)
    t: int = checked(Int(required=True), default=0)
    values: dict = checked(Map(required=True, counts=True), default=None)
    last: bool | None = checked(Bool())


@dataclass(frozen=True)
class ExitBatch(Message):
    """Consecutive exit events of one stream (vm, vcpu, epoch), columnar (schema.EXIT_COLUMNS).

    `cols`: {name: little-endian bytes} as sent; after from_msg, numpy arrays viewing them, with
    "seq" only when a record-time filter dropped rows. `payloads`: [[row, bytes], …] — the whole
    data of string I/O (count > 1)."""

    TYPE: ClassVar[str] = schema.MSG_EXITS
    vm: int = _vm()
    vcpu: int = _vcpu()
    epoch: int = _epoch()
    first_seq: int = checked(Int(required=True, hi=(1 << 62) - 1))
    count: int = checked(Int(required=True, hi=schema.MAX_BATCH_EVENTS))  # sequence numbers covered
    cols: dict = checked(Map(required=True))
    payloads: list | None = checked(_Check())

    @property
    def rows(self) -> int:
        """Events present (fewer than count when a record-time filter dropped some)."""
        seq = self.cols.get("seq")
        return self.count if seq is None else len(seq) // 8 if isinstance(seq, bytes) else len(seq)

    @classmethod
    def from_msg(cls, msg) -> "ExitBatch":
        import numpy as np
        base = super().from_msg(msg)
        cols, count, first = base.cols, base.count, base.first_seq
        try:
            seq_raw = cols.get("seq")
            rows = count
            if seq_raw is not None:
                if not isinstance(seq_raw, bytes) or len(seq_raw) % 8:
                    raise MessageError("seq column is not a whole number of u64")
                rows = len(seq_raw) // 8
                if rows > count:
                    raise MessageError(f"more rows than the {count} sequence numbers covered")
            arrays = schema.decode_columns(cols, rows, with_seq=seq_raw is not None)
            seq = arrays.get("seq")
            if seq is not None and rows and (int(seq[0]) < first or int(seq[-1]) >= first + count
                                             or (rows > 1 and not bool(np.all(seq[1:] > seq[:-1])))):
                raise MessageError("seq column outside the batch's range or not increasing")
            payloads = base.payloads
            if payloads is not None:
                if not isinstance(payloads, list) or len(payloads) > schema.MAX_PAYLOADS:
                    raise MessageError("payloads is not a bounded list")
                for item in payloads:
                    if (not isinstance(item, list) or len(item) != 2 or not _is_int(item[0])
                            or not 0 <= item[0] < rows or not isinstance(item[1], bytes)):
                        raise MessageError("a payload is not [row, bytes]")
        except schema.SchemaError as e:
            raise MessageError(f"{cls.TYPE}: {e}") from None
        object.__setattr__(base, "cols", arrays)  # the checked views replace the raw bytes
        return base

    def to_msg(self) -> dict:
        out = super().to_msg()
        out["cols"] = {name: col if isinstance(col, bytes) else col.tobytes() for name, col in self.cols.items()}
        return out


@dataclass(frozen=True)
class _SideRows(Message):
    """A record of rows beside the exits (coalesced writes, emulated instructions): `count` rows of
    each of the class's COLUMNS as little-endian bytes; from_msg checks every column's size. Each
    kind declares its own row bound on `count`."""

    COLUMNS: ClassVar[tuple] = ()
    vm: int = _vm()
    vcpu: int = _vcpu()
    epoch: int = _epoch()
    count: int = checked(Int(required=True, hi=0), default=0)
    cols: dict = checked(Map(required=True), default=None)

    @classmethod
    def from_msg(cls, msg) -> "_SideRows":
        base = super().from_msg(msg)
        for c in cls.COLUMNS:
            raw = base.cols.get(c.name)
            if not isinstance(raw, bytes) or len(raw) != base.count * c.itemsize:
                raise MessageError(f"{cls.TYPE}: column {c.name!r} missing or not {base.count} × {c.itemsize} bytes")
        return base


@dataclass(frozen=True)
class CoalescedWrites(_SideRows):
    """Guest writes a vCPU thread drained from KVM's coalesced ring, in ring order: columns of
    schema.COALESCED_COLUMNS (little-endian bytes, `count` rows each). Not exits (schema.py says why)."""

    TYPE: ClassVar[str] = schema.MSG_COALESCED
    COLUMNS: ClassVar[tuple] = schema.COALESCED_COLUMNS
    count: int = checked(Int(required=True, hi=schema.MAX_COALESCED_ROWS), default=0)


@dataclass(frozen=True)
class EmulatedInstructions(_SideRows):
    """Instructions the VMM's fallback emulator performed for one vCPU, in order: columns of
    schema.EMULATED_COLUMNS (little-endian bytes, `count` rows each). Not exits (schema.py says why)."""

    TYPE: ClassVar[str] = schema.MSG_EMULATED
    COLUMNS: ClassVar[tuple] = schema.EMULATED_COLUMNS
    count: int = checked(Int(required=True, hi=schema.MAX_EMULATED_ROWS), default=0)


# Refusal causes kept apart per record; beyond, they are counted under "other".
MAX_REFUSAL_CAUSES = 64
MAX_CAUSE_LEN = 200


@dataclass(frozen=True)
class Refused(Message):
    """Bus messages the recorder refused since its previous such record, by cause (written by
    the recorder, never taken from a sender): a forged or broken peer leaves a trace."""

    TYPE: ClassVar[str] = schema.MSG_REFUSED
    causes: dict = checked(Map(required=True, counts=True, max_key=MAX_CAUSE_LEN), default=None)
    total: int = checked(Int(required=True), default=0)
    t: int | None = checked(Int())
    wall: int | None = checked(Int())


@dataclass(frozen=True)
class StepBatch(Message):
    """Consecutive single-stepped instructions of one stream (vm, vcpu, epoch), columnar
    (tracetool/step_schema.py). After from_msg, `cols` holds numpy arrays viewing the bytes.
    `initial`: every register before the stream's first instruction (the batch at first_seq 0);
    `insn_emulation`: in the stream's last batch, how far KVM's instruction counter rose while
    stepping (exact only where the run's insn_count_exact says so)."""

    TYPE: ClassVar[str] = schema.MSG_STEPS
    vm: int = _vm()
    vcpu: int = _vcpu()
    epoch: int = _epoch()
    first_seq: int = checked(Int(required=True, hi=(1 << 62) - 1))
    count: int = checked(Int(required=True, hi=step_schema.MAX_STEP_BATCH))
    cols: dict = checked(Map(required=True))
    initial: list | None = checked(_Check())
    last: bool | None = checked(Bool())  # the stream's last batch
    insn_emulation: int | None = checked(Int(hi=_U64))

    @classmethod
    def from_msg(cls, msg) -> "StepBatch":
        base = super().from_msg(msg)
        try:
            arrays = step_schema.decode_step_columns(base.cols, base.count)
        except step_schema.StepSchemaError as e:
            raise MessageError(f"{cls.TYPE}: {e}") from None
        initial = base.initial
        if initial is not None and (not isinstance(initial, list) or len(initial) != len(step_schema.REGISTERS)
                                    or not all(_is_int(v) and 0 <= v <= _U64 for v in initial)):
            raise MessageError(f"{cls.TYPE}: initial is not one u64 per register")
        object.__setattr__(base, "cols", arrays)
        return base

    def to_msg(self) -> dict:
        out = super().to_msg()
        out["cols"] = {name: col if isinstance(col, bytes) else col.tobytes() for name, col in self.cols.items()}
        return out


MESSAGE_CLASSES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (ExitBatch, VmStart, VmEnd, Gap, Lifecycle, Screen, Input, KvmStats, Refused, StepBatch, VmImage,
                              CoalescedWrites, Interrupt, EmulatedInstructions, InsnCounts)}
assert set(MESSAGE_CLASSES) == set(schema.MESSAGE_TYPES), "a message type without its class"


def decode(msg) -> Message:
    """A decoded msgpack map → its message object; MessageError for anything out of shape."""
    if not isinstance(msg, dict):
        raise MessageError("not a map")
    if msg.get("v") != schema.SCHEMA_VERSION:
        raise MessageError(f"schema version {msg.get('v')!r}, expected {schema.SCHEMA_VERSION}")
    cls = MESSAGE_CLASSES.get(msg.get("type"))
    if cls is None:
        raise MessageError(f"unknown message type {str(msg.get('type'))[:32]!r}")
    return cls.from_msg(msg)


def unpack(raw: bytes) -> Message:
    """Bytes off the bus → a message object (bounded by BUS); MessageError otherwise."""
    return decode(BUS.unpack(raw))


def pack(message: Message) -> bytes:
    return msgpack.packb(message.to_msg(), use_bin_type=True)


def validate_record(kind: str, record) -> Message:
    """A trace record of `kind` (its "v"/"type" keys optional) → its message object, checked."""
    cls = MESSAGE_CLASSES.get(kind)
    if cls is None or cls is ExitBatch:
        raise MessageError(f"unknown record kind {kind!r}")
    try:
        return cls.from_msg(record)
    except MessageError as e:
        raise MessageError(f"{kind} record needs fixing: {str(e).removeprefix(kind + ': ')}") from None
