"""A Machine is one VM put together: KVM objects, RAM with the guest loaded, devices, vCPU threads.

`Machine.run()` starts one thread per vCPU, waits until the VM ends (all vCPUs halted, a device
or an exit asked to stop, the exit budget or the timeout ran out) and returns a `RunResult`.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from dataclasses import dataclass, field

from . import kvm_abi as abi
from . import layout, x86
from .status import End, exit_code_for
from .devices.bus import Bus
from . import acpi, bzimage, mptable, multiboot
from .coalesce import CoalescedRing
from .errors import KvmError, SpecError
from .emulate import InsnFallback
from .halt_watch import HaltWatch
from .kernel_counters import KernelCounters
from .kvm import Kvm
from .image import GuestImage
from .memory import GuestMemory
from .vcpu_loop import VcpuStats, run_vcpu

# How often the machine's main thread checks the timeout and quiet vCPUs.
IDLE_CHECK_SECONDS = 0.1
# The signal that kicks a vCPU thread out of KVM_RUN (with kvm_run.immediate_exit set, see signals.py).
KICK_SIGNAL = signal.SIGUSR1

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def register_dump(vcpu) -> dict:
    """General, segment and control registers of a stopped vCPU, as plain numbers."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    dump: dict = {"vcpu": vcpu.id}
    dump.update({name: getattr(regs, name) for name in _GPRS})
    for name in _SEGMENTS:
        seg = getattr(sregs, name)
        dump[name] = {"selector": seg.selector, "base": seg.base, "limit": seg.limit, "type": seg.type}
    for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
        dump[name] = getattr(sregs, name)
    dump["gdt"] = {"base": sregs.gdt.base, "limit": sregs.gdt.limit}
    dump["idt"] = {"base": sregs.idt.base, "limit": sregs.idt.limit}
    return dump


@dataclass
class RunResult:
    name: str
    status: str
    guest_code: int | None = None
    detail: str = ""
    exits: int = 0
    kicks: int = 0
    run_seconds: float = 0.0
    by_reason: dict[str, int] = field(default_factory=dict)
    vcpus: list[dict] = field(default_factory=list)
    registers: dict | None = None
    unclaimed: dict[str, int] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.status, self.guest_code)

    @property
    def exits_per_second(self) -> float:
        return self.exits / self.run_seconds if self.run_seconds > 0 else 0.0

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["exit_code"] = self.exit_code
        data["exits_per_second"] = self.exits_per_second
        return data


class VcpuContext:
    """What vCPU threads share: buses, the exit log and budget, and the one way to stop the VM."""

    def __init__(self, machine: "Machine", port_bus: Bus, mmio_bus: Bus, exit_log, max_exits: int | None,
                 vcpus: int) -> None:
        self._machine = machine
        self.port_bus = port_bus
        self.mmio_bus = mmio_bus
        self.exit_log = exit_log
        self.max_exits = max_exits
        # Shared by several vCPUs only (one vCPU counts locally). itertools.count's next() is
        # atomic under the GIL: an exact total across threads.
        self.exit_budget = itertools.count() if max_exits is not None and vcpus > 1 else None
        self.stopping = False
        self.halt_probe = None  # set by halt_watch while it asks the vCPU threads whether they sleep for good
        self.insn_fallback = None  # emulate.InsnFallback: instructions the VMM does when KVM's emulator cannot
        self.debugger = None  # gdb.control.Debugger while a gdb stub serves this VM
        self.deterministic = None  # deterministic.Deterministic with --deterministic: interrupts at exits
        self.step_tracers = None  # per vCPU: step_trace.StepTracer with --step-trace
        self.coalesced = None  # coalesce.CoalescedRing with --coalesce: drained before every exit
        self.paused = False
        self._resumed = threading.Event()
        self._resumed.set()
        self.parked = 0  # vCPU threads waiting in wait_while_paused (Machine.wait_parked counts them)
        self._parked_lock = threading.Lock()

    def wait_while_paused(self) -> None:
        """Block a vCPU thread (outside KVM_RUN, without the GIL) until resumed or stopping."""
        with self._parked_lock:
            self.parked += 1
        try:
            self._resumed.wait()
        finally:
            with self._parked_lock:
                self.parked -= 1

    def stop(self, reason: End, code: int | None = None, detail: str = "", vcpu=None) -> None:
        self._machine.stop(reason, code=code, detail=detail, vcpu=vcpu)


