"""The VGA text screen: CRTC cursor, snapshots in the trace (bounded rate), `vmtrace screen`,
keys typed through the worker's input socket, and `vmsup screen` on a VM without VGA."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import REPO, VMSUP
from tracetool import schema
from tracetool.screen import (SCREEN_BYTES, ansi_lines, decode_cells, encode_cells, is_blank, text_lines,
                              validate_screen)
from tracetool.trace import TraceReader
from vmworker.devices.vga import VgaCrtc, VgaTextScreen
from vmworker.layout import VGA_TEXT_BUFFER as TEXT_BUFFER_GPA
from vmworker.memory import GuestMemory
from vmworker.screen import SAMPLE_INTERVAL, ScreenSampler

BANNER = "mbkernel: hello from a multiboot kernel"


def _cells(text_rows: dict[int, str], attr: int = 0x07) -> bytearray:
    cells = bytearray(b" \x07" * (SCREEN_BYTES // 2))
    for row, text in text_rows.items():
        for col, ch in enumerate(text):
            cells[2 * (row * 80 + col):2 * (row * 80 + col) + 2] = bytes((ord(ch), attr))
    return cells


# --- without KVM -------------------------------------------------------------------------------
def test_crtc_cursor_follows_byte_and_word_writes_and_hides_with_cursor_start_bit5():
    crtc = VgaCrtc()
    crtc.write(0, b"\x0e"), crtc.write(1, b"\x00")
    crtc.write(0, b"\x0f"), crtc.write(1, bytes((3 * 80 + 7,)))
    assert crtc.cursor() == (3, 7)
    crtc.write(0, (0x0F | (81 << 8)).to_bytes(2, "little"))  # out %ax, $0x3d4: index and data at once
    assert crtc.cursor() == (1, 1)
    assert crtc.read(1, 1) == bytes((81,))
    crtc.write(0, b"\x0a"), crtc.write(1, b"\x20")
    assert crtc.cursor() is None


def test_text_screen_reads_the_buffer_in_guest_ram():
    mem = GuestMemory.with_ram(1 << 20)
    try:
        mem.write(TEXT_BUFFER_GPA, bytes(_cells({0: "hello", 24: "last row"})))
        screen = VgaTextScreen(mem, VgaCrtc())
        assert VgaTextScreen.available(mem)
        lines = screen.text()
        assert lines[0] == "hello" and lines[24] == "last row" and len(lines) == 25
    finally:
        mem.close()


def test_snapshot_cells_round_trip_and_bad_ones_are_refused():
    cells = bytes(_cells({2: "abc"}, attr=0x1F))
    assert decode_cells(encode_cells(cells)) == cells
    assert "\x1b[97;44mabc" in ansi_lines(cells)[2]  # VGA white on blue → ANSI bright white on blue
    assert is_blank(bytes(SCREEN_BYTES)) and not is_blank(cells)
    msg = {"vm": 0, "epoch": 0, "t": 1, "cols": 80, "rows": 25, "cursor": [2, 3], "cells": encode_cells(cells)}
    assert validate_screen(msg).lines()[2] == "abc"
    for bad in ({"cells": encode_cells(cells[:-2])}, {"cells": b"garbage"}, {"cursor": [25, 0]},
                {"cols": 132}, {"cells": encode_cells(bytes(1 << 20))}):
        with pytest.raises(schema.SchemaError):
            validate_screen({**msg, **bad})


def test_sampler_sends_only_changes_and_nothing_while_blank():
    mem = GuestMemory.with_ram(1 << 20)
    sent = []
    try:
        sampler = ScreenSampler(VgaTextScreen(mem, VgaCrtc()), None, 0, 0, on_snapshot=sent.append)
        assert not sampler.sample()  # blank: an ordinary guest costs nothing
        mem.write(TEXT_BUFFER_GPA, b"X\x07")
        assert sampler.sample() and not sampler.sample()  # unchanged: nothing
        sampler.refresh()
        assert sampler.sample()  # a viewer asked
        assert len(sent) == 2 and text_lines(decode_cells(sent[0]["cells"]))[0] == "X"
    finally:
        mem.close()


def test_terminal_bytes_become_key_names():
    from supervisor.screen_view import terminal_keys
    assert terminal_keys(b"aB1\r\x7f\x1b[A\x1b\x03") == ["a", "shift+b", "1", "enter", "backspace", "up", "escape",
                                                          "ctrl+c"]


def test_the_screen_view_shows_all_80_columns_and_25_rows_in_an_80x24_terminal():
    import io

    from rich.console import Console

    from supervisor.screen_cli import serial_note
    from supervisor.screen_view import framed, render_panel
    from tracetool.screen import COLS, ROWS, Snapshot
    rows = [f"{r:02d}" + "".join(chr(ord("A") + (r + c) % 26) for c in range(COLS - 6)) + "|END" for r in range(ROWS)]
    cells = bytes(b for line in rows for ch in line.encode() for b in (ch, 0x07))
    snap = Snapshot(vm=0, epoch=0, t=0, cells=cells, cursor=None)
    small = Console(file=io.StringIO(), width=80, height=24, color_system=None)
    assert not framed(small)  # a frame would cut the last 4 columns
    small.print(render_panel(snap, "mbkernel", "typing goes to the guest", frame=framed(small)))
    assert small.file.getvalue().splitlines() == rows
    big = Console(file=io.StringIO(), width=120, height=40, color_system=None)
    assert framed(big)
    big.print(render_panel(snap, "mbkernel", frame=framed(big)))
    assert all(row in big.file.getvalue() for row in rows) and "mbkernel" in big.file.getvalue()
    assert serial_note("t.hello.console") == "the guest's serial output goes to t.hello.console"


# --- with KVM ----------------------------------------------------------------------------------
def _snapshots(trace) -> list:
    with TraceReader(trace) as reader:
        return [validate_screen(r) for r in reader.records(schema.MSG_SCREEN)], reader.records(schema.MSG_INPUT), \
            reader.records(schema.MSG_VM_START), reader.records(schema.MSG_VM_END)


@pytest.mark.kvm
def test_mbkernel_screen_is_in_the_trace_and_vmtrace_screen_prints_it(vmsup, tmp_path):
    trace = tmp_path / "mb.vmtrace"
    proc = vmsup("launch", "mbkernel", "--trace", str(trace), "-q", "--serial-in", "none")
    assert proc.returncode == 0, proc.stderr
    snaps, _, _, _ = _snapshots(trace)
    assert snaps and any(BANNER in s.lines()[0] for s in snaps)
    assert "ticks: 300" in "\n".join(snaps[-1].lines())  # the last screen, sampled as the VM ended
    shown = subprocess.run([*VMSUP[:1], "-m", "tracetool", "screen", str(trace)], capture_output=True, text=True,
                           cwd=REPO, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == BANNER and "ticks: 300" in shown.stdout
    first = subprocess.run([*VMSUP[:1], "-m", "tracetool", "screen", str(trace), "--at", "0", "--json"],
                           capture_output=True, text=True, cwd=REPO, timeout=30)
    assert first.returncode in (0, 2)  # at 0 s the kernel may not have drawn yet: then one clear line
    if first.returncode == 2:
        assert "no screen snapshot at or before 0" in first.stderr


FLOOD = """
    .code32
    .globl _start
