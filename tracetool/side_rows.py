"""Coalesced writes and emulated instructions as rows for scripts: the one shape each kind has in
`vmtrace show --json`, `vmtrace export --table` (CSV, Parquet) and `vmtrace sql` (tables
`coalesced` and `emulated`). Both are rows beside the exits, never exits (schema.py says why).

`vmtrace show --json` nests them in the exit each links to (`exit_seq`): an exit's object gains
"coalesced" (the writes drained before it) and "emulated" (the instructions performed while it
was handled) where it has any, so each line stays one exit. A row holds the stream ids, then each stored column of schema.COALESCED_COLUMNS or
schema.EMULATED_COLUMNS in table order, shown as an exit's fields are: times with an `_ns`
suffix, a coalesced write's `pio` bit as the `reason` an exit to that place would have had (io or
mmio, so one filter selects both), its `data` as an integer (as an exit's), an
emulated instruction's `family` by name and its bytes (`insn`) as hex text.
"""

from __future__ import annotations

import numpy as np

from . import schema
from .emulated import family_name
from .record_columns import stream_columns

COALESCED, EMULATED = schema.MSG_COALESCED, schema.MSG_EMULATED
KINDS = (COALESCED, EMULATED)
_STORED = {COALESCED: schema.COALESCED_COLUMNS, EMULATED: schema.EMULATED_COLUMNS}
_RENAMED = {"pio": "reason", "t_after": "t_after_ns", "t_before": "t_before_ns"}
# Fields that are text; every other field is an integer.
TEXT_FIELDS = frozenset(("reason", "family", "insn"))

FIELDS: dict[str, tuple[str, ...]] = {
    kind: (*schema.STREAM_COLUMNS, *(_RENAMED.get(c.name, c.name) for c in stored)) for kind, stored in _STORED.items()}


def integer_dtypes(kind: str) -> dict[str, np.dtype]:
    """Each integer field's dtype: its stored column's (the stream ids are u4, as in exit batches)."""
    out = {name: np.dtype("<u4") for name in schema.STREAM_COLUMNS}
    out.update({_RENAMED.get(c.name, c.name): np.dtype(c.dtype) for c in _STORED[kind]
                if _RENAMED.get(c.name, c.name) not in TEXT_FIELDS})
    return out


def _coalesced_reasons(pio: np.ndarray) -> np.ndarray:
    return np.where(pio != 0, schema.REASON_IO, schema.REASON_MMIO).astype(np.uint8)


def columns(reader, kind: str, where=None) -> dict[str, np.ndarray]:
    """The rows of `kind` in a trace, stream after stream, each stream's in the order recorded:
    {field: numpy array} (text fields still as codes: see `texts`). `where` (filters.EventFilter)
    keeps the streams it names; coalesced writes must also match its reason, port and address,
    as an exit to the same place would. Emulated instructions follow their exit, which `where`
    may drop: vmtrace show lists them with it."""
    per_stream = stream_columns(reader, kind)
    stored = [c.name for c in _STORED[kind]]
    parts: list[dict[str, np.ndarray]] = []
    for (vm, vcpu, epoch), cols in sorted(per_stream.items()):
        if where is not None and not where.matches_stream(vm, vcpu, epoch):
            continue
        if kind == COALESCED and where is not None:
            keep = where.mask({"reason": _coalesced_reasons(cols["pio"]), "addr": cols["addr"]},
                              vm=vm, vcpu=vcpu, epoch=epoch)
            cols = {name: cols[name][keep] for name in stored}
        n = len(cols[stored[0]])
        part = {name: np.full(n, value, np.uint32) for name, value in zip(schema.STREAM_COLUMNS, (vm, vcpu, epoch))}
        part.update({name: cols[name] for name in stored})
        parts.append(part)
    names = [*schema.STREAM_COLUMNS, *stored]
    if not parts:
        dtypes = {**{n: np.dtype(np.uint32) for n in schema.STREAM_COLUMNS},
                  **{c.name: np.dtype(c.dtype) for c in _STORED[kind]}}
        return {name: np.empty(0, dtypes[name]) for name in names}
    return {name: np.concatenate([p[name] for p in parts]) for name in names}


def _field_values(kind: str, cols: dict[str, np.ndarray]) -> dict[str, list]:
    """Each field as a list of plain values (ints and texts), from `columns`' arrays."""
    out: dict[str, list] = {}
    for name in schema.STREAM_COLUMNS:
        out[name] = cols[name].tolist()
    for c in _STORED[kind]:
        values = cols[c.name]
        field = _RENAMED.get(c.name, c.name)
        if c.name == "pio":
            out[field] = [schema.reason_name(r) for r in _coalesced_reasons(values).tolist()]
        elif c.name == "family":
            out[field] = [family_name(f) for f in values.tolist()]
        elif c.name == "insn":
            lengths = cols["length"].tolist()
            out[field] = [raw[:k].hex() for raw, k in zip((v.tobytes() for v in values), lengths)]
        else:
            out[field] = values.tolist()
    return out


def rows(kind: str, cols: dict[str, np.ndarray]) -> list[dict]:
    """One dict per row, in FIELDS order."""
    values = _field_values(kind, cols)
    return [dict(zip(FIELDS[kind], row)) for row in zip(*(values[name] for name in FIELDS[kind]))]


def value_columns(kind: str, cols: dict[str, np.ndarray]) -> dict[str, list]:
    """{field: list of plain values}, in FIELDS order (for Arrow tables and CSV)."""
    values = _field_values(kind, cols)
    return {name: values[name] for name in FIELDS[kind]}



def by_exit(reader, where=None) -> dict[tuple[int, int, int, int], dict[str, list[dict]]]:
    """{(vm, vcpu, epoch, exit seq): {kind: [rows]}}: the coalesced writes drained before that
    exit and the instructions emulated while handling it, each in recorded order (rows as `rows`)."""
    out: dict[tuple[int, int, int, int], dict[str, list[dict]]] = {}
    for kind in KINDS:
        for row in rows(kind, columns(reader, kind, where)):
            key = (row["vm"], row["vcpu"], row["epoch"], row["exit_seq"])
            out.setdefault(key, {}).setdefault(kind, []).append(row)
    return out
