"""Screen snapshots (schema.MSG_SCREEN): encoding, validation and rendering of VGA text cells.

A snapshot's `cells` are the 80×25 (char, attribute) byte pairs of the text buffer, zlib-
compressed. The attribute byte (IBM VGA text mode): bits 0–3 foreground colour, bits 4–6
background, bit 7 blink (shown as a plain background here). VGA colour numbers run black, blue,
green, cyan, red, magenta, brown, light grey, then the bright eight; ANSI's run black, red,
green, yellow, blue, magenta, cyan, white — so blue and red, cyan and yellow swap places.

Library code: returns strings and rich Text, prints nothing.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from . import schema

COLS, ROWS = 80, 25
SCREEN_BYTES = COLS * ROWS * 2
MAX_COMPRESSED = 16 << 10  # zlib of 4000 bytes stays far below this; anything larger is not ours
ENCODING = "zlib"

_VGA_TO_ANSI = (0, 4, 2, 6, 1, 5, 3, 7)


def ansi_colour(vga: int) -> int:
    """The ANSI 16-colour number (0–15) of a VGA colour number (0–15)."""
    return _VGA_TO_ANSI[vga & 7] + (8 if vga & 8 else 0)


# Code page 437's printable upper half would need a table; these are the ones kernels use most.
_CP437 = {0x00: " ", 0xB0: "░", 0xB1: "▒", 0xB2: "▓", 0xDB: "█", 0xC4: "─", 0xB3: "│", 0xDA: "┌",
          0xBF: "┐", 0xC0: "└", 0xD9: "┘", 0xCD: "═", 0xBA: "║", 0xC9: "╔", 0xBB: "╗", 0xC8: "╚",
          0xBC: "╝", 0xFE: "■", 0xFA: "·", 0xF9: "∙"}


def char_of(code: int) -> str:
    if 0x20 <= code < 0x7F:
        return chr(code)
    return _CP437.get(code, "?" if code >= 0x80 else " ")


def encode_cells(cells: bytes) -> bytes:
    return zlib.compress(cells, 6)


def decode_cells(data: bytes) -> bytes:
    """Decompress and check a snapshot's cells; SchemaError if they are not exactly 4000 bytes."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_COMPRESSED:
        raise schema.SchemaError("screen cells are not bounded bytes")
    try:
        d = zlib.decompressobj()
        cells = d.decompress(bytes(data), SCREEN_BYTES + 1)
    except zlib.error as e:
        raise schema.SchemaError(f"screen cells do not decompress: {e}") from None
    if len(cells) != SCREEN_BYTES or d.unconsumed_tail:
        raise schema.SchemaError(f"screen cells are {len(cells)}+ bytes, expected {SCREEN_BYTES}")
    return cells


def is_blank(cells: bytes) -> bool:
    """No visible character: every char byte is 0 or a space (attributes do not count)."""
    return not cells[0::2].replace(b" ", b"").replace(b"\0", b"")


@dataclass
class Snapshot:
    vm: int
    epoch: int
    t: int
    cells: bytes  # decompressed, 4000 bytes
    cursor: tuple[int, int] | None
    size: int = 0  # compressed bytes, as sent and stored

    def lines(self) -> list[str]:
        return text_lines(self.cells)

    def to_json(self, t0: int | None = None) -> dict:
        return {"vm": self.vm, "epoch": self.epoch, "t": self.t,
                "time_s": None if t0 is None else (self.t - t0) / 1e9, "cols": COLS, "rows": ROWS,
                "cursor": list(self.cursor) if self.cursor else None, "lines": self.lines(),
                "attributes": self.cells[1::2].hex(), "compressed_bytes": self.size}


def validate_screen(msg: dict) -> Snapshot:
    """A screen message or record → Snapshot; SchemaError on anything out of shape."""
    from .messages import Screen  # the message class checks the fields
    return Screen.from_msg(msg).snapshot()


def validate_input(msg: dict) -> dict:
    """An input message (one key press), checked by its message class; SchemaError otherwise."""
    from .messages import Input
    Input.from_msg(msg)
    return msg


# --- rendering ---------------------------------------------------------------------------------
def text_lines(cells: bytes, strip: bool = True) -> list[str]:
    chars = cells[0::2]
    lines = []
    for r in range(ROWS):
        line = "".join(char_of(c) for c in chars[r * COLS:(r + 1) * COLS])
        lines.append(line.rstrip() if strip else line)
    return lines


def _runs(cells: bytes, row: int):
    """(text, attribute) runs of one row."""
    start = row * COLS
    run, attr = [], None
    for i in range(start, start + COLS):
        a = cells[2 * i + 1]
        if a != attr and run:
            yield "".join(run), attr
            run = []
        attr = a
        run.append(char_of(cells[2 * i]))
    if run:
        yield "".join(run), attr


def _sgr(attr: int) -> str:
    fg, bg = ansi_colour(attr & 0x0F), ansi_colour((attr >> 4) & 0x07)
    fg_code = 30 + fg if fg < 8 else 90 + fg - 8
    return f"\x1b[{fg_code};{40 + bg}m"


def ansi_lines(cells: bytes) -> list[str]:
    """Rows with ANSI SGR colour escapes (16 colours), each reset at its end."""
    return ["".join(_sgr(a) + text for text, a in _runs(cells, r)) + "\x1b[0m" for r in range(ROWS)]


def rich_text(cells: bytes, cursor: tuple[int, int] | None = None):
    """A rich Text of the 25 rows with VGA colours (as the 16 ANSI colours); the cursor reversed."""
    from rich.color import Color
    from rich.style import Style
    from rich.text import Text

    styles: dict[int, Style] = {}
    text = Text(no_wrap=True, overflow="crop")
    for r in range(ROWS):
        for chunk, a in _runs(cells, r):
            style = styles.get(a)
            if style is None:
                style = styles[a] = Style(color=Color.from_ansi(ansi_colour(a & 0x0F)),
                                          bgcolor=Color.from_ansi(ansi_colour((a >> 4) & 0x07)))
            text.append(chunk, style)
        if r < ROWS - 1:
            text.append("\n")
    if cursor is not None:
        at = cursor[0] * (COLS + 1) + cursor[1]
        text.stylize(Style(reverse=True), at, at + 1)
    return text


# --- snapshots in a trace ----------------------------------------------------------------------
def trace_snapshots(reader, vm: int | None = None) -> list[Snapshot]:
    """Every readable screen snapshot of the trace (of one VM), in time order. A record that does
    not validate is skipped (the reader's other checks report a damaged file)."""
    out = []
    for rec in reader.records(schema.MSG_SCREEN):
        try:
            snap = validate_screen(rec)
        except schema.SchemaError:
            continue
        if vm is None or snap.vm == vm:
            out.append(snap)
    out.sort(key=lambda s: s.t)
    return out


def snapshot_at(snaps: list[Snapshot], t: int | None) -> Snapshot | None:
    """The last snapshot at or before absolute time t (the last of all when t is None)."""
    best = None
    for s in snaps:
        if t is not None and s.t > t:
            break
        best = s
    return best