_start:
    xor %eax, %eax
1:  inc %eax
    mov %eax, 0xB8000        # the first two cells change on every iteration
    jmp 1b
"""


@pytest.mark.kvm
def test_snapshot_rate_stays_bounded_for_a_guest_rewriting_the_screen_constantly(vmsup, tmp_path):
    src, obj, img = tmp_path / "flood.S", tmp_path / "flood.o", tmp_path / "flood.bin"
    src.write_text(FLOOD)
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "--oformat", "binary", "-Ttext", "0x10000", "-o", str(img), str(obj)],
                   check=True)
    trace = tmp_path / "flood.vmtrace"
    proc = vmsup("launch", str(img), "--mode", "protected", "--timeout", "2.5", "-q", "--trace", str(trace))
    assert "timeout" in proc.stderr, proc.stderr
    snaps, _, starts, ends = _snapshots(trace)
    duration = (ends[0]["t"] - starts[0]["t"]) / 1e9
    # One sample per interval while the VM runs, plus the last one as it ends.
    assert 3 <= len(snaps) <= duration / SAMPLE_INTERVAL + 1, (len(snaps), duration)


def _wait_for(cond, deadline_s: float, what: str):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.kvm
def test_keys_typed_through_the_input_socket_reach_the_guest_and_are_recorded(vmsup, tmp_path):
    trace = tmp_path / "keys.vmtrace"
    started = vmsup("launch", "mbkernel", "--cmdline", "maxticks=0", "--timeout", "30", "--trace", str(trace), "-d")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    # Type once the kernel is ready (it empties the 8042's buffer while it sets up).
    _wait_for(lambda: "ready:" in vmsup("screen", "mbkernel", "--run", run_id, "--once").stdout, 20, "ready:")
    # `vmsup screen` reads the bytes of a piped stdin as typed keys; it follows the VM to its end.
    shown = vmsup("screen", "mbkernel", "--run", run_id, input=b"hi\rq", timeout=40)
    assert shown.returncode == 0, shown.stderr
    assert "enter at tick" in shown.stdout
    _wait_for(lambda: trace.exists() and _snapshots(trace)[3], 15, "the trace's vm-end")
    snaps, inputs, _, ends = _snapshots(trace)
    assert ends[0]["guest_code"] == 0  # `q` quits with exit code 0
    text = "\n".join(snaps[-1].lines())
    assert "hi" in text and "enter at tick" in text and "ticks:" in text
    assert [(r["key"], r["scancodes"]) for r in inputs] == [
        ("h", b"\x23\xa3"), ("i", b"\x17\x97"), ("enter", b"\x1c\x9c"), ("q", b"\x10\x90")]


@pytest.mark.kvm
def test_vmsup_screen_on_a_vm_without_vga_says_so_in_one_line(vmsup):
    started = vmsup("launch", "seed16", "-q", "--no-trace", "--timeout", "30", "-d")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    try:
        proc = vmsup("screen", "seed16", "--run", run_id, "--wait", "1.5")
        assert proc.returncode == 2
        assert proc.stderr.strip() == "vmsup: error: VM seed16 has no VGA screen (no snapshot within 1.5 s)"
    finally:
        vmsup("stop", "--all", "--run", run_id)


@pytest.mark.kvm
def test_launch_screen_in_a_terminal_types_keys_into_the_guest(tmp_path):
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios

    trace = tmp_path / "pty.vmtrace"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([*VMSUP, "launch", "mbkernel", "--screen", "--cmdline", "maxticks=0", "--timeout", "30",
                             "--trace", str(trace)], stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                            start_new_session=True)
    os.close(slave)
    out, typed = b"", 0  # 0: waiting for ready, 1: typed a line, 2: typed q
    deadline = time.monotonic() + 40
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the other side closed
                    break
                if not chunk:
                    break
                out += chunk
            if not typed and b"ready:" in out:
                os.write(master, b"hey\r")
                typed = 1
            elif typed == 1 and b"enter at tick" in out:  # the guest echoed; now quit it
                os.write(master, b"q")
                typed = 2
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    snaps, inputs, _, _ = _snapshots(trace)
    assert [r["key"] for r in inputs] == ["h", "e", "y", "enter", "q"]
    assert "enter at tick" in "\n".join(snaps[-1].lines())
