"""Coalesced I/O (vmworker/coalesce.py): writes KVM queues in its ring instead of exiting.

Real VMs, real KVM rings, real trace files; the kernel's kvm_pio tracepoint is the oracle: it
fires for every guest port access, coalesced or not, so kvm_pio = io exits + coalesced writes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, VMSUP
from tests.test_recording import _perf_counts, assert_counts_up_from_zero, perf  # noqa: F401  (a fixture)
from tracetool import schema
from tracetool.coalesced import coalesced_columns
from tracetool.trace import TraceReader
from vmworker import insn_counter
from vmworker.coalesce import check_zones, kernel_zone, parse_zone, ring_slots, _standard_buses
from vmworker.errors import SpecError


def seed_writes_in_program_order(reader) -> np.ndarray:
    """Every value the seed guest wrote to port 0x10, exits and coalesced writes merged: a drained
    write came before the exit that drained it (its exit_seq), and the ring keeps their order."""
    ev = reader.exits()
    (stream, cols), = coalesced_columns(reader).items()
    exit_io = (ev["reason"] == schema.REASON_IO) & (ev["addr"] == 0x10)
    seq = np.concatenate([cols["exit_seq"], ev["seq"][exit_io]])
    after = np.concatenate([np.zeros(len(cols["exit_seq"]), np.uint8), np.ones(int(exit_io.sum()), np.uint8)])
    values = np.concatenate([cols["data"], ev["data"][exit_io]])
    order = np.lexsort((np.arange(len(seq)), after, seq))  # by exit, drained writes first, each in ring order
    return values[order]


def test_zones_name_ports_and_mmio_ranges():
    assert parse_zone("0x10") == (True, 0x10, 0x10)
    assert parse_zone("0x80-0x80") == (True, 0x80, 0x80)
    assert parse_zone("mmio:0xd0000000-0xd0000fff") == (False, 0xD000_0000, 0xD000_0FFF)
    for bad in ("", "x", "0x10-", "0x20-0x10", "0x10000", "mmio:", "1-2-3"):
        with pytest.raises(SpecError):
            parse_zone(bad)


def test_a_port_zone_widens_for_word_writes_but_never_into_a_device_that_reads_back():
    port_bus, _ = _standard_buses()
    assert kernel_zone(parse_zone("0x10"), port_bus) == (0x10, 4)  # 0x11-0x13 belong to no device
    assert kernel_zone(parse_zone("0xe9"), port_bus) == (0xE9, 4)


def test_only_claimed_ports_of_devices_whose_writes_may_wait_are_accepted():
    assert check_zones(["0x10", "0xe9", "0x80"]) == ["0x10", "0xe9", "0x80"]
    for bad, words in (("0x3f8", "overlaps com1"), ("0x3f0-0x3ff", "overlaps com1"), ("0x60", "overlaps i8042"),
                       ("0x11", "belongs to no device"), ("0x10-0x11", "belongs to no device"),
                       ("mmio:0xd0000000", "overlaps mmio-test"), ("mmio:0x1000", "belongs to no device")):
        with pytest.raises(SpecError, match=words):
            check_zones([bad])


def test_the_ring_holds_what_fits_in_a_page_after_its_head():
    assert ring_slots(4096) == 170  # (4096 - 8) / 24, KVM_COALESCED_MMIO_MAX with 4 KiB pages


@pytest.mark.parametrize("value", ["0x3f8", "0x60", "0x11", "mmio:0xd0000000", "0x10-x"])
def test_bad_coalesce_is_one_line_and_exit_2_before_any_vm(vmsup, tmp_path, value):
    trace = tmp_path / "never.vmtrace"
    proc = vmsup("launch", "seed16", "--coalesce", value, "--max-exits", "10", "--trace", str(trace))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("vmsup: error: --coalesce")
    assert "Traceback" not in proc.stderr and not trace.exists()


@pytest.mark.kvm
def test_coalesced_writes_are_recorded_in_order_and_are_not_exits(vmsup, tmp_path):
    trace = tmp_path / "c.vmtrace"
    proc = vmsup("launch", "seed16", "--coalesce", "0x10", "--coalesce", "0xe9", "--max-exits", "300", "-q",
                 "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert f"trace {trace}: 300 events" in proc.stderr  # exits only
    with TraceReader(trace) as r:
        assert r.gaps == []
        ev = r.exits()
        cols, = coalesced_columns(r).values()
        values = seed_writes_in_program_order(r)
        end, = r.records(schema.MSG_VM_END)
    assert len(ev["seq"]) == 300 and end["exits"] == 300
    assert len(cols["addr"]) > 300  # most writes never exited
    assert set(cols["pio"].tolist()) == {1} and set(cols["size"].tolist()) == {2}
    assert_counts_up_from_zero(values)
    # Linked to the exit that drained them, at an interval of exact times that holds that exit.
    assert np.all(np.diff(cols["exit_seq"].astype(np.int64)) >= 0) and int(cols["exit_seq"].max()) < 300
    t_exit = ev["t_exit"][cols["exit_seq"].astype(np.int64)]
    assert np.all(cols["t_after"] < cols["t_before"]) and np.all(cols["t_before"] >= t_exit)


@pytest.mark.kvm
def test_summary_shows_the_exits_coalescing_avoided(vmsup, tmp_path):
    trace = tmp_path / "s.vmtrace"
    assert vmsup("launch", "seed16", "--coalesce", "0x10", "--max-exits", "50", "-q", "--trace", str(trace)).returncode == 0
    with TraceReader(trace) as r:
        n = len(next(iter(coalesced_columns(r).values()))["addr"])
    proc = vmsup_trace("summary", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert f"exits avoided: {n} coalesced writes" in proc.stdout and f"port 0x10: {n}" in proc.stdout
    assert "50 events" in proc.stdout


def vmsup_trace(*args: str) -> subprocess.CompletedProcess:
    import sys
    return subprocess.run([sys.executable, "-m", "tracetool", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, "COLUMNS": "200"})


@pytest.mark.kvm
def test_kernel_counts_every_port_write_as_an_exit_or_a_coalesced_write(perf, tmp_path):
    trace = tmp_path / "k.vmtrace"
    proc = subprocess.run(["perf", "stat", "-x,", "-e", "kvm:kvm_pio,kvm:kvm_userspace_exit", "--",
                           *VMSUP, "launch", "seed16", "--coalesce", "0x10", "--max-exits", "2000", "-q",
                           "--trace", str(trace)],
                          cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stderr
    kernel = _perf_counts(proc.stderr)
    with TraceReader(trace) as r:
        assert r.gaps == []
        ev = r.exits()
        cols, = coalesced_columns(r).values()
        probe_exits = r.run[insn_counter.PROBE_HEADER_KEY]
        values = seed_writes_in_program_order(r)
    io_exits = int(np.sum(ev["reason"] == schema.REASON_IO))
    assert io_exits + len(cols["addr"]) == kernel["kvm:kvm_pio"]
    assert len(ev["seq"]) + probe_exits == kernel["kvm:kvm_userspace_exit"]  # coalesced writes never exit
    assert_counts_up_from_zero(values)


def test_fleet_key_takes_a_list_or_a_comma_list_and_refuses_a_device_that_reads_back(tmp_path):
    from supervisor.fleet import FleetError, load_fleet
    good = tmp_path / "good.toml"
    good.write_text('[[vm]]\nguest = "seed16"\ncoalesce = ["0x10", "0xe9"]\n\n'
                    '[[vm]]\nguest = "seed16"\nname = "b"\ncoalesce = "0x10,0x80"\n')
    a, b = load_fleet(str(good))
    assert (a.coalesce, b.coalesce) == (["0x10", "0xe9"], ["0x10", "0x80"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[[vm]]\nguest = "seed16"\ncoalesce = ["0x60"]\n')
    with pytest.raises(FleetError, match=r"bad.toml:3: .*overlaps i8042"):
        load_fleet(str(bad))
