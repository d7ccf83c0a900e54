"""`vmtrace rerun --gdb`: Debian's real gdb on a rerun, forwards and backwards.

Guests are recorded with `vmsup launch`, rerun by the `vmtrace` CLI (its worker serves the gdb stub
of vmworker/gdb/), and driven by `gdb -batch` or raw RSP packets. Nothing is mocked.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from test_gdb_stub import GDB_TIMEOUT, _connect, _exchange, _packet, free_port
from test_rerun import forge_embedded_image, guest_exits, record
from tracetool import schema
from tracetool.trace import TraceReader
from vmworker.gdb import packets as P

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("gdb") is None, reason="no gdb on PATH (apt-get install gdb)")]

# protected32.S: putc polls the UART with `inb %dx,%al` and writes the character with `outb %al,%dx`.
# Both are one byte (opcodes EC and EE, SDM Vol. 2A "IN"/"OUT").
IO_INSN_BYTES = 1


class RerunUnderGdb:
    """`vmtrace rerun TRACE --gdb PORT --json [ARGS]` as a process, once its stub listens."""

    def __init__(self, trace: str, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "tracetool", "rerun", trace, "--gdb", str(self.port),
                                      "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=REPO)
        self.stderr: list[str] = []
        self.listening = threading.Event()
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        assert self.listening.wait(GDB_TIMEOUT), "".join(self.stderr)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            if "gdb stub on" in line:
                self.listening.set()

    def gdb(self, *commands: str) -> str:
        argv = ["gdb", "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{self.port}"]
        for c in commands:
            argv += ["-ex", c]
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=GDB_TIMEOUT).stdout

    def result(self) -> tuple[int, dict]:
        out, _ = self.proc.communicate(timeout=GDB_TIMEOUT)
        return self.proc.returncode, json.loads(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def rerun_gdb():
    runs: list[RerunUnderGdb] = []

    def start(trace: str, *args: str) -> RerunUnderGdb:
        run = RerunUnderGdb(trace, *args)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def values(out: str) -> list[int]:
    """The values of gdb's `$N = 0x...` lines, in order."""
    return [int(m.group(1), 16) for m in re.finditer(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)]


def registers(out: str) -> dict[str, int]:
    """`info registers` lines → {name: value}."""
    return {m.group(1): int(m.group(2), 16) for m in re.finditer(r"^(\w+)\s+(0x[0-9a-f]+)", out, re.M)}


def recorded_rip(trace: str, seq: int) -> int:
    with TraceReader(trace) as reader:
        exits = reader.exits()
    row = list(exits[schema.SEQ_COLUMN.name]).index(seq)
    return int(exits["rip"][row])


GPRS = "rip rax rbx rcx rdx rsi rdi rsp rbp eflags"


def test_rerun_to_seq_under_gdb_stops_where_the_rerun_stops_with_its_registers(vmsup, tmp_path, rerun_gdb):
    trace = record(vmsup, tmp_path, "protected32")
    plain = subprocess.run([sys.executable, "-m", "tracetool", "rerun", trace, "--to-seq", "9", "--json"],
                           capture_output=True, text=True, cwd=REPO, timeout=GDB_TIMEOUT)
    want = json.loads(plain.stdout)["registers"]
    run = rerun_gdb(trace, "--to-seq", "9")
    assert "stopped before seq 9" in "".join(run.stderr)
    got = registers(run.gdb(f"info registers {GPRS}", "detach"))
    # Exit 8 is the `inb` at its recorded address; stopped before exit 9, the guest is past it.
    assert got["rip"] == recorded_rip(trace, 8) + IO_INSN_BYTES == want["rip"]
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"):
        assert got[name] == want[name], name
    code, result = run.result()  # detached: the rerun goes on to the end of the recording
    assert code == 0 and result["identical"] is True and result["exits"] == guest_exits(trace)


def test_reverse_stepi_n_times_then_stepi_n_times_returns_to_the_same_registers(vmsup, tmp_path, rerun_gdb):
    trace = record(vmsup, tmp_path, "protected32")
    run = rerun_gdb(trace, "--to-seq", "9")
    n = 12  # back over several exits (an OUT, an IN) and the instructions between them
    regs = [f"p/x ${name}" for name in GPRS.split()]
    out = run.gdb(*regs, *["reverse-stepi", "p/x $pc"] * n, *regs, *["stepi", "p/x $pc"] * n, *regs, "detach")
    got = values(out)
    k = len(regs)
    before, backwards = got[:k], got[k:k + n]
    back, forwards, again = got[k + n:2 * k + n], got[2 * k + n:2 * k + 2 * n], got[2 * k + 2 * n:]
    assert len(set(backwards)) > 3  # it really went back through the code
    assert again == before
    assert back != before and back[0] == backwards[-1]
    assert forwards == backwards[::-1][1:] + [before[0]]  # the same instructions, the other way
    code, result = run.result()
    assert code == 0 and result["identical"] is True and result["restores"] >= n


