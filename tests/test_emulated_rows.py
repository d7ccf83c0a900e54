"""Instructions the VMM's fallback emulator performed are rows of their own in the trace
(schema.EMULATED_COLUMNS, messages.EmulatedInstructions), each linked to the exit that led to it,
which stays the exit; `vmtrace summary` counts them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_vmsup
from test_launch_guests import assert_status, status_of
from test_vmtrace_cli import vmtrace
from tracetool import messages, schema
from tracetool.emulated import emulated_columns, emulated_counts, instruction_bytes
from tracetool.trace import TraceReader
from vmworker.emulate.fallback import InsnFallback, Performed
from vmworker.event_batch import ROW, EventBatcher


class _Collect:
    """A publisher that keeps what the batcher sends, decoded as the recorder would."""

    def __init__(self) -> None:
        self.sent: list[messages.Message] = []

    def send(self, msg: dict) -> None:
        self.sent.append(messages.unpack(messages.pack(messages.decode(msg))))


def test_the_trace_names_every_family_the_fallback_has():
    assert set(InsnFallback(memory=None).counts) == set(schema.EMULATED_FAMILIES)


def test_emulated_rows_go_out_before_the_exit_batch_linked_to_their_exit():
    bus = _Collect()
    batcher = EventBatcher(bus, vm=1, vcpu=0, epoch=0)
    # Two exit rows (the fresh buffer's zeros); the instructions were performed at the second.
    batcher.add_emulated(ROW.size, [Performed(0x1000, b"\xd9\xe8", "x87"), Performed(0x1002, b"\x9b", "fwait")])
    batcher.flush(2 * ROW.size)
    assert [type(m) for m in bus.sent] == [messages.EmulatedInstructions, messages.ExitBatch]
    rows = bus.sent[0]
    cols = {c.name: np.frombuffer(rows.cols[c.name], np.dtype(c.dtype)) for c in schema.EMULATED_COLUMNS}
    assert rows.count == 2 and cols["exit_seq"].tolist() == [1, 1]
    assert cols["address"].tolist() == [0x1000, 0x1002]
    assert [instruction_bytes(cols, i) for i in range(2)] == [b"\xd9\xe8", b"\x9b"]
    assert [schema.EMULATED_FAMILIES[f] for f in cols["family"]] == ["x87", "fwait"]


def _record(tmp_path, *args):
    trace = tmp_path / "t.vmt"
    proc = run_vmsup("launch", *args, "--quiet", "--trace", str(trace), timeout=120)
    assert_status(status_of(proc.stderr.decode()), "guest exit code 0")
    return trace


def _linked_exits(trace):
    """(emulated columns, the reason and rip of the exit each row links to, internal-error exits) of a one-vCPU VM."""
    with TraceReader(str(trace)) as reader:
        ev = reader.exits()
        (stream, cols), = emulated_columns(reader).items()
    idx = np.searchsorted(ev["seq"], cols["exit_seq"])
    assert (ev["seq"][idx] == cols["exit_seq"]).all(), "a row links to an exit the trace does not have"
    return cols, ev["reason"][idx], ev["rip"][idx], int((ev["reason"] == schema.REASON_CODES["internal_error"]).sum())


@pytest.mark.kvm
def test_each_iret_mbkernel_needs_per_tick_is_a_row_at_its_internal_error_exit(kvm_required, tmp_path):
    trace = _record(tmp_path, "mbkernel", "--cmdline", "maxticks=300")
    cols, reasons, rips, internal_errors = _linked_exits(trace)
    assert [schema.EMULATED_FAMILIES[f] for f in set(cols["family"].tolist())] == ["iret"]
    assert len(cols["family"]) == internal_errors == 300
    assert (reasons == schema.REASON_CODES["internal_error"]).all()
    assert (rips == cols["address"]).all()  # the exit's rip is the instruction performed there
    assert {instruction_bytes(cols, i) for i in range(len(cols["address"]))} == {b"\xcf"}
    with TraceReader(str(trace)) as reader:
        assert emulated_counts(reader) == {"total": 300, "exits": 300, "by_family": {"iret": 300}}


@pytest.mark.kvm
def test_x87calc_runs_of_x87_instructions_are_rows_counted_by_vmtrace_summary(kvm_required, tmp_path):
    trace = _record(tmp_path, "x87calc")
    cols, reasons, rips, internal_errors = _linked_exits(trace)
    assert (reasons == schema.REASON_CODES["internal_error"]).all()
    first = np.r_[True, cols["exit_seq"][1:] != cols["exit_seq"][:-1]]
    assert int(first.sum()) == internal_errors  # every internal-error exit was one run, nothing else
    assert (rips[first] == cols["address"][first]).all()
    # Within one exit's run the instructions follow each other in memory (x87 never jumps).
    follows = cols["address"][1:] == cols["address"][:-1] + cols["length"][:-1]
    assert follows[~first[1:]].all()
    assert instruction_bytes(cols, 0) + instruction_bytes(cols, 1) == bytes.fromhex("9bdbe3")  # finit
    by_family = {}
    for f in cols["family"].tolist():
        by_family[schema.EMULATED_FAMILIES[f]] = by_family.get(schema.EMULATED_FAMILIES[f], 0) + 1
    assert len(cols["family"]) > internal_errors  # runs: several instructions in one exit

    proc = vmtrace("summary", str(trace), "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["emulated"] == {"total": len(cols["family"]), "exits": internal_errors,
                                                   "by_family": dict(sorted(by_family.items(), key=lambda kv: -kv[1]))}
    text = vmtrace("summary", str(trace)).stdout
    families = ", ".join(f"{k} {n}" for k, n in sorted(by_family.items(), key=lambda kv: -kv[1]))
    assert f"emulated by vmsup: {len(cols['family'])} instructions ({families}) in {internal_errors} exits" in text

    shown = vmtrace("show", str(trace), "--reason", "internal_error", "--limit", "1").stdout.splitlines()
    first_two = cols["address"][:2].tolist()
    assert shown[1:3] == [f"  emulated by vmsup: fwait 9b at {first_two[0]:#x}",
                          f"  emulated by vmsup: x87 db e3 at {first_two[1]:#x}"]


@pytest.mark.kvm
def test_a_ring3_int_is_a_row_under_the_shutdown_exit_that_stays_the_exit(kvm_required, tmp_path):
    trace = _record(tmp_path, "int80_32")
    cols, reasons, rips, _ = _linked_exits(trace)
    families = [schema.EMULATED_FAMILIES[f] for f in cols["family"].tolist()]
    at_shutdown = reasons == schema.REASON_SHUTDOWN
    assert at_shutdown.any() and {f for f, s in zip(families, at_shutdown) if s} == {"int"}
    assert (rips == cols["address"]).all()
    assert families.count("int") == families.count("iret")  # every interrupt returned
