"""Step traces (`--step-trace`): single-step a vCPU and record one row per guest instruction.

With KVM_GUESTDBG_SINGLESTEP each instruction ends KVM_RUN with KVM_EXIT_DEBUG (api.rst,
KVM_SET_GUEST_DEBUG). The vCPU loop hands those exits here (`step`) instead of recording them as
exit events; the exits the instructions make themselves (port I/O, MMIO) go on as usual.

Per step the hot path only copies: the synced register block of kvm_run (kvm_valid_regs, see
exits.py) and MAX_INSN_BYTES of guest memory at the next instruction, read before it runs (so
self-modifying code is recorded as it executed). Which registers changed, their new values and
the CPU mode are worked out per batch with numpy (`_flush`), where they cost almost nothing per
row. Rows go out as messages.StepBatch on the vCPU's own publisher (the lossless PUSH path);
the row layout is tracetool/step_schema.py.

The window: from the first instruction (`steps` N rows at most), or from the exit with sequence
number `from_exit` of this vCPU's exit stream to the one numbered `to_exit`. When it closes,
single-stepping is switched off and the VM runs on.
"""

from __future__ import annotations

import struct
import time

from tracetool import messages
from tracetool.step_schema import MAX_INSN_BYTES, MAX_STEP_BATCH, REGISTERS

from . import kvm_abi as abi

# The block copied per step: kvm_run.s.regs from kvm_regs through sregs.efer (linux/kvm.h,
# struct kvm_sync_regs: regs, then sregs). Offsets of REGISTERS within it, for numpy.
_BLOCK_START = abi.run_offset("s", "regs", "regs")
_BLOCK_END = abi.run_offset("s", "regs", "sregs", "efer") + 8
_BLOCK_SIZE = _BLOCK_END - _BLOCK_START
_SREGS = ("s", "regs", "sregs")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")


def _offset_in_block(name: str) -> int:
    if name in _SEGMENTS:
        return abi.run_offset(*_SREGS, name, "selector") - _BLOCK_START
    if name in ("cr0", "cr3", "cr4", "efer"):
        return abi.run_offset(*_SREGS, name) - _BLOCK_START
    return abi.run_offset("s", "regs", "regs", name) - _BLOCK_START


_REG_OFFSETS = {name: _offset_in_block(name) for name in REGISTERS}
_REG_SIZES = {name: 2 if name in _SEGMENTS else 8 for name in REGISTERS}
_CS_BASE = abi.run_offset(*_SREGS, "cs", "base") - _BLOCK_START
_CS_DB = abi.run_offset(*_SREGS, "cs", "db") - _BLOCK_START
_CS_L = abi.run_offset(*_SREGS, "cs", "l") - _BLOCK_START
_RIP = _REG_OFFSETS["rip"]
_CR0 = _REG_OFFSETS["cr0"]
_CR3 = _REG_OFFSETS["cr3"]
# One read of what locates the next instruction: rip, cs.base, cs.l, cr0, cr3 (in block order).
_LOCATE = struct.Struct(f"<Q{_CS_BASE - _RIP - 8}xQ{_CS_L - _CS_BASE - 8}xB{_CR0 - _CS_L - 1}xQ{_CR3 - _CR0 - 8}xQ")
CR0_PE, CR0_PG = 1 << 0, 1 << 31
LINEAR_32 = 0xFFFF_FFFF  # outside 64-bit code CS base + EIP wraps at 4 GiB (SDM Vol. 3A §3.4.4)
PAGE = 0x1000
_NO_INSN = bytes(MAX_INSN_BYTES)
_TRANSLATIONS_KEPT = 4096  # pages whose translation is cached (per CR3)


_BLOCK_DTYPE = None


def _block_dtype():
    """A numpy view of one register block: REGISTERS as named fields at their kvm_run offsets."""
    global _BLOCK_DTYPE
    if _BLOCK_DTYPE is None:
        import numpy as np
        _BLOCK_DTYPE = np.dtype({"names": list(REGISTERS), "formats": [f"<u{_REG_SIZES[r]}" for r in REGISTERS],
                                 "offsets": [_REG_OFFSETS[r] for r in REGISTERS], "itemsize": _BLOCK_SIZE})
    return _BLOCK_DTYPE


