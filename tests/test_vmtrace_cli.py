"""`vmtrace info` and `vmtrace show`, run as real subprocesses on traces written by TraceWriter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_trace_file import RUN, block_offsets, cut_footer, seed_like_columns
from tracetool import schema
from tracetool.trace import MAGIC, TraceReader, TraceWriter

REPO = Path(__file__).resolve().parent.parent
VMTRACE = [sys.executable, "-m", "tracetool"]
EXIT_BAD_INPUT = 2
MMIO_BASE = 0xD0000000


def vmtrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VMTRACE, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=REPO)


def assert_one_error_line(proc, *fragments: str) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmtrace: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.stdout == ""
    assert proc.returncode == EXIT_BAD_INPUT


def mmio_columns(n: int, rng, t0: int) -> dict[str, np.ndarray]:
    """A guest polling an MMIO device: alternating 4-byte writes and reads, one hlt at the end."""
    cols = seed_like_columns(n, rng, t0=t0)
    cols["reason"][:] = schema.REASON_MMIO
    cols["addr"][:] = MMIO_BASE + 4 * (np.arange(n) % 2)
    cols["flags"][:] = (np.arange(n) + 1) % 2
    cols["size"][:] = 4
    cols["reason"][-1], cols["addr"][-1], cols["size"][-1], cols["flags"][-1], cols["data"][-1] = schema.REASON_HLT, 0, 0, 0, 0
    return cols


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    """Two VMs over the same second: seed16 (1 vCPU) and an MMIO guest (2 vCPUs), with a recorded
    gap on vm 1 vcpu 1 and an unexplained one on vm 1 vcpu 0."""
    path = tmp_path_factory.mktemp("cli") / "run.vmtrace"
    rng = np.random.default_rng(42)
    t0 = 5 * 10**12
    with TraceWriter(path, RUN, block_events=1000) as w:
        w.write_record(schema.MSG_VM_START, {"vm": 0, "epoch": 0, "name": "seed16", "spec": {"mem": "16M"},
                                             "sha256": "5eed" * 16, "vcpus": 1, "t": t0})
        w.write_record(schema.MSG_VM_START, {"vm": 1, "epoch": 0, "name": "mmio", "spec": {"mem": "16M", "vcpus": 2},
                                             "sha256": "beef" * 16, "vcpus": 2, "t": t0})
        seed = seed_like_columns(3000, rng, t0=t0)
        mm = {vcpu: mmio_columns(1000, rng, t0 + 1000 + vcpu) for vcpu in (0, 1)}
        for i in range(0, 3000, 300):
            w.write_exits(0, 0, 0, i, 300, {k: v[i:i + 300] for k, v in seed.items()})
            j = i // 3
            for vcpu in (0, 1):
                if vcpu == 0 and 200 <= j < 300:
                    continue  # lost without a gap record: unexplained
                if vcpu == 1 and 500 <= j < 600:
                    if j == 500:
                        w.write_record(schema.MSG_GAP, {"vm": 1, "vcpu": 1, "epoch": 0, "first_missing": 500,
                                                        "count": 100, "cause": "recorder queue full"})
                    continue
                w.write_exits(1, vcpu, 0, j, 100, {k: v[j:j + 100] for k, v in mm[vcpu].items()})
        w.write_record(schema.MSG_VM_END, {"vm": 0, "epoch": 0, "status": "max-exits", "exits": 3000,
                                           "final_seq": {0: 3000}, "t": t0 + 10**9})
        w.write_record(schema.MSG_VM_END, {"vm": 1, "epoch": 0, "status": "halted", "exits": 2000,
                                           "final_seq": {0: 1000, 1: 1000}, "t": t0 + 10**9})
    return path


def test_info_shows_vms_streams_reasons_and_gaps(trace):
    proc = vmtrace("info", trace)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    for words in ("closed cleanly", "seed16", "max-exits", "mmio", "halted", "5eed5eed", "Streams",
                  "Gaps (recorded)", "recorder queue full", "Gaps (unexplained)", "bytes/event",
                  "4800 events", "test-run"):
        assert words in out, words


def test_info_json_is_the_same_with_or_without_the_footer(trace, tmp_path):
    proc = vmtrace("info", trace, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["file"]["closed_cleanly"] and info["file"]["torn_tail"] is None
    assert info["run"] == RUN
    assert info["events"]["total"] == 4800
    by_vm = {e["vm"]: e["by_reason"] for e in info["events"]["by_vm"]}
    assert by_vm == {0: {"io": 3000}, 1: {"hlt": 2, "mmio": 1798}}
    assert [(s["vm"], s["vcpu"], s["events"], s["first_seq"], s["last_seq"]) for s in info["streams"]] == [
        (0, 0, 3000, 0, 2999), (1, 0, 900, 0, 999), (1, 1, 900, 0, 999)]
    assert [(v["name"], v["status"], v["sha256"]) for v in info["vms"]] == [
        ("seed16", "max-exits", "5eed" * 16), ("mmio", "halted", "beef" * 16)]
    assert [(g["vcpu"], g["first_missing"], g["count"]) for g in info["gaps"]["recorded"]] == [(1, 500, 100)]
    assert [(g["vm"], g["vcpu"], g["first_seq"], g["count"]) for g in info["gaps"]["unexplained"]] == [(1, 0, 200, 100)]
    assert info["bytes_per_event"] == pytest.approx(trace.stat().st_size / 4800)
    assert 0.01 < info["time"]["span_s"] < 0.1

    crashed = tmp_path / "crashed.vmtrace"
    crashed.write_bytes(trace.read_bytes())
    cut_footer(crashed)
    again = json.loads(vmtrace("info", crashed, "--json").stdout)
    assert not again["file"]["closed_cleanly"]
    for key in ("events", "streams", "vms", "gaps", "time"):
        assert again[key] == info[key], key


def test_show_prints_one_line_per_event_in_the_seed_format(tmp_path):
    path = tmp_path / "two.vmtrace"
    cols = {name: np.zeros(2, schema.COLUMN_DTYPES[name]) for name in schema.COLUMN_NAMES}
    cols.update(t_exit=np.array([10**9, 10**9 + 123456]), guest_ns=np.array([5100, 5000]), addr=np.array([0x10, 0x10]),
                data=np.array([0x11, 0x12]), count=np.ones(2, np.uint32), reason=np.full(2, schema.REASON_IO),
                size=np.full(2, 2), flags=np.full(2, schema.FLAG_WRITE),
                rip=np.full(2, schema.RIP_UNKNOWN, np.uint64))  # no address: the line has no rip= part
    with TraceWriter(path, RUN) as w:
        w.write_exits(0, 0, 0, 16, 2, cols)
    proc = vmtrace("show", path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines() == [
        "t=+0.000000000 vm=0 vcpu=0 seq=16 io out port=0x10 size=2 data=0x11 guest=5.1us handle=118.5us",
        "t=+0.000123456 vm=0 vcpu=0 seq=17 io out port=0x10 size=2 data=0x12 guest=5.0us handle=-",
    ]


def test_show_merges_streams_in_time_order(trace):
    proc = vmtrace("show", trace)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4800
    times = [int(line.split()[0][3:].replace(".", "")) for line in lines]
    assert times == sorted(times)
    streams = {tuple(line.split()[1:3]) for line in lines[:50]}
    assert streams == {("vm=0", "vcpu=0"), ("vm=1", "vcpu=0"), ("vm=1", "vcpu=1")}  # interleaved, not one after the other
    assert any(" mmio write addr=0xd0000000 size=4 " in line for line in lines)
    assert any(" mmio read addr=0xd0000004 size=4 " in line for line in lines)
    assert sum(line.split()[4] == "hlt" for line in lines) == 2


def test_show_filters_and_limits(trace):
    proc = vmtrace("show", trace, "--vm", "1", "--vcpu", "1", "--addr", "0xd0000004", "-n", "7")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 7
    assert all(" vm=1 vcpu=1 " in line and "mmio read addr=0xd0000004" in line for line in lines)

    proc = vmtrace("show", trace, "--reason", "hlt|io", "--filter", "vm=0|1")
    lines = proc.stdout.splitlines()
    assert len(lines) == 3002 and all(" io out " in line or " hlt " in line for line in lines)


def test_show_json_has_one_object_per_event_matching_the_reader(trace):
    proc = vmtrace("show", trace, "--json", "--port", "0x10", "--limit", "100")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    with TraceReader(trace) as r:
        want = r.exits(vm=0)
    assert [e["seq"] for e in events] == want["seq"][:100].tolist()
    assert [e["t_exit_ns"] for e in events] == want["t_exit"][:100].tolist()
    first, second = events[0], events[1]
    assert first["reason"] == "io" and first["addr"] == 0x10 and first["write"] and first["size"] == 2
    assert first["handle_ns"] == (second["t_exit_ns"] - second["guest_ns"]) - first["t_exit_ns"]


def test_a_torn_tail_gives_a_warning_and_the_readable_part(trace, tmp_path):
    torn = tmp_path / "torn.vmtrace"
    raw = trace.read_bytes()
    exits = [o for o, t, _ in block_offsets(trace) if t == 1]
    torn.write_bytes(raw[:exits[-1] + 40])  # cut inside the last exit block
    proc = vmtrace("show", torn)
    assert proc.returncode == 0
    assert proc.stderr.startswith("vmtrace: warning: ") and f"torn tail at offset {exits[-1]}" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    with TraceReader(torn) as r:
        readable = r.exits()
    assert len(readable["seq"]) < 4800
    shown = sorted(tuple(line.split()[i] for i in (1, 2, 3)) for line in proc.stdout.splitlines())
    assert shown == sorted((f"vm={vm}", f"vcpu={vcpu}", f"seq={seq}") for vm, vcpu, seq in
                           zip(readable["vm"].tolist(), readable["vcpu"].tolist(), readable["seq"].tolist()))
    info = json.loads(vmtrace("info", torn, "--json").stdout)
    assert info["file"]["torn_tail"]["offset"] == exits[-1]


def _corrupt_variants(trace: Path, tmp_path: Path) -> dict[str, Path]:
    raw = trace.read_bytes()
    middle = block_offsets(trace)[5][0]
    flipped = bytearray(raw)
    flipped[middle + 30] ^= 0x10
    future = bytearray(raw)
    future[8:10] = (2).to_bytes(2, "little")
    files = {"empty": b"", "wrong magic": b"PK\x03\x04" + raw[4:], "truncated": raw[:20],
             "bit flip": bytes(flipped), "future": bytes(future), "short magic": MAGIC[:3]}
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name.replace(' ', '_')}.vmtrace"
        out[name].write_bytes(content)
    out["bit flip offset"] = middle
    return out


@pytest.mark.parametrize("command, case, words", [
    ("info", "missing", "no such file"),
    ("info", "empty", "empty file"),
    ("show", "wrong magic", "not a vmsup trace"),
    ("info", "truncated", "truncated file header"),
    ("show", "bit flip", "crc32 mismatch at offset"),
    ("info", "bit flip", "crc32 mismatch at offset"),
    ("show", "future", "written by a newer vmsup (format 2)"),
    ("info", "directory", "is a directory"),
])
def test_bad_trace_files_give_one_error_line(trace, tmp_path, command, case, words):
    files = _corrupt_variants(trace, tmp_path)
    path = {"missing": tmp_path / "nope.vmtrace", "directory": tmp_path}.get(case) or files[case]
    proc = vmtrace(command, path)
    assert_one_error_line(proc, words)
    if case == "bit flip":
        assert f"at offset {files['bit flip offset']}" in proc.stderr


@pytest.mark.parametrize("args, words", [
    (["--reason", "bogus"], "unknown reason 'bogus'"),
    (["--filter", "cpu=1"], "unknown key 'cpu'"),
    (["--port", "0x10", "--reason", "hlt"], "excludes io"),
    (["--vm", "x"], "'x' is not a number"),
    (["-n", "-1"], "--limit (-n) must be at least 0, not -1"),  # in vmtrace's words (issue 10 item 9), not pydantic's
])
def test_bad_filters_and_flags_give_one_error_line(trace, args, words):
    assert_one_error_line(vmtrace("show", trace, *args), words)


def test_a_missing_argument_is_a_usage_error():
    proc = vmtrace("info")
    assert_one_error_line(proc, "Missing argument")
