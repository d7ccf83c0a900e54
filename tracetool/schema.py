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
"""

from __future__ import annotations

SCHEMA_VERSION = 1

# Exit event columns, in order: (name, numpy dtype string, meaning).
EXIT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("t_exit", "<i8", "CLOCK_MONOTONIC ns when KVM_RUN returned"),
    ("guest_ns", "<i8", "ns spent inside KVM_RUN for this exit"),
    ("addr", "<u8", "io: port; mmio: guest-physical address; else 0"),
    ("data", "<u8", "io/mmio: the first element's value (little-endian, up to 8 bytes); else reason-specific"),
    ("count", "<u4", "io: element count (string I/O may be > 1); else 1"),
    ("reason", "u1", "KVM_EXIT_* code (see REASONS)"),
    ("size", "u1", "io: element size; mmio: length; else 0"),
    ("flags", "u1", "bit 0: write/out"),
)
SEQ_COLUMN = ("seq", "<u8", "sequence number; present only in filtered batches")
COLUMN_NAMES = tuple(name for name, _, _ in EXIT_COLUMNS)

FLAG_WRITE = 1

# One row as the vCPU loop packs it (struct format) and as numpy reads it back (a structured
# dtype with the same layout); the worker turns rows into columns before sending. `data` is
# packed as "8s": the guest's little-endian bytes, zero-padded, which *are* the u64 value —
# so the hot path never converts bytes to an int.
ROW_STRUCT_FORMAT = "<qqQ8sIBBBx"
ROW_SIZE = 40
# Where each column sits in a row, as (memoryview format, first item, step) over the row bytes:
# a strided memoryview slice copies one column out in C, so the worker needs no numpy.
_ROW_SLICES = {
    "t_exit": ("q", 0, 5), "guest_ns": ("q", 1, 5), "addr": ("Q", 2, 5), "data": ("Q", 3, 5),
    "count": ("I", 8, 10), "reason": ("B", 36, 40), "size": ("B", 37, 40), "flags": ("B", 38, 40),
}


def column_dtypes() -> dict:
    """{column name: numpy dtype}, the seq column included."""
    return __getattr__("COLUMN_DTYPES") if "COLUMN_DTYPES" not in globals() else globals()["COLUMN_DTYPES"]


def __getattr__(name: str):
    # numpy dtypes are built on first use: the worker imports this module but not numpy
    # (numpy's import costs ~80 ms per worker, which adds up when launching many VMs).
    if name == "COLUMN_DTYPES":
        import numpy as np
        value = {n: np.dtype(dt) for n, dt, _ in (*EXIT_COLUMNS, SEQ_COLUMN)}
    elif name == "ROW_DTYPE":
        import numpy as np
        value = np.dtype({"names": list(COLUMN_NAMES),
                          "formats": ["<i8", "<i8", "<u8", "<u8", "<u4", "u1", "u1", "u1"],
                          "offsets": [0, 8, 16, 24, 32, 36, 37, 38], "itemsize": ROW_SIZE})
    else:
        raise AttributeError(name)
    globals()[name] = value
    return value

# KVM_EXIT_* codes (linux/kvm.h) and the short names users type and see.
REASONS: dict[int, str] = {
    0: "unknown", 1: "exception", 2: "io", 3: "hypercall", 4: "debug", 5: "hlt", 6: "mmio",
    7: "irq_window_open", 8: "shutdown", 9: "fail_entry", 10: "intr", 11: "set_tpr", 12: "tpr_access",
    16: "nmi", 17: "internal_error", 24: "system_event", 26: "ioapic_eoi", 29: "x86_rdmsr",
    30: "x86_wrmsr", 33: "x86_bus_lock", 37: "notify",
}
REASON_CODES: dict[str, int] = {name: code for code, name in REASONS.items()}
REASON_IO, REASON_HLT, REASON_MMIO, REASON_SHUTDOWN, REASON_INTR = 2, 5, 6, 8, 10


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


# --- Bus messages (msgpack maps). Every message has "v" (SCHEMA_VERSION) and "type". ----------
MSG_EXITS = "exits"  # vm, vcpu, epoch, first_seq, count, cols{name: bytes}, [payloads]
MSG_VM_START = "vm-start"  # vm, epoch, name, spec{}, sha256, mem_size, mode, vcpus, pid, t
MSG_VM_END = "vm-end"  # vm, epoch, status, guest_code, detail, registers, exits, by_reason, final_seq[vcpu] = next seq, t
MSG_GAP = "gap"  # written by the recorder: vm, vcpu, epoch, first_missing, count, cause[, count_known]
# Written by the supervisor: vm, epoch, event (spawn | exit | restart | give-up | stop | pause |
# resume | kill), name, pid, status, code, signal, detail, t, wall.
MSG_LIFECYCLE = "lifecycle"
# The VGA text screen, sampled by the worker when it changed (tracetool/screen.py): vm, epoch, t,
# cols, rows, cursor ([row, col] or None), enc ("zlib"), cells (compressed (char, attribute) pairs).
MSG_SCREEN = "screen"
# A key pressed on the VM's keyboard (key script or typed): vm, epoch, t, key (name), scancodes (set 1).
MSG_INPUT = "input"
MESSAGE_TYPES = (MSG_EXITS, MSG_VM_START, MSG_VM_END, MSG_GAP, MSG_LIFECYCLE, MSG_SCREEN, MSG_INPUT)

# Bounds for untrusted messages (bus or file): enough for real batches, small enough to be safe.
MAX_MESSAGE_BYTES = 64 << 20
MAX_BATCH_EVENTS = 1 << 20
MAX_PAYLOADS = 4096  # count > 1 string I/O: full data of at most this many events per batch


def columns_from_rows(rows: bytes | bytearray | memoryview, n: int) -> dict[str, bytes]:
    """Packed rows (ROW_STRUCT_FORMAT) → {column: little-endian bytes} (x86 is little-endian)."""
    view = memoryview(rows)[:n * ROW_SIZE]
    cols = {}
    for name, (fmt, first, step) in _ROW_SLICES.items():
        cols[name] = view.cast(fmt)[first::step].tobytes()
    return cols


class SchemaError(ValueError):
    """A message or block that does not follow the schema."""


def decode_columns(cols: dict, count: int, *, with_seq: bool = False) -> dict:
    """Validate and view column bytes as numpy arrays (no copy). Raises SchemaError."""
    import numpy as np
    if not isinstance(cols, dict):
        raise SchemaError("columns are not a map")
    if not 0 <= count <= MAX_BATCH_EVENTS:
        raise SchemaError(f"batch of {count} events is out of range")
    names = COLUMN_NAMES + (("seq",) if with_seq else ())
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
        "columns": [{"name": n, "dtype": d, "doc": doc} for n, d, doc in (*EXIT_COLUMNS, SEQ_COLUMN)],
        "reasons": {str(k): v for k, v in REASONS.items()},
        "flags": {"write": FLAG_WRITE},
        "messages": list(MESSAGE_TYPES),
    }
