"""Multiboot (version 1) kernels: find and check the header, say what loads where, write the boot info.

Source: The Multiboot Specification, version 0.6.96 — §3.1 (OS image format: the header, its flags
and the a.out-kludge address fields), §3.2 (machine state at entry), §3.3 (boot information format).
Like the ELF loader, `parse_multiboot` only reads the file and returns a `GuestImage`; the boot
information is written into RAM by `write_boot_info` once the VM exists.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from . import layout
from .elf import ELF_MAGIC, ELFCLASS32, parse_elf
from .errors import GuestImageError
from .image import GuestImage, Segment, sha256_hex

# §3.1.1: the header must lie completely within the first 8192 bytes, 32-bit aligned.
HEADER_MAGIC = 0x1BADB002
SEARCH_BYTES = 8192
_MAGIC_BYTES = struct.pack("<I", HEADER_MAGIC)
_HEAD = struct.Struct("<III")  # magic, flags, checksum
_AOUT = struct.Struct("<IIIII")  # header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr (offsets 12-28)

# §3.1.2 header flags. Bits 0-15 are requirements: a boot loader that does not support one must
# refuse the kernel. Bits 16-31 are optional features.
FLAG_PAGE_ALIGN = 1 << 0  # align boot modules on 4 KiB: trivially met, we load no modules
FLAG_MEMORY_INFO = 1 << 1  # mem_lower/mem_upper (and the memory map): always given
FLAG_VIDEO_MODE = 1 << 2  # video mode information: met with the EGA text screen (§3.3 framebuffer_*)
FLAG_AOUT_KLUDGE = 1 << 16  # the address fields at offsets 12-28 are valid and take precedence
REQUIRED_FLAGS = 0xFFFF
SUPPORTED_REQUIRED_FLAGS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

# §3.2: EAX at entry tells the kernel a Multiboot-compliant loader started it.
BOOTLOADER_MAGIC = 0x2BADB002
BOOT_LOADER_NAME = "vmsup"

# §3.3 multiboot_info flags: which fields of the structure are valid.
INFO_MEMORY = 1 << 0  # mem_lower, mem_upper
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3  # mods_count, mods_addr
INFO_MMAP = 1 << 6  # mmap_length, mmap_addr
INFO_LOADER_NAME = 1 << 9
# Bit 11 (vbe_*) stays clear: there is no VBE BIOS, so no controller or mode information to point to.
INFO_FRAMEBUFFER = 1 << 12  # framebuffer_* valid
INFO_SIZE = 116  # through color_info (offsets 110-115), the end of the 0.6.96 structure
# The fields we fill, by byte offset (§3.3 table).
_OFF_FLAGS, _OFF_MEM_LOWER, _OFF_MEM_UPPER, _OFF_CMDLINE = 0, 4, 8, 16
_OFF_MODS_COUNT, _OFF_MODS_ADDR, _OFF_MMAP_LENGTH, _OFF_MMAP_ADDR, _OFF_LOADER_NAME = 20, 24, 44, 48, 64
# framebuffer_addr (u64), framebuffer_pitch, framebuffer_width, framebuffer_height (u32),
# framebuffer_bpp, framebuffer_type (u8), from offset 88.
_OFF_FRAMEBUFFER = 88
_FRAMEBUFFER = struct.Struct("<QIIIBB")
# §3.3 framebuffer_type 2: "EGA-standard text mode": width and height in characters, bpp 16 (a
# character byte and an attribute byte), pitch in bytes per text line. The VGA colour text screen
# is what vmsup has (layout.VGA_TEXT_BUFFER, mode 3, 80x25).
FRAMEBUFFER_EGA_TEXT = 2
TEXT_COLS, TEXT_ROWS, TEXT_BPP = 80, 25, 16
# §3.3 memory map entry: size (of the rest, 20), base_addr, length, type; type 1 = available RAM.
_MMAP_ENTRY = struct.Struct("<IQQI")
MMAP_AVAILABLE, MMAP_RESERVED = 1, 2


@dataclass(frozen=True)
class MultibootHeader:
    offset: int  # file offset of the magic
    flags: int
    aout: tuple[int, int, int, int, int] | None  # header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr

    @property
    def kind(self) -> str:
        return "a.out-kludge" if self.aout is not None else "ELF32"


def find_header(data: bytes) -> int | None:
    """File offset of the first 32-bit aligned header magic in the first 8192 bytes, or None."""
    limit = min(len(data), SEARCH_BYTES)
    at = data.find(_MAGIC_BYTES, 0, limit)
    while at != -1:
        if at % 4 == 0:
            return at
        at = data.find(_MAGIC_BYTES, at + 1, limit)
    return None


def parse_header(path: str, data: bytes, offset: int) -> MultibootHeader:
    def bad(reason: str) -> GuestImageError:
        return GuestImageError(path, f"multiboot header at offset {offset:#x}: {reason}")

    if offset + _HEAD.size > min(len(data), SEARCH_BYTES):
        raise bad("truncated (magic, flags and checksum must lie within the first 8192 bytes)")
    magic, flags, checksum = _HEAD.unpack_from(data, offset)
    if (magic + flags + checksum) & 0xFFFF_FFFF:
        raise bad(f"bad checksum {checksum:#010x} (magic + flags + checksum must be 0 mod 2^32; "
                  f"expected {(-(magic + flags)) & 0xFFFF_FFFF:#010x})")
    unsupported = flags & REQUIRED_FLAGS & ~SUPPORTED_REQUIRED_FLAGS
    if unsupported:
        bit = (unsupported & -unsupported).bit_length() - 1
        raise bad(f"requires flag bit {bit}, which Multiboot 0.6.96 does not define (flags {flags:#010x})")
    aout = None
    if flags & FLAG_AOUT_KLUDGE:
        if offset + _HEAD.size + _AOUT.size > len(data):
            raise bad("flag 16 (a.out kludge) is set but the address fields are cut off by the end of the file")
        aout = _AOUT.unpack_from(data, offset + _HEAD.size)
    return MultibootHeader(offset, flags, aout)


def parse_multiboot(path: str, data: bytes, offset: int, *, entry: int | None = None) -> GuestImage:
    """A GuestImage for the multiboot kernel in `data`, whose header magic is at `offset`."""
    header = parse_header(path, data, offset)
    digest = sha256_hex(data)
    if header.aout is None:
        # §3.1.3: without flag 16 the loader takes the addresses from the executable's own header,
        # which must then be ELF.
        if data[:4] != ELF_MAGIC:
            raise GuestImageError(path, "multiboot header without flag 16 (a.out kludge) and the file is not ELF: "
                                        "nothing says where to load it")
        if data[4] != ELFCLASS32:  # EI_CLASS: Multiboot v1 kernels are 32-bit
            raise GuestImageError(path, "multiboot kernel is ELF64; Multiboot v1 needs an ELF32 image "
                                        "(or the a.out-kludge fields)")
        elf = parse_elf(path, data, entry=entry)
        return replace(elf, format="multiboot", multiboot=header)

    header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr = header.aout

    def bad(reason: str) -> GuestImageError:
        return GuestImageError(path, f"multiboot a.out-kludge fields: {reason}")

    # §3.1.3: header_addr is where the header itself lands, so loading starts
    # (header_addr - load_addr) bytes before the header in the file.
    if load_addr > header_addr:
        raise bad(f"load_addr {load_addr:#x} is above header_addr {header_addr:#x}")
    file_start = offset - (header_addr - load_addr)
    if file_start < 0:
        raise bad(f"header_addr {header_addr:#x} - load_addr {load_addr:#x} reaches before the start of the file")
    if load_end_addr == 0:  # "the text and data segments occupy the whole OS image file"
        load_size = len(data) - file_start
    elif load_end_addr < load_addr:
        raise bad(f"load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}")
    else:
        load_size = load_end_addr - load_addr
    if file_start + load_size > len(data):
        raise bad(f"load_end_addr {load_end_addr:#x} asks for {load_size} bytes from file offset {file_start:#x}, "
                  f"past the end of the {len(data)}-byte file")
    if bss_end_addr == 0:  # "no bss segment"
        mem_size = load_size
    elif bss_end_addr < load_addr + load_size:
        raise bad(f"bss_end_addr {bss_end_addr:#x} is below the end of the loaded data {load_addr + load_size:#x}")
    else:
        mem_size = bss_end_addr - load_addr
    if mem_size == 0:
        raise bad("the image is empty (nothing between load_addr and load_end_addr)")
    if load_addr + mem_size > layout.MEM_CAP:
        raise bad(f"the image {load_addr:#x}..{load_addr + mem_size:#x} is beyond guest RAM "
                  f"(which ends by {layout.MEM_CAP:#x})")
    entry = entry_addr if entry is None else entry
    if not load_addr <= entry < load_addr + mem_size:
        raise bad(f"entry {entry:#x} is outside the image ({load_addr:#x}..{load_addr + mem_size:#x})")
    segment = Segment(load_addr, data[file_start:file_start + load_size], mem_size)
    return GuestImage(path, "multiboot", "protected", entry, (segment,), digest, len(data), multiboot=header)


def check_cmdline(cmdline: str) -> bytes:
    """The command line as the NUL-terminated bytes the kernel gets; ValueError if it cannot be."""
    raw = cmdline.encode()
    if b"\0" in raw:
        raise ValueError("--cmdline contains a NUL byte (the kernel sees a C string)")
    if len(raw) > layout.MULTIBOOT_CMDLINE_MAX:
        raise ValueError(f"--cmdline is {len(raw)} bytes, at most {layout.MULTIBOOT_CMDLINE_MAX}")
    return raw + b"\0"


def memory_map(mem_size: int) -> list[tuple[int, int, int]]:
    """(base, length, type) for a VM with `mem_size` bytes of RAM from 0, as a PC firmware reports it."""
    entries = [(0, layout.LOW_RAM_END, MMAP_AVAILABLE),
               (layout.LOW_RAM_END, layout.HIGH_RAM_START - layout.LOW_RAM_END, MMAP_RESERVED)]
    if mem_size > layout.HIGH_RAM_START:
        entries.append((layout.HIGH_RAM_START, mem_size - layout.HIGH_RAM_START, MMAP_AVAILABLE))
    return entries


def write_boot_info(memory, mem_size: int, cmdline: str, video: bool = False) -> int:
    """Write the §3.3 boot information into guest RAM; returns its address (EBX at entry). `video`:
    the kernel asked for video mode information (header flag 2), answered with the EGA text screen
    (§3.1.4: the loader may set a text mode even where the header asks for graphics)."""
    entries = memory_map(mem_size)
    mmap = b"".join(_MMAP_ENTRY.pack(_MMAP_ENTRY.size - 4, base, length, kind) for base, length, kind in entries)
    memory.write(layout.MULTIBOOT_MMAP, mmap)
    memory.write(layout.MULTIBOOT_LOADER_NAME, BOOT_LOADER_NAME.encode() + b"\0")
    memory.write(layout.MULTIBOOT_CMDLINE, check_cmdline(cmdline))
    info = bytearray(INFO_SIZE)
    fields = {
        _OFF_FLAGS: INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME,
        # mem_lower: KiB of RAM from 0 (at most 640); mem_upper: KiB of RAM from 1 MiB to the first hole.
        _OFF_MEM_LOWER: layout.LOW_RAM_END >> 10,
        _OFF_MEM_UPPER: max(0, mem_size - layout.HIGH_RAM_START) >> 10,
        _OFF_CMDLINE: layout.MULTIBOOT_CMDLINE,
        _OFF_MODS_COUNT: 0,  # no boot modules
        _OFF_MODS_ADDR: 0,
        _OFF_MMAP_LENGTH: len(mmap),
        _OFF_MMAP_ADDR: layout.MULTIBOOT_MMAP,
        _OFF_LOADER_NAME: layout.MULTIBOOT_LOADER_NAME,
    }
    if video:
        fields[_OFF_FLAGS] |= INFO_FRAMEBUFFER
        _FRAMEBUFFER.pack_into(info, _OFF_FRAMEBUFFER, layout.VGA_TEXT_BUFFER, TEXT_COLS * TEXT_BPP // 8,
                               TEXT_COLS, TEXT_ROWS, TEXT_BPP, FRAMEBUFFER_EGA_TEXT)
    for off, value in fields.items():
        struct.pack_into("<I", info, off, value)
    memory.write(layout.MULTIBOOT_INFO, bytes(info))
    return layout.MULTIBOOT_INFO
