"""Coalesced writes and emulated instructions, the rows beside the exits, reach scripts: nested in
the `vmtrace show --json` object of the exit each links to, as `vmtrace export --table` files and as
`vmtrace sql` tables — the same columns everywhere (tracetool/side_rows.py). Real traces of
bundled guests."""

from __future__ import annotations

import csv
import io
import json

import pytest

from conftest import run_vmsup
from test_vmtrace_cli import assert_one_error_line, vmtrace
from tracetool import side_rows
from tracetool.trace import TraceReader

pytestmark = pytest.mark.kvm


def _record(tmp_path, name: str, *args: str):
    trace = tmp_path / f"{name}.vmtrace"
    proc = run_vmsup("launch", name, *args, "-q", "--trace", str(trace), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return trace


@pytest.fixture(scope="module")
def coalesced_trace(tmp_path_factory):
    return _record(tmp_path_factory.mktemp("coalesced"), "seed16", "--coalesce", "0x10", "--max-exits", "50")


@pytest.fixture(scope="module")
def emulated_trace(tmp_path_factory):
    return _record(tmp_path_factory.mktemp("emulated"), "x87calc")


def _show_json(trace, *args) -> list[dict]:
    proc = vmtrace("show", "--json", trace, *args)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _summary(trace) -> dict:
    proc = vmtrace("summary", "--json", trace)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _sql(query: str, trace) -> list[dict]:
    pytest.importorskip("duckdb", reason="the sql extra (duckdb) is not installed")
    proc = vmtrace("sql", query, trace, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _nested(lines: list[dict], kind: str) -> list[dict]:
    return [row for exit in lines for row in exit.get(kind, ())]


def test_show_json_nests_each_coalesced_write_in_the_exit_it_was_drained_before(kvm_required, coalesced_trace):
    lines = _show_json(coalesced_trace)
    assert len(lines) == 50 and all("reason" in exit for exit in lines)  # still one line per exit
    writes = _nested(lines, side_rows.COALESCED)
    with TraceReader(coalesced_trace) as reader:
        every = side_rows.rows(side_rows.COALESCED, side_rows.columns(reader, side_rows.COALESCED))
    assert len(every) == _summary(coalesced_trace)["coalesced"]["total"] > 0
    # all but those the VM's last flush drained after its last exit (linked to one that never came)
    assert writes == [w for w in every if w["exit_seq"] <= lines[-1]["seq"]] and writes
    assert all(list(w) == list(side_rows.FIELDS[side_rows.COALESCED]) for w in writes)
    assert {(w["reason"], w["addr"], w["size"]) for w in writes} == {("io", 0x10, 2)}
    # The seed guest counts on port 0x10 from zero: the queued writes, then the exit, in listed order.
    port_values = [v for exit in lines
                   for v in [*(w["data"] for w in exit.get(side_rows.COALESCED, ())), exit["data"]]]
    assert port_values == list(range(len(port_values)))
    for exit in lines:
        for w in exit.get(side_rows.COALESCED, ()):
            assert (w["vm"], w["vcpu"], w["epoch"], w["exit_seq"]) == (exit["vm"], exit["vcpu"], exit["epoch"], exit["seq"])
            assert w["t_after_ns"] <= min(w["t_before_ns"], exit["t_exit_ns"])


def test_show_json_nests_emulated_instructions_in_the_exit_that_led_to_them(kvm_required, emulated_trace):
    lines = _show_json(emulated_trace)
    assert all("reason" in exit for exit in lines)
    emulated = _nested(lines, side_rows.EMULATED)
    assert len(emulated) == _summary(emulated_trace)["emulated"]["total"] > 0
    for exit in lines:
        for row in exit.get(side_rows.EMULATED, ()):
            assert exit["reason"] == "internal_error" and row["exit_seq"] == exit["seq"]
            assert row["length"] == len(bytes.fromhex(row["insn"])) and row["family"] in ("x87", "fwait")
        if side_rows.EMULATED in exit:
            assert exit[side_rows.EMULATED][0]["address"] == exit["rip"]  # the first one is at the exit


def test_coalesced_writes_export_as_csv_and_query_as_the_coalesced_table(kvm_required, coalesced_trace, tmp_path):
    out = tmp_path / "writes.csv"
    proc = vmtrace("export", coalesced_trace, "--format", "csv", "--table", "coalesced", "-o", out)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    with TraceReader(coalesced_trace) as reader:
        every = side_rows.rows(side_rows.COALESCED, side_rows.columns(reader, side_rows.COALESCED))
    assert rows == [{k: str(v) for k, v in row.items()} for row in every]
    assert len(rows) == _summary(coalesced_trace)["coalesced"]["total"]
    by_port = _sql("SELECT reason, addr, count(*) AS n, min(data) AS first FROM coalesced GROUP BY ALL", coalesced_trace)
    assert by_port == [{"reason": "io", "addr": 0x10, "n": len(rows), "first": 0}]
    assert _sql("SELECT count(*) AS n FROM coalesced WHERE trace IS NOT NULL", coalesced_trace) == [{"n": len(rows)}]


def test_emulated_instructions_export_as_parquet_and_query_as_the_emulated_table(kvm_required, emulated_trace, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra (pyarrow) is not installed")
    out = tmp_path / "emulated.parquet"
    proc = vmtrace("export", emulated_trace, "--format", "parquet", "--table", "emulated", "-o", out)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out)
    assert table.schema.names == list(side_rows.FIELDS[side_rows.EMULATED])
    shown = _nested(_show_json(emulated_trace), side_rows.EMULATED)
    assert table.to_pylist() == shown
    by_family = _sql("SELECT family, count(*) AS n FROM emulated GROUP BY family ORDER BY n DESC", emulated_trace)
    assert {r["family"]: r["n"] for r in by_family} == _summary(emulated_trace)["emulated"]["by_family"]


def test_the_perfetto_timeline_shows_each_side_row_on_its_vcpu_where_it_happened(kvm_required, coalesced_trace,
                                                                                emulated_trace, tmp_path):
    for trace, kind in ((coalesced_trace, side_rows.COALESCED), (emulated_trace, side_rows.EMULATED)):
        out = tmp_path / f"{kind}.json"
        assert vmtrace("export", trace, "--format", "perfetto", "-o", out).returncode == 0
        events = json.loads(out.read_text())["traceEvents"]
        slices = {(e["pid"], e["tid"], e["args"]["seq"]): e for e in events if e["ph"] == "X"}
        side = [e for e in events if e.get("cat") == kind]
        with TraceReader(trace) as reader:
            assert [e["args"] for e in side] == side_rows.rows(kind, side_rows.columns(reader, kind))
        t0 = json.loads(out.read_text())["otherData"]["t0_ns"]
        for e in side:
            exit = slices.get((e["pid"], e["tid"], e["args"]["exit_seq"]))
            assert e["ph"] == "i" and (exit is not None or kind == side_rows.COALESCED)
            if kind == side_rows.EMULATED:  # at the exit that led to it
                assert e["ts"] == exit["ts"] and exit["name"] == "internal_error"
            else:  # when the drain found it
                assert e["ts"] == round((e["args"]["t_before_ns"] - t0) / 1000, 3)


def test_a_trace_without_coalesced_writes_has_an_empty_coalesced_table_and_file(kvm_required, emulated_trace, tmp_path):
    assert _sql("SELECT count(*) AS n FROM coalesced", emulated_trace) == [{"n": 0}]
    out = tmp_path / "none.csv"
    assert vmtrace("export", emulated_trace, "--format", "csv", "--table", "coalesced", "-o", out).returncode == 0
    assert out.read_text().splitlines() == [",".join(side_rows.FIELDS[side_rows.COALESCED])]


def test_export_refuses_a_side_table_on_the_perfetto_timeline_in_one_line(tmp_path):
    proc = vmtrace("export", tmp_path / "any.vmtrace", "--format", "perfetto", "--table", "emulated",
                   "-o", tmp_path / "x.json")
    assert_one_error_line(proc, "--table emulated", "csv or parquet", "perfetto timeline holds every kind")
    assert_one_error_line(vmtrace("export", tmp_path / "any.vmtrace", "--format", "csv", "--table", "steps",
                                  "-o", tmp_path / "x.csv"), "unknown --table 'steps'")
