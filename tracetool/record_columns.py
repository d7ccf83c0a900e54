"""Records that carry columns (coalesced writes, emulated instructions: batch_messages._SideRows) as numpy
columns per stream, decoded by their column table in schema.py."""

from __future__ import annotations

from tracetool import schema

_COLUMNS = {schema.MSG_COALESCED: schema.COALESCED_COLUMNS, schema.MSG_EMULATED: schema.EMULATED_COLUMNS}


def stream_columns(reader, kind: str) -> dict[tuple[int, int, int], dict]:
    """{(vm, vcpu, epoch): {column: numpy array}} of one kind's records, each stream's rows in file
    order (records are checked by the scan)."""
    import numpy as np

    dtypes = {c.name: np.dtype(c.dtype) for c in _COLUMNS[kind]}
    parts: dict[tuple[int, int, int], list[dict]] = {}
    for rec in reader.records(kind):
        stream = (rec["vm"], rec["vcpu"], rec["epoch"])
        parts.setdefault(stream, []).append({name: np.frombuffer(rec["cols"][name], dtype)
                                             for name, dtype in dtypes.items()})
    return {stream: {name: np.concatenate([p[name] for p in ps]) for name in dtypes} for stream, ps in parts.items()}
