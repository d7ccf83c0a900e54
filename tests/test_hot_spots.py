"""Hot spots: `vmtrace summary` by where the guest was with each place's top ports, two-level
groupings (`--by symbol,ioport`), and `--storms` (polling loops named).

Real traces of the bundled mbkernel guest: its print() polls the UART line-status register
(`in 0x3fd`, LSR.THRE) before every character it writes to 0x3f8.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.kvm


def vmtrace(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetool", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.fixture(scope="module")
def mbkernel_trace(tmp_path_factory):
    from tests.conftest import run_vmsup
    trace = tmp_path_factory.mktemp("hot") / "mb.vmtrace"
    proc = run_vmsup("launch", "mbkernel", "--cmdline", "maxticks=5", "--timeout", "60", "-q", "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    return trace


def summary_json(trace, *args) -> dict:
    proc = vmtrace("summary", trace, *args, "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return json.loads(proc.stdout)


def test_each_address_row_names_its_top_ports(mbkernel_trace):
    data = summary_json(mbkernel_trace, "--by", "rip")
    poll = [g for g in data["groups"] if g["top"] and g["top"][0]["target"] == "0x3fd:in"]
    assert len(poll) == 1 and "<print+" in poll[0]["key"]
    assert poll[0]["top"] == [{"target": "0x3fd:in", "count": poll[0]["count"]}]
    for g in data["groups"]:
        assert sum(t["count"] for t in g["top"]) <= g["count"]
        assert {"count", "pct", "time_pct"} <= set(g) and {"p50_ns", "p99_ns"} <= set(g["guest"]) & set(g["handle"])


def test_two_level_grouping_splits_each_symbol_by_port(mbkernel_trace):
    by_symbol = {g["symbol"]: g["count"] for g in summary_json(mbkernel_trace, "--by", "symbol")["groups"]}
    data = summary_json(mbkernel_trace, "--by", "symbol,ioport")
    assert data["by"] == "symbol,ioport"
    pairs = {(g["symbol"], g["port"], g["direction"]): g["count"] for g in data["groups"]}
    assert pairs[("print", 0x3fd, "in")] == pairs[("print", 0x3f8, "out")] > 0
    # each outer group's rows come together, and hold every port exit of that symbol
    outers = [g["group"] for g in data["groups"]]
    assert outers == sorted(outers, key=outers.index)
    assert sum(n for (s, _, _), n in pairs.items() if s == "print") == by_symbol["print"]
    by_reason = summary_json(mbkernel_trace, "--by", "symbol,reason")
    assert sum(g["count"] for g in by_reason["groups"]) == by_reason["events"] == sum(by_symbol.values())


def test_hot_spot_tables_fit_80_columns(mbkernel_trace):
    from rich.console import Console

    from tracetool.commands import _symbols, summary
    from tracetool.trace import TraceReader

    with TraceReader(str(mbkernel_trace)) as reader:
        for by in ("rip", "symbol", "line", "symbol,reason", "line,ioport"):
            out = io.StringIO()
            summary.render(summary.summarize(reader, by=by, symbols=_symbols.vm_tables(reader, None)),
                           Console(file=out, width=80))
            lines = out.getvalue().splitlines()
            assert len(lines) > 3 and max(map(len, lines)) <= 80, by
    text = vmtrace("summary", mbkernel_trace, "--by", "rip").stdout
    assert "0x3fd:in×" in text


@pytest.mark.parametrize("by", ["symbol,nothing", "symbol,symbol", "ioport,mmio", "a,b,c"])
def test_a_bad_two_level_grouping_is_one_line_and_exit_2(mbkernel_trace, by):
    proc = vmtrace("summary", mbkernel_trace, "--by", by)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_storms_name_mbkernels_uart_status_poll_with_its_symbol(mbkernel_trace):
    data = summary_json(mbkernel_trace, "--storms")
    by_port = summary_json(mbkernel_trace, "--by", "ioport")
    lsr_reads = next(g["count"] for g in by_port["groups"] if g["port"] == 0x3fd and g["direction"] == "in")
    storm = next(s for s in data["storms"] if s["target"] == "0x3fd:in")
    assert storm["symbol"] == "print" and storm["line"].startswith("mbkernel.c:")
    assert storm["where"].startswith(f"{storm['rip']:#x} <print+")
    assert storm["data"] & 0x20  # LSR.THRE set: the transmitter was ready every time
    assert storm["count"] == storm["saved"] == lsr_reads >= data["min_count"]
    assert storm["rate_per_s"] >= data["min_rate_per_s"]
    assert storm["time_ns"] == storm["guest_ns"] + storm["handle_ns"] > 0
    # no write is ever a storm, and nothing below the count threshold
    assert all(s["target"].endswith((":in", ":R")) and s["count"] >= 100 for s in data["storms"])
    text = vmtrace("summary", mbkernel_trace, "--storms")
    assert text.returncode == 0 and "<print+" in text.stdout and "0x3fd:in" in text.stdout


def test_storms_of_a_trace_without_addresses_are_none():
    data = summary_json(REPO / "tests" / "data" / "schema1_main.vmtrace", "--storms")
    assert data["storms"] == []


def test_every_export_format_carries_symbol_and_line_like_show_json(mbkernel_trace, tmp_path):
    import csv

    import pyarrow.parquet as pq

    shown = [json.loads(line) for line in vmtrace("show", mbkernel_trace, "--json").stdout.splitlines()]
    assert {"symbol", "line"} <= set(shown[0])
    polls = [e for e in shown if e["addr"] == 0x3fd and not e["write"]]
    assert polls and {e["symbol"] for e in polls} == {"print"} and all(e["line"].startswith("mbkernel.c:") for e in polls)
    for fmt, name in (("csv", "t.csv"), ("parquet", "t.parquet"), ("perfetto", "t.json")):
        assert vmtrace("export", mbkernel_trace, "--format", fmt, "-o", tmp_path / name).returncode == 0
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [(r["symbol"], r["line"]) for r in rows] == [(e["symbol"], e["line"]) for e in shown]
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column("symbol").to_pylist() == [e["symbol"] for e in shown]
    assert table.column("line").to_pylist() == [e["line"] for e in shown]
    slices = [e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e["ph"] == "X"]
    assert [(s["args"]["symbol"], s["args"]["line"]) for s in slices] == [(e["symbol"], e["line"]) for e in shown]


def test_a_trace_without_addresses_exports_null_symbols(tmp_path):
    trace = REPO / "tests" / "data" / "schema1_main.vmtrace"
    assert vmtrace("export", trace, "--format", "csv", "-o", tmp_path / "t.csv").returncode == 0
    import csv
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert rows and all(r["symbol"] == r["line"] == "" for r in rows)


def test_plot_by_symbol_draws_each_symbols_exits_by_port(mbkernel_trace, tmp_path):
    pytest.importorskip("matplotlib")
    from tracetool.commands import _symbols, plot
    from tracetool.trace import TraceReader

    with TraceReader(str(mbkernel_trace)) as reader:
        data = plot.symbol_data(reader, symbols=_symbols.vm_tables(reader, None))
    bars = {b["symbol"]: b for b in data["bars"]}
    assert bars["print"]["targets"]["0x3fd:in"] == bars["print"]["targets"]["0x3f8:out"] > 0
    assert all(sum(b["targets"].values()) == b["count"] for b in data["bars"])
    for name in ("s.png", "s.html"):
        proc = vmtrace("plot", mbkernel_trace, "--by", "symbol", "-o", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")
    page = (tmp_path / "s.html").read_text()
    assert "<svg" in page and "print" in page and "0x3fd:in" in page
    bad = vmtrace("plot", mbkernel_trace, "--by", "port", "-o", tmp_path / "x.png")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_top_by_symbol_counts_a_vms_exits_per_symbol_from_its_vm_start(mbkernel_trace):
    """The live model fed the messages the recorder republished, as they are in the trace."""
    from rich.console import Console

    from supervisor.top import TopModel, render_table
    from tracetool import schema as sch
    from tracetool.trace import TraceReader

    now = [0.0]
    model = TopModel(by="symbol", clock=lambda: now[0])
    with TraceReader(str(mbkernel_trace)) as reader:
        for record in reader.records(sch.MSG_VM_START):
            model.feed({**record, "type": sch.MSG_VM_START})
        for batch in reader.exit_batches():
            cols = batch.columns
            model.feed({"type": sch.MSG_EXITS, "vm": batch.vm, "vcpu": batch.vcpu, "epoch": batch.epoch,
                        "columns": cols, "rows": batch.n_rows, "first_seq": int(cols["seq"][0]),
                        "count": batch.n_rows})
    now[0] = 2.0
    model.tick()
    snap = model.snapshot(sort="total")
    by_symbol = {r["symbol"]: r["total"] for r in snap["vms"][0]["symbols"]}
    expected = {g["symbol"]: g["count"] for g in summary_json(mbkernel_trace, "--by", "symbol")["groups"]}
    assert by_symbol == expected and by_symbol["print"] > 0
    assert snap["vms"][0]["symbols"][0]["rate"] == snap["vms"][0]["symbols"][0]["total"] / 2
    out = io.StringIO()
    Console(file=out, width=80).print(render_table(snap))
    assert "VM / guest symbol" in out.getvalue() and "print" in out.getvalue()
