"""P3: a fleet of seed guests saturating the machine, every exit recorded, no event lost.

    .venv/bin/python bench/bench_fleet.py [--seconds D] [--vms V]     # defaults: 60, 8

Runs, under the kernel's exact exit counters,
    perf stat -x, -e kvm:kvm_pio,kvm:kvm_userspace_exit -o bench/build/p3.perf -- \\
        vmsup launch seed16 --vms V --timeout D --trace bench/build/p3.vmtrace
(every VM ends with status timeout, exit code 4), then proves "events lost = 0" two ways:
  (a) sequence numbers: in every stream (vm, vcpu, epoch) of the trace the seq column is exactly
      0..n-1, the trace holds no gap record and the reader finds no unexplained hole (the vm-end
      record's final_seq included); and the seed guest's own counter (`out %ax, $0x10; inc %ax`)
      runs 0, 1, 2, … (mod 65536) through the io events of every VM without a hole;
  (b) the kernel: kvm_userspace_exit (every return of KVM_RUN, the ones a signal interrupted
      included; vmsup records those as reason intr) equals the trace's total events, and kvm_pio
      equals the trace's io events.
Printed: per-VM counts and rates, total events/s, the CPU time used against what the machine
has (saturation), and one verdict line per proof.

This is a benchmark, not a test: it exits non-zero only when something fails to run (a proof
that does not hold is a finding, printed as such).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchlib import BUILD_DIR, REPO, VMSUP, BenchError, check_prerequisites, fmt_rate, tail_of, trace_line

TRACE = BUILD_DIR / "p3.vmtrace"
PERF_OUT = BUILD_DIR / "p3.perf"
EVENTS = ("kvm:kvm_pio", "kvm:kvm_userspace_exit")
EXIT_TIMEOUT = 4  # vmsup's exit code when VMs end by --timeout
SEED_PORT = 0x10
REASON_IO, REASON_INTR = 2, 10  # KVM_EXIT_IO, KVM_EXIT_INTR (tracetool.schema)
COUNTER_MOD = 1 << 16  # the seed guest counts in %ax
# A summary table row: │ seed16-0 │ timeout │ 67587 │ 5.027 │ 13,445 │ 4 │
ROW_RE = re.compile(r"^\W*(\S+)\s*[│|]\s*(\S+)\s*[│|]\s*([\d,]+)\s*[│|]\s*([0-9.]+)\s*[│|]\s*([\d,]+)\s*[│|]\s*(\d+)")


@dataclass
class VmCheck:
    vm: int
    name: str = "?"
    status: str = "?"
    exits_reported: int | None = None  # the summary table / vm-end record
    events: int = 0
    io: int = 0
    intr: int = 0
    other: int = 0
    streams: int = 0
    seq_ok: bool = True
    seq_problem: str = ""
    counter_ok: bool = True
    counter_problem: str = ""
    span_s: float = 0.0
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.events / self.span_s if self.span_s > 0 else 0.0


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat: busy = total - idle - iowait."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - fields[3] - fields[4], total


def read_perf(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split(",")
        if len(fields) >= 3 and fields[2] in EVENTS:
            if not fields[0].isdigit():
                raise BenchError(f"perf could not count {fields[2]}: {fields[0]!r} (needs tracepoint access)")
            counts[fields[2]] = int(fields[0])
    missing = [e for e in EVENTS if e not in counts]
    if missing:
        raise BenchError(f"{path}: no count for {', '.join(missing)}:\n{tail_of(path.read_text())}")
    return counts


def summary_rows(stderr: str) -> dict[str, tuple[str, int]]:
    """{vm name: (status, exits)} from the launch's summary table."""
    rows = {}
    for line in stderr.splitlines():
        m = ROW_RE.match(line)
        if m and m.group(1) != "vm":
            rows[m.group(1)] = (m.group(2), int(m.group(3).replace(",", "")))
    return rows


