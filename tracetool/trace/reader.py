"""TraceReader: the query API on a trace file (exit_blocks, streams, records, read_batch,
exit_batches, exits, payloads, unexplained_gaps), from what the scan (scan.py, done on opening)
found; columns are decompressed only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .. import schema
from ..filters import EventFilter
from .accounting import Discontinuity, find_discontinuities, stream_starts
from .codec import SEQ
from .exits_block import ExitBatch, decode_exits_body, read_exits_head
from .format import (BLOCK_HEAD, INDEX_NO_ID, KIND_OF_TYPE, LAZY_RECORD_TYPES, MAX_RECORD_BYTES, RECORD_BLOCK_TYPES,
                     BlockType, Corrupt, TraceFormatError, block_crc, decompress, is_int, unpack)
from .scan import ExitBlockRef, TraceScan, BlockEntry


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


class TraceReader(TraceScan):
    """Reads a trace file; safe on truncated, corrupt and hostile files (see TraceScan for what
    opening checks and how a torn tail and corruption are reported)."""

    def __init__(self, path, *, skip_corrupt: bool = False) -> None:
        super().__init__(path, skip_corrupt=skip_corrupt)
        self._discontinuities: list[Discontinuity] | None = None

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

    def _by_offset(self) -> dict[int, BlockEntry]:
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
