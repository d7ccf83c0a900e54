"""`vmtrace summary`: exit statistics like `perf kvm stat report`, plus percentiles.

Per group (exit reason, I/O port and direction, MMIO address and direction, vCPU or VM): the
count and its share, the share of handling time (perf's Time%: from the exit until the vCPU
enters the guest again), and min / max / mean / stddev / p50 / p99 of guest time (the time
inside KVM_RUN that ended in this exit) and of handling time (see schema: derived from the
next event of the same stream; a stream's last event has none).

Numpy throughout, one block at a time in file order. Every statistic is exact and percentiles
follow numpy's default (linear interpolation between order statistics). To get there without
keeping every value: times below DENSE_NS (65.5 µs, where almost all exits fall) are counted
in one bincount per group, which gives order statistics, sums and moments exactly; only the
rarer values outside are kept. Fresh memory is what costs most here (a first-touched page
costs ~11 µs under PVM), so keeping 16 bytes per event would cost more than decoding it.
If the kept outliers pass `exact_limit` values, the rest go into a log histogram (128
sub-buckets per power of two, relative error below 0.4 %) and the result says the
percentiles are approximate; counts, sums, min, max, mean and stddev stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import schema
from .filters import EventFilter
from .trace import ExitBatch, TraceReader

GROUPINGS = ("reason", "ioport", "mmio", "vcpu", "vm")
SORTS = ("count", "time", "max")
PERCENTILES = (50, 99)
DENSE_NS = 1 << 16  # times counted in a dense bincount: 0 .. 65.5 µs
EXACT_LIMIT = 1 << 24  # outliers kept for exact percentiles, all groups together (8 bytes each)
_PROMOTE = 4096  # a group's values kept as they are until it has this many
_SEQ = schema.SEQ_COLUMN[0]
_SUB_BITS = 7  # log histogram: 2**7 sub-buckets per power of two
_HIST_SIZE = (64 - _SUB_BITS + 1) << _SUB_BITS


class _LogHistogram:
    """Counts of non-negative int64 values in log-linear buckets (HDR-histogram style): values
    below 2**8 exactly, larger ones in 128 sub-buckets per power of two. Negative values (only a
    hostile file has them) count as 0."""

    def __init__(self) -> None:
        self.counts = np.zeros(_HIST_SIZE, np.int64)

    @staticmethod
    def _index(values: np.ndarray) -> np.ndarray:
        v = np.maximum(values, 0).astype(np.uint64)
        # floor(log2 v) from float64's exponent (-1 for 0); rounding near 2**53 only moves a value
        # to a neighbouring bucket
        e = np.frexp(v.astype(np.float64))[1].astype(np.int64) - 1
        shift = np.maximum(e - _SUB_BITS, 0)
        top = (v >> shift.astype(np.uint64)).astype(np.int64)
        return np.clip(shift * (1 << _SUB_BITS) + top, 0, _HIST_SIZE - 1)

    def add(self, values: np.ndarray) -> None:
        if len(values):
            self.counts += np.bincount(self._index(values), minlength=_HIST_SIZE)[:_HIST_SIZE]

    def kth(self, k: int) -> float:
        """The k-th smallest value (0-based), as the middle of its bucket."""
        i = int(np.searchsorted(np.cumsum(self.counts), k, "right"))
        shift, top = divmod(min(i, _HIST_SIZE - 1), 1 << _SUB_BITS)
        if shift == 0:
            return float(top)
        shift -= 1
        top += 1 << _SUB_BITS
        return float(top << shift) + ((1 << shift) - 1) / 2


class _Budget:
    """How many outlier values the whole summary may still keep exactly."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.exact = True

    def take(self, n: int) -> bool:
        if n > self.left:
            self.exact = False
            return False
        self.left -= n
        return True


