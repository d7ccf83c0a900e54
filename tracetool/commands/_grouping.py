"""The groupings of `vmtrace summary --by`: each exit's group key under a grouping (reason, I/O
port and direction, MMIO address and direction, vCPU, VM, or where the guest was: rip, symbol,
line), worked out for a whole block at once with numpy, and a group's label and JSON fields.
"""

from __future__ import annotations

import numpy as np

from .. import schema
from ..trace import ExitBatch
from ._symbols import NO_ID, table_for

GROUPINGS = ("reason", "ioport", "mmio", "vcpu", "vm", "rip", "symbol", "line")
# Groupings by where the guest was (the rip column); their keys are (vm, address or symbol/line id).
ADDRESS_GROUPINGS = ("rip", "symbol", "line")
KEY_LENGTH = {"reason": 1, "ioport": 2, "mmio": 2, "vcpu": 2, "vm": 1, "rip": 2, "symbol": 2, "line": 2}
UNKNOWN_ADDRESS = -2  # symbol/line id of an event whose rip is unknown (traces of schema 1)


def parse_by(text: str) -> tuple[str, ...]:
    """`symbol` or `symbol,reason` → its groupings (ValueError naming what is wrong)."""
    bys = tuple(part.strip() for part in text.split(","))
    unknown = [b for b in bys if b not in GROUPINGS]
    if unknown or not 1 <= len(bys) <= 2 or len(set(bys)) != len(bys):
        raise ValueError(f"unknown --by {text!r} (one of {', '.join(GROUPINGS)}, or two of them joined by a comma)")
    if {"ioport", "mmio"} <= set(bys):
        raise ValueError("--by ioport,mmio: an exit is either port I/O or MMIO, never both")
    return bys


def where_name(by: str) -> str:
    """The batch column that holds each row's place under an address grouping (where_column)."""
    return f"where_{by}"


def _row_index(by: str, batch: ExitBatch, cols: dict) -> tuple[list[tuple], np.ndarray | None]:
    """Group of every row under one grouping: (keys, index), index[i] the position of row i's key
    in keys (None when the block is one group)."""
    if by == "vm":
        return [(batch.vm,)], None
    if by == "vcpu":
        return [(batch.vm, batch.vcpu)], None
    if by == "reason":
        local = cols["reason"]
        if not len(local) or local.min() == local.max():
            return [(int(local[0]) if len(local) else 0,)], None
        present = np.flatnonzero(np.bincount(local, minlength=256))
        lut = np.zeros(256, np.uint8)
        lut[present] = np.arange(len(present))
        index = lut[local]
        keys = [(int(c),) for c in present]
    elif by == "ioport":
        # port (16 bits) and direction in one small key
        local = ((cols["addr"] & np.uint64(0xFFFF)).astype(np.uint32) << np.uint32(1)) | (cols["flags"] & schema.FLAG_WRITE)
        counts = np.bincount(local, minlength=1)
        present = np.flatnonzero(counts)
        if len(present) == 1:
            return [(int(present[0]) >> 1, int(present[0]) & 1)], None
        lut = np.zeros(len(counts), np.int64)
        lut[present] = np.arange(len(present))
        index = lut[local]
        keys = [(int(k) >> 1, int(k) & 1) for k in present]
    elif by in ADDRESS_GROUPINGS:
        # the rip (by rip) or the symbol/line id (see where_column); one per row.
        values = cols[where_name(by)]
        if by == "rip":
            uniq, index = np.unique(values, return_inverse=True)
            keys = [(batch.vm, int(u)) for u in uniq]
        else:
            shifted = values - UNKNOWN_ADDRESS  # ids from UNKNOWN_ADDRESS up, as small non-negative ints
            counts = np.bincount(shifted)
            present = np.flatnonzero(counts)
            lut = np.zeros(len(counts), np.int64)
            lut[present] = np.arange(len(present))
            index = lut[shifted]
            keys = [(batch.vm, int(p) + UNKNOWN_ADDRESS) for p in present]
        if len(keys) == 1:
            return keys, None
    elif by == "mmio":
        addrs, inverse = np.unique(cols["addr"], return_inverse=True)
        local = inverse.astype(np.int64) * 2 + (cols["flags"] & schema.FLAG_WRITE)
        present = np.flatnonzero(np.bincount(local))
        if len(present) == 1:
            k = int(present[0])
            return [(int(addrs[k >> 1]), k & 1)], None
        lut = np.zeros(int(local.max()) + 1, np.int64)
        lut[present] = np.arange(len(present))
        index = lut[local]
        keys = [(int(addrs[k >> 1]), k & 1) for k in present]
    else:
        raise ValueError(f"unknown grouping {by!r}")
    return keys, index


