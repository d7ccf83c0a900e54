"""The gdb stub against Debian's real gdb (`gdb -batch`), on bundled guests in real, protected and
long mode: attach, registers, disassembly, breakpoints (int3 and debug registers), stepping,
Ctrl-C, detach and kill. Each VM is a real worker process (`python -m vmworker`) with a real
listening socket; nothing is mocked."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, VMSUP
from tracetool import schema
from tracetool.trace import TraceReader
from vmworker.gdb import packets as P
from vmworker.gdb import regs as R

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("gdb") is None, reason="no gdb on PATH (apt-get install gdb)")]

GDB_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StubbedVm:
    """A worker running one bundled guest with a gdb stub; its console is collected as it comes."""

    def __init__(self, guest: str, mode: str, *, wait: bool = True, quiet: bool = True, vcpus: int = 1,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        spec = {"guest": str(REPO / "guest" / guest), "mode": mode or None, "quiet": quiet, "vcpus": vcpus,
                "gdb": f"127.0.0.1:{self.port}", "gdb_wait": wait, "serial_input": None, "timeout": 120}
        self.proc = subprocess.Popen([sys.executable, "-m", "vmworker", "--spec-json", json.dumps(spec)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        self.lines: list[bytes] = []
        self.output_started = threading.Event()
        self._drain = threading.Thread(target=self._read_stdout, daemon=True)
        self._drain.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if len(self.lines) >= 50:
                self.output_started.set()

    def gdb_command(self, *commands: str, before: tuple[str, ...] = ()) -> list[str]:
        argv = ["gdb", "-nx", "-batch"]
        for c in before:  # commands before attaching (set architecture, file)
            argv += ["-ex", c]
        argv += ["-ex", f"target remote 127.0.0.1:{self.port}"]
        for c in commands:
            argv += ["-ex", c]
        return argv

    def gdb(self, *commands: str, before: tuple[str, ...] = ()) -> str:
        done = subprocess.run(self.gdb_command(*commands, before=before), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=GDB_TIMEOUT)
        return done.stdout

    def result(self) -> dict:
        self._drain.join(GDB_TIMEOUT)  # stdout has one reader, the drain thread: read up to its end
        err = self.proc.stderr.read()  # small: the result JSON (and any log lines)
        self.proc.wait(GDB_TIMEOUT)
        return json.loads(err.decode().strip().splitlines()[-1])

    @property
    def console(self) -> str:
        return b"".join(self.lines).decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def stubbed():
    vms: list[StubbedVm] = []

    def start(*args, **kwargs) -> StubbedVm:
        vm = StubbedVm(*args, **kwargs)
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.close()


def printed(out: str, expr_values: list[str]) -> list[str]:
    """The values of gdb's `$N = value` lines, in order."""
    return [line.split(" = ", 1)[1] for line in out.splitlines() if line.startswith("$") and " = " in line]


def test_gdb_attaches_before_the_first_instruction_and_reads_registers_and_code(stubbed):
    vm = stubbed("protected32.bin", "protected")
    out = vm.gdb("info registers rip cs cr0 efer", "x/4i $pc", "kill")
    assert "rip            0x10000" in out
    assert "cs             0x8" in out
    assert "cr0            0x31" in out  # PE | ET | NE: protected mode, no paging
    assert "=> 0x10000:\tcld" in out and "xor    %eax,%eax" in out
    result = vm.result()
    assert (result["status"], result["exit_code"], result["detail"]) == ("gdb-kill", 143, "killed from gdb")
    assert vm.proc.returncode == 143


def test_break_in_protected_mode_hits_every_pass_then_the_guest_finishes(stubbed):
    vm = stubbed("protected32.bin", "protected")
    # 0x10008 is the loop's `add %ecx,%eax`: ECX counts 1, 2, 3 at the planted int3.
    out = vm.gdb("break *0x10008", "continue", "p $rcx", "continue", "p $rcx", "continue", "p $rcx",
                 "delete", "continue")
    assert printed(out, []) == ["1", "2", "3"], out
    assert out.count("Breakpoint 1, 0x0000000000010008") == 3
    assert "exited normally" in out
    result = vm.result()
    assert result["status"] == "halted"
    assert "protected32: sum(1..1000) = 500500" in vm.console


