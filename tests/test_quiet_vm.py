"""A VM that makes no exit for a while is told once, in the foreground and under the fleet table
(supervisor/quiet.py): a spinning guest must not look like a hung vmsup."""

from __future__ import annotations

import pytest

from supervisor.quiet import QUIET_SECONDS, QUIET_TEXT, QuietWatch


def test_a_vm_whose_count_stands_still_is_told_once_after_the_quiet_time():
    watch = QuietWatch()
    assert watch.update(0.0, [(0, 0, 0, True)]) == []
    assert watch.update(QUIET_SECONDS - 0.1, [(0, 0, 0, True)]) == []
    assert watch.update(QUIET_SECONDS, [(0, 0, 0, True)]) == [0]
    assert watch.update(QUIET_SECONDS * 3, [(0, 0, 0, True)]) == []  # once


def test_exits_paused_vms_and_new_epochs_restart_the_clock():
    watch = QuietWatch()
    watch.update(0.0, [(0, 0, 5, True), (1, 0, 0, True), (2, 0, 0, True)])
    # VM 0 made exits, VM 1 was paused for a while, VM 2 restarted as epoch 1.
    watch.update(4.0, [(0, 0, 9, True), (1, 0, 0, False), (2, 1, 0, True)])
    assert watch.update(QUIET_SECONDS + 1.0, [(0, 0, 9, True), (1, 0, 0, True), (2, 1, 0, True)]) == []
    assert watch.update(4.0 + QUIET_SECONDS, [(0, 0, 9, True), (1, 0, 0, True), (2, 1, 0, True)]) == [0, 1, 2]


def _lines_with_quiet_text(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if QUIET_TEXT in line]


@pytest.mark.kvm
def test_a_foreground_guest_spinning_without_exits_is_told_once_on_stderr(vmsup):
    # protected32 entered in long mode runs off into code that never exits (issue 10, item 13).
    proc = vmsup("launch", "protected32", "--mode", "long", "--timeout", str(QUIET_SECONDS + 3), "--no-trace")
    assert _lines_with_quiet_text(proc.stderr) == [f"vmsup: protected32: {QUIET_TEXT}"], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.kvm
def test_each_quiet_vm_of_a_fleet_is_told_once(vmsup):
    proc = vmsup("launch", "protected32", "--mode", "long", "--vms", "2", "--timeout", str(QUIET_SECONDS + 3),
                 "--no-trace")
    assert sorted(_lines_with_quiet_text(proc.stderr)) == [f"vmsup: protected32-{i}: {QUIET_TEXT}" for i in (0, 1)]


@pytest.mark.kvm
def test_a_guest_that_keeps_exiting_is_never_called_quiet(vmsup):
    proc = vmsup("launch", "seed16", "-q", "--timeout", str(QUIET_SECONDS + 2), "--no-trace")
    assert _lines_with_quiet_text(proc.stderr) == []
