"""`vmtrace rerun`: a recorded VM re-executed from its trace, every exit compared.

Real guests, real traces, real KVM: each guest is recorded with `vmsup launch`, then rerun by the
`vmtrace` CLI (which starts vmworker/rerun.py as its own process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import GUEST_DIR, REPO
from tests.trace_copy import copy_trace
from tracetool import schema
from tracetool.trace import TraceReader

pytestmark = pytest.mark.kvm

VMTRACE = [sys.executable, "-m", "tracetool"]


def vmtrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VMTRACE, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def record(vmsup, tmp_path, guest: str, *flags: str, name: str = "rec.trace") -> str:
    trace = str(tmp_path / name)
    proc = vmsup("launch", guest, "--quiet", "--timeout", "20", "--trace", trace, *flags)
    assert os.path.exists(trace), proc.stderr
    return trace


def guest_exits(trace: str) -> int:
    """Exits the guest made in a trace (kicks are the VMM's, not the guest's)."""
    with TraceReader(trace) as reader:
        return int((reader.exits()["reason"] != schema.REASON_INTR).sum())


GUESTS = {
    "seed16": ("--max-exits", "20000"),
    "hello": (),
    "mmio": (),
    "echo": ("--serial-in", "INPUT"),
    "protected32": (),
    "long64": (),
    "elfhello32": (),
    "elfhello64": (),
    "repio": (),
}


@pytest.mark.parametrize("guest", sorted(GUESTS))
def test_a_recorded_guest_reruns_identical(vmsup, tmp_path, guest):
    serial_in = tmp_path / "serial.txt"
    serial_in.write_bytes(b"typed into the UART\n")
    flags = [str(serial_in) if f == "INPUT" else f for f in GUESTS[guest]]
    trace = record(vmsup, tmp_path, guest, *flags)
    proc = vmtrace("rerun", trace, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["identical"] is True
    assert result["exits"] == guest_exits(trace) > 0
    text = vmtrace("rerun", trace)
    assert text.returncode == 0 and text.stdout.startswith(f"identical: {result['exits']:,} exits")


def test_the_rerun_is_recorded_and_diff_finds_no_divergence(vmsup, tmp_path):
    trace = record(vmsup, tmp_path, "protected32")
    out = str(tmp_path / "again.trace")
    assert vmtrace("rerun", trace, "--trace", out).returncode == 0
    diff = vmtrace("diff", trace, out)
    assert diff.returncode == 0, diff.stdout
    assert "no divergence" in diff.stdout
    assert vmtrace("verify", out).returncode == 0
    again = vmtrace("rerun", trace, "--trace", out)  # never over an existing file
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists" in again.stderr


def test_an_image_changed_by_one_byte_diverges_at_the_right_exit_and_field(vmsup, tmp_path):
    image = tmp_path / "hello.bin"
    shutil.copy(GUEST_DIR / "hello.bin", image)
    trace = record(vmsup, tmp_path, str(image), "--no-embed", "--mode", "real")
    data = bytearray(image.read_bytes())
    at = data.index(b"Hello") + 2  # the first 'l': the third character written
    data[at] = ord("L")
    image.write_bytes(data)
    # Not embedded and changed: refused, naming the sha256 it needs.
    with TraceReader(trace) as reader:
        want = reader.records(schema.MSG_VM_IMAGE)[0]["sha256"]
        assert "image" not in reader.records(schema.MSG_VM_IMAGE)[0]
    refused = vmtrace("rerun", trace)
    assert refused.returncode == 2 and want in refused.stderr and refused.stderr.count("\n") == 1
    # The same trace with the image forged back to the recorded sha256 is impossible; so rerun it
    # with the changed bytes embedded in a copy of the trace's vm-image record instead.
    forged = forge_embedded_image(trace, tmp_path / "forged.trace", bytes(data))
    proc = vmtrace("rerun", forged, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    # Per character: IN from the line status register, then OUT of the character: 'l' is char 2.
    assert (result["seq"], result["field"]) == (5, "data")
    assert (result["recorded"], result["now"]) == ("0x6c", "0x4c")
    assert result["exits"] == 5
    assert result["instruction"]["text"]
    text = vmtrace("rerun", forged)
    assert text.returncode == 1 and "diverged at seq 5" in text.stdout and "data recorded 0x6c, now 0x4c" in text.stdout


def forge_embedded_image(trace: str, out, image: bytes) -> str:
    """A copy of `trace` whose vm-image record embeds `image` (with its own sha256)."""
    from vmworker.image import sha256_hex

    def embed(kind: str, record: dict) -> dict:
        return {**record, "image": image, "sha256": sha256_hex(image)} if kind == schema.MSG_VM_IMAGE else record
    return copy_trace(trace, out, embed)


def test_to_seq_stops_just_before_that_exit(vmsup, tmp_path):
    trace = record(vmsup, tmp_path, "hello")
    proc = vmtrace("rerun", trace, "--to-seq", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["stopped_before_seq"] == 10 and result["exits"] == 10
    assert result["registers"]["rip"] > 0


def test_a_torn_trace_reruns_up_to_its_last_whole_block_and_says_so(vmsup, tmp_path):
    trace = record(vmsup, tmp_path, "seed16", "--max-exits", "200000")
    with TraceReader(trace) as reader:
        refs = reader.exit_blocks()
        assert len(refs) > 1
        last = refs[-1]
        whole = sum(r.n_rows for r in refs[:-1])
        whole -= int(sum((reader.read_batch(r).columns["reason"] == schema.REASON_INTR).sum() for r in refs[:-1]))
    torn = tmp_path / "torn.trace"
    with open(trace, "rb") as f:
        torn.write_bytes(f.read(last.offset + 100))  # cut inside the last block
    proc = vmtrace("rerun", str(torn), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["exits"] == whole
    assert any("torn tail" in note for note in result["notes"])


def test_bad_input_is_one_line(tmp_path, vmsup):
    missing = vmtrace("rerun", str(tmp_path / "none.trace"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    trace = record(vmsup, tmp_path, "hello")
    no_vm = vmtrace("rerun", trace, "--vm", "7")
    assert no_vm.returncode == 2 and "no VM 7" in no_vm.stderr and "Traceback" not in no_vm.stderr
