"""TraceReader: reads a trace file (format.py's layout); safe on truncated, corrupt and hostile
files. Opening scans the file once; the query API (exit_blocks, streams, records, read_batch,
exit_batches, exits, payloads, unexplained_gaps) works from what the scan found, decompressing
columns only when asked for.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import zstandard

from .. import schema
from ..filters import EventFilter
from .accounting import Discontinuity, find_discontinuities, stream_starts
from .codec import SEQ
from .exits_block import ExitBatch, decode_exits_body, read_exits_head
from .format import (BLOCK_HEAD, BLOCK_MAGIC, FILE_HEAD, FORMAT_VERSION, GAP_FIELDS, INDEX_FIELDS, INDEX_NO_ID,
                     KIND_OF_TYPE,
                     LAZY_RECORD_TYPES, MAGIC, MAX_BLOCK_BYTES, MAX_HEADER_BYTES, MAX_RECORD_BYTES, MAX_RECORDS_TOTAL,
                     RECORD_BLOCK_TYPES, TRAILER, TRAILER_MAGIC, U32, U64_LIMIT, BlockType, Corrupt,
                     TraceFormatError, block_crc, decompress, is_int, need, unpack)

# Columns the reader adds to the schema's: which stream each row belongs to.
STREAM_DTYPES = {name: np.dtype("<u4") for name in schema.STREAM_COLUMNS}


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


@dataclass(slots=True)
class _Entry:
    offset: int
    type: int
    length: int
    record: dict | None = None  # record blocks and the index footer
    ref: ExitBlockRef | None = None  # EXITS blocks
    ids: tuple | None = None  # LAZY_RECORD_TYPES: the record's (vm, vcpu, epoch), the record itself not kept


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
        raw = self._read_at(0, FILE_HEAD.size)
        if not raw:
            raise TraceFormatError(self.path, None, "empty file, not a vmsup trace")
        if raw[:len(MAGIC)] != MAGIC[:len(raw)]:
            raise TraceFormatError(self.path, 0, "not a vmsup trace (bad magic)")
        if len(raw) < FILE_HEAD.size:
            raise TraceFormatError(self.path, len(raw), "truncated file header")
        _, version, n = FILE_HEAD.unpack(raw)
        if version > FORMAT_VERSION:
            raise TraceFormatError(self.path, None, f"written by a newer vmsup (format {version}); "
                                   f"this vmsup reads format {FORMAT_VERSION}")
        if version < 1:
            raise TraceFormatError(self.path, len(MAGIC), f"unknown trace format version {version}")
        if n > MAX_HEADER_BYTES:
            raise TraceFormatError(self.path, len(MAGIC) + 2, f"header length {n} is over the limit of {MAX_HEADER_BYTES}")
        rest = self._read_at(FILE_HEAD.size, n + U32.size)
        if len(rest) < n + U32.size:
            raise TraceFormatError(self.path, FILE_HEAD.size + len(rest), "truncated file header")
        compressed = rest[:n]
        if zlib.crc32(compressed) != U32.unpack_from(rest, n)[0]:
            raise TraceFormatError(self.path, FILE_HEAD.size, "file header crc32 mismatch")
        try:
            header = unpack(decompress(self._dctx, compressed, MAX_HEADER_BYTES, "file header"), "file header")
            need(isinstance(header, dict) and isinstance(header.get("schema"), dict)
                  and isinstance(header.get("run"), dict), "file header lacks schema or run metadata")
        except Corrupt as e:
            raise TraceFormatError(self.path, FILE_HEAD.size, str(e)) from None
        schema_version = header["schema"].get("version")
        if not is_int(schema_version, 1, 1 << 31):
            raise TraceFormatError(self.path, FILE_HEAD.size, f"bad schema version {schema_version!r}")
        if schema_version > schema.SCHEMA_VERSION:
            raise TraceFormatError(self.path, None, f"written by a newer vmsup (event schema {schema_version}); "
                                   f"this vmsup reads schema {schema.SCHEMA_VERSION}")
        self.format_version = version
        self.header = header
        self._data_start = FILE_HEAD.size + n + U32.size

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
            if at + BLOCK_HEAD.size <= len(rest):
                _, btype, length, crc = BLOCK_HEAD.unpack_from(rest, at)
                body = rest[at + BLOCK_HEAD.size:at + BLOCK_HEAD.size + length]
                if len(body) == length and block_crc(btype, body) == crc:
                    return True
            at = rest.find(BLOCK_MAGIC, at + 1)
        return False

    def _scan(self) -> None:
        pos, size = self._data_start, self.size
        head_size = BLOCK_HEAD.size
        while pos < size:
            remaining = size - pos
            raw = self._read_at(pos, min(remaining, head_size))
            if remaining == TRAILER.size and raw[:4] != BLOCK_MAGIC and raw[8:] == TRAILER_MAGIC:
                self._check_trailer(pos, raw)
                return
            if remaining < head_size:
                last = self._entries[-1].type if self._entries else None
                self._torn(pos, "partial trailer" if last == BlockType.INDEX
                           else f"partial block header ({remaining} of {head_size} bytes)")
                return
            magic, btype, length, crc = BLOCK_HEAD.unpack(raw)
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
            if block_crc(btype, payload) != crc:
                if end == size:
                    self._torn(pos, "bad crc32 in the last block")
                    return
                if not self._bad(pos, "block crc32 mismatch", resumable=self._read_at(end, 4) == BLOCK_MAGIC):
                    return
            else:
                try:
                    self._add_entry(pos, btype, payload)
                except Corrupt as e:
                    if not self._bad(pos, str(e), resumable=True):
                        return
            pos = end
        if self._entries and self._entries[-1].type == BlockType.INDEX:
            # The index and the trailer go out in one write(): an index without one is torn.
            self._torn(pos, "no trailer after the index block")

    def _add_entry(self, pos: int, btype: int, payload: bytes) -> None:
        if btype == BlockType.EXITS:
            head, body_at = read_exits_head(memoryview(payload))
            t = head["t"] or (None, None)
            ref = ExitBlockRef(pos, head["vm"], head["vcpu"], head["epoch"], head["first_seq"], head["count"],
                               head["n_rows"], t[0], t[1], head["payloads"])
            self._entries.append(_Entry(pos, btype, len(payload), ref=ref))
        elif btype in LAZY_RECORD_TYPES:  # checked now, kept as its ids only, decoded again by records()
            record = self._decode_record(btype, payload)
            self._entries.append(_Entry(pos, btype, len(payload),
                                        ids=tuple(record.get(k) for k in ("vm", "vcpu", "epoch"))))
        elif btype == BlockType.STEPS:
            # Kept as a head only: a step trace can be far larger than the record budget allows
            # in memory; step_batches() decodes the bodies one at a time.
            record = unpack(decompress(self._dctx, payload, MAX_RECORD_BYTES, "steps block"), "steps block")
            need(isinstance(record, dict), "steps block is not a map")
            head = {k: record.get(k) for k in ("vm", "vcpu", "epoch", "first_seq", "count")}
            need(all(is_int(v, 0, U64_LIMIT) for v in head.values()), "steps block lacks integer fields")
            self._entries.append(_Entry(pos, btype, len(payload), record=head))
        elif btype in KIND_OF_TYPE and btype != BlockType.INDEX:
            kind = KIND_OF_TYPE[btype]
            raw = self._budgeted(decompress(self._dctx, payload, MAX_RECORD_BYTES, f"{kind} record"), pos)
            record = unpack(raw, f"{kind} record")
            need(isinstance(record, dict), f"{kind} record is not a map")
            if btype == BlockType.GAP:
                need(all(is_int(record.get(k), 0, U64_LIMIT) for k in GAP_FIELDS), "gap record lacks integer fields")
            self._entries.append(_Entry(pos, btype, len(payload), record=record))
        elif btype == BlockType.INDEX:
            raw = self._budgeted(decompress(self._dctx, payload, MAX_BLOCK_BYTES, "index footer"), pos)
            footer = unpack(raw, "index footer")
            need(isinstance(footer, dict), "index footer is not a map")
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
        index_at, _ = TRAILER.unpack(raw)
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
    def data_end(self) -> int:
        """Where the last whole block other than the index footer ends: a writer that continues
        the file (TraceWriter(path, resume=True)) appends here."""
        ends = [e.offset + BLOCK_HEAD.size + e.length for e in self._entries if e.type != BlockType.INDEX]
        return max(ends) if ends else self._data_start

    def block_list(self) -> Iterator[tuple[int, int, int, int, int, int, int, int]]:
        """Every block but the index footer, as the footer lists it: (offset, type, vm, vcpu,
        epoch, first_seq, count, n_rows); records carry their ids (INDEX_NO_ID when absent) and
        zeros for the rest. A writer that continues the file lists them again in its footer."""
        for e in self._entries:
            if e.type == BlockType.INDEX:
                continue
            if e.ref is not None:
                r = e.ref
                yield e.offset, e.type, r.vm, r.vcpu, r.epoch, r.first_seq, r.count, r.n_rows
            else:
                rec = e.record or {}
                ids = e.ids or (rec.get("vm"), rec.get("vcpu"), rec.get("epoch"))
                yield (e.offset, e.type, *(v if is_int(v, 0, INDEX_NO_ID) else INDEX_NO_ID for v in ids), 0, 0, 0)

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
        return [self._lazy_record(e) if e.type in LAZY_RECORD_TYPES else e.record for e in self._entries
                if e.type in KIND_OF_TYPE and e.type not in (BlockType.EXITS, BlockType.INDEX, BlockType.STEPS)
                and (want is None or e.type == want)]

    def _decode_record(self, btype: int, payload: bytes) -> dict:
        kind = KIND_OF_TYPE[btype]
        record = unpack(decompress(self._dctx, payload, MAX_RECORD_BYTES, f"{kind} record"), f"{kind} record")
        need(isinstance(record, dict), f"{kind} record is not a map")
        return record

    def _lazy_record(self, entry: _Entry) -> dict:
        """A record of LAZY_RECORD_TYPES, read and decoded again (the scan checked it)."""
        try:
            payload = self._read_at(entry.offset + BLOCK_HEAD.size, entry.length)
            need(len(payload) == entry.length, "block changed since the file was opened")
            return self._decode_record(entry.type, payload)
        except Corrupt as e:
            raise TraceFormatError(self.path, entry.offset, str(e)) from None

    def step_batches(self, vm: int | None = None, vcpu: int | None = None) -> Iterator:
        """The step batches (messages.StepBatch, checked) in file order, decoded one at a time."""
        from .. import messages
        for e in self._entries:
            if e.type != BlockType.STEPS or (vm is not None and e.record["vm"] != vm) or (
                    vcpu is not None and e.record["vcpu"] != vcpu):
                continue
            payload = self._read_at(e.offset + BLOCK_HEAD.size, e.length)
            try:
                raw = decompress(self._dctx, payload, MAX_RECORD_BYTES, "steps block")
                yield messages.StepBatch.from_msg(unpack(raw, "steps block"))
            except (Corrupt, messages.MessageError) as err:
                if not self.skip_corrupt:
                    raise TraceFormatError(self.path, e.offset, str(err)) from None
                self.corrupt.append((e.offset, str(err)))

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
        payload = self._read_at(entry.offset + BLOCK_HEAD.size, entry.length)
        if len(payload) != entry.length or block_crc(BlockType.EXITS, payload) != BLOCK_HEAD.unpack(
                self._read_at(entry.offset, BLOCK_HEAD.size))[3]:
            raise TraceFormatError(self.path, entry.offset, "block changed since the file was opened")
        try:
            head, body_at = read_exits_head(memoryview(payload))
            return decode_exits_body(entry.offset, head, memoryview(payload)[body_at:], self._dctx, columns)
        except Corrupt as e:
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
                record = e.record if e.type not in LAZY_RECORD_TYPES else self._lazy_record(e)
                yield Block(e.offset, e.type, KIND_OF_TYPE[e.type], record=record)

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
        names = (*schema.COLUMN_NAMES, SEQ)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in (*names, *STREAM_DTYPES)}
        for batch in self.exit_batches(vm, vcpu, epoch, where):
            cols = batch.columns
            if where is not None:
                keep = where.mask(cols, vm=batch.vm, vcpu=batch.vcpu, epoch=batch.epoch)
                cols = {name: cols[name][keep] for name in names}
            n = len(cols[SEQ])
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
            seq = batch.columns[SEQ]
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
        vm_ends = [(e.offset, e.record) for e in self._entries if e.type == BlockType.VM_END]
        starts = stream_starts(e.record for e in self._entries if e.type == BlockType.VM_START)
        return find_discontinuities(self.exit_blocks(), self.gaps, vm_ends, starts)


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