def test_hbreak_in_long_mode_takes_four_debug_registers_and_refuses_a_fifth(stubbed):
    vm = stubbed("long64.bin", "long")
    out = vm.gdb("hbreak *0x1000d", "hbreak *0x10011", "hbreak *0x10014", "hbreak *0x10017", "hbreak *0x10019",
                 "continue", "delete 1-4", "continue", "p/x $rax", "delete", "continue")
    assert "Cannot insert hardware breakpoint 5" in out
    assert "Breakpoint 5, 0x0000000000010019" in out
    assert printed(out, []) == ["0x27f80ddaa1ba7878"]  # fib(89): the loop's last RAX (long64.S)
    assert "exited normally" in out
    assert "long64: fib(90) = 2880067194370816120" in vm.console
    assert vm.result()["status"] == "guest-exit"


def test_break_in_real_mode_stops_before_the_guest_sees_an_int3(stubbed):
    vm = stubbed("seed16.bin", "real")
    # seed16: 0x10004 is `inc %ax` after `out %ax,$0x10`; CS base 0x10000, so $pc is linear.
    out = vm.gdb("info registers cs", "break *0x10004", "continue", "p $rax", "continue", "p $rax",
                 "info registers rip", "kill")
    assert "cs             0x1000" in out
    assert printed(out, []) == ["0", "1"]
    assert "rip            0x10004" in out
    assert vm.result()["status"] == "gdb-kill"


def test_break_on_a_function_of_a_multiboot_kernel_with_symbols(stubbed):
    vm = stubbed("mbkernel.elf", None)
    elf = str(REPO / "guest" / "mbkernel.elf")
    # A 32-bit ELF makes gdb pick i386; the stub's one description for every mode is x86-64.
    out = vm.gdb("info registers rip", "break kmain", "continue", "info symbol $pc", "kill",
                 before=("set architecture i386:x86-64", f"file {elf}"))
    assert "<_start>" in out  # the multiboot entry, before the first instruction
    assert "Breakpoint 1, kmain" in out
    assert "kmain in section .text" in out
    assert vm.result()["status"] == "gdb-kill"


def _symbol(elf: str, name: str) -> int:
    """A label's address in a guest's ELF (nm): for a flat real-mode guest, its offset in CS."""
    out = subprocess.run(["nm", str(REPO / "guest" / elf)], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[0], 16) for line in out.splitlines() if line.endswith(" " + name))


@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm (binutils) to read the guest's symbols")
def test_one_session_survives_real_to_protected_to_long_mode_with_breakpoints_in_each(stubbed):
    base = 0x10000  # modeswitch is linked at 0 and loaded at 0x10000: linear = base + offset
    real, prot, long_ = (base + _symbol("modeswitch.elf", n) for n in ("real_mark", "prot_mark", "long_mark"))
    vm = stubbed("modeswitch.bin", "real")
    # gdb re-inserts breakpoints at every resume: `break` takes a debug register while the guest
    # is in real mode and plants an int3 once it is in protected mode (hit in long mode).
    out = vm.gdb(f"hbreak *{real:#x}", f"break *{prot:#x}", f"break *{long_:#x}",
                 "continue", "info registers cs cr0 efer",
                 "continue", "info registers cs cr0 efer", "x/1i $pc",
                 "continue", "info registers cs cr0 efer", "x/1i $pc", "stepi", "p $pc",
                 "continue")
    stops = re.split(r"\nBreakpoint (\d), ", out)[1:]  # [number, text after it, number, ...]
    assert stops[0::2] == ["1", "2", "3"], out
    stops = stops[1::2]
    assert "cs             0x1000" in stops[0] and "cr0            0x10 " in stops[0]
    assert "cs             0x8 " in stops[1] and "cr0            0x11 " in stops[1]
    assert "mov    $0x50,%al" in stops[1]  # 'P'
    assert "cs             0x18" in stops[2] and "efer           0x500" in stops[2]  # LME | LMA
    assert "mov    $0x4c,%al" in stops[2]  # 'L'
    assert f"= (void (*)()) {long_ + 2:#x}" in stops[2]  # one stepi past the 2-byte mov
    assert "exited normally" in out
    assert vm.result()["status"] == "guest-exit"
    assert "RPL" in vm.console


