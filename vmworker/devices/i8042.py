"""The PC keyboard controller (Intel 8042) with a PS/2 keyboard behind it."""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from ..status import End
from .bus import StopVm
from .saved_state import SavedFields

# Offsets within the device, which spans ports 0x60-0x64 as one range.
DATA = 0  # port 0x60
COMMAND_STATUS = 4  # port 0x64: read status, write command
LENGTH = 5

# Status register bits (i8042 status register).
STATUS_OBF = 0x01  # output buffer full: a byte waits at 0x60
STATUS_IBF = 0x02  # input buffer full: always 0, we take every write at once
STATUS_SYS = 0x04  # system flag: POST passed (copy of command byte bit 2)
STATUS_CMD = 0x08  # last write went to 0x64 (command) rather than 0x60 (data)

# Controller command byte bits.
CB_KBD_INT = 0x01  # raise IRQ 1 when a byte enters the output buffer
CB_SYS = 0x04
CB_KBD_DISABLED = 0x10
# Keyboard interrupt on, system flag set, scancode translation on: what a BIOS leaves after POST
# (the guest has no BIOS, so the controller starts as if POST ran).
INITIAL_COMMAND_BYTE = 0x45

# Output port bits (i8042 "write output port", command 0xD1).
OUTPUT_PORT_RESET = 0x01  # 0 asserts the CPU reset line
OUTPUT_PORT_A20 = 0x02

# Controller commands written to 0x64.
CMD_READ_COMMAND_BYTE = 0x20
CMD_WRITE_COMMAND_BYTE = 0x60
CMD_SELF_TEST = 0xAA
CMD_KBD_PORT_TEST = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
SELF_TEST_OK = 0x55
PORT_TEST_OK = 0x00

# Commands the keyboard itself takes (bytes written to 0x60 with no controller command waiting),
# and its replies: the PS/2 (MF2) keyboard command set.
KBD_SET_LEDS = 0xED  # + one data byte
KBD_ECHO = 0xEE
KBD_SCANCODE_SET = 0xF0  # + one data byte; 0 asks for the current set
KBD_IDENTIFY = 0xF2
KBD_TYPEMATIC = 0xF3  # + one data byte
KBD_ENABLE = 0xF4
KBD_DISABLE = 0xF5  # stop scanning, restore defaults
KBD_DEFAULTS = 0xF6
KBD_RESEND = 0xFE
KBD_RESET = 0xFF
KBD_ACK = 0xFA
KBD_BAT_OK = 0xAA  # basic assurance test passed, sent after a reset
KBD_RESEND_REPLY = 0xFE  # "resend": what a keyboard answers to a byte it does not understand
# An MF2 keyboard identifies as AB 83; through the controller's translation 0x83 reads as 0x41.
KBD_ID = (0xAB, 0x41)
KBD_CURRENT_SET = 0x41  # set 2, as translated (we deliver set 1, i.e. translation is always on)
_KBD_COMMANDS_WITH_DATA = (KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_TYPEMATIC)

# Real keyboards buffer 16 scancodes; the controller's queue of replies is bounded the same way.
OUTPUT_QUEUE_LIMIT = 16
KEYBOARD_BUFFER = 16


