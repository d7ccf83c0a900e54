"""vmtrace summary, console, diff, export, plot, verify and replay.

Two kinds of traces: ones written with TraceWriter from columns made here (so every expected
number is computed independently, with numpy, from what was written), and real traces recorded
by `vmsup launch` of the bundled guests (marked kvm), checked against the guests' known
behaviour (guest/README.md) and against numpy on the reader's columns.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import VMSUP, kvm_unavailable_reason
from test_trace_file import RUN, block_offsets, seed_like_columns
from test_vmtrace_cli import assert_one_error_line, vmtrace
from tracetool import schema
from tracetool.commands.diff import diff as diff_traces
from tracetool.commands.replay import paced
from tracetool.commands.summary import summarize
from tracetool.trace import TraceReader, TraceWriter

REPO = Path(__file__).resolve().parent.parent
T0 = 7 * 10**12
UART, LSR, DEBUGCON = 0x3F8, 0x3FD, 0xE9
MMIO = 0xD0000000


# --- traces written here, with exact expectations --------------------------------------------------
def timed(guest: np.ndarray, handle: np.ndarray, t0: int) -> np.ndarray:
    """t_exit of events whose guest and handling times are given (see schema)."""
    step = guest.astype(np.int64).copy()
    step[1:] += handle[:-1]
    return t0 + np.cumsum(step)


def mixed_columns(n: int, rng, t0: int) -> dict[str, np.ndarray]:
    """A guest doing a bit of everything: UART writes and LSR polls, debug-port writes, MMIO reads
    and writes at two registers, a few hlt; guest times with outliers far past 65.5 µs."""
    kind = rng.integers(0, 6, n)
    reason = np.where(kind < 3, schema.REASON_IO, np.where(kind < 5, schema.REASON_MMIO, schema.REASON_HLT))
    addr = np.select([kind == 0, kind == 1, kind == 2, kind == 3, kind == 4], [UART, LSR, DEBUGCON, MMIO, MMIO + 8], 0)
    flags = np.isin(kind, (0, 2, 4)).astype(np.uint8)
    size = np.select([kind < 3, kind < 5], [1, 4], 0)
    guest = rng.integers(3_000, 40_000, n)
    guest[rng.random(n) < 0.03] = rng.integers(70_000, 5_000_000_000, 1)[0]
    guest[rng.random(n) < 0.01] *= 50
    handle = rng.integers(500, 20_000, n)
    handle[rng.random(n) < 0.02] = 123_456_789
    return {"t_exit": timed(guest, handle, t0), "guest_ns": guest.astype(np.int64),
            "addr": addr.astype(np.uint64), "data": rng.integers(0, 256, n).astype(np.uint64),
            "count": np.ones(n, np.uint32), "reason": reason.astype(np.uint8), "size": size.astype(np.uint8),
            "flags": flags, "_handle": handle.astype(np.int64)}


class Written:
    """What a synthetic trace holds, per stream: columns, seq, and which rows have a handling time."""

    def __init__(self) -> None:
        self.streams: dict[tuple[int, int, int], dict[str, np.ndarray]] = {}

    def add(self, key, cols: dict[str, np.ndarray], seq: np.ndarray) -> None:
        cols = dict(cols)
        handle = cols.pop("_handle", None)
        if handle is None:  # from t_exit and guest_ns, as the schema defines it
            handle = np.zeros(len(seq), np.int64)
            handle[:-1] = (cols["t_exit"][1:] - cols["guest_ns"][1:]) - cols["t_exit"][:-1]
        known = np.zeros(len(seq), bool)
        known[:-1] = seq[1:] == seq[:-1] + 1
        self.streams[key] = {**cols, "seq": seq, "handle": handle, "known": known}

    def rows(self) -> dict[str, np.ndarray]:
        keys = sorted(self.streams)
        out = {name: np.concatenate([self.streams[k][name] for k in keys]) for name in self.streams[keys[0]]}
        for i, name in enumerate(("vm", "vcpu", "epoch")):
            out[name] = np.concatenate([np.full(len(self.streams[k]["seq"]), k[i]) for k in keys])
        return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """vm 0: a seed-like stream of 5000 exits over 5 blocks; vm 1: two vCPUs of mixed exits, vCPU 1
    with a record-time filter that dropped every 7th event (so some handling times are unknown)."""
    path = tmp_path_factory.mktemp("analysis") / "mixed.vmtrace"
    rng = np.random.default_rng(7)
    written = Written()
    with TraceWriter(path, RUN, block_events=1000) as w:
        w.write_record(schema.MSG_VM_START, {"vm": 0, "epoch": 0, "name": "seed16", "sha256": "5e" * 32, "t": T0})
        w.write_record(schema.MSG_VM_START, {"vm": 1, "epoch": 0, "name": "mixed", "sha256": "ab" * 32, "t": T0})
        seed = seed_like_columns(5000, rng, t0=T0 + 500)
        for i in range(0, 5000, 300):
            part = {k: v[i:i + 300] for k, v in seed.items()}
            w.write_exits(0, 0, 0, i, len(part["t_exit"]), part)
        written.add((0, 0, 0), seed, np.arange(5000))
        for vcpu in (0, 1):
            cols = mixed_columns(2000, rng, T0 + 100 * vcpu)
            seq = np.arange(2000)
            keep = np.ones(2000, bool) if vcpu == 0 else (seq % 7 != 3)
            for i in range(0, 2000, 250):
                sl = slice(i, i + 250)
                part = {k: v[sl][keep[sl]] for k, v in cols.items() if k != "_handle"}
                w.write_exits(1, vcpu, 0, i, 250, part, seq=None if vcpu == 0 else seq[sl][keep[sl]].astype(np.uint64))
            written.add((1, vcpu, 0), {k: v[keep] for k, v in cols.items()}, seq[keep])
    return path, written


def group_keys(rows: dict, by: str) -> list[str]:
    if by == "reason":
        return [schema.reason_name(r) for r in rows["reason"].tolist()]
    if by == "ioport":
        return [f"{a:#x}:{'out' if f & 1 else 'in'}" if r == schema.REASON_IO else None
                for a, f, r in zip(rows["addr"].tolist(), rows["flags"].tolist(), rows["reason"].tolist())]
    if by == "mmio":
        return [f"{a:#x}:{'W' if f & 1 else 'R'}" if r == schema.REASON_MMIO else None
                for a, f, r in zip(rows["addr"].tolist(), rows["flags"].tolist(), rows["reason"].tolist())]
    if by == "vcpu":
        return [f"vm {v} vcpu {c}" for v, c in zip(rows["vm"].tolist(), rows["vcpu"].tolist())]
    return [f"vm {v}" for v in rows["vm"].tolist()]


def assert_metric(got: dict, values: np.ndarray) -> None:
    assert got["count"] == len(values)
    if not len(values):
        assert got["mean_ns"] is None
        return
    assert got["total_ns"] == int(values.sum())
    assert got["min_ns"] == int(values.min()) and got["max_ns"] == int(values.max())
    assert got["mean_ns"] == pytest.approx(values.mean(), rel=1e-12)
    assert got["stddev_ns"] == pytest.approx(values.std(), rel=1e-9, abs=1e-6)
    p50, p99 = np.percentile(values, [50, 99])
    assert got["p50_ns"] == pytest.approx(p50, rel=1e-12) and got["p99_ns"] == pytest.approx(p99, rel=1e-12)


@pytest.mark.parametrize("by", ["reason", "ioport", "mmio", "vcpu", "vm"])
def test_summary_matches_numpy_on_the_written_columns(synthetic, by):
    path, written = synthetic
    rows = written.rows()
    keys = np.array(group_keys(rows, by), dtype=object)
    with TraceReader(path) as r:
        got = summarize(r, by=by)
    want_keys = sorted({k for k in keys.tolist() if k is not None})
    assert sorted(g["key"] for g in got["groups"]) == want_keys
    total = sum(int((keys == k).sum()) for k in want_keys)
    handle_total = sum(int(rows["handle"][(keys == k) & rows["known"]].sum()) for k in want_keys)
    assert got["events"] == total and got["handle_total_ns"] == handle_total and got["percentiles_exact"]
    for g in got["groups"]:
        sel = keys == g["key"]
        assert g["count"] == int(sel.sum())
        assert g["pct"] == pytest.approx(100 * sel.sum() / total)
        assert_metric(g["guest"], rows["guest_ns"][sel])
        assert_metric(g["handle"], rows["handle"][sel & rows["known"]])
        assert g["time_pct"] == pytest.approx(100 * rows["handle"][sel & rows["known"]].sum() / handle_total)


def test_summary_sorts_by_count_time_or_max(synthetic):
    path, _ = synthetic
    with TraceReader(path) as r:
        for sort, metric in (("count", lambda g: g["count"]), ("time", lambda g: g["handle"]["total_ns"]),
                             ("max", lambda g: g["handle"]["max_ns"])):
            groups = summarize(r, by="ioport", sort=sort)["groups"]
            values = [metric(g) for g in groups]
            assert values == sorted(values, reverse=True), sort


def test_summary_past_its_memory_budget_gives_close_percentiles_and_says_so(synthetic):
    path, written = synthetic
    rows = written.rows()
    with TraceReader(path) as r:
        exact = summarize(r)
        approx = summarize(r, exact_limit=10)
    assert exact["percentiles_exact"] and not approx["percentiles_exact"]
    for ge, ga in zip(exact["groups"], approx["groups"]):
        for metric in ("guest", "handle"):
            e, a = ge[metric], ga[metric]
            for stat in ("count", "total_ns", "min_ns", "max_ns"):
                assert a[stat] == e[stat]  # only the percentiles are approximate
            assert a["mean_ns"] == pytest.approx(e["mean_ns"], rel=1e-9)
            for p in ("p50_ns", "p99_ns"):
                assert a[p] == pytest.approx(e[p], rel=0.005, abs=1)
    assert len(rows["seq"]) == exact["events"]


def test_summary_filters_like_show(synthetic):
    path, written = synthetic
    rows = written.rows()
    with TraceReader(path) as r:
        from tracetool.filters import parse_filter
        got = summarize(r, by="ioport", where=parse_filter("vm=1,vcpu=0,port=0x3f8"))
    sel = (rows["vm"] == 1) & (rows["vcpu"] == 0) & (rows["addr"] == UART) & (rows["reason"] == schema.REASON_IO)
    [g] = got["groups"]
    assert g["key"] == "0x3f8:out" and g["count"] == int(sel.sum())
    assert_metric(g["guest"], rows["guest_ns"][sel])
    assert_metric(g["handle"], rows["handle"][sel & rows["known"]])


def test_summary_cli_table_and_json(synthetic):
    path, _ = synthetic
    proc = vmtrace("summary", path, "--by", "mmio", "--sort", "max")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for words in ("MMIO exits by address:R/W", "0xd0000000:R", "0xd0000008:W", "p99", "handle mean"):
        assert words in proc.stdout
    data = json.loads(vmtrace("summary", path, "--json").stdout)
    with TraceReader(path) as r:
        assert data == json.loads(json.dumps(summarize(r)))
    assert_one_error_line(vmtrace("summary", path, "--sort", "median"), "unknown --sort 'median'")
    assert_one_error_line(vmtrace("summary", path, "--by", "port"), "unknown --by 'port'")


# --- console -------------------------------------------------------------------------------------
def io_out(port: int, values: list[int], size: int = 1, t0: int = T0) -> dict[str, np.ndarray]:
    n = len(values)
    guest = np.full(n, 10_000)
    return {"t_exit": timed(guest, np.full(n, 2_000), t0), "guest_ns": guest, "addr": np.full(n, port, np.uint64),
            "data": np.array(values, np.uint64), "count": np.ones(n, np.uint32),
            "reason": np.full(n, schema.REASON_IO, np.uint8), "size": np.full(n, size, np.uint8),
            "flags": np.ones(n, np.uint8)}


def cat(*parts: dict) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_console_follows_the_devices_rules(tmp_path):
    """UART bytes count only with DLAB clear; 0xE9 keeps the low byte of a wide write; string I/O
    comes from the payloads; two vCPUs merge in time order; each VM has its own text."""
    path = tmp_path / "console.vmtrace"
    with TraceWriter(path, RUN) as w:
        w.write_record(schema.MSG_VM_START, {"vm": 0, "epoch": 0, "name": "hello", "t": T0})
        cols = cat(io_out(UART, [ord("h"), ord("i")]),
                   io_out(UART + 3, [0x83]),  # LCR: DLAB on
                   io_out(UART, [0x01]),  # divisor latch low, not a character
                   io_out(UART + 3, [0x03]),  # DLAB off
                   io_out(DEBUGCON, [0x4100 | ord("!")], size=2),
                   io_out(UART, [ord("\n")]))
        cols["t_exit"] = T0 + np.arange(7) * 20_000
        string = io_out(DEBUGCON, [ord("r")])
        string["count"][:] = 4
        string["t_exit"][:] = T0 + 150_000
        w.write_exits(0, 0, 0, 0, 7, cols)
        w.write_exits(0, 0, 0, 7, 1, string, payloads={0: b"rep\n"})
        other = io_out(DEBUGCON, [ord(c) for c in "B\n"], t0=T0 + 1)  # vcpu 1, in between
        other["t_exit"] = np.array([T0 + 10_000, T0 + 160_000])
        w.write_exits(0, 1, 0, 0, 2, other)
        w.write_exits(1, 0, 0, 0, 3, io_out(DEBUGCON, [ord(c) for c in "vm1"]))
    proc = subprocess.run([sys.executable, "-m", "tracetool", "console", str(path), "--vm", "0"], capture_output=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert proc.stdout == b"hBi!\nrep\n\n"
    proc = vmtrace("console", path)
    assert proc.stdout == "--- vm 0 (hello) ---\nhBi!\nrep\n\n--- vm 1 ---\nvm1\n"
    data = json.loads(vmtrace("console", path, "--json", "--source", "uart").stdout)
    assert [(v["vm"], v["text"], v["uart_bytes"]) for v in data["vms"]] == [(0, "hi\n", 3), (1, "", 0)]
    assert_one_error_line(vmtrace("console", path, "--vm", "5"), "no events of vm 5")


# --- diff ----------------------------------------------------------------------------------------
def rewrite(src: Path, dst: Path, change) -> None:
    """Copy a trace stream by stream, letting change(key, cols) edit the columns."""
    with TraceReader(src) as r, TraceWriter(dst, r.run) as w:
        for rec in r.records(schema.MSG_VM_START):
            w.write_record(schema.MSG_VM_START, rec)
        for batch in r.exit_batches():
            cols = {k: np.array(v) for k, v in batch.columns.items() if k != "seq"}
            seq = batch.columns["seq"]
            keep = change((batch.vm, batch.vcpu, batch.epoch), seq, cols)
            if keep is False:
                continue
            if keep is None:
                w.write_exits(batch.vm, batch.vcpu, batch.epoch, batch.first_seq, batch.count, cols,
                              seq=seq if batch.n_rows != batch.count else None)
            elif keep.any():  # the stream ends after the last kept row
                count = int(seq[keep][-1]) - batch.first_seq + 1
                w.write_exits(batch.vm, batch.vcpu, batch.epoch, batch.first_seq, count,
                              {k: v[keep] for k, v in cols.items()}, seq=seq[keep])


def test_diff_names_the_first_divergence_and_ignores_timing(synthetic, tmp_path):
    path, _ = synthetic
    retimed, changed = tmp_path / "retimed.vmtrace", tmp_path / "changed.vmtrace"

    def slower(key, seq, cols):
        cols["guest_ns"] += 1000
        cols["t_exit"] += 1000 * (1 + seq.astype(np.int64))

    def one_value(key, seq, cols):
        slower(key, seq, cols)
        hit = np.flatnonzero(seq == 1234)
        if key == (1, 0, 0) and len(hit):
            cols["data"][hit[0]] ^= 0xFF

    rewrite(path, retimed, slower)
    rewrite(path, changed, one_value)
    same = diff_traces(path, retimed)
    assert same["same"] and same["first_divergence"] is None and not same["count_differences"]
    guest_means = {t["reason"]: t["guest_mean_ns"] for t in same["timing"]}
    assert all(v["b"] > v["a"] for v in guest_means.values())  # timing differs, and is reported

    d = diff_traces(path, changed)
    assert not d["same"]
    first = d["first_divergence"]
    with TraceReader(path) as r:
        cols = r.exits(vm=1, vcpu=0)
    old = int(cols["data"][cols["seq"] == 1234][0])
    assert (first["vm"], first["vcpu"], first["seq"], first["field"]) == (1, 0, 1234, "data")
    assert (first["a"], first["b"]) == (f"{old:#x}", f"{old ^ 0xFF:#x}")

    proc = vmtrace("diff", path, changed)
    assert proc.returncode == 1 and "first divergence: vm 1 vcpu 0 seq 1234" in proc.stdout
    assert vmtrace("diff", path, retimed).returncode == 0


def test_diff_reports_missing_events_streams_and_count_differences(synthetic, tmp_path):
    path, written = synthetic
    shorter = tmp_path / "shorter.vmtrace"

    def cut(key, seq, cols):
        if key == (1, 1, 0):
            return False  # the whole stream is gone
        if key == (0, 0, 0):
            return seq < 3000  # vm 0 ends at seq 3000

    rewrite(path, shorter, cut)
    d = json.loads(vmtrace("diff", path, shorter, "--json").stdout)
    by_stream = {(s["vm"], s["vcpu"]): s for s in d["stream_divergences"]}
    assert by_stream[(0, 0)]["seq"] == 3000 and by_stream[(0, 0)]["field"] == "event"
    assert by_stream[(0, 0)]["b"] is None and by_stream[(0, 0)]["a"].startswith("io out port=0x10")
    assert by_stream[(1, 1)]["field"] == "stream" and by_stream[(1, 1)]["b"] is None
    rows = written.rows()
    lost = rows["reason"][((rows["vm"] == 0) & (rows["seq"] >= 3000)) | ((rows["vm"] == 1) & (rows["vcpu"] == 1))]
    want = {schema.reason_name(c): -int((lost == c).sum()) for c in np.unique(lost)}
    assert {c["reason"]: c["delta"] for c in d["count_differences"]} == want


# --- export --------------------------------------------------------------------------------------
def test_export_perfetto_is_a_chrome_trace_with_a_track_per_vcpu(synthetic, tmp_path):
    path, written = synthetic
    out = tmp_path / "t.json"
    proc = vmtrace("export", path, "--format", "perfetto", "-o", out)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    events = doc["traceEvents"]
    names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"].endswith("_name")}
    assert names[(1, None)] == "vm 0 seed16" and names[(2, None)] == "vm 1 mixed"
    threads = {k: v for k, v in names.items() if k[1] is not None}
    assert sorted(threads.values()) == ["vcpu 0", "vcpu 0", "vcpu 1"] and len(set(threads)) == 3
    slices = [e for e in events if e["ph"] == "X"]
    rows = written.rows()
    assert len(slices) == len(rows["seq"])
    t0 = min(T0, int(rows["t_exit"].min()))  # the timeline starts at the earliest vm-start record
    by_key = {(e["pid"] - 1, e["tid"] % 65536, e["args"]["seq"]): e for e in slices}
    for i in range(0, len(rows["seq"]), 97):
        e = by_key[(int(rows["vm"][i]), int(rows["vcpu"][i]), int(rows["seq"][i]))]
        assert e["ts"] == pytest.approx((int(rows["t_exit"][i]) - t0) / 1000, abs=5e-4)
        assert e["args"]["guest_ns"] == int(rows["guest_ns"][i])
        if rows["known"][i]:
            assert e["args"]["handle_ns"] == int(rows["handle"][i])
            assert e["dur"] == pytest.approx(int(rows["handle"][i]) / 1000, abs=5e-4)
        else:
            assert e["args"]["handle_ns"] is None and e["dur"] == 0
        reason = schema.reason_name(int(rows["reason"][i]))
        assert e["cat"] == reason and e["name"].startswith(reason)
        if reason == "io":
            assert e["name"] == f"io {'out' if rows['flags'][i] else 'in'} {int(rows['addr'][i]):#x}"
    instants = [e for e in events if e["ph"] == "i"]
    assert {e["name"] for e in instants} == {"vm-start"}


def test_export_csv_has_one_row_per_event_with_the_readers_values(synthetic, tmp_path):
    path, written = synthetic
    out = tmp_path / "t.csv"
    assert vmtrace("export", path, "--format", "csv", "-o", out).returncode == 0
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    rows = written.rows()
    assert len(table) == len(rows["seq"])
    got = {(int(t["vm"]), int(t["vcpu"]), int(t["seq"])): t for t in table}
    for i in range(len(rows["seq"])):
        t = got[(int(rows["vm"][i]), int(rows["vcpu"][i]), int(rows["seq"][i]))]
        assert int(t["t_exit_ns"]) == rows["t_exit"][i] and int(t["guest_ns"]) == rows["guest_ns"][i]
        assert t["handle_ns"] == (str(int(rows["handle"][i])) if rows["known"][i] else "")
        assert int(t["addr"]) == rows["addr"][i] and int(t["data"]) == rows["data"][i]
        assert t["reason"] == schema.reason_name(int(rows["reason"][i]))
    times = [int(t["t_exit_ns"]) for t in table]
    assert times == sorted(times)
    filtered = tmp_path / "io.csv"
    assert vmtrace("export", path, "--format", "csv", "-o", filtered, "--reason", "io").returncode == 0
    assert len(filtered.read_text().splitlines()) - 1 == int((rows["reason"] == schema.REASON_IO).sum())


def test_export_parquet_round_trips(synthetic, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install 'vmsup[parquet]')")
    path, written = synthetic
    out = tmp_path / "t.parquet"
    assert vmtrace("export", path, "--format", "parquet", "-o", out).returncode == 0
    table = pq.read_table(out)
    rows = written.rows()
    assert table.num_rows == len(rows["seq"])
    order = np.lexsort((rows["seq"], rows["vcpu"], rows["vm"], rows["t_exit"]))
    np.testing.assert_array_equal(table["t_exit_ns"].to_numpy(), rows["t_exit"][order])
    np.testing.assert_array_equal(table["seq"].to_numpy(), rows["seq"][order])
    handle = table["handle_ns"].to_numpy(zero_copy_only=False)
    known = rows["known"][order]
    assert table["handle_ns"].null_count == int((~known).sum())
    np.testing.assert_array_equal(handle[known], rows["handle"][order][known])
    assert table["reason"].to_pylist()[:3] == [schema.reason_name(int(c)) for c in rows["reason"][order][:3]]
    assert json.loads(table.schema.metadata[b"vmsup.run"]) == RUN


def test_export_parquet_without_pyarrow_is_one_clear_line(synthetic, tmp_path):
    path, _ = synthetic
    fake = tmp_path / "site"
    (fake / "pyarrow").mkdir(parents=True)
    (fake / "pyarrow" / "__init__.py").write_text("raise ImportError('no pyarrow here')\n")
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{REPO}")
    proc = subprocess.run([sys.executable, "-m", "tracetool", "export", str(path), "--format", "parquet", "-o",
                           str(tmp_path / "x.parquet")], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert_one_error_line(proc, "parquet export needs pyarrow: pip install 'vmsup[parquet]'")
    assert not (tmp_path / "x.parquet").exists()


def test_export_errors_are_one_line(synthetic, tmp_path):
    path, _ = synthetic
    assert_one_error_line(vmtrace("export", path, "--format", "xml", "-o", tmp_path / "x"), "unknown --format 'xml'")
    assert_one_error_line(vmtrace("export", path, "--format", "csv", "-o", tmp_path / "no" / "x.csv"), "cannot write")


# --- plot ----------------------------------------------------------------------------------------
def test_plot_writes_a_png_and_a_self_contained_html(synthetic, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'vmsup[plot]')")
    path, _ = synthetic
    png, page = tmp_path / "t.png", tmp_path / "t.html"
    assert vmtrace("plot", path, "-o", png).returncode == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 600
    assert vmtrace("plot", path, "-o", page).returncode == 0
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "src=" not in text  # nothing fetched
    assert_one_error_line(vmtrace("plot", path, "-o", tmp_path / "t.gif"), "use .png or .html")


def test_plot_data_counts_every_event_and_handling_time(synthetic):
    from tracetool.commands.plot import plot_data
    path, written = synthetic
    rows = written.rows()
    with TraceReader(path) as r:
        data = plot_data(r)
    assert data["events"] == len(rows["seq"])
    assert sum(int(c.sum() * data["bin_s"] + 0.5) for c in data["rate"].values()) == len(rows["seq"])
    assert int(data["handle_counts"].sum()) == int(rows["known"].sum())


# --- verify --------------------------------------------------------------------------------------
def test_verify_passes_a_good_trace(synthetic):
    path, _ = synthetic
    proc = vmtrace("verify", path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"{path}: ok: ") and "closed cleanly" in proc.stdout


def refresh_crc(raw: bytearray, offset: int) -> None:
    _, btype, length, _ = struct.unpack_from("<4sIII", raw, offset)
    payload = bytes(raw[offset + 16:offset + 16 + length])
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<II", btype, length)))
    struct.pack_into("<I", raw, offset + 12, crc)


def test_verify_fails_with_one_line_per_problem(synthetic, tmp_path):
    path, _ = synthetic
    raw = bytearray(path.read_bytes())
    exits = [o for o, t, _ in block_offsets(path) if t == 1]
    for offset in (exits[1], exits[4]):
        raw[offset + 40] ^= 0x08
    bad = tmp_path / "flipped.vmtrace"
    bad.write_bytes(raw)
    proc = vmtrace("verify", bad)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert f"{bad}: offset {exits[1]}: block crc32 mismatch" in lines
    assert f"{bad}: offset {exits[4]}: block crc32 mismatch" in lines
    assert all(line.startswith(f"{bad}: ") for line in lines) and not any(": ok: " in line for line in lines)

    torn = tmp_path / "torn.vmtrace"
    torn.write_bytes(path.read_bytes()[:exits[-1] + 30])
    proc = vmtrace("verify", torn)
    assert proc.returncode == 1 and f"offset {exits[-1]}: torn tail" in proc.stdout


def test_verify_checks_values_and_sequence_continuity(tmp_path):
    path = tmp_path / "odd.vmtrace"
    cols = io_out(0x10, list(range(10)), size=2)
    cols["guest_ns"][3] = -5
    cols["t_exit"][7] = cols["t_exit"][6] - 1
    cols["flags"][8] = 0x81
    with TraceWriter(path, RUN) as w:
        w.write_exits(0, 0, 0, 0, 10, cols)
        w.write_exits(0, 0, 0, 20, 10, io_out(0x10, list(range(10)), size=2, t0=T0 + 10**9))
    proc = vmtrace("verify", path)
    assert proc.returncode == 1
    text = proc.stdout
    for words in ("1 event(s) with negative guest_ns (first at seq 3)", "with t_exit before the previous event's",
                  "with flag bits the schema does not define (first at seq 8)",
                  "10 sequence numbers missing from seq 10"):
        assert words in text, words


def test_verify_of_something_that_is_not_a_trace_is_bad_input(tmp_path):
    nope = tmp_path / "nope.vmtrace"
    assert_one_error_line(vmtrace("verify", nope), "no such file")
    nope.write_bytes(b"hello world, not a trace")
    assert_one_error_line(vmtrace("verify", nope), "not a vmsup trace")


# --- replay and show windows ---------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_replay_releases_events_at_their_recorded_pace():
    t = T0 + np.array([0, 1_000_000, 1_000_500, 3_000_000, 503_000_000])  # 0, 1 ms, 1.0005 ms, 3 ms, 503 ms
    chunk = {"t_exit": t, "seq": np.arange(5)}
    clock = FakeClock()
    released = []
    for part in paced([chunk], speed=2.0, clock=clock, sleep=clock.sleep):
        released.append((clock.now - 100.0, part["seq"].tolist()))
    # events due within a microsecond of each other go out together (1 and 2: 0.25 µs apart)
    assert [seqs for _, seqs in released] == [[0], [1, 2], [3], [4]]
    assert [when for when, _ in released] == pytest.approx([0, 0.0005, 0.0015, 0.2515])
    assert sum(clock.sleeps) == pytest.approx(0.2515)  # 503 ms at twice the speed
    clock = FakeClock()
    parts = list(paced([chunk], speed=1.0, max_sleep=0.01, clock=clock, sleep=clock.sleep))
    assert sum(len(p["seq"]) for p in parts) == 5 and max(clock.sleeps) <= 0.01
    assert sum(clock.sleeps) == pytest.approx(0.001 + 0.002 + 0.01, abs=1e-6)


def test_replay_cli_prints_what_show_prints(synthetic):
    path, _ = synthetic
    shown = vmtrace("show", path, "--vm", "1", "-n", "300")
    replayed = vmtrace("replay", path, "--vm", "1", "-n", "300", "--speed", "inf")
    assert replayed.returncode == 0 and replayed.stdout == shown.stdout and len(shown.stdout.splitlines()) == 300
    capped = vmtrace("replay", path, "--max-sleep", "0.001", "--reason", "hlt", "--json")
    assert capped.returncode == 0
    assert all(json.loads(line)["reason"] == "hlt" for line in capped.stdout.splitlines())
    assert_one_error_line(vmtrace("replay", path, "--speed", "0"), "--speed must be greater than 0")


def test_show_from_to_is_a_time_window(synthetic):
    path, written = synthetic
    rows = written.rows()
    t0 = int(rows["t_exit"].min())
    lines = vmtrace("show", path, "--from", "2ms", "--to", "3.5ms", "--json").stdout.splitlines()
    got = [json.loads(line)["t_exit_ns"] for line in lines]
    want = np.sort(rows["t_exit"][(rows["t_exit"] >= t0 + 2_000_000) & (rows["t_exit"] <= t0 + 3_500_000)])
    assert got == want.tolist() and len(got) > 100
    assert_one_error_line(vmtrace("show", path, "--from", "soon"), "bad --from 'soon'")


# --- real traces from the bundled guests ---------------------------------------------------------
ECHO_INPUT = b"hello\nvmsup traces\n"
CONSOLE_TEXT = {
    "hello": b"Hello from vmsup!\n",
    "echo": ECHO_INPUT.upper(),
    "elfhello32": b"elfhello: hello from a 32-bit ELF\n",
    "elfhello64": b"elfhello: hello from a 64-bit ELF\n",
    "repio": b"repio: one exit, many bytes\n",
    "mmio": b"mmio: ok\n",
    "protected32": b"protected32: sum(1..1000) = 500500\n",
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Traces of real launches: each guest once, seed16 three times (two of 20000 exits, one of 15000)."""
    reason = kvm_unavailable_reason()
    if reason is not None:
        if os.environ.get("VMSUP_REQUIRE_KVM") == "1":
            pytest.fail(f"VMSUP_REQUIRE_KVM=1 but {reason}")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("real")
    runtime = base / "xdg"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), VMSUP_TRACE_DIR=str(base / "traces"))
    (base / "echo.in").write_bytes(ECHO_INPUT)
    runs = {name: [name] for name in CONSOLE_TEXT}
    runs["echo"] = ["echo", "--serial-in", str(base / "echo.in")]
    runs["smp"] = ["smp"]
    runs.update({"seed_a": ["seed16", "--max-exits", "20000"], "seed_b": ["seed16", "--max-exits", "20000"],
                 "seed_c": ["seed16", "--max-exits", "15000"], "seed_vms": ["seed16", "--vms", "2", "--max-exits", "3000"]})
    traces = {}
    for name, args in runs.items():
        trace = base / f"{name}.vmtrace"
        proc = subprocess.run([*VMSUP, "launch", *args, "-q", "--trace", str(trace)], input=b"", capture_output=True,
                              timeout=120, cwd=REPO, env=env)
        assert trace.exists(), proc.stderr.decode(errors="replace")
        traces[name] = trace
    return traces