def test_stepi_advances_one_instruction_at_a_time(stubbed):
    vm = stubbed("protected32.bin", "protected")
    out = vm.gdb("stepi", "p $pc", "stepi", "p $pc", "stepi", "p $pc", "stepi 4", "p $pc", "p $rcx", "kill")
    # cld; xor %eax,%eax; mov $1,%ecx; then add, inc, cmp, jbe back to add (protected32.S).
    values = printed(out, [])
    assert [v.split()[-1] for v in values[:4]] == ["0x10001", "0x10003", "0x10008", "0x10008"], out
    assert values[4] == "2"


def _step_trace(tmp_path, guest: str, steps: int) -> tuple[list[int], list[int]]:
    """(addresses, rax before each instruction) of a `vmsup launch --step-trace` run of `guest`."""
    trace = tmp_path / f"{guest}.vmtrace"
    subprocess.run([*VMSUP, "launch", guest, "--step-trace", "--steps", str(steps), "--timeout", "20", "--quiet",
                    "--serial-in", "none", "--trace", str(trace)], capture_output=True, timeout=GDB_TIMEOUT, cwd=REPO)
    with TraceReader(trace) as reader:
        batches = list(reader.step_batches())
    addrs, rax = [], []
    value = batches[0].initial[0]  # rax is REGISTERS[0] (tracetool/step_schema.py): bit 0 of changed
    values = iter(int(v) for b in batches for v in b.cols["values"])
    for b in batches:
        for addr, changed in zip(b.cols["addr"].tolist(), b.cols["changed"].tolist()):
            addrs.append(addr)
            rax.append(value)
            consumed = [next(values) for _ in range(bin(changed).count("1"))]
            if changed & 1:
                value = consumed[0]
    return addrs, rax


@pytest.mark.parametrize("guest, mode", [("seed16", "real"), ("protected32", "protected")])
def test_stepi_n_times_matches_the_step_trace(stubbed, tmp_path, guest, mode):
    # seed16 steps over `out` (a port-I/O exit inside the step) every third instruction.
    n = 24
    addrs, rax = _step_trace(tmp_path, guest, n)
    assert len(addrs) == n
    vm = stubbed(f"{guest}.bin", mode)
    steps = [c for _ in range(n - 1) for c in ("stepi", "p/x $pc", "p/x $rax")]
    values = printed(vm.gdb("p/x $pc", "p/x $rax", *steps, "kill"), [])
    pcs, raxes = [int(v, 16) for v in values[0::2]], [int(v, 16) for v in values[1::2]]
    assert pcs == addrs, values
    assert raxes == rax


