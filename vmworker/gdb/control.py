"""The VMM side of the gdb stub: all-stop parking of vCPU threads, guest debug, breakpoints.

vCPU threads own their vCPUs; the debugger never runs one. It tells them when to park, and they
call back from three small hooks in the vCPU loop (vcpu_loop.py):
- `holds(i)` / `park(vcpu)` after a kick: a held vCPU waits outside KVM_RUN until released, then
  loads its guest-debug state (KVM_SET_GUEST_DEBUG) itself, before it runs again;
- `debug_exit(vcpu, exit)` at KVM_EXIT_DEBUG (a single step or a hardware breakpoint);
- `breakpoint_hit(vcpu, suberror)` at KVM_EXIT_INTERNAL_ERROR, before the VMM's instruction
  fallback: on this host (PVM) a planted `int3` is not delivered as #BP in protected or long mode,
  KVM's emulator gives up at it (docs: guest/README.md, "Multiboot kernels on a PVM host").
A stop on one vCPU kicks all of them (all-stop); gdb reads and writes state only while every live
vCPU is parked. vCPU i is gdb thread i + 1.

Breakpoints: `hbreak` takes a debug register (DR0-DR3, enabled in DR7 as execute breakpoints, SDM
Vol. 3B §17.2.4); `break` plants 0xCC in protected and long mode, and takes a debug register in
real mode, where the guest's own IVT would get the int3.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from .. import kvm_abi as abi
from . import regs as R
from .catch import IoCatches, MmioCatches
from .watch import WatchError, WriteWatches

log = logging.getLogger("vmsup.gdb")

INT3 = 0xCC
DEBUG_REGISTERS = 4
DR6_BS = 1 << 14  # single step (SDM Vol. 3B §17.2.3)
CR0_PE, CR0_PG = 1 << 0, 1 << 31
SIGINT, SIGTRAP = 2, 5
PARK_POLL_SECONDS = 0.1  # parked threads and waiters re-check the VM's end this often


class BreakpointError(Exception):
    """A breakpoint that cannot be set; the message says why."""


@dataclass(frozen=True)
class Stop:
    vcpu: int
    signal: int
    why: str = ""  # "swbreak", "hwbreak" or "" (a step, an interrupt, an attach)
    watch: int | None = None  # the watched (linear) address a write watchpoint stopped at


@dataclass
class _Planted:
    gpa: int
    original: int


class Debugger:
    """All-stop control of one Machine's vCPUs for one gdb connection at a time."""

    def __init__(self, machine, wait: bool = False) -> None:
        self.machine = machine
        self.memory = machine.memory
        self.vcpus = machine.vm.vcpus
        self._cond = threading.Condition()
        self._run: set[int] = set() if wait else set(range(len(self.vcpus)))  # vCPUs allowed to run
        self._parked: set[int] = set()
        self._stop: Stop | None = None if not wait else Stop(0, SIGTRAP)
        self._stepping: int | None = None  # the vCPU single-stepping (others stay parked)
        self._stepping_over: int | None = None  # a step gdb did not ask for: past a breakpoint, then on
        self._step_from: int | None = None  # where the step began (linear pc)
        self._enabled = False  # guest debug on (a gdb is attached)
        self.hw: list[int | None] = [None] * DEBUG_REGISTERS  # linear addresses in DR0-DR3
        self.sw: dict[int, _Planted] = {}  # linear address → planted int3
        self._hw_kind: dict[int, str] = {}  # linear address → "hw" (hbreak) or "sw" (a real-mode break)
        self._thread_vcpu: dict[int, int] = {}  # vCPU thread ident → vCPU index
        self.notes: list[str] = []  # what the stub tells gdb before the next stop reply
        self.travel = None  # a rerun's time travel (vmworker/rerun_travel.py): bs/bc are served
        self._reverse: str | None = None  # "step" or "continue": a backwards run asked of the vCPU thread
        self.io_catches = IoCatches(machine.port_bus, self)
        self.mmio_catches = MmioCatches()
        self.watches = WriteWatches(machine, self)
        self._wake_r, self._wake_w = os.pipe()  # makes the stub's select() see a stop
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        if wait:
            for vcpu in self.vcpus:  # the first KVM_RUN returns at once and the vCPU parks
                vcpu.set_immediate_exit(True)

    @property
    def attached(self) -> bool:
        """Whether a gdb is attached (from its attach until it detaches)."""
        return self._enabled

    @property
    def wake_fd(self) -> int:
        return self._wake_r

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # --- hooks called by vCPU threads --------------------------------------------------------
    def holds(self, index: int) -> bool:
        return index not in self._run

    def park(self, vcpu) -> None:
        """Wait (outside KVM_RUN) until released or the VM stops; then load guest-debug state."""
        ctx = self.machine.ctx
        self._thread_vcpu[threading.get_ident()] = vcpu.id  # for stops a device reports (catch.py)
        with self._cond:
            self._parked.add(vcpu.id)
            self._cond.notify_all()
            while vcpu.id not in self._run and not ctx.stopping:
                self._cond.wait(PARK_POLL_SECONDS)
            self._parked.discard(vcpu.id)
            control, debugreg = self._guest_debug_for(vcpu.id)
        if not ctx.stopping:
            vcpu.set_guest_debug(control, debugreg)

    def debug_exit(self, vcpu, exit_) -> None:
        """KVM_EXIT_DEBUG: a finished single step, or a hardware breakpoint hit."""
        if not self._enabled:
            return
        if exit_.dr6 & DR6_BS or self._stepping == vcpu.id:
            self._step_done(vcpu)
            return
        hit = next((i for i in range(DEBUG_REGISTERS) if exit_.dr6 & (1 << i) and self.hw[i] is not None), None)
        why = "hwbreak"
        if hit is not None and self._hw_kind.get(self.hw[hit]) == "sw":
            why = "swbreak"
        self._report(Stop(vcpu.id, SIGTRAP, why))

    def after_io(self, vcpu, mmio: tuple[int, bytes, int] | None = None) -> None:
        """A port-I/O or MMIO exit of the vCPU gdb is single-stepping: finish its instruction now
        (Vcpu.complete_pending_io) and end the step there. Finished by a normal KVM_RUN, it would
        raise no single-step trap on this host and the next instruction would run too. The vCPU
        keeps immediate_exit set: its next KVM_RUN returns at once, and it parks or goes on.
        `mmio`: (address, data, is_write) of an MMIO exit, checked against `monitor catch mmio`."""
        if not self._enabled:
            return
        if mmio is not None and self.mmio_catches.specs and self.mmio_catches.hit(mmio[0], len(mmio[1])):
            addr, data, write = mmio
            with self._cond:
                self.notes.append(f"caught: mmio {'write to' if write else 'read from'} {addr:#x}, "
                                  f"{len(data)} byte(s) {data.hex()}")
            self._report(Stop(vcpu.id, SIGTRAP))
        if self._stepping != vcpu.id:
            return
        vcpu.complete_pending_io()
        if self._pc(vcpu.id) != self._step_from:  # else a `rep ins/outs` with iterations left: go on
            self._step_done(vcpu)

    def _step_done(self, vcpu) -> None:
        """vCPU `vcpu` finished the one instruction it was stepping."""
        if self._stepping_over == vcpu.id:  # past the breakpoint: put it back and go on
            with self._cond:
                self._stepping_over = self._stepping = None
                self._plant_all()
                self._run = set(range(len(self.vcpus)))
                control, debugreg = self._guest_debug_for(vcpu.id)
                self._cond.notify_all()
            vcpu.set_guest_debug(control, debugreg)
            return
        self._report(Stop(vcpu.id, SIGTRAP))

    def caught(self, what: str, watch: int | None = None) -> None:
        """A catch (catch.py) or a write watchpoint (watch.py) saw its exit, on the calling vCPU
        thread: stop there."""
        if not self._enabled:
            return
        index = self._thread_vcpu.get(threading.get_ident(), 0)
        with self._cond:
            self.notes.append(what)
        self._report(Stop(index, SIGTRAP, watch=watch))

    def insert_watch(self, addr: int, length: int, vcpu: int) -> None:
        """A write watchpoint on linear [addr, addr + length); WatchError if it cannot be."""
        if self.travel is not None:  # its writes would exit as MMIO, which the recording never had
            raise WatchError("a rerun cannot watch writes (read-only memory would change its exits)")
        gpa = self.translate(vcpu, addr)
        last = self.translate(vcpu, addr + length - 1) if length > 0 else None
        if gpa is None or last is None or last != gpa + length - 1:
            raise WatchError(f"{addr:#x} (+{length}) is not one contiguous range of guest RAM")
        self.watches.insert(addr, gpa, length)

    def breakpoint_hit(self, vcpu, suberror: int) -> bool:
        """KVM_EXIT_INTERNAL_ERROR: True if the vCPU stopped at an int3 gdb planted."""
        if suberror != abi.KVM_INTERNAL_ERROR_EMULATION or not self.sw:
            return False
        pc = R.linear_pc(vcpu.get_regs(), vcpu.get_sregs())
        if pc not in self.sw:
            return False
        self._report(Stop(vcpu.id, SIGTRAP, "swbreak"))
        return True

    # --- used by the stub ----------------------------------------------------------------------
    def attach(self) -> None:
        with self._cond:
            self._enabled = True

    def stop_all(self, signal: int = SIGINT, vcpu: int = 0) -> Stop:
        """Stop every vCPU (Ctrl-C, attach); returns the stop to report."""
        self._report(Stop(vcpu, signal))
        self.wait_parked()
        return self._stop or Stop(vcpu, signal)

    def take_stop(self) -> Stop | None:
        """The stop reported since the last resume (waiting until every live vCPU is parked), or None."""
        try:
            os.read(self._wake_r, 64)
        except BlockingIOError:
            pass
        if self._stop is None:
            return None
        self.wait_parked()
        return self._stop

    def take_notes(self) -> list[str]:
        with self._cond:
            notes, self.notes = self.notes, []
        return notes

    def wait_parked(self) -> None:
        with self._cond:
            while not self._all_parked() and not self.machine.ctx.stopping:
                self._cond.wait(PARK_POLL_SECONDS)

    def resume(self, step: int | None = None) -> None:
        """Continue every vCPU, or single-step vCPU `step` alone. A vCPU sitting on one of our
        breakpoints steps over it first (without it), so continuing never re-hits it at once."""
        with self._cond:
            self._stop = None
            if step is not None:
                self._stepping = step
                self._step_from = self._pc(step)
                self._run = {step}
            else:
                over = next((i for i in sorted(self._parked) if self._at_breakpoint(i)), None)
                if over is not None:
                    self._stepping = self._stepping_over = over
                    self._step_from = self._pc(over)
                    self._unplant_at(self._pc(over))
                    self._run = {over}
                else:
                    self._stepping = None
                    self._run = set(range(len(self.vcpus)))
            self._cond.notify_all()

    def resume_reverse(self, kind: str) -> None:
        """Run backwards ("step" or "continue"): the vCPU thread, released, does it (rerun_travel.py)
        and reports the stop where it lands."""
        with self._cond:
            self._stop = None
            self._stepping = self._stepping_over = None
            self._reverse = kind
            self._run = set(range(len(self.vcpus)))
            self._cond.notify_all()

    def take_reverse(self) -> str | None:
        """On the vCPU thread after `park`: the backwards run asked for, if any (once)."""
        with self._cond:
            kind, self._reverse = self._reverse, None
        return kind

    def report(self, stop: Stop) -> None:
        """A stop found by the vCPU thread itself (a rerun's end, divergence or time travel)."""
        self._report(stop)

    def guest_debug(self, index: int) -> tuple[int, tuple[int, ...]]:
        """The KVM_SET_GUEST_DEBUG arguments gdb's state asks for on vCPU `index`."""
        with self._cond:
            return self._guest_debug_for(index)

    def breakpoint_addresses(self) -> set[int]:
        """Linear addresses of every breakpoint gdb has inserted (int3s and debug registers)."""
        return set(self.sw) | set(self._hw_kind)

    def unplant_all(self) -> None:
        """Put the guest's own bytes back where int3s are planted (until `plant_all`)."""
        for addr in self.sw:
            self._unplant_at(addr)

    def plant_all(self) -> None:
        self._plant_all()

    def detach(self) -> None:
        """Remove every breakpoint, turn guest debug off and let the VM run on."""
        self.io_catches.clear()
        self.mmio_catches.clear()
        self.watches.clear()
        with self._cond:
            for addr in list(self.sw):
                self._unplant_at(addr)
            self.sw.clear()
            self.hw = [None] * DEBUG_REGISTERS
            self._hw_kind.clear()
            self._enabled = False
            self._stop = None
            self._reverse = None
            self._stepping = self._stepping_over = None
            self._run = set(range(len(self.vcpus)))
            self._cond.notify_all()

    # Breakpoints (only while stopped).
    def insert(self, kind: str, addr: int, vcpu: int) -> None:
        """kind "sw" (Z0) or "hw" (Z1) at linear `addr`; BreakpointError if it cannot be."""
        if kind == "sw" and addr in self.sw or addr in self._hw_kind:
            return
        if kind == "sw" and self._sregs(vcpu).cr0 & CR0_PE:
            gpa = self.translate(vcpu, addr)
            if gpa is None or not self.memory.contains(gpa, 1):
                raise BreakpointError(f"{addr:#x} is not in guest RAM")
            self.sw[addr] = _Planted(gpa, self.memory.read(gpa, 1)[0])
            self.memory.write(gpa, bytes((INT3,)))
            return
        free = next((i for i, a in enumerate(self.hw) if a is None), None)
        if free is None:
            raise BreakpointError(f"all {DEBUG_REGISTERS} debug registers are in use")
        self.hw[free] = addr
        self._hw_kind[addr] = kind

    def remove(self, kind: str, addr: int) -> None:
        if kind == "sw" and addr in self.sw:
            self._unplant_at(addr)
            del self.sw[addr]
            return
        if addr in self._hw_kind:
            del self._hw_kind[addr]
            self.hw[self.hw.index(addr)] = None

    # Memory, as gdb sees it: linear addresses, planted int3s hidden.
    def translate(self, vcpu: int, linear: int) -> int | None:
        sregs = self._sregs(vcpu)
        if sregs.cr0 & CR0_PG:
            return self.vcpus[vcpu].translate(linear)
        return linear & 0xFFFF_FFFF

    def read_memory(self, vcpu: int, addr: int, length: int) -> bytes:
        """Up to `length` bytes from linear `addr`; shorter where the memory ends or is unmapped."""
        out = bytearray()
        while length:
            chunk = min(length, 0x1000 - (addr & 0xFFF))
            gpa = self.translate(vcpu, addr)
            if gpa is None or not self.memory.contains(gpa, chunk):
                break
            data = bytearray(self.memory.read(gpa, chunk))
            for lin, planted in self.sw.items():
                if addr <= lin < addr + chunk:
                    data[lin - addr] = planted.original
            out += data
            addr += chunk
            length -= chunk
        return bytes(out)

    def write_memory(self, vcpu: int, addr: int, data: bytes) -> bool:
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, 0x1000 - ((addr + pos) & 0xFFF))
            gpa = self.translate(vcpu, addr + pos)
            if gpa is None or not self.memory.contains(gpa, chunk):
                return False
            piece = bytearray(data[pos:pos + chunk])
            for lin, planted in self.sw.items():  # keep our int3 in memory, remember the new byte
                if addr + pos <= lin < addr + pos + chunk:
                    planted.original = piece[lin - addr - pos]
                    piece[lin - addr - pos] = INT3
            self.memory.write(gpa, bytes(piece))
            pos += chunk
        return True

    def registers(self, vcpu: int):
        v = self.vcpus[vcpu]
        return v.get_regs(), v.get_sregs()

    def set_registers(self, vcpu: int, regs=None, sregs=None) -> None:
        v = self.vcpus[vcpu]
        if sregs is not None:
            v.set_sregs(sregs)
        if regs is not None:
            v.set_regs(regs)

    def xsave_image(self, vcpu: int) -> bytearray:
        """The vCPU's XSAVE image, where gdb's x87 and SSE registers live (regs.py reads them)."""
        return bytearray(bytes(self.vcpus[vcpu].get_xsave()))

    def set_xsave_image(self, vcpu: int, image: bytearray) -> None:
        self.vcpus[vcpu].set_xsave(abi.kvm_xsave.from_buffer_copy(image))

    def vcpu_ended(self, index: int) -> bool:
        return self.machine.vcpu_ended(index)

    # --- internals ----------------------------------------------------------------------------
    def _report(self, stop: Stop) -> None:
        with self._cond:
            if self._stop is None:
                self._stop = stop
            self._run = set()
            self._cond.notify_all()
        self.machine.kick_vcpus()
        try:
            os.write(self._wake_w, b"s")
        except BlockingIOError:
            pass  # the pipe is full: the stub is woken already

    def _all_parked(self) -> bool:
        return all(i in self._parked or self.machine.vcpu_ended(i) for i in range(len(self.vcpus)))

    def _guest_debug_for(self, index: int) -> tuple[int, tuple[int, ...]]:
        if not self._enabled:
            return 0, ()
        control = abi.KVM_GUESTDBG_ENABLE
        dr7 = 0
        debugreg = [0] * 8
        for i, addr in enumerate(self.hw):
            if addr is not None:
                debugreg[i] = addr
                dr7 |= 1 << (2 * i)  # Ln: local enable; R/Wn = LENn = 0: instruction execution
        if self._stepping_over == index:
            over = self._pc(index)
            for i, addr in enumerate(self.hw):
                if addr == over:
                    dr7 &= ~(1 << (2 * i))
        if dr7:
            control |= abi.KVM_GUESTDBG_USE_HW_BP
            debugreg[7] = dr7
        if self._stepping == index:
            control |= abi.KVM_GUESTDBG_SINGLESTEP
        return control, tuple(debugreg)

    def _pc(self, index: int) -> int:
        return R.linear_pc(*self.registers(index))

    def _sregs(self, index: int):
        return self.vcpus[index].get_sregs()

    def _at_breakpoint(self, index: int) -> bool:
        if self.vcpu_ended(index):
            return False
        pc = self._pc(index)
        return pc in self.sw or pc in self._hw_kind

    def _unplant_at(self, addr: int) -> None:
        planted = self.sw.get(addr)
        if planted is not None:
            self.memory.write(planted.gpa, bytes((planted.original,)))

    def _plant_all(self) -> None:
        for planted in self.sw.values():
            self.memory.write(planted.gpa, bytes((INT3,)))
