"""Trace files: a header, self-sized blocks, and (on a clean close) an index footer.

Learned from pcapng (self-sized blocks, readable after a crash), CTF (per-stream packets whose
context names the stream and its time range, so a reader can index a file without decoding it)
and perf.data (explicit LOST records). The file describes itself: the header holds the schema.

Layout (all integers little-endian):

    file header   "VMSUPTRC"  u16 format version  u32 n  zstd(msgpack{schema, run, created})[n]  u32 crc32
    block         "BLK\\x01"  u32 type  u32 payload length  u32 crc32  payload[length]
    ...
    INDEX block   (clean close only) offsets and stream keys of every block, per-VM/per-reason totals
    trailer       u64 offset of the INDEX block  "VMSUPEND"

A block's crc32 covers its type and length fields and then its payload, so a flipped length or
type is caught like a flipped payload byte. Each block is written with one write(): a kill -9
leaves at most one torn block at the end, which the reader reports (`torn_tail`) and stops
before; a bad block anywhere else is corruption.

Record blocks (VM_START, VM_END, GAP) hold zstd(msgpack(record map)), the maps of schema.MSG_*.
An EXITS block holds one batch of one stream (vm, vcpu, epoch):

    u32 n  msgpack head[n]  zstd(column bytes ... [msgpack payload list])

The head stays uncompressed (CTF's packet context) so a reader lists streams, sequence ranges and
time ranges without decompressing. It records each column's encoding; every encoding is exact:
  - "delta": the first value in the head, then differences (modulo 2**64); with "ref", the
    difference minus the ref column. t_exit uses ref guest_ns: t_exit[i] - t_exit[i-1] -
    guest_ns[i] is the handling time of event i-1 (see schema), which varies far less than
    the exit-to-exit step (measured on the seed guest: 1.53 instead of 1.92 B/event).
  - then frame of reference: subtract the minimum (as int64, modulo 2**64) and store each value
    in the fewest bytes (1, 2, 4 or 8) that hold the largest;
  - then byte-shuffle (all first bytes, then all second bytes, …) so zstd sees runs.

Sequence numbers of a stream start at 0. A record-time filter leaves a `seq` column; a batch
whose events were all filtered out is still written (n_rows 0), so its sequence range stays
accounted for.
"""

from __future__ import annotations

import array
import errno as errno_mod
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable, Iterator, Mapping

import msgpack
import numpy as np
import zstandard

from . import schema
from .filters import EventFilter

MAGIC = b"VMSUPTRC"
FORMAT_VERSION = 1
BLOCK_MAGIC = b"BLK\x01"
TRAILER_MAGIC = b"VMSUPEND"

_FILE_HEAD = struct.Struct("<8sHI")  # magic, format version, length of the compressed header map
_U32 = struct.Struct("<I")
_BLOCK_HEAD = struct.Struct("<4sIII")  # magic, type, payload length, crc32
_TRAILER = struct.Struct("<Q8s")  # offset of the INDEX block, magic

ZSTD_LEVEL = 3
DEFAULT_BLOCK_EVENTS = 1 << 16  # rows a writer gathers per stream before it writes a block

# Bounds on what a reader accepts (a corrupt or hostile length must not allocate gigabytes).
MAX_BLOCK_BYTES = schema.MAX_MESSAGE_BYTES  # a block's payload, compressed or not
MAX_HEADER_BYTES = 4 << 20  # the file header map, compressed and decompressed
MAX_HEAD_BYTES = 64 << 10  # an EXITS block's head
MAX_RECORD_BYTES = 1 << 20  # a VM_START / VM_END / GAP map, decompressed
# Record maps a reader keeps in memory, decompressed, all together: records compress well, so
# without a budget a small hostile file of many records could fill memory. Real traces hold a
# few kilobytes per VM start or end.
MAX_RECORDS_TOTAL = 64 << 20
MAX_INDEX_ENTRIES = 1 << 20  # a bigger file gets a footer with totals only; readers scan it
_MAX_PARTS = 4096  # batches gathered into one block (batches a filter emptied add no rows)
# The footer lists blocks column by column (packed little-endian arrays), so a reader loads it
# with numpy instead of building a Python list per block. NO_ID: a record without that field.
INDEX_FIELDS = (("offset", "<u8"), ("type", "<u4"), ("vm", "<u4"), ("vcpu", "<u4"), ("epoch", "<u4"),
                ("first_seq", "<u8"), ("count", "<u8"), ("n_rows", "<u8"))
INDEX_NO_ID = 0xFFFFFFFF

# Columns the reader adds to the schema's: which stream each row belongs to.
STREAM_DTYPES = {"vm": np.dtype("<u4"), "vcpu": np.dtype("<u4"), "epoch": np.dtype("<u4")}
_STREAM_ID_LIMIT = 1 << 32
_SEQ = schema.SEQ_COLUMN[0]

# How the writer encodes each column: (transform, reference column). Chosen by measuring real
# seed-guest exits (see the module docstring); columns not named here are stored raw (after
# frame of reference + narrowing, which already turns constant columns into nothing).
_PLAN: dict[str, tuple[str, str | None]] = {
    "t_exit": ("delta", "guest_ns"),
    "addr": ("delta", None),
    "data": ("delta", None),  # the seed guest's data counts up by one
    _SEQ: ("delta", None),
}
_WIDTHS = (1, 2, 4, 8)
_U64 = np.dtype("<u8")
_I64 = np.dtype("<i8")
_M64 = 1 << 64


class BlockType(IntEnum):
    EXITS = 1
    VM_START = 2
    VM_END = 3
    GAP = 4
    INDEX = 5
    LIFECYCLE = 6
    SCREEN = 7
    INPUT = 8


RECORD_BLOCK_TYPES: dict[str, BlockType] = {
    schema.MSG_VM_START: BlockType.VM_START,
    schema.MSG_VM_END: BlockType.VM_END,
    schema.MSG_GAP: BlockType.GAP,
    schema.MSG_LIFECYCLE: BlockType.LIFECYCLE,
    schema.MSG_SCREEN: BlockType.SCREEN,
    schema.MSG_INPUT: BlockType.INPUT,
}
_KIND_OF_TYPE = {int(t): k for k, t in RECORD_BLOCK_TYPES.items()}
_KIND_OF_TYPE[BlockType.EXITS] = schema.MSG_EXITS
_KIND_OF_TYPE[BlockType.INDEX] = "index"
_GAP_FIELDS = ("vm", "vcpu", "epoch", "first_missing", "count")


class TraceError(Exception):
    """Base of the trace-file errors; the CLI turns each into one line."""


class TraceFormatError(TraceError):
    """A file that is not a readable vmsup trace, or corruption inside one."""

    def __init__(self, path, offset: int | None, reason: str) -> None:
        self.path, self.offset, self.reason = os.fspath(path), offset, reason
        super().__init__(str(self))

    def __str__(self) -> str:
        where = "" if self.offset is None else f" at offset {self.offset}"
        return f"{self.path}: {self.reason}{where}"


