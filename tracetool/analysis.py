"""What `vmtrace` reports, as data: the CLI renders it (tables for people, JSON for scripts).

Everything here works block by block (one decoded block per stream at a time, plus the events
waiting to be merged), so a large or hostile trace never has to fit in memory at once.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Iterator

import numpy as np

from . import schema
from .filters import EventFilter
from .trace import STREAM_DTYPES, ExitBatch, ExitBlockRef, TraceReader

# handle_ns of an event whose successor in its stream is not in the trace (the stream's last
# event, or the next one was dropped by a record-time filter or lost).
NO_HANDLE = np.iinfo(np.int64).min
_SEQ = schema.SEQ_COLUMN[0]


def trace_info(path) -> dict:
    """Everything `vmtrace info` shows, as JSON-ready plain data."""
    with TraceReader(path) as reader:
        return _info(reader)


def _info(reader: TraceReader) -> dict:
    by_vm = _events_by_vm_and_reason(reader)
    events = reader.event_count
    span = reader.time_range
    torn = reader.torn_tail
    return {
        "file": {
            "path": reader.path,
            "size": reader.size,
            "format_version": reader.format_version,
            "schema_version": reader.header["schema"].get("version"),
            "created_ns": reader.header.get("created"),
            "closed_cleanly": reader.closed_cleanly,
            "torn_tail": None if torn is None else {"offset": torn[0], "reason": torn[1]},
            "exit_blocks": len(reader.exit_blocks()),
            "unknown_blocks": reader.unknown_blocks,
            "warnings": list(reader.warnings),
        },
        "run": reader.run,
        "vms": _vms(reader),
        "streams": [asdict(s) for s in reader.streams()],
        "events": {
            "total": events,
            "by_vm": [{"vm": vm, "total": sum(counts.values()),
                       "by_reason": {schema.reason_name(code): n for code, n in sorted(counts.items())}}
                      for vm, counts in sorted(by_vm.items())],
        },
        "gaps": {
            "recorded": reader.gaps,
            "unexplained": [asdict(d) for d in reader.unexplained_gaps],
        },
        "time": None if span is None else {
            "first_ns": span[0], "last_ns": span[1], "span_s": (span[1] - span[0]) / 1e9},
        "bytes_per_event": reader.size / events if events else None,
    }


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


def _events_by_vm_and_reason(reader: TraceReader) -> dict[int, dict[int, int]]:
    totals = _footer_totals(reader)
    if totals is not None:
        return totals
    # No usable footer (crash, torn tail): count from the reason columns, a block at a time.
    counts: dict[int, np.ndarray] = {}
    for batch in reader.exit_batches():
        acc = counts.setdefault(batch.vm, np.zeros(256, np.int64))
        acc += np.bincount(batch.columns["reason"], minlength=256)
    return {vm: {code: int(n) for code, n in enumerate(acc) if n} for vm, acc in counts.items()}


def _vms(reader: TraceReader) -> list[dict]:
    vms: dict[tuple, dict] = {}
    for rec in reader.records(schema.MSG_VM_START):
        key = (rec.get("vm"), rec.get("epoch"))
        vms[key] = {"vm": rec.get("vm"), "epoch": rec.get("epoch"), "name": rec.get("name"),
                    "spec": rec.get("spec"), "sha256": rec.get("sha256"), "mode": rec.get("mode"),
                    "vcpus": rec.get("vcpus"), "mem_size": rec.get("mem_size"), "pid": rec.get("pid"),
                    "started_ns": rec.get("t"), "status": None}
    for rec in reader.records(schema.MSG_VM_END):
        key = (rec.get("vm"), rec.get("epoch"))
        entry = vms.setdefault(key, {"vm": key[0], "epoch": key[1], "name": None})
        entry.update({"status": rec.get("status"), "guest_code": rec.get("guest_code"),
                      "detail": rec.get("detail"), "exits": rec.get("exits"), "ended_ns": rec.get("t")})
    streams = reader.streams()
    for s in streams:
        vms.setdefault((s.vm, s.epoch), {"vm": s.vm, "epoch": s.epoch, "name": None, "status": None})
    out = []
    for key in sorted(vms, key=lambda k: tuple((0, x) if isinstance(x, int) else (1, str(x)) for x in k)):
        entry = vms[key]
        entry["events_in_trace"] = sum(s.events for s in streams if (s.vm, s.epoch) == key)
        out.append(entry)
    return out


# --- Events in time order -------------------------------------------------------------------------
def _handles(batch: ExitBatch, following: ExitBatch | None) -> np.ndarray:
    """Handling time of each event: (t_exit - guest_ns) of the next event of the stream, minus
    its own t_exit (see schema); NO_HANDLE where the next event is not in the trace."""
    cols = batch.columns
    t, g, seq = cols["t_exit"], cols["guest_ns"], cols[_SEQ]
    out = np.full(len(t), NO_HANDLE, np.int64)
    if len(t) > 1:
        follows = seq[1:] == seq[:-1] + np.uint64(1)
        out[:-1] = np.where(follows, (t[1:] - g[1:]) - t[:-1], NO_HANDLE)
    if len(t) and following is not None and following.n_rows:
        nxt = following.columns
        if int(nxt[_SEQ][0]) == int(seq[-1]) + 1:
            out[-1] = int(nxt["t_exit"][0]) - int(nxt["guest_ns"][0]) - int(t[-1])
    return out


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
        cols["handle_ns"] = _handles(batch, nxt)
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
