"""The column codec of EXITS blocks: every encoding is exact.

  - "delta": the first value in the head, then differences (modulo 2**64); with "ref", the
    difference minus the ref column. t_exit uses ref guest_ns: t_exit[i] - t_exit[i-1] -
    guest_ns[i] is the handling time of event i-1 (see schema), which varies far less than
    the exit-to-exit step (measured on the seed guest: 1.53 instead of 1.92 B/event).
  - then frame of reference: subtract the minimum (as int64, modulo 2**64) and store each value
    in the fewest bytes (1, 2, 4 or 8) that hold the largest;
  - then byte-shuffle (all first bytes, then all second bytes, …) so zstd sees runs.

A column's encoding (a small map: name, dtype, enc, base, width[, first, ref]) goes in the block's
head; its bytes go in the compressed body.
"""

from __future__ import annotations

import numpy as np

from .. import schema
from .format import need

SEQ = schema.SEQ_COLUMN.name
HANDLE = schema.HANDLE_COLUMN.name
# How the writer encodes each column: (transform, reference column). Chosen by measuring real
# seed-guest exits (see above); columns not named here are stored raw (after frame of reference
# + narrowing, which already turns constant columns into nothing).
PLAN: dict[str, tuple[str, str | None]] = {
    "t_exit": ("delta", "guest_ns"),
    "addr": ("delta", None),
    "data": ("delta", None),  # the seed guest's data counts up by one
    SEQ: ("delta", None),
}
ENCODINGS = ("raw", "delta")
WIDTHS = (1, 2, 4, 8)
U64 = np.dtype("<u8")
_I64 = np.dtype("<i8")
_M64 = 1 << 64


def to_u64(a: np.ndarray) -> np.ndarray:
    return a.view(U64) if a.dtype.itemsize == 8 else a.astype(U64)


def _shuffle(a: np.ndarray) -> bytes:
    if a.dtype.itemsize == 1:
        return a.tobytes()
    return np.ascontiguousarray(a.view(np.uint8).reshape(len(a), a.dtype.itemsize).T).tobytes()


def _unshuffle(raw, n: int, width: int) -> np.ndarray:
    planes = np.frombuffer(raw, dtype=np.uint8, count=n * width)
    if width == 1:
        return planes
    return np.ascontiguousarray(planes.reshape(width, n).T).view(f"<u{width}").reshape(n)


def storage_order(names) -> list[str]:
    """Referenced columns are stored (and decoded) before the columns that refer to them."""
    return sorted(names, key=lambda n: PLAN.get(n, ("raw", None))[1] is not None)


def encode_column(name: str, values: np.ndarray, encoded: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """(encoding map, shuffled bytes) of one column; `encoded`: the u64 views of every column
    (a delta column subtracts its reference column's)."""
    transform, ref = PLAN.get(name, ("raw", None))
    x = to_u64(values)
    enc: dict = {"name": name, "dtype": values.dtype.str, "enc": transform}
    if transform == "delta" and len(x):
        enc["first"] = int(x[0])
        v = x[1:] - x[:-1]  # uint64: wraps modulo 2**64, so any jump stays exact
        if ref is not None:
            enc["ref"] = ref
            v -= encoded[ref][1:]
    else:
        v = x
    base = int(v.view(_I64).min()) if len(v) else 0
    w = v - np.uint64(base % _M64)
    top = int(w.max()) if len(w) else 0
    width = next(k for k in WIDTHS if top < 1 << (8 * k))
    enc.update(base=base, width=width)
    return enc, _shuffle(w.astype(f"<u{width}"))


def stored_values(enc: dict, rows: int) -> int:
    """How many values a column of `rows` rows stores (a delta column keeps its first in the head)."""
    return rows - 1 if enc["enc"] == "delta" and rows else rows


def decode_column(enc: dict, raw, rows: int, decoded: dict[str, np.ndarray]) -> np.ndarray:
    """One column back from its bytes; `decoded`: the u64 views of the columns decoded before.
    Raises format.Corrupt."""
    n = stored_values(enc, rows)
    v = _unshuffle(raw, n, enc["width"]).astype(U64) + np.uint64(enc["base"] % _M64)
    if enc["enc"] == "delta" and rows:
        ref = enc.get("ref")
        if ref is not None:
            v += decoded[ref][1:]
        x = np.empty(rows, U64)
        x[0] = enc["first"]
        np.cumsum(v, dtype=U64, out=x[1:])
        x[1:] += x[0]
    else:
        x = v
    dtype = schema.COLUMN_DTYPES[enc["name"]]
    if dtype.itemsize == 8:
        return x.view(dtype)
    need(not len(x) or int(x.max()) <= np.iinfo(dtype).max, f"column {enc['name']!r} holds values beyond {dtype}")
    return x.astype(dtype)