@dataclass
class _Moments:
    """Count, exact total, min, max and (Chan et al.'s parallel update) mean and M2."""

    n: int = 0
    total: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: int | None = None
    hi: int | None = None

    def add(self, x: np.ndarray) -> None:
        if len(x):
            mean = float(x.sum(dtype=np.float64)) / len(x)
            d = x.astype(np.float64) - mean
            self.merge(_Moments(len(x), int(x.sum()), mean, float(np.dot(d, d)), int(x.min()), int(x.max())))

    def merge(self, o: "_Moments") -> None:
        if not o.n:
            return
        both = self.n + o.n
        delta = o.mean - self.mean
        self.m2 += o.m2 + delta * delta * self.n * o.n / both
        self.mean += delta * o.n / both
        self.n = both
        self.total += o.total
        self.lo = o.lo if self.lo is None else min(self.lo, o.lo)
        self.hi = o.hi if self.hi is None else max(self.hi, o.hi)


class _Metric:
    """One metric (guest or handling time) of one group: its first values as they are; once it
    has more than _PROMOTE, a dense bincount of the values in [0, DENSE_NS) plus the outliers
    (kept while the budget lasts, then in a log histogram)."""

    __slots__ = ("budget", "small", "n_small", "dense", "out", "out_parts", "out_hist")

    def __init__(self, budget: _Budget) -> None:
        self.budget = budget
        self.small: list[np.ndarray] = []
        self.n_small = 0
        self.dense: np.ndarray | None = None
        self.out = _Moments()
        self.out_parts: list[np.ndarray] = []
        self.out_hist: _LogHistogram | None = None

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        if self.dense is None:
            self.small.append(x.copy())  # a copy: a view would keep the whole decoded block alive
            self.n_small += len(x)
            if self.n_small > _PROMOTE:
                self.dense = np.zeros(DENSE_NS, np.int64)
                small, self.small = self.small, []
                self._add_dense(np.concatenate(small))
            return
        self._add_dense(x)

    def _add_dense(self, x: np.ndarray) -> None:
        if int(x.min()) >= 0 and int(x.max()) < DENSE_NS:  # the common case: no outlier
            counts = np.bincount(x)
            self.dense[:len(counts)] += counts
            return
        inside = (x >= 0) & (x < DENSE_NS)
        counts = np.bincount(x[inside])
        self.dense[:len(counts)] += counts
        outliers = x[~inside]
        self.out.add(outliers)
        if self.out_hist is None and self.budget.take(len(outliers)):
            self.out_parts.append(outliers)
        else:
            if self.out_hist is None:
                self.out_hist = _LogHistogram()
                for part in self.out_parts:
                    self.out_hist.add(part)
                self.out_parts = []
            self.out_hist.add(outliers)

    @property
    def n(self) -> int:
        return self.n_small if self.dense is None else int(self.dense.sum()) + self.out.n

    def result(self) -> dict:
        if self.dense is None:
            return self._result_small()
        values = np.arange(DENSE_NS, dtype=np.int64)
        c = self.dense
        nonzero = np.flatnonzero(c)
        stats = _Moments()
        if len(nonzero):
            n = int(c.sum())
            total = int(np.dot(c, values))
            mean = total / n
            d = values[nonzero[0]:nonzero[-1] + 1] - mean
            m2 = float(np.dot(c[nonzero[0]:nonzero[-1] + 1], d * d))
            stats.merge(_Moments(n, total, mean, m2, int(nonzero[0]), int(nonzero[-1])))
        stats.merge(self.out)
        # Order statistics over: outliers below 0, the dense counts, outliers from DENSE_NS up.
        out = np.sort(np.concatenate(self.out_parts)) if self.out_parts else np.empty(0, np.int64)
        below = int(np.searchsorted(out, 0))
        cum = np.cumsum(c)
        in_dense = int(cum[-1])

        def kth(k: int) -> float:
            if k < below:
                return float(out[k])
            k -= below
            if k < in_dense:
                return float(np.searchsorted(cum, k, "right"))
            k -= in_dense
            if self.out_hist is None:
                return float(out[below + k])
            return self.out_hist.kth(k)

        pct = []
        for q in PERCENTILES:
            rank = q / 100 * (stats.n - 1)
            lo = math.floor(rank)
            a = kth(lo)
            b = kth(lo + 1) if lo + 1 < stats.n else a
            pct.append(a + (b - a) * (rank - lo))
        return self._shape(stats, pct, self.out_hist is None)

    def _result_small(self) -> dict:
        x = self.small[0] if len(self.small) == 1 else np.concatenate(self.small) if self.small else None
        if x is None:
            return self._shape(_Moments(), [None] * len(PERCENTILES), True)
        stats = _Moments()
        stats.add(x)
        return self._shape(stats, np.percentile(x, PERCENTILES).tolist(), True)

    @staticmethod
    def _shape(stats: _Moments, pct: list, exact: bool) -> dict:
        if not stats.n:
            return {"count": 0, "total_ns": 0, "min_ns": None, "max_ns": None, "mean_ns": None,
                    "stddev_ns": None, **{f"p{q}_ns": None for q in PERCENTILES}, "exact": True}
        return {"count": stats.n, "total_ns": stats.total, "min_ns": stats.lo, "max_ns": stats.hi,
                "mean_ns": stats.mean, "stddev_ns": math.sqrt(max(stats.m2, 0.0) / stats.n),
                **{f"p{q}_ns": float(v) for q, v in zip(PERCENTILES, pct)}, "exact": exact}


