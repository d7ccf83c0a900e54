"""Guest images: multiboot kernels, ELF32/ELF64 executables and flat binaries, parsed and checked
before any VM exists.

A loader only reads the file and describes what goes where (`GuestImage`); placing it in RAM is
`GuestImage.load_into`. Every malformed or misfitting image fails with GuestImageError(path, reason).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import layout
from .errors import GuestImageError

if TYPE_CHECKING:
    from .multiboot import MultibootHeader

MODES = ("real", "protected", "long")


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

# Upper bound on what we read: guests here are tiny, and the cap is RAM's anyway.
MAX_IMAGE_BYTES = layout.MEM_CAP

ELF_MAGIC = b"\x7fELF"
# ELF header constants (System V gABI, "ELF Header"): e_ident[EI_CLASS], EI_DATA, e_type, e_machine.
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
MAX_PHNUM = 64  # real kernels have a handful; more is a hostile or broken file

_EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")  # e_ident .. e_shstrndx
_EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR32 = struct.Struct("<IIIIIIII")  # p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align
_PHDR64 = struct.Struct("<IIQQQQQQ")  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align


@dataclass(frozen=True)
class Segment:
    gpa: int
    data: bytes
    memsz: int  # >= len(data); the rest is zero-filled (.bss)


@dataclass(frozen=True)
class GuestImage:
    path: str
    format: str  # "flat" | "elf32" | "elf64" | "multiboot"
    mode: str  # CPU mode to enter in
    entry: int
    segments: tuple[Segment, ...]
    sha256: str
    size: int = field(default=0)
    multiboot: "MultibootHeader | None" = None  # the header of a multiboot kernel

    def describe(self) -> str:
        """One line for people: the format chosen and where it enters, e.g. for `vmsup launch`."""
        if self.multiboot is not None:
            return f"multiboot {self.multiboot.kind} kernel, entry {self.entry:#x}"
        if self.format == "flat":
            return (f"flat binary, {self.size} bytes at {self.segments[0].gpa:#x}, entry {self.entry:#x}, "
                    f"{self.mode} mode")
        return f"{self.format.upper()} executable, entry {self.entry:#x}, {self.mode} mode"

    def check_fits(self, mem_size: int) -> None:
        # A multiboot kernel also keeps clear of the boot information the VMM writes for it.
        low_end, what = ((layout.MULTIBOOT_AREA_END, "boot tables and multiboot information")
                         if self.multiboot is not None else (layout.BOOT_TABLES_END, "boot tables"))
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


def load_image(path: str, *, load_addr: int | None = None, entry: int | None = None,
               mode: str | None = None) -> GuestImage:
    """Parse `path` as a multiboot kernel (a header in its first 8 KiB), else as ELF (by its
    magic), else as a flat binary placed at `load_addr`."""
    from . import multiboot

    data = read_image_file(path)
    header_at = multiboot.find_header(data)
    if header_at is not None:
        if load_addr is not None:
            raise GuestImageError(path, "--load-addr applies to flat binaries; a multiboot kernel says where it loads")
        if mode is not None and mode != "protected":
            raise GuestImageError(path, f"a multiboot kernel is entered in protected mode, not {mode}")
        return multiboot.parse_multiboot(path, data, header_at, entry=entry)
    if data[:4] == ELF_MAGIC:
        if load_addr is not None:
            raise GuestImageError(path, "--load-addr applies to flat binaries; an ELF says where it loads")
        return parse_elf(path, data, entry=entry, mode=mode)
    return flat_image(path, data, load_addr=layout.DEFAULT_LOAD_ADDR if load_addr is None else load_addr,
                      entry=entry, mode=mode or "real")


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


def parse_elf(path: str, data: bytes, *, entry: int | None = None, mode: str | None = None) -> GuestImage:
    def bad(reason: str) -> GuestImageError:
        return GuestImageError(path, f"malformed ELF: {reason}")

    if len(data) < 16:
        raise bad("truncated identification")
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (ELFCLASS32, ELFCLASS64):
        raise bad(f"unknown class {ei_class}")
    if ei_data != ELFDATA2LSB:
        raise bad("not little-endian")
    is64 = ei_class == ELFCLASS64
    ehdr, phdr = (_EHDR64, _PHDR64) if is64 else (_EHDR32, _PHDR32)
    if len(data) < ehdr.size:
        raise bad("truncated header")
    (_ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = ehdr.unpack_from(data)
    if e_type != ET_EXEC:
        raise bad(f"type {e_type} is not an executable (ET_EXEC)")
    if e_machine != (EM_X86_64 if is64 else EM_386):
        raise bad(f"machine {e_machine} is not {'x86-64' if is64 else 'i386'}")
    if e_phnum == 0:
        raise bad("no program headers")
    if e_phnum > MAX_PHNUM:
        raise bad(f"{e_phnum} program headers (at most {MAX_PHNUM})")
    if e_phentsize != phdr.size:
        raise bad(f"program header size {e_phentsize}, expected {phdr.size}")
    if e_phoff + e_phnum * phdr.size > len(data):
        raise bad("program headers run past the end of the file")

    segments: list[Segment] = []
    for i in range(e_phnum):
        fields = phdr.unpack_from(data, e_phoff + i * phdr.size)
        if is64:
            p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = fields
        else:
            p_type, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _pflags, _align = fields
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise bad(f"segment {i}: file size {p_filesz} exceeds memory size {p_memsz}")
        if p_offset + p_filesz > len(data):
            raise bad(f"segment {i}: data runs past the end of the file")
        if p_paddr + p_memsz > layout.MEM_CAP:
            raise bad(f"segment {i}: physical address {p_paddr:#x}+{p_memsz:#x} is beyond guest RAM")
        # Physical addresses, as a boot loader would use them: our page tables identity-map.
        segments.append(Segment(p_paddr, data[p_offset:p_offset + p_filesz], p_memsz))
    if not segments:
        raise bad("no loadable (PT_LOAD) segment")
    entry = e_entry if entry is None else entry
    if not any(s.gpa <= entry < s.gpa + s.memsz for s in segments):
        raise bad(f"entry {entry:#x} is outside every loadable segment")
    native_mode = "long" if is64 else "protected"
    if mode is not None and mode != native_mode:
        raise GuestImageError(path, f"an {'ELF64' if is64 else 'ELF32'} image runs in {native_mode} mode, not {mode}")
    return GuestImage(path, "elf64" if is64 else "elf32", native_mode, entry, tuple(segments),
                      sha256_hex(data), len(data))
