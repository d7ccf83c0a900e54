"""The column table of tracetool/schema.py is the one definition of an exit event.

Every test derives what it expects from the table (EXIT_COLUMNS) or from the kvm.h constants of
vmworker.kvm_abi, and fails when a column or a reason exists outside them: in the hot loop's
pack_row calls, the worker's batch, the bus decoder, the trace writer and reader, the file header
or the export columns. The last tests prove the format's promises across versions: a trace
written by main before the trace_file split still reads, and a column added to the table later
reads as unknown in older traces.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tracetool import schema
from tracetool.trace import TraceFormatError, TraceReader, TraceWriter
from tracetool.trace import exits_block, format as trace_format
from vmworker import event_batch, kvm_abi

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
RUN = {"run_id": "test-schema"}


def distinct_row_values() -> dict[str, object]:
    """A value per column that no other column holds, as the hot loop passes it."""
    values = {}
    for i, column in enumerate(schema.EXIT_COLUMNS):
        v = 1 + i  # fits every width, and differs per column
        values[column.name] = v.to_bytes(column.itemsize, "little") if column.code.endswith("s") else v
    return values


# --- The packed row --------------------------------------------------------------------------------
def test_the_hot_path_row_holds_every_column_in_table_order():
    row = struct.Struct(schema.ROW_STRUCT_FORMAT)
    assert row.size == schema.ROW_SIZE and event_batch.ROW.format == row.format
    codes = [c for c in struct.Struct(schema.ROW_STRUCT_FORMAT).format.lstrip("<") if c.isalpha() and c != "x"]
    assert "".join(codes) == "".join(c.code.lstrip("0123456789") for c in schema.EXIT_COLUMNS)
    values = distinct_row_values()
    packed = bytearray(2 * row.size)
    for k in range(2):
        row.pack_into(packed, k * row.size, *values.values())
    cols = schema.columns_from_rows(packed, 2)
    assert list(cols) == list(schema.COLUMN_NAMES)
    for i, column in enumerate(schema.EXIT_COLUMNS):
        got = np.frombuffer(cols[column.name], schema.COLUMN_DTYPES[column.name])
        assert got.tolist() == [1 + i, 1 + i], column.name


def test_every_column_has_a_struct_code_of_its_dtypes_width():
    for column in (*schema.EXIT_COLUMNS, schema.SEQ_COLUMN):
        assert struct.calcsize("<" + column.code) == np.dtype(column.dtype).itemsize == column.itemsize, column
        assert np.dtype(column.dtype).byteorder in "<|=", column  # x86 is little-endian
        assert column.meaning and column.unit, column
        if column.missing is not None:
            assert np.can_cast(np.min_scalar_type(column.missing), np.dtype(column.dtype)), column


# Expressions the vCPU loop passes for a column under another name: its local variables.
PACK_ROW_ALIASES = {"t_exit": {"t1"}, "guest_ns": {"t1 - t0"}, "reason": {"_EXIT_INTR"}}


def pack_row_calls() -> list[ast.Call]:
    tree = ast.parse((REPO / "vmworker" / "vcpu_loop.py").read_text())
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pack_row"]


def test_every_pack_row_call_of_the_vcpu_loop_passes_the_table_columns_in_order():
    calls = pack_row_calls()
    assert calls, "vmworker/vcpu_loop.py packs no rows any more: update this test"
    for call in calls:
        assert not call.keywords
        args = call.args[2:]  # after the buffer and the offset
        assert len(args) == len(schema.EXIT_COLUMNS), (
            f"line {call.lineno}: {len(args)} values for {len(schema.EXIT_COLUMNS)} columns {schema.COLUMN_NAMES}")
        for column, arg in zip(schema.EXIT_COLUMNS, args):
            text = ast.unparse(arg)
            if isinstance(arg, ast.Constant):
                want = bytes if column.code.endswith("s") else int
                assert type(arg.value) is want, f"line {call.lineno}: {text} for column {column.name}"
            else:
                assert text == column.name or text in PACK_ROW_ALIASES.get(column.name, ()), (
                    f"line {call.lineno}: {text!r} passed where the table has column {column.name!r}")


# --- Reason codes -----------------------------------------------------------------------------------
def kvm_h_exit_reasons() -> dict[int, str]:
    return {value: name[len("KVM_EXIT_"):].lower() for name, value in vars(kvm_abi).items()
            if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")}


def test_reason_names_are_the_kvm_h_exit_reasons():
    assert schema.REASONS == kvm_h_exit_reasons()
    assert schema.REASON_CODES == {name: code for code, name in kvm_h_exit_reasons().items()}
    for name in dir(schema):
        if name.startswith("REASON_") and isinstance(getattr(schema, name), int):
            assert getattr(kvm_abi, "KVM_EXIT_" + name[len("REASON_"):]) == getattr(schema, name), name
    assert schema.schema_description()["reasons"] == {str(k): v for k, v in kvm_h_exit_reasons().items()}


def test_an_unknown_reason_code_has_a_name_of_its_own():
    code = next(c for c in range(256) if c not in kvm_h_exit_reasons())
    assert schema.reason_name(code) == f"reason-{code}"


# --- Everything else follows the table ------------------------------------------------------------
def table_columns(n: int) -> dict[str, np.ndarray]:
    return {c.name: np.arange(n).astype(c.dtype) for c in schema.EXIT_COLUMNS}


def test_the_bus_decoder_the_header_and_the_reader_have_exactly_the_table_columns(tmp_path):
    n = 5
    cols = schema.columns_from_rows(bytes(n * schema.ROW_SIZE), n)
    assert list(schema.decode_columns(cols, n)) == list(schema.COLUMN_NAMES)
    assert [c["name"] for c in schema.schema_description()["columns"]] == [
        *schema.COLUMN_NAMES, *(c.name for c in schema.FILTER_COLUMNS)]
    path = tmp_path / "t.vmtrace"
    with TraceWriter(path, RUN) as w:
        w.write_exits(0, 0, 0, 0, n, table_columns(n))
    with TraceReader(path) as r:
        assert set(r.exits()) == {*schema.COLUMN_NAMES, "seq", *schema.STREAM_COLUMNS}
        (batch,) = r.exit_batches()
        assert {e["name"] for e in batch.encodings} == set(schema.COLUMN_NAMES)


def test_the_writer_refuses_a_column_outside_the_table(tmp_path):
    with TraceWriter(tmp_path / "t.vmtrace", RUN) as w:
        with pytest.raises(ValueError, match="unknown \\['bogus'\\]"):
            w.write_exits(0, 0, 0, 0, 3, {**table_columns(3), "bogus": np.zeros(3, np.uint8)})
        required = schema.REQUIRED_COLUMNS[-1]
        with pytest.raises(ValueError, match=f"missing \\['{required}'\\]"):
            w.write_exits(0, 0, 0, 0, 3, {k: v for k, v in table_columns(3).items() if k != required})


def test_the_reader_refuses_a_block_with_a_column_outside_the_table(tmp_path):
    import zstandard
    n = 4
    cols = table_columns(n)
    cols["bogus"] = np.zeros(n, np.uint8)
    payload = exits_block.encode_exits(0, 0, 0, 0, n, {k: v for k, v in cols.items() if k != "bogus"}, None, [],
                                       zstandard.ZstdCompressor())
    (head_len,) = struct.unpack_from("<I", payload)
    head = trace_format.unpack(payload[4:4 + head_len], "head")
    renamed = next(e for e in head["encodings"] if e["name"] == schema.COLUMN_NAMES[-1])
    renamed["name"] = "bogus"  # a column this schema does not know
    head_bytes = trace_format.pack(head)
    bad = struct.pack("<I", len(head_bytes)) + head_bytes + payload[4 + head_len:]
    path = tmp_path / "t.vmtrace"
    with TraceWriter(path, RUN):
        pass
    raw = path.read_bytes()
    with TraceReader(path) as r:
        start = r.data_end
    path.write_bytes(raw[:start] + trace_format.frame_block(trace_format.BlockType.EXITS, bad))
    with pytest.raises(TraceFormatError, match="do not match schema version"):
        TraceReader(path)


def test_export_columns_are_the_table_columns_under_their_export_names(tmp_path):
    exported = [x for c in schema.EXIT_COLUMNS for x in schema.exported_as(c.name)]
    assert list(schema.EXPORT_COLUMNS) == [*schema.STREAM_COLUMNS, "seq", *exported]
    assert len(set(schema.EXPORT_COLUMNS)) == len(schema.EXPORT_COLUMNS)
    path = tmp_path / "t.vmtrace"
    with TraceWriter(path, RUN) as w:
        w.write_exits(0, 0, 0, 0, 3, table_columns(3))
    out = tmp_path / "t.csv"
    proc = subprocess.run([sys.executable, "-m", "tracetool", "export", str(path), "--format", "csv", "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    header = next(csv.reader(io.StringIO(out.read_text())))
    assert tuple(header) == schema.EXPORT_COLUMNS


# --- Traces of other versions ---------------------------------------------------------------------
def test_a_trace_written_by_main_before_the_split_still_reads():
    """tests/data/schema1_main.vmtrace was written by the single-file writer (commit 5a26b21);
    schema1_main.json holds what that version's reader read from it."""
    want = json.loads((DATA / "schema1_main.json").read_text())
    with TraceReader(DATA / "schema1_main.vmtrace") as r:
        assert r.closed_cleanly and r.torn_tail is None and not r.warnings and not r.unexplained_gaps
        got = r.exits()
        for name, values in want["events"].items():
            assert got[name].tolist() == values, name
        # Columns added since (schema 2: rip) read as unknown.
        assert set(got) == set(want["events"]) | {"rip"}
        assert set(got["rip"].tolist()) == {schema.RIP_UNKNOWN}
        assert r.records() == want["records"]
        assert [[list(k), v.hex()] for k, v in sorted(r.payloads().items())] == want["payloads"]
        assert [[s.vm, s.vcpu, s.epoch, s.events, s.covered] for s in r.streams()] == want["streams"]


