"""Safe file handling (issue 10 item 7): a recording never silently replaces an earlier one, a
mistyped --trace directory is refused rather than created, and the run directory a killed
supervisor left behind is removed by the next command, which says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from supervisor import runtime
from tests.conftest import REPO, VMSUP
from supervisor.trace_path import keep_previous, numbered_backups
from tracetool.trace import TraceReader


def test_each_kept_file_gets_the_next_number_and_none_is_replaced(tmp_path):
    path = tmp_path / "t.vmtrace"
    assert keep_previous(str(path)) is None  # nothing to keep
    for n in range(1, 4):
        path.write_text(f"recording {n}")
        assert keep_previous(str(path)) == f"{path}.{n}"
        assert not path.exists()
    (tmp_path / "t.vmtrace.x").write_text("not a backup")
    assert numbered_backups(str(path)) == [f"{path}.{n}" for n in (1, 2, 3)]
    assert [open(p).read() for p in numbered_backups(str(path))] == [f"recording {n}" for n in (1, 2, 3)]


@pytest.mark.kvm
def test_a_third_recording_to_one_path_keeps_both_earlier_ones_readable(vmsup, tmp_path):
    trace = tmp_path / "t.vmtrace"
    for exits in (10, 20, 30):
        proc = vmsup("launch", "seed16", "-q", "--max-exits", str(exits), "--trace", str(trace))
        assert proc.returncode == 0, proc.stderr
    assert f"(the previous file of that name kept as {trace}.2)" in proc.stderr
    for path, exits in ((f"{trace}.1", 10), (f"{trace}.2", 20), (trace, 30)):
        with TraceReader(path) as r:
            assert r.event_count == exits
    proc = vmsup_trace("info", f"{trace}.1")
    assert proc.returncode == 0, proc.stderr


def vmsup_trace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetool", *args], capture_output=True, text=True, timeout=60)


def test_a_trace_into_a_missing_directory_is_refused_with_one_line(vmsup, tmp_path):
    missing = tmp_path / "no" / "such"
    proc = vmsup("launch", "hello", "--trace", str(missing / "x.vmtrace"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"vmsup: error: trace directory {missing} does not exist "
                                        "(create it first, or pick another --trace)"]
    assert not (tmp_path / "no").exists()


@pytest.mark.kvm
def test_the_default_trace_directory_is_created_when_missing(vmsup, tmp_path):
    traces = tmp_path / "fresh" / "traces"
    proc = vmsup("launch", "hello", "-q", env={**os.environ, "VMSUP_TRACE_DIR": str(traces)})
    assert proc.returncode == 0, proc.stderr
    assert len(list(traces.glob("hello-*.vmtrace"))) == 1


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has this pid now (reuse within a test is not a concern)


@pytest.mark.parametrize("command", [("ps",), ("ps", "--json"), ("stop", "--all"), ("tail", "-n", "1")])
def test_any_command_removes_a_killed_supervisors_run_directory_and_says_so(vmsup, command):
    base = runtime.base_dir()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    stale = base / "120000-1"
    stale.mkdir(mode=0o700)
    (stale / "run.json").write_text(json.dumps({"id": stale.name, "pid": _dead_pid()}))
    (stale / "control.sock").write_text("")  # what a killed run leaves: its socket files
    proc = vmsup(*command, timeout=20)
    assert not stale.exists()
    said = [line for line in proc.stderr.splitlines() if "stale" in line]
    assert said == ["vmsup: removed 1 stale run directory (run 120000-1: supervisor gone)"], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.kvm
def test_parquet_to_a_terminal_is_refused(tmp_path):
    """Binary output never goes to a terminal: `export --format parquet -o -` on a tty is one line."""
    import pty
    trace = tmp_path / "t.vmtrace"
    proc = subprocess.run([*VMSUP, "launch", "seed16", "--max-exits", "20", "-q", "--trace", str(trace)],
                          cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stderr
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "tracetool", "export", str(trace), "--format", "parquet",
                               "-o", "-"], cwd=REPO, stdout=secondary, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
    finally:
        os.close(secondary)
        os.close(primary)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("vmtrace: error: ") and "terminal" in line, line


@pytest.mark.kvm
def test_detach_says_piped_stdin_goes_nowhere(tmp_path):
    proc = subprocess.run([*VMSUP, "launch", "seed16", "--max-exits", "20", "-q", "--no-trace", "--detach"],
                          cwd=REPO, capture_output=True, text=True, input="abc\n", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "a detached run takes no standard input" in proc.stderr, proc.stderr