def test_ctrl_c_stops_a_spinning_guest_where_it_is(stubbed):
    vm = stubbed("seed16.bin", "real", quiet=False)  # quiet=False: one output line per exit shows progress
    gdb = subprocess.Popen(vm.gdb_command("continue", "p $rax > 0", "info registers rip", "kill"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert vm.output_started.wait(GDB_TIMEOUT), "the guest never ran"
        gdb.send_signal(signal.SIGINT)  # what Ctrl-C at gdb's prompt does: gdb sends 0x03
        out, _ = gdb.communicate(timeout=GDB_TIMEOUT)
    finally:
        if gdb.poll() is None:
            gdb.kill()
    assert "Program received signal SIGINT" in out
    assert printed(out, []) == ["1"]
    assert vm.result()["status"] == "gdb-kill"


def test_detach_lets_the_guest_run_on_to_its_end(stubbed):
    vm = stubbed("protected32.bin", "protected")
    out = vm.gdb("break *0x10008", "continue", "detach")
    assert "Breakpoint 1, 0x0000000000010008" in out and "(Remote target) detached" in out
    result = vm.result()
    assert result["status"] == "halted"
    assert "protected32: sum(1..1000) = 500500" in vm.console


def test_vcpus_are_gdb_threads(stubbed):
    vm = stubbed("smp.bin", "protected", vcpus=2)
    out = vm.gdb("info threads", "thread 2", "p $rdi", "kill")
    assert "Thread 1" in out and "Thread 2" in out
    assert printed(out, []) == ["1"]  # vCPU 1 starts with its index in RDI (guest/README.md)


def test_monitor_catch_io_stops_at_each_uart_write_and_catch_off_lets_it_finish(stubbed):
    vm = stubbed("hello.bin", "real")
    out = vm.gdb("monitor catch io 0x3f8 out", "continue", "continue", "monitor catch", "monitor catch off",
                 "monitor catch io 0x10000", "continue")
    assert "catch io 0x3f8 out: the guest stops at each such exit" in out
    # 'H' then 'e': each write was served by the UART before the guest stopped
    assert "caught: out to port 0x3f8, 1 byte(s) 48" in out and "caught: out to port 0x3f8, 1 byte(s) 65" in out
    assert out.count("Program received signal SIGTRAP") == 2
    assert "every catch removed" in out
    assert "ports are 0-0xffff" in out
    assert "exited normally" in out
    assert vm.result()["status"] == "halted"
    assert vm.console == "Hello from vmsup!\n"


def test_monitor_catch_mmio_stops_at_the_device_access_and_catch_off_lets_it_finish(stubbed):
    vm = stubbed("mmio.bin", "protected")
    out = vm.gdb("monitor catch mmio 0xd0000008-0xd000000b", "continue", "monitor catch", "monitor exits",
                 "monitor catch mmio zz", "monitor catch off", "continue")
    assert "catch mmio 0xd0000008-0xd000000b: the guest stops at each such exit" in out
    assert "caught: mmio read from 0xd0000008, 4 byte(s)" in out  # guest/mmio.S: movl MMIO+0x8, %eax
    assert out.count("Program received signal SIGTRAP") == 1
    assert "this VM's exits are not recorded" in out  # a worker without a trace keeps none
    assert "usage: monitor catch mmio ADDR[-ADDR]" in out
    assert "exited normally" in out
    assert "mmio: ok" in vm.console


def test_monitor_exits_lists_the_last_exits_with_their_guest_addresses(tmp_path):
    port = free_port()
    launch = _launch("seed16", "--gdb", str(port), "--gdb-wait", "-q", "--serial-in", "none",
                     "--trace", str(tmp_path / "exits.vmtrace"))
    try:
        out = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{port}",
                              "-ex", "monitor catch io 0x10", "-ex", "continue", "-ex", "continue", "-ex", "continue",
                              "-ex", "monitor exits 4", "-ex", "monitor exits 0", "-ex", "kill"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=GDB_TIMEOUT).stdout
        launch.communicate(timeout=GDB_TIMEOUT)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    lines = [line for line in out.splitlines() if line.startswith("vcpu 0 seq=")]
    assert len(lines) == 4, out
    # the seed's third write (AX = 2), at the instruction after its `out` (rip: tracetool/schema.py)
    assert any(line.endswith("io out port=0x10 size=2 data=0x2 rip=0x10004") for line in lines), out
    seqs = [int(line.split()[2].removeprefix("seq=")) for line in lines]
    assert seqs == sorted(seqs)
    assert "usage: monitor exits [N]" in out


@pytest.mark.parametrize("guest, mode, watch, value, pc", [
    # protected32 pushes the sum (500500) at the stack top, 16 MiB - 4; paging off
    ("protected32.bin", "protected", "*(int*)0xfffffc", "500500", "0x10014"),
    # long64 pushes fib(90) at 16 MiB - 8; paging on (the VMM's identity map)
    ("long64.bin", "long", "*(long*)0xfffff8", "2880067194370816120", "0x1001a"),
])
def test_watch_stops_after_the_guest_writes_the_watched_variable(stubbed, guest, mode, watch, value, pc):
    vm = stubbed(guest, mode)
    out = vm.gdb(f"watch {watch}", "continue", "p/x $pc", "delete", "continue")
    assert "Old value = 0" in out and f"New value = {value}" in out, out
    assert f"$1 = {pc}" in out  # just past the writing push
    assert "exited normally" in out
    result = vm.result()
    assert result["by_reason"].get("mmio") == 1  # the one write to the watched page, then the slot went back


def test_rwatch_is_refused_because_guest_reads_never_exit_here(stubbed):
    vm = stubbed("protected32.bin", "protected")
    out = vm.gdb("rwatch *(int*)0xfffffc", "continue", "kill")
    assert "Could not insert hardware watchpoint 1" in out
    assert vm.result()["status"] == "gdb-kill"


@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm (binutils) to read the guest's symbols")
def test_a_breakpoint_hit_by_one_vcpu_stops_both_and_each_vcpu_hits_it_in_turn(stubbed):
    have_lock = _symbol("smp.elf", "have_lock")  # linked at 0x10000: the address is linear
    vm = stubbed("smp.bin", "protected", vcpus=2)
    out = vm.gdb(f"hbreak *{have_lock:#x}", "continue", "info threads", "p $rdi", "continue", "p $rdi",
                 "delete", "continue")
    hits = re.findall(r"Thread (\d) hit Breakpoint 1", out)
    assert sorted(hits) == ["1", "2"], out  # each vCPU takes the lock once; the lock orders them
    # all-stop: while one vCPU sits at the breakpoint, the other is stopped too
    assert "(vcpu 0 (stopped))" in out and "(vcpu 1 (stopped))" in out
    assert sorted(printed(out, [])) == ["0", "1"]  # RDI: the vCPU index
    assert "exited normally" in out
    assert sorted(vm.console.splitlines()) == ["vcpu 0", "vcpu 1"]


def _exchange(sock: socket.socket, reader: P.PacketReader, raw: bytes) -> tuple[str, bytes | None]:
    sock.sendall(raw)
    while True:
        for kind, data in reader.feed(sock.recv(4096)):
            if kind != "ack":
                return kind, data
            if raw.startswith(b"$") and kind == "ack" and data == b"-":
                return "nack", None


def _connect(port: int) -> socket.socket:
    """Connect once the worker listens (it binds before the VM starts), within a deadline."""
    deadline = time.monotonic() + GDB_TIMEOUT
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=GDB_TIMEOUT)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # a poll interval while waiting on the condition "port listens"


