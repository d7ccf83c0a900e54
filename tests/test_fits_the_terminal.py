"""Output fits the terminal: at 80 columns no number is cut to `1…` (text folds, columns go, a
note says how many and `--wide` shows all), and `info` shows a spec as key/value lines."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from test_trace_file import RUN, seed_like_columns
from tracetool import schema
from tracetool.commands import diff, info, summary
from tracetool.trace import TraceReader, TraceWriter

SPEC = {"guest": "/some/where/a/rather/long/path/to/guest/hello.bin", "mem": 16777216, "vcpus": 1, "mode": "real",
        "extra": {"policy": {"mode": "no", "retries": 5}}, "cmdline": None}


def write(path, rng, ports: list[int], t0: int = 10**12):
    with TraceWriter(path, RUN, block_events=500) as w:
        w.write_record(schema.MSG_VM_START, {"vm": 0, "epoch": 0, "name": "a-guest-with-a-long-name",
                                             "spec": SPEC, "sha256": "5e" * 32, "vcpus": 1, "t": t0})
        cols = seed_like_columns(2000, rng, t0=t0)
        cols["addr"][:] = np.array(ports)[np.arange(2000) % len(ports)]
        cols["flags"][:] = np.arange(2000) % 2
        cols["reason"][-1] = schema.REASON_HLT
        w.write_exits(0, 0, 0, 0, 2000, cols)
        w.write_record(schema.MSG_VM_END, {"vm": 0, "epoch": 0, "status": "halted", "exits": 2000, "t": t0 + 10**9})
    return path


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    rng = np.random.default_rng(11)
    return write(d / "a.vmtrace", rng, [0x3F8, 0x3FD, 0x10, 0x64]), write(d / "b.vmtrace", rng, [0x3F8, 0x10])


def rendered(render, data, width: int = 80, **kw) -> str:
    buf = io.StringIO()
    render(data, Console(file=buf, width=width, highlight=False), **kw)
    return buf.getvalue()


def assert_fits(text: str, width: int = 80) -> None:
    assert "…" not in text, text  # no cell cut to an ellipsis
    assert max(len(line) for line in text.splitlines()) <= width, text


def test_summary_by_ioport_at_80_columns_shows_whole_numbers(traces):
    with TraceReader(traces[0]) as r:
        data = summary.summarize(r, by="ioport")
    text = rendered(summary.render, data)
    assert_fits(text)
    for g in data["groups"]:
        line = next(line for line in text.splitlines() if line.startswith(f"│ {g['key']}"))
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        assert cells[1:4] == [str(g["count"]), f"{g['pct']:.2f}", f"{g['time_pct']:.2f}"]
        assert f"{g['handle']['mean_ns'] / 1000:.2f}" in cells
    assert "more columns with --wide" in text


def test_summary_wide_shows_every_column(traces):
    with TraceReader(traces[0]) as r:
        data = summary.summarize(r, by="ioport")
    text = rendered(summary.render, data, wide=True)
    assert "…" not in text and "--wide" not in text
    header = "".join(text.splitlines()[1:5])
    assert header.count("±sd") == 2 and header.count("max") == 2 and header.count("p50") == 2


def test_diff_timing_table_at_80_columns_keeps_a_b_and_change_together(traces):
    data = diff.diff(*traces)
    text = rendered(diff.render, data)
    assert_fits(text)
    timing = text[text.index("Timing per reason"):]
    header = "".join(timing.splitlines()[1:6])
    assert header.count("A ") == header.count("B ") == header.count("Δ%") >= 2


def test_info_shows_a_spec_as_key_value_lines(traces):
    data = info.trace_info(traces[0])
    text = rendered(info.render, data)
    assert_fits(text)
    lines = text.splitlines()
    for key, value in (("guest", SPEC["guest"]), ("mem", "16777216"), ("extra.policy.retries", "5")):
        assert f"  {key}: {value}" in lines
    assert not any("cmdline" in line for line in lines)  # unset: left out
    assert not any('{"' in line for line in lines)  # no raw JSON
    assert len(lines) < 50