def test_a_resumed_writer_continues_a_trace_written_by_main(tmp_path):
    path = tmp_path / "t.vmtrace"
    shutil.copy(DATA / "schema1_main.vmtrace", path)
    os.chmod(path, 0o600)
    w = TraceWriter(path, resume=True)
    assert w.resumed_seq == {(0, 0, 0): 150, (0, 1, 0): 40}
    with w:
        w.write_exits(0, 0, 0, 150, 3, table_columns(3))
    with TraceReader(path) as r:  # the resumed writer's footer covers main's blocks too (issue 11.3)
        assert r.closed_cleanly and not r.unexplained_gaps and not r.warnings
        assert [s.events for s in r.streams()] == [153, 20]


def test_a_column_added_to_the_table_reads_as_missing_in_older_traces(tmp_path):
    """The worked example "add a trace field": a copy of tracetool whose schema.py has one more
    Column row (and a version bump) packs it in the hot-path row, reads main's trace (the column
    stands in as its `missing` value: empty in CSV, null in Perfetto args) and writes and reads
    the new column."""
    copy = tmp_path / "pkg"
    shutil.copytree(REPO / "tracetool", copy / "tracetool", ignore=shutil.ignore_patterns("__pycache__"))
    schema_py = copy / "tracetool" / "schema.py"
    text = schema_py.read_text()
    table_end = text.index("\n)\n", text.index("EXIT_COLUMNS: tuple[Column, ...] = ("))
    text = (text[:table_end] + '\n    Column("added_later", "<u8", "Q", "a field added to the table later", "value",'
            ' missing=0xFFFF_FFFF_FFFF_FFFF),' + text[table_end:])
    version = f"SCHEMA_VERSION = {schema.SCHEMA_VERSION}\n"
    assert version in text
    schema_py.write_text(text.replace(version, f"SCHEMA_VERSION = {schema.SCHEMA_VERSION + 1}\n"))
    script = f"""
import csv, io, subprocess, sys
import numpy as np
from tracetool import schema
from tracetool.trace import TraceReader, TraceWriter
assert schema.COLUMN_NAMES[-1] == "added_later" and schema.ROW_SIZE % 8 == 0
with TraceReader({str(DATA / 'schema1_main.vmtrace')!r}) as r:
    ex = r.exits()
assert len(ex["added_later"]) == 170 and set(ex["added_later"].tolist()) == {{2**64 - 1}}
subprocess.run([sys.executable, "-m", "tracetool", "export", {str(DATA / 'schema1_main.vmtrace')!r}, "--format",
                "csv", "-o", "old.csv"], check=True)
rows = list(csv.DictReader(open("old.csv")))
assert len(rows) == 170 and {{row["added_later"] for row in rows}} == {{""}}
subprocess.run([sys.executable, "-m", "tracetool", "export", {str(DATA / 'schema1_main.vmtrace')!r}, "--format",
                "perfetto", "-o", "old.json"], check=True)
import json
slices = [e for e in json.load(open("old.json"))["traceEvents"] if e["ph"] == "X"]
assert len(slices) == 170 and all(e["args"]["added_later"] is None for e in slices)
cols = {{c.name: np.arange(1, 4).astype(c.dtype) for c in schema.EXIT_COLUMNS}}
with TraceWriter("new.vmtrace", {{"run_id": "x"}}) as w:
    w.write_exits(0, 0, 0, 0, 3, cols)
with TraceReader("new.vmtrace") as r:
    assert r.exits()["added_later"].tolist() == [1, 2, 3]
import struct
row = struct.pack(schema.ROW_STRUCT_FORMAT, *[b"\\0" * 8 if c.code == "8s" else 7 for c in schema.EXIT_COLUMNS])
assert schema.columns_from_rows(row, 1)["added_later"] == (7).to_bytes(8, "little")
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy), str(REPO)]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