class StepTracer:
    """One vCPU's step trace. Built by the worker; driven by that vCPU's thread only."""

    def __init__(self, vcpu, memory, publisher, vm: int, epoch: int, *, steps: int | None = None,
                 from_exit: int | None = None, to_exit: int | None = None, batch_steps: int = MAX_STEP_BATCH) -> None:
        self.vcpu = vcpu
        self.run = vcpu.run_page
        self.ram = memory.regions[0].mapping  # RAM from gpa 0 (memory.GuestMemory.with_ram)
        self.publisher = publisher
        self.vm, self.epoch = vm, epoch
        self.remaining = steps  # rows still to record (None: until to_exit or the VM's end)
        self.from_exit = from_exit
        self.to_exit = to_exit
        self.batch_steps = min(batch_steps, MAX_STEP_BATCH)
        self.active = False
        self.done = False
        self.next_seq = 0
        self.recorded = 0
        self._initial: list[int] | None = None
        self._counter = None
        self._counter_start = 0
        self._pages: dict[int, int] = {}
        self._cr3 = -1
        self._allocate()
        import numpy  # noqa: F401  (imported now: the window must not wait ~0.1 s for it at its first batch)

    def _allocate(self) -> None:
        """Buffers for one batch, allocated once and touched now: under PVM a page touched for the
        first time costs ~11 µs (tracetool/_alloc.py), more than a step's own work."""
        rows = self.batch_steps
        self.blocks = bytearray(_BLOCK_SIZE * (rows + 1))  # before row 0, then after each row
        self.insns = bytearray(MAX_INSN_BYTES * (rows + 1))  # row i's bytes; the pending row's last
        self._times_raw = bytearray(8 * rows)
        self._addrs_raw = bytearray(8 * (rows + 1))
        self.times = memoryview(self._times_raw).cast("Q")
        self.addrs = memoryview(self._addrs_raw).cast("Q")
        self.n = 0  # rows complete in the buffers
        for buffer in (self.blocks, self.insns, self._times_raw, self._addrs_raw):
            for at in range(0, len(buffer), PAGE):
                buffer[at] = 0

    # --- the window ------------------------------------------------------------------------------
    def starts_at_entry(self) -> bool:
        return self.from_exit is None

    def arm(self, from_sync: bool) -> None:
        """Start stepping: before the first KVM_RUN (registers by ioctl) or after an exit (from
        kvm_run's synced registers). Runs on the vCPU's thread."""
        if from_sync:
            block = bytes(self.run[_BLOCK_START:_BLOCK_END])
        else:
            block = (bytes(self.vcpu.get_regs()) + bytes(self.vcpu.get_sregs()))[:_BLOCK_SIZE]
        self.blocks[:_BLOCK_SIZE] = block
        self.n = 0
        self._initial = [self._value(block, name) for name in REGISTERS]
        self._note_next(0)
        try:
            from .insn_counter import InsnCounter
            self._counter = InsnCounter(self.vcpu)
            self._counter_start = self._counter.read()
        except (KeyError, OSError):
            self._counter = None
        self.vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)
        self.active = True

    def after_exit(self, seq: int, ctx, in_flight: bool) -> None:
        """An exit with sequence number `seq` was recorded on this vCPU: open or close the window.
        `in_flight`: a port-I/O or MMIO exit, whose instruction the next KVM_RUN finishes."""
        if self.active:
            if self.to_exit is not None and seq >= self.to_exit:
                self.finish()
            elif in_flight:
                self.complete(ctx)
        elif not self.done and self.from_exit is not None and seq >= self.from_exit:
            if in_flight:  # that instruction began before the window: finish it unrecorded
                self._run_to_completion(ctx)
            self.arm(from_sync=True)

    def finish(self) -> None:
        """Close the window (or the VM ended): send what is left, stop single-stepping."""
        if self.done:
            return
        was_active, self.active, self.done = self.active, False, True
        if not was_active:
            return
        self._flush(last=True)
        try:
            self.vcpu.set_guest_debug(0)
        except OSError:
            pass  # the VM is going away
        if self._counter is not None:
            self._counter.close()

    # --- the hot path ----------------------------------------------------------------------------
    def step(self) -> None:
        """KVM_EXIT_DEBUG after one instruction: its row is complete; note the next one."""
        n = self.n
        self.times[n] = time.monotonic_ns()
        n += 1
        self.n = n
        self.blocks[n * _BLOCK_SIZE:(n + 1) * _BLOCK_SIZE] = self.run[_BLOCK_START:_BLOCK_END]
        self._note_next(n)
        if n >= self.batch_steps or (self.remaining is not None and n >= self.remaining):
            self._flush(last=False)

    def complete(self, ctx) -> None:
        """After a port-I/O or MMIO exit: finish its instruction now (Vcpu.complete_pending_io; a
        normal KVM_RUN would run the next one too before trapping); the registers KVM syncs at
        that EINTR are the step's end."""
        self._run_to_completion(ctx)
        self.step()

    def _run_to_completion(self, ctx) -> None:
        self.vcpu.complete_pending_io()
        if not (ctx.stopping or ctx.paused):  # else a kick came meanwhile and must not be lost
            self.vcpu.set_immediate_exit(False)

    def _note_next(self, n: int) -> None:
        """Row n's address and bytes, from the register block before it runs."""
        rip, cs_base, cs_l, cr0, cr3 = _LOCATE.unpack_from(self.blocks, n * _BLOCK_SIZE + _RIP)
        addr = rip if cs_l else (cs_base + rip) & LINEAR_32
        self.addrs[n] = addr
        if cr0 & CR0_PG:
            insn = self._paged_insn(addr, cr3)
        else:
            insn = self.ram[addr:addr + MAX_INSN_BYTES]
            if len(insn) != MAX_INSN_BYTES:
                insn = insn.ljust(MAX_INSN_BYTES, b"\0")
        self.insns[n * MAX_INSN_BYTES:(n + 1) * MAX_INSN_BYTES] = insn

    def _paged_insn(self, addr: int, cr3: int) -> bytes:
        if cr3 != self._cr3 or len(self._pages) > _TRANSLATIONS_KEPT:
            self._pages.clear()
            self._cr3 = cr3
        out = b""
        for linear in (addr, (addr | (PAGE - 1)) + 1):  # an instruction may straddle two pages
            want = MAX_INSN_BYTES - len(out)
            if want <= 0:
                break
            page = linear & ~(PAGE - 1)
            gpa = self._pages.get(page)
            if gpa is None:
                gpa = self.vcpu.translate(page)
                if gpa is None:
                    break
                self._pages[page] = gpa
            start = gpa + (linear - page)
            out += self.ram[start:start + min(want, PAGE - (linear - page))]
        return out.ljust(MAX_INSN_BYTES, b"\0")

    # --- batches ---------------------------------------------------------------------------------
    @staticmethod
    def _value(block: bytes, name: str) -> int:
        off, size = _REG_OFFSETS[name], _REG_SIZES[name]
        return int.from_bytes(block[off:off + size], "little")

    def _flush(self, last: bool) -> None:
        import numpy as np  # per batch, off the per-step path
        n = self.n
        size = _BLOCK_SIZE
        blocks = np.frombuffer(self.blocks, np.uint8, (n + 1) * size).reshape(n + 1, size)
        fields = np.frombuffer(self.blocks, _block_dtype(), n + 1)
        regs = np.empty((n + 1, len(REGISTERS)), np.uint64)
        for i, name in enumerate(REGISTERS):
            regs[:, i] = fields[name]
        diff = regs[1:] != regs[:-1]
        # bit i of `changed` = REGISTERS[i]: little-endian bit order, 28 bits padded to 4 bytes
        changed = np.packbits(diff, axis=1, bitorder="little")
        changed = np.pad(changed, ((0, 0), (0, 4 - changed.shape[1]))).view("<u4")[:, 0]
        values = regs[1:][diff]  # row-major: each row's changed registers in REGISTERS order
        before = blocks[:-1]
        pe = (regs[:-1, REGISTERS.index("cr0")] & np.uint64(CR0_PE)) != 0
        bits = np.where((before[:, _CS_L] != 0) & pe, 64, np.where((before[:, _CS_DB] != 0) & pe, 32, 16))
        cols = {
            "t": bytes(self._times_raw[:8 * n]),
            "addr": bytes(self._addrs_raw[:8 * n]),
            "bits": bits.astype(np.uint8).tobytes(),
            "insn": bytes(self.insns[:n * MAX_INSN_BYTES]),
            "changed": changed.astype("<u4").tobytes(),
            "values": values.astype("<u8").tobytes(),
        }
        extra = {}
        if self.next_seq == 0:
            extra["initial"] = self._initial
        if self.remaining is not None:
            self.remaining -= n
            last = last or self.remaining == 0
        if last:
            extra["last"] = True
            if self._counter is not None:
                extra["insn_emulation"] = self._counter.read() - self._counter_start
        if n or last:
            batch = messages.StepBatch(vm=self.vm, vcpu=self.vcpu.id, epoch=self.epoch, first_seq=self.next_seq,
                                       count=n, cols=cols, **extra)
            self.publisher.send(batch.to_msg())
        self.next_seq += n
        self.recorded += n
        # The block after the last row and the pending row move to the front: the next batch's start.
        self.blocks[:size] = self.blocks[n * size:(n + 1) * size]
        self.insns[:MAX_INSN_BYTES] = self.insns[n * MAX_INSN_BYTES:(n + 1) * MAX_INSN_BYTES]
        self.addrs[0] = self.addrs[n]
        self.n = 0
        if self.remaining == 0 and not self.done:
            self.active, self.done = False, True
            try:
                self.vcpu.set_guest_debug(0)
            except OSError:
                pass
            if self._counter is not None:
                self._counter.close()