class TraceWriteError(TraceError):
    """Writing a trace failed (disk full, file size limit, I/O error)."""

    def __init__(self, path, reason: str, errno: int | None = None, offset: int | None = None) -> None:
        self.path, self.reason, self.errno = os.fspath(path), reason, errno
        self.offset = offset  # the file is readable up to here
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class _Corrupt(Exception):
    """Internal: a block failed validation; the scan attaches the offset."""


def _need(cond: bool, reason: str) -> None:
    if not cond:
        raise _Corrupt(reason)


def _is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def _block_crc(btype: int, payload) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<II", btype, len(payload))))


def _frame_block(btype: int, payload: bytes) -> bytes:
    return _BLOCK_HEAD.pack(BLOCK_MAGIC, int(btype), len(payload), _block_crc(btype, payload)) + payload


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data, what: str):
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise _Corrupt(f"{what} is not valid msgpack ({type(e).__name__})") from None


def _decompress(dctx: zstandard.ZstdDecompressor, data, limit: int, what: str) -> bytes:
    # A frame that declares its size is decompressed into exactly that much memory (python-
    # zstandard ignores max_output_size then), so check the declared size first.
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise _Corrupt(f"{what} is not a zstd frame") from None
    if declared > limit:
        raise _Corrupt(f"{what} would decompress to {declared} bytes, over the limit of {limit}")
    try:
        return dctx.decompress(data, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise _Corrupt(f"{what} does not decompress ({e})") from None


# --- Column codec ---------------------------------------------------------------------------------
def _to_u64(a: np.ndarray) -> np.ndarray:
    return a.view(_U64) if a.dtype.itemsize == 8 else a.astype(_U64)


def _shuffle(a: np.ndarray) -> bytes:
    if a.dtype.itemsize == 1:
        return a.tobytes()
    return np.ascontiguousarray(a.view(np.uint8).reshape(len(a), a.dtype.itemsize).T).tobytes()


def _unshuffle(raw, n: int, width: int) -> np.ndarray:
    planes = np.frombuffer(raw, dtype=np.uint8, count=n * width)
    if width == 1:
        return planes
    return np.ascontiguousarray(planes.reshape(width, n).T).view(f"<u{width}").reshape(n)


def _encode_column(name: str, values: np.ndarray, encoded: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    transform, ref = _PLAN.get(name, ("raw", None))
    x = _to_u64(values)
    enc: dict = {"name": name, "dtype": values.dtype.str, "enc": transform}
    if transform == "delta" and len(x):
        enc["first"] = int(x[0])
        v = x[1:] - x[:-1]  # uint64: wraps modulo 2**64, so any jump stays exact
        if ref is not None:
            enc["ref"] = ref
            v -= encoded[ref][1:]
    else:
        v = x
    base = int(v.view(_I64).min()) if len(v) else 0
    w = v - np.uint64(base % _M64)
    top = int(w.max()) if len(w) else 0
    width = next(k for k in _WIDTHS if top < 1 << (8 * k))
    enc.update(base=base, width=width)
    return enc, _shuffle(w.astype(f"<u{width}"))


def _column_values(enc: dict, rows: int) -> int:
    return rows - 1 if enc["enc"] == "delta" and rows else rows


def _decode_column(enc: dict, raw, rows: int, decoded: dict[str, np.ndarray]) -> np.ndarray:
    n = _column_values(enc, rows)
    v = _unshuffle(raw, n, enc["width"]).astype(_U64) + np.uint64(enc["base"] % _M64)
    if enc["enc"] == "delta" and rows:
        ref = enc.get("ref")
        if ref is not None:
            v += decoded[ref][1:]
        x = np.empty(rows, _U64)
        x[0] = enc["first"]
        np.cumsum(v, dtype=_U64, out=x[1:])
        x[1:] += x[0]
    else:
        x = v
    dtype = schema.COLUMN_DTYPES[enc["name"]]
    if dtype.itemsize == 8:
        return x.view(dtype)
    _need(not len(x) or int(x.max()) <= np.iinfo(dtype).max, f"column {enc['name']!r} holds values beyond {dtype}")
    return x.astype(dtype)


def _encode_exits(vm: int, vcpu: int, epoch: int, first_seq: int, count: int, cols: dict[str, np.ndarray],
                  seq: np.ndarray | None, payloads: list[tuple[int, bytes]], cctx) -> bytes:
    rows = len(cols[schema.COLUMN_NAMES[0]])
    names = schema.COLUMN_NAMES + ((_SEQ,) if seq is not None else ())
    values = dict(cols, **({_SEQ: seq} if seq is not None else {}))
    u64 = {name: _to_u64(values[name]) for name in names}
    # Referenced columns are stored (and decoded) before the columns that refer to them.
    order = sorted(names, key=lambda n: _PLAN.get(n, ("raw", None))[1] is not None)
    encodings, parts = [], []
    for name in order:
        enc, raw = _encode_column(name, values[name], u64)
        encodings.append(enc)
        parts.append(raw)
    payload_bytes = _pack([[row, data] for row, data in payloads]) if payloads else b""
    parts.append(payload_bytes)
    body = b"".join(parts)
    t = cols["t_exit"]
    head = {
        "vm": vm, "vcpu": vcpu, "epoch": epoch, "first_seq": first_seq, "count": count, "n_rows": rows,
        "has_seq": seq is not None, "t": [int(t.min()), int(t.max())] if rows else None,
        "encodings": encodings, "payloads": len(payloads), "payload_bytes": len(payload_bytes),
        "body": len(body),
    }
    head_bytes = _pack(head)
    return _U32.pack(len(head_bytes)) + head_bytes + cctx.compress(body)


def _check_exits_head(head) -> dict:
    _need(isinstance(head, dict), "exits block head is not a map")
    for key in ("vm", "vcpu", "epoch"):
        _need(_is_int(head.get(key), 0, _STREAM_ID_LIMIT), f"exits block head: bad {key}")
    _need(_is_int(head.get("first_seq"), 0, _M64), "exits block head: bad first_seq")
    _need(_is_int(head.get("count"), 1, _M64), "exits block head: bad count")
    rows = head.get("n_rows")
    _need(_is_int(rows, 0, schema.MAX_BATCH_EVENTS + 1) and rows <= head["count"], "exits block head: bad n_rows")
    _need(isinstance(head.get("has_seq"), bool), "exits block head: bad has_seq")
    _need(head["has_seq"] or rows == head["count"], "exits block without a seq column must have count rows")
    t = head.get("t")
    _need(t is None if rows == 0 else (isinstance(t, list) and len(t) == 2
                                        and all(_is_int(x, -(1 << 63), 1 << 63) for x in t) and t[0] <= t[1]),
          "exits block head: bad time range")
    _need(_is_int(head.get("payloads"), 0, schema.MAX_PAYLOADS + 1) and head["payloads"] <= rows,
          "exits block head: bad payload count")
    _need(_is_int(head.get("payload_bytes"), 0, MAX_BLOCK_BYTES + 1), "exits block head: bad payload size")
    _need((head["payloads"] == 0) == (head["payload_bytes"] == 0), "exits block head: payload count and size disagree")
    encodings = head.get("encodings")
    _need(isinstance(encodings, list), "exits block head: no column encodings")
    expected = set(schema.COLUMN_NAMES) | ({_SEQ} if head["has_seq"] else set())
    names = [e["name"] if isinstance(e, dict) and isinstance(e.get("name"), str) else None for e in encodings]
    _need(len(names) == len(expected) and set(names) == expected,
          f"exits block columns {names} do not match schema version {schema.SCHEMA_VERSION}")
    size = head["payload_bytes"]
    seen: set[str] = set()
    for enc in encodings:
        name = enc["name"]
        _need(enc.get("dtype") == schema.COLUMN_DTYPES[name].str, f"column {name!r}: dtype {enc.get('dtype')!r} is not the schema's")
        _need(enc.get("enc") in ("raw", "delta"), f"column {name!r}: unknown encoding {enc.get('enc')!r}")
        _need(enc.get("width") in _WIDTHS, f"column {name!r}: bad width")
        _need(_is_int(enc.get("base"), -(1 << 63), 1 << 63), f"column {name!r}: bad base")
        if enc["enc"] == "delta" and rows:
            _need(_is_int(enc.get("first"), 0, _M64), f"column {name!r}: bad first value")
        ref = enc.get("ref")
        if ref is not None:
            _need(enc["enc"] == "delta" and ref in seen and ref != name, f"column {name!r}: bad reference {ref!r}")
        seen.add(name)
        size += _column_values(enc, rows) * enc["width"]
    _need(head.get("body") == size <= MAX_BLOCK_BYTES, "exits block head: body size does not match its columns")
    return head


@dataclass
class ExitBatch:
    """One decoded EXITS block: numpy columns (schema columns plus `seq`) of one stream."""

    offset: int
    vm: int
    vcpu: int
    epoch: int
    first_seq: int
    count: int
    columns: dict[str, np.ndarray]
    payloads: dict[int, bytes]  # row index → full data of a string I/O event
    encodings: list[dict]

    @property
    def n_rows(self) -> int:
        return len(self.columns[_SEQ])


def _read_exits_head(payload: memoryview) -> tuple[dict, int]:
    """The uncompressed head of an EXITS block and where its compressed body starts."""
    _need(len(payload) >= _U32.size, "exits block shorter than its head length")
    (n,) = _U32.unpack_from(payload)
    _need(n <= MAX_HEAD_BYTES and _U32.size + n <= len(payload), f"exits block head length {n} is out of range")
    head = _check_exits_head(_unpack(payload[_U32.size:_U32.size + n], "exits block head"))
    return head, _U32.size + n


def _decode_exits_body(offset: int, head: dict, compressed, dctx, columns: Iterable[str] | None = None) -> ExitBatch:
    """Decompress and decode an EXITS block's columns (with `columns`, only those, plus seq and
    the columns they are delta-coded against); raises _Corrupt."""
    body = _decompress(dctx, compressed, head["body"], "exits block body")
    _need(len(body) == head["body"], "exits block body is shorter than its head says")
    rows = head["n_rows"]
    wanted = None
    if columns is not None:
        wanted = {*columns, _SEQ}
        for enc in reversed(head["encodings"]):  # a referenced column comes before its user
            if enc["name"] in wanted and enc.get("ref") is not None:
                wanted.add(enc["ref"])
    decoded: dict[str, np.ndarray] = {}
    u64: dict[str, np.ndarray] = {}
    pos = 0
    view = memoryview(body)
    for enc in head["encodings"]:
        size = _column_values(enc, rows) * enc["width"]
        if wanted is not None and enc["name"] not in wanted:
            pos += size
            continue
        col = _decode_column(enc, view[pos:pos + size], rows, u64)
        decoded[enc["name"]] = col
        u64[enc["name"]] = _to_u64(col)
        pos += size
    first, count = head["first_seq"], head["count"]
    if head["has_seq"]:
        seq = decoded[_SEQ]
        _need(not rows or (int(seq[0]) >= first and int(seq[-1]) - first < count
                           and bool(np.all(seq[1:] > seq[:-1]))),
              "seq column is not increasing inside the block's sequence range")
    else:
        _need(first + count <= _M64, "sequence range overflows")
        seq = np.arange(rows, dtype=_U64) + np.uint64(first)
    columns = {name: decoded[name] for name in schema.COLUMN_NAMES if name in decoded}
    columns[_SEQ] = seq
    if rows and "t_exit" in columns:
        t = columns["t_exit"]
        _need([int(t.min()), int(t.max())] == head["t"], "t_exit values disagree with the block's time range")
    payloads: dict[int, bytes] = {}
    if head["payloads"]:
        items = _unpack(view[pos:], "exits block payloads")
        _need(isinstance(items, list) and len(items) == head["payloads"], "exits block payloads: bad list")
        for item in items:
            _need(isinstance(item, list) and len(item) == 2 and _is_int(item[0], 0, rows)
                  and isinstance(item[1], bytes) and item[0] not in payloads, "exits block payloads: bad entry")
            payloads[item[0]] = item[1]
    return ExitBatch(offset, head["vm"], head["vcpu"], head["epoch"], first, count, columns, payloads,
                     head["encodings"])


# --- Writer ---------------------------------------------------------------------------------------
@dataclass
class _Part:
    first_seq: int
    count: int
    cols: dict[str, np.ndarray]
    seq: np.ndarray | None


@dataclass
class _Pending:
    """Consecutive batches of one stream waiting to become one block."""

    first_seq: int
    count: int = 0
    rows: int = 0
    parts: list[_Part] = field(default_factory=list)
    payloads: list[tuple[int, bytes]] = field(default_factory=list)


def _stream_id(value, what: str) -> int:
    if not _is_int(value, 0, _STREAM_ID_LIMIT):
        raise ValueError(f"{what} must be an integer in 0..{_STREAM_ID_LIMIT - 1}, not {value!r}")
    return value


def _column_array(name: str, value) -> np.ndarray:
    dtype = schema.COLUMN_DTYPES[name]
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) % dtype.itemsize:
            raise ValueError(f"column {name!r}: {len(raw)} bytes is not a whole number of {dtype} values")
        return np.frombuffer(raw, dtype=dtype)
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.dtype.kind not in "iub":
        raise ValueError(f"column {name!r} must be a 1-D integer array or bytes, not {arr.dtype} × {arr.shape}")
    return np.array(arr, dtype=dtype)  # a copy: the caller may reuse its buffers


class TraceWriter:
    """Writes one trace file. Not thread-safe: one recorder thread owns it.

    write_exits() gathers consecutive batches of a stream and writes them as one block once it
    holds `block_events` rows or more (bigger blocks compress better); flush() writes what is gathered (the recorder calls it every so often, so a crash loses
    little); write_record() flushes first, so file order follows arrival order.
    """

    def __init__(self, path, run_meta: Mapping, *, block_events: int = DEFAULT_BLOCK_EVENTS,
                 overwrite: bool = False) -> None:
        if not 1 <= block_events <= schema.MAX_BATCH_EVENTS:
            raise ValueError(f"block_events must be in 1..{schema.MAX_BATCH_EVENTS}")
        self.path = os.fspath(path)
        self.block_events = block_events
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._pending: dict[tuple[int, int, int], _Pending] = {}
        self._index: dict[str, array.array] | None = {name: array.array("Q") for name, _ in INDEX_FIELDS}
        self._totals: dict[int, np.ndarray] = {}
        self._offset = 0
        self._failed: str | None = None
        self._closed = False
        self.events = 0  # rows written (in blocks)
        self.blocks = 0
        try:
            header_map = _pack({"schema": schema.schema_description(), "run": dict(run_meta),
                                "created": time.time_ns()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"run metadata cannot be stored: {e}") from None
        compressed = self._cctx.compress(header_map)
        if len(compressed) > MAX_HEADER_BYTES or len(header_map) > MAX_HEADER_BYTES:
            raise ValueError(f"run metadata is over {MAX_HEADER_BYTES} bytes")
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            # Private like the control sockets: a trace holds whatever the guest wrote.
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise TraceWriteError(self.path, f"cannot create the trace file: {e.strerror}", e.errno) from None
        try:
            self._append(_FILE_HEAD.pack(MAGIC, FORMAT_VERSION, len(compressed)) + compressed
                         + _U32.pack(zlib.crc32(compressed)))
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def resume(cls, path, *, block_events: int = DEFAULT_BLOCK_EVENTS) -> tuple["TraceWriter", dict]:
        """Continue a trace whose writer died (a restarted recorder): keep every whole block, cut
        a torn tail (or the index footer of a clean close), append after it.

        Returns the writer and {(vm, vcpu, epoch): next sequence number} of what the file holds.
        A resumed file gets no index footer (its block list would miss the earlier session); the
        reader scans such a file in full, as after a crash.
        """
        with TraceReader(path) as reader:
            ends = [e.offset + _BLOCK_HEAD.size + e.length for e in reader._entries if e.type != BlockType.INDEX]
            end = max(ends) if ends else reader._data_start
            next_seq = {(st.vm, st.vcpu, st.epoch): st.last_seq + 1 for st in reader.streams()}
        self = cls.__new__(cls)
        self.path = os.fspath(path)
        self.block_events = block_events
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._pending = {}
        self._index = None
        self._totals = {}
        self._failed = None
        self._closed = False
        self._resumed = True
        self.events = 0
        self.blocks = 0
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            os.ftruncate(self._fd, end)
            os.lseek(self._fd, end, os.SEEK_SET)
        except OSError as e:
            raise TraceWriteError(self.path, f"cannot reopen the trace file: {e.strerror}", e.errno) from None
        self._offset = end
        return self, next_seq

    @property
    def offset(self) -> int:
        """Bytes written so far: the file is readable up to here."""
        return self._offset

    def _append(self, data: bytes) -> None:
        if self._failed is not None:
            raise TraceWriteError(self.path, f"an earlier write failed ({self._failed}); "
                                  f"the trace ends at offset {self._offset}", offset=self._offset)
        if self._closed:
            raise ValueError("the trace writer is closed")
        start, done, view = self._offset, 0, memoryview(data)
        try:
            while done < len(view):  # a regular file writes in one go unless the disk fills up
                done += os.write(self._fd, view[done:])
        except OSError as e:
            what = {errno_mod.ENOSPC: "disk full", errno_mod.EFBIG: "file size limit reached",
                    errno_mod.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror)
            self._failed = what
            try:
                os.ftruncate(self._fd, start)
                os.lseek(self._fd, start, os.SEEK_SET)
                state = f"the trace is readable up to offset {start}"
            except OSError:
                state = f"the trace may end in a torn block after offset {start}"
            raise TraceWriteError(self.path, f"writing {len(data)} bytes at offset {start} failed: {what}; {state}",
                                  e.errno, offset=start) from None
        self._offset += len(data)

    def _append_block(self, btype: int, payload: bytes, key: tuple) -> None:
        if len(payload) > MAX_BLOCK_BYTES:
            raise ValueError(f"a block of {len(payload)} bytes is over the limit of {MAX_BLOCK_BYTES}")
        offset = self._offset
        self._append(_frame_block(btype, payload))
        self.blocks += 1
        if self._index is not None:
            if self.blocks > MAX_INDEX_ENTRIES:
                self._index = None  # too many to list; the footer keeps the totals
                return
            for (name, _), value in zip(INDEX_FIELDS, (offset, int(btype), *key)):
                self._index[name].append(value)

    def write_exits(self, vm: int, vcpu: int, epoch: int, first_seq: int, count: int,
                    cols: Mapping[str, object], seq=None, payloads=None) -> None:
        """Add a batch of one stream. `count` sequence numbers from `first_seq` are covered; the
        rows are all of them, or (with `seq`, a record-time filter's survivors) some of them.
        `payloads`: {row: bytes} or (row, bytes) pairs, the full data of string I/O events."""
        key = (_stream_id(vm, "vm"), _stream_id(vcpu, "vcpu"), _stream_id(epoch, "epoch"))
        if not _is_int(first_seq, 0, _M64) or not _is_int(count, 1, _M64) or first_seq + count > _M64:
            raise ValueError(f"bad sequence range: first_seq {first_seq!r}, count {count!r}")
        cols = dict(cols)
        if _SEQ in cols:
            if seq is not None:
                raise ValueError("seq given both as a column and as an argument")
            seq = cols.pop(_SEQ)
        extra = set(cols) - set(schema.COLUMN_NAMES)
        missing = set(schema.COLUMN_NAMES) - set(cols)
        if extra or missing:
            raise ValueError(f"columns do not match the schema: missing {sorted(missing)}, unknown {sorted(extra)}")
        arrays = {name: _column_array(name, cols[name]) for name in schema.COLUMN_NAMES}
        rows = len(arrays[schema.COLUMN_NAMES[0]])
        if any(len(a) != rows for a in arrays.values()):
            raise ValueError("columns differ in length")
        if rows > schema.MAX_BATCH_EVENTS:
            raise ValueError(f"a batch of {rows} rows is over the limit of {schema.MAX_BATCH_EVENTS}")
        if seq is None:
            if rows != count:
                raise ValueError(f"{rows} rows but count {count}: pass `seq` for a filtered batch")
        else:
            seq = _column_array(_SEQ, seq)
            if len(seq) != rows:
                raise ValueError(f"seq has {len(seq)} values for {rows} rows")
            if rows and (int(seq[0]) < first_seq or int(seq[-1]) >= first_seq + count or np.any(seq[1:] <= seq[:-1])):
                raise ValueError("seq must increase strictly within first_seq .. first_seq + count - 1")
        items = self._payload_items(payloads, rows)

        p = self._pending.get(key)
        if p is not None and (p.first_seq + p.count != first_seq or p.rows + rows > schema.MAX_BATCH_EVENTS
                              or len(p.payloads) + len(items) > schema.MAX_PAYLOADS
                              or len(p.parts) >= _MAX_PARTS):
            self._write_pending(key)
            p = None
        if p is None:
            p = self._pending[key] = _Pending(first_seq)
        p.payloads.extend((row + p.rows, data) for row, data in items)
        p.parts.append(_Part(first_seq, count, arrays, seq))
        p.count += count
        p.rows += rows
        if p.rows >= self.block_events:
            self._write_pending(key)

    @staticmethod
    def _payload_items(payloads, rows: int) -> list[tuple[int, bytes]]:
        if not payloads:
            return []
        pairs = payloads.items() if isinstance(payloads, Mapping) else payloads
        items = sorted((int(row), bytes(data)) for row, data in pairs)
        if len(items) > schema.MAX_PAYLOADS:
            raise ValueError(f"{len(items)} payloads is over the limit of {schema.MAX_PAYLOADS}")
        rows_seen = [row for row, _ in items]
        if any(not 0 <= r < rows for r in rows_seen) or len(set(rows_seen)) != len(rows_seen):
            raise ValueError("payload rows must be distinct row indexes of the batch")
        return items

    def _write_pending(self, key: tuple[int, int, int]) -> None:
        p = self._pending.pop(key)
        parts = p.parts
        cols = parts[0].cols if len(parts) == 1 else {
            name: np.concatenate([part.cols[name] for part in parts]) for name in schema.COLUMN_NAMES}
        seq = None
        if any(part.seq is not None for part in parts):
            # Merging a filtered batch with unfiltered ones: the unfiltered rows get their seq spelled out.
            seq = np.concatenate([part.seq if part.seq is not None else
                                  np.arange(part.count, dtype=_U64) + np.uint64(part.first_seq) for part in parts])
        payload = _encode_exits(*key, p.first_seq, p.count, cols, seq, p.payloads, self._cctx)
        self._append_block(BlockType.EXITS, payload, (*key, p.first_seq, p.count, p.rows))
        self.events += p.rows
        if p.rows:
            totals = self._totals.setdefault(key[0], np.zeros(256, np.int64))
            totals += np.bincount(cols["reason"], minlength=256)

    def write_record(self, kind: str, record: Mapping) -> None:
        """Write a vm-start, vm-end or gap record (schema.MSG_*) after everything gathered so far."""
        btype = RECORD_BLOCK_TYPES.get(kind)
        if btype is None:
            raise ValueError(f"unknown record kind {kind!r} (known: {', '.join(RECORD_BLOCK_TYPES)})")
        record = dict(record)
        if kind == schema.MSG_GAP:
            bad = [k for k in _GAP_FIELDS if not _is_int(record.get(k), 0, _M64)]
            if bad:
                raise ValueError(f"gap record needs integer {', '.join(bad)}")
        try:
            raw = _pack(record)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{kind} record cannot be stored: {e}") from None
        if len(raw) > MAX_RECORD_BYTES:
            raise ValueError(f"{kind} record of {len(raw)} bytes is over the limit of {MAX_RECORD_BYTES}")
        self.flush()
        ids = tuple(v if _is_int(v, 0, INDEX_NO_ID) else INDEX_NO_ID for v in
                    (record.get("vm"), record.get("vcpu"), record.get("epoch")))
        self._append_block(btype, self._cctx.compress(raw), (*ids, 0, 0, 0))

    def flush(self, fsync: bool = False) -> None:
        """Write every gathered batch as a block; with fsync, also make the file durable."""
        for key in list(self._pending):
            self._write_pending(key)
        if fsync:
            self._fsync()

    def _fsync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise TraceWriteError(self.path, f"fsync failed: {e.strerror}", e.errno, offset=self._offset) from None

    def statistics(self) -> dict:
        return {"blocks": self.blocks, "events": self.events, "bytes": self._offset,
                "pending_events": sum(p.rows for p in self._pending.values()), "failed": self._failed}

    def close(self, fsync: bool = False) -> None:
        """Flush, write the index footer and close. After a failed write it only closes the file."""
        if self._closed:
            return
        try:
            if self._failed is None and getattr(self, "_resumed", False):
                self.flush()
            elif self._failed is None:
                self.flush()
                index_at = self._offset
                blocks = None if self._index is None else {
                    name: np.frombuffer(self._index[name], dtype=np.uint64).astype(dt).tobytes()
                    for name, dt in INDEX_FIELDS}
                footer = {
                    "blocks": blocks,
                    "events": self.events,
                    "by_vm": {vm: {int(r): int(n) for r, n in enumerate(t) if n} for vm, t in self._totals.items()},
                }
                payload = self._cctx.compress(_pack(footer))
                if len(payload) <= MAX_BLOCK_BYTES:
                    self._append(_frame_block(BlockType.INDEX, payload) + _TRAILER.pack(index_at, TRAILER_MAGIC))
                if fsync:
                    self._fsync()
        finally:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- Reader ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One block in file order: an exit batch, or a record map (vm-start, vm-end, gap, index)."""

    offset: int
    type: int
    kind: str
    record: dict | None = None
    batch: ExitBatch | None = None


@dataclass(frozen=True, slots=True)
class ExitBlockRef:
    """What the scan knows about an EXITS block without decompressing it."""

    offset: int
    vm: int
    vcpu: int
    epoch: int
    first_seq: int
    count: int
    n_rows: int
    t_first: int | None
    t_last: int | None
    payloads: int


@dataclass(frozen=True)
class StreamInfo:
    vm: int
    vcpu: int
    epoch: int
    blocks: int
    events: int  # rows stored
    covered: int  # sequence numbers accounted for (events plus those a record-time filter dropped)
    first_seq: int
    last_seq: int  # the last sequence number covered
    t_first: int | None
    t_last: int | None


@dataclass(frozen=True)
class Discontinuity:
    """Sequence numbers of a stream that no block holds and no gap record explains (kind
    "missing"), or that two blocks both claim (kind "overlap"). `offset`: the block after the
    hole, or the vm-end record that says how far the stream went."""

    vm: int
    vcpu: int
    epoch: int
    first_seq: int
    count: int
    offset: int
    kind: str = "missing"


@dataclass(slots=True)
class _Entry:
    offset: int
    type: int
    length: int
    record: dict | None = None  # record blocks and the index footer
    ref: ExitBlockRef | None = None  # EXITS blocks


_MAX_WARNINGS = 20


class TraceReader:
    """Reads a trace file; safe on truncated, corrupt and hostile files.

    Opening scans the whole file once, block by block (one block in memory at a time), checking
    every crc and reading EXITS heads and records; columns are decompressed only when asked for.
    A torn tail (a crash while writing) ends the scan and is reported in `torn_tail`. Corruption
    elsewhere raises TraceFormatError, or with skip_corrupt=True is listed in `corrupt` and the
    scan goes on where the next block can still be found.
    """

    def __init__(self, path, *, skip_corrupt: bool = False) -> None:
        self.path = os.fspath(path)
        self.skip_corrupt = skip_corrupt
        self.torn_tail: tuple[int, str] | None = None
        self.corrupt: list[tuple[int, str]] = []
        self.warnings: list[str] = []
        self.unknown_blocks = 0
        self.footer: dict | None = None
        self.closed_cleanly = False
        self._entries: list[_Entry] = []
        self._dctx = zstandard.ZstdDecompressor()
        self._discontinuities: list[Discontinuity] | None = None
        self._record_bytes = 0
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise TraceFormatError(self.path, None, "no such file") from None
        except IsADirectoryError:
            raise TraceFormatError(self.path, None, "is a directory, not a trace file") from None
        except OSError as e:
            raise TraceFormatError(self.path, None, f"cannot open: {e.strerror}") from None
        try:
            self.size = os.fstat(self._f.fileno()).st_size
            self._read_header()
            self._scan()
            self._check_footer()
        except BaseException:
            self._f.close()
            raise

    # Opening ------------------------------------------------------------------------------------
    def _read_at(self, offset: int, n: int) -> bytes:
        self._f.seek(offset)
        return self._f.read(n)

    def _read_header(self) -> None:
        raw = self._read_at(0, _FILE_HEAD.size)
        if not raw:
            raise TraceFormatError(self.path, None, "empty file, not a vmsup trace")
        if raw[:len(MAGIC)] != MAGIC[:len(raw)]:
            raise TraceFormatError(self.path, 0, "not a vmsup trace (bad magic)")
        if len(raw) < _FILE_HEAD.size:
            raise TraceFormatError(self.path, len(raw), "truncated file header")
        _, version, n = _FILE_HEAD.unpack(raw)
        if version > FORMAT_VERSION:
            raise TraceFormatError(self.path, None, f"written by a newer vmsup (format {version}); "
                                   f"this vmsup reads format {FORMAT_VERSION}")
        if version < 1:
            raise TraceFormatError(self.path, len(MAGIC), f"unknown trace format version {version}")
        if n > MAX_HEADER_BYTES:
            raise TraceFormatError(self.path, len(MAGIC) + 2, f"header length {n} is over the limit of {MAX_HEADER_BYTES}")
        rest = self._read_at(_FILE_HEAD.size, n + _U32.size)
        if len(rest) < n + _U32.size:
            raise TraceFormatError(self.path, _FILE_HEAD.size + len(rest), "truncated file header")
        compressed = rest[:n]
        if zlib.crc32(compressed) != _U32.unpack_from(rest, n)[0]:
            raise TraceFormatError(self.path, _FILE_HEAD.size, "file header crc32 mismatch")
        try:
            header = _unpack(_decompress(self._dctx, compressed, MAX_HEADER_BYTES, "file header"), "file header")
            _need(isinstance(header, dict) and isinstance(header.get("schema"), dict)
                  and isinstance(header.get("run"), dict), "file header lacks schema or run metadata")
        except _Corrupt as e:
            raise TraceFormatError(self.path, _FILE_HEAD.size, str(e)) from None
        schema_version = header["schema"].get("version")
        if not _is_int(schema_version, 1, 1 << 31):
            raise TraceFormatError(self.path, _FILE_HEAD.size, f"bad schema version {schema_version!r}")
        if schema_version > schema.SCHEMA_VERSION:
            raise TraceFormatError(self.path, None, f"written by a newer vmsup (event schema {schema_version}); "
                                   f"this vmsup reads schema {schema.SCHEMA_VERSION}")
        self.format_version = version
        self.header = header
        self._data_start = _FILE_HEAD.size + n + _U32.size

    def _warn(self, message: str) -> None:
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(message)

    def _torn(self, offset: int, reason: str) -> None:
        self.torn_tail = (offset, reason)

    def _bad(self, offset: int, reason: str, resumable: bool = False) -> bool:
        """Corruption at `offset`: raise, or (skip_corrupt) note it; True when the scan can go on."""
        if not self.skip_corrupt:
            raise TraceFormatError(self.path, offset, reason)
        self.corrupt.append((offset, reason))
        return resumable

    def _zero_from(self, offset: int) -> bool:
        # Some file systems leave zeros where a crash interrupted an append: that is a torn tail.
        self._f.seek(offset)
        while chunk := self._f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return False
        return True

    def _whole_block_in(self, start: int) -> bool:
        """Does a whole, crc-valid block start anywhere after `start`? Tells a corrupt length in the
        middle of a file from a block torn at its end."""
        rest = self._read_at(start, self.size - start)  # shorter than one block, so bounded
        at = rest.find(BLOCK_MAGIC)
        for _ in range(64):
            if at < 0:
                return False
            if at + _BLOCK_HEAD.size <= len(rest):
                _, btype, length, crc = _BLOCK_HEAD.unpack_from(rest, at)
                body = rest[at + _BLOCK_HEAD.size:at + _BLOCK_HEAD.size + length]
                if len(body) == length and _block_crc(btype, body) == crc:
                    return True
            at = rest.find(BLOCK_MAGIC, at + 1)
        return False

    def _scan(self) -> None:
        pos, size = self._data_start, self.size
        head_size = _BLOCK_HEAD.size
        while pos < size:
            remaining = size - pos
            raw = self._read_at(pos, min(remaining, head_size))
            if remaining == _TRAILER.size and raw[:4] != BLOCK_MAGIC and raw[8:] == TRAILER_MAGIC:
                self._check_trailer(pos, raw)
                return
            if remaining < head_size:
                last = self._entries[-1].type if self._entries else None
                self._torn(pos, "partial trailer" if last == BlockType.INDEX
                           else f"partial block header ({remaining} of {head_size} bytes)")
                return
            magic, btype, length, crc = _BLOCK_HEAD.unpack(raw)
            if magic != BLOCK_MAGIC:
                if self._zero_from(pos):
                    self._torn(pos, "zero-filled tail")
                else:
                    self._bad(pos, f"bad block magic {magic!r}")
                return  # no length to trust: the next block cannot be found
            if length > MAX_BLOCK_BYTES:
                self._bad(pos, f"block length {length} is over the limit of {MAX_BLOCK_BYTES}")
                return
            end = pos + head_size + length
            if end > size:
                if self._whole_block_in(pos + head_size):
                    self._bad(pos, f"block length {length} runs past the end of the file, yet whole blocks follow")
                else:
                    self._torn(pos, f"partial block ({remaining - head_size} of {length} payload bytes)")
                return
            payload = self._read_at(pos + head_size, length)
            if _block_crc(btype, payload) != crc:
                if end == size:
                    self._torn(pos, "bad crc32 in the last block")
                    return
                if not self._bad(pos, "block crc32 mismatch", resumable=self._read_at(end, 4) == BLOCK_MAGIC):
                    return
            else:
                try:
                    self._add_entry(pos, btype, payload)
                except _Corrupt as e:
                    if not self._bad(pos, str(e), resumable=True):
                        return
            pos = end
        if self._entries and self._entries[-1].type == BlockType.INDEX:
            # The index and the trailer go out in one write(): an index without one is torn.
            self._torn(pos, "no trailer after the index block")

    def _add_entry(self, pos: int, btype: int, payload: bytes) -> None:
        if btype == BlockType.EXITS:
            head, body_at = _read_exits_head(memoryview(payload))
            t = head["t"] or (None, None)
            ref = ExitBlockRef(pos, head["vm"], head["vcpu"], head["epoch"], head["first_seq"], head["count"],
                               head["n_rows"], t[0], t[1], head["payloads"])
            self._entries.append(_Entry(pos, btype, len(payload), ref=ref))
        elif btype in _KIND_OF_TYPE and btype != BlockType.INDEX:
            kind = _KIND_OF_TYPE[btype]
            raw = self._budgeted(_decompress(self._dctx, payload, MAX_RECORD_BYTES, f"{kind} record"), pos)
            record = _unpack(raw, f"{kind} record")
            _need(isinstance(record, dict), f"{kind} record is not a map")
            if btype == BlockType.GAP:
                _need(all(_is_int(record.get(k), 0, _M64) for k in _GAP_FIELDS), "gap record lacks integer fields")
            self._entries.append(_Entry(pos, btype, len(payload), record=record))
        elif btype == BlockType.INDEX:
            raw = self._budgeted(_decompress(self._dctx, payload, MAX_BLOCK_BYTES, "index footer"), pos)
            footer = _unpack(raw, "index footer")
            _need(isinstance(footer, dict), "index footer is not a map")
            self._entries.append(_Entry(pos, btype, len(payload), record=footer))
        else:
            self.unknown_blocks += 1
            self._warn(f"skipped a block of unknown type {btype} at offset {pos}")

    def _budgeted(self, raw: bytes, pos: int) -> bytes:
        self._record_bytes += len(raw)
        if self._record_bytes > MAX_RECORDS_TOTAL:
            raise TraceFormatError(self.path, pos, f"records add up to more than {MAX_RECORDS_TOTAL >> 20} MiB "
                                   "decompressed; not a plausible trace")
        return raw

    def _check_trailer(self, pos: int, raw: bytes) -> None:
        index_at, _ = _TRAILER.unpack(raw)
        last = self._entries[-1] if self._entries else None
        if last is None or last.type != BlockType.INDEX or last.offset != index_at:
            self._warn(f"the trailer at offset {pos} does not point at the index block just before it")
            return
        self.closed_cleanly = True

    def _check_footer(self) -> None:
        if not self.closed_cleanly:
            return
        footer = self._entries[-1].record
        listed = footer.get("blocks")
        if listed is not None:
            blocks = _index_columns(listed)
            mine = [e for e in self._entries if e.type != BlockType.INDEX]
            if blocks is None or len(blocks["offset"]) != len(mine) or not (
                    np.array_equal(blocks["offset"], [e.offset for e in mine])
                    and np.array_equal(blocks["type"], [e.type for e in mine])):
                self._warn("the index footer disagrees with the blocks in the file; ignoring it")
                self.closed_cleanly = False
                return
            footer = dict(footer, blocks=blocks)
        self.footer = footer

    # Context manager ----------------------------------------------------------------------------
    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TraceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # What the scan found ------------------------------------------------------------------------
    @property
    def run(self) -> dict:
        return self.header["run"]

    def exit_blocks(self) -> list[ExitBlockRef]:
        """Every EXITS block in file order, as the scan saw it (nothing decompressed)."""
        return [e.ref for e in self._entries if e.ref is not None]

    @property
    def event_count(self) -> int:
        return sum(e.ref.n_rows for e in self._entries if e.ref is not None)

    @property
    def time_range(self) -> tuple[int, int] | None:
        """(first, last) t_exit over every stored event, or None for a trace without events."""
        refs = [r for r in self.exit_blocks() if r.n_rows]
        if not refs:
            return None
        return min(r.t_first for r in refs), max(r.t_last for r in refs)

    def streams(self) -> list[StreamInfo]:
        by_key: dict[tuple[int, int, int], list[ExitBlockRef]] = {}
        for ref in self.exit_blocks():
            by_key.setdefault((ref.vm, ref.vcpu, ref.epoch), []).append(ref)
        out = []
        for (vm, vcpu, epoch), refs in sorted(by_key.items()):
            with_rows = [r for r in refs if r.n_rows]
            out.append(StreamInfo(
                vm, vcpu, epoch, blocks=len(refs), events=sum(r.n_rows for r in refs),
                covered=sum(r.count for r in refs), first_seq=min(r.first_seq for r in refs),
                last_seq=max(r.first_seq + r.count for r in refs) - 1,
                t_first=min(r.t_first for r in with_rows) if with_rows else None,
                t_last=max(r.t_last for r in with_rows) if with_rows else None))
        return out

    def records(self, kind: str | None = None) -> list[dict]:
        """Record maps (vm-start, vm-end, gap) in file order; all kinds when kind is None."""
        if kind is not None and kind not in RECORD_BLOCK_TYPES:
            raise ValueError(f"unknown record kind {kind!r}")
        want = RECORD_BLOCK_TYPES.get(kind) if kind else None
        return [e.record for e in self._entries if e.type in _KIND_OF_TYPE and e.type not in
                (BlockType.EXITS, BlockType.INDEX) and (want is None or e.type == want)]

    @property
    def gaps(self) -> list[dict]:
        return self.records(schema.MSG_GAP)

    # Decoding -----------------------------------------------------------------------------------
    def read_batch(self, ref: ExitBlockRef, columns: Iterable[str] | None = None) -> ExitBatch:
        """Decompress and decode one EXITS block (with `columns`, only those and seq: analyses
        that need a few columns skip decoding the rest). Raises TraceFormatError on a bad body."""
        entry = self._by_offset().get(ref.offset)
        if entry is None or entry.ref is None:
            raise KeyError(f"no exits block at offset {ref.offset}")
        payload = self._read_at(entry.offset + _BLOCK_HEAD.size, entry.length)
        if len(payload) != entry.length or _block_crc(BlockType.EXITS, payload) != _BLOCK_HEAD.unpack(
                self._read_at(entry.offset, _BLOCK_HEAD.size))[3]:
            raise TraceFormatError(self.path, entry.offset, "block changed since the file was opened")
        try:
            head, body_at = _read_exits_head(memoryview(payload))
            return _decode_exits_body(entry.offset, head, memoryview(payload)[body_at:], self._dctx, columns)
        except _Corrupt as e:
            raise TraceFormatError(self.path, entry.offset, str(e)) from None

    def _by_offset(self) -> dict[int, _Entry]:
        cache = getattr(self, "_offsets", None)
        if cache is None:
            cache = self._offsets = {e.offset: e for e in self._entries}
        return cache

    def blocks(self) -> Iterator[Block]:
        """Every known block in file order, decoded (unknown block types are skipped)."""
        for e in self._entries:
            if e.ref is not None:
                batch = self._read_batch_or_skip(e.ref)
                if batch is not None:
                    yield Block(e.offset, e.type, schema.MSG_EXITS, batch=batch)
            else:
                yield Block(e.offset, e.type, _KIND_OF_TYPE[e.type], record=e.record)

    def _read_batch_or_skip(self, ref: ExitBlockRef, columns: Iterable[str] | None = None) -> ExitBatch | None:
        try:
            return self.read_batch(ref, columns)
        except TraceFormatError as e:
            if not self.skip_corrupt:
                raise
            self.corrupt.append((ref.offset, e.reason))
            return None

    def exit_batches(self, vm: int | None = None, vcpu: int | None = None, epoch: int | None = None,
                     where: EventFilter | None = None, columns: Iterable[str] | None = None) -> Iterator[ExitBatch]:
        """Decoded EXITS blocks of the matching streams, in file order, unfiltered inside
        (`columns`: decode only these, as read_batch)."""
        for ref in self.exit_blocks():
            if ((vm is not None and ref.vm != vm) or (vcpu is not None and ref.vcpu != vcpu)
                    or (epoch is not None and ref.epoch != epoch)
                    or (where is not None and not where.matches_stream(ref.vm, ref.vcpu, ref.epoch))):
                continue
            batch = self._read_batch_or_skip(ref, columns)
            if batch is not None:
                yield batch

    def exits(self, vm: int | None = None, vcpu: int | None = None, epoch: int | None = None,
              where: EventFilter | None = None) -> dict[str, np.ndarray]:
        """Matching events of every block, concatenated in file order: the schema's columns plus
        `seq`, `vm`, `vcpu` and `epoch`."""
        names = (*schema.COLUMN_NAMES, _SEQ)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in (*names, *STREAM_DTYPES)}
        for batch in self.exit_batches(vm, vcpu, epoch, where):
            cols = batch.columns
            if where is not None:
                keep = where.mask(cols, vm=batch.vm, vcpu=batch.vcpu, epoch=batch.epoch)
                cols = {name: cols[name][keep] for name in names}
            n = len(cols[_SEQ])
            for name in names:
                parts[name].append(cols[name])
            for name, value in (("vm", batch.vm), ("vcpu", batch.vcpu), ("epoch", batch.epoch)):
                parts[name].append(np.full(n, value, STREAM_DTYPES[name]))
        dtypes = {**schema.COLUMN_DTYPES, **STREAM_DTYPES}
        return {name: np.concatenate(p) if p else np.empty(0, dtypes[name]) for name, p in parts.items()}

    def payloads(self, vm: int | None = None, vcpu: int | None = None,
                 epoch: int | None = None) -> dict[tuple[int, int, int, int], bytes]:
        """Full data of string I/O events: {(vm, vcpu, epoch, seq): bytes}."""
        out = {}
        for ref in self.exit_blocks():
            if not ref.payloads or (vm is not None and ref.vm != vm) or (vcpu is not None and ref.vcpu != vcpu) \
                    or (epoch is not None and ref.epoch != epoch):
                continue
            batch = self._read_batch_or_skip(ref)
            if batch is None:
                continue
            seq = batch.columns[_SEQ]
            for row, data in batch.payloads.items():
                out[(batch.vm, batch.vcpu, batch.epoch, int(seq[row]))] = data
        return out

    # Sequence accounting ------------------------------------------------------------------------
    @property
    def unexplained_gaps(self) -> list[Discontinuity]:
        """Holes in a stream's sequence numbers that no gap record explains, and overlaps."""
        if self._discontinuities is None:
            self._discontinuities = self._find_discontinuities()
        return self._discontinuities

    def _find_discontinuities(self) -> list[Discontinuity]:
        explained: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
        for g in self.gaps:
            explained.setdefault((g["vm"], g["vcpu"], g["epoch"]), []).append(
                (g["first_missing"], g["first_missing"] + g["count"]))
        ends: dict[tuple[int, int, int], tuple[int, int]] = {}  # how far vm-end says each stream went
        for e in self._entries:
            if e.type == BlockType.VM_END:
                rec = e.record
                final = rec.get("final_seq")  # the next seq of each vCPU: a list by vCPU, or a map
                if isinstance(final, list):
                    final = dict(enumerate(final))
                if not (_is_int(rec.get("vm"), 0, _M64) and _is_int(rec.get("epoch"), 0, _M64)
                        and isinstance(final, dict)):
                    continue
                for vcpu, n in final.items():
                    vcpu = int(vcpu) if isinstance(vcpu, str) and vcpu.isdigit() else vcpu
                    if _is_int(vcpu, 0, _M64) and _is_int(n, 0, _M64):
                        ends[(rec["vm"], vcpu, rec["epoch"])] = (n, e.offset)
        by_key: dict[tuple[int, int, int], list[ExitBlockRef]] = {}
        for ref in self.exit_blocks():
            by_key.setdefault((ref.vm, ref.vcpu, ref.epoch), []).append(ref)
        for key in ends:
            by_key.setdefault(key, [])

        out: list[Discontinuity] = []

        def missing(key, lo: int, hi: int, offset: int) -> None:
            for a, b in _subtract(lo, hi, explained.get(key, [])):
                out.append(Discontinuity(*key, a, b - a, offset))

        for key, refs in sorted(by_key.items()):
            expected = 0  # sequence numbers of a stream start at 0
            for ref in refs:
                if ref.first_seq > expected:
                    missing(key, expected, ref.first_seq, ref.offset)
                elif ref.first_seq < expected:
                    out.append(Discontinuity(*key, ref.first_seq, min(expected, ref.first_seq + ref.count)
                                             - ref.first_seq, ref.offset, "overlap"))
                expected = max(expected, ref.first_seq + ref.count)
            if key in ends and ends[key][0] > expected:
                missing(key, expected, ends[key][0], ends[key][1])
        return out


def _index_columns(listed) -> dict[str, np.ndarray] | None:
    """The footer's block list as numpy columns, or None when it is malformed."""
    if not isinstance(listed, dict):
        return None
    out = {}
    for name, dt in INDEX_FIELDS:
        raw = listed.get(name)
        if not isinstance(raw, bytes) or len(raw) % np.dtype(dt).itemsize:
            return None
        out[name] = np.frombuffer(raw, dtype=dt)
    return out if len({len(c) for c in out.values()}) == 1 else None


def _subtract(lo: int, hi: int, intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) minus the union of `intervals`, as sorted disjoint intervals."""
    left = [(lo, hi)]
    for a, b in sorted(intervals):
        nxt = []
        for x, y in left:
            if b <= x or a >= y:
                nxt.append((x, y))
                continue
            if x < a:
                nxt.append((x, a))
            if b < y:
                nxt.append((b, y))
        left = nxt
    return left
