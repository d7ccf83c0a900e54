"""The guest-instruction counter: the per-vCPU KVM statistic `insn_emulation`, and whether to trust it.

KVM counts in `insn_emulation` every instruction its x86 emulator executes for a vCPU
(arch/x86/kvm/x86.c, x86_emulate_instruction). With VT-x/SVM that is a few rare instructions;
on a host where KVM runs every guest instruction through the emulator (PVM), it is exactly the
number of instructions the vCPU executed. Which of the two a host is cannot be asked of KVM, so
`counts_exactly()` runs a known instruction sequence in a scratch VM once per process and compares.

This module is the one place the counter is read (`InsnCounter`) and `TRACE_HEADER_KEY` the one
run-metadata key that records the answer in a trace, so no tool trusts the counter blindly or
checks it twice. One read is one pread (~1 µs): sample it per batch, not per exit, on the hot path.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from . import layout, x86
from .errors import KvmError
from .exits import Hlt
from .kvm import Kvm, Vcpu
from .memory import GuestMemory

STAT_NAME = "insn_emulation"  # the per-vCPU stat's name in its KVM_GET_STATS_FD descriptor
TRACE_HEADER_KEY = "insn_count_exact"  # run metadata: True when the counter counts every instruction


class InsnCounter:
    """A vCPU's `insn_emulation` counter: the stats fd is opened once, each `read()` is one pread.

    Raises KeyError at construction when this kernel has no such statistic. Readable from any
    thread, also while the vCPU is inside KVM_RUN.
    """

    def __init__(self, vcpu: Vcpu) -> None:
        self._stats = vcpu.stats()
        if STAT_NAME not in self._stats.names:
            self._stats.close()
            raise KeyError(f"this kernel's vCPU statistics have no {STAT_NAME!r}")

    def read(self) -> int:
        return self._stats.read(STAT_NAME)

    def close(self) -> None:
        self._stats.close()

    def __enter__(self) -> "InsnCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The probe, 16-bit real mode at CS:IP = 0x1000:0:  mov $N,%cx ; 1: loop 1b ; hlt
# It executes 1 + N + 1 instructions (LOOP runs N times: it decrements CX and jumps while CX != 0).
PROBE_LOOPS = 1000
PROBE_CODE = bytes([0xB9]) + PROBE_LOOPS.to_bytes(2, "little") + bytes([0xE2, 0xFE, 0xF4])
PROBE_INSTRUCTIONS = 1 + PROBE_LOOPS + 1


def probe_instruction_count() -> int | None:
    """`insn_emulation`'s rise over the probe, in a scratch VM; None when it cannot run here."""
    load = layout.DEFAULT_LOAD_ADDR
    try:
        with Kvm() as kvm, kvm.create_vm() as vm:
            memory = GuestMemory.with_ram(layout.MEM_MIN)
            try:
                vm.set_tss_addr(layout.TSS_ADDR)
                memory.register(vm)
                memory.write(load, PROBE_CODE)
                vcpu = vm.create_vcpu(0)
                vcpu.set_sregs(x86.initial_sregs(vcpu.get_sregs(), "real", load))
                vcpu.set_regs(x86.initial_regs("real", load, load, 0, layout.MEM_MIN))
                with InsnCounter(vcpu) as counter:
                    before = counter.read()
                    if not isinstance(vcpu.run(), Hlt):
                        return None
                    return counter.read() - before
            finally:
                vm.close()  # the VM goes before the RAM it maps
                memory.close()
    except (KvmError, KeyError, OSError):
        return None


PROBE_EXITS = 1  # the probe's HLT: one return of KVM_RUN, which the kernel counts as a userspace exit
PROBE_HEADER_KEY = "insn_probe_exits"  # run metadata: KVM exits the probe made in this run (0: cached)
CACHE_FILE = "insn-probe.json"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def host_check(cache_dir: Path | None = None) -> dict:
    """Run metadata: {TRACE_HEADER_KEY: exact?, PROBE_HEADER_KEY: exits the probe made now}.

    The answer is a property of the running kernel, so it is kept per boot in `cache_dir` (the
    user's private runtime dir): a launch probes once per boot, and a trace that was probed says
    so, because the probe's one exit is a real KVM exit of the launch's process tree (perf
    counts it) that is not a guest exit and is not in the trace.
    """
    key = {"boot_id": _boot_id(), "kernel": os.uname().release}
    cache = cache_dir / CACHE_FILE if cache_dir is not None and key["boot_id"] else None
    if cache is not None:
        try:
            cached = json.loads(cache.read_text())
            if isinstance(cached, dict) and {k: cached.get(k) for k in key} == key \
                    and isinstance(cached.get("exact"), bool):
                return {TRACE_HEADER_KEY: cached["exact"], PROBE_HEADER_KEY: 0}
        except (OSError, ValueError):
            pass
    count = probe_instruction_count()
    exact = count == PROBE_INSTRUCTIONS
    if cache is not None:
        try:
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**key, "exact": exact}))
            os.replace(tmp, cache)
        except OSError:
            pass  # no cache: the next launch probes again
    return {TRACE_HEADER_KEY: exact, PROBE_HEADER_KEY: PROBE_EXITS if count is not None else 0}


@functools.cache
def counts_exactly() -> bool:
    """Whether `insn_emulation` counts every guest instruction on this host (probed once per process)."""
    return probe_instruction_count() == PROBE_INSTRUCTIONS
