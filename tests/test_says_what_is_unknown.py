"""Say what is unknown: a VM a trace does not have is named with the ones it has (exit 2), a
gap shows in verify's text, and a divergence before A's first event has one sign."""

from __future__ import annotations

import numpy as np
import pytest

from test_trace_file import RUN, seed_like_columns
from test_vmtrace_cli import assert_one_error_line, vmtrace
from tracetool import schema
from tracetool.commands import diff
from tracetool.trace import TraceWriter


@pytest.fixture(scope="module")
def two_vms(tmp_path_factory):
    """vm 0 seed16 and vm 1 hello, with a recorded gap of 100 events in vm 0."""
    path = tmp_path_factory.mktemp("unknown") / "two.vmtrace"
    rng = np.random.default_rng(5)
    with TraceWriter(path, RUN, block_events=100) as w:
        for vm, name in ((0, "seed16"), (1, "hello")):
            w.write_record(schema.MSG_VM_START, {"vm": vm, "epoch": 0, "name": name, "sha256": "5e" * 32, "t": 10**12})
        cols = seed_like_columns(300, rng, t0=10**12)
        w.write_exits(0, 0, 0, 0, 100, {k: v[:100] for k, v in cols.items()})
        w.write_record(schema.MSG_GAP, {"vm": 0, "vcpu": 0, "epoch": 0, "first_missing": 100, "count": 100,
                                        "cause": "recorder queue full"})
        w.write_exits(0, 0, 0, 200, 100, {k: v[200:] for k, v in cols.items()})
        w.write_exits(1, 0, 0, 0, 100, seed_like_columns(100, rng, t0=10**12 + 5))
    return path


@pytest.mark.parametrize("command", [("show",), ("summary",), ("replay", "--speed", "inf"),
                                     ("export", "--format", "csv", "-o", "-"), ("console",), ("kvm-stats",)])
def test_a_vm_the_trace_does_not_have_is_an_error_naming_its_vms(two_vms, command):
    proc = vmtrace(command[0], two_vms, *command[1:], "--vm", "9")
    assert_one_error_line(proc, "vm 9", "its VMs: 0 (seed16), 1 (hello)")


def test_a_vm_the_trace_has_is_not_refused(two_vms):
    proc = vmtrace("show", two_vms, "--vm", "1", "--limit", "3")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3


def test_verify_says_in_text_that_the_trace_has_a_gap(two_vms):
    proc = vmtrace("verify", two_vms)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok, gap = proc.stdout.splitlines()
    assert ": ok: " in ok
    assert "1 gap recorded, 100 events lost" in gap and "vm 0 vcpu 0 from seq 100" in gap, gap
    assert "recorder queue full" in gap


def test_a_time_before_the_first_event_has_one_sign():
    assert diff.signed_seconds(-28_615_055_000) == "-28.615055"
    assert diff.signed_seconds(1_500_000_000) == "+1.500000"
    line = diff._divergence_line({"vm": 0, "vcpu": 0, "epoch": 0, "seq": 3, "t_rel_ns": -28_615_055_000,
                                  "field": "event", "a": None, "b": "io"})
    assert "(t=-28.615055 s)" in line and "+-" not in line
