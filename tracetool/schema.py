"""The event schema: the one place that knows field names, types and reason codes.

Version it, and let every file and bus message carry the version: a reader meeting a newer
version refuses clearly instead of misreading (simpletrace's schema drift is the mistake to avoid).

An *exit event* is one return of KVM_RUN to user space on one vCPU. Events travel in
*batches*: one batch = consecutive events of one stream, stream = (vm, vcpu, epoch). Each event's
sequence number is first_seq + its index (or the explicit `seq` column, present when a record-time
filter dropped some events). A batch is columnar: one little-endian packed array per field.

Timing fields (CLOCK_MONOTONIC nanoseconds, comparable across processes):
  t_exit    when KVM_RUN returned
  guest_ns  time inside KVM_RUN for this exit (t_exit - time KVM_RUN was entered)
The handling time of event i is derived, not stored: (t_exit[i+1] - guest_ns[i+1]) - t_exit[i].

EXIT_COLUMNS below is the one definition of an exit event's fields. Everything else is derived
from it: the vCPU loop's packed row (ROW_STRUCT_FORMAT, ROW_SIZE), the row → column slices of a
batch, the numpy dtypes of the bus and the trace file, the header's self-description and the
export columns (EXPORT_COLUMNS).

Adding a field (say `rip`, u64): one Column row in EXIT_COLUMNS with its `missing` value, a
SCHEMA_VERSION bump, and the value passed at its place in the vCPU loop's pack_row calls
(vmworker/vcpu_loop.py; tests/test_schema.py holds those calls against this table). Traces
written before the field existed still read: their blocks lack the column, and the reader fills
it with the column's `missing` value, which means "unknown" wherever the column is shown.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from vmworker import kvm_abi

# 1: the first schema; 2: the rip column (traces of 1 still read, rip unknown); 3: handle_ns in
# filtered batches (traces of 1 and 2 still read; their filtered exits' handling times may be unknown)
SCHEMA_VERSION = 3

# The rip column of an event whose guest address is not known (traces of schema 1).
RIP_UNKNOWN = 0xFFFF_FFFF_FFFF_FFFF


class Column(NamedTuple):
    """One field of an exit event (a tuple, so `SEQ_COLUMN[0]` is its name)."""

    name: str
    dtype: str  # numpy dtype string, little-endian (x86 is)
    code: str  # its struct code in the vCPU loop's packed row (same width as dtype)
    meaning: str
    unit: str  # "ns", "port/gpa", "bytes", "count", "code", "bits", "value"
    # None: every trace has this column (it is as old as schema 1). Otherwise the column was added
    # later, and this value stands in for it in blocks written before (it reads as "unknown").
    missing: int | None = None

    @property
    def itemsize(self) -> int:
        return int(self.dtype.lstrip("<>|")[1:])  # "<u8" → 8, "|V15" → 15


# Exit event columns, in order. The row the vCPU loop packs follows this order (with padding so
# each field sits at a multiple of its size, which lets a strided memoryview cut columns out).
# `data` is packed as "8s": the guest's little-endian bytes, zero-padded, which *are* the u64
# value — so the hot path never converts bytes to an int.
EXIT_COLUMNS: tuple[Column, ...] = (
    Column("t_exit", "<i8", "q", "CLOCK_MONOTONIC ns when KVM_RUN returned", "ns"),
    Column("guest_ns", "<i8", "q", "ns spent inside KVM_RUN for this exit", "ns"),
    Column("addr", "<u8", "Q", "io: port; mmio: guest-physical address; else 0", "port/gpa"),
    Column("data", "<u8", "8s", "io/mmio: the first element's value (little-endian, up to 8 bytes); "
           "else reason-specific", "value"),
    Column("count", "<u4", "I", "io: element count (string I/O may be > 1); else 1", "count"),
    Column("reason", "u1", "B", "KVM_EXIT_* code (see REASONS)", "code"),
    Column("size", "u1", "B", "io: element size; mmio: length; else 0", "bytes"),
    Column("flags", "u1", "B", "bit 0: write/out", "bits"),
    Column("rip", "<u8", "Q", "guest linear address of the instruction at the exit (CS base + RIP, from the "
           "registers KVM syncs into kvm_run at every exit; RIP as the kernel leaves it, which for port I/O "
           "is after the instruction); unknown in schema-1 traces", "address", missing=RIP_UNKNOWN),
)
# Not packed by the vCPU loop: present only in batches a record-time filter thinned out. There an
# event's successor may be gone, so the filter keeps what it alone knew: the handling time,
# (t_exit - guest_ns of the next event) - t_exit (tracetool/handling.py; NO_HANDLE: unknown).
SEQ_COLUMN = Column("seq", "<u8", "Q", "sequence number; present only in filtered batches", "count")
HANDLE_COLUMN = Column("handle_ns", "<i8", "q", "handling time, kept by a record-time filter; present only "
                       "in filtered batches (schema 3 on)", "ns")
FILTER_COLUMNS = (SEQ_COLUMN, HANDLE_COLUMN)
COLUMNS: dict[str, Column] = {c.name: c for c in (*EXIT_COLUMNS, *FILTER_COLUMNS)}
COLUMN_NAMES = tuple(c.name for c in EXIT_COLUMNS)
# Columns every block and every bus batch must have; the others may be absent in older traces.
REQUIRED_COLUMNS = tuple(c.name for c in EXIT_COLUMNS if c.missing is None)

FLAG_WRITE = 1

# --- Coalesced writes -----------------------------------------------------------------------------
# A guest write KVM queued in its coalesced ring instead of exiting (vmworker/coalesce.py) is not
# an exit: no KVM_RUN returned for it, it has no guest time, handling time, rip or exact time.
# Coalesced writes therefore have their own record stream ("coalesced", one per vCPU that drained
# them) with their own column table, never rows of EXIT_COLUMNS: exit counts, handling-time
# stitching (tracetool/handling.py) and the kvm_userspace_exit check read exit blocks only, so
# they stay right without a branch each (a `kind` column would have needed one in every one of
# them). The same Column type describes both tables. A write's time is known only as an interval:
# after t_after and before t_before (both exact monotonic ns); `exit_seq` links it to the exit of
# the same stream before whose handling it was drained (program order: the write came first).
COALESCED_COLUMNS: tuple[Column, ...] = (
    Column("addr", "<u8", "Q", "port (pio) or guest-physical address written", "port/gpa"),
    Column("data", "<u8", "8s", "the value written (little-endian, up to 8 bytes)", "value"),
    Column("size", "<u4", "I", "bytes written", "bytes"),
    Column("pio", "<u4", "I", "1: a port write; 0: an MMIO write", "bits"),
    Column("exit_seq", "<u8", "Q", "sequence number of the exit (same stream) before whose handling it was drained",
           "count"),
    Column("t_after", "<i8", "q", "written after this CLOCK_MONOTONIC ns (the VM's previous drain); exact time "
           "unknown", "ns"),
    Column("t_before", "<i8", "q", "written before this CLOCK_MONOTONIC ns (the drain that found it)", "ns"),
)
COALESCED_NAMES = tuple(c.name for c in COALESCED_COLUMNS)
MAX_COALESCED_ROWS = 16384  # per record: 48 bytes each, well inside MAX_RECORD_BYTES

# --- Instructions the VMM emulated ----------------------------------------------------------------
# What KVM's emulator refused and vmsup's fallback (vmworker/emulate/) performed for the guest. Not
# exits, for the reasons coalesced writes are not: the exit that led to them (an internal error, or
# a shutdown for a ring-3 INT n) stays the exit, and one exit may perform a run of several x87
# instructions. Their own record stream ("emulated"), each row linked by `exit_seq` to that exit
# of the same stream; the first row of an exit is at the exit's rip.
EMULATED_FAMILIES = ("int", "iret", "fwait", "x87")  # vmworker/emulate's family names, in code order
EMULATED_COLUMNS: tuple[Column, ...] = (
    Column("exit_seq", "<u8", "Q", "sequence number of the exit (same stream) during whose handling it was performed",
           "count"),
    Column("address", "<u8", "Q", "linear address of the instruction (CS base + rip)", "value"),
    Column("length", "<u1", "B", "instruction bytes (1..15)", "bytes"),
    Column("family", "<u1", "B", "index in EMULATED_FAMILIES (int, iret, fwait, x87)", "code"),
    Column("insn", "|V15", "15s", "the instruction's bytes, zero-padded to 15 (the x86 maximum)", "value"),
)
EMULATED_NAMES = tuple(c.name for c in EMULATED_COLUMNS)
MAX_EMULATED_ROWS = 8192  # per record: 33 bytes each, well inside MAX_RECORD_BYTES


# --- The packed row of the vCPU loop (derived) -------------------------------------------------
_VIEW_FORMAT = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "i8": "q", "u8": "Q"}


def _row_layout(columns: tuple[Column, ...]) -> tuple[str, int, dict[str, tuple[str, int, int]]]:
    """(struct format, row size, {name: (memoryview format, first item, step)}): each field at a
    multiple of its own size, the row a multiple of the widest, so that a strided memoryview
    slice copies one column out in C and the worker needs no numpy."""
    parts, offsets, pos = ["<"], {}, 0
    for c in columns:
        if struct.calcsize("<" + c.code) != c.itemsize:
            raise ValueError(f"column {c.name}: struct code {c.code!r} is not {c.itemsize} bytes wide")
        pad = -pos % c.itemsize
        if pad:
            parts.append(f"{pad}x")
        pos += pad
        offsets[c.name] = pos
        parts.append(c.code)
        pos += c.itemsize
    widest = max(c.itemsize for c in columns)
    if -pos % widest:
        parts.append(f"{-pos % widest}x")
        pos += -pos % widest
    slices = {c.name: (_VIEW_FORMAT[c.dtype.lstrip("<|")], offsets[c.name] // c.itemsize, pos // c.itemsize)
              for c in columns}
    return "".join(parts), pos, slices


ROW_STRUCT_FORMAT, ROW_SIZE, _ROW_SLICES = _row_layout(EXIT_COLUMNS)


def columns_from_rows(rows: bytes | bytearray | memoryview, n: int) -> dict[str, bytes]:
    """Packed rows (ROW_STRUCT_FORMAT) → {column: little-endian bytes} (x86 is little-endian)."""
    view = memoryview(rows)[:n * ROW_SIZE]
    cols = {}
    for name, (fmt, first, step) in _ROW_SLICES.items():
        cols[name] = view.cast(fmt)[first::step].tobytes()
    return cols


def column_dtypes() -> dict:
    """{column name: numpy dtype}, the seq column included."""
    return __getattr__("COLUMN_DTYPES") if "COLUMN_DTYPES" not in globals() else globals()["COLUMN_DTYPES"]


def __getattr__(name: str):
    # numpy dtypes are built on first use: the worker imports this module but not numpy
    # (numpy's import costs ~80 ms per worker, which adds up when launching many VMs).
    if name == "COLUMN_DTYPES":
        import numpy as np
        value = {c.name: np.dtype(c.dtype) for c in COLUMNS.values()}
    else:
        raise AttributeError(name)
    globals()[name] = value
    return value


def missing_column(name: str, n: int):
    """The stand-in for a column an older trace lacks: n copies of its `missing` value."""
    import numpy as np
    column = COLUMNS[name]
    if column.missing is None:
        raise KeyError(f"column {name!r} is in every trace; it has no stand-in")
    return np.full(n, column.missing, column_dtypes()[name])


# --- Reason codes ------------------------------------------------------------------------------
# KVM_EXIT_* codes of linux/kvm.h, named as the header names them (vmworker.kvm_abi mirrors it):
# KVM_EXIT_IRQ_WINDOW_OPEN → "irq_window_open". The short names are what users type and see.
REASONS: dict[int, str] = dict(sorted(kvm_abi.EXIT_REASON_NAMES.items()))
REASON_CODES: dict[str, int] = {name: code for code, name in REASONS.items()}
REASON_IO, REASON_HLT, REASON_MMIO = kvm_abi.KVM_EXIT_IO, kvm_abi.KVM_EXIT_HLT, kvm_abi.KVM_EXIT_MMIO
REASON_SHUTDOWN, REASON_INTR = kvm_abi.KVM_EXIT_SHUTDOWN, kvm_abi.KVM_EXIT_INTR


def reason_name(code: int) -> str:
    return REASONS.get(int(code), f"reason-{int(code)}")


def describe_exit(reason: int, flags: int, addr: int, size: int, data: int, count: int) -> str:
    """One exit in words, as tail, show and replay print it: `io out port=0x10 size=2 data=0x11`."""
    write = flags & FLAG_WRITE
    if reason == REASON_IO:
        what = f"io {'out' if write else 'in'} port={addr:#x} size={size} data={data:#x}"
        return what + (f" count={count}" if count != 1 else "")
    if reason == REASON_MMIO:
        return f"mmio {'write' if write else 'read'} addr={addr:#x} size={size} data={data:#x}"
    return reason_name(reason) + (f" data={data:#x}" if data else "")


# --- One exit as users see it (derived) -----------------------------------------------------------
# The one shape of an exit outside the trace file: the JSON objects of `vmsup tail --json`,
# `vmtrace show --json` and `vmtrace replay --json`, and the columns of `vmtrace export`'s CSV and
# Parquet (same names, same order). tracetool/exit_rows.py builds the rows; the README's table is
# generated from EVENT_FIELDS (tests/test_exit_rows.py holds it there). The stream ids and the
# sequence number come first, then each column in table order. Four are shown under another name
# or with a companion: t_exit as t_exit_ns; guest_ns followed by the derived handle_ns; reason as
# its name followed by reason_code; flags as the boolean `write` (its only bit). Every other column
# keeps its name, unit and meaning; where it equals the column's `missing` value (a trace written
# before the column existed) the value is null (empty in CSV).
class EventField(NamedTuple):
    name: str
    column: str  # the column (or stream id) it is made from or, for handle_ns, follows
    kind: str  # "int"; "name" (reason's name); "bool" (a flag bit); "handle" (handling.py's, may be null);
    # "symbol"/"line" (named from rip: exit_rows.add_places)
    unit: str
    meaning: str


STREAM_COLUMNS = ("vm", "vcpu", "epoch")
_STREAM_FIELDS = (
    EventField("vm", "vm", "int", "id", "the VM (its index in the run)"),
    EventField("vcpu", "vcpu", "int", "id", "the vCPU of the VM"),
    EventField("epoch", "epoch", "int", "count", "the VM's restarts before this run of it (0: first run)"),
    EventField(SEQ_COLUMN.name, SEQ_COLUMN.name, "int", "count",
               "sequence number in the stream (vm, vcpu, epoch), from 0, counting exits a filter dropped"),
)
_SHOWN_AS: dict[str, tuple[EventField, ...]] = {
    "t_exit": (EventField("t_exit_ns", "t_exit", "int", "ns", "CLOCK_MONOTONIC time when KVM_RUN returned"),),
    "guest_ns": (EventField("guest_ns", "guest_ns", "int", "ns", "time inside the KVM_RUN that ended in this exit"),
                 EventField("handle_ns", "guest_ns", "handle", "ns", "time from this exit until the vCPU "
                            "entered the guest again (null: unknown, e.g. the stream's last exit)")),
    "reason": (EventField("reason", "reason", "name", "name", "the exit reason: KVM_EXIT_* in lower case "
                          "without the prefix (io, mmio, hlt, …)"),
               EventField("reason_code", "reason", "int", "code", "the KVM_EXIT_* number of linux/kvm.h")),
    "flags": (EventField("write", "flags", "bool", "bool", "io: out; mmio: write (false for other reasons)"),),
}
# Derived from rip and the guest's symbols (tracetool/symbols.py), never stored: null where the
# address is unknown, nothing covers it, or no symbols are at hand (vmsup tail has none).
PLACE_FIELDS = (
    EventField("symbol", "rip", "symbol", "name", "derived: the guest symbol (function) holding rip, from the "
               "guest's ELF or a --symbols map (null: unknown)"),
    EventField("line", "rip", "line", "file:line", "derived: the source line of rip, from the guest's DWARF "
               "line table (null: unknown)"),
)
EVENT_FIELDS: tuple[EventField, ...] = (*_STREAM_FIELDS, *(
    f for c in EXIT_COLUMNS for f in _SHOWN_AS.get(c.name, (EventField(c.name, c.name, "int", c.unit, c.meaning),))),
    *PLACE_FIELDS)
EXPORT_COLUMNS: tuple[str, ...] = tuple(f.name for f in EVENT_FIELDS)


def exported_as(name: str) -> tuple[str, ...]:
    """The field names one event column is shown as."""
    return tuple(f.name for f in EVENT_FIELDS if f.column == name)


# --- Bus messages (msgpack maps). Every message has "v" (SCHEMA_VERSION) and "type", one of
# these names; each message's fields and their checks are its class in tracetool/messages.py.
MSG_EXITS = "exits"  # a batch of exit events of one stream (the worker's vCPU threads)
MSG_VM_START = "vm-start"  # the worker's VM is about to run
MSG_VM_END = "vm-end"  # the worker's VM ended (or the supervisor, for a worker that could not say)
MSG_GAP = "gap"  # events a stream lost (written by the recorder only)
MSG_LIFECYCLE = "lifecycle"  # what the supervisor did to or saw of a worker
MSG_SCREEN = "screen"  # the VGA text screen, when it changed (tracetool/screen.py)
MSG_INPUT = "input"  # a key pressed on the VM's keyboard
MSG_KVM_STATS = "kvm-stats"  # the kernel's KVM counters of a VM or vCPU, sampled by the worker
MSG_INTERRUPT = "interrupt"  # an interrupt a --deterministic VM's vCPU was given, and where (clock, rip)
MSG_VM_IMAGE = "vm-image"  # what a rerun needs besides the exits: the guest image, CPUID, first registers
MSG_STEPS = "steps"  # a batch of single-stepped instructions of one stream (tracetool/step_schema.py)
MSG_REFUSED = "refused"  # bus messages the recorder refused, by cause (written by the recorder only)
MSG_COALESCED = "coalesced"  # guest writes drained from KVM's coalesced ring (COALESCED_COLUMNS)
MSG_EMULATED = "emulated"  # instructions the VMM's fallback emulator performed (EMULATED_COLUMNS)
MSG_INSN_COUNTS = "insn-counts"  # a --deterministic vCPU's instruction count at each of its guest exits
# Bus only, never a trace record (it carries the run's secret): a remote launch registers its run
# with a standalone recorder (supervisor/remote_runs.py).
MSG_RUN_START = "run-start"
MESSAGE_TYPES = (MSG_EXITS, MSG_VM_START, MSG_VM_END, MSG_GAP, MSG_LIFECYCLE, MSG_SCREEN, MSG_INPUT, MSG_KVM_STATS,
                 MSG_REFUSED, MSG_STEPS, MSG_VM_IMAGE, MSG_COALESCED, MSG_INTERRUPT, MSG_EMULATED, MSG_INSN_COUNTS)

# Bounds for untrusted messages (bus or file): enough for real batches, small enough to be safe.
MAX_MESSAGE_BYTES = 64 << 20  # one trace block's payload (a bus message: messages.BUS, smaller)
MAX_BATCH_EVENTS = 1 << 20
MAX_PAYLOADS = 4096  # count > 1 string I/O: full data of at most this many events per batch
# One record (every message but exits: vm-start, vm-end, gap, lifecycle, screen, input) as msgpack
# bytes: real ones are a few KiB. Also the longest string any message may hold.
MAX_RECORD_BYTES = 1 << 20


class SchemaError(ValueError):
    """A message or block that does not follow the schema."""


def decode_columns(cols: dict, count: int, *, with_seq: bool = False) -> dict:
    """Validate and view column bytes as numpy arrays (no copy). Raises SchemaError.
    with_seq: a filtered batch, which also has the FILTER_COLUMNS."""
    import numpy as np
    if not isinstance(cols, dict):
        raise SchemaError("columns are not a map")
    if not 0 <= count <= MAX_BATCH_EVENTS:
        raise SchemaError(f"batch of {count} events is out of range")
    names = COLUMN_NAMES + (tuple(c.name for c in FILTER_COLUMNS) if with_seq else ())
    out = {}
    for name in names:
        raw = cols.get(name)
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise SchemaError(f"column {name!r} missing or not bytes")
        dtype = column_dtypes()[name]
        if len(raw) != count * dtype.itemsize:
            raise SchemaError(f"column {name!r} has {len(raw)} bytes, expected {count * dtype.itemsize}")
        out[name] = np.frombuffer(raw, dtype=dtype)
    return out


def schema_description() -> dict:
    """What a trace header stores so the file describes itself."""
    return {
        "version": SCHEMA_VERSION,
        "columns": [{"name": c.name, "dtype": c.dtype, "doc": c.meaning} for c in (*EXIT_COLUMNS, *FILTER_COLUMNS)],
        "reasons": {str(k): v for k, v in REASONS.items()},
        "flags": {"write": FLAG_WRITE},
        "messages": list(MESSAGE_TYPES),
    }