@pytest.mark.kvm
def test_hello_summary_counts_its_uart_polls_and_writes(real):
    data = json.loads(vmtrace("summary", real["hello"], "--by", "ioport", "--json").stdout)
    assert {g["key"]: g["count"] for g in data["groups"]} == {"0x3f8:out": 18, "0x3fd:in": 18}
    by_reason = json.loads(vmtrace("summary", real["hello"], "--json").stdout)
    assert {g["key"]: g["count"] for g in by_reason["groups"]} == {"io": 36, "hlt": 1}
    assert by_reason["groups"][0]["pct"] == pytest.approx(100 * 36 / 37)


@pytest.mark.kvm
def test_real_seed_summary_matches_numpy_on_the_readers_columns(real):
    with TraceReader(real["seed_a"]) as r:
        cols = r.exits()
        got = summarize(r)
    [g] = got["groups"]
    assert g["key"] == "io" and g["count"] == 20000 == len(cols["seq"])
    handle = (cols["t_exit"][1:] - cols["guest_ns"][1:]) - cols["t_exit"][:-1]
    assert_metric(g["guest"], cols["guest_ns"])
    assert_metric(g["handle"], handle)
    data = json.loads(vmtrace("summary", real["seed_vms"], "--by", "vm", "--json").stdout)
    assert [(g["key"], g["count"], g["name"]) for g in data["groups"]] == [("vm 0", 3000, "seed16-0"), ("vm 1", 3000, "seed16-1")]


