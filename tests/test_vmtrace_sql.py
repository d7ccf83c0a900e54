"""`vmtrace sql` (DuckDB over a trace's Arrow tables) and the Hive-partitioned Parquet export, on
real traces of bundled guests."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_vmsup
from tracetool import schema

duckdb = pytest.importorskip("duckdb", reason="the sql extra (duckdb) is not installed")

pytestmark = pytest.mark.kvm

VMTRACE = [sys.executable, "-m", "tracetool"]
EXIT_BAD_INPUT = 2


def vmtrace(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*VMTRACE, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def assert_one_error_line(proc, *fragments: str) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmtrace: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.returncode == EXIT_BAD_INPUT


def launch(trace: Path, *args: str) -> None:
    proc = run_vmsup("launch", *args, "-q", "--trace", str(trace), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def traces(tmp_path_factory, kvm_required) -> dict[str, Path]:
    """Two real traces: seed16 and hello in one, two seed16 copies in the other."""
    d = tmp_path_factory.mktemp("sql")
    paths = {"a": d / "a.vmtrace", "b": d / "b.vmtrace"}
    launch(paths["a"], "seed16", "hello", "--max-exits", "3000")
    launch(paths["b"], "seed16", "--vms", "2", "--max-exits", "1500")
    return paths


def sql_json(query: str, *traces) -> list[dict]:
    proc = vmtrace("sql", query, *traces, "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def summary_counts(trace: Path) -> dict[str, int]:
    proc = vmtrace("summary", trace, "--json")
    assert proc.returncode == 0, proc.stderr
    return {g["reason"]: g["count"] for g in json.loads(proc.stdout)["groups"]}


def test_exit_counts_per_reason_match_vmtrace_summary(traces):
    rows = sql_json("SELECT reason, count(*) AS n FROM exits GROUP BY reason", traces["a"])
    assert {r["reason"]: r["n"] for r in rows} == summary_counts(traces["a"]) == {"io": 3036, "hlt": 1}


def test_exits_has_the_csv_export_columns_and_a_trace_column(traces, tmp_path):
    proc = vmtrace("sql", "SELECT * FROM exits ORDER BY t_exit_ns, vm, vcpu, seq", traces["a"], "--csv")
    assert proc.returncode == 0, proc.stderr
    header, *rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert header == ["trace", *schema.EXPORT_COLUMNS]
    exported = tmp_path / "a.csv"
    assert vmtrace("export", traces["a"], "--format", "csv", "-o", exported).returncode == 0
    want = list(csv.reader(io.StringIO(exported.read_text())))
    assert want[0] == header[1:]
    # Same values as the CSV export (booleans spelled by each writer in its own way).
    spell = {"true": "1", "false": "0"}
    assert [[spell.get(v, v) for v in r[1:]] for r in rows] == [[spell.get(v, v) for v in r] for r in want[1:]]
    assert {r[0] for r in rows} == {str(traces["a"])}


def test_handle_ns_is_null_exactly_where_the_next_exit_is_not_in_the_trace(traces):
    rows = sql_json("SELECT vm, count(*) AS n, count(handle_ns) AS known, min(handle_ns) AS lo FROM exits "
                    "GROUP BY vm ORDER BY vm", traces["a"])
    assert [(r["vm"], r["n"], r["known"]) for r in rows] == [(0, 3000, 2999), (1, 37, 36)]
    assert all(r["lo"] > 0 for r in rows)


def test_vms_and_records_describe_each_vm(traces):
    vms = sql_json("SELECT vm, epoch, name, guest, sha256, status, exits, events_in_trace FROM vms ORDER BY vm",
                   traces["a"])
    assert [(v["vm"], v["name"], v["status"], v["exits"], v["events_in_trace"]) for v in vms] == [
        (0, "seed16", "max-exits", 3000, 3000), (1, "hello", "halted", 37, 37)]
    assert vms[0]["guest"].endswith("seed16.bin") and len(vms[0]["sha256"]) == 64
    kinds = sql_json("SELECT kind, count(*) AS n FROM records WHERE kind <> 'kvm-stats' GROUP BY kind", traces["a"])
    assert {k["kind"]: k["n"] for k in kinds} == {"vm-start": 2, "vm-image": 2, "vm-end": 2, "lifecycle": 4}
    pids = sql_json("SELECT vm, CAST(json_extract(json, '$.pid') AS BIGINT) AS pid FROM records "
                    "WHERE kind = 'vm-start' ORDER BY vm", traces["a"])
    assert all(p["pid"] > 0 for p in pids)


def test_a_glob_of_traces_is_one_table_with_a_trace_column(traces):
    pattern = str(traces["a"].parent / "*.vmtrace")
    rows = sql_json("SELECT trace, count(*) AS n FROM exits GROUP BY trace ORDER BY trace", pattern)
    assert [(r["trace"], r["n"]) for r in rows] == [(str(traces["a"]), 3037), (str(traces["b"]), 3000)]
    vms = sql_json("SELECT trace, vm, name FROM vms ORDER BY trace, vm", traces["a"], traces["b"])
    assert [(Path(v["trace"]).name, v["vm"], v["name"]) for v in vms] == [
        ("a.vmtrace", 0, "seed16"), ("a.vmtrace", 1, "hello"), ("b.vmtrace", 0, "seed16-0"), ("b.vmtrace", 1, "seed16-1")]


def test_the_table_output_fits_80_columns(traces):
    proc = vmtrace("sql", "SELECT * FROM vms", traces["a"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "seed16" in proc.stdout and lines[-1] == "2 rows"
    assert max(len(line) for line in lines) <= 80


def test_a_sql_error_is_duckdbs_message_on_one_line(traces):
    assert_one_error_line(vmtrace("sql", "SELECT nope FROM exits", traces["a"]), "nope")
    assert_one_error_line(vmtrace("sql", "SELEC 1", traces["a"]), "syntax error")


def test_a_bad_trace_is_the_usual_one_line_error(traces, tmp_path):
    bad = tmp_path / "bad.vmtrace"
    bad.write_bytes(b"PK\x03\x04" + traces["a"].read_bytes()[4:])
    assert_one_error_line(vmtrace("sql", "SELECT count(*) FROM exits", bad), "not a vmsup trace")
    assert_one_error_line(vmtrace("sql", "SELECT 1", tmp_path / "missing.vmtrace"), "no such file")
    assert_one_error_line(vmtrace("sql", "SELECT 1", str(tmp_path / "none*.vmtrace")), "no trace matches")


def test_without_the_extra_one_line_names_it(traces, tmp_path):
    # A real interpreter in which `import duckdb` fails, as it does where the extra is not installed.
    blocker = tmp_path / "blocked"
    (blocker / "duckdb").mkdir(parents=True)
    (blocker / "duckdb" / "__init__.py").write_text("raise ImportError('not installed')\n")
    import os
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    assert_one_error_line(vmtrace("sql", "SELECT 1", traces["a"], env=env), "pip install 'vmsup[sql]'")


def test_parquet_partitioned_by_vm_and_epoch_reads_back_in_duckdb(traces, tmp_path):
    out = tmp_path / "dataset"
    proc = vmtrace("export", traces["b"], "--format", "parquet", "--partition-by", "vm,epoch", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.relative_to(out).parts[:2] for p in out.rglob("*.parquet")) == [
        ("vm=0", "epoch=0"), ("vm=1", "epoch=0")]
    con = duckdb.connect()
    rows = con.sql(f"SELECT reason, count(*) FROM read_parquet('{out}/**/*.parquet', hive_partitioning = true) "
                   "GROUP BY reason").fetchall()
    assert dict(rows) == summary_counts(traces["b"])
    per_vm = con.sql(f"SELECT vm, epoch, count(*) FROM read_parquet('{out}/**/*.parquet', hive_partitioning = true) "
                     "GROUP BY ALL ORDER BY vm").fetchall()
    assert per_vm == [(0, 0, 1500), (1, 0, 1500)]


@pytest.mark.parametrize("args, words", [
    (["--format", "parquet", "--partition-by", "cpu"], "bad --partition-by 'cpu'"),
    (["--format", "csv", "--partition-by", "vm"], "--partition-by needs --format parquet"),
])
def test_bad_partitioning_is_one_line(traces, tmp_path, args, words):
    assert_one_error_line(vmtrace("export", traces["a"], *args, "-o", tmp_path / "out"), words)


def test_a_dataset_is_not_written_into_a_directory_with_files(traces, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = vmtrace("export", traces["a"], "--format", "parquet", "--partition-by", "vm", "-o", out)
    assert_one_error_line(proc, "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