@pytest.mark.parametrize("kind", ["hbreak", "break"])
def test_reverse_continue_lands_on_the_previous_breakpoint_hit(vmsup, tmp_path, rerun_gdb, kind):
    trace = record(vmsup, tmp_path, "protected32")
    out_at = recorded_rip(trace, 1)  # putc's `outb`: one hit per character printed
    run = rerun_gdb(trace, "--to-seq", "4")
    out = run.gdb(f"{kind} *{out_at:#x}", "continue", "p/x $al", "continue", "p/x $al", "continue", "p/x $al",
                  "reverse-continue", "p/x $al", "p/x $pc", "reverse-continue", "p/x $al", "continue", "p/x $al",
                  "detach")
    first, second, third, back1, pc, back2, fwd = values(out)
    text = b"protected32: sum"
    assert (first, second, third) == tuple(text[2:5])  # stopped before seq 4: 'o' is the third character
    assert (back1, pc) == (second, out_at)
    assert back2 == first
    assert fwd == second
    code, result = run.result()
    assert code == 0 and result["identical"] is True


def test_reverse_at_the_start_is_replaylog_begin_and_bad_reverse_packets_get_errors(vmsup, tmp_path, rerun_gdb):
    trace = record(vmsup, tmp_path, "protected32")
    run = rerun_gdb(trace)  # no --to-seq: stopped at the start
    with _connect(run.port) as sock:
        reader = P.PacketReader()
        kind, features = _exchange(sock, reader, _packet(b"qSupported:swbreak+;hwbreak+"))
        assert b"ReverseStep+" in features and b"ReverseContinue+" in features
        for bad in (b"b", b"bsx", b"bc0", b"bs;1"):
            assert _exchange(sock, reader, _packet(bad)) == ("packet", b"E01")
        for reverse in (b"bs", b"bc"):
            kind, reply = _exchange(sock, reader, _packet(reverse))
            assert reply.startswith(b"T05") and b"replaylog:begin;" in reply
        kind, regs = _exchange(sock, reader, _packet(b"g"))  # still serving, at the entry
        assert kind == "packet" and len(regs) > 100
        assert _exchange(sock, reader, _packet(b"D")) == ("packet", b"OK")
    code, result = run.result()
    assert code == 0 and result["identical"] is True and result["exits"] == guest_exits(trace)


def test_reverse_stepi_at_the_start_tells_gdb_there_is_no_more_history(vmsup, tmp_path, rerun_gdb):
    trace = record(vmsup, tmp_path, "protected32")
    run = rerun_gdb(trace)
    out = run.gdb("reverse-stepi", "p/x $pc", "stepi", "reverse-stepi", "p/x $pc", "detach")
    assert "No more reverse-execution history" in out
    assert values(out) == [0x10000, 0x10000]


def test_a_divergence_in_forward_continuation_under_gdb_is_a_stop_that_names_it(vmsup, tmp_path, rerun_gdb):
    image = tmp_path / "hello.bin"
    shutil.copy(REPO / "guest" / "hello.bin", image)
    trace = record(vmsup, tmp_path, str(image), "--no-embed", "--mode", "real")
    data = bytearray(image.read_bytes())
    data[data.index(b"Hello") + 2] = ord("L")  # the third character written
    forged = forge_embedded_image(trace, tmp_path / "forged.trace", bytes(data))
    run = rerun_gdb(forged)
    out = run.gdb("continue", "p/x $pc", "continue", "reverse-stepi", "p/x $pc", "detach")
    line = "the rerun diverged at seq 5: data recorded 0x6c, now 0x4c"
    assert out.count(line) == 2  # at the divergence, and again when asked to go on from it
    at, back = values(out)
    assert back != at  # backwards from a divergence still works
    code, result = run.result()
    assert code == 1 and (result["seq"], result["field"]) == (5, "data")


def test_a_launched_vm_offers_no_reverse_execution(tmp_path):
    from test_gdb_stub import StubbedVm
    vm = StubbedVm("protected32.bin", "protected")
    try:
        with _connect(vm.port) as sock:
            reader = P.PacketReader()
            kind, features = _exchange(sock, reader, _packet(b"qSupported"))
            assert b"Reverse" not in features
            assert _exchange(sock, reader, _packet(b"bs")) == ("packet", b"E01")
            assert _exchange(sock, reader, _packet(b"D")) == ("packet", b"OK")
        assert vm.result()["status"] == "halted"
    finally:
        vm.close()


