"""Guest images: which parser reads a file — a multiboot kernel (a header in its first 8 KiB), else
ELF (by its magic), else a flat binary — checked before any VM exists.

Imports point one way: loader → multiboot → elf → image, and loader → flat → image.
"""

from __future__ import annotations

from . import layout, multiboot
from .elf import ELF_MAGIC, parse_elf
from .errors import GuestImageError
from .flat import flat_image
from .image import GuestImage, read_image_file


def load_image(path: str, *, load_addr: int | None = None, entry: int | None = None,
               mode: str | None = None) -> GuestImage:
    """Parse `path` as a multiboot kernel (a header in its first 8 KiB), else as ELF (by its
    magic), else as a flat binary placed at `load_addr`."""
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
