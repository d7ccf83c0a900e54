"""`vmtrace replay`: events in time order, released at the pace they were recorded (or X times
faster), so a trace can be watched like the live `vmsup tail`.

The pacing is a seam: `paced()` takes the clock and the sleep function, so tests run it on a
fake clock, and `max_sleep` caps any one wait (idle stretches are skipped, later events keep
their spacing relative to each other).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

import numpy as np

_SLACK_S = 1e-6


def paced(chunks: Iterable[dict[str, np.ndarray]], speed: float = 1.0, max_sleep: float | None = None,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> Iterator[dict[str, np.ndarray]]:
    """Yield slices of the time-ordered chunks once their recorded time (scaled by 1/speed,
    from the first event) has come. Every event is yielded exactly once, in order."""
    if not speed > 0:
        raise ValueError("speed must be > 0")
    start = None
    t_first = 0
    skipped = 0.0  # seconds of waiting dropped by max_sleep
    for chunk in chunks:
        t = chunk["t_exit"]
        n = len(t)
        if not n:
            continue
        if start is None:
            t_first = int(t[0])
            start = clock()
        due_at = (t - np.int64(t_first)).astype(np.float64) / 1e9 / speed  # inf speed: all zeros
        i = 0
        while i < n:
            now = clock() - start + skipped
            # due within a microsecond counts as due: a clock that can't resolve the last wait
            # (float rounding) must not leave the loop sleeping for nothing
            j = int(np.searchsorted(due_at, now + _SLACK_S, "right"))
            if j > i:
                yield {name: col[i:j] for name, col in chunk.items()}
                i = j
                continue
            wait = float(due_at[i]) - now
            if max_sleep is not None and wait > max_sleep:
                skipped += wait - max_sleep
                wait = max_sleep
            if wait > 0:
                sleep(wait)
