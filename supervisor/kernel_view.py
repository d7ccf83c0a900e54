"""`vmsup top`'s view of the kernel's own counters (kvm-stats messages) beside vmsup's exits.

The kernel's `exits` counts every exit of a vCPU; those that reached vmsup are its sequence
numbers. Their difference is what the kernel handled itself (HLT and timer interrupts with an
in-kernel irqchip) — but only at one instant: a sample taken at t is compared with the exits whose
t_exit ≤ t, which top knows once a batch of that vCPU ends after t (or the VM ended). Until then
the sample waits; in-kernel counts come from the latest sample so lined up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHOWN = ("exits", "halt_exits", "irq_injections")  # the kernel's names


@dataclass
class _Vcpu:
    values: dict[str, int] = field(default_factory=dict)  # every counter, carried forward
    samples: list[tuple[int, dict[str, int]]] = field(default_factory=list)  # the last two (t, values)
    waiting: list[tuple[int, int]] = field(default_factory=list)  # (t, kernel exits) not lined up yet
    lined_up: list[tuple[int, int, int]] = field(default_factory=list)  # the last two (t, kernel exits, vmsup exits)
    next_seq: int = 0  # exits that reached vmsup, from the batches seen
    last_batch: tuple | None = None  # (seq, t_exit) of the latest batch


class KernelView:
    """One VM (one epoch) of kernel counters, fed with its kvm-stats samples and exit batches."""

    def __init__(self) -> None:
        self.vcpus: dict[int, _Vcpu] = {}

    def _vcpu(self, vcpu: int) -> _Vcpu:
        return self.vcpus.setdefault(vcpu, _Vcpu())

    def sample(self, vcpu: int, t: int, changed: dict) -> None:
        v = self._vcpu(vcpu)
        v.values = {**v.values, **changed}
        v.samples = (v.samples + [(t, v.values)])[-2:]
        if v.last_batch is not None and int(v.last_batch[1][-1]) > t:  # its exits up to t are all here
            seq, t_exit = v.last_batch
            k = int(np.searchsorted(t_exit, t, side="right"))
            self._line_up(v, t, v.values.get("exits", 0), int(seq[k - 1]) + 1 if k else int(seq[0]))
        else:
            v.waiting.append((t, v.values.get("exits", 0)))

    def exits(self, vcpu: int, seq: np.ndarray, t_exit: np.ndarray, next_seq: int) -> None:
        """A batch of the vCPU's exits (seq and t_exit columns; next_seq: after the batch)."""
        v = self._vcpu(vcpu)
        if len(t_exit):
            last_t = int(t_exit[-1])
            while v.waiting and v.waiting[0][0] < last_t:
                t, kernel_exits = v.waiting.pop(0)
                k = int(np.searchsorted(t_exit, t, side="right"))
                self._line_up(v, t, kernel_exits, int(seq[k - 1]) + 1 if k else v.next_seq)
            v.last_batch = (seq, t_exit)
        v.next_seq = max(v.next_seq, next_seq)

    def ended(self, final_seq: dict[int, int]) -> None:
        """The VM ended: every exit reached vmsup before its final samples."""
        for vcpu, v in self.vcpus.items():
            for t, kernel_exits in v.waiting:
                self._line_up(v, t, kernel_exits, final_seq.get(vcpu, v.next_seq))
            v.waiting = []

    @staticmethod
    def _line_up(v: _Vcpu, t: int, kernel_exits: int, user_exits: int) -> None:
        v.lined_up = (v.lined_up + [(t, kernel_exits, user_exits)])[-2:]

    def snapshot(self) -> dict | None:
        """{name: {"total", "rate"}} for SHOWN and in_kernel (rate None until two samples); None
        before the first sample."""
        if not any(v.samples for v in self.vcpus.values()):
            return None
        out = {}
        for name in SHOWN:
            rates = [(b[name] - a[name]) / ((tb - ta) / 1e9) for v in self.vcpus.values() if len(v.samples) == 2
                     for (ta, a), (tb, b) in [v.samples] if tb > ta and name in a and name in b]
            out[name] = {"total": sum(v.values.get(name, 0) for v in self.vcpus.values()),
                         "rate": round(sum(rates), 1) if rates else None}
        lined = [v.lined_up for v in self.vcpus.values() if v.lined_up]
        rates = [((kb - ub) - (ka - ua)) / ((tb - ta) / 1e9) for pair in lined if len(pair) == 2
                 for (ta, ka, ua), (tb, kb, ub) in [pair] if tb > ta]
        out["in_kernel"] = {"total": sum(max(pair[-1][1] - pair[-1][2], 0) for pair in lined) if lined else None,
                            "rate": round(sum(rates), 1) if rates else None}
        return out
