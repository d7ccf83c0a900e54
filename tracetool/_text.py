"""Vectorised text rows: numbers to ASCII with numpy, no Python object per value.

A row is built as a uint8 matrix (one row per event) from pieces — constant bytes, decimal or
hex numbers, table lookups — where byte 0 marks padding; `join_rows` drops the padding and
returns the text. 0 never occurs in the text we write (CSV, JSON), so it is a safe marker.
"""

from __future__ import annotations

import numpy as np

_U64 = np.dtype("<u8")
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def const(text: bytes, n: int) -> np.ndarray:
    return np.broadcast_to(np.frombuffer(text, np.uint8), (n, len(text)))


def _magnitude(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """|values| as uint64 (exact, int64 minimum included) and the sign mask (None: unsigned)."""
    if values.dtype.kind == "u":
        return values.astype(_U64), None
    v = values.astype(np.int64)
    neg = v < 0
    mag = v.view(_U64).copy()
    mag[neg] = ~mag[neg] + np.uint64(1)  # two's complement magnitude
    return mag, neg


def _digit_count(top: int, base: int) -> int:
    count = 1
    while top >= base:
        top //= base
        count += 1
    return count


def decimal(values: np.ndarray, width: int | None = None) -> np.ndarray:
    """Decimal text of integers: variable width (padding 0 on the left), or with `width`,
    zero-padded to exactly that many digits (fractions: 0.005 → "005")."""
    n = len(values)
    mag, neg = _magnitude(values)
    digits = width or _digit_count(int(mag.max()) if n else 0, 10)
    out = np.zeros((n, digits + (neg is not None)), np.uint8)
    q = mag.copy()
    ten = np.uint64(10)
    for col in range(out.shape[1] - 1, out.shape[1] - 1 - digits, -1):
        d = (q % ten).astype(np.uint8) + 48
        if width is None and col != out.shape[1] - 1:
            d[q == 0] = 0
        out[:, col] = d
        q //= ten
    if neg is not None:
        # the sign goes just before the first digit: shift negative rows left by their padding
        out[:, 0] = 0
        first = (out[:, 1:] != 0).argmax(axis=1)  # column (after the sign) of the first digit
        rows = np.flatnonzero(neg)
        out[rows, first[rows]] = ord("-")
    return out


def hexadecimal(values: np.ndarray) -> np.ndarray:
    """`0x`-prefixed lower-case hex of unsigned integers (values as uint64 bits)."""
    n = len(values)
    v = values.astype(_U64) if values.dtype.kind == "u" else values.astype(np.int64).view(_U64)
    digits = _digit_count(int(v.max()) if n else 0, 16)
    out = np.zeros((n, digits + 2), np.uint8)
    q = v.copy()
    for col in range(digits + 1, 1, -1):
        d = _HEX[(q & np.uint64(15)).astype(np.intp)]
        if col != digits + 1:
            d = np.where(q == 0, 0, d).astype(np.uint8)
        out[:, col] = d
        q >>= np.uint64(4)
    # "0x" right before the first digit
    first = (out[:, 2:] != 0).argmax(axis=1) + 2
    rows = np.arange(n)
    out[rows, first - 2] = ord("0")
    out[rows, first - 1] = ord("x")
    return out


def lookup(table: list[bytes], index: np.ndarray) -> np.ndarray:
    """Text from a table: row i gets table[index[i]] (padded with 0 to the longest entry)."""
    width = max((len(t) for t in table), default=0)
    mat = np.zeros((len(table), width), np.uint8)
    for i, t in enumerate(table):
        mat[i, :len(t)] = np.frombuffer(t, np.uint8)
    return mat[index.astype(np.intp)]


def blank(piece: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The piece with `rows` (a bool mask) emptied."""
    piece = np.array(piece)
    piece[rows] = 0
    return piece


def join_rows(pieces: list[np.ndarray]) -> bytes:
    """Concatenate the pieces side by side, row by row, dropping the padding."""
    mat = np.concatenate(pieces, axis=1)
    return mat[mat != 0].tobytes()
