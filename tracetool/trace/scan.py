"""The scan of a trace file (format.py's layout), done once when it is opened: the file header,
every block's framing and crc, EXITS heads and records, the trailer and the index footer. Safe on
truncated, corrupt and hostile files: a torn tail is noted, corruption raises TraceFormatError or
(skip_corrupt) is noted and skipped. TraceReader (reader.py) answers queries from what it found.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

from .. import schema
from .exits_block import read_exits_head
from .format import (BLOCK_HEAD, BLOCK_MAGIC, FILE_HEAD, FORMAT_VERSION, GAP_FIELDS, INDEX_FIELDS, KIND_OF_TYPE,
                     LAZY_RECORD_TYPES, MAGIC, MAX_BLOCK_BYTES, MAX_HEADER_BYTES, MAX_RECORD_BYTES, MAX_RECORDS_TOTAL,
                     TRAILER, TRAILER_MAGIC, U32, U64_LIMIT, BlockType, Corrupt, TraceFormatError, block_crc,
                     decompress, is_int, need, unpack)


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


@dataclass(slots=True)
class BlockEntry:
    """One whole block the scan found: where it is, and what is kept of it in memory."""

    offset: int
    type: int
    length: int
    record: dict | None = None  # record blocks and the index footer
    ref: ExitBlockRef | None = None  # EXITS blocks
    ids: tuple | None = None  # LAZY_RECORD_TYPES: the record's (vm, vcpu, epoch), the record itself not kept


_MAX_WARNINGS = 20


class TraceScan:
    """An open trace file and what its scan found (the blocks, `torn_tail`, `corrupt`, `warnings`,
    `footer`); TraceReader adds the queries.

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
        self._entries: list[BlockEntry] = []
        self._dctx = zstandard.ZstdDecompressor()
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
            self._entries.append(BlockEntry(pos, btype, len(payload), ref=ref))
        elif btype in LAZY_RECORD_TYPES:  # checked now, kept as its ids only, decoded again by records()
            record = self._decode_record(btype, payload)
            self._entries.append(BlockEntry(pos, btype, len(payload),
                                        ids=tuple(record.get(k) for k in ("vm", "vcpu", "epoch"))))
        elif btype == BlockType.STEPS:
            # Kept as a head only: a step trace can be far larger than the record budget allows
            # in memory; step_batches() decodes the bodies one at a time.
            record = unpack(decompress(self._dctx, payload, MAX_RECORD_BYTES, "steps block"), "steps block")
            need(isinstance(record, dict), "steps block is not a map")
            head = {k: record.get(k) for k in ("vm", "vcpu", "epoch", "first_seq", "count")}
            need(all(is_int(v, 0, U64_LIMIT) for v in head.values()), "steps block lacks integer fields")
            self._entries.append(BlockEntry(pos, btype, len(payload), record=head))
        elif btype in KIND_OF_TYPE and btype != BlockType.INDEX:
            kind = KIND_OF_TYPE[btype]
            raw = self._budgeted(decompress(self._dctx, payload, MAX_RECORD_BYTES, f"{kind} record"), pos)
            record = unpack(raw, f"{kind} record")
            need(isinstance(record, dict), f"{kind} record is not a map")
            if btype == BlockType.GAP:
                need(all(is_int(record.get(k), 0, U64_LIMIT) for k in GAP_FIELDS), "gap record lacks integer fields")
            self._entries.append(BlockEntry(pos, btype, len(payload), record=record))
        elif btype == BlockType.INDEX:
            raw = self._budgeted(decompress(self._dctx, payload, MAX_BLOCK_BYTES, "index footer"), pos)
            footer = unpack(raw, "index footer")
            need(isinstance(footer, dict), "index footer is not a map")
            self._entries.append(BlockEntry(pos, btype, len(payload), record=footer))
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

    def __enter__(self) -> "TraceScan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decode_record(self, btype: int, payload: bytes) -> dict:
        kind = KIND_OF_TYPE[btype]
        record = unpack(decompress(self._dctx, payload, MAX_RECORD_BYTES, f"{kind} record"), f"{kind} record")
        need(isinstance(record, dict), f"{kind} record is not a map")
        return record

    def _lazy_record(self, entry: BlockEntry) -> dict:
        """A record of LAZY_RECORD_TYPES, read and decoded again (the scan checked it)."""
        try:
            payload = self._read_at(entry.offset + BLOCK_HEAD.size, entry.length)
            need(len(payload) == entry.length, "block changed since the file was opened")
            return self._decode_record(entry.type, payload)
        except Corrupt as e:
            raise TraceFormatError(self.path, entry.offset, str(e)) from None


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


