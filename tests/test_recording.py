"""The recording path end to end: vmsup launch → workers → recorder → trace file.

Real VMs, real processes, real ZeroMQ sockets, real files. The kernel is the oracle: perf's
kvm tracepoints count every exit of the launched VMs, and the trace must agree exactly.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from tests.conftest import REPO, VMSUP
from vmworker import insn_counter
from tracetool import schema
from tracetool.trace import TraceReader

pytestmark = pytest.mark.kvm


def launch(vmsup, tmp_path: Path, *args: str, name: str = "t.vmtrace", **kw):
    trace = tmp_path / name
    proc = vmsup("launch", *args, "--trace", str(trace), **kw)
    return proc, trace


def assert_counts_up_from_zero(values: np.ndarray, modulo: int = 1 << 16) -> None:
    expected = np.arange(len(values), dtype=np.uint64) % modulo
    assert np.array_equal(values.astype(np.uint64), expected)


def test_seed_guest_trace_holds_every_exit_in_order(vmsup, tmp_path):
    proc, trace = launch(vmsup, tmp_path, "seed16", "--max-exits", "5000", "-q")
    assert proc.returncode == 0, proc.stderr
    assert f"trace {trace}: 5000 events" in proc.stderr
    with TraceReader(trace) as r:
        ev = r.exits()
        assert r.torn_tail is None
        assert r.gaps == [] and r.unexplained_gaps == []
        assert len(ev["seq"]) == 5000
        assert np.array_equal(ev["seq"], np.arange(5000))
        assert set(ev["reason"].tolist()) == {schema.REASON_CODES["io"]}
        assert set(ev["addr"].tolist()) == {0x10} and set(ev["size"].tolist()) == {2}
        assert set(ev["flags"].tolist()) == {schema.FLAG_WRITE}
        assert_counts_up_from_zero(ev["data"])
        assert np.all(np.diff(ev["t_exit"]) > 0) and np.all(ev["guest_ns"] > 0)
        start, = r.records(schema.MSG_VM_START)
        end, = r.records(schema.MSG_VM_END)
    assert start["sha256"] == __import__("hashlib").sha256((REPO / "guest/seed16.bin").read_bytes()).hexdigest()
    assert start["mode"] == "real" and start["vcpus"] == 1 and start["name"] == "seed16"
    assert end["status"] == "max-exits" and end["final_seq"] == [5000]


def test_several_vms_each_count_from_zero_without_a_gap(vmsup, tmp_path):
    proc, trace = launch(vmsup, tmp_path, "seed16", "--vms", "3", "--max-exits", "3000")
    assert proc.returncode == 0, proc.stderr
    with TraceReader(trace) as r:
        assert r.gaps == [] and r.unexplained_gaps == []
        names = {rec["vm"]: rec["name"] for rec in r.records(schema.MSG_VM_START)}
        assert names == {0: "seed16-0", 1: "seed16-1", 2: "seed16-2"}
        for vm in range(3):
            ev = r.exits(vm=vm)
            assert np.array_equal(ev["seq"], np.arange(len(ev["seq"])))
            io = ev["reason"] == schema.REASON_CODES["io"]
            assert int(io.sum()) == 3000  # plus, possibly, a kick that flushed a quiet vCPU (reason intr)
            assert_counts_up_from_zero(ev["data"][io])
    for name in ("seed16-0", "seed16-1", "seed16-2"):
        assert re.search(rf"{name}\s.*max-exits\s.*3000", proc.stderr)


def _perf_counts(output: str) -> dict[str, int]:
    counts = {}
    for line in output.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2].startswith("kvm:"):
            counts[parts[2]] = int(parts[0])
    return counts


def _perf_usable() -> str | None:
    if shutil.which("perf") is None:
        return "perf (linux-perf) is not installed"
    probe = subprocess.run(["perf", "stat", "-x,", "-e", "kvm:kvm_userspace_exit", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"perf cannot count kvm tracepoints here: {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture
def perf():
    reason = _perf_usable()
    if reason:
        if os.environ.get("VMSUP_REQUIRE_KVM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.parametrize("args", [
    ("mmioflood", "-q"),  # MMIO and port I/O
    ("seed16", "--vms", "2", "--max-exits", "20000"),  # two VMs
    ("seed16", "--timeout", "1", "-q"),  # ends with a kick: KVM_RUN returns EINTR once
    ("smp", "-q"),  # four vCPUs
])
def test_trace_counts_match_the_kernels_exactly(perf, tmp_path, args):
    trace = tmp_path / "k.vmtrace"
    proc = subprocess.run(["perf", "stat", "-x,", "-e", "kvm:kvm_pio,kvm:kvm_mmio,kvm:kvm_userspace_exit", "--",
                           *VMSUP, "launch", *args, "--trace", str(trace)],
                          cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode in (0, 4), proc.stderr  # 4: the --timeout case
    kernel = _perf_counts(proc.stderr)
    with TraceReader(trace) as r:
        ev = r.exits()
        assert r.gaps == []
    # The launch's instruction-counter probe (once per boot, cached) makes one KVM exit of its own,
    # and the trace says how many.
    with TraceReader(trace) as r:
        probe_exits = r.run[insn_counter.PROBE_HEADER_KEY]
    assert len(ev["seq"]) + probe_exits == kernel["kvm:kvm_userspace_exit"]
    assert int(np.sum(ev["reason"] == schema.REASON_CODES["io"])) == kernel["kvm:kvm_pio"]
    assert int(np.sum(ev["reason"] == schema.REASON_CODES["mmio"])) == kernel["kvm:kvm_mmio"]


def test_record_only_keeps_matching_exits_with_their_sequence_numbers(vmsup, tmp_path):
    proc, trace = launch(vmsup, tmp_path, "hello", "-q", "--record-only", "reason=io,port=0x3f8")
    assert proc.returncode == 0, proc.stderr
    with TraceReader(trace) as r:
        ev = r.exits()
        assert r.gaps == [] and r.unexplained_gaps == []
        end, = r.records(schema.MSG_VM_END)
    text = bytes(int(v) for v in ev["data"])
    assert text == b"Hello from vmsup!\n"
    assert set(ev["addr"].tolist()) == {0x3F8}
    # Every other exit (the LSR polls, the HLT) was filtered, so sequence numbers skip them.
    assert np.all(np.diff(ev["seq"]) >= 2)
    assert end["filtered_out"] == end["exits"] - len(text)


def test_record_only_keeps_each_kept_exits_handling_time(vmsup, tmp_path):
    """The filter knows the next exit's entry time even when it drops that exit: every kept UART
    write has its handling time, and summary counts it (it once said 0.000000 s)."""
    proc, trace = launch(vmsup, tmp_path, "hello", "-q", "--record-only", "reason=io,port=0x3f8")
    assert proc.returncode == 0, proc.stderr
    shown = subprocess.run([sys.executable, "-m", "tracetool", "show", str(trace), "--json"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    events = [json.loads(line) for line in shown.stdout.splitlines()]
    assert len(events) == len(b"Hello from vmsup!\n")
    assert all(e["handle_ns"] is not None and e["handle_ns"] > 0 for e in events), events
    summary = subprocess.run([sys.executable, "-m", "tracetool", "summary", str(trace), "--json"],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert json.loads(summary.stdout)["handle_total_ns"] == sum(e["handle_ns"] for e in events)


def test_bad_record_filter_is_one_line(vmsup, tmp_path):
    proc, trace = launch(vmsup, tmp_path, "hello", "-q", "--record-only", "colour=blue")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("vmsup: error: --record-only")
    assert not trace.exists()


def test_unwritable_trace_path_is_refused_before_any_vm_starts(vmsup, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = vmsup("launch", "seed16", "--max-exits", "10", "--trace", str(blocker / "x.vmtrace"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("vmsup: error:") and proc.stderr.count("\n") == 1
    assert "out port" not in proc.stdout  # no VM ran


def test_disk_full_stops_recording_and_keeps_the_file_readable(tmp_path):
    trace = tmp_path / "full.vmtrace"

    def small_disk():
        # A file-size limit behaves like a full disk (EFBIG instead of ENOSPC) for the recorder.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (250_000, 250_000))

    proc = subprocess.run([*VMSUP, "launch", "seed16", "--max-exits", "300000", "-q", "--trace", str(trace)],
                          cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, preexec_fn=small_disk,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr  # the VM itself is fine
    assert "recording stopped" in proc.stderr
    assert "Traceback" not in proc.stderr
    with TraceReader(trace) as r:
        ev = r.exits()
    assert 0 < len(ev["seq"]) < 300000
    assert np.array_equal(ev["seq"], np.arange(len(ev["seq"])))


def _wait_for_run_dir(xdg: Path, deadline: float) -> Path:
    while time.monotonic() < deadline:
        for info in xdg.glob("vmsup/*/run.json"):
            if (info.parent / "events.sock").exists():
                return info.parent
        time.sleep(0.05)
    raise AssertionError("the launch's run dir never appeared")


def test_malformed_bus_messages_are_counted_and_dropped(tmp_path):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    trace = tmp_path / "m.vmtrace"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(xdg)}
    proc = subprocess.Popen([*VMSUP, "launch", "seed16", "--timeout", "3", "-q", "--trace", str(trace)], cwd=REPO,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = _wait_for_run_dir(xdg, time.monotonic() + 30)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{run_dir / 'events.sock'}")
    good_cols = schema.columns_from_rows(b"\0" * schema.ROW_SIZE, 1)
    hostile = [
        b"\xc1 not msgpack",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 99, "type": "exits"}),
        msgpack.packb({"v": schema.SCHEMA_VERSION, "type": "teleport"}),
        msgpack.packb({"v": schema.SCHEMA_VERSION, "type": "exits", "vm": 7, "vcpu": 0, "epoch": 0,
                       "first_seq": 0, "count": 5, "cols": good_cols}),  # columns hold 1 row, not 5
        msgpack.packb({"v": schema.SCHEMA_VERSION, "type": "exits", "vm": -1, "vcpu": 0, "epoch": 0,
                       "first_seq": 0, "count": 1, "cols": good_cols}),
        msgpack.packb({"v": schema.SCHEMA_VERSION, "type": "exits", "vm": 7, "vcpu": 0, "epoch": 0,
                       "first_seq": 0, "count": 1, "cols": {**good_cols, "reason": b"\x02\x02"}}),
        b"\x92" * 100000,  # deep nesting
    ]
    for raw in hostile:
        push.send(raw)
    push.close(linger=2000)
    ctx.term()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err  # the VM timed out as asked: the recorder did not fall over
    assert f"{len(hostile)} malformed messages dropped" in err
    with TraceReader(trace) as r:
        ev = r.exits()
        assert r.gaps == []
        assert {int(v) for v in np.unique(ev["vm"])} == {0}
    io = ev["reason"] == schema.REASON_CODES["io"]
    assert_counts_up_from_zero(ev["data"][io])
