"""Sequence accounting: which sequence numbers of each stream no block holds and no gap record
explains, and which two blocks both claim.

Sequence numbers of a stream start at 0; a vm-end record's `final_seq` (the next seq of each
vCPU, a list by vCPU or a map) says how far each stream went, so losses at a stream's end count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .format import U64_LIMIT, is_int

StreamKey = tuple[int, int, int]  # (vm, vcpu, epoch)


@dataclass(frozen=True)
class Discontinuity:
    """Sequence numbers of a stream that no block holds and no gap record explains (kind
    "missing"), or that two blocks both claim (kind "overlap"). `offset`: the block after the
    hole, or the vm-end record that says how far the stream went."""

    vm: int
    vcpu: int
    epoch: int
    first_seq: int
    count: int
    offset: int
    kind: str = "missing"


def stream_ends(vm_ends: Iterable[tuple[int, dict]]) -> dict[StreamKey, tuple[int, int]]:
    """{stream: (next seq, offset of the vm-end record)} from (offset, vm-end record) pairs;
    malformed records and entries are passed over."""
    ends: dict[StreamKey, tuple[int, int]] = {}
    for offset, rec in vm_ends:
        final = rec.get("final_seq")
        if isinstance(final, list):
            final = dict(enumerate(final))
        if not (is_int(rec.get("vm"), 0, U64_LIMIT) and is_int(rec.get("epoch"), 0, U64_LIMIT)
                and isinstance(final, dict)):
            continue
        for vcpu, n in final.items():
            vcpu = int(vcpu) if isinstance(vcpu, str) and vcpu.isdigit() else vcpu
            if is_int(vcpu, 0, U64_LIMIT) and is_int(n, 0, U64_LIMIT):
                ends[(rec["vm"], vcpu, rec["epoch"])] = (n, offset)
    return ends


def stream_starts(vm_starts: Iterable[dict]) -> dict[StreamKey, int]:
    """Where each stream's numbering starts when not at 0: an epoch restored from a snapshot
    carries on its parent's (the vm-start record's parent.next_seq, per vCPU)."""
    starts: dict[StreamKey, int] = {}
    for rec in vm_starts:
        parent = rec.get("parent")
        seqs = parent.get("next_seq") if isinstance(parent, dict) else None
        if not isinstance(seqs, list) or not (is_int(rec.get("vm"), 0, U64_LIMIT) and is_int(rec.get("epoch"), 0, U64_LIMIT)):
            continue
        for vcpu, n in enumerate(seqs):
            if is_int(n, 0, U64_LIMIT):
                starts[(rec["vm"], vcpu, rec["epoch"])] = n
    return starts


def find_discontinuities(blocks: Iterable, gaps: Iterable[dict],
                         vm_ends: Iterable[tuple[int, dict]], starts: dict[StreamKey, int] | None = None) -> list[Discontinuity]:
    """`blocks`: the EXITS blocks in file order (anything with offset, vm, vcpu, epoch,
    first_seq, count); `gaps`: the gap records; `vm_ends`: (offset, vm-end record) pairs;
    `starts`: streams that do not start at 0 (stream_starts)."""
    explained: dict[StreamKey, list[tuple[int, int]]] = {}
    for g in gaps:
        explained.setdefault((g["vm"], g["vcpu"], g["epoch"]), []).append(
            (g["first_missing"], g["first_missing"] + g["count"]))
    ends = stream_ends(vm_ends)
    by_key: dict[StreamKey, list] = {}
    for ref in blocks:
        by_key.setdefault((ref.vm, ref.vcpu, ref.epoch), []).append(ref)
    for key in ends:
        by_key.setdefault(key, [])

    out: list[Discontinuity] = []

    def missing(key, lo: int, hi: int, offset: int) -> None:
        for a, b in subtract(lo, hi, explained.get(key, [])):
            out.append(Discontinuity(*key, a, b - a, offset))

    for key, refs in sorted(by_key.items()):
        expected = (starts or {}).get(key, 0)  # sequence numbers of a stream start at 0, unless restored
        for ref in refs:
            if ref.first_seq > expected:
                missing(key, expected, ref.first_seq, ref.offset)
            elif ref.first_seq < expected:
                out.append(Discontinuity(*key, ref.first_seq, min(expected, ref.first_seq + ref.count)
                                         - ref.first_seq, ref.offset, "overlap"))
            expected = max(expected, ref.first_seq + ref.count)
        if key in ends and ends[key][0] > expected:
            missing(key, expected, ends[key][0], ends[key][1])
    return out


def subtract(lo: int, hi: int, intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) minus the union of `intervals`, as sorted disjoint intervals."""
    left = [(lo, hi)]
    for a, b in sorted(intervals):
        nxt = []
        for x, y in left:
            if b <= x or a >= y:
                nxt.append((x, y))
                continue
            if x < a:
                nxt.append((x, a))
            if b < y:
                nxt.append((b, y))
        left = nxt
    return left
