"""A guest image as the VMM sees it: what goes where in guest RAM (`Segment`s), where and in which
CPU mode it starts (`GuestImage`), read from a file with its size bounded.

The parsers (flat.py, elf.py, multiboot.py, bzimage.py) build a GuestImage from a file's bytes; loader.py
picks the parser. Placing an image in RAM is `GuestImage.load_into`. Every malformed or misfitting
image fails with GuestImageError(path, reason).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import layout
from .errors import GuestImageError

if TYPE_CHECKING:  # types only: multiboot.py and bzimage.py build on this module, never the other way
    from .bzimage import LinuxKernel
    from .multiboot import MultibootHeader

MODES = ("real", "protected", "long")

# Upper bound on what we read: guests here are tiny, and the cap is RAM's anyway.
MAX_IMAGE_BYTES = layout.MEM_CAP


def sha256_hex(data: bytes) -> str:
    """The image's SHA-256 for the trace. CPython's built-in SHA-256 module rather than hashlib:
    hashlib loads OpenSSL's libcrypto, ~3.7 MiB of resident memory in every worker for one hash."""
    try:
        from _sha256 import sha256  # CPython ≤ 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # CPython ≥ 3.12
        except ImportError:
            from hashlib import sha256
    return sha256(data).hexdigest()


@dataclass(frozen=True)
class Segment:
    gpa: int
    data: bytes
    memsz: int  # >= len(data); the rest is zero-filled (.bss)


@dataclass(frozen=True)
class GuestImage:
    path: str
    format: str  # "flat" | "elf32" | "elf64" | "multiboot" | "bzimage"
    mode: str  # CPU mode to enter in
    entry: int
    segments: tuple[Segment, ...]
    sha256: str
    size: int = field(default=0)
    multiboot: "MultibootHeader | None" = None  # the header of a multiboot kernel
    linux: "LinuxKernel | None" = None  # what the setup header of a Linux boot protocol kernel says

    @property
    def is_kernel(self) -> bool:
        """A kernel booted by a protocol (multiboot, Linux): it gets a command line, boot information,
        the in-kernel irqchip by default, and only the BSP runs at the entry."""
        return self.multiboot is not None or self.linux is not None

    def describe(self) -> str:
        """One line for people: the format chosen and where it enters, e.g. for `vmsup launch`."""
        if self.linux is not None:
            return f"bzImage, protocol {self.linux.version_text}, {self.linux.entry_bits}-bit entry"
        if self.multiboot is not None:
            return f"multiboot {self.multiboot.kind} kernel, entry {self.entry:#x}"
        if self.format == "flat":
            return (f"flat binary, {self.size} bytes at {self.segments[0].gpa:#x}, entry {self.entry:#x}, "
                    f"{self.mode} mode")
        return f"{self.format.upper()} executable, entry {self.entry:#x}, {self.mode} mode"

    def check_fits(self, mem_size: int) -> None:
        # A kernel also keeps clear of the boot information the VMM writes for it.
        if self.multiboot is not None:
            low_end, what = layout.MULTIBOOT_AREA_END, "boot tables and multiboot information"
        elif self.linux is not None:
            low_end, what = layout.LINUX_AREA_END, "boot tables, zero page and command line"
        else:
            low_end, what = layout.BOOT_TABLES_END, "boot tables"
        for seg in self.segments:
            if seg.gpa + seg.memsz > mem_size:
                raise GuestImageError(self.path, f"image ({seg.gpa:#x}..{seg.gpa + seg.memsz:#x}) does not fit in "
                                                 f"{mem_size >> 20} MiB of guest memory")
            if seg.gpa < low_end and self.mode != "real":
                raise GuestImageError(self.path, f"segment at {seg.gpa:#x} overlaps the VMM's {what} below "
                                                 f"{low_end:#x}")

    def load_into(self, memory) -> None:
        for seg in self.segments:
            memory.write(seg.gpa, seg.data)
            if seg.memsz > len(seg.data):
                memory.fill(seg.gpa + len(seg.data), seg.memsz - len(seg.data))


def read_image_file(path: str) -> bytes:
    if not os.path.exists(path):
        raise GuestImageError(path, "no such file")
    if os.path.isdir(path):
        raise GuestImageError(path, "is a directory, not a guest image")
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise GuestImageError(path, "is empty")
        if size > MAX_IMAGE_BYTES:
            raise GuestImageError(path, f"is {size} bytes, larger than any guest memory ({MAX_IMAGE_BYTES} bytes)")
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        raise GuestImageError(path, "permission denied") from None
    except OSError as e:
        raise GuestImageError(path, e.strerror or str(e)) from None
