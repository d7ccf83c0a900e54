"""The standard machine's devices and where they sit on the port and MMIO buses."""

from __future__ import annotations

from .bus import Bus, Device
from .console import Console
from .debug_console import DebugConsole
from .exit_device import ExitDevice
from .i8042 import LENGTH as I8042_LENGTH
from .i8042 import I8042
from .mmio_test import LENGTH as MMIO_TEST_LENGTH
from .mmio_test import MmioTestDevice
from .seed_port import SeedPort
from .serial_input import SerialInput
from .uart8250 import NUM_REGS as UART_LENGTH
from .uart8250 import Uart8250
from .vga import CRTC_LENGTH, CRTC_PORT, VgaCrtc

# The kvmsample seed guest writes its counter here (`out %ax, $0x10`).
SEED_PORT = 0x10
# The i8042 data (0x60) and status/command (0x64) ports of the PC/AT keyboard controller.
I8042_PORT = 0x60
# The Bochs/QEMU debug console port.
DEBUGCON_PORT = 0xE9
# QEMU isa-debug-exit's default iobase, so guests written for QEMU tests work unchanged.
EXIT_PORT = 0xF4
# COM1, where every PC guest and firmware looks for the first serial port.
COM1_PORT = 0x3F8
# A free spot above guest RAM, which is capped at 3 GiB: inside the 3-4 GiB hole where PCs put
# device memory, so even a 32-bit guest without paging can reach it.
MMIO_TEST_GPA = 0xD000_0000


def standard_devices(console: Console, serial_input: SerialInput) -> tuple[Bus, Bus, dict[str, Device]]:
    """Build (port_bus, mmio_bus, devices_by_name) with every standard device attached."""
    pio = Bus("pio")
    mmio = Bus("mmio")
    placed = [
        (pio, SEED_PORT, 1, SeedPort()),
        (pio, DEBUGCON_PORT, 1, DebugConsole(console)),
        (pio, COM1_PORT, UART_LENGTH, Uart8250(console, serial_input)),
        (pio, I8042_PORT, I8042_LENGTH, I8042()),
        (pio, EXIT_PORT, 1, ExitDevice()),
        (pio, CRTC_PORT, CRTC_LENGTH, VgaCrtc()),  # the VGA cursor; the text buffer itself is RAM
        (mmio, MMIO_TEST_GPA, MMIO_TEST_LENGTH, MmioTestDevice()),
    ]
    by_name: dict[str, Device] = {}
    for bus, base, length, device in placed:
        bus.attach(base, length, device)
        by_name[device.name] = device
    return pio, mmio, by_name
