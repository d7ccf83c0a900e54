"""Queries over a trace that several vmtrace commands share: events of every stream in time
order (show, replay, export), events per VM and reason (info, diff), the VMs' names.

Everything here works block by block (one decoded block per stream at a time, plus the events
waiting to be merged), so a large or hostile trace never has to fit in memory at once.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from . import handling, schema
from .filters import EventFilter
from .trace import STREAM_DTYPES, ExitBatch, ExitBlockRef, TraceReader

_SEQ = schema.SEQ_COLUMN[0]


def _footer_totals(reader: TraceReader) -> dict[int, dict[int, int]] | None:
    """Per-VM, per-reason counts from the index footer, if it is there and adds up."""
    footer = reader.footer
    if footer is None:
        return None
    by_vm = footer.get("by_vm")
    if not isinstance(by_vm, dict) or not all(
            isinstance(vm, int) and isinstance(c, dict) and all(isinstance(k, int) and isinstance(n, int)
                                                                for k, n in c.items()) for vm, c in by_vm.items()):
        return None
    if sum(n for counts in by_vm.values() for n in counts.values()) != reader.event_count:
        return None
    return by_vm


def events_by_vm_and_reason(reader: TraceReader) -> dict[int, dict[int, int]]:
    """Events per VM and exit reason code: from the index footer when it adds up, else counted."""
    totals = _footer_totals(reader)
    if totals is not None:
        return totals
    # No usable footer (crash, torn tail): count from the reason columns, a block at a time.
    counts: dict[int, np.ndarray] = {}
    for batch in reader.exit_batches():
        acc = counts.setdefault(batch.vm, np.zeros(256, np.int64))
        acc += np.bincount(batch.columns["reason"], minlength=256)
    return {vm: {code: int(n) for code, n in enumerate(acc) if n} for vm, acc in counts.items()}


def vm_names(reader: TraceReader) -> dict[int, str]:
    """Each VM's name, from its first VM-start record."""
    names: dict[int, str] = {}
    for rec in reader.records(schema.MSG_VM_START):
        if isinstance(rec.get("vm"), int) and isinstance(rec.get("name"), str):
            names.setdefault(rec["vm"], rec["name"])
    return names


# --- Events in time order -------------------------------------------------------------------------
def trace_start(reader: TraceReader) -> int | None:
    """t_exit of the trace's first event (the zero of `vmtrace show`'s relative times)."""
    span = reader.time_range
    return None if span is None else span[0]


def events_in_time_order(reader: TraceReader, where: EventFilter | None = None,
                         limit: int | None = None, t_from: int | None = None,
                         t_to: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Matching events of every stream merged by t_exit (ties: vm, vcpu, seq), in chunks of numpy
    columns: the schema's, seq, vm, vcpu, epoch and handle_ns. `t_from` / `t_to`: only events
    with t_from <= t_exit <= t_to (absolute ns); blocks outside are not decoded.

    Blocks are loaded in order of their first t_exit (known from the heads); after loading one,
    every waiting event earlier than the next block's first t_exit is final and goes out.
    """
    if limit is not None and limit <= 0:
        return
    refs = [r for r in reader.exit_blocks()
            if r.n_rows and (where is None or where.matches_stream(r.vm, r.vcpu, r.epoch))]
    following: dict[int, ExitBlockRef | None] = {}
    last_of: dict[tuple[int, int, int], ExitBlockRef] = {}
    for ref in refs:  # file order is sequence order within a stream
        key = (ref.vm, ref.vcpu, ref.epoch)
        if key in last_of:
            following[last_of[key].offset] = ref
        last_of[key] = ref
    if t_from is not None or t_to is not None:
        lo = -(1 << 63) if t_from is None else t_from
        hi = (1 << 63) - 1 if t_to is None else t_to
        refs = [r for r in refs if r.t_last >= lo and r.t_first <= hi]
        time_mask = lambda t: (t >= np.int64(max(lo, -(1 << 63)))) & (t <= np.int64(min(hi, (1 << 63) - 1)))  # noqa: E731
    else:
        time_mask = None
    order = sorted(refs, key=lambda r: (r.t_first, r.offset))
    cache: dict[int, ExitBatch] = {}  # a stream's next block, decoded early for its first event
    waiting: list[dict[str, np.ndarray]] = []
    sent = 0
    for i, ref in enumerate(order):
        batch = cache.pop(ref.offset, None) or reader.read_batch(ref)
        nxt_ref = following.get(ref.offset)
        nxt = None
        if nxt_ref is not None:
            nxt = cache.get(nxt_ref.offset) or reader.read_batch(nxt_ref)
            cache[nxt_ref.offset] = nxt
        cols = dict(batch.columns)
        cols["handle_ns"] = handling.with_lookahead(batch, nxt)
        if where is not None or time_mask is not None:
            keep = np.ones(batch.n_rows, bool) if where is None else where.mask(
                cols, vm=batch.vm, vcpu=batch.vcpu, epoch=batch.epoch)
            if time_mask is not None:
                keep &= time_mask(cols["t_exit"])
            cols = {name: col[keep] for name, col in cols.items()}
        n = len(cols["t_exit"])
        for name, value in (("vm", batch.vm), ("vcpu", batch.vcpu), ("epoch", batch.epoch)):
            cols[name] = np.full(n, value, STREAM_DTYPES[name])
        if n:
            waiting.append(cols)
        if not waiting:
            continue
        merged = {name: np.concatenate([w[name] for w in waiting]) for name in waiting[0]} if len(waiting) > 1 else waiting[0]
        ready = np.ones(len(merged["t_exit"]), bool) if i + 1 == len(order) else merged["t_exit"] < order[i + 1].t_first
        out = {name: col[ready] for name, col in merged.items()}
        rest = {name: col[~ready] for name, col in merged.items()}
        waiting = [rest] if len(rest["t_exit"]) else []
        if not len(out["t_exit"]):
            continue
        idx = np.lexsort((out[_SEQ], out["vcpu"], out["vm"], out["t_exit"]))
        if limit is not None:
            idx = idx[:limit - sent]
        sent += len(idx)
        yield {name: col[idx] for name, col in out.items()}
        if limit is not None and sent >= limit:
            return


def events_with_places(reader: TraceReader, where: EventFilter | None = None,
                       symbols: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
    """events_in_time_order's chunks with each exit's derived `symbol` and `line`
    (exit_rows.add_places; `symbols`: {vm: SymbolTable | None}, None: no places added)."""
    from .exit_rows import add_places
    for chunk in events_in_time_order(reader, where):
        if symbols is not None:
            add_places(chunk, symbols)
        yield chunk
