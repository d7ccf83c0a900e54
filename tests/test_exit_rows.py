"""One shape of an exit everywhere: the JSON of tail/show/replay and the CSV/Parquet columns are
schema.EVENT_FIELDS (derived from the column table), and the README's table is generated from it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from test_trace_file import RUN, seed_like_columns
from test_vmtrace_cli import vmtrace
from tracetool import exit_rows, schema
from tracetool.handling import NO_HANDLE
from tracetool.trace import TraceWriter

ROOT = Path(__file__).resolve().parent.parent


def test_readme_lists_every_field_of_an_exit_with_unit_and_meaning():
    readme = (ROOT / "README.md").read_text()
    assert exit_rows.field_table() in readme
    names = [f.name for f in schema.EVENT_FIELDS]
    assert names == list(schema.EXPORT_COLUMNS) and len(set(names)) == len(names)
    assert all(f.unit and f.meaning for f in schema.EVENT_FIELDS)


def test_every_event_column_is_a_field_of_the_shape():
    """A column added to the table (e.g. `rip`) is a field of every JSON row and export at once."""
    shown = {f.column for f in schema.EVENT_FIELDS}
    assert set(schema.COLUMN_NAMES) <= shown
    cols = {c.name: np.zeros(2, schema.column_dtypes()[c.name]) for c in schema.EXIT_COLUMNS}
    cols["seq"] = np.arange(2, dtype=np.uint64)
    rows = exit_rows.json_rows(cols, {"vm": 1, "vcpu": 0, "epoch": 0})
    assert [tuple(r) for r in rows] == [schema.EXPORT_COLUMNS] * 2
    assert rows[0]["handle_ns"] is None  # not given: unknown, not 0


def test_an_unknown_handling_time_and_a_missing_column_are_null():
    cols = {c.name: np.ones(1, schema.column_dtypes()[c.name]) for c in schema.EXIT_COLUMNS}
    cols.update(seq=np.zeros(1, np.uint64), handle_ns=np.array([NO_HANDLE]), vm=np.array([3]),
                vcpu=np.array([0]), epoch=np.array([0]))
    for c in schema.EXIT_COLUMNS:
        if c.missing is not None:
            cols[c.name][:] = c.missing
    row = exit_rows.json_rows(cols)[0]
    assert row["handle_ns"] is None and row["vm"] == 3
    assert all(row[c.name] is None for c in schema.EXIT_COLUMNS if c.missing is not None)


def test_show_json_and_csv_export_give_the_same_fields_and_values(tmp_path):
    path = tmp_path / "t.vmtrace"
    with TraceWriter(path, RUN, block_events=100) as w:
        cols = seed_like_columns(250, np.random.default_rng(3), t0=10**12)
        w.write_exits(0, 0, 0, 0, 250, cols)
    shown = [json.loads(line) for line in vmtrace("show", path, "--json").stdout.splitlines()]
    assert len(shown) == 250 and all(tuple(e) == schema.EXPORT_COLUMNS for e in shown)
    assert vmtrace("export", path, "--format", "csv", "-o", tmp_path / "t.csv").returncode == 0
    table = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert tuple(table[0]) == schema.EXPORT_COLUMNS
    as_text = {None: "", True: "true", False: "false"}
    for event, row in zip(shown, table):
        assert {k: as_text.get(v, str(v)) if not isinstance(v, int) or isinstance(v, bool) else str(v)
                for k, v in event.items()} == row
    replayed = vmtrace("replay", path, "--json", "--speed", "inf").stdout.splitlines()
    assert [json.loads(line) for line in replayed] == shown
