"""A command that writes a file never writes over one of its inputs (issue 10 item 1).

`vmtrace export t.vmtrace -o t.vmtrace` used to replace the trace it was reading. The output is
compared with the inputs by inode, so the same path spelled differently, a symlink and a hard
link are all refused: one error line, exit 2, the input unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import REPO, run_vmsup
from test_trace_file import RUN, seed_like_columns
from test_vmtrace_cli import VMTRACE, assert_one_error_line, vmtrace
from tracetool import schema
from tracetool._output import OutputError, output_path
from tracetool.trace import TraceWriter

# (command and its options before -o, the output's extension)
WRITERS = {
    "export-csv": (["export", "--format", "csv"], ".csv"),
    "export-perfetto": (["export", "--format", "perfetto"], ".json"),
    "export-parquet": (["export", "--format", "parquet"], ".parquet"),
    "plot": (["plot"], ".png"),
}


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "run.vmtrace"
    with TraceWriter(path, RUN, block_events=500) as w:
        w.write_record(schema.MSG_VM_START, {"vm": 0, "epoch": 0, "name": "seed16", "t": 10**12})
        cols = seed_like_columns(1200, np.random.default_rng(3))
        w.write_exits(0, 0, 0, 0, 1200, cols)
    return path


def _alias(trace, how: str, ext: str):
    """A path naming the trace's inode, with the writer's extension (plot picks its format by it)."""
    if how == "same path":
        return trace
    alias = trace.parent / f"alias{ext}"
    if how == "symlink":
        alias.symlink_to(trace.name)
    elif how == "hard link":
        os.link(trace, alias)
    elif how == "spelled differently":
        return trace.parent / "." / ".." / trace.parent.name / trace.name
    return alias


# plot picks its picture type by the output's name, so the trace's own name is refused as a
# picture type before anything else: its cases are the links.
CASES = [(writer, how) for writer in WRITERS for how in ("same path", "spelled differently", "symlink", "hard link")
         if writer != "plot" or how in ("symlink", "hard link")]


@pytest.mark.parametrize("writer,how", CASES)
def test_a_vmtrace_command_refuses_to_write_over_its_input_trace(trace, writer, how):
    args, ext = WRITERS[writer]
    before = trace.read_bytes()
    out = _alias(trace, how, ext)
    proc = vmtrace(args[0], trace, *args[1:], "-o", out)
    assert_one_error_line(proc, "is the same file as the input", "refusing to overwrite it")
    assert trace.read_bytes() == before
    assert sorted(p.name for p in trace.parent.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_export_to_standard_output_appended_to_its_input_is_refused(trace):
    before = trace.read_bytes()
    with open(trace, "ab") as sink:
        proc = subprocess.run([*VMTRACE, "export", str(trace), "--format", "csv", "-o", "-"], stdout=sink,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmtrace: error: standard output is the same file"), proc.stderr
    assert trace.read_bytes() == before


def test_a_writer_given_its_inputs_refuses_before_writing(trace, tmp_path):
    link = tmp_path / "link.csv"
    link.symlink_to(trace)
    with pytest.raises(OutputError, match="same file as the input"):
        with output_path(str(link), inputs=(str(trace),)):
            pytest.fail("the output was opened")
    other = tmp_path / "other.csv"
    with output_path(str(other), inputs=(str(trace),)) as path, open(path, "w") as f:
        f.write("ok\n")
    assert other.read_text() == "ok\n"


@pytest.mark.parametrize("how", ["same path", "symlink"])
def test_launch_refuses_a_trace_path_that_is_its_guest_image(tmp_path, how):
    image = tmp_path / "hello.bin"
    shutil.copyfile(REPO / "guest" / "hello.bin", image)
    target = image
    if how == "symlink":
        target = tmp_path / "t.vmtrace"
        target.symlink_to(image.name)
    before = image.read_bytes()
    proc = run_vmsup("launch", str(image), "-q", "--trace", str(target))
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("vmsup: error: ")] == [
        f"vmsup: error: trace path {target} is the same file as the input {image}: refusing to overwrite it"]
    assert image.read_bytes() == before and not (tmp_path / "hello.bin.old").exists()


def test_launch_refuses_a_trace_path_that_is_its_serial_input(tmp_path):
    serial = tmp_path / "in.txt"
    serial.write_bytes(b"abc\n")
    proc = run_vmsup("launch", "echo", "-q", "--serial-in", str(serial), "--trace", str(serial))
    assert proc.returncode == 2
    assert b"is the same file as the input" in proc.stderr
    assert serial.read_bytes() == b"abc\n"
