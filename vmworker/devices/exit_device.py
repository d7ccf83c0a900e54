"""The guest's exit port (isa-debug-exit style): how a test guest ends the VM with a status."""

from __future__ import annotations

from ..status import End
from .bus import StopVm


class ExitDevice:
    """A write of 1, 2 or 4 bytes ends the VM: ``StopVm(End.GUEST_EXIT, code=value)``.

    The code is exactly the value written, not QEMU isa-debug-exit's ``(value << 1) | 1``: QEMU
    shifts so that no guest value can look like its own clean exit 0; here the worker reports the
    guest's exit separately from its own status, so the guest's number reaches the user unchanged.
    Reads return all-ones, like an empty ISA port.
    """

    def __init__(self, name: str = "exit") -> None:
        self.name = name

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        raise StopVm(End.GUEST_EXIT, code=value, detail=f"guest wrote {value:#x} ({len(data)} bytes) to the exit port")
