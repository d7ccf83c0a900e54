"""Coalesced writes of a trace (schema.COALESCED_COLUMNS): decoded columns per stream, and the
exits they avoided. They are not exits (schema.py says why), so no exit reader sees them.
"""

from __future__ import annotations

from tracetool import schema
from tracetool.record_columns import stream_columns
from tracetool.side_rows import columns


def coalesced_columns(reader) -> dict[tuple[int, int, int], dict]:
    """{(vm, vcpu, epoch): {column: numpy array}} in drain order."""
    return stream_columns(reader, schema.MSG_COALESCED)


def exits_avoided(reader, where=None) -> dict:
    """Writes KVM queued instead of exiting: {"total": n, "by_target": {"port 0x10": n, …}}, of
    the writes `where` (a filters.EventFilter) keeps, as it would keep an exit to the same place
    (side_rows.columns: a port write is an io event)."""
    import numpy as np

    cols = columns(reader, schema.MSG_COALESCED, where)
    targets, counts = np.unique(np.stack([cols["pio"].astype(np.uint64), cols["addr"]]), axis=1, return_counts=True)
    by_target = {f"{'port' if pio else 'mmio'} {addr:#x}": n
                 for (pio, addr), n in zip(targets.T.tolist(), counts.tolist())}
    return {"total": int(counts.sum()), "by_target": dict(sorted(by_target.items()))}
