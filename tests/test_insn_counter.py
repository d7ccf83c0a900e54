"""The guest-instruction counter (vmworker.insn_counter) counts exactly on this host.

Real KVM: a scratch real-mode guest with loops of known length between port writes; the
counter's rise between exits must equal the instructions executed.
"""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tracetool.trace import TraceReader
from vmworker import insn_counter, layout, x86
from vmworker.exits import Hlt, IoOut
from vmworker.kvm import Kvm
from vmworker.memory import GuestMemory

pytestmark = pytest.mark.kvm

LOAD = layout.DEFAULT_LOAD_ADDR
MEM = layout.MEM_MIN


def loop_then_out(loops: int) -> bytes:
    """mov $loops,%cx ; 1: loop 1b ; out %al,$0x10  — 1 + loops + 1 instructions."""
    return bytes([0xB9]) + loops.to_bytes(2, "little") + bytes([0xE2, 0xFE, 0xE6, 0x10])


def test_start_up_check_says_the_counter_is_exact_on_this_host():
    assert insn_counter.probe_instruction_count() == insn_counter.PROBE_INSTRUCTIONS
    assert insn_counter.counts_exactly() is True


def test_counter_rise_between_exits_equals_the_instructions_run():
    loops = (500, 3, 1234)
    code = b"".join(loop_then_out(n) for n in loops) + bytes([0xF4])  # ... ; hlt
    with Kvm() as kvm, kvm.create_vm() as vm:
        memory = GuestMemory.with_ram(MEM)
        try:
            vm.set_tss_addr(layout.TSS_ADDR)
            memory.register(vm)
            memory.write(LOAD, code)
            vcpu = vm.create_vcpu(0)
            vcpu.set_sregs(x86.initial_sregs(vcpu.get_sregs(), "real", LOAD))
            vcpu.set_regs(x86.initial_regs("real", LOAD, LOAD, 0, MEM))
            with insn_counter.InsnCounter(vcpu) as counter:
                readings = [counter.read()]
                exits = []
                for _ in range(len(loops) + 1):
                    exits.append(vcpu.run())
                    readings.append(counter.read())
        finally:
            vm.close()
            memory.close()
    assert [type(e) for e in exits] == [IoOut] * len(loops) + [Hlt]
    deltas = [b - a for a, b in zip(readings, readings[1:])]
    assert deltas == [1 + n + 1 for n in loops] + [1]  # the last exit: the hlt alone


def test_trace_header_records_whether_the_counter_is_exact(vmsup, tmp_path):
    trace = tmp_path / "t.vmtrace"
    proc = vmsup("launch", "seed16", "--max-exits", "100", "-q", "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    with TraceReader(trace) as r:
        assert r.header["run"][insn_counter.TRACE_HEADER_KEY] is True
    info = subprocess.run([sys.executable, "-m", "tracetool", "info", str(trace)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert info.returncode == 0, info.stderr
    assert re.search(rf"{insn_counter.TRACE_HEADER_KEY}\s*[│:]\s*True", info.stdout), info.stdout
