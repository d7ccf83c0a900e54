"""--deterministic: a user-space PIC/PIT on a virtual clock, interrupts only at exits, rerun exactly.

Real KVM, real guests: mbkernel (guest/mbkernel.c) programs the PIT at 100 Hz and sleeps in
`sti; hlt` counting ticks; its timer interrupts come from vmworker/deterministic.py here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tracetool import schema
from tracetool.trace import TraceReader

pytestmark = pytest.mark.kvm


def vmtrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetool", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_mbkernel_recorded_deterministic_reruns_identical_with_every_tick_in_place(vmsup, tmp_path):
    trace = str(tmp_path / "det.trace")
    proc = vmsup("launch", "mbkernel", "--deterministic", "--cmdline", "maxticks=50", "--quiet", "--trace", trace)
    assert proc.returncode == 0, proc.stderr
    assert "ticks: 50" in proc.stdout
    with TraceReader(trace) as reader:
        interrupts = reader.records(schema.MSG_INTERRUPT)
        spec = reader.records(schema.MSG_VM_START)[0]["spec"]
    assert spec["deterministic"] is True
    ticks = [r for r in interrupts if r["vector"] == 0x20]
    assert len(ticks) >= 50
    assert [r["at"] for r in interrupts] == sorted(r["at"] for r in interrupts)
    for _ in range(2):
        rerun = vmtrace("rerun", trace, "--json")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert json.loads(rerun.stdout)["identical"] is True


def test_a_recording_with_the_in_kernel_pit_diverges_and_names_interrupt_timing(vmsup, tmp_path):
    keys = tmp_path / "enter.keys"
    keys.write_text("Enter\n")
    trace = str(tmp_path / "pit.trace")
    proc = vmsup("launch", "mbkernel", "--keys", str(keys), "--cmdline", "maxticks=50", "--quiet", "--trace", trace)
    assert proc.returncode == 0, proc.stderr
    rerun = vmtrace("rerun", trace, "--json")
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr
    result = json.loads(rerun.stdout)
    assert result["cause"] == "interrupt timing: the in-kernel PIT was in use; record with --deterministic"


@pytest.mark.parametrize("flags, words", [
    (("--vcpus", "2"), "--vcpus 2"),
    (("--record-only", "reason=io"), "--record-only"),
    (("--irqchip",), "--irqchip"),
])
def test_deterministic_refuses_what_it_cannot_honour_before_start(vmsup, flags, words):
    proc = vmsup("launch", "mbkernel", "--deterministic", *flags)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--deterministic" in proc.stderr and words in proc.stderr