class I8042(SavedFields):
    """An 8042 keyboard controller and the PS/2 keyboard on its first port.

    Controller: commands 0x20, 0x60, 0xAA, 0xAB, 0xAD, 0xAE, 0xD0, 0xD1 and the output-line pulses
    0xF0-0xFF; a pulse with bit 0 clear (0xFE in practice) pulses the CPU reset line, as does
    writing an output port with bit 0 clear: both raise ``StopVm(End.RESET)``. Unknown commands are
    counted and ignored. Offsets 1-3 (ports 0x61-0x63) read 0xFF; with an in-kernel PIT, KVM
    answers 0x61 before it gets here.

    Output buffer: controller replies (and `push_output`) come first; keyboard bytes move in when
    it is empty and the keyboard interface is enabled (command byte bit 4 clear), one at a time as
    the guest reads 0x60. Each time a new byte becomes readable, and the command byte enables the
    keyboard interrupt (bit 0), IRQ 1 gets an edge through `connect_irq`'s line (the in-kernel
    8259 is edge-triggered); without a line, guests poll status bit 0 (OBF).

    Keyboard: `inject_scancodes` is what keys pressed on it send (scan code set 1: the controller's
    translation is always on); its 16-byte buffer makes a caller wait for room rather than drop.
    It answers the PS/2 commands a kernel sends (reset → FA AA, identify → FA AB 41, LEDs,
    typematic, scancode set, enable/disable scanning → FA, echo → EE; anything else → FE); reset,
    disable and set-defaults also empty its buffer, as a real keyboard does.
    """

    SAVED = ("_out", "_kbd", "_kbd_replies", "command_byte", "output_port", "_last_write_was_command",
             "_pending", "_kbd_pending", "_scanning")  # guest-visible state a snapshot keeps

    def __init__(self, name: str = "i8042") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # injectors wait here for keyboard buffer space
        self._out: deque[int] = deque()  # the controller's output buffer and its replies
        self._kbd: deque[int] = deque()  # bytes the keyboard has yet to send
        self._kbd_replies: deque[int] = deque()  # keyboard command replies, sent before keys
        self.command_byte = INITIAL_COMMAND_BYTE
        self.output_port = OUTPUT_PORT_RESET | OUTPUT_PORT_A20
        self._last_write_was_command = False
        self._pending: int | None = None  # controller command waiting for its data byte at 0x60
        self._kbd_pending: int | None = None  # keyboard command waiting for its data byte
        self._scanning = True
        self._irq: Callable[[int], None] | None = None
        self._irq_lock = threading.Lock()
        self._edge = False  # a new byte became readable: IRQ 1 gets an edge once the lock is released
        self._closed = False
        self.touched = threading.Event()  # the guest has accessed the controller at least once
        self.commands = 0
        self.unknown_commands = 0
        self.keyboard_bytes = 0
        self.keyboard_commands = 0
        self.scancodes_in = 0
        self.irqs = 0
        self.cleared_scancodes = 0  # keys the guest discarded by resetting or disabling the keyboard
        self.dropped_output = 0

    # Wiring -------------------------------------------------------------------------------------
    def connect_irq(self, set_level: Callable[[int], None]) -> None:
        """Give the controller its IRQ 1 line: ``set_level(1)`` then ``set_level(0)`` is one edge."""
        self._irq = set_level

    def close(self) -> None:
        """Wake and refuse injectors: the VM is gone."""
        with self._room:
            self._closed = True
            self._room.notify_all()

    # The keyboard's side ------------------------------------------------------------------------
    def inject_scancodes(self, codes: bytes, timeout: float | None = None) -> bool:
        """Send `codes` as the keyboard would, waiting while its buffer is full.

        False if the controller was closed or `timeout` passed first. A sequence longer than
        the buffer goes in pieces as the guest reads.
        """
        at = 0
        while at < len(codes):
            with self._room:
                if not self._room.wait_for(lambda: self._closed or len(self._kbd) < KEYBOARD_BUFFER, timeout):
                    return False
                if self._closed:
                    return False
                take = min(KEYBOARD_BUFFER - len(self._kbd), len(codes) - at)
                self._kbd.extend(codes[at:at + take])
                self.scancodes_in += take
                at += take
                self._refill()
                edge = self._take_edge()
            self._pulse(edge)
        return True

    def keyboard_buffered(self) -> int:
        with self._lock:
            return len(self._kbd)

    # The bus's side -----------------------------------------------------------------------------
    def push_output(self, byte: int) -> None:
        """Queue a controller byte for the guest to read at 0x60, ahead of keyboard data."""
        with self._lock:
            self._push(byte)
            edge = self._take_edge()
        self._pulse(edge)

    def read(self, offset: int, size: int) -> bytes:
        if not self.touched.is_set():
            self.touched.set()
        with self._lock:
            data = bytes(self._read_port(offset + i) for i in range(size))
            edge = self._take_edge()
        self._pulse(edge)
        return data

    def write(self, offset: int, data: bytes) -> None:
        if not self.touched.is_set():
            self.touched.set()
        edge = False
        try:
            with self._lock:
                try:
                    for i, value in enumerate(data):
                        self._write_port(offset + i, value)
                finally:
                    edge = self._take_edge()
        finally:
            self._pulse(edge)

    def statistics(self) -> dict[str, int]:
        return {
            "commands": self.commands,
            "unknown_commands": self.unknown_commands,
            "keyboard_bytes": self.keyboard_bytes,
            "keyboard_commands": self.keyboard_commands,
            "scancodes_in": self.scancodes_in,
            "irqs": self.irqs,
            "cleared_scancodes": self.cleared_scancodes,
            "dropped_output": self.dropped_output,
        }

    # Internals (called with the lock held, except _pulse) ---------------------------------------
    def _take_edge(self) -> bool:
        """Whether IRQ 1 is due (a new byte became readable with the interrupt enabled); clears it."""
        edge, self._edge = self._edge, False
        if edge and self._irq is not None and self.command_byte & CB_KBD_INT:
            self.irqs += 1
            return True
        return False

    def _pulse(self, edge: bool) -> None:
        # Outside the device lock (the guest may take the interrupt and read 0x60 at once), but one
        # pulse at a time: the guest's read can make the next byte readable while the injector's
        # line is still high, and a raise that overlaps another is no edge to the 8259 (lost IRQ).
        if edge:
            with self._irq_lock:
                self._irq(1)
                self._irq(0)

    def _refill(self) -> None:
        """Move the keyboard's next byte into an empty output buffer, if the interface allows."""
        if self._out or self.command_byte & CB_KBD_DISABLED:
            return
        if self._kbd_replies:
            self._out.append(self._kbd_replies.popleft())
        elif self._kbd and self._scanning:
            self._out.append(self._kbd.popleft())
            self._room.notify_all()
        else:
            return
        self._edge = True

    def _status(self) -> int:
        status = STATUS_OBF if self._out else 0
        if self.command_byte & CB_SYS:
            status |= STATUS_SYS
        if self._last_write_was_command:
            status |= STATUS_CMD
        return status

    def _push(self, byte: int) -> None:
        if len(self._out) >= OUTPUT_QUEUE_LIMIT:
            self.dropped_output += 1
            return
        if not self._out:
            self._edge = True
        self._out.append(byte & 0xFF)

    def _read_port(self, offset: int) -> int:
        if offset == DATA:
            if not self._out:
                return 0x00
            byte = self._out.popleft()
            if self._out:
                self._edge = True  # the next queued byte is now readable
            else:
                self._refill()
            return byte
        if offset == COMMAND_STATUS:
            return self._status()
        return 0xFF

    def _write_port(self, offset: int, value: int) -> None:
        if offset == DATA:
            self._last_write_was_command = False
            self._write_data(value)
        elif offset == COMMAND_STATUS:
            self._last_write_was_command = True
            self._command(value)

    def _write_data(self, value: int) -> None:
        pending, self._pending = self._pending, None
        if pending == CMD_WRITE_COMMAND_BYTE:
            self.command_byte = value
            self._refill()  # the keyboard may have been enabled
        elif pending == CMD_WRITE_OUTPUT_PORT:
            self.output_port = value
            if not value & OUTPUT_PORT_RESET:
                raise StopVm(End.RESET, detail=f"i8042 reset (output port 0x{value:02X})")
        else:
            self.keyboard_bytes += 1
            self._keyboard_command(value)

    def _keyboard_command(self, value: int) -> None:
        self.keyboard_commands += 1
        pending, self._kbd_pending = self._kbd_pending, None
        replies: tuple[int, ...]
        if pending is not None:  # the data byte of LEDs / scancode set / typematic
            replies = (KBD_ACK, KBD_CURRENT_SET) if pending == KBD_SCANCODE_SET and value == 0 else (KBD_ACK,)
        elif value in _KBD_COMMANDS_WITH_DATA:
            self._kbd_pending = value
            replies = (KBD_ACK,)
        elif value == KBD_ECHO:
            replies = (KBD_ECHO,)
        elif value == KBD_IDENTIFY:
            replies = (KBD_ACK, *KBD_ID)
        elif value == KBD_ENABLE:
            self._scanning = True
            replies = (KBD_ACK,)
        elif value in (KBD_DISABLE, KBD_DEFAULTS):
            self._scanning = value == KBD_DEFAULTS
            self._clear_keyboard_buffer()  # both restore power-on defaults, buffer included
            replies = (KBD_ACK,)
        elif value == KBD_RESET:
            self._scanning = True
            self._clear_keyboard_buffer()
            replies = (KBD_ACK, KBD_BAT_OK)
        elif value == KBD_RESEND:
            replies = (KBD_ACK,)
        else:
            self.keyboard_commands -= 1
            self.unknown_commands += 1
            replies = (KBD_RESEND_REPLY,)
        self._kbd_replies.extend(replies)
        self._refill()

    def _clear_keyboard_buffer(self) -> None:
        self.cleared_scancodes += len(self._kbd)
        self._kbd.clear()
        self._room.notify_all()

    def _command(self, cmd: int) -> None:
        self.commands += 1
        self._pending = None  # a new command abandons one still waiting for data
        if cmd == CMD_READ_COMMAND_BYTE:
            self._push(self.command_byte)
        elif cmd in (CMD_WRITE_COMMAND_BYTE, CMD_WRITE_OUTPUT_PORT):
            self._pending = cmd
        elif cmd == CMD_SELF_TEST:
            self.command_byte |= CB_SYS  # a passed self-test sets the system flag
            self._push(SELF_TEST_OK)
        elif cmd == CMD_KBD_PORT_TEST:
            self._push(PORT_TEST_OK)
        elif cmd == CMD_DISABLE_KBD:
            self.command_byte |= CB_KBD_DISABLED
        elif cmd == CMD_ENABLE_KBD:
            self.command_byte &= ~CB_KBD_DISABLED
            self._refill()
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._push(self.output_port)
        elif cmd >= 0xF0:
            # 0xF0-0xFF pulse output-port bits 3:0 low for each clear bit of the low nibble.
            if not cmd & OUTPUT_PORT_RESET:
                raise StopVm(End.RESET, detail=f"i8042 reset (0x{cmd:02X})")
        else:
            self.unknown_commands += 1
