"""The standard machine's devices: one typed set, their place on the port and MMIO buses, and the
IRQ lines they raise. Addresses and IRQ numbers come from vmworker.layout.

Adding a device: its class in a module of its own, its address in layout.py, and one attribute
plus one `_place` line here.
"""

from __future__ import annotations

from .. import layout
from ..errors import SpecError
from .bus import Bus, Device
from .console import Console
from .debug_console import DebugConsole
from .exit_device import ExitDevice
from .i8042 import LENGTH as I8042_LENGTH
from .i8042 import I8042
from .mmio_test import LENGTH as MMIO_TEST_LENGTH
from .mmio_test import MmioTestDevice
from .pci_host import LENGTH as PCI_LENGTH
from .pci_host import PciHostBridge
from .post_code import PostCodePort
from .rtc import LENGTH as RTC_LENGTH
from .rtc import CmosRtc
from .seed_port import SeedPort
from .serial_input import SerialInput
from .uart8250 import NUM_REGS as UART_LENGTH
from .uart8250 import Uart8250
from .vga import CRTC_LENGTH, VgaCrtc


class StandardDevices:
    """Every device of the standard machine, by name, attached to `port_bus` and `mmio_bus`."""

    def __init__(self, console: Console, serial_input: SerialInput, mem_size: int | None = None) -> None:
        self.port_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.seed = self._place(self.port_bus, layout.SEED_PORT, 1, SeedPort())
        self.debugcon = self._place(self.port_bus, layout.DEBUGCON_PORT, 1, DebugConsole(console))
        self.com1 = self._place(self.port_bus, layout.COM1_PORT, UART_LENGTH, Uart8250(console, serial_input))
        self.i8042 = self._place(self.port_bus, layout.I8042_PORT, I8042_LENGTH, I8042())
        self.exit = self._place(self.port_bus, layout.EXIT_PORT, 1, ExitDevice())
        # The VGA cursor; the text buffer itself is RAM.
        self.vga = self._place(self.port_bus, layout.VGA_CRTC_PORT, CRTC_LENGTH, VgaCrtc())
        # What real programs probe: the CMOS clock, POST codes, PCI bus 0 with its host bridge.
        self.rtc = self._place(self.port_bus, layout.RTC_PORT, RTC_LENGTH, CmosRtc(mem_size=mem_size))
        self.post = self._place(self.port_bus, layout.POST_PORT, 1, PostCodePort())
        self.pci = self._place(self.port_bus, layout.PCI_CONFIG_PORT, PCI_LENGTH, PciHostBridge())
        self.mmio_test = self._place(self.mmio_bus, layout.MMIO_TEST_GPA, MMIO_TEST_LENGTH, MmioTestDevice())

    def _place(self, bus: Bus, base: int, length: int, device):
        bus.attach(base, length, device)
        return device

    def by_name(self) -> dict[str, Device]:
        """{device.name: device} of every device on the buses."""
        return {dev.name: dev for _base, _end, dev in self.port_bus.devices() + self.mmio_bus.devices()}

    def saved_state(self) -> dict:
        """{device name: state} of every device that keeps guest-visible state (snapshots)."""
        return {name: dev.state() for name, dev in self.by_name().items() if hasattr(dev, "state")}

    def restore_saved_state(self, states: dict, path: str) -> None:
        """Put back what saved_state gave; a device the snapshot lacks keeps its reset state."""
        if not isinstance(states, dict):
            raise SpecError(f"{path}: corrupt snapshot (devices)")
        devices = self.by_name()
        for name, state in states.items():
            dev = devices.get(name)
            if dev is not None and hasattr(dev, "restore"):
                try:
                    dev.restore(state)
                except (TypeError, ValueError, SpecError) as e:
                    raise SpecError(f"{path}: corrupt snapshot ({e})") from None

    def connect_irqs(self, vm) -> None:
        """Wire the devices' interrupt lines into the VM's in-kernel irqchip (KVM_IRQ_LINE)."""
        self.i8042.connect_irq(lambda level: vm.irq_line(layout.I8042_IRQ, level))
