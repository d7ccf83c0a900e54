"""Trace file framing: magic numbers, the file header, self-sized crc-checked blocks, block
types, size bounds and the errors every layer of the trace format raises.

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

Record blocks (VM_START, VM_END, GAP, LIFECYCLE, SCREEN, INPUT) hold zstd(msgpack(record map)),
the maps of schema.MSG_*. EXITS blocks are described in exits_block.py.
"""

from __future__ import annotations

import os
import struct
import zlib
from enum import IntEnum

import msgpack
import zstandard

from .. import schema

MAGIC = b"VMSUPTRC"
FORMAT_VERSION = 1
BLOCK_MAGIC = b"BLK\x01"
TRAILER_MAGIC = b"VMSUPEND"

FILE_HEAD = struct.Struct("<8sHI")  # magic, format version, length of the compressed header map
U32 = struct.Struct("<I")
BLOCK_HEAD = struct.Struct("<4sIII")  # magic, type, payload length, crc32
TRAILER = struct.Struct("<Q8s")  # offset of the INDEX block, magic

ZSTD_LEVEL = 3
DEFAULT_BLOCK_EVENTS = 1 << 16  # rows a writer gathers per stream before it writes a block

# Bounds on what a reader accepts (a corrupt or hostile length must not allocate gigabytes).
MAX_BLOCK_BYTES = schema.MAX_MESSAGE_BYTES  # a block's payload, compressed or not
MAX_HEADER_BYTES = 4 << 20  # the file header map, compressed and decompressed
MAX_HEAD_BYTES = 64 << 10  # an EXITS block's head
MAX_RECORD_BYTES = schema.MAX_RECORD_BYTES  # a record map, decompressed
# Record maps a reader keeps in memory, decompressed, all together: records compress well, so
# without a budget a small hostile file of many records could fill memory. Real traces hold a
# few kilobytes per VM start or end.
MAX_RECORDS_TOTAL = 64 << 20
MAX_INDEX_ENTRIES = 1 << 20  # a bigger file gets a footer with totals only; readers scan it
# The footer lists blocks column by column (packed little-endian arrays), so a reader loads it
# with numpy instead of building a Python list per block. NO_ID: a record without that field.
INDEX_FIELDS = (("offset", "<u8"), ("type", "<u4"), ("vm", "<u4"), ("vcpu", "<u4"), ("epoch", "<u4"),
                ("first_seq", "<u8"), ("count", "<u8"), ("n_rows", "<u8"))
INDEX_NO_ID = 0xFFFFFFFF

STREAM_ID_LIMIT = 1 << 32  # vm, vcpu and epoch are u32
U64_LIMIT = 1 << 64


class BlockType(IntEnum):
    EXITS = 1
    VM_START = 2
    VM_END = 3
    GAP = 4
    INDEX = 5
    LIFECYCLE = 6
    SCREEN = 7
    INPUT = 8
    KVM_STATS = 9
    REFUSED = 10
    STEPS = 11  # a step batch (tracetool/step_schema.py), zstd(msgpack) like a record, read on demand
    VM_IMAGE = 12
    COALESCED = 13  # coalesced writes (schema.COALESCED_COLUMNS), read on demand
    INTERRUPT = 14
    EMULATED = 15  # instructions the VMM emulated (schema.EMULATED_COLUMNS), read on demand
    INSN_COUNTS = 16  # a --deterministic vCPU's instruction count at each guest exit, read on demand


RECORD_BLOCK_TYPES: dict[str, BlockType] = {
    schema.MSG_VM_START: BlockType.VM_START,
    schema.MSG_VM_END: BlockType.VM_END,
    schema.MSG_GAP: BlockType.GAP,
    schema.MSG_LIFECYCLE: BlockType.LIFECYCLE,
    schema.MSG_SCREEN: BlockType.SCREEN,
    schema.MSG_INPUT: BlockType.INPUT,
    schema.MSG_KVM_STATS: BlockType.KVM_STATS,
    schema.MSG_REFUSED: BlockType.REFUSED,
    schema.MSG_STEPS: BlockType.STEPS,
    schema.MSG_VM_IMAGE: BlockType.VM_IMAGE,
    schema.MSG_COALESCED: BlockType.COALESCED,
    schema.MSG_INTERRUPT: BlockType.INTERRUPT,
    schema.MSG_EMULATED: BlockType.EMULATED,
    schema.MSG_INSN_COUNTS: BlockType.INSN_COUNTS,
}
# Records read only when asked for (TraceReader.records), not kept from the scan: the kernel's
# counters come every second per vCPU, and a long fleet run holds more of them than a reader may
# keep in memory (MAX_RECORDS_TOTAL) just to open the file.
LAZY_RECORD_TYPES = frozenset({BlockType.KVM_STATS, BlockType.VM_IMAGE,  # and guest images: up to 768 KiB each
                               BlockType.COALESCED, BlockType.EMULATED, BlockType.INSN_COUNTS})
KIND_OF_TYPE = {int(t): k for k, t in RECORD_BLOCK_TYPES.items()}
KIND_OF_TYPE[BlockType.EXITS] = schema.MSG_EXITS
KIND_OF_TYPE[BlockType.INDEX] = "index"
GAP_FIELDS = ("vm", "vcpu", "epoch", "first_missing", "count")


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


class Corrupt(Exception):
    """Inside the package: a block failed validation; the reader's scan attaches the offset."""


def need(cond: bool, reason: str) -> None:
    if not cond:
        raise Corrupt(reason)


def is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def block_crc(btype: int, payload) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<II", btype, len(payload))))


def frame_block(btype: int, payload: bytes) -> bytes:
    return BLOCK_HEAD.pack(BLOCK_MAGIC, int(btype), len(payload), block_crc(btype, payload)) + payload


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data, what: str):
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise Corrupt(f"{what} is not valid msgpack ({type(e).__name__})") from None


def decompress(dctx: zstandard.ZstdDecompressor, data, limit: int, what: str) -> bytes:
    # A frame that declares its size is decompressed into exactly that much memory (python-
    # zstandard ignores max_output_size then), so check the declared size first.
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise Corrupt(f"{what} is not a zstd frame") from None
    if declared > limit:
        raise Corrupt(f"{what} would decompress to {declared} bytes, over the limit of {limit}")
    try:
        return dctx.decompress(data, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise Corrupt(f"{what} does not decompress ({e})") from None
