"""The kernel's KVM counters in a trace (kvm-stats records, vmworker/kernel_counters.py): each
(vm, epoch, vcpu) stream's samples with every counter carried forward, and the deltas per interval.

A sample holds only the counters that changed since its stream's previous one; `Streams.add`
rebuilds the full set. vcpu -1 is the VM's own counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import schema
from .trace import TraceReader

VM_STREAM = -1
# Shown first where there is room: what kvm_stat shows first, and what vmsup's own exits compare with.
PREFERRED = ("exits", "halt_exits", "irq_injections", "insn_emulation", "io_exits", "mmio_exits", "halt_wakeup",
             "irq_exits", "signal_exits", "irq_window_exits", "request_irq_exits")


@dataclass
class Stream:
    vm: int
    epoch: int
    vcpu: int
    times: list[int] = field(default_factory=list)
    values: list[dict[str, int]] = field(default_factory=list)  # full, carried forward
    ended: bool = False  # the worker's last sample is here

    @property
    def current(self) -> dict[str, int]:
        return self.values[-1] if self.values else {}

    def intervals(self) -> list[dict]:
        """Per interval between samples: its end time, length and the counters that moved."""
        out = []
        for i in range(1, len(self.times)):
            before, after = self.values[i - 1], self.values[i]
            deltas = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
            out.append({"t_ns": self.times[i], "dt_ns": self.times[i] - self.times[i - 1], "deltas": deltas})
        return out


class Streams:
    """Samples by (vm, epoch, vcpu), fed in the order they were sent (a trace's record order)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[int, int, int], Stream] = {}

    def add(self, vm: int, epoch: int, vcpu: int, t: int, values: dict, last: bool = False) -> Stream:
        stream = self.by_key.get((vm, epoch, vcpu))
        if stream is None:
            stream = self.by_key[(vm, epoch, vcpu)] = Stream(vm, epoch, vcpu)
        stream.times.append(t)
        stream.values.append({**stream.current, **values})
        stream.ended = stream.ended or bool(last)
        return stream

    def of_vm(self, vm: int, epoch: int) -> list[Stream]:
        return [s for (v, e, _), s in sorted(self.by_key.items()) if (v, e) == (vm, epoch)]


def from_trace(reader: TraceReader, vm: int | None = None) -> Streams:
    streams = Streams()
    for rec in reader.records(schema.MSG_KVM_STATS):
        if vm is not None and rec.get("vm") != vm:
            continue
        values = rec.get("values")
        if not all(isinstance(rec.get(k), int) for k in ("vm", "epoch", "vcpu", "t")) or not isinstance(values, dict):
            continue  # the writer checks records; a hand-made trace may still hold odd ones
        streams.add(rec["vm"], rec["epoch"], rec["vcpu"], rec["t"],
                    {k: v for k, v in values.items() if isinstance(k, str) and isinstance(v, int)}, rec.get("last", False))
    return streams


def order(names, totals: dict[str, int]) -> list[str]:
    """Counter names: PREFERRED first, then by how much they moved."""
    rank = {n: i for i, n in enumerate(PREFERRED)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), -abs(totals.get(n, 0)), n))