class _Group:
    __slots__ = ("guest", "handle")

    def __init__(self, budget: _Budget) -> None:
        self.guest = _Metric(budget)
        self.handle = _Metric(budget)


class _Summary:
    def __init__(self, by: str, exact_limit: int) -> None:
        self.by = by
        self.groups: dict[tuple, _Group] = {}
        self.budget = _Budget(exact_limit)

    def group(self, key: tuple) -> _Group:
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = _Group(self.budget)
        return g

    def add(self, keys: list[tuple], starts: np.ndarray | None, guest: np.ndarray, handle: np.ndarray,
            has_handle: np.ndarray | None) -> None:
        """Add one block's events, sorted by group (`starts`: where each group begins; None for
        one group). `has_handle` masks the rows whose handling time is known (None: all)."""
        if starts is None:
            g = self.group(keys[0])
            g.guest.add(guest)
            g.handle.add(handle if has_handle is None else handle[has_handle])
            return
        bounds = [*starts.tolist(), len(guest)]
        for key, a, b in zip(keys, bounds, bounds[1:]):
            g = self.group(key)
            g.guest.add(guest[a:b])
            h = handle[a:b]
            g.handle.add(h if has_handle is None else h[has_handle[a:b]])


def _block_keys(by: str, batch: ExitBatch, cols: dict) -> tuple[list[tuple], np.ndarray | None, np.ndarray | None]:
    """Group of every row: (keys, order, starts). `order` sorts the rows by group (None when the
    block is one group, `starts` then None too)."""
    if by == "vm":
        return [(batch.vm,)], None, None
    if by == "vcpu":
        return [(batch.vm, batch.vcpu)], None, None
    if by == "reason":
        local = cols["reason"]
        if not len(local) or local.min() == local.max():
            return [(int(local[0]) if len(local) else 0,)], None, None
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
            return [(int(present[0]) >> 1, int(present[0]) & 1)], None, None
        lut = np.zeros(len(counts), np.int64)
        lut[present] = np.arange(len(present))
        index = lut[local]
        keys = [(int(k) >> 1, int(k) & 1) for k in present]
    elif by == "mmio":
        addrs, inverse = np.unique(cols["addr"], return_inverse=True)
        local = inverse.astype(np.int64) * 2 + (cols["flags"] & schema.FLAG_WRITE)
        present = np.flatnonzero(np.bincount(local))
        if len(present) == 1:
            k = int(present[0])
            return [(int(addrs[k >> 1]), k & 1)], None, None
        lut = np.zeros(int(local.max()) + 1, np.int64)
        lut[present] = np.arange(len(present))
        index = lut[local]
        keys = [(int(addrs[k >> 1]), k & 1) for k in present]
    else:
        raise ValueError(f"unknown grouping {by!r}")
    small = index.astype(np.uint8 if len(keys) <= 256 else np.uint16 if len(keys) <= 65536 else np.int64)
    order = np.argsort(small, kind="stable")  # a radix sort for 8/16-bit keys
    starts = np.searchsorted(small[order], np.arange(len(keys)))
    return keys, order, starts


