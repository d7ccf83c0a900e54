"""The kernel's own KVM counters of a VM and each of its vCPUs (KVM_GET_STATS_FD), sampled from
the worker's main thread every `stats_interval` seconds and sent as kvm-stats messages.

They show what the trace cannot: exits the kernel handles itself (HLT with an in-kernel irqchip,
the PIT, the PIC), injected interrupts, emulated instructions. A sample holds only the counters
that changed since the stream's previous one (the first holds them all): most never move, and a
trace keeps every record in memory when read. The last sample is taken after the vCPU threads
ended, so it holds the final counts.
"""

from __future__ import annotations

import time
from typing import Callable

from .kvm import KvmStats

VM_STREAM = -1  # the vcpu number of the VM's own counters

# send(vcpu, t, values, last): one sample of one stream.
Send = Callable[[int, int, dict, bool], None]


class KernelCounters:
    def __init__(self, vm, interval: float, send: Send) -> None:
        """Open the VM's and every vCPU's stats fd. Call before the vCPU threads start: opening a
        vCPU's stats fd waits while that vCPU is in KVM_RUN."""
        self.interval_ns = int(interval * 1e9)
        self.send = send
        self._sources: list[tuple[int, KvmStats]] = []
        try:
            self._sources.append((VM_STREAM, vm.stats()))
            for vcpu in vm.vcpus:
                self._sources.append((vcpu.id, vcpu.stats()))
        except BaseException:
            self.close()
            raise
        self._previous: dict[int, dict[str, int]] = {}
        self._next_ns = 0

    def tick(self) -> None:
        """Sample if the interval has passed (called from the main thread's wait loop)."""
        now = time.monotonic_ns()
        if now >= self._next_ns:
            self._next_ns = now + self.interval_ns
            self._sample(last=False)

    def _sample(self, last: bool) -> None:
        for stream, stats in self._sources:
            t = time.monotonic_ns()
            values = stats.read_counters()
            before = self._previous.get(stream)
            changed = values if before is None else {k: v for k, v in values.items() if before.get(k) != v}
            self._previous[stream] = values
            if changed or last:
                self.send(stream, t, changed, last)

    def finish(self) -> None:
        """The final sample (after the vCPU threads ended), then close the fds."""
        try:
            self._sample(last=True)
        finally:
            self.close()

    def close(self) -> None:
        for _, stats in self._sources:
            stats.close()
        self._sources = []
