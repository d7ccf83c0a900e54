"""TraceWriter: writes one trace file (format.py's layout), new or continued after a crash."""

from __future__ import annotations

import errno as errno_mod
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import zstandard

from .. import messages, schema
from ..run_files import open_private
from .block_index import BlockIndex
from .codec import HANDLE, SEQ, U64
from .exits_block import encode_exits
from .format import (DEFAULT_BLOCK_EVENTS, FILE_HEAD, FORMAT_VERSION, INDEX_NO_ID, MAGIC,
                     MAX_BLOCK_BYTES, MAX_HEADER_BYTES, MAX_RECORD_BYTES, RECORD_BLOCK_TYPES,
                     STREAM_ID_LIMIT, TRAILER, TRAILER_MAGIC, U32, U64_LIMIT, ZSTD_LEVEL, BlockType,
                     TraceWriteError, frame_block, is_int, pack)

_MAX_PARTS = 4096  # batches gathered into one block (batches a filter emptied add no rows)


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
    if not is_int(value, 0, STREAM_ID_LIMIT):
        raise ValueError(f"{what} must be an integer in 0..{STREAM_ID_LIMIT - 1}, not {value!r}")
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
    holds `block_events` rows or more (bigger blocks compress better); flush() writes what is
    gathered (the recorder calls it every so often, so a crash loses little); write_record()
    flushes first, so file order follows arrival order.

    TraceWriter(path, run_meta) creates a new file. TraceWriter(path, resume=True) continues a
    trace whose writer died (a restarted recorder): it keeps every whole block, cuts a torn tail
    (or the index footer of a clean close) and appends after it; `resumed_seq` then holds
    {(vm, vcpu, epoch): next sequence number} of what the file holds. Its close writes the index
    footer over the whole file, the blocks its predecessors wrote included.
    """

    def __init__(self, path, run_meta: Mapping | None = None, *, block_events: int = DEFAULT_BLOCK_EVENTS,
                 overwrite: bool = False, resume: bool = False) -> None:
        if not 1 <= block_events <= schema.MAX_BATCH_EVENTS:
            raise ValueError(f"block_events must be in 1..{schema.MAX_BATCH_EVENTS}")
        if resume == (run_meta is not None):
            raise ValueError("a new trace needs run_meta; a resumed one takes its own")
        self.path = os.fspath(path)
        self.block_events = block_events
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._pending: dict[tuple[int, int, int], _Pending] = {}
        self._totals: dict[int, np.ndarray] = {}
        self._offset = 0
        self._failed: str | None = None
        self._closed = False
        self.events = 0  # rows written (in blocks)
        self.blocks = 0
        self.resumed_seq: dict[tuple[int, int, int], int] = {}
        # Every block, for the footer: spilled to disk as it goes, so memory stays flat (block_index.py).
        self._index = BlockIndex(os.path.dirname(self.path))
        if resume:
            self._reopen()
        else:
            self._create(run_meta, overwrite)

    def _create(self, run_meta: Mapping, overwrite: bool) -> None:
        try:
            header_map = pack({"schema": schema.schema_description(), "run": dict(run_meta),
                               "created": time.time_ns()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"run metadata cannot be stored: {e}") from None
        compressed = self._cctx.compress(header_map)
        if len(compressed) > MAX_HEADER_BYTES or len(header_map) > MAX_HEADER_BYTES:
            raise ValueError(f"run metadata is over {MAX_HEADER_BYTES} bytes")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            self._fd = open_private(self.path, flags)  # a trace holds whatever the guest wrote
        except OSError as e:
            raise TraceWriteError(self.path, f"cannot create the trace file: {e.strerror}", e.errno) from None
        try:
            self._append(FILE_HEAD.pack(MAGIC, FORMAT_VERSION, len(compressed)) + compressed
                         + U32.pack(zlib.crc32(compressed)))
        except BaseException:
            os.close(self._fd)
            raise

    def _reopen(self) -> None:
        from .reader import TraceReader  # the reader knows where the whole blocks end
        with TraceReader(self.path) as reader:
            end = reader.data_end
            self.resumed_seq = {(st.vm, st.vcpu, st.epoch): st.last_seq + 1 for st in reader.streams()}
            # The footer this writer will write lists its predecessors' blocks too, with their
            # totals: the one reading of every block's reason column a restart costs.
            for entry in reader.block_list():
                self.blocks += 1
                self._index.add(entry)
            for batch in reader.exit_batches(columns=("reason",)):
                self.events += batch.n_rows
                if batch.n_rows:
                    totals = self._totals.setdefault(batch.vm, np.zeros(256, np.int64))
                    totals += np.bincount(batch.columns["reason"], minlength=256)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise TraceWriteError(self.path, f"cannot reopen the trace file: {e.strerror}", e.errno) from None
        try:
            os.ftruncate(self._fd, end)
            os.lseek(self._fd, end, os.SEEK_SET)
        except OSError as e:
            os.close(self._fd)
            raise TraceWriteError(self.path, f"cannot reopen the trace file: {e.strerror}", e.errno) from None
        self._offset = end

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
        self._append(frame_block(btype, payload))
        self.blocks += 1
        self._index.add((offset, int(btype), *key))

    def write_exits(self, vm: int, vcpu: int, epoch: int, first_seq: int, count: int,
                    cols: Mapping[str, object], seq=None, payloads=None) -> None:
        """Add a batch of one stream. `count` sequence numbers from `first_seq` are covered; the
        rows are all of them, or (with `seq`, a record-time filter's survivors) some of them.
        `cols`: every column of the schema (one with a `missing` value may be left out: it then
        reads as unknown). `payloads`: {row: bytes} or (row, bytes) pairs, the full data of
        string I/O events."""
        key = (_stream_id(vm, "vm"), _stream_id(vcpu, "vcpu"), _stream_id(epoch, "epoch"))
        if not is_int(first_seq, 0, U64_LIMIT) or not is_int(count, 1, U64_LIMIT) or first_seq + count > U64_LIMIT:
            raise ValueError(f"bad sequence range: first_seq {first_seq!r}, count {count!r}")
        cols = dict(cols)
        if SEQ in cols:
            if seq is not None:
                raise ValueError("seq given both as a column and as an argument")
            seq = cols.pop(SEQ)
        # A filtered batch may carry the handling times the filter kept (schema.HANDLE_COLUMN).
        known = (*schema.COLUMN_NAMES, *((HANDLE,) if seq is not None else ()))
        extra = set(cols) - set(known)
        missing = set(schema.REQUIRED_COLUMNS) - set(cols)
        if extra or missing:
            raise ValueError(f"columns do not match the schema: missing {sorted(missing)}, unknown {sorted(extra)}")
        arrays = {name: _column_array(name, cols[name]) for name in known if name in cols}
        rows = len(arrays[schema.COLUMN_NAMES[0]])
        if any(len(a) != rows for a in arrays.values()):
            raise ValueError("columns differ in length")
        if rows > schema.MAX_BATCH_EVENTS:
            raise ValueError(f"a batch of {rows} rows is over the limit of {schema.MAX_BATCH_EVENTS}")
        if seq is None:
            if rows != count:
                raise ValueError(f"{rows} rows but count {count}: pass `seq` for a filtered batch")
        else:
            seq = _column_array(SEQ, seq)
            if len(seq) != rows:
                raise ValueError(f"seq has {len(seq)} values for {rows} rows")
            if rows and (int(seq[0]) < first_seq or int(seq[-1]) >= first_seq + count or np.any(seq[1:] <= seq[:-1])):
                raise ValueError("seq must increase strictly within first_seq .. first_seq + count - 1")
        items = self._payload_items(payloads, rows)

        p = self._pending.get(key)
        if p is not None and (p.first_seq + p.count != first_seq or p.rows + rows > schema.MAX_BATCH_EVENTS
                              or len(p.payloads) + len(items) > schema.MAX_PAYLOADS
                              or len(p.parts) >= _MAX_PARTS or set(p.parts[0].cols) != set(arrays)):
            self._write_pending(key)
            p = None
        if p is None:
            p = self._pending[key] = _Pending(first_seq)
        p.payloads.extend((row + p.rows, data) for row, data in items)
        p.parts.append(_Part(first_seq, count, arrays, seq))
        p.count += count
        p.rows += rows
        # By sequence numbers covered, not rows: what a gathered stream holds back stays bounded
        # under a record-time filter too (the recorder's bound on in-flight events counts on it).
        if p.count >= self.block_events:
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
            name: np.concatenate([part.cols[name] for part in parts]) for name in parts[0].cols}
        seq = None
        if any(part.seq is not None for part in parts):
            # Merging a filtered batch with unfiltered ones: the unfiltered rows get their seq spelled out.
            seq = np.concatenate([part.seq if part.seq is not None else
                                  np.arange(part.count, dtype=U64) + np.uint64(part.first_seq) for part in parts])
        payload = encode_exits(*key, p.first_seq, p.count, cols, seq, p.payloads, self._cctx)
        self._append_block(BlockType.EXITS, payload, (*key, p.first_seq, p.count, p.rows))
        self.events += p.rows
        if p.rows:
            totals = self._totals.setdefault(key[0], np.zeros(256, np.int64))
            totals += np.bincount(cols["reason"], minlength=256)

    def write_record(self, kind: str, record: Mapping, *, check: bool = True) -> None:
        """Write a record (vm-start, vm-end, gap, lifecycle, screen, input: schema.MSG_*) after
        everything gathered so far. Its message class (tracetool.messages) checks it first and a
        bad one raises ValueError (MessageError); check=False is for tests that build hostile
        traces to exercise the reader."""
        btype = RECORD_BLOCK_TYPES.get(kind)
        if btype is None:
            raise ValueError(f"unknown record kind {kind!r} (known: {', '.join(RECORD_BLOCK_TYPES)})")
        record = dict(record)
        if check:
            messages.validate_record(kind, record)
        try:
            raw = pack(record)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{kind} record cannot be stored: {e}") from None
        if len(raw) > MAX_RECORD_BYTES:
            raise ValueError(f"{kind} record of {len(raw)} bytes is over the limit of {MAX_RECORD_BYTES}")
        self.flush()
        ids = tuple(v if is_int(v, 0, INDEX_NO_ID) else INDEX_NO_ID for v in
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
                "pending_events": sum(p.rows for p in self._pending.values()), "failed": self._failed,
                "index_entries_in_memory": self._index.in_memory}

    def close(self, fsync: bool = False) -> None:
        """Flush, write the index footer and close. After a failed write it only closes the file."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self.flush()
                self._write_footer()
                if fsync:
                    self._fsync()
        finally:
            self._closed = True
            self._index.close()
            os.close(self._fd)

    def _write_footer(self) -> None:
        index_at = self._offset
        footer = {
            "blocks": self._index.columns(),  # None when too many (or the spill failed): totals only
            "events": self.events,
            "by_vm": {vm: {int(r): int(n) for r, n in enumerate(t) if n} for vm, t in self._totals.items()},
        }
        payload = self._cctx.compress(pack(footer))
        if len(payload) <= MAX_BLOCK_BYTES:
            self._append(frame_block(BlockType.INDEX, payload) + TRAILER.pack(index_at, TRAILER_MAGIC))

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
