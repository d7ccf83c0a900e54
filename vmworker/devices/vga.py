"""The VGA text screen: the CRTC's index/data ports and a reader of the 80×25 text buffer.

A PC in text mode 3 shows 80×25 cells from guest-physical 0xB8000, two bytes a cell (character,
attribute). The buffer is plain RAM here: the guest writes it without any exit, so the screen is
*sampled* (vmworker.screen), never trapped. Only the cursor needs a device: the CRT controller's
registers behind index port 0x3D4 and data port 0x3D5 (IBM VGA Technical Reference, "CRT
Controller Registers"): 0x0A cursor start (bit 5 = cursor off), 0x0C/0x0D start address (the
first cell shown), 0x0E/0x0F cursor location (a cell index, high byte first).
"""

from __future__ import annotations

from ..layout import VGA_TEXT_BUFFER
from .saved_state import SavedFields

COLS, ROWS = 80, 25
CELL_BYTES = 2
SCREEN_BYTES = COLS * ROWS * CELL_BYTES  # 4000
CRTC_LENGTH = 2
CRTC_REGISTERS = 0x19  # 0x00–0x18 on a VGA; the index register keeps only 5 bits

REG_CURSOR_START = 0x0A
CURSOR_DISABLE = 0x20  # bit 5 of Cursor Start
REG_START_HIGH, REG_START_LOW = 0x0C, 0x0D
REG_CURSOR_HIGH, REG_CURSOR_LOW = 0x0E, 0x0F


class VgaCrtc(SavedFields):
    """CRTC index (offset 0) and data (offset 1) ports. Unknown registers are stored and read back.

    A 16-bit `out %ax, $0x3d4` writes index (AL) and data (AH) at once, as kernels often do.
    Writes come from a vCPU thread and reads from the screen sampler: each is one store or load
    of a bytearray item, atomic under the GIL, so no lock is needed.
    """

    SAVED = ("index", "regs")  # guest-visible state a snapshot keeps

    def __init__(self, name: str = "vga") -> None:
        self.name = name
        self.index = 0
        self.regs = bytearray(CRTC_REGISTERS)
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            first = self.index
        else:
            first = self.regs[self.index] if self.index < CRTC_REGISTERS else 0xFF
        out = bytes([first])
        if size > 1:  # a word read at 0x3D4 covers 0x3D4 and 0x3D5; beyond that the bus floats high
            second = self.read(1, 1) if offset == 0 else b"\xff"
            out += second + b"\xff" * (size - 2)
        return out

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        for i, byte in enumerate(data):
            port = offset + i
            if port == 0:
                self.index = byte & 0x1F
            elif port == 1 and self.index < CRTC_REGISTERS:
                self.regs[self.index] = byte

    @property
    def start_address(self) -> int:
        return (self.regs[REG_START_HIGH] << 8) | self.regs[REG_START_LOW]

    def cursor(self) -> tuple[int, int] | None:
        """(row, col) of the cursor on the visible screen, or None when it is off or off-screen."""
        if self.regs[REG_CURSOR_START] & CURSOR_DISABLE:
            return None
        loc = ((self.regs[REG_CURSOR_HIGH] << 8) | self.regs[REG_CURSOR_LOW]) - self.start_address
        if not 0 <= loc < COLS * ROWS:
            return None
        return divmod(loc, COLS)


class VgaTextScreen:
    """Reads the visible 80×25 cells (4000 bytes: char, attribute, …) and the cursor."""

    def __init__(self, memory, crtc: VgaCrtc) -> None:
        self.memory = memory
        self.crtc = crtc

    @staticmethod
    def available(memory) -> bool:
        """Whether guest RAM covers the text buffer (it does with --mem ≥ 1M)."""
        return memory.contains(VGA_TEXT_BUFFER, SCREEN_BYTES)

    def cells(self) -> bytes:
        # The start address scrolls the view through the 32 KiB window (0xB8000–0xBFFFF); keep
        # the read inside it, and inside RAM.
        gpa = VGA_TEXT_BUFFER + CELL_BYTES * self.crtc.start_address
        if gpa + SCREEN_BYTES > VGA_TEXT_BUFFER + 0x8000 or not self.memory.contains(gpa, SCREEN_BYTES):
            gpa = VGA_TEXT_BUFFER
        return self.memory.read(gpa, SCREEN_BYTES)

    def snapshot(self) -> tuple[bytes, tuple[int, int] | None]:
        return self.cells(), self.crtc.cursor()

    def text(self) -> list[str]:
        """The 25 rows as text (trailing blanks stripped)."""
        from tracetool.screen import text_lines
        return text_lines(self.cells())
