"""Exits as JSON rows: the one function that turns decoded columns into the documented shape.

`vmsup tail --json`, `vmtrace show --json` and `vmtrace replay --json` print these objects, one per
line; `vmtrace export`'s CSV and Parquet columns have the same names in the same order. The
fields, their units and meanings are schema.EVENT_FIELDS (derived from the column table, so a new
column shows up here with no code of its own); the README's "One exit" table is generated from it
(`field_table()`).
"""

from __future__ import annotations

import json
from typing import Mapping, NamedTuple

import numpy as np

from . import schema
from .handling import NO_HANDLE
from .symbols import NO_ID


class Labels(NamedTuple):
    """A derived text field of a chunk of events: texts[codes[i]] is event i's (texts[0]: None)."""

    codes: np.ndarray  # int32, one per event
    texts: list

    def values(self) -> list:
        return [self.texts[i] for i in self.codes.tolist()]


def missing_mask(cols: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """Where a column an older trace lacked reads as its `missing` value (None: never): null in
    every shape of an exit (JSON, CSV, Parquet, the Perfetto timeline's args)."""
    column = schema.COLUMNS.get(name)
    if column is None or column.missing is None:
        return None
    return cols[name] == cols[name].dtype.type(column.missing)


def reason_texts() -> list[bytes]:
    """Every reason code's name as bytes, indexed by code (for text columns built with numpy)."""
    return [schema.reason_name(code).encode() for code in range(256)]


def add_places(cols: dict, tables: Mapping, stream: Mapping[str, int] | None = None) -> None:
    """Add the derived fields `symbol` and `line` (schema.PLACE_FIELDS) to a chunk of events as
    Labels, from each event's rip and its VM's SymbolTable. tables: {vm: SymbolTable or None;
    None: the table for any other VM} (commands._symbols.vm_tables); "vm" per event in cols unless
    `stream` gives it for the whole chunk."""
    rip = cols["rip"]
    n = len(rip)
    vms = np.full(n, stream["vm"]) if stream and "vm" in stream else cols["vm"]
    known = rip != np.uint64(schema.RIP_UNKNOWN)
    places = {"symbol": (np.zeros(n, np.int32), [None]), "line": (np.zeros(n, np.int32), [None])}
    for vm in np.unique(vms).tolist():
        table = tables.get(vm, tables.get(None))
        if table is None:
            continue
        rows = np.flatnonzero((vms == vm) & known)
        for name, ids, texts in (("symbol", table.symbol_ids(rip[rows]), table.names),
                                 ("line", table.line_ids(rip[rows]), [f"{f}:{line}" for f, line in table.lines])):
            codes, all_texts = places[name]
            codes[rows] = np.where(ids == NO_ID, 0, ids + len(all_texts))
            all_texts += texts
    for name, (codes, texts) in places.items():
        cols[name] = Labels(codes, texts)


def _values(field: schema.EventField, cols: Mapping[str, np.ndarray], n: int, stream: Mapping[str, int]) -> list:
    """One field's values for n events, as plain Python (None where unknown)."""
    if field.column in stream:
        return [int(stream[field.column])] * n
    if field.kind in ("symbol", "line"):
        labels = cols.get(field.name)
        return [None] * n if labels is None else labels.values()
    values = cols.get(field.name if field.kind == "handle" else field.column)
    if values is None:  # handle_ns of a batch nobody stitched, or a stream id not given
        return [None] * n
    if field.kind == "name":
        return [schema.reason_name(code) for code in values.tolist()]
    if field.kind == "bool":
        return (values & schema.FLAG_WRITE).astype(bool).tolist()
    out = values.tolist()
    column = schema.COLUMNS.get(field.column)
    unknown = NO_HANDLE if field.kind == "handle" else column.missing if column else None
    if unknown is not None:
        out = [None if v == unknown else v for v in out]
    return out


def json_rows(cols: Mapping[str, np.ndarray], stream: Mapping[str, int] | None = None) -> list[dict]:
    """One dict per event, fields in schema.EVENT_FIELDS order.

    cols: the exit columns, "seq", optionally "handle_ns" (handling.NO_HANDLE or absent: null),
    "symbol"/"line" (add_places; absent: null), and "vm"/"vcpu"/"epoch" per event unless `stream`
    gives them for the whole batch."""
    stream = stream or {}
    n = len(cols["t_exit"])
    names = [f.name for f in schema.EVENT_FIELDS]
    columns = [_values(f, cols, n, stream) for f in schema.EVENT_FIELDS]
    return [dict(zip(names, row)) for row in zip(*columns)]


def json_lines(cols: Mapping[str, np.ndarray], stream: Mapping[str, int] | None = None) -> list[str]:
    """json_rows as compact JSON text, one line (newline included) per event."""
    return [json.dumps(row, separators=(",", ":")) + "\n" for row in json_rows(cols, stream)]


def field_table() -> str:
    """The README's table of an exit's fields (markdown), generated from schema.EVENT_FIELDS."""
    lines = ["| field | unit | meaning |", "|-------|------|---------|"]
    lines += [f"| `{f.name}` | {f.unit} | {f.meaning} |" for f in schema.EVENT_FIELDS]
    return "\n".join(lines) + "\n"
