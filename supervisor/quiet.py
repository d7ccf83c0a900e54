"""Noticing a VM that makes no exit for a while, and saying so once.

A guest that spins (or waits for an interrupt that nothing will raise) makes no exit at all, so
nothing is printed and the live table stands still: without a word, that looks like a hung vmsup.
The supervisor watches each VM's exit count as the recorder sees it (`covered`: sequence numbers,
so a --record-only filter that keeps nothing does not look like silence) and, after QUIET_SECONDS
without a change, tells once per epoch.

Library code: returns the notes to tell; the CLI renders them.
"""

from __future__ import annotations

from dataclasses import dataclass

QUIET_SECONDS = 5.0
QUIET_TEXT = (f"no exit for {QUIET_SECONDS:g} s; the guest is running without exits "
              "(spinning, or waiting without an interrupt source?)")


@dataclass
class _Seen:
    epoch: int
    covered: int
    since: float  # monotonic time the count last changed (or the watch began)
    told: bool = False


class QuietWatch:
    """Per VM: when its exit count last moved. `update` returns the VMs quiet long enough, once each."""

    def __init__(self, quiet_seconds: float = QUIET_SECONDS) -> None:
        self.quiet_seconds = quiet_seconds
        self._seen: dict[int, _Seen] = {}

    def update(self, now: float, vms: list[tuple[int, int, int, bool]]) -> list[int]:
        """`vms`: (vm id, epoch, exits covered, watched) for each VM; watched is False while a VM
        is not running on its own (starting, paused, stopping, held by gdb): its clock restarts."""
        quiet = []
        for vm, epoch, covered, watched in vms:
            seen = self._seen.get(vm)
            if seen is None or seen.epoch != epoch or seen.covered != covered or not watched:
                told = seen is not None and seen.epoch == epoch and seen.told and seen.covered == covered
                self._seen[vm] = _Seen(epoch, covered, now, told)
                continue
            if not seen.told and now - seen.since >= self.quiet_seconds:
                seen.told = True
                quiet.append(vm)
        return quiet
