"""Exact streaming statistics of nanosecond times: count, total, min, max, mean, stddev and
percentiles of values that arrive a block at a time, without keeping every value.

Percentiles follow numpy's default (linear interpolation between order statistics). Times below
DENSE_NS (65.5 µs, where almost all exits fall) are counted in one bincount per metric, which
gives order statistics, sums and moments exactly; only the rarer values outside are kept. Fresh
memory is what costs most here (a first-touched page costs ~11 µs under PVM), so keeping 16 bytes
per event would cost more than decoding it. If the kept outliers pass a shared budget (Budget),
the rest go into a log histogram (128 sub-buckets per power of two, relative error below 0.4 %)
and the result says the percentiles are approximate; counts, sums, min, max, mean and stddev
stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 99)
DENSE_NS = 1 << 16  # times counted in a dense bincount: 0 .. 65.5 µs
_PROMOTE = 4096  # a metric's values kept as they are until it has this many
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


class Budget:
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


class Metric:
    """One metric (guest or handling time) of one group: its first values as they are; once it
    has more than _PROMOTE, a dense bincount of the values in [0, DENSE_NS) plus the outliers
    (kept while the budget lasts, then in a log histogram)."""

    __slots__ = ("budget", "small", "n_small", "dense", "out", "out_parts", "out_hist")

    def __init__(self, budget: Budget) -> None:
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
