"""Bus messages that carry rows as columns: exit batches, single-step batches, and the rows beside
the exits (coalesced writes, emulated instructions).

Each is one stream's (vm, vcpu, epoch) rows, one little-endian byte string per column of its
column table (tracetool/schema.py, tracetool/step_schema.py); from_msg checks every column's size
against the row count. Registered with the other messages in tracetool/messages.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import schema, step_schema
from .message_fields import _U64, Bool, Int, Map, Message, MessageError, _Check, _epoch, _is_int, _vcpu, _vm, checked


def _cols_as_bytes(out: dict, cols: dict) -> dict:
    """The wire map with its columns as bytes (numpy arrays after from_msg; bytes as a sender built them)."""
    out["cols"] = {name: col if isinstance(col, bytes) else col.tobytes() for name, col in cols.items()}
    return out


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
        return _cols_as_bytes(super().to_msg(), self.cols)


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
        return _cols_as_bytes(super().to_msg(), self.cols)

