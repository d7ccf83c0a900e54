"""The device bus: an address space (I/O ports or guest-physical MMIO) shared by small devices.

A device claims a range ``[base, base + length)`` and sees offsets relative to ``base``.
Adding a device never touches the vCPU loop: the loop only calls ``Bus.read``/``Bus.write``.
Unclaimed addresses behave like an empty ISA bus: writes vanish, reads float high (all-ones);
both are counted so a guest poking at nothing is visible.
"""

from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..status import End


class Device(Protocol):
    """What a bus needs of a device. ``size`` is the access width in bytes (1, 2, 4 or 8)."""

    name: str

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class StopVm(Exception):
    """Raised by a device when the guest asks to end the whole VM (exit port, reset line).

    The vCPU loop catches it and ends the VM with ``reason`` (and ``code`` for a guest exit code).
    """

    def __init__(self, reason: End, code: int | None = None, detail: str = "") -> None:
        super().__init__(reason, code, detail)
        self.reason = reason
        self.code = code
        self.detail = detail


class BusConflictError(ValueError):
    """Two devices claimed overlapping ranges."""


class Bus:
    """Maps addresses to devices; ranges must not overlap.

    Lookups are a bisect over sorted range starts (few devices, so this is cheap and exact).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, Device]] = []  # (base, end, device), sorted by base
        self._lock = threading.Lock()  # counters are bumped from several vCPU threads
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        # addr -> (base, device) for claimed addresses seen before: a dict hit is much cheaper than
        # a bisect on the hot path. Only claimed addresses are cached, so its size is bounded by
        # the devices' ranges, whatever a guest probes.
        self._hits: dict[int, tuple[int, Device]] = {}

    def attach(self, base: int, length: int, device: Device) -> None:
        if length <= 0 or base < 0:
            raise ValueError(f"{self.name} bus: bad range base={base:#x} length={length}")
        end = base + length
        i = bisect.bisect_left(self._starts, base)
        if i > 0 and self._entries[i - 1][1] > base:
            raise BusConflictError(f"{self.name} bus: {device.name} at {base:#x} overlaps {self._entries[i - 1][2].name}")
        if i < len(self._entries) and self._entries[i][0] < end:
            raise BusConflictError(f"{self.name} bus: {device.name} at {base:#x} overlaps {self._entries[i][2].name}")
        self._starts.insert(i, base)
        self._entries.insert(i, (base, end, device))
        self._hits.clear()

    def find(self, addr: int) -> tuple[int, Device] | None:
        """The (base, device) claiming ``addr``, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            base, end, device = self._entries[i]
            if addr < end:
                return base, device
        return None

    def claimant_cache(self) -> dict[int, tuple[int, Device]]:
        """The live addr -> (base, device) cache of claimed addresses, for a caller's fast path."""
        return self._hits

    def _remember(self, addr: int) -> tuple[int, Device] | None:
        hit = self.find(addr)
        if hit is not None and len(self._hits) < 1 << 16:
            self._hits[addr] = hit
        return hit

    def read(self, addr: int, size: int) -> bytes:
        hit = self._hits.get(addr) or self._remember(addr)
        if hit is None:
            with self._lock:
                self.unclaimed_reads += 1
            return b"\xff" * size
        base, device = hit
        return device.read(addr - base, size)

    def write(self, addr: int, data: bytes) -> None:
        hit = self._hits.get(addr) or self._remember(addr)
        if hit is None:
            with self._lock:
                self.unclaimed_writes += 1
            return
        base, device = hit
        device.write(addr - base, data)

    def devices(self) -> list[tuple[int, int, Device]]:
        return list(self._entries)

    def statistics(self) -> dict[str, int]:
        return {"unclaimed_reads": self.unclaimed_reads, "unclaimed_writes": self.unclaimed_writes}
