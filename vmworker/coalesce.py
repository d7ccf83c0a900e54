"""Coalesced I/O: guest writes KVM queues in a ring instead of exiting, drained by the vCPU loop.

KVM_REGISTER_COALESCED_MMIO (api.rst 4.67; `pio = 1` for ports) names a zone whose *writes* the
kernel appends to one ring page per VM (struct kvm_coalesced_mmio_ring: u32 first, u32 last, then
24-byte struct kvm_coalesced_mmio entries) instead of returning to user space. The page sits in
every vCPU's mmap at the page offset KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO) returns; it holds
(page size - 8) / 24 slots (170 with 4 KiB pages), one always free (full: (last + 1) % max == first;
a write that does not fit exits as usual). An entry has no time, vCPU or guest address.

Only devices whose writes have no effect the guest could observe before its next exit qualify
(`deferrable_writes = True` on the device class): the ring is drained before every exit is handled,
so a later read of the same device (an exit) sees every earlier write, in order.

A zone is named as the user typed it: `PORT[-PORT]` (inclusive; a port names where an access
*starts*, so the kernel's zone reaches up to 3 ports further for 16/32-bit `out`s, never into a
device that is not deferrable) or `mmio:ADDR[-ADDR]` (inclusive bytes).
"""

from __future__ import annotations

import io
import mmap
import struct
import threading
import time
from typing import NamedTuple

from . import kvm_abi as abi
from .errors import SpecError

RING_HEAD = struct.Struct("<II")  # kvm_coalesced_mmio_ring: first, last
ENTRY = struct.Struct("<QII8s")  # kvm_coalesced_mmio: phys_addr, len, pio, data[8]
assert RING_HEAD.size == abi.ctypes.sizeof(abi.kvm_coalesced_mmio_ring)
assert ENTRY.size == abi.ctypes.sizeof(abi.kvm_coalesced_mmio)
MAX_PORT = 0xFFFF
PORT_WIDTH = 4  # the widest port access (`out %eax`)


def ring_slots(page_size: int = mmap.PAGESIZE) -> int:
    """KVM_COALESCED_MMIO_MAX of linux/kvm.h: the ring's entries that fit in one page."""
    return (page_size - RING_HEAD.size) // ENTRY.size


class Zone(NamedTuple):
    pio: bool
    first: int  # inclusive
    last: int  # inclusive

    def __str__(self) -> str:
        return ("" if self.pio else "mmio:") + (f"{self.first:#x}" if self.first == self.last
                                                 else f"{self.first:#x}-{self.last:#x}")


def parse_zone(text: str) -> Zone:
    """`0x10`, `0x10-0x11` or `mmio:0xd0000000-0xd0000fff` → a Zone; SpecError otherwise."""
    body = text.strip()
    pio = not body.lower().startswith("mmio:")
    if not pio:
        body = body[5:]
    parts = body.split("-")
    if len(parts) > 2 or not all(p.strip() for p in parts):
        raise SpecError(f"{text!r} is not PORT[-PORT] or mmio:ADDR[-ADDR]")
    try:
        first, last = int(parts[0], 0), int(parts[-1], 0)
    except ValueError:
        raise SpecError(f"{text!r} is not PORT[-PORT] or mmio:ADDR[-ADDR] (numbers: decimal or 0x hex)") from None
    if first < 0 or last < first:
        raise SpecError(f"{text!r} is an empty range")
    if pio and last > MAX_PORT:
        raise SpecError(f"{text!r}: ports end at {MAX_PORT:#x}")
    return Zone(pio, first, last)


def _standard_buses():
    """The standard machine's buses, as every VM gets them (a throwaway set: nothing runs)."""
    from .devices.console import Console
    from .devices.serial_input import SerialInput
    from .devices.standard import StandardDevices
    devices = StandardDevices(Console(io.BytesIO(), line_buffered=False), SerialInput.empty())
    return devices.port_bus, devices.mmio_bus