def _packet(body: bytes) -> bytes:
    return b"$" + body + b"#%02x" % P.checksum(body)


def test_malformed_and_unknown_packets_get_error_or_empty_replies_and_the_stub_carries_on(stubbed):
    vm = stubbed("protected32.bin", "protected")
    with _connect(vm.port) as sock:
        reader = P.PacketReader()
        assert _exchange(sock, reader, b"$g#00") == ("nack", None)  # bad checksum: `-`
        assert _exchange(sock, reader, _packet(b"qNoSuchQuery")) == ("packet", b"")
        assert _exchange(sock, reader, _packet(b"mzz,4")) == ("packet", b"E01")
        assert _exchange(sock, reader, _packet(b"p999")) == ("packet", b"E02")
        assert _exchange(sock, reader, _packet(b"Z9,10000,1")) == ("packet", b"")
        assert _exchange(sock, reader, _packet(b"mffffffff0,4")) == ("packet", b"E14")
        assert _exchange(sock, reader, _packet(b"G00")) == ("packet", b"E01")
        assert _exchange(sock, reader, _packet(b"Hg99")) == ("packet", b"E04")
        assert _exchange(sock, reader, _packet(b"vCont;x")) == ("packet", b"E01")
        cr0 = R.BY_NAME["cr0"]
        bad_cr0 = (0x8000_0000).to_bytes(8, "little").hex().encode()  # PG without PE: KVM refuses it
        assert _exchange(sock, reader, _packet(b"P%x=%s" % (cr0, bad_cr0))) == ("packet", b"E02")
        assert _exchange(sock, reader, _packet(b"m10000,3")) == ("packet", b"fc31c0")
        assert _exchange(sock, reader, _packet(b"D")) == ("packet", b"OK")
    assert vm.result()["status"] == "halted"  # detached: the guest ran to its end


