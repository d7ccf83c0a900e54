"""Exits as JSON rows: the one function that turns decoded columns into the documented shape.

`vmsup tail --json`, `vmtrace show --json` and `vmtrace replay --json` print these objects, one per
line; `vmtrace export`'s CSV and Parquet columns have the same names in the same order. The
fields, their units and meanings are schema.EVENT_FIELDS (derived from the column table, so a new
column shows up here with no code of its own); the README's "One exit" table is generated from it
(`field_table()`).
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np

from . import schema
from .handling import NO_HANDLE


def _values(field: schema.EventField, cols: Mapping[str, np.ndarray], n: int, stream: Mapping[str, int]) -> list:
    """One field's values for n events, as plain Python (None where unknown)."""
    if field.column in stream:
        return [int(stream[field.column])] * n
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
    and "vm"/"vcpu"/"epoch" per event unless `stream` gives them for the whole batch."""
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
