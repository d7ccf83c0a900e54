"""Guest images: which parser reads a file — a Linux boot protocol kernel ("HdrS" at 0x202), else a
multiboot kernel (a header in its first 8 KiB), else ELF (by its magic), else a flat binary —
checked before any VM exists.

The Linux setup header is looked for first: its signature sits at one fixed offset, so a match is no
accident, while the multiboot magic may sit at any 4-byte boundary of the first 8 KiB, where a
bzImage's setup code or compressed payload can hold those bytes by chance. A kernel carrying both
headers on purpose (memtest86+ does) boots the Linux way, which gives it more: the e820 map, the
initrd, a 64-bit entry.

Imports point one way: loader → multiboot → elf → image, loader → bzimage → image and
loader → flat → image.
"""

from __future__ import annotations

from . import bzimage, layout, multiboot
from .elf import ELF_MAGIC, parse_elf
from .errors import GuestImageError
from .flat import flat_image
from .image import GuestImage, read_image_file


def load_image(path: str, *, load_addr: int | None = None, entry: int | None = None,
               mode: str | None = None, boot_entry: str | None = None) -> GuestImage:
    """Parse `path` as a Linux boot protocol kernel (entered as `boot_entry` says), else as a
    multiboot kernel, else as ELF (by its magic), else as a flat binary placed at `load_addr`."""
    data = read_image_file(path)
    if bzimage.has_header(data):
        for value, flag in ((load_addr, "--load-addr"), (entry, "--entry"), (mode, "--mode")):
            if value is not None:
                raise GuestImageError(path, f"{flag} applies to flat binaries and ELF; a bzImage is loaded at "
                                            f"{layout.LINUX_KERNEL_ADDR:#x} (choose its entry with --boot-entry 32|64)")
        return bzimage.parse_bzimage(path, data, boot_entry=boot_entry)
    if boot_entry is not None:
        raise GuestImageError(path, "--boot-entry applies to bzImage kernels (a Linux setup header, \"HdrS\" at 0x202)")
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
