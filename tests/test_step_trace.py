"""Step traces: `vmsup launch --step-trace` records one row per guest instruction, `vmtrace steps`
shows them disassembled with symbols, `vmtrace summary --steps` counts them per function.

Real KVM, the real CLIs in subprocesses, real trace files.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tracetool.step_schema import REGISTERS
from tracetool.trace import TraceReader
from vmworker import insn_counter

VMTRACE = [sys.executable, "-m", "tracetool"]
SEED_LOOP = [0x10002, 0x10004, 0x10005]  # out %ax,$0x10 ; inc %ax ; jmp loop1 (guest/seed16.S)


def vmtrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VMTRACE, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def launch(vmsup, tmp_path, *args: str, name: str = "t.vmtrace"):
    trace = tmp_path / name
    proc = vmsup("launch", *args, "--quiet", "--serial-in", "none", "--trace", str(trace))
    assert trace.exists(), proc.stderr
    return trace, proc


def step_batches(trace):
    with TraceReader(trace) as reader:
        return list(reader.step_batches()), reader.event_count


@pytest.mark.kvm
def test_seed_step_trace_cycles_through_the_loop_and_disassembles_to_out_inc_jmp(vmsup, tmp_path):
    trace, proc = launch(vmsup, tmp_path, "seed16", "--step-trace", "--steps", "50", "--max-exits", "100")
    assert proc.returncode == 0, proc.stderr
    batches, exits = step_batches(trace)
    assert exits == 100  # the exits keep being recorded, in their own stream
    assert sum(b.count for b in batches) == 50 and batches[-1].last
    addrs = [int(a) for b in batches for a in b.cols["addr"]]
    assert addrs[0] == 0x10000  # xor %ax,%ax
    assert addrs[1:] == (SEED_LOOP * 17)[:49]
    if insn_counter.counts_exactly():
        assert batches[-1].insn_emulation == 50  # KVM's own count of the instructions run meanwhile

    out = vmtrace("steps", str(trace), "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["seq"] for r in rows] == list(range(50))
    assert [r["insn"].split()[0] for r in rows[:7]] == ["xor", "out", "inc", "jmp", "out", "inc", "jmp"]
    assert {r["bits"] for r in rows} == {16}
    assert rows[0]["symbol"] == "_start" and rows[1]["symbol"] == "loop1"
    assert rows[1]["line"].startswith("seed16.S:")
    # The registers each instruction changed: inc counts AX up from 0, once per loop.
    incs = [r for r in rows if r["insn"].startswith("inc")]
    assert [r["changed"]["rax"] for r in incs] == list(range(1, len(incs) + 1))
    assert all(set(r["changed"]) <= set(REGISTERS) and "rip" in r["changed"] for r in rows)

    text = vmtrace("steps", str(trace), "-n", "4")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == 4 and "0x00010004 <loop1+0x2>" in lines[2] and "inc ax" in lines[2]


@pytest.mark.kvm
def test_step_window_runs_from_one_exit_to_another_and_the_vm_runs_on(vmsup, tmp_path):
    trace, proc = launch(vmsup, tmp_path, "seed16", "--step-trace", "--from-exit", "5", "--to-exit", "9",
                         "--max-exits", "40")
    assert proc.returncode == 0, proc.stderr
    batches, exits = step_batches(trace)
    assert exits == 40
    rows = [(int(a), bytes(i)) for b in batches for a, i in zip(b.cols["addr"], b.cols["insn"])]
    # After exit 5 (the out that wrote 5) the next instruction is the inc; the window ends at the
    # exit numbered 9: whole loops in between, whatever kicks took sequence numbers.
    assert rows[0][0] == 0x10004 and rows[0][1][:1] == b"\x40"
    assert [a for a, _ in rows] == (SEED_LOOP[1:] + SEED_LOOP * 10)[:len(rows)]
    assert len(rows) % 3 == 2 and 2 <= len(rows) <= 14
    assert batches[0].initial is not None and batches[0].initial[REGISTERS.index("rax")] == 5


@pytest.mark.kvm
def test_mbkernel_steps_resolve_to_its_c_functions_and_summary_counts_them(vmsup, tmp_path):
    trace, proc = launch(vmsup, tmp_path, "mbkernel", "--step-trace", "--steps", "3000", "--timeout", "2")
    batches, _ = step_batches(trace)
    assert sum(b.count for b in batches) == 3000
    out = vmtrace("steps", str(trace), "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {r["bits"] for r in rows} == {32}
    assert all(r["symbol"] for r in rows)
    functions = {r["symbol"].split("+")[0] for r in rows}
    assert functions <= {"_start", "kmain"} and "kmain" in functions
    assert any(r["line"] and r["line"].startswith("mbkernel.c:") for r in rows)

    summary = vmtrace("summary", "--steps", "--by", "symbol", "--json", str(trace))
    assert summary.returncode == 0, summary.stderr
    data = json.loads(summary.stdout)
    counts = {g["key"]: g["steps"] for g in data["groups"]}
    assert data["steps"] == 3000 and sum(counts.values()) == 3000
    assert counts["kmain"] == sum(1 for r in rows if r["symbol"].startswith("kmain"))
    table = vmtrace("summary", "--steps", str(trace))
    assert table.returncode == 0 and "kmain" in table.stdout


def test_step_trace_options_need_step_trace_and_exclude_each_other(vmsup):
    for args, words in ((("--steps", "5"), "--steps needs --step-trace"),
                        (("--step-trace", "--steps", "5", "--from-exit", "1"), "give one"),
                        (("--step-trace", "--from-exit", "9", "--to-exit", "3"), "is before"),
                        (("--step-trace", "--gdb", "1"), "give one")):
        proc = vmsup("launch", "seed16", "--max-exits", "5", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert words in proc.stderr and "Traceback" not in proc.stderr


def test_vmtrace_steps_on_a_trace_without_steps_says_so(vmsup, tmp_path):
    trace = tmp_path / "plain.vmtrace"
    proc = vmsup("launch", "seed16", "--max-exits", "5", "--quiet", "--trace", str(trace))
    if not trace.exists():
        pytest.skip(f"no KVM here: {proc.stderr.strip()}")
    out = vmtrace("steps", str(trace))
    assert out.returncode == 0 and out.stdout == ""
    assert "no step trace" in out.stderr
