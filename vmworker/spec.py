"""What a VM is to run: the spec the supervisor hands a worker (as JSON), and value parsing.

Parsing lives here, not in the CLI, so every front end (flags, a fleet file later) accepts the
same spellings: sizes like 16M, 512000000, 1G; addresses like 0x10000 or 65536.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .errors import SpecError

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """'16M' → 16 MiB, '1G' → 1 GiB, '512000000' → bytes. Suffixes are binary (K = 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise SpecError(f"{what} {text!r} is not a size (use bytes or a K/M/G suffix, e.g. 16M)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_address(text: str, what: str = "address") -> int:
    try:
        value = int(str(text), 0)
    except ValueError:
        raise SpecError(f"{what} {text!r} is not a number (use decimal or 0x hex)") from None
    if value < 0:
        raise SpecError(f"{what} {text!r} is negative")
    return value


@dataclass
class VmSpec:
    """One VM. `guest` is a path; mode/load_addr/entry apply to flat binaries."""

    guest: str
    name: str = "vm0"
    mem_size: int = 16 << 20
    vcpus: int = 1
    mode: str | None = None
    load_addr: int | None = None
    entry: int | None = None
    max_exits: int | None = None
    timeout: float | None = None
    quiet: bool = False
    serial_input: str | None = "-"  # "-" = stdin, None = no input (at EOF from the start), else a path
    # Recording: where to PUSH event batches (None = not recorded), this VM's id in the run,
    # its epoch (restart count) and an optional record-time filter (tracetool.filters syntax).
    bus_endpoint: str | None = None
    vm_id: int = 0
    epoch: int = 0
    record_filter: str | None = None
    # Real kernels: the in-kernel PIC/IOAPIC/LAPIC and PIT (None = on for multiboot kernels only),
    # the multiboot command line, and a key script (vmworker.devices.keyboard) typed into the i8042.
    irqchip: bool | None = None
    cmdline: str = ""
    keys: str | None = None
    # The VGA text screen: publish snapshots even while blank (`--screen`); where the worker binds
    # its key input socket (a PULL in the private run dir; None = no typing).
    screen: bool = False
    input_endpoint: str | None = None
    # A gdb stub (vmworker/gdb/): listen on "[HOST:]PORT"; with gdb_wait, no instruction runs
    # until gdb attaches.
    gdb: str | None = None
    gdb_wait: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> "VmSpec":
        if self.vcpus < 1:
            raise SpecError(f"--vcpus must be at least 1, not {self.vcpus}")
        if self.max_exits is not None and self.max_exits < 1:
            raise SpecError(f"--max-exits must be at least 1, not {self.max_exits}")
        if self.timeout is not None and not self.timeout > 0:
            raise SpecError(f"--timeout must be a positive number of seconds, not {self.timeout}")
        if self.gdb_wait and not self.gdb:
            raise SpecError("--gdb-wait needs --gdb [HOST:]PORT")
        if self.gdb:
            from .gdb.server import parse_endpoint
            parse_endpoint(self.gdb)
        from .multiboot import check_cmdline
        try:
            check_cmdline(self.cmdline)
        except ValueError as e:
            raise SpecError(str(e)) from None
        return self

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "VmSpec":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