@pytest.mark.kvm
@pytest.mark.parametrize("guest", sorted(CONSOLE_TEXT))
def test_console_rebuilds_the_guests_exact_output(real, guest):
    proc = subprocess.run([sys.executable, "-m", "tracetool", "console", str(real[guest])], capture_output=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert proc.stdout == CONSOLE_TEXT[guest]


@pytest.mark.kvm
def test_console_of_smp_has_one_whole_line_per_vcpu(real):
    text = vmtrace("console", real["smp"]).stdout
    assert sorted(text.splitlines()) == [f"vcpu {n}" for n in range(4)] and text.endswith("\n")


@pytest.mark.kvm
def test_diff_of_two_seed_runs_differs_only_in_timing(real):
    proc = vmtrace("diff", real["seed_a"], real["seed_b"], "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = json.loads(proc.stdout)
    assert d["same"] and d["first_divergence"] is None and d["count_differences"] == []
    assert d["counts"] == [{"reason": "io", "a": 20000, "b": 20000, "delta": 0}]
    [timing] = d["timing"]
    assert timing["guest_mean_ns"]["a"] != timing["guest_mean_ns"]["b"]  # no two runs share their timing
    assert all(g["same"] for g in d["guests"])


@pytest.mark.kvm
def test_diff_names_where_a_shorter_run_or_another_guest_diverges(real):
    d = json.loads(vmtrace("diff", real["seed_a"], real["seed_c"], "--json").stdout)
    first = d["first_divergence"]
    assert (first["vm"], first["vcpu"], first["seq"], first["field"]) == (0, 0, 15000, "event")
    assert first["a"] == f"io out port=0x10 size=2 data={15000:#x}" and first["b"] is None
    assert d["count_differences"] == [{"reason": "io", "a": 20000, "b": 15000, "delta": -5000}]

    proc = vmtrace("diff", real["hello"], real["elfhello32"])
    assert proc.returncode == 1
    d = json.loads(vmtrace("diff", real["hello"], real["elfhello32"], "--json").stdout)
    first = d["first_divergence"]
    assert first["seq"] == 0 and first["field"] == "flags" and (first["a"], first["b"]) == ("read", "write")
    assert set(first["fields"]) == {"flags", "addr", "data"}
    assert not d["guests"][0]["same"]


@pytest.mark.kvm
def test_real_traces_verify_and_export(real, tmp_path):
    for name in ("seed_a", "smp", "repio", "echo"):
        proc = vmtrace("verify", real[name])
        assert proc.returncode == 0 and ": ok: " in proc.stdout, proc.stdout
    out = tmp_path / "smp.json"
    assert vmtrace("export", real["smp"], "--format", "perfetto", "-o", out).returncode == 0
    events = json.loads(out.read_text())["traceEvents"]
    assert len([e for e in events if e["ph"] == "X"]) == 32
    assert sorted(e["args"]["name"] for e in events if e["name"] == "thread_name") == [f"vcpu {n}" for n in range(4)]
    csv_out = tmp_path / "seed.csv"
    assert vmtrace("export", real["seed_a"], "--format", "csv", "-o", csv_out).returncode == 0
    assert len(csv_out.read_text().splitlines()) == 20001


def test_reader_decodes_only_the_columns_asked_for(synthetic):
    path, _ = synthetic
    with TraceReader(path) as r:
        full = list(r.exit_batches())
        some = list(r.exit_batches(columns=("t_exit", "reason")))
    assert len(full) == len(some)
    for a, b in zip(full, some):
        assert set(b.columns) == {"t_exit", "reason", "seq", "guest_ns"}  # guest_ns: t_exit is coded against it
        for name in b.columns:
            np.testing.assert_array_equal(a.columns[name], b.columns[name])


def test_export_to_stdout_and_through_a_symlink_leaves_the_link(synthetic, tmp_path):
    path, _ = synthetic
    proc = vmtrace("export", path, "--format", "csv", "-o", "-", "--vm", "0")
    assert proc.returncode == 0 and proc.stderr.startswith("vmtrace: wrote 5000 events to - (csv)")
    lines = proc.stdout.splitlines()
    assert len(lines) == 5001 and lines[0].startswith("vm,vcpu,epoch,seq,")
    target, link = tmp_path / "real.csv", tmp_path / "link.csv"
    link.symlink_to(target)
    assert vmtrace("export", path, "--format", "csv", "-o", link, "--vm", "0").returncode == 0
    assert link.is_symlink() and target.read_text() == proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "real.csv"]  # no temporary left behind
