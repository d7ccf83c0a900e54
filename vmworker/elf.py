"""ELF32/ELF64 executables: check the header and program headers, say what loads where.

Source: System V gABI, "ELF Header" and "Program Header". Segments load at their physical
addresses (p_paddr), as a boot loader would; the VMM's page tables identity-map.
"""

from __future__ import annotations

import struct

from . import layout
from .errors import GuestImageError
from .image import GuestImage, Segment, sha256_hex

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