def test_time_travel_across_timer_interrupts_of_a_deterministic_kernel(vmsup, tmp_path, rerun_gdb):
    """mbkernel --deterministic: back over a HLT, an injected timer interrupt and vmsup's emulated
    IRET, forward again to the same registers; reverse-continue and reverse-finish by symbol."""
    trace = str(tmp_path / "mb.trace")
    vmsup("launch", "mbkernel", "--deterministic", "--cmdline", "maxticks=20", "--quiet", "--trace", trace)
    with TraceReader(trace) as reader:  # stop just after a timer tick's EOI (`out 0x20`)
        exits = reader.exits()
    eois = [int(s) for s, a, r in zip(exits[schema.SEQ_COLUMN.name], exits["addr"], exits["reason"])
            if a == 0x20 and r == schema.REASON_IO]
    stop = eois[len(eois) // 2] + 1
    run = rerun_gdb(trace, "--to-seq", str(stop))
    elf = str(REPO / "guest" / "mbkernel.elf")
    n = 40
    regs = [f"p/x ${name}" for name in GPRS.split()]
    argv = ["gdb", "-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex", f"file {elf}",
            "-ex", f"target remote 127.0.0.1:{run.port}"]
    for c in (*regs, *["reverse-stepi", "p/x $pc"] * n, *["stepi"] * n, *regs,
              "break isr_dispatch", "continue", "p ticks", "continue", "p ticks", "reverse-continue", "p ticks",
              "reverse-finish", "info symbol $pc", "detach"):
        argv += ["-ex", c]
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=GDB_TIMEOUT).stdout
    got = values(out)
    k = len(regs)
    before, backwards, again = got[:k], got[k:k + n], got[k + n:2 * k + n]
    handler = int(subprocess.run(["nm", elf], capture_output=True, text=True).stdout.split(" t isr32")[0]
                  .rsplit("\n", 1)[-1], 16)
    assert handler + 2 in backwards  # went back into the timer's entry stub (past its 2-byte push)...
    assert again == before  # ...and forward again to the same registers
    ticks = [int(m) for m in re.findall(r"^\$\d+ = (\d+)$", out, re.M)]
    assert ticks[1] == ticks[0] + 1 and ticks[2] == ticks[0]  # reverse-continue: the previous tick's hit
    assert "isr_common" in out.split("reverse-finish")[-1] or "isr_common in section" in out
    code, result = run.result()
    assert code == 0 and result["identical"] is True, result


def test_rerun_gdb_bad_input_is_one_line_and_exit_2(vmsup, tmp_path):
    import socket
    trace = record(vmsup, tmp_path, "protected32")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        for args, words in (([f"{port}"], "cannot listen"), (["nope"], "expected [HOST:]PORT"),
                            ([str(free_port()), "--trace", str(tmp_path / "again.trace")], "--gdb and --trace")):
            proc = subprocess.run([sys.executable, "-m", "tracetool", "rerun", trace, "--gdb", *args],
                                  capture_output=True, text=True, cwd=REPO, timeout=GDB_TIMEOUT)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr


def test_kill_from_gdb_ends_the_rerun_and_says_so(vmsup, tmp_path, rerun_gdb):
    trace = record(vmsup, tmp_path, "protected32")
    run = rerun_gdb(trace, "--to-seq", "3")
    out = run.gdb("stepi", "kill")
    assert "killed" in out
    code, result = run.result()
    assert code == 0 and result["identical"] is True and "killed from gdb" in result["notes"]
    assert result["exits"] == 3


def test_a_deterministic_recording_holds_each_exits_instruction_count_and_a_rerun_compares_it(vmsup, tmp_path):
    from test_rerun import vmtrace
    from tests.trace_copy import copy_trace
    trace = str(tmp_path / "mb.trace")
    vmsup("launch", "mbkernel", "--deterministic", "--cmdline", "maxticks=20", "--quiet", "--trace", trace)
    with TraceReader(trace) as reader:
        records = reader.records(schema.MSG_INSN_COUNTS)
        if not reader.run.get("insn_count_exact"):
            pytest.skip("this host's insn_emulation does not count instructions exactly")
        seqs = [int(s) for s, r in zip(reader.exits()[schema.SEQ_COLUMN.name], reader.exits()["reason"])
                if r != schema.REASON_INTR]
    counts = [int.from_bytes(r["counts"][i:i + 8], "little") for r in records for i in range(0, len(r["counts"]), 8)]
    assert records[0]["first"] == 0 and len(counts) == len(seqs) - 1  # all but the exit that ended the VM
    assert counts == sorted(counts) and counts[-1] > len(counts)
    # The same trace with exit 100's count one higher: the rerun names the field at that exit.
    def count_one_more(kind: str, record: dict) -> dict:
        if kind != schema.MSG_INSN_COUNTS:
            return record
        raw = bytearray(record["counts"])
        raw[800:808] = (counts[100] + 1).to_bytes(8, "little")
        return {**record, "counts": bytes(raw)}
    forged = copy_trace(trace, tmp_path / "forged.trace", count_one_more)
    proc = vmtrace("rerun", str(forged), "--json")
    result = json.loads(proc.stdout)
    assert proc.returncode == 1 and (result["seq"], result["field"]) == (seqs[100], "instructions"), result
    assert (result["recorded"], result["now"]) == (hex(counts[100] + 1), hex(counts[100]))
    assert vmtrace("rerun", trace).returncode == 0
