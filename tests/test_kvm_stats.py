"""The kernel's own KVM counters (KVM_GET_STATS_FD) sampled into the trace, checked against the
exits the trace recorded, on real VMs of bundled guests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_vmsup
from tracetool import kvm_counters, schema
from tracetool.trace import TraceReader
from vmworker.kvm import Kvm

pytestmark = pytest.mark.kvm

# Counters this host gets wrong (PVM; the README says so): io_exits stays 0 during port I/O.
WRONG_HERE = {"io_exits"}


def vmtrace(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetool", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def launch(trace: Path, *args: str) -> None:
    proc = run_vmsup("launch", *args, "-q", "--trace", str(trace), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


def recorded(trace: Path) -> dict:
    """(vm, vcpu) → {reason name: exits} of the trace."""
    out: dict = {}
    with TraceReader(trace) as r:
        for batch in r.exit_batches():
            acc = out.setdefault((batch.vm, batch.vcpu), {})
            for code in batch.columns["reason"].tolist():
                name = schema.reason_name(code)
                acc[name] = acc.get(name, 0) + 1
    return out


def final_counters(trace: Path) -> dict:
    with TraceReader(trace) as r:
        streams = kvm_counters.from_trace(r)
    assert all(s.ended for s in streams.by_key.values())
    return {(vm, vcpu): s.current for (vm, _, vcpu), s in streams.by_key.items()}


def test_vm_and_vcpu_stats_fds_give_the_kernels_counter_names():
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm_stats = vm.stats()
        vcpu_stats = vm.create_vcpu(0).stats()
        try:
            assert {"exits", "halt_exits", "irq_injections", "insn_emulation"} <= set(vcpu_stats.counter_names)
            assert "remote_tlb_flush" in vm_stats.counter_names
            # histograms are not single counters
            assert not any(name.endswith("_hist") for name in vcpu_stats.counter_names)
            assert set(vcpu_stats.read_counters()) == set(vcpu_stats.counter_names)
        finally:
            vm_stats.close()
            vcpu_stats.close()


def test_mbkernel_timer_ticks_match_the_kernels_halt_and_interrupt_counters(tmp_path):
    trace = tmp_path / "mb.vmtrace"
    launch(trace, "mbkernel", "--cmdline", "maxticks=100", "--stats-interval", "0.25")
    console = vmtrace("console", trace)
    ticks = int(re.search(r"ticks: (\d+)", console.stdout).group(1))
    assert ticks == 100
    final = final_counters(trace)
    assert set(final) == {(0, kvm_counters.VM_STREAM), (0, 0)}
    vcpu = final[(0, 0)]
    user = sum(recorded(trace)[(0, 0)].values())
    # Every exit that reached user space is one of the kernel's exits; HLT and the PIT's
    # interrupts stayed in the kernel (in-kernel irqchip).
    assert vcpu["exits"] >= user + vcpu["halt_exits"]
    assert vcpu["irq_injections"] == ticks
    assert 0.8 * ticks <= vcpu["halt_exits"] <= ticks + 1
    assert 0.8 * ticks <= vcpu["halt_wakeup"] <= ticks + 1
    with TraceReader(trace) as r:
        samples = [rec for rec in r.records(schema.MSG_KVM_STATS) if rec["vcpu"] == 0]
    assert len(samples) >= 3  # the baseline, one or more every 0.25 s, the last
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)


@pytest.mark.parametrize("guest, reason, counter", [("seed16", "io", "io_exits"), ("mmio", "mmio", "mmio_exits")])
def test_exit_counters_against_the_recorded_exits(tmp_path, guest, reason, counter):
    trace = tmp_path / "t.vmtrace"
    launch(trace, guest, "--max-exits", "2000")
    vcpu = final_counters(trace)[(0, 0)]
    by_reason = recorded(trace)[(0, 0)]
    assert vcpu["exits"] >= sum(by_reason.values())  # no irqchip: every exit reaches user space
    if counter in WRONG_HERE:
        assert vcpu[counter] in (0, by_reason[reason]), "the README's note on this counter is out of date"
    else:
        assert vcpu[counter] == by_reason[reason]


def test_stats_interval_0_writes_no_counters(tmp_path):
    trace = tmp_path / "off.vmtrace"
    launch(trace, "seed16", "--max-exits", "100", "--stats-interval", "0")
    with TraceReader(trace) as r:
        assert r.records(schema.MSG_KVM_STATS) == []
    proc = vmtrace("kvm-stats", trace)
    assert proc.returncode == 0 and "no kvm-stats records" in proc.stdout


def test_vmtrace_kvm_stats_deltas_add_up_and_sit_beside_the_recorded_exits(tmp_path):
    trace = tmp_path / "mb.vmtrace"
    launch(trace, "mbkernel", "--cmdline", "maxticks=60", "--stats-interval", "0.2")
    proc = vmtrace("kvm-stats", trace, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    streams = {s["vcpu"]: s for s in data["streams"]}
    vcpu = streams[0]
    assert vcpu["name"] == "mbkernel" and vcpu["ended"]
    assert sum(iv["recorded"] for iv in vcpu["intervals"]) == vcpu["recorded_exits"] == sum(
        recorded(trace)[(0, 0)].values())
    for name in ("exits", "halt_exits", "irq_injections", "insn_emulation"):
        # the baseline is taken before the vCPU first runs: the deltas add up to the final count
        assert sum(iv["deltas"].get(name, 0) for iv in vcpu["intervals"]) == vcpu["final"][name], name
    assert streams[kvm_counters.VM_STREAM]["recorded_exits"] is None
    table = vmtrace("kvm-stats", trace, "--vm", "0")
    assert table.returncode == 0, table.stderr
    assert "vcpu 0" in table.stdout and "halt_exits" in table.stdout and "recorded" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 100


def test_sql_has_the_counters_as_a_table(tmp_path):
    pytest.importorskip("duckdb", reason="the sql extra (duckdb) is not installed")
    trace = tmp_path / "mb.vmtrace"
    launch(trace, "mbkernel", "--cmdline", "maxticks=30", "--stats-interval", "0.2")
    proc = vmtrace("sql", "SELECT vcpu, max(value) AS v FROM kvm_stats WHERE name = 'irq_injections' GROUP BY vcpu",
                   trace, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"vcpu": 0, "v": 30}]


# --- vmsup top: the kernel's counters beside vmsup's exits ---------------------------------------
from test_live_views import T0, bus, io_out  # noqa: E402,F401  (the live-bus fixture: a real socket, a real top)

from tracetool import messages  # noqa: E402


def test_top_shows_the_kernels_exits_beside_vmsups_and_those_it_handled_itself(bus):  # noqa: F811
    b = bus()
    top = b.attach("top", "--once", "--json", "--interval", "60")
    b.vm_start(0, "mbkernel")
    batcher = b.batcher()
    b.send(messages.KvmStats(vm=0, epoch=0, vcpu=-1, t=T0 - 1, values={"remote_tlb_flush": 0}).to_msg())
    b.send(messages.KvmStats(vm=0, epoch=0, vcpu=0, t=T0 - 1, values={"exits": 0, "halt_exits": 0,
                                                                      "irq_injections": 0, "io_exits": 0}).to_msg())
    b.emit(batcher, [io_out(i) for i in range(5)])
    # 5 exits reached vmsup; the kernel saw 12: 7 HLTs it handled itself, 7 timer interrupts injected
    b.send(messages.KvmStats(vm=0, epoch=0, vcpu=0, t=T0 - 1 + 10**9,
                             values={"exits": 12, "halt_exits": 7, "irq_injections": 7}, last=True).to_msg())
    b.vm_end(0, [batcher.next_seq])
    rc, out, err = b.finish(top)
    assert rc == 0, err
    vm = json.loads(out)["vms"][0]
    assert vm["total"] == 5
    k = vm["kernel"]
    assert {name: k[name]["total"] for name in k} == {"exits": 12, "in_kernel": 7, "halt_exits": 7, "irq_injections": 7}
    assert k["exits"]["rate"] == 12.0 and k["halt_exits"]["rate"] == 7.0 and k["in_kernel"]["rate"] == 7.0


def test_top_lines_a_sample_up_with_the_exits_before_it(bus):  # noqa: F811
    """A sample is compared with the exits up to its own time, not with later batches."""
    b = bus()
    top = b.attach("top", "--once", "--json", "--interval", "60")
    b.vm_start(0, "mbkernel")
    batcher = b.batcher()
    b.emit(batcher, [io_out(i) for i in range(4)])  # t_exit: see io_out (ascending from its index)
    t_after_two = (io_out(1)[0] + io_out(2)[0]) // 2
    b.send(messages.KvmStats(vm=0, epoch=0, vcpu=0, t=t_after_two, values={"exits": 9}).to_msg())
    b.emit(batcher, [io_out(i) for i in range(4, 8)])
    b.send(messages.KvmStats(vm=0, epoch=0, vcpu=0, t=T0 + 10**6, values={"exits": 18}).to_msg())  # waits for the end
    b.vm_end(0, [batcher.next_seq])
    rc, out, err = b.finish(top)
    assert rc == 0, err
    k = json.loads(out)["vms"][0]["kernel"]
    assert k["exits"]["total"] == 18 and k["in_kernel"]["total"] == 18 - 8  # the last sample, lined up at the end
    assert k["in_kernel"]["rate"] == round(((18 - 8) - (9 - 2)) / ((T0 + 10**6 - t_after_two) / 1e9), 1)


def test_top_table_has_the_kernel_rows(bus):  # noqa: F811
    b = bus()
    top = b.attach("top", "--once", "--interval", "60")
    b.vm_start(0, "mbkernel")
    batcher = b.batcher()
    b.emit(batcher, [io_out(i) for i in range(3)])
    b.send(messages.KvmStats(vm=0, epoch=0, vcpu=0, t=T0 + 10**6, values={"exits": 10, "halt_exits": 4,
                                                                  "irq_injections": 4}).to_msg())
    b.vm_end(0, [batcher.next_seq])
    rc, out, err = b.finish(top)
    assert rc == 0, err
    assert re.search(r"kernel: exits\s*│\s*10\b", out) and re.search(r"kernel: in-kernel exits\s*│\s*7\b", out), out
    assert "kernel: halt_exits" in out and "kernel: irq_injections" in out


def test_a_long_runs_counters_do_not_count_against_the_records_a_reader_keeps(tmp_path, monkeypatch):
    """Samples every second add up over a long fleet run; opening the trace keeps none of them in
    memory (they are read when asked for), so they never hit the reader's record budget."""
    from tracetool.trace import TraceWriter, scan as trace_scan
    from test_trace_file import RUN
    path = tmp_path / "long.vmtrace"
    counters = {f"counter_{i:02d}": i for i in range(40)}
    with TraceWriter(path, RUN) as w:
        w.write_record(schema.MSG_VM_START, {"vm": 0, "epoch": 0, "name": "long", "t": 1})
        for i in range(400):
            w.write_record(schema.MSG_KVM_STATS, {"vm": 0, "epoch": 0, "vcpu": 0, "t": 2 + i,
                                                  "values": {k: v + i for k, v in counters.items()}})
    monkeypatch.setattr(trace_scan, "MAX_RECORDS_TOTAL", 64 << 10)  # far less than 400 samples
    with TraceReader(path) as r:
        assert [rec["name"] for rec in r.records(schema.MSG_VM_START)] == ["long"]
        samples = r.records(schema.MSG_KVM_STATS)
        assert len(samples) == 400 and samples[-1]["values"]["counter_39"] == 39 + 399
        assert [b.record["t"] for b in r.blocks() if b.kind == schema.MSG_KVM_STATS][:2] == [2, 3]
        assert r.closed_cleanly and not r.warnings