def check_vm(reader, vm: int) -> VmCheck:
    """Proof (a) for one VM: seq 0..n-1 per stream, the guest's counter without a hole."""
    cols = reader.exits(vm=vm)
    check = VmCheck(vm)
    reason = cols["reason"]
    check.events = len(reason)
    check.io = int(np.count_nonzero(reason == REASON_IO))
    check.intr = int(np.count_nonzero(reason == REASON_INTR))
    check.other = check.events - check.io - check.intr
    if check.events:
        check.span_s = (int(cols["t_exit"].max()) - int(cols["t_exit"].min())) / 1e9
    keys = np.stack([cols["vcpu"].astype(np.uint64), cols["epoch"].astype(np.uint64)], axis=1)
    streams = np.unique(keys, axis=0) if len(keys) else np.empty((0, 2), np.uint64)
    check.streams = len(streams)
    for vcpu, epoch in streams.tolist():
        mask = (cols["vcpu"] == vcpu) & (cols["epoch"] == epoch)
        seq = cols["seq"][mask]
        expected = np.arange(len(seq), dtype=np.uint64)
        if not np.array_equal(seq, expected):
            bad = int(np.flatnonzero(seq != expected)[0])
            check.seq_ok = False
            check.seq_problem = (f"stream (vm {vm}, vcpu {vcpu}, epoch {epoch}): row {bad} has seq {int(seq[bad])}, "
                                 f"expected {bad}")
            break
        io = mask & (reason == REASON_IO)
        data, addr = cols["data"][io], cols["addr"][io]
        if np.any(addr != SEED_PORT):
            check.counter_ok = False
            check.counter_problem = f"vm {vm}: io events on ports other than {SEED_PORT:#x}"
            break
        want = np.arange(len(data), dtype=np.uint64) % np.uint64(COUNTER_MOD)
        if not np.array_equal(data, want):
            bad = int(np.flatnonzero(data != want)[0])
            check.counter_ok = False
            check.counter_problem = (f"stream (vm {vm}, vcpu {vcpu}, epoch {epoch}): io event {bad} carries "
                                     f"{int(data[bad])}, expected {int(want[bad])}: a hole in the guest's counter")
            break
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="--timeout of every VM (default 60)")
    parser.add_argument("--vms", type=int, default=8, help="VMs of seed16 (default 8)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.vms <= 0:
        parser.error("--seconds and --vms must be positive")

    try:
        check_prerequisites()
        if shutil.which("perf") is None:
            raise BenchError("no `perf` on PATH (linux-perf)")
        from tracetool.trace import TraceReader  # noqa: F401  (fail early if the reader is missing)
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        TRACE.unlink(missing_ok=True)  # vmsup refuses to overwrite a trace
        PERF_OUT.unlink(missing_ok=True)
        launch = [str(VMSUP), "launch", "seed16", "--vms", str(args.vms), "--timeout", f"{args.seconds:g}",
                  "--trace", str(TRACE.relative_to(REPO))]
        cmd = ["perf", "stat", "-x,", "-e", ",".join(EVENTS), "-o", str(PERF_OUT.relative_to(REPO)), "--", *launch]
        ncpu = os.cpu_count() or 1
        print(f"P3: {args.vms} VMs of seed16 for {args.seconds:g} s on {ncpu} CPUs "
              f"(load average {os.getloadavg()[0]:.2f} at start), every exit recorded")
        print(f"  {' '.join(cmd)}\n", flush=True)

        busy0, total0 = cpu_ticks()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        stdout, stderr = proc.communicate()
        wall = time.perf_counter() - t0
        busy1, total1 = cpu_ticks()
        machine_busy = (busy1 - busy0) / max(1, total1 - total0)
        # communicate() reaped perf, the only child: its CPU time and that of everything under it.
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = usage.ru_utime + usage.ru_stime
        # A VM that failed is a failed run (exit status 1 at the end), but its trace is still
        # checked: the proofs say whether what was recorded up to the failure is complete.
        failed = None
        if proc.returncode not in (0, EXIT_TIMEOUT):
            failed = f"`{' '.join(cmd)}` exited with {proc.returncode}"
            if not TRACE.is_file() or not PERF_OUT.is_file():
                raise BenchError(f"{failed}:\n{tail_of(stdout + stderr)}")
        table = summary_rows(stderr)
        tl = trace_line("vmsup launch", stderr)
        kernel = read_perf(PERF_OUT)

        with TraceReader(TRACE) as reader:
            vm_ends = {rec.get("vm"): rec for rec in reader.records("vm-end")}
            vm_ids = sorted({s.vm for s in reader.streams()} | set(vm_ends))
            checks = [check_vm(reader, vm) for vm in vm_ids]
            gap_records = reader.gaps
            unexplained = reader.unexplained_gaps
            total = reader.event_count
            span = reader.time_range
            size = reader.size
        for c in checks:
            rec = vm_ends.get(c.vm, {})
            c.name = rec.get("name") or "?"
            c.status = rec.get("status") or "(no vm-end)"
            c.detail = rec.get("detail") or ""
            row = table.get(c.name)
            c.exits_reported = row[1] if row else rec.get("exits")
    except BenchError as exc:
        print(f"bench_fleet: error: {exc}", file=sys.stderr)
        return 1

    header = (f"{'vm':>3}  {'name':<10}  {'status':<8}  {'exits':>10}  {'events':>10}  {'io':>10}  {'intr':>5}  "
              f"{'other':>5}  {'events/s':>9}  {'seq 0..n-1':>10}  {'counter':>8}")
    print(header)
    print("-" * len(header))
    for c in checks:
        print(f"{c.vm:>3}  {c.name:<10}  {c.status:<8}  {c.exits_reported if c.exits_reported is not None else '?':>10}  "
              f"{c.events:>10,}  {c.io:>10,}  {c.intr:>5}  {c.other:>5}  {fmt_rate(c.rate):>9}  "
              f"{'ok' if c.seq_ok else 'BROKEN':>10}  {'ok' if c.counter_ok else 'HOLE':>8}")
    io_total = sum(c.io for c in checks)
    span_s = (span[1] - span[0]) / 1e9 if span else 0.0
    print("-" * len(header))
    print(f"{'all':>3}  {'':<10}  {'':<8}  {sum(c.exits_reported or 0 for c in checks):>10}  {total:>10,}  "
          f"{io_total:>10,}  {sum(c.intr for c in checks):>5}  {sum(c.other for c in checks):>5}  "
          f"{fmt_rate(total / span_s if span_s else 0):>9}")
    print()
    print(f"total: {total:,} events in {span_s:.3f} s of trace time = {fmt_rate(total / span_s if span_s else 0)} events/s "
          f"(sum of per-VM rates {fmt_rate(sum(c.rate for c in checks))}/s); "
          f"trace {size:,} bytes = {size / total if total else 0:.3f} B/event")
    print(f"machine: {machine_busy * 100:.0f}% busy over the {wall:.1f} s wall time (all {ncpu} CPUs, /proc/stat, "
          f"start-up and teardown included); this fleet's own share (perf, vmsup, recorder, workers): "
          f"{cpu_s:.1f} CPU-s = {cpu_s / (wall * ncpu) * 100:.0f}%")
    print(f"vmsup's trace line: {tl.events:,} events in {tl.batches:,} batches, {tl.gaps} gaps ({tl.lost} events lost)")
    for c in checks:
        if c.status != "timeout":
            print(f"note: vm {c.vm} ({c.name}) ended with {c.status}: {c.detail}")
    print()

    seq_ok = all(c.seq_ok for c in checks) and not gap_records and not unexplained
    counter_ok = all(c.counter_ok for c in checks)
    for c in checks:
        for problem in (c.seq_problem, c.counter_problem):
            if problem:
                print(f"  problem: {problem}")
    for g in gap_records[:10]:
        print(f"  gap record: {g}")
    for d in unexplained[:10]:
        print(f"  unexplained: {d}")
    streams = sum(c.streams for c in checks)
    print(f"(a) sequence numbers: {streams} streams, seq 0..n-1 in "
          f"{sum(c.seq_ok for c in checks)}/{len(checks)} VMs, {len(gap_records)} gap records, "
          f"{len(unexplained)} unexplained holes; guest counter 0,1,2,... (mod 65536) without a hole in "
          f"{sum(c.counter_ok for c in checks)}/{len(checks)} VMs -> "
          f"{'events lost = 0' if seq_ok and counter_ok else 'EVENTS LOST'}")
    k_exit, k_pio = kernel["kvm:kvm_userspace_exit"], kernel["kvm:kvm_pio"]
    exit_eq, pio_eq = k_exit == total, k_pio == io_total
    print(f"(b) kernel: kvm_userspace_exit {k_exit:,} vs trace events {total:,} "
          f"({'equal' if exit_eq else f'differ by {total - k_exit:+,}'}); kvm_pio {k_pio:,} vs trace io events "
          f"{io_total:,} ({'equal' if pio_eq else f'differ by {io_total - k_pio:+,}'}) -> "
          f"{'events lost = 0' if exit_eq and pio_eq else 'COUNTS DO NOT MATCH THE KERNEL'}")
    verdict = seq_ok and counter_ok and exit_eq and pio_eq
    print(f"verdict (P3): events lost = 0 -> {'PROVEN both ways' if verdict else 'NOT PROVEN'}")
    if failed:
        print(f"bench_fleet: error: {failed}: not every VM ran for {args.seconds:g} s (see the notes above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
