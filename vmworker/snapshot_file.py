"""The snapshot file format: a fixed header, then named sections, each zstd-compressed msgpack
with its own crc32.

    header   magic "VMSUPSNP", format version (u32), guest memory size (u64), sha256 of the guest
             image (32 bytes), section count (u32), crc32 of the bytes before it (u32)
    section  name length (u16), name (utf-8), raw length (u64), compressed length (u64),
             crc32 of the compressed bytes (u32), the compressed bytes

A reader refuses, with one line (SnapshotError), a file that is not a snapshot, one of another
format version, and any torn or altered section. Sizes are bounded before anything is allocated.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import msgpack
import zstandard

from .errors import SpecError

MAGIC = b"VMSUPSNP"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32sI")
_HEADER_CRC = struct.Struct("<I")
_SECTION = struct.Struct("<H")
_SECTION_SIZES = struct.Struct("<QQI")
MAX_SECTIONS = 64
MAX_NAME = 64
# Guest RAM is the biggest section; vmworker.memory caps RAM well below this.
MAX_SECTION_BYTES = 1 << 36
ZSTD_LEVEL = 3
_CHUNK = 1 << 24  # memory is compressed and checked in 16 MiB pieces, so no second copy of RAM is made


class SnapshotError(SpecError):
    """A snapshot file that cannot be used: one line naming the file and why."""


@dataclass(frozen=True)
class Header:
    version: int
    mem_size: int
    image_sha256: str
    sections: int


def write_snapshot(path: str, mem_size: int, image_sha256: str, sections: dict[str, object]) -> int:
    """Write `sections` (name → a msgpack-able value; bytes-like values are stored as they are)
    and return the file's size. Written to a temporary name and renamed: never a half file."""
    import os
    tmp = f"{path}.tmp{os.getpid()}"
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    # 0600: guest memory may hold anything the guest was given (keys, passwords)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        head = _HEADER.pack(MAGIC, FORMAT_VERSION, mem_size, bytes.fromhex(image_sha256), len(sections))
        f.write(head + _HEADER_CRC.pack(zlib.crc32(head)))
        for name, value in sections.items():
            raw = value if isinstance(value, (bytes, bytearray, memoryview)) else msgpack.packb(value, use_bin_type=True)
            packed = _compress(compressor, memoryview(raw))
            encoded = name.encode()
            f.write(_SECTION.pack(len(encoded)) + encoded)
            f.write(_SECTION_SIZES.pack(len(raw), len(packed), zlib.crc32(packed)))
            f.write(packed)
        size = f.tell()
    os.replace(tmp, path)
    return size


def _compress(compressor, raw: memoryview) -> bytes:
    if len(raw) <= _CHUNK:
        return compressor.compress(raw)
    chunker = compressor.chunker(size=len(raw), chunk_size=_CHUNK)
    out = bytearray()
    for i in range(0, len(raw), _CHUNK):
        for piece in chunker.compress(raw[i:i + _CHUNK]):
            out += piece
    for piece in chunker.finish():
        out += piece
    return bytes(out)


def read_header(path: str) -> Header:
    """The header only (the supervisor checks it before any VM starts)."""
    with _open(path) as f:
        return _read_header(f, path)


def read_snapshot(path: str) -> tuple[Header, dict[str, object]]:
    """Header and every section, decoded; SnapshotError for anything wrong. Sections named
    `raw_sections` come back as bytes, the others as their msgpack value."""
    with _open(path) as f:
        header = _read_header(f, path)
        sections: dict[str, object] = {}
        for _ in range(header.sections):
            (name_len,) = _SECTION.unpack(_exact(f, _SECTION.size, path, "a section header"))
            if name_len > MAX_NAME:
                raise SnapshotError(f"{path}: corrupt snapshot (a section name of {name_len} bytes)")
            name = _exact(f, name_len, path, "a section name").decode("utf-8", "replace")
            raw_len, packed_len, crc = _SECTION_SIZES.unpack(_exact(f, _SECTION_SIZES.size, path, "a section header"))
            if raw_len > MAX_SECTION_BYTES or packed_len > MAX_SECTION_BYTES:
                raise SnapshotError(f"{path}: corrupt snapshot (section {name!r} claims {raw_len} bytes)")
            packed = _exact(f, packed_len, path, f"section {name!r}")
            if zlib.crc32(packed) != crc:
                raise SnapshotError(f"{path}: corrupt snapshot (section {name!r}: crc32 mismatch)")
            try:
                raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=raw_len)
            except zstandard.ZstdError as e:
                raise SnapshotError(f"{path}: corrupt snapshot (section {name!r}: {e})") from None
            if len(raw) != raw_len:
                raise SnapshotError(f"{path}: corrupt snapshot (section {name!r}: {len(raw)} bytes, not {raw_len})")
            sections[name] = raw
        if f.read(1):
            raise SnapshotError(f"{path}: corrupt snapshot (bytes after the last section)")
    return header, sections


def unpack_section(path: str, sections: dict[str, object], name: str):
    """A msgpack section's value; SnapshotError when it is missing or not msgpack."""
    raw = sections.get(name)
    if raw is None:
        raise SnapshotError(f"{path}: corrupt snapshot (no {name!r} section)")
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise SnapshotError(f"{path}: corrupt snapshot (section {name!r}: {e})") from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise SnapshotError(f"snapshot {path}: {e.strerror or e}") from None


def _read_header(f, path: str) -> Header:
    data = f.read(_HEADER.size + _HEADER_CRC.size)
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{path}: not a vmsup snapshot")
    if len(data) < _HEADER.size + _HEADER_CRC.size:
        raise SnapshotError(f"{path}: corrupt snapshot (header cut short)")
    _, version, mem_size, sha, count = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{path}: snapshot format version {version}; this vmsup reads version {FORMAT_VERSION}")
    if zlib.crc32(data[:_HEADER.size]) != _HEADER_CRC.unpack_from(data, _HEADER.size)[0]:
        raise SnapshotError(f"{path}: corrupt snapshot (header crc32 mismatch)")
    if count > MAX_SECTIONS:
        raise SnapshotError(f"{path}: corrupt snapshot ({count} sections)")
    return Header(version, mem_size, sha.hex(), count)


def _exact(f, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SnapshotError(f"{path}: corrupt snapshot ({what} cut short)")
    return data
