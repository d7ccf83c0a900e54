"""Flat binaries (the seed guest's kind): the file's bytes at a load address, entered in the mode given."""

from __future__ import annotations

from . import layout
from .errors import GuestImageError
from .image import MODES, GuestImage, Segment, sha256_hex


def flat_image(path: str, data: bytes, *, load_addr: int, entry: int | None, mode: str) -> GuestImage:
    if mode not in MODES:
        raise GuestImageError(path, f"unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    if load_addr < 0:
        raise GuestImageError(path, f"load address {load_addr:#x} is negative")
    entry = load_addr if entry is None else entry
    if not load_addr <= entry < load_addr + len(data):
        raise GuestImageError(path, f"entry {entry:#x} is outside the image ({load_addr:#x}..{load_addr + len(data):#x})")
    if mode == "real":
        # Real mode runs with CS base = load address, so the load address must be a segment base
        # (16-byte aligned, below 1 MiB) and the entry a 16-bit offset from it.
        if load_addr % 16 or load_addr >= 1 << 20:
            raise GuestImageError(path, f"real mode needs a 16-byte aligned load address below 1 MiB, not {load_addr:#x}")
        if entry - load_addr > 0xFFFF:
            raise GuestImageError(path, f"real-mode entry {entry:#x} is more than 64 KiB past the load address")
    elif load_addr < layout.BOOT_TABLES_END:
        raise GuestImageError(path, f"load address {load_addr:#x} overlaps the VMM's boot tables below {layout.BOOT_TABLES_END:#x}")
    return GuestImage(path, "flat", mode, entry, (Segment(load_addr, data, len(data)),),
                      sha256_hex(data), len(data))
