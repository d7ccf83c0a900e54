"""Coalesced writes of a trace (schema.COALESCED_COLUMNS): decoded columns per stream, and the
exits they avoided. They are not exits (schema.py says why), so no exit reader sees them.
"""

from __future__ import annotations

from tracetool import schema


def coalesced_columns(reader) -> dict[tuple[int, int, int], dict]:
    """{(vm, vcpu, epoch): {column: numpy array}} in drain order (records are checked by the scan)."""
    import numpy as np

    dtypes = {c.name: np.dtype(c.dtype) for c in schema.COALESCED_COLUMNS}
    parts: dict[tuple[int, int, int], list[dict]] = {}
    for rec in reader.records(schema.MSG_COALESCED):
        stream = (rec["vm"], rec["vcpu"], rec["epoch"])
        parts.setdefault(stream, []).append({name: np.frombuffer(rec["cols"][name], dtype)
                                             for name, dtype in dtypes.items()})
    return {stream: {name: np.concatenate([p[name] for p in ps]) for name in dtypes} for stream, ps in parts.items()}


def _allowed(values, value) -> bool:
    return values is None or value in values


def exits_avoided(reader, where=None) -> dict:
    """Writes KVM queued instead of exiting: {"total": n, "by_target": {"port 0x10": n, …}}, of
    the writes `where` (a filters.EventFilter, as for exits: a port write is an io event) keeps."""
    import numpy as np

    total, by_target = 0, {}
    for (vm, vcpu, epoch), cols in coalesced_columns(reader).items():
        if where is not None and not (_allowed(where.vm, vm) and _allowed(where.vcpu, vcpu)
                                      and _allowed(where.epoch, epoch)):
            continue
        for pio in (1, 0):
            if where is not None and not _allowed(where.reason, schema.REASON_IO if pio else schema.REASON_MMIO):
                continue
            keep = cols["pio"] == pio
            wanted = None if where is None else where.port if pio else where.addr
            if wanted is not None:
                keep &= np.isin(cols["addr"], np.array(wanted, dtype=np.uint64))
            total += int(keep.sum())
            addrs, counts = np.unique(cols["addr"][keep], return_counts=True)
            for addr, n in zip(addrs.tolist(), counts.tolist()):
                key = f"{'port' if pio else 'mmio'} {addr:#x}"
                by_target[key] = by_target.get(key, 0) + n
    return {"total": total, "by_target": dict(sorted(by_target.items()))}