_REASON_OF = {"ioport": schema.REASON_IO, "mmio": schema.REASON_MMIO}


def summarize(reader: TraceReader, by: str = "reason", sort: str = "count", where: EventFilter | None = None,
              exact_limit: int = EXACT_LIMIT) -> dict:
    """The summary as JSON-ready data: totals, one entry per group in `sort` order."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r} (known: {', '.join(GROUPINGS)})")
    if sort not in SORTS:
        raise ValueError(f"unknown sort key {sort!r} (known: {', '.join(SORTS)})")
    acc = _Summary(by, exact_limit)
    only_reason = _REASON_OF.get(by)
    pending: dict[tuple[int, int, int], tuple] = {}  # stream → (seq, t_exit, group key) of its last event
    columns = {"t_exit", "guest_ns", "reason"}
    if by in ("ioport", "mmio") or where is not None:
        columns |= {"addr", "flags"}
    with np.errstate(all="ignore"):  # a hostile file may overflow int64 arithmetic; no warnings
        for batch in reader.exit_batches(where=where, columns=columns):
            _add_batch(acc, batch, by, only_reason, where, pending)
    return _result(reader, acc, by, sort, where)


def _event_key(by: str, batch: ExitBatch, reason: int, addr: int, flags: int) -> tuple:
    """The group of one event (the same keys _block_keys gives)."""
    if by == "vm":
        return (batch.vm,)
    if by == "vcpu":
        return (batch.vm, batch.vcpu)
    if by == "reason":
        return (reason,)
    if by == "ioport":
        return (addr & 0xFFFF, flags & schema.FLAG_WRITE)
    return (addr, flags & schema.FLAG_WRITE)


def _add_batch(acc: _Summary, batch: ExitBatch, by: str, only_reason: int | None, where: EventFilter | None,
               pending: dict) -> None:
    cols = batch.columns
    n = batch.n_rows
    if not n:
        return
    t, g, seq = cols["t_exit"], cols["guest_ns"], cols[_SEQ]
    stream = (batch.vm, batch.vcpu, batch.epoch)
    before = pending.pop(stream, None)
    if before is not None and before[0] + 1 == int(seq[0]):
        # the previous block's last event of this stream: handled until this block's first entry
        value = int(t[0]) - int(g[0]) - before[1]
        value = (value + (1 << 63)) % (1 << 64) - (1 << 63)  # wraps like the int64 columns do
        acc.group(before[2]).handle.add(np.array([value], np.int64))
    handle = (t[1:] - g[1:]) - t[:-1]  # rows 0 .. n-2; the last row's comes with the next block
    contiguous = int(seq[-1]) - int(seq[0]) == n - 1  # no sequence number dropped inside the block

    keep = None
    if only_reason is not None:
        keep = cols["reason"] == only_reason
    if where is not None:
        mask = where.mask(cols, vm=batch.vm, vcpu=batch.vcpu, epoch=batch.epoch)
        keep = mask if keep is None else keep & mask
    if keep is not None and keep.all():
        keep = None

    if keep is None and contiguous:
        keys, order, starts = _block_keys(by, batch, cols)
        if order is None:  # the common case: one group, every handling time known
            acc.add(keys, None, g, handle, None)
        else:
            full = np.empty(n, np.int64)
            full[:-1] = handle
            full[-1] = 0
            known = np.ones(n, bool)
            known[-1] = False
            acc.add(keys, starts, g[order], full[order], known[order])
    else:
        full = np.empty(n, np.int64)
        full[:-1] = handle
        full[-1] = 0
        known = np.zeros(n, bool)
        known[:-1] = True if contiguous else seq[1:] == seq[:-1] + np.uint64(1)
        sub = cols
        if keep is not None:
            sub = {name: cols[name][keep] for name in ("reason", "addr", "flags")}
            g, full, known = g[keep], full[keep], known[keep]
        if len(g):
            keys, order, starts = _block_keys(by, batch, sub)
            if order is not None:
                g, full, known = g[order], full[order], known[order]
            acc.add(keys, starts, g, full, known)
    if keep is None or keep[-1]:
        wide = by in ("ioport", "mmio")
        key = _event_key(by, batch, int(cols["reason"][-1]), int(cols["addr"][-1]) if wide else 0,
                         int(cols["flags"][-1]) if wide else 0)
        pending[stream] = (int(seq[-1]), int(t[-1]), key)


def _label(by: str, key: tuple) -> str:
    if by == "reason":
        return schema.reason_name(key[0])
    if by == "ioport":
        return f"{key[0]:#x}:{'out' if key[1] else 'in'}"
    if by == "mmio":
        return f"{key[0]:#x}:{'W' if key[1] else 'R'}"
    if by == "vcpu":
        return f"vm {key[0]} vcpu {key[1]}"
    return f"vm {key[0]}"


def _key_fields(by: str, key: tuple) -> dict:
    if by == "reason":
        return {"reason": schema.reason_name(key[0]), "reason_code": key[0]}
    if by == "ioport":
        return {"port": key[0], "direction": "out" if key[1] else "in"}
    if by == "mmio":
        return {"addr": key[0], "direction": "W" if key[1] else "R"}
    if by == "vcpu":
        return {"vm": key[0], "vcpu": key[1]}
    return {"vm": key[0]}


def _result(reader: TraceReader, acc: _Summary, by: str, sort: str, where: EventFilter | None) -> dict:
    results = {key: (g.guest.result(), g.handle.result()) for key, g in acc.groups.items()}
    events = sum(gr["count"] for gr, _ in results.values())
    handle_total = sum(hr["total_ns"] for _, hr in results.values())
    guest_total = sum(gr["total_ns"] for gr, _ in results.values())
    names = {}
    if by == "vm":
        for rec in reader.records(schema.MSG_VM_START):
            if isinstance(rec.get("vm"), int) and isinstance(rec.get("name"), str):
                names.setdefault(rec["vm"], rec["name"])
    groups = []
    for key, (gr, hr) in results.items():
        entry = {"key": _label(by, key), **_key_fields(by, key), "count": gr["count"],
                 "pct": 100 * gr["count"] / events if events else 0.0,
                 "time_pct": 100 * hr["total_ns"] / handle_total if handle_total else 0.0,
                 "guest_pct": 100 * gr["total_ns"] / guest_total if guest_total else 0.0,
                 "guest": gr, "handle": hr}
        if by == "vm" and key[0] in names:
            entry["name"] = names[key[0]]
        groups.append(entry)
    metric = {"count": lambda e: e["count"], "time": lambda e: e["handle"]["total_ns"],
              "max": lambda e: e["handle"]["max_ns"] if e["handle"]["max_ns"] is not None else -(1 << 63)}[sort]
    groups.sort(key=lambda e: (-metric(e), e["key"]))
    return {
        "by": by, "sort": sort, "filter": None if where is None else str(where),
        "events": events, "guest_total_ns": guest_total, "handle_total_ns": handle_total,
        "percentiles": list(PERCENTILES), "percentiles_exact": acc.budget.exact,
        "groups": groups,
    }
