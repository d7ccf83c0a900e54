"""Write watchpoints (gdb's `watch`, packet Z2) through read-only memory slots.

Data breakpoints in DR7 never fire on this host (KVM on PVM), but a KVM_MEM_READONLY slot does
what is needed: guest reads of it are served from memory without an exit, and every guest write
exits as KVM_EXIT_MMIO with its address and data. So each guest page holding a watched range gets
a read-only slot of its own (the RAM slot around it is split), and a small device on the MMIO bus
stands for that page: it applies the write to guest RAM itself (the host mapping stays writable)
and stops the guest when the write touched a watched range. Other writes to the page go on, at
the price of one exit each (~10-13 µs here instead of none). Removing the last watch restores the
RAM slot as it was. Only while every vCPU is parked (gdb inserts and removes when stopped).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import kvm_abi as abi

PAGE = 0x1000
MAX_WATCHED_PAGES = 64  # each is a memory slot; KVM has a few hundred, and a watch is for a variable
_EXTRA_SLOT_BASE = 0x100  # slot ids for the split pieces, clear of GuestMemory's own (one per region)


class WatchError(Exception):
    """A watchpoint that cannot be set; the message says why."""


@dataclass(frozen=True)
class Watch:
    linear: int  # what gdb asked for (reported back in the stop reply)
    gpa: int
    length: int


class WatchedPage:
    """The MMIO-bus stand-in for one read-only page: applies writes, stops on watched ones."""

    name = "gdb-watch"

    def __init__(self, page: int, watches: "WriteWatches") -> None:
        self.page = page
        self.watches = watches

    def read(self, offset: int, size: int) -> bytes:  # a read-only slot's reads never exit; be safe
        return self.watches.memory.read(self.page + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        gpa = self.page + offset
        self.watches.memory.write(gpa, data)
        for w in self.watches.list:
            if gpa < w.gpa + w.length and w.gpa < gpa + len(data):
                self.watches.debugger.caught(
                    f"watch: {len(data)} byte(s) written at {gpa:#x}: {data.hex()}", watch=w.linear)
                return


class WriteWatches:
    def __init__(self, machine, debugger) -> None:
        self.vm = machine.vm
        self.memory = machine.memory
        self.bus = machine.mmio_bus
        self.debugger = debugger
        self.list: list[Watch] = []
        self._pieces: list[int] = []  # slot ids of the split layout now in KVM ([] = the original)
        self._routed: set[int] = set()  # MMIO-bus addresses routed to a WatchedPage
        self._pages_now: set[int] = set()  # the read-only pages in KVM's slots now

    def insert(self, linear: int, gpa: int, length: int) -> None:
        if not self.memory.contains(gpa, length):
            raise WatchError(f"{linear:#x} (+{length}) is not in guest RAM")
        if self.vm.kvm.check_extension(abi.KVM_CAP_READONLY_MEM) <= 0:
            raise WatchError("this KVM has no read-only memory slots (KVM_CAP_READONLY_MEM)")
        watch = Watch(linear, gpa, length)
        if watch in self.list:
            return
        pages = self._pages(self.list + [watch])
        if len(pages) > MAX_WATCHED_PAGES:
            raise WatchError(f"at most {MAX_WATCHED_PAGES} watched pages")
        self.list.append(watch)
        self._apply(pages)

    def remove(self, linear: int, length: int) -> None:
        self.list = [w for w in self.list if (w.linear, w.length) != (linear, length)]
        self._apply(self._pages(self.list))

    def clear(self) -> None:
        self.list.clear()
        self._apply(set())

    @staticmethod
    def _pages(watches: list[Watch]) -> set[int]:
        return {p for w in watches for p in range(w.gpa & ~(PAGE - 1), w.gpa + w.length, PAGE)}

    def _apply(self, pages: set[int]) -> None:
        """Lay the RAM slots out for `pages` (KVM slots cannot change size or flags in place:
        api.rst, KVM_SET_USER_MEMORY_REGION; each is deleted and made again) and route them."""
        region = self.memory.regions[0]  # with_ram: one RAM region, slot 0, from gpa 0
        pages = {p for p in pages if region.gpa <= p < region.end}
        if pages == self._pages_now:
            return  # the slots are as they should be: leave KVM's memory map alone
        self._pages_now = pages
        for slot in self._pieces:
            self.vm.set_user_memory_region(slot, 0, 0, 0)  # size 0 deletes
        self.vm.set_user_memory_region(0, 0, 0, 0)
        self._pieces = []
        pieces: list[tuple[int, int, int]] = []  # (gpa, size, flags)
        at = region.gpa
        for page in sorted(pages):
            if page > at:
                pieces.append((at, page - at, 0))
            pieces.append((page, PAGE, abi.KVM_MEM_READONLY))
            at = page + PAGE
        if at < region.end:
            pieces.append((at, region.end - at, 0))
        for i, (gpa, size, flags) in enumerate(pieces):
            slot = 0 if i == 0 else _EXTRA_SLOT_BASE + i
            self.vm.set_user_memory_region(slot, gpa, size, region.host_addr + gpa - region.gpa, flags)
            if slot:
                self._pieces.append(slot)
        cache = self.bus.claimant_cache()  # the bus consults it first (vmworker/devices/bus.py)
        for addr in self._routed:
            cache.pop(addr, None)
        self._routed = set()
        for page in pages:
            device = WatchedPage(page, self)
            for addr in range(page, page + PAGE):
                cache[addr] = (page, device)
            self._routed.update(range(page, page + PAGE))