def check_vm_shape(image: GuestImage, mem_size: int, vcpus: int, max_vcpus: int) -> None:
    """Whether `image` can run with this much memory and this many vCPUs; SpecError if not."""
    image.check_fits(mem_size)
    if vcpus > max_vcpus:
        raise SpecError(f"--vcpus {vcpus} is over this host's KVM limit of {max_vcpus}")
    if mem_size < x86.min_mem_for_stacks(image.mode, vcpus):
        raise SpecError(f"{vcpus} vCPUs need at least {x86.min_mem_for_stacks(image.mode, vcpus)} bytes of memory")
    if image.mode == "real" and vcpus > x86.max_real_mode_vcpus():
        raise SpecError(f"real mode supports at most {x86.max_real_mode_vcpus()} vCPUs (one stack slot each)")


class Machine:
    def __init__(self, name: str, image: GuestImage, mem_size: int, vcpus: int, port_bus: Bus, mmio_bus: Bus,
                 exit_log=None, max_exits: int | None = None, timeout: float | None = None,
                 kvm_path: str = "/dev/kvm", batchers: list | None = None, irqchip: bool = False,
                 cmdline: str = "", initrd: bytes | None = None, stats_interval: float = 0.0,
                 send_stats=None, coalesce: list[str] | None = None) -> None:
        self.name = name
        # The kernel's counters (vmworker.kernel_counters): sampled every stats_interval s, 0 = off.
        self.stats_interval, self.send_stats = stats_interval, send_stats
        self.image = image
        self.irqchip = irqchip
        self.timeout = timeout
        self.batchers = batchers or [None] * vcpus
        self._lock = threading.Lock()
        self._end: tuple[str, int | None, str] | None = None
        self._registers: dict | None = None
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()
        self.port_bus, self.mmio_bus = port_bus, mmio_bus
        self.ctx = VcpuContext(self, port_bus, mmio_bus, exit_log, max_exits, vcpus)

        self.kvm = Kvm(kvm_path)
        try:
            check_vm_shape(image, mem_size, vcpus, self.kvm.max_vcpus())
            plan = bzimage.plan_boot(image, mem_size, cmdline, len(initrd or b""), vcpus) if image.linux else None
            self.vm = self.kvm.create_vm()
            self.memory = GuestMemory.with_ram(mem_size)
            self.vm.set_tss_addr(layout.TSS_ADDR)
            if irqchip:
                # Before any vCPU exists (api.rst, KVM_CREATE_IRQCHIP): PIC, IOAPIC and a LAPIC per vCPU,
                # then the PIT. KVM_PIT_SPEAKER_DUMMY makes the kernel answer port 0x61 too (refresh
                # toggle in bit 4, PIT channel 2 output in bit 5), so no userspace device sits there.
                self.vm.create_irqchip()
                self.vm.create_pit2(abi.KVM_PIT_SPEAKER_DUMMY)
            self.memory.register(self.vm)
            self.ctx.insn_fallback = InsnFallback(self.memory)
            image.load_into(self.memory)
            gdt = x86.LINUX_BOOT_GDT if image.linux else x86.VMSUP_GDT
            x86.write_boot_tables(self.memory, image.mode, gdt)
            boot_info = (multiboot.write_boot_info(self.memory, mem_size, cmdline,
                                                   video=bool(image.multiboot.flags & multiboot.FLAG_VIDEO_MODE))
                         if image.multiboot else None)
            boot_params = bzimage.write_boot_params(self.memory, image, mem_size, plan, initrd) if plan else None
            cpuid = self.kvm.supported_cpuid()
            if image.is_kernel:  # how a kernel finds its CPUs and starts the APs with INIT/SIPI
                signature, features = x86.cpu_signature(cpuid)
                mptable.write_mp_table(self.memory, vcpus, signature, features)
                acpi.write_acpi_tables(self.memory, vcpus)
            load_addr = image.segments[0].gpa
            for i in range(vcpus):
                vcpu = self.vm.create_vcpu(i)
                vcpu.set_cpuid2(x86.cpuid_for_vcpu(cpuid, i))  # first: other state is checked against it
                vcpu.set_sregs(x86.initial_sregs(vcpu.get_sregs(), image.mode, load_addr, gdt))
                regs = x86.initial_regs(image.mode, image.entry, load_addr, i, mem_size)
                if boot_info is not None:  # Multiboot 0.6.96 §3.2: EAX = loader magic, EBX = the info
                    regs.rax, regs.rbx = multiboot.BOOTLOADER_MAGIC, boot_info
                if boot_params is not None:  # boot.rst, 32/64-bit Boot Protocol: ESI/RSI = the zero page
                    regs.rsi = boot_params
                vcpu.set_regs(regs)
                if irqchip and i > 0 and not image.is_kernel:
                    # An in-kernel LAPIC parks APs until INIT/SIPI. Flat and ELF guests start every
                    # vCPU at the entry (guest/README.md); a kernel gets the BSP only.
                    vcpu.set_mp_state(abi.KVM_MP_STATE_RUNNABLE)
            if coalesce:
                self._coalesce(coalesce, exit_log)
        except BaseException:
            self.close()
            raise

    def _coalesce(self, zones: list[str], exit_log) -> None:
        """--coalesce: register the zones; every vCPU drains the VM's ring before each exit (the
        vCPU loop) and each recording vCPU at each batch flush (event_batch)."""
        ring = CoalescedRing(self.vm, self.kvm, zones, self.port_bus, self.mmio_bus, exit_log)
        ring.attach(self.vm.vcpus[0])
        self.ctx.coalesced = ring
        for vcpu, batcher in zip(self.vm.vcpus, self.batchers):
            if batcher is not None:
                batcher.drain = lambda pos, b=batcher, i=vcpu.id: ring.drain(b.add_coalesced, pos, i)

    # Stopping -----------------------------------------------------------------------------------
    def stop(self, reason: End, code: int | None = None, detail: str = "", vcpu=None) -> None:
        """End the VM; the first reason wins. Safe from any thread, vCPU threads included."""
        with self._lock:
            if self._end is not None:
                return
            self._end = (reason, code, detail)
            if vcpu is not None:
                try:
                    self._registers = register_dump(vcpu)
                except Exception as e:  # the dump is a courtesy; the stop must happen regardless
                    self._registers = {"error": str(e)}
            self.ctx.stopping = True
        self.ctx._resumed.set()  # a paused VM that is stopped must not stay parked
        self._kick_all()

    def pause(self) -> None:
        """Kick every vCPU out of KVM_RUN and park it until `resume`."""
        with self._lock:
            if self._end is not None or self.ctx.paused:
                return
            self.ctx._resumed.clear()
            self.ctx.paused = True
        self._kick_all()

    def resume(self) -> None:
        with self._lock:
            self.ctx.paused = False
            self.ctx._resumed.set()

    def wait_parked(self, timeout: float) -> bool:
        """After `pause`: wait until every vCPU thread is parked (or has ended); False on timeout
        or when the VM stops meanwhile. A parked vCPU's state is complete (see vmworker/snapshot.py)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ctx.stopping or not self.ctx.paused:
                return False
            ended = sum(1 for i in range(len(self.vm.vcpus)) if self.vcpu_ended(i))
            if self._threads and self.ctx.parked + ended >= len(self.vm.vcpus):
                return True
            self._done.wait(0.001)
        return False

    def kick_vcpus(self) -> None:
        """Make every vCPU thread return from KVM_RUN once; each goes back in unless stopping or paused."""
        self._kick_all()

    def adopt_current_thread(self) -> None:
        """The calling thread runs vCPU 0 itself (a rerun's loop): stops and gdb kick it like a vCPU thread."""
        self._threads = [threading.current_thread()]

    def vcpu_ended(self, index: int) -> bool:
        """Whether vCPU `index`'s thread has started and ended (it halted, or the VM stopped)."""
        threads = self._threads
        return index < len(threads) and threads[index].ident is not None and not threads[index].is_alive()

    def _kick_all(self) -> None:
        for vcpu in self.vm.vcpus:
            vcpu.set_immediate_exit(True)
        me = threading.get_ident()
        for thread in self._threads:
            if thread.ident is not None and thread.ident != me and thread.is_alive():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass  # the thread ended in between

    def _kick_quiet_vcpus(self) -> None:
        """Kick vCPUs that sit in KVM_RUN with unflushed events, so they reach the recorder."""
        now = time.monotonic_ns()
        for vcpu, batcher, thread in zip(self.vm.vcpus, self.batchers, self._threads):
            since = batcher.pending_since if batcher is not None else 0
            if since and now - since > 2 * batcher.flush_ns and thread.ident is not None and thread.is_alive():
                vcpu.set_immediate_exit(True)
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    # Running ------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        signal.signal(KICK_SIGNAL, lambda *_: None)  # a handler (not SIG_IGN) so KVM_RUN sees EINTR
        # With an irqchip KVM sleeps through HLT itself; halt_watch ends a VM halted for good. Made
        # before the vCPU threads start: opening a vCPU's stats fd waits while it is in KVM_RUN.
        watch = HaltWatch(self) if self.irqchip else None
        counters = self._kernel_counters()
        if counters is not None:
            counters.tick()  # the baseline, before any vCPU runs
        stats = [VcpuStats() for _ in self.vm.vcpus]
        remaining = [len(self.vm.vcpus)]
        count_lock = threading.Lock()

        def thread_main(vcpu, st, batcher):
            try:
                run_vcpu(vcpu, self.ctx, st, batcher)
            except Exception as e:  # a VMM bug must still end the VM with a status, not hang it
                self.stop(End.VMM_ERROR, detail=f"vcpu {vcpu.id}: {type(e).__name__}: {e}")
            finally:
                with count_lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        self._done.set()

        for vcpu, st, batcher in zip(self.vm.vcpus, stats, self.batchers):
            t = threading.Thread(target=thread_main, args=(vcpu, st, batcher), name=f"vcpu{vcpu.id}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()

        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while not self._done.is_set():
            wait = IDLE_CHECK_SECONDS if deadline is None else min(IDLE_CHECK_SECONDS, deadline - time.monotonic())
            if wait <= 0:
                self.stop(End.TIMEOUT, detail=f"no end after {self.timeout:g} s")
                break
            self._done.wait(wait)
            self._kick_quiet_vcpus()
            if watch is not None:
                watch.tick()
            if counters is not None:
                counters.tick()
        for t in self._threads:
            t.join()
        if watch is not None:
            watch.close()
        if counters is not None:
            counters.finish()
        return self._result(stats)

    def _kernel_counters(self) -> KernelCounters | None:
        if self.send_stats is None or not self.stats_interval > 0:
            return None
        try:
            return KernelCounters(self.vm, self.stats_interval, self.send_stats)
        except KvmError:  # a kernel without KVM_GET_STATS_FD: the trace just has no counters
            return None

    def _result(self, stats: list[VcpuStats]) -> RunResult:
        if self._end is None:
            reason, code, detail = End.HALTED, None, ""
        else:
            reason, code, detail = self._end
        by_reason: dict[str, int] = {}
        for st in stats:
            for r, n in st.by_reason.items():
                key = abi.EXIT_REASON_NAMES.get(r, f"reason-{r}")
                by_reason[key] = by_reason.get(key, 0) + n
        started = [st.first_run for st in stats if st.first_run]
        run_seconds = (max(st.last_exit for st in stats) - min(started)) if started else 0.0
        unclaimed = {f"{bus.name}_{k}": v for bus in (self.port_bus, self.mmio_bus)
                     for k, v in bus.statistics().items()}
        return RunResult(
            name=self.name, status=reason, guest_code=code, detail=detail,
            exits=sum(st.exits for st in stats), kicks=sum(st.kicks for st in stats),
            run_seconds=run_seconds, by_reason=by_reason,
            vcpus=[{"id": i, "exits": st.exits, "halted": st.halted} for i, st in enumerate(stats)],
            registers=self._registers, unclaimed=unclaimed)

    def close(self) -> None:
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.close()
        self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