def check_zones(texts: list[str]) -> list[str]:
    """Parse and check zones against the standard devices; their canonical spellings. SpecError
    names the first that is not a claimed address of a device whose writes may wait."""
    port_bus, mmio_bus = _standard_buses()
    out = []
    for text in texts:
        zone = parse_zone(text)
        bus = port_bus if zone.pio else mmio_bus
        for base, end, device in bus.devices():
            if base <= zone.last and zone.first < end and not getattr(device, "deferrable_writes", False):
                raise SpecError(f"{zone} overlaps {device.name} at {base:#x}, whose writes the guest can observe "
                                "(it reads back or interrupts): it cannot be coalesced")
        addr = zone.first
        while addr <= zone.last:  # every address claimed (devices are few: jump range by range)
            hit = bus.find(addr)
            if hit is None:
                raise SpecError(f"{zone}: {'port' if zone.pio else 'address'} {addr:#x} belongs to no device")
            addr = next(end for base, end, dev in bus.devices() if base == hit[0])
        out.append(str(zone))
    return out


def kernel_zone(zone: Zone, port_bus) -> tuple[int, int]:
    """(addr, size) for KVM: an MMIO zone as typed; a port zone widened so a 2- or 4-byte access
    starting at its last port still fits, stopping before any port of a non-deferrable device."""
    size = zone.last - zone.first + 1
    if zone.pio:
        for port in range(zone.last + 1, min(zone.last + PORT_WIDTH, MAX_PORT + 1)):
            hit = port_bus.find(port)
            if hit is not None and not getattr(hit[1], "deferrable_writes", False):
                break
            size += 1
    return zone.first, size


class CoalescedRing:
    """The VM's ring: registered zones, and the drain every vCPU thread calls (one at a time)."""

    def __init__(self, vm, kvm, zones: list[str], port_bus, mmio_bus, exit_log=None) -> None:
        page = kvm.check_extension(abi.KVM_CAP_COALESCED_MMIO)
        if page <= 0:
            raise SpecError("--coalesce: this host's KVM has no coalesced MMIO (KVM_CAP_COALESCED_MMIO)")
        parsed = [parse_zone(z) for z in zones]
        if any(z.pio for z in parsed) and kvm.check_extension(abi.KVM_CAP_COALESCED_PIO) <= 0:
            raise SpecError("--coalesce: this host's KVM has no coalesced port I/O (KVM_CAP_COALESCED_PIO)")
        self.page_offset = page * mmap.PAGESIZE
        self.slots = ring_slots()
        self.zones = parsed
        for z in parsed:
            addr, size = kernel_zone(z, port_bus)
            vm.register_coalesced_mmio(addr, size, pio=z.pio)
        self.port_write, self.mmio_write = port_bus.write, mmio_bus.write
        self.log = exit_log  # a VM that prints its exits prints its coalesced writes too
        self._ring = None
        self._lock = threading.Lock()
        self.t_prev = time.monotonic_ns()  # no entry is older than the registration
        self.drained = 0

    def attach(self, vcpu) -> None:
        """Map the ring through a vCPU's mmap (every vCPU's mmap shows the same page)."""
        if self._ring is None:  # the mmap itself, not a memoryview: that would keep it from closing
            self._ring = vcpu.run_page

    def drain(self, sink, pos: int, vcpu_id: int = 0) -> None:
        """Hand every queued write to its bus, in order, then `sink(entries, pos, t_after,
        t_before)`: the raw 24-byte entries, the caller's row position (which exit drained them)
        and the exact bounds of when they were written (after the previous drain looked, before
        this one did). Any vCPU thread; one drains at a time."""
        ring = self._ring
        log = self.log
        with self._lock:
            t = time.monotonic_ns()
            first, last = RING_HEAD.unpack_from(ring, self.page_offset)
            if first == last:
                self.t_prev = t
                return
            off = self.page_offset + RING_HEAD.size
            if last > first:
                raw = ring[off + first * ENTRY.size:off + last * ENTRY.size]
            else:
                raw = ring[off + first * ENTRY.size:off + self.slots * ENTRY.size] + ring[off:off + last * ENTRY.size]
            # Consumed: the kernel may reuse the slots (it reads `first` under its ring lock).
            struct.pack_into("<I", ring, self.page_offset, last)
            t_after, self.t_prev = self.t_prev, t
            port_write, mmio_write = self.port_write, self.mmio_write
            for addr, length, pio, data in ENTRY.iter_unpack(raw):
                (port_write if pio else mmio_write)(addr, data[:length])
                if log is not None:
                    if pio:
                        log.io(vcpu_id, True, addr, length, 1, data[:length])
                    else:
                        log.mmio(vcpu_id, True, addr, data[:length])
            self.drained += len(raw) // ENTRY.size
        if sink is not None:
            sink(raw, pos, t_after, t)
