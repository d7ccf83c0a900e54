"""`monitor catch io PORT[-PORT] [in|out]` and `monitor catch mmio ADDR[-ADDR]`: stop the guest at
a port I/O or MMIO exit.

A catch sits in front of a port's device: the port bus routes each caught port to an `IoCatch`
(through its live claimant cache, which the vCPU loop's fast path and the bus's own lookups both
consult first, vmworker/devices/bus.py), which lets the original device (or the empty-bus
behaviour) serve the access and then reports a stop to the debugger. The exit itself is handled
and recorded as usual; the vCPU parks at its next KVM_RUN. An MMIO catch is a range the debugger
checks after each MMIO exit (Debugger.after_io), once the bus served it. `monitor catch off`
removes every catch.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CAUGHT_PORTS = 256  # a catch is for a few ports; bounds what one monitor command may add


class CatchError(ValueError):
    """A catch command that does not parse; the message says how to write it."""


@dataclass(frozen=True)
class IoCatchSpec:
    first: int
    last: int
    direction: str  # "in", "out" or "both"

    def describe(self) -> str:
        ports = f"{self.first:#x}" if self.first == self.last else f"{self.first:#x}-{self.last:#x}"
        return f"io {ports} {self.direction}"


def parse_io_catch(words: list[str]) -> IoCatchSpec:
    """`PORT[-PORT] [in|out]` (ports in hex or decimal) → IoCatchSpec."""
    usage = "usage: monitor catch io PORT[-PORT] [in|out], e.g. monitor catch io 0x3f8 out"
    if not words or len(words) > 2:
        raise CatchError(usage)
    first_s, _, last_s = words[0].partition("-")
    try:
        first, last = int(first_s, 0), int(last_s or first_s, 0)
    except ValueError:
        raise CatchError(usage) from None
    if not 0 <= first <= last <= 0xFFFF:
        raise CatchError("ports are 0-0xffff, the first not above the last")
    if last - first + 1 > MAX_CAUGHT_PORTS:
        raise CatchError(f"at most {MAX_CAUGHT_PORTS} ports per catch")
    direction = words[1] if len(words) == 2 else "both"
    if direction not in ("in", "out", "both"):
        raise CatchError(usage)
    return IoCatchSpec(first, last, direction)


class IoCatch:
    """Stands for one caught port on the port bus; serves the access as before, then stops."""

    name = "gdb-catch"

    def __init__(self, port: int, spec: IoCatchSpec, bus, debugger) -> None:
        self.port = port
        self.spec = spec
        self.original = bus.find(port)  # (base, device) or None: an unclaimed port
        self.bus = bus
        self.debugger = debugger

    def read(self, offset: int, size: int) -> bytes:
        if self.original is None:
            data = b"\xff" * size  # the empty bus (bus.py): reads float high
        else:
            base, device = self.original
            data = device.read(self.port - base, size)
        if self.spec.direction in ("in", "both"):
            self.debugger.caught(f"caught: in from port {self.port:#x}, {size} byte(s) {data.hex()}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        try:
            if self.original is not None:
                base, device = self.original
                device.write(self.port - base, data)
        finally:  # a device ending the VM (StopVm) still passes through; the stop is then moot
            if self.spec.direction in ("out", "both"):
                self.debugger.caught(f"caught: out to port {self.port:#x}, {len(data)} byte(s) {data.hex()}")


class IoCatches:
    """The catches of one debugger, installed on (and removed from) the port bus."""

    def __init__(self, bus, debugger) -> None:
        self.bus = bus
        self.debugger = debugger
        self.specs: list[IoCatchSpec] = []

    def add(self, spec: IoCatchSpec) -> None:
        cache = self.bus.claimant_cache()
        for port in range(spec.first, spec.last + 1):
            cache[port] = (port, IoCatch(port, spec, self.bus, self.debugger))
        self.specs.append(spec)

    def clear(self) -> None:
        cache = self.bus.claimant_cache()
        for port in [p for p, (_, device) in cache.items() if isinstance(device, IoCatch)]:
            del cache[port]  # the bus looks the claimant up again on the next access
        self.specs.clear()


@dataclass(frozen=True)
class MmioCatchSpec:
    first: int
    last: int

    def describe(self) -> str:
        where = f"{self.first:#x}" if self.first == self.last else f"{self.first:#x}-{self.last:#x}"
        return f"mmio {where}"

    def covers(self, addr: int, length: int) -> bool:
        return addr <= self.last and self.first < addr + max(length, 1)


MAX_MMIO_CATCHES = 64


def parse_mmio_catch(words: list[str]) -> MmioCatchSpec:
    """`ADDR[-ADDR]` (guest-physical, hex or decimal) → MmioCatchSpec."""
    usage = "usage: monitor catch mmio ADDR[-ADDR], e.g. monitor catch mmio 0xd0000000"
    if len(words) != 1:
        raise CatchError(usage)
    first_s, _, last_s = words[0].partition("-")
    try:
        first, last = int(first_s, 0), int(last_s or first_s, 0)
    except ValueError:
        raise CatchError(usage) from None
    if not 0 <= first <= last < 1 << 64:
        raise CatchError("addresses are 0-0xffffffffffffffff, the first not above the last")
    return MmioCatchSpec(first, last)


class MmioCatches:
    """The MMIO catches of one debugger: ranges checked after each MMIO exit."""

    def __init__(self) -> None:
        self.specs: list[MmioCatchSpec] = []

    def add(self, spec: MmioCatchSpec) -> None:
        if len(self.specs) >= MAX_MMIO_CATCHES:
            raise CatchError(f"at most {MAX_MMIO_CATCHES} MMIO catches")
        self.specs.append(spec)

    def hit(self, addr: int, length: int) -> bool:
        return any(spec.covers(addr, length) for spec in self.specs)

    def clear(self) -> None:
        self.specs.clear()
