"""The EXITS block: one batch of one stream (vm, vcpu, epoch) of exit events.

    u32 n  msgpack head[n]  zstd(column bytes ... [msgpack payload list])

The head stays uncompressed (CTF's packet context) so a reader lists streams, sequence ranges and
time ranges without decompressing. It records each column's encoding (codec.py).

Sequence numbers of a stream start at 0. A record-time filter leaves a `seq` column (and, from
schema 3 on, the `handle_ns` it kept: tracetool/handling.py); a batch
whose events were all filtered out is still written (n_rows 0), so its sequence range stays
accounted for. A block holds every column of the schema it was written with: a column added to
the schema later (one with a `missing` value) may be absent, and reads as its `missing` value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .. import schema
from . import codec
from .format import MAX_BLOCK_BYTES, MAX_HEAD_BYTES, STREAM_ID_LIMIT, U32, U64_LIMIT, decompress, is_int, need, pack, unpack

SEQ = codec.SEQ
HANDLE = codec.HANDLE


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
        return len(self.columns[SEQ])


def encode_exits(vm: int, vcpu: int, epoch: int, first_seq: int, count: int, cols: dict[str, np.ndarray],
                 seq: np.ndarray | None, payloads: list[tuple[int, bytes]], cctx) -> bytes:
    """The payload of an EXITS block. `cols`: every required column of the schema, and the
    optional ones the caller has."""
    names = tuple(name for name in (*schema.COLUMN_NAMES, HANDLE) if name in cols) + ((SEQ,) if seq is not None else ())
    rows = len(cols[schema.COLUMN_NAMES[0]])
    values = dict(cols, **({SEQ: seq} if seq is not None else {}))
    u64 = {name: codec.to_u64(values[name]) for name in names}
    encodings, parts = [], []
    for name in codec.storage_order(names):
        enc, raw = codec.encode_column(name, values[name], u64)
        encodings.append(enc)
        parts.append(raw)
    payload_bytes = pack([[row, data] for row, data in payloads]) if payloads else b""
    parts.append(payload_bytes)
    body = b"".join(parts)
    t = cols["t_exit"]
    head = {
        "vm": vm, "vcpu": vcpu, "epoch": epoch, "first_seq": first_seq, "count": count, "n_rows": rows,
        "has_seq": seq is not None, "t": [int(t.min()), int(t.max())] if rows else None,
        "encodings": encodings, "payloads": len(payloads), "payload_bytes": len(payload_bytes),
        "body": len(body),
    }
    head_bytes = pack(head)
    return U32.pack(len(head_bytes)) + head_bytes + cctx.compress(body)


def _check_head(head) -> dict:
    need(isinstance(head, dict), "exits block head is not a map")
    for key in ("vm", "vcpu", "epoch"):
        need(is_int(head.get(key), 0, STREAM_ID_LIMIT), f"exits block head: bad {key}")
    need(is_int(head.get("first_seq"), 0, U64_LIMIT), "exits block head: bad first_seq")
    need(is_int(head.get("count"), 1, U64_LIMIT), "exits block head: bad count")
    rows = head.get("n_rows")
    need(is_int(rows, 0, schema.MAX_BATCH_EVENTS + 1) and rows <= head["count"], "exits block head: bad n_rows")
    need(isinstance(head.get("has_seq"), bool), "exits block head: bad has_seq")
    need(head["has_seq"] or rows == head["count"], "exits block without a seq column must have count rows")
    t = head.get("t")
    need(t is None if rows == 0 else (isinstance(t, list) and len(t) == 2
                                       and all(is_int(x, -(1 << 63), 1 << 63) for x in t) and t[0] <= t[1]),
         "exits block head: bad time range")
    need(is_int(head.get("payloads"), 0, schema.MAX_PAYLOADS + 1) and head["payloads"] <= rows,
         "exits block head: bad payload count")
    need(is_int(head.get("payload_bytes"), 0, MAX_BLOCK_BYTES + 1), "exits block head: bad payload size")
    need((head["payloads"] == 0) == (head["payload_bytes"] == 0), "exits block head: payload count and size disagree")
    encodings = head.get("encodings")
    need(isinstance(encodings, list), "exits block head: no column encodings")
    required = set(schema.REQUIRED_COLUMNS) | ({SEQ} if head["has_seq"] else set())
    allowed = required | set(schema.COLUMN_NAMES) | ({HANDLE} if head["has_seq"] else set())
    names = [e["name"] if isinstance(e, dict) and isinstance(e.get("name"), str) else None for e in encodings]
    need(len(set(names)) == len(names) and required <= set(names) <= allowed,
         f"exits block columns {names} do not match schema version {schema.SCHEMA_VERSION}")
    size = head["payload_bytes"]
    seen: set[str] = set()
    for enc in encodings:
        name = enc["name"]
        need(enc.get("dtype") == schema.COLUMN_DTYPES[name].str, f"column {name!r}: dtype {enc.get('dtype')!r} is not the schema's")
        need(enc.get("enc") in codec.ENCODINGS, f"column {name!r}: unknown encoding {enc.get('enc')!r}")
        need(enc.get("width") in codec.WIDTHS, f"column {name!r}: bad width")
        need(is_int(enc.get("base"), -(1 << 63), 1 << 63), f"column {name!r}: bad base")
        if enc["enc"] == "delta" and rows:
            need(is_int(enc.get("first"), 0, U64_LIMIT), f"column {name!r}: bad first value")
        ref = enc.get("ref")
        if ref is not None:
            need(enc["enc"] == "delta" and ref in seen and ref != name, f"column {name!r}: bad reference {ref!r}")
        seen.add(name)
        size += codec.stored_values(enc, rows) * enc["width"]
    need(head.get("body") == size <= MAX_BLOCK_BYTES, "exits block head: body size does not match its columns")
    return head


def read_exits_head(payload: memoryview) -> tuple[dict, int]:
    """The checked, uncompressed head of an EXITS block and where its compressed body starts.
    Raises format.Corrupt."""
    need(len(payload) >= U32.size, "exits block shorter than its head length")
    (n,) = U32.unpack_from(payload)
    need(n <= MAX_HEAD_BYTES and U32.size + n <= len(payload), f"exits block head length {n} is out of range")
    head = _check_head(unpack(payload[U32.size:U32.size + n], "exits block head"))
    return head, U32.size + n


def decode_exits_body(offset: int, head: dict, compressed, dctx, columns: Iterable[str] | None = None) -> ExitBatch:
    """Decompress and decode an EXITS block's columns (with `columns`, only those, plus seq and
    the columns they are delta-coded against); raises format.Corrupt."""
    body = decompress(dctx, compressed, head["body"], "exits block body")
    need(len(body) == head["body"], "exits block body is shorter than its head says")
    rows = head["n_rows"]
    wanted = None
    if columns is not None:
        wanted = {*columns, SEQ, HANDLE}
        for enc in reversed(head["encodings"]):  # a referenced column comes before its user
            if enc["name"] in wanted and enc.get("ref") is not None:
                wanted.add(enc["ref"])
    decoded: dict[str, np.ndarray] = {}
    u64: dict[str, np.ndarray] = {}
    pos = 0
    view = memoryview(body)
    for enc in head["encodings"]:
        size = codec.stored_values(enc, rows) * enc["width"]
        if wanted is not None and enc["name"] not in wanted:
            pos += size
            continue
        col = codec.decode_column(enc, view[pos:pos + size], rows, u64)
        decoded[enc["name"]] = col
        u64[enc["name"]] = codec.to_u64(col)
        pos += size
    first, count = head["first_seq"], head["count"]
    if head["has_seq"]:
        seq = decoded[SEQ]
        need(not rows or (int(seq[0]) >= first and int(seq[-1]) - first < count
                          and bool(np.all(seq[1:] > seq[:-1]))),
             "seq column is not increasing inside the block's sequence range")
    else:
        need(first + count <= U64_LIMIT, "sequence range overflows")
        seq = np.arange(rows, dtype=codec.U64) + np.uint64(first)
    stored = {enc["name"] for enc in head["encodings"]}
    columns_out = {}
    for name in schema.COLUMN_NAMES:
        if name in decoded:
            columns_out[name] = decoded[name]
        elif name not in stored and (wanted is None or name in wanted):
            columns_out[name] = schema.missing_column(name, rows)  # written before the column existed
    columns_out[SEQ] = seq
    if HANDLE in decoded:  # kept by a record-time filter (schema 3 on)
        columns_out[HANDLE] = decoded[HANDLE]
    if rows and "t_exit" in columns_out:
        t = columns_out["t_exit"]
        need([int(t.min()), int(t.max())] == head["t"], "t_exit values disagree with the block's time range")
    payloads: dict[int, bytes] = {}
    if head["payloads"]:
        items = unpack(view[pos:], "exits block payloads")
        need(isinstance(items, list) and len(items) == head["payloads"], "exits block payloads: bad list")
        for item in items:
            need(isinstance(item, list) and len(item) == 2 and is_int(item[0], 0, rows)
                 and isinstance(item[1], bytes) and item[0] not in payloads, "exits block payloads: bad entry")
            payloads[item[0]] = item[1]
    return ExitBatch(offset, head["vm"], head["vcpu"], head["epoch"], first, count, columns_out, payloads,
                     head["encodings"])
