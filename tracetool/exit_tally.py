"""How many exits each VM made, over all its epochs: the one count ps, the live table, the end
line, the final table and the trace agree on.

An epoch's count is the worker's own (its vm-end record's `exits`) once it said; before that, or
when the worker died without saying, it is how far its streams got: the sequence numbers the
recorder accounted for, stored or declared lost in a gap record (a kick — KVM_EXIT_INTR — takes a
sequence number too, so a live count may run a few ahead of the worker's own).

The recorder keeps a RunTally as batches and records arrive (and rebuilds it from the trace when
it is restarted); `RunTally.from_trace` computes the same from a file, with the figures the end
of a run prints (events stored, gaps and what they lost, refused messages). A recorder lives as
long as the run and a VM that restarts all the time has thousands of epochs: it folds each epoch
it is done with into its VM's totals (`VmTally.fold`), so what it holds follows the live epochs.
A launch whose recorder is on another host counts in its relay the same way (`RunTally.take`).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from . import messages, schema


def unclaimed_text(counts: dict[str, int] | None) -> str:
    """'3 port reads, 1 mmio write' from a vm-end's `unclaimed` map ({bus}_unclaimed_{reads|writes}:
    accesses no device claimed, vmworker/devices/bus.py); '' when there were none."""
    parts = []
    for key, n in sorted((counts or {}).items()):
        if n:
            bus, _, what = key.partition("_unclaimed_")
            bus = {"pio": "port"}.get(bus, bus)
            what = what.removesuffix("s") if n == 1 else what
            parts.append(f"{n} {bus} {what}" if what else f"{n} {key}")
    return ", ".join(parts)


@dataclass
class EpochTally:
    reached: dict[int, int] = field(default_factory=dict)  # vCPU → next sequence number accounted for
    exits: int | None = None  # the worker's own count, from its vm-end
    # vCPU → first sequence number: not 0 in an epoch restored from a snapshot (vm-start's parent)
    first: dict[int, int] = field(default_factory=dict)
    status: str | None = None
    unclaimed: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        if self.exits is not None:
            return self.exits
        return sum(max(n - self.first.get(vcpu, 0), 0) for vcpu, n in self.reached.items())


class EpochRanges:
    """A set of epoch numbers as sorted disjoint [lo, hi) ranges: a VM's folded epochs are almost
    all consecutive, so however many times it restarted this stays a range or two."""

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __contains__(self, epoch: int) -> bool:
        i = bisect_right(self._lo, epoch) - 1
        return i >= 0 and epoch < self._hi[i]

    def __len__(self) -> int:
        return sum(hi - lo for lo, hi in zip(self._lo, self._hi))

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi))

    def add(self, epoch: int) -> None:
        if epoch in self:
            return
        i = bisect_right(self._lo, epoch)  # the ranges before i start at or below epoch
        joins_left = i > 0 and self._hi[i - 1] == epoch
        joins_right = i < len(self._lo) and self._lo[i] == epoch + 1
        if joins_left and joins_right:
            self._hi[i - 1] = self._hi.pop(i)
            del self._lo[i]
        elif joins_left:
            self._hi[i - 1] = epoch + 1
        elif joins_right:
            self._lo[i] = epoch
        else:
            self._lo.insert(i, epoch)
            self._hi.insert(i, epoch + 1)


@dataclass
class VmTally:
    vm: int
    name: str | None = None
    epochs: dict[int, EpochTally] = field(default_factory=dict)  # the epochs not folded
    folded: EpochRanges = field(default_factory=EpochRanges)
    folded_exits: int = 0  # the folded epochs' totals
    folded_unclaimed: dict[str, int] = field(default_factory=dict)

    def epoch(self, epoch: int) -> EpochTally:
        return self.epochs.setdefault(epoch, EpochTally())

    def fold(self, epoch: int) -> None:
        """Keep only the totals of an epoch no message can change any more (the recorder decides
        which: supervisor/recorder.py). Figures stay exact; the epoch's own dicts go."""
        e = self.epochs.pop(epoch)
        self.folded_exits += e.total
        for k, n in e.unclaimed.items():
            self.folded_unclaimed[k] = self.folded_unclaimed.get(k, 0) + n
        self.folded.add(epoch)

    @property
    def exits(self) -> int:
        return self.folded_exits + sum(e.total for e in self.epochs.values())

    @property
    def last_epoch(self) -> int:
        return max(self.epochs, default=0)

    @property
    def status(self) -> str | None:
        return self.epochs[self.last_epoch].status if self.epochs else None

    @property
    def unclaimed(self) -> dict[str, int]:
        out: dict[str, int] = dict(self.folded_unclaimed)
        for e in self.epochs.values():
            for k, n in e.unclaimed.items():
                out[k] = out.get(k, 0) + n
        return out

    def to_json(self) -> dict:
        return {"vm": self.vm, "name": self.name, "exits": self.exits, "status": self.status,
                "epochs": len(self.epochs) + len(self.folded), "last_epoch_exits": self.epochs[self.last_epoch].total if self.epochs else 0,
                "unclaimed": self.unclaimed}


