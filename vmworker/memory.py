"""Guest RAM: anonymous host mappings registered with KVM as memory slots.

Every access goes through a bounds check by guest-physical address (gpa), and a failure says
which gpa and length were wrong. Host addresses never leave this module.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

from . import layout
from .errors import GuestMemoryError, SpecError


def validate_mem_size(size: int) -> int:
    """A RAM size the VMM accepts: page-aligned, at least MEM_MIN, at most MEM_CAP."""
    if size <= 0:
        raise SpecError("memory size must be greater than 0")
    if size % layout.PAGE_SIZE:
        raise SpecError(f"memory size {size} is not a multiple of the {layout.PAGE_SIZE}-byte page size")
    if size < layout.MEM_MIN:
        raise SpecError(f"memory size {size} is below the minimum of {layout.MEM_MIN >> 20} MiB")
    if size > layout.MEM_CAP:
        raise SpecError(f"memory size {size} is above the cap of {layout.MEM_CAP >> 20} MiB (RAM ends below the MMIO hole at 3 GiB)")
    return size


@dataclass
class Region:
    gpa: int
    size: int
    mapping: mmap.mmap
    host_addr: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """One or more RAM regions; slot numbers follow the order they were added."""

    def __init__(self) -> None:
        self.regions: list[Region] = []

    @classmethod
    def with_ram(cls, size: int) -> "GuestMemory":
        mem = cls()
        mem.add_region(0, validate_mem_size(size))
        return mem

    def add_region(self, gpa: int, size: int) -> Region:
        if gpa % layout.PAGE_SIZE or size % layout.PAGE_SIZE or size <= 0:
            raise GuestMemoryError(f"region gpa={gpa:#x} size={size:#x} is not page-aligned")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise GuestMemoryError(f"region gpa={gpa:#x} size={size:#x} overlaps {r.gpa:#x}..{r.end:#x}")
        # MAP_NORESERVE: a 1 GiB guest costs nothing until it touches its pages.
        mapping = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
        anchor = ctypes.c_char.from_buffer(mapping)
        host_addr = ctypes.addressof(anchor)
        del anchor  # keep no buffer export, so the mapping can be closed later
        region = Region(gpa, size, mapping, host_addr)
        self.regions.append(region)
        return region

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def _locate(self, gpa: int, length: int) -> tuple[Region, int]:
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest access gpa={gpa:#x} length={length}")
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r, gpa - r.gpa
        raise GuestMemoryError(f"guest access gpa={gpa:#x} length={length} is outside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def read(self, gpa: int, length: int) -> bytes:
        region, off = self._locate(gpa, length)
        return region.mapping[off:off + length]

    def write(self, gpa: int, data: bytes) -> None:
        region, off = self._locate(gpa, len(data))
        region.mapping[off:off + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * length)

    def register(self, vm) -> None:
        """Tell KVM about every region (KVM_SET_USER_MEMORY_REGION, slot = index)."""
        for slot, r in enumerate(self.regions):
            vm.set_user_memory_region(slot, r.gpa, r.size, r.host_addr)

    def close(self) -> None:
        for r in self.regions:
            r.mapping.close()
        self.regions.clear()
