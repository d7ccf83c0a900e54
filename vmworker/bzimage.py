"""Linux x86 boot protocol kernels (bzImage): read the setup header, say what loads where, and fill
the zero page (struct boot_params) the kernel reads at entry.

Source: the kernel's Documentation/arch/x86/boot.rst — "The Real-Mode Kernel Header" and "Details of
Header Fields" (the setup header at 0x1F1), "Loading The Rest of The Kernel" (the protected-mode
kernel starts at file offset (setup_sects + 1) * 512; setup_sects 0 means 4), "32-bit Boot Protocol"
and "64-bit Boot Protocol" (entry state) — and Documentation/arch/x86/zero-page.rst (the zero page's
fields). vmsup runs none of the kernel's real-mode setup code: it is a 32/64-bit boot loader, doing
for the kernel what that code would (the e820 map, the screen) and entering the protected-mode part.

Like the other parsers, `parse_bzimage` only reads the file; `write_boot_params` writes the zero page,
the command line and the initrd once the VM exists, where `plan_boot` (also called before any VM,
for bad input) says.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import layout
from .errors import GuestImageError, SpecError
from .image import GuestImage, Segment, sha256_hex

# boot.rst "The Real-Mode Kernel Header": offsets from the start of the file, which are also the
# offsets in the zero page (the setup header is copied to the same place).
SETUP_HEADER_AT = 0x1F1
HEADER_MAGIC_AT = 0x202
HEADER_MAGIC = b"HdrS"  # "header", protocol 2.00+
OFF_SETUP_SECTS = 0x1F1  # u8: size of the setup code in 512-byte sectors
OFF_SYSSIZE = 0x1F4  # u32 (2.04+): size of the protected-mode code in 16-byte paragraphs
OFF_JUMP = 0x200  # a short jmp; its 8-bit offset ends the header: end = 0x202 + byte at 0x201
OFF_VERSION = 0x206  # u16: boot protocol version, major.minor in the two bytes
OFF_TYPE_OF_LOADER = 0x210  # u8, written by the loader
OFF_LOADFLAGS = 0x211  # u8
OFF_CODE32_START = 0x214  # u32: the 32-bit entry ("the address to jump to in protected mode")
OFF_RAMDISK_IMAGE = 0x218  # u32, written by the loader
OFF_RAMDISK_SIZE = 0x21C  # u32, written by the loader
OFF_CMD_LINE_PTR = 0x228  # u32 (2.02+), written by the loader
OFF_INITRD_ADDR_MAX = 0x22C  # u32 (2.03+): highest address the initrd may occupy
OFF_XLOADFLAGS = 0x236  # u16 (2.12+)
OFF_CMDLINE_SIZE = 0x238  # u32 (2.06+): longest command line, without its NUL
OFF_INIT_SIZE = 0x260  # u32 (2.10+): linear memory the kernel needs from its load address at start

MIN_VERSION = 0x0202  # 2.02: cmd_line_ptr, the first version with the 32-bit entry documented here
LOADED_HIGH = 1 << 0  # loadflags: the protected-mode code is loaded at 0x100000 (a bzImage)
XLF_KERNEL_64 = 1 << 0  # xloadflags: "has the legacy 64-bit entry point at 0x200"
ENTRY_64_OFFSET = 0x200  # boot.rst "64-bit Boot Protocol": the entry is the load address + 0x200
INITRD_ADDR_MAX_BEFORE_2_03 = 0x37FFFFFF  # initrd_addr_max: "not present ... the maximum is 0x37FFFFFF"
CMDLINE_SIZE_BEFORE_2_06 = 255  # cmdline_size: "for protocols prior to 2.06, the maximum was 255"
# type_of_loader: "If your boot loader has an assigned id ... Otherwise, enter 0xFF here" (boot.rst,
# "Details of Header Fields"); vmsup has no id assigned in that table.
TYPE_OF_LOADER_UNDEFINED = 0xFF
BOOT_ENTRIES = ("32", "64")

# zero-page.rst: the fields vmsup fills besides the setup header.
ZERO_PAGE_SIZE = 0x1000
ZP_SCREEN_INFO = 0x000  # struct screen_info, 64 bytes
ZP_ALT_MEM_K = 0x1E0  # u32: KiB of memory above 1 MiB (the e820 map is what counts)
ZP_E820_ENTRIES = 0x1E8  # u8: entries in e820_table
ZP_E820_TABLE = 0x2D0  # struct boot_e820_entry[128]
E820_MAX_ENTRIES = 128
_E820_ENTRY = struct.Struct("<QQI")  # addr, size, type (arch/x86/include/uapi/asm/setup_data.h)
E820_RAM, E820_RESERVED = 1, 2
# struct screen_info (include/uapi/linux/screen_info.h) for VGA colour text mode 3, 80x25, cursor
# at the top left: orig_video_mode (0x06), orig_video_cols (0x07), orig_video_lines (0x0E),
# orig_video_isVGA (0x0F, 1 = VGA text), orig_video_points (0x10, font height 16).
SI_VIDEO_MODE, SI_VIDEO_COLS, SI_VIDEO_LINES, SI_VIDEO_IS_VGA, SI_VIDEO_POINTS = 0x06, 0x07, 0x0E, 0x0F, 0x10
TEXT_MODE, TEXT_COLS, TEXT_LINES, VIDEO_TYPE_VGA, FONT_HEIGHT = 3, 80, 25, 1, 16


@dataclass(frozen=True)
class LinuxKernel:
    """What the setup header says, and the entry chosen."""

    version: int  # 0x020F = protocol 2.15
    setup_header: bytes  # the file's bytes from 0x1F1 to the header's end, copied into the zero page
    code32_start: int
    initrd_addr_max: int
    cmdline_size: int
    kernel_64: bool  # XLF_KERNEL_64
    entry_bits: int  # 32 or 64: the entry vmsup uses
    footprint: int  # bytes from the load address the kernel needs: its code or init_size, the larger

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def end(self) -> int:
        return layout.LINUX_KERNEL_ADDR + self.footprint


def has_header(data: bytes) -> bool:
    return data[HEADER_MAGIC_AT:HEADER_MAGIC_AT + 4] == HEADER_MAGIC


def _u8(data: bytes, off: int) -> int:
    return data[off]


def _u16(data: bytes, off: int) -> int:
    return struct.unpack_from("<H", data, off)[0]


def _u32(data: bytes, off: int) -> int:
    return struct.unpack_from("<I", data, off)[0]


def parse_bzimage(path: str, data: bytes, *, boot_entry: str | None = None) -> GuestImage:
    """A GuestImage for the bzImage in `data` (has_header(data) is true), entered the way
    `boot_entry` says ("32", "64"; default: 64-bit when the kernel has that entry)."""

    def bad(reason: str) -> GuestImageError:
        return GuestImageError(path, f"bzImage: {reason}")

    if len(data) < OFF_VERSION + 2:
        raise bad("truncated setup header")
    header_end = HEADER_MAGIC_AT + data[OFF_JUMP + 1]
    version = _u16(data, OFF_VERSION)
    if version < MIN_VERSION:
        raise bad(f"boot protocol {version >> 8}.{version & 0xFF:02d} is older than 2.02, which vmsup needs")
    if len(data) < header_end or header_end < OFF_CMD_LINE_PTR + 4:
        raise bad(f"truncated setup header (it ends at {header_end:#x}; the file has {len(data)} bytes)")
    if not _u8(data, OFF_LOADFLAGS) & LOADED_HIGH:
        raise bad("a zImage (loadflags LOADED_HIGH clear: loaded at 0x10000 by real-mode code); "
                  "vmsup loads bzImages only")
    setup_sects = _u8(data, OFF_SETUP_SECTS) or 4  # "if this field is 0, the real value is 4"
    kernel_at = (setup_sects + 1) * 512
    if kernel_at >= len(data):
        raise bad(f"setup_sects {setup_sects} puts the protected-mode kernel at offset {kernel_at:#x}, "
                  f"past the end of the {len(data)}-byte file")
    kernel = data[kernel_at:]
    if version >= 0x0204:
        # Rounded up to whole paragraphs, so the file may end up to 15 bytes short of it.
        syssize = _u32(data, OFF_SYSSIZE) * 16
        if syssize - 15 > len(kernel):
            raise bad(f"truncated: syssize says {syssize} bytes of protected-mode kernel, the file has {len(kernel)}")

    def field(off: int, since: int, default: int) -> int:
        return _u32(data, off) if version >= since and off + 4 <= header_end else default

    kernel_64 = version >= 0x020C and header_end >= OFF_XLOADFLAGS + 2 and bool(_u16(data, OFF_XLOADFLAGS) & XLF_KERNEL_64)
    if boot_entry is None:
        entry_bits = 64 if kernel_64 else 32
    elif boot_entry not in BOOT_ENTRIES:
        raise bad(f"--boot-entry {boot_entry!r} is not one of {', '.join(BOOT_ENTRIES)}")
    else:
        entry_bits = int(boot_entry)
    if entry_bits == 64 and not kernel_64:
        raise bad("--boot-entry 64: this kernel has no 64-bit entry (xloadflags XLF_KERNEL_64 clear)")
    code32_start = _u32(data, OFF_CODE32_START)
    footprint = max(len(kernel), field(OFF_INIT_SIZE, 0x020A, 0))
    linux = LinuxKernel(
        version=version, setup_header=data[SETUP_HEADER_AT:header_end], code32_start=code32_start,
        initrd_addr_max=field(OFF_INITRD_ADDR_MAX, 0x0203, INITRD_ADDR_MAX_BEFORE_2_03),
        cmdline_size=field(OFF_CMDLINE_SIZE, 0x0206, CMDLINE_SIZE_BEFORE_2_06),
        kernel_64=kernel_64, entry_bits=entry_bits, footprint=footprint)
    entry = layout.LINUX_KERNEL_ADDR + ENTRY_64_OFFSET if entry_bits == 64 else code32_start
    if not layout.LINUX_KERNEL_ADDR <= entry < layout.LINUX_KERNEL_ADDR + len(kernel):
        raise bad(f"{entry_bits}-bit entry {entry:#x} is outside the protected-mode kernel "
                  f"({layout.LINUX_KERNEL_ADDR:#x}..{layout.LINUX_KERNEL_ADDR + len(kernel):#x})")
    segment = Segment(layout.LINUX_KERNEL_ADDR, kernel, footprint)
    return GuestImage(path, "bzimage", "long" if entry_bits == 64 else "protected", entry, (segment,),
                      sha256_hex(data), len(data), linux=linux)


@dataclass(frozen=True)
class BootPlan:
    """Where the command line and the initrd go; checked before any VM exists."""

    cmdline: bytes  # NUL-terminated
    initrd_addr: int  # 0 without an initrd
    initrd_size: int


def _page_up(value: int) -> int:
    return -(-value // layout.PAGE_SIZE) * layout.PAGE_SIZE


def plan_boot(image: GuestImage, mem_size: int, cmdline: str, initrd_size: int | None, vcpus: int) -> BootPlan:
    """Check the command line and place the initrd: as high as it may go (below initrd_addr_max,
    below the end of RAM and the vCPUs' initial stacks, page-aligned) but above the kernel's
    footprint. SpecError / GuestImageError (exit 2) when it cannot be."""
    linux = image.linux
    raw = cmdline.encode()
    limit = min(linux.cmdline_size, layout.LINUX_CMDLINE_MAX)
    if b"\0" in raw:
        raise SpecError("--cmdline contains a NUL byte (the kernel sees a C string)")
    if len(raw) > limit:
        raise SpecError(f"--cmdline is {len(raw)} bytes; this kernel takes at most {limit} (cmdline_size)")
    if not initrd_size:
        return BootPlan(raw + b"\0", 0, 0)
    ram_top = (mem_size - vcpus * layout.STACK_SLOT) & ~(layout.PAGE_SIZE - 1)
    top = min(linux.initrd_addr_max + 1, ram_top)
    addr = (top - initrd_size) & ~(layout.PAGE_SIZE - 1)
    lowest = _page_up(linux.end)
    if addr < lowest:
        if linux.initrd_addr_max + 1 < ram_top:
            raise GuestImageError(image.path, f"an initrd of {initrd_size} bytes does not fit between the kernel's "
                                              f"end {lowest:#x} and initrd_addr_max {linux.initrd_addr_max:#x}")
        need = lowest + _page_up(initrd_size) + vcpus * layout.STACK_SLOT
        raise SpecError(f"--mem {mem_size >> 20} MiB is too small for the kernel (to {lowest:#x}) and an initrd of "
                        f"{initrd_size} bytes: it needs at least {need} bytes")
    return BootPlan(raw + b"\0", addr, initrd_size)


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """(addr, size, type): RAM from 0 to `mem_size` around the PC's VGA/ROM hole, with the pages the
    VMM wrote for the kernel (GDT, page tables, zero page, command line) and KVM's TSS pages reserved."""
    return [
        (0, layout.BOOT_GDT, E820_RAM),
        (layout.BOOT_GDT, layout.LINUX_AREA_END - layout.BOOT_GDT, E820_RESERVED),
        (layout.LINUX_AREA_END, layout.LOW_RAM_END - layout.LINUX_AREA_END, E820_RAM),
        (layout.LOW_RAM_END, layout.HIGH_RAM_START - layout.LOW_RAM_END, E820_RESERVED),
        (layout.HIGH_RAM_START, mem_size - layout.HIGH_RAM_START, E820_RAM),
        (layout.TSS_ADDR, layout.TSS_AREA_SIZE, E820_RESERVED),
    ]


def write_boot_params(memory, image: GuestImage, mem_size: int, plan: BootPlan, initrd: bytes | None) -> int:
    """Write the zero page, the command line and the initrd into guest RAM; returns the zero page's
    address (ESI / RSI at entry)."""
    linux = image.linux
    zp = bytearray(ZERO_PAGE_SIZE)
    zp[SETUP_HEADER_AT:SETUP_HEADER_AT + len(linux.setup_header)] = linux.setup_header
    zp[OFF_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    struct.pack_into("<I", zp, OFF_CMD_LINE_PTR, layout.LINUX_CMDLINE)
    struct.pack_into("<II", zp, OFF_RAMDISK_IMAGE, plan.initrd_addr, plan.initrd_size)
    for off, value in ((SI_VIDEO_MODE, TEXT_MODE), (SI_VIDEO_COLS, TEXT_COLS), (SI_VIDEO_LINES, TEXT_LINES),
                       (SI_VIDEO_IS_VGA, VIDEO_TYPE_VGA)):
        zp[ZP_SCREEN_INFO + off] = value
    struct.pack_into("<H", zp, ZP_SCREEN_INFO + SI_VIDEO_POINTS, FONT_HEIGHT)
    struct.pack_into("<I", zp, ZP_ALT_MEM_K, (mem_size - layout.HIGH_RAM_START) >> 10)
    entries = e820_map(mem_size)
    zp[ZP_E820_ENTRIES] = len(entries)
    for i, entry in enumerate(entries):
        _E820_ENTRY.pack_into(zp, ZP_E820_TABLE + i * _E820_ENTRY.size, *entry)
    memory.write(layout.LINUX_BOOT_PARAMS, bytes(zp))
    memory.write(layout.LINUX_CMDLINE, plan.cmdline)
    if initrd:
        memory.write(plan.initrd_addr, initrd)
    return layout.LINUX_BOOT_PARAMS