def block_keys(bys: tuple[str, ...], batch: ExitBatch, cols: dict) -> tuple[list[tuple], np.ndarray | None, np.ndarray | None]:
    """Group of every row under one or two groupings (a key is their keys joined): (keys, order,
    starts). `order` sorts the rows by group (None when the block is one group, `starts` then
    None too)."""
    keys, index = _row_index(bys[0], batch, cols)
    if len(bys) == 2:
        inner, inner_index = _row_index(bys[1], batch, cols)
        if index is None and inner_index is None:
            return [keys[0] + inner[0]], None, None
        n = len(cols["reason"])
        outer = np.zeros(n, np.int64) if index is None else index.astype(np.int64)
        pairs = outer * len(inner) + (0 if inner_index is None else inner_index.astype(np.int64))
        present, index = np.unique(pairs, return_inverse=True)
        keys = [keys[int(p) // len(inner)] + inner[int(p) % len(inner)] for p in present]
        if len(keys) == 1:
            return keys, None, None
    if index is None:
        return keys, None, None
    small = index.astype(np.uint8 if len(keys) <= 256 else np.uint16 if len(keys) <= 65536 else np.int64)
    order = np.argsort(small, kind="stable")  # a radix sort for 8/16-bit keys
    starts = np.searchsorted(small[order], np.arange(len(keys)))
    return keys, order, starts


# The one exit reason a grouping by port or MMIO address keeps.
REASON_OF = {"ioport": schema.REASON_IO, "mmio": schema.REASON_MMIO}


def where_column(by: str, rip: np.ndarray, table) -> np.ndarray:
    """Per row: the rip itself (by rip), or its symbol/line id in `table` (NO_ID: none covers it;
    UNKNOWN_ADDRESS: the trace does not know the address)."""
    if by == "rip":
        return rip
    if table is None:
        ids = np.full(len(rip), NO_ID, np.int64)
    else:
        ids = (table.symbol_ids(rip) if by == "symbol" else table.line_ids(rip)).astype(np.int64)
    ids[rip == np.uint64(schema.RIP_UNKNOWN)] = UNKNOWN_ADDRESS
    return ids


def event_key(by: str, batch: ExitBatch, reason: int, addr: int, flags: int) -> tuple:
    """The group of one event under one grouping (the same keys _row_index gives)."""
    if by == "vm":
        return (batch.vm,)
    if by == "vcpu":
        return (batch.vm, batch.vcpu)
    if by == "reason":
        return (reason,)
    if by == "ioport":
        return (addr & 0xFFFF, flags & schema.FLAG_WRITE)
    if by in ADDRESS_GROUPINGS:
        return (batch.vm, int(batch.columns[where_name(by)][-1]))
    return (addr, flags & schema.FLAG_WRITE)


def split_key(bys: tuple[str, ...], key: tuple) -> list[tuple[str, tuple]]:
    """A group's key → [(grouping, its part of the key)]."""
    parts, at = [], 0
    for b in bys:
        parts.append((b, key[at:at + KEY_LENGTH[b]]))
        at += KEY_LENGTH[b]
    return parts


def _where_label(by: str, key: tuple, symbols: dict) -> str:
    """A group of where the guest was, for people: `0x10004 <loop1+0x2> (seed16.S:15)`, `loop1`,
    `seed16.S:15`, or why there is no name."""
    vm, value = key
    if by != "rip" and value == UNKNOWN_ADDRESS or by == "rip" and value == schema.RIP_UNKNOWN:
        return "(address unknown)"
    table = table_for(symbols, vm)
    if by == "rip":
        return str(table.resolve(value)) if table is not None else f"{value:#x}"
    if table is None:
        return "(no symbols)"
    if value == NO_ID:
        return "(no symbol)" if by == "symbol" else "(no line)"
    return table.symbol_name(value) if by == "symbol" else table.line_text(value)


def label(by: str, key: tuple, symbols: dict) -> str:
    if by in ADDRESS_GROUPINGS:
        label = _where_label(by, key, symbols)
        return label if len({k for k in symbols if k is not None}) <= 1 else f"vm {key[0]} {label}"
    if by == "reason":
        return schema.reason_name(key[0])
    if by == "ioport":
        return f"{key[0]:#x}:{'out' if key[1] else 'in'}"
    if by == "mmio":
        return f"{key[0]:#x}:{'W' if key[1] else 'R'}"
    if by == "vcpu":
        return f"vm {key[0]} vcpu {key[1]}"
    return f"vm {key[0]}"


def key_fields(by: str, key: tuple, symbols: dict) -> dict:
    if by == "reason":
        return {"reason": schema.reason_name(key[0]), "reason_code": key[0]}
    if by == "ioport":
        return {"port": key[0], "direction": "out" if key[1] else "in"}
    if by == "mmio":
        return {"addr": key[0], "direction": "W" if key[1] else "R"}
    if by == "vcpu":
        return {"vm": key[0], "vcpu": key[1]}
    if by == "rip":
        return {"vm": key[0], "rip": None if key[1] == schema.RIP_UNKNOWN else key[1]}
    if by in ("symbol", "line"):
        return {"vm": key[0], by: None if key[1] in (NO_ID, UNKNOWN_ADDRESS) else _where_label(by, key, symbols)}
    return {"vm": key[0]}
