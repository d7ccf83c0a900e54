"""A PCI host bridge on configuration mechanism #1: the only device on PCI bus 0, as an i440FX.

PCI Local Bus Specification 3.0, §3.2.2.3.2 (configuration mechanism #1): a 32-bit write to
CONFIG_ADDRESS (port 0xCF8) selects a function's register — bit 31 enable, bits 23:16 bus, 15:11
device, 10:8 function, 7:2 the dword register — and CONFIG_DATA (ports 0xCFC-0xCFF) reads or writes
it, a byte, word or dword at (port - 0xCFC) within the dword. A read of a function that does not
exist ends in a master abort and returns all-ones (§6.1: a vendor ID of 0xFFFF means "no device"),
which is how every probe finds the end of the list.

The bridge at 0:0.0 answers with the identity of Intel's 82441FX PCI and Memory Controller (the
i440FX, what QEMU's and kvmtool's PCs show): vendor 0x8086, device 0x1237, class 0x060000 (bridge,
host bridge). Its configuration space is read-only here (no BARs to size, no memory windows to
program), so writes to CONFIG_DATA are ignored.
"""

from __future__ import annotations

import struct

LENGTH = 8  # 0xCF8-0xCFF
DATA_OFFSET = 4  # CONFIG_DATA at 0xCFC
ENABLE = 1 << 31
NO_DEVICE = 0xFFFF_FFFF

# Type 0 configuration header fields (PCI 3.0 §6.1) of the 82441FX (Intel 82441FX datasheet,
# "PCI Configuration Registers").
VENDOR_INTEL = 0x8086
DEVICE_I440FX = 0x1237
COMMAND = 0x0006  # memory space and bus master enabled, as firmware leaves a host bridge
STATUS = 0x0280  # fast back-to-back capable, DEVSEL timing medium
REVISION = 0x02
CLASS_HOST_BRIDGE = 0x060000  # base class 0x06 bridge, subclass 0x00 host bridge, prog-if 0x00
HEADER_TYPE = 0x00  # type 0, single function


def host_bridge_config() -> bytes:
    """The bridge's 256-byte configuration space."""
    space = bytearray(256)
    struct.pack_into("<HHHHI", space, 0, VENDOR_INTEL, DEVICE_I440FX, COMMAND, STATUS,
                     (CLASS_HOST_BRIDGE << 8) | REVISION)
    space[0x0E] = HEADER_TYPE
    return bytes(space)


def config_address(bus: int, device: int, function: int, register: int) -> int:
    """The CONFIG_ADDRESS value for a dword register (what a guest writes to 0xCF8)."""
    return ENABLE | bus << 16 | device << 11 | function << 8 | (register & 0xFC)


class PciHostBridge:
    """CONFIG_ADDRESS at offset 0, CONFIG_DATA at offsets 4-7. Bus 0, device 0, function 0 only."""

    def __init__(self, name: str = "pci") -> None:
        self.name = name
        self.address = 0
        self._config = host_bridge_config()

    def _selected(self) -> bytes | None:
        """The selected function's configuration space, or None for nothing there."""
        if not self.address & ENABLE:
            return None
        bus, device, function = (self.address >> 16) & 0xFF, (self.address >> 11) & 0x1F, (self.address >> 8) & 7
        return self._config if (bus, device, function) == (0, 0, 0) else None

    def read(self, offset: int, size: int) -> bytes:
        if offset < DATA_OFFSET:
            # Only a dword access at 0xCF8 is CONFIG_ADDRESS; narrower ones reach other ISA
            # registers (0xCF9 is the PIIX reset control), which vmsup does not model.
            return self.address.to_bytes(4, "little") if offset == 0 and size == 4 else b"\xff" * size
        space = self._selected()
        at = (self.address & 0xFC) + offset - DATA_OFFSET
        if space is None or at + size > len(space):
            return b"\xff" * size
        return space[at:at + size]

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 4:
            self.address = int.from_bytes(data, "little")
        # CONFIG_DATA writes: the bridge's registers are read-only here (see the module docstring).