@dataclass
class RunTally:
    vms: dict[int, VmTally] = field(default_factory=dict)
    events: int = 0  # events stored in the trace (rows)
    gaps: int = 0  # gap records
    lost: int = 0  # events the gap records with a known count lost
    lost_unknown: int = 0  # gap records whose count only the kernel knew
    refused: int = 0  # bus messages the recorder refused

    def vm(self, vm: int) -> VmTally:
        tally = self.vms.get(vm)
        if tally is None:
            tally = self.vms[vm] = VmTally(vm)
        return tally

    def reached(self, vm: int, vcpu: int, epoch: int, next_seq: int) -> None:
        """A stream's events (stored or declared lost) go up to next_seq."""
        reached = self.vm(vm).epoch(epoch).reached
        reached[vcpu] = max(reached.get(vcpu, 0), next_seq)

    def started(self, vm: int, epoch: int, name: str | None, first_seq: dict[int, int] | None = None) -> None:
        tally = self.vm(vm)
        tally.epoch(epoch).first.update(first_seq or {})
        tally.name = name or tally.name

    def ended(self, end: dict) -> None:
        """A vm-end record (the worker's, or the supervisor's for a worker that could not say)."""
        tally = self.vm(end["vm"])
        tally.name = end.get("name") or tally.name
        epoch = tally.epoch(end["epoch"])
        if isinstance(end.get("exits"), int) and end.get("final_seq") is not None:
            epoch.exits = end["exits"]  # the worker's own count; the supervisor's vm-end has none
        epoch.status = end.get("status") or epoch.status
        if isinstance(end.get("unclaimed"), dict):
            epoch.unclaimed = dict(end["unclaimed"])

    def gap(self, gap: dict) -> None:
        self.gaps += 1
        if gap.get("count_known", True):
            self.lost += gap["count"]
        else:
            self.lost_unknown += 1
        self.reached(gap["vm"], gap["vcpu"], gap["epoch"], gap["first_missing"] + gap["count"])

    def take(self, msg: messages.Message) -> None:
        """A checked bus message, as a recorder counts it: what a launch's relay to a remote
        recorder (supervisor/remote_link.py) counts on its side. A VM's epochs older than the one
        before its newest start are folded (their workers are long gone), and a late message for
        one is ignored, as the recorder refuses it."""
        vm = getattr(msg, "vm", None)
        if vm is None or (vm in self.vms and getattr(msg, "epoch", None) in self.vms[vm].folded):
            return
        if isinstance(msg, messages.ExitBatch):
            self.reached(msg.vm, msg.vcpu, msg.epoch, msg.first_seq + msg.count)
        elif isinstance(msg, messages.VmStart):
            self.started(msg.vm, msg.epoch, msg.name, msg.first_seq())
            tally = self.vms[msg.vm]
            for epoch in [e for e in tally.epochs if e < msg.epoch - 1]:
                tally.fold(epoch)
        elif isinstance(msg, messages.VmEnd):
            self.ended(msg.to_msg())

    @classmethod
    def from_trace(cls, reader) -> "RunTally":
        """The tally of a trace file (a TraceReader), every epoch and every recorder's part."""
        tally = cls(events=reader.event_count)
        for st in reader.streams():
            tally.reached(st.vm, st.vcpu, st.epoch, st.last_seq + 1)
        for kind, take in ((schema.MSG_VM_START, lambda r: tally.started(r["vm"], r["epoch"], r.get("name"))),
                           (schema.MSG_VM_END, tally.ended), (schema.MSG_GAP, tally.gap),
                           (schema.MSG_REFUSED, lambda r: setattr(tally, "refused", tally.refused + r["total"]))):
            for rec in reader.records(kind):
                try:
                    messages.validate_record(kind, rec)  # a hostile file's records count for nothing
                except messages.MessageError:
                    continue
                take(rec)
        return tally

    def to_json(self) -> dict:
        return {"events": self.events, "gaps": self.gaps, "gap_events": self.lost, "gaps_count_unknown": self.lost_unknown,
                "refused": self.refused, "vms": {str(vm): t.to_json() for vm, t in sorted(self.vms.items())}}