def test_a_port_in_use_is_refused_before_the_vm_starts():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        vm = StubbedVm("protected32.bin", "protected", port=port)
        try:
            result = vm.result()
        finally:
            vm.close()
    assert result["status"] == "error" and result["exit_code"] == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result["error"]
    assert vm.console == ""


def test_a_gdb_that_goes_away_without_detaching_leaves_the_vm_running(stubbed):
    vm = stubbed("protected32.bin", "protected")
    with _connect(vm.port) as sock:
        reader = P.PacketReader()
        assert _exchange(sock, reader, _packet(b"?")) == ("packet", b"T05thread:1;")
    # closed without `D`: the stub lets the held VM go
    assert vm.result()["status"] == "halted"
    assert "protected32: sum(1..1000) = 500500" in vm.console


@pytest.mark.parametrize("kind", [b"0", b"1"])  # int3 (protected mode) and a debug register
def test_continue_from_a_breakpoint_left_inserted_steps_over_it_to_the_next_pass(stubbed, kind):
    vm = stubbed("protected32.bin", "protected")
    rcx = b"p%x" % R.BY_NAME["rcx"]
    with _connect(vm.port) as sock:
        reader = P.PacketReader()
        assert _exchange(sock, reader, _packet(b"Z" + kind + b",10008,1")) == ("packet", b"OK")
        counts = []
        for _ in range(3):  # gdb would remove the breakpoint and step itself; this client does not
            kind_, reply = _exchange(sock, reader, _packet(b"c"))
            assert reply.startswith(b"T05thread:1;"), reply
            counts.append(int.from_bytes(bytes.fromhex(_exchange(sock, reader, _packet(rcx))[1].decode()), "little"))
        assert counts == [1, 2, 3]
        assert _exchange(sock, reader, _packet(b"D")) == ("packet", b"OK")
    assert vm.result()["status"] == "halted"



# --- through `vmsup launch --gdb` ---------------------------------------------------------------

def _launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*VMSUP, "launch", *args], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_launch_with_gdb_wait_prints_the_stub_and_records_gdb_stops_in_the_trace(tmp_path):
    port = free_port()
    trace = tmp_path / "gdb.vmtrace"
    launch = _launch("protected32", "--gdb", str(port), "--gdb-wait", "-q", "--trace", str(trace))
    try:
        out = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{port}",
                              "-ex", "break *0x10008", "-ex", "continue", "-ex", "delete", "-ex", "continue"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=GDB_TIMEOUT).stdout
        _, err = launch.communicate(timeout=GDB_TIMEOUT)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert "Breakpoint 1, 0x0000000000010008" in out and "exited normally" in out
    assert launch.returncode == 0, err
    assert f"protected32: gdb stub on 127.0.0.1:{port} (held until gdb attaches)" in err
    with TraceReader(trace) as reader:
        events = [(r["event"], r.get("why")) for r in reader.records(schema.MSG_LIFECYCLE)
                  if r["event"].startswith("gdb-")]
    assert events[:2] == [("gdb-attach", None), ("gdb-stop", "attach")]
    assert ("gdb-stop", "swbreak") in events and ("gdb-continue", None) in events


def test_launch_gives_several_vms_consecutive_gdb_ports():
    port = free_port()
    launch = _launch("seed16", "--vms", "2", "--gdb", f"127.0.0.1:{port}", "--timeout", "1", "-q", "--no-trace")
    _, err = launch.communicate(timeout=GDB_TIMEOUT)
    assert f"gdb stub on 127.0.0.1:{port}:" in err and f"gdb stub on 127.0.0.1:{port + 1}:" in err, err
    assert launch.returncode == 4  # both VMs ran (not held) until --timeout


def test_launch_with_a_gdb_port_in_use_is_one_line_and_exit_2_before_any_vm_starts():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        launch = _launch("seed16", "--gdb", str(port), "--no-trace")
        _, err = launch.communicate(timeout=GDB_TIMEOUT)
    assert launch.returncode == 2
    assert err.strip().splitlines() == [f"vmsup: error: gdb stub: cannot listen on 127.0.0.1:{port}: "
                                        "Address already in use"]
