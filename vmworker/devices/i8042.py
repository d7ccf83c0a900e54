"""The PC keyboard controller (Intel 8042): enough for guests that probe it and reset through it."""

from __future__ import annotations

import threading
from collections import deque

from .bus import StopVm

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

# Real keyboards buffer 16 scancodes; more than that is dropped and counted.
OUTPUT_QUEUE_LIMIT = 16


class I8042:
    """An 8042 keyboard controller with no keyboard attached yet.

    Implements the controller commands 0x20, 0x60, 0xAA, 0xAB, 0xAD, 0xAE, 0xD0, 0xD1 and the
    output-line pulses 0xF0-0xFF; a pulse with bit 0 clear (0xFE in practice) pulses the CPU
    reset line, as does writing an output port with bit 0 clear: both raise ``StopVm("reset")``.
    Replies queue in an output buffer read at 0x60 (0x00 when empty); `push_output` is the
    seam for the keyboard a later issue adds. Data written to 0x60 with no command waiting is
    meant for that keyboard and is only counted for now. Unknown commands are counted and
    ignored. No IRQ 1 is raised: guests poll OBF. Offsets 1-3 (ports 0x61-0x63) read 0xFF.
    """

    def __init__(self, name: str = "i8042") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._out: deque[int] = deque()
        self.command_byte = INITIAL_COMMAND_BYTE
        self.output_port = OUTPUT_PORT_RESET | OUTPUT_PORT_A20
        self._last_write_was_command = False
        self._pending: int | None = None  # command waiting for its data byte at 0x60
        self.commands = 0
        self.unknown_commands = 0
        self.keyboard_bytes = 0
        self.dropped_output = 0

    def push_output(self, byte: int) -> None:
        """Queue a byte for the guest to read at 0x60 (a controller reply or, later, a scancode)."""
        with self._lock:
            self._push(byte)

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return bytes(self._read_port(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            for i, value in enumerate(data):
                self._write_port(offset + i, value)

    def statistics(self) -> dict[str, int]:
        return {
            "commands": self.commands,
            "unknown_commands": self.unknown_commands,
            "keyboard_bytes": self.keyboard_bytes,
            "dropped_output": self.dropped_output,
        }

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
        self._out.append(byte & 0xFF)

    def _read_port(self, offset: int) -> int:
        if offset == DATA:
            return self._out.popleft() if self._out else 0x00
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
        elif pending == CMD_WRITE_OUTPUT_PORT:
            self.output_port = value
            if not value & OUTPUT_PORT_RESET:
                raise StopVm("reset", detail=f"i8042 reset (output port 0x{value:02X})")
        else:
            self.keyboard_bytes += 1

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
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._push(self.output_port)
        elif cmd >= 0xF0:
            # 0xF0-0xFF pulse output-port bits 3:0 low for each clear bit of the low nibble.
            if not cmd & OUTPUT_PORT_RESET:
                raise StopVm("reset", detail=f"i8042 reset (0x{cmd:02X})")
        else:
            self.unknown_commands += 1
