"""Bus messages: one frozen dataclass per message, the one place their fields are checked.

Every message on the bus (worker → recorder → live viewers) and every record in a trace is a
msgpack map with "v" (schema.SCHEMA_VERSION), "type" (one of schema.MESSAGE_TYPES) and the
fields of its class. A sender builds the dataclass and sends `to_msg()`; a receiver calls
`decode(msg)` (or `unpack(raw)` for bytes off a socket), which dispatches on "type" to the class's
`from_msg`, the only code that checks the fields (type, range, size) and raises MessageError.

A message carries exactly the fields its sender gave (an explicit None included), so the wire
stays what it was before these classes; a field not given reads as None and is not sent. Only
the fields marked required must be there: old traces and older senders that lack one still decode.

Here: the records of a VM's life (vm-start, vm-end, lifecycle, gaps, screens, keys, interrupts,
its image, kernel counters, refusals) and the registry of every message (MESSAGE_CLASSES, decode,
unpack, pack). Elsewhere: the base class and field checks (message_fields.py), the messages that
carry columns of rows (batch_messages.py), the size bounds of each socket (wire_limits.py). Every
message class is reachable as messages.<Name>.

Adding a message: a class (its fields with their checks, `TYPE`) here or in batch_messages.py, in
MESSAGE_CLASSES, its name in schema.MESSAGE_TYPES, and, if the trace stores it, a block type in
the trace writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import msgpack

from . import schema
from .batch_messages import CoalescedWrites, EmulatedInstructions, ExitBatch, StepBatch
from .message_fields import (  # noqa: F401 (re-exported: messages.Int, messages.MessageError, …)
    _U63, _U64, _VCPU_LIMIT, Bool, Bytes, Cursor, Equals, Int, Map, Message, MessageError, Number, PerVcpu,
    Str, _Check, _epoch, _vcpu, _vm, checked)
from .screen import COLS, ENCODING, ROWS, Snapshot, decode_cells
from .wire_limits import BUS


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
    # True: the worker gave up waiting for its queued batches to leave (vmworker/recording.py
    # DRAIN_BOUND); ZeroMQ cannot say how many were left, the recorder's gap from final_seq counts them.
    undrained: bool | None = checked(Bool())
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
