"""`vmsup launch` end to end: every bundled guest, and a few hand-made ones, give their documented
console text, end status, status line and process exit code (guest/README.md, vmworker/status.py).

Each test runs the real CLI (`python -m supervisor`) in a subprocess, which starts a real worker
process with a real KVM VM. Subprocess timeouts are hang guards only, never assertions.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import GUEST_DIR, REPO, VMSUP

pytestmark = pytest.mark.kvm

# render.status_line: `vmsup: NAME: <status> — N exits in T s (R exits/s), wall W s`
STATUS_LINE = re.compile(r"^vmsup: (?P<name>\S+): (?P<status>.+) — (?P<exits>\d+) exits in (?P<run>\d+\.\d+) s "
                         r"\((?P<rate>\d+) exits/s\), wall (?P<wall>\d+\.\d+) s"
                         r"(?:; unclaimed: (?P<unclaimed>.+))?$")


def status_of(stderr: str) -> dict:
    """The status line, which must be the last line of stderr, as its named fields."""
    assert stderr.endswith("\n"), f"stderr does not end with a whole line: {stderr!r}"
    last = stderr.splitlines()[-1]
    m = STATUS_LINE.match(last)
    assert m, f"last stderr line is not a status line: {last!r}"
    fields = m.groupdict()
    fields["exits"] = int(fields["exits"])
    return fields


def assert_status(fields: dict, want: str) -> None:
    # A status may carry a detail in parentheses: `shutdown (triple fault)`, `timeout (no end after 1 s)`.
    assert fields["status"] == want or fields["status"].startswith(want + " ("), fields


def assert_clean(proc) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr


# name, console text, status, exits in the status line, process exit code. Texts and exit counts
# are the ones guest/README.md documents (IO exits + the final HLT where the guest halts).
BUNDLED = [
    ("hello", "Hello from vmsup!\n", "halted", 37, 0),
    ("protected32", "protected32: sum(1..1000) = 500500\n", "halted", 71, 0),
    ("long64", "long64: fib(90) = 2880067194370816120\n", "guest exit code 0", 77, 0),
    ("mmio", "mmio: ok\n", "guest exit code 0", 23, 0),
    ("repio", "repio: one exit, many bytes\n", "halted", 33, 0),
    ("mmioflood", "mmioflood: done\n", "guest exit code 0", 2017, 0),
    ("elfhello32", "elfhello: hello from a 32-bit ELF\n", "guest exit code 0", 35, 0),
    ("elfhello64", "elfhello: hello from a 64-bit ELF\n", "guest exit code 0", 35, 0),
    ("triplefault", "", "shutdown", 1, 3),
    ("echo", "", "guest exit code 0", 3, 0),  # empty stdin: EOF at once, no newlines read
]


@pytest.mark.parametrize("name, text, end, exits, code", BUNDLED, ids=[b[0] for b in BUNDLED])
def test_bundled_guest_prints_its_documented_text_and_ends_as_documented(vmsup, name, text, end, exits, code):
    proc = vmsup("launch", name, "--quiet")
    assert proc.stdout == text
    fields = status_of(proc.stderr)
    assert fields["name"] == name
    assert_status(fields, end)
    assert fields["exits"] == exits
    assert proc.returncode == code
    assert_clean(proc)


def test_seed_guest_counts_from_zero_without_gaps_one_exit_line_each(vmsup):
    proc = vmsup("launch", "seed16", "--max-exits", "1000")
    lines = proc.stdout.splitlines()
    assert len(lines) == 1000
    assert lines[0] == "out port: 16, data: 0"  # the seed article's words, verbatim
    assert lines == [f"out port: 16, data: {i}" for i in range(1000)]
    fields = status_of(proc.stderr)
    assert_status(fields, "max-exits")
    assert fields["exits"] == 1000
    assert proc.returncode == 0


def test_echo_upper_cases_stdin_and_exits_with_the_newline_count(vmsup):
    proc = vmsup("launch", "echo", "--quiet", input=b"abc\nxyz\n")
    assert proc.stdout == "ABC\nXYZ\n"
    assert_status(status_of(proc.stderr), "guest exit code 2")
    assert proc.returncode == 1  # a non-zero guest code is a guest failure


def test_piped_stdin_goes_to_the_first_of_several_vms_and_vmsup_says_so(vmsup, tmp_path):
    trace = tmp_path / "e.vmtrace"
    proc = vmsup("launch", "echo", "--vms", "2", "--trace", str(trace), input=b"abc\n")
    assert "vmsup: stdin goes to echo-0 only; echo-1 gets no serial input" in proc.stderr
    assert (tmp_path / "e.echo-0.console").read_bytes() == b"ABC\n"
    assert (tmp_path / "e.echo-1.console").read_bytes() == b""
    assert proc.returncode == 1  # echo-0's exit code is its newline count
    assert_clean(proc)


def test_echo_reads_serial_input_from_a_file(vmsup, tmp_path):
    infile = tmp_path / "input.txt"
    infile.write_bytes(b"abc\nxyz\n")
    proc = vmsup("launch", "echo", "--quiet", "--serial-in", str(infile), input=b"ignored\n")
    assert proc.stdout == "ABC\nXYZ\n"
    assert_status(status_of(proc.stderr), "guest exit code 2")
    assert proc.returncode == 1


@pytest.mark.parametrize("serial_in", ["-", "none"])
def test_echo_with_no_input_exits_with_code_zero(vmsup, serial_in):
    proc = vmsup("launch", "echo", "--quiet", "--serial-in", serial_in, input=b"")
    assert proc.stdout == ""
    assert_status(status_of(proc.stderr), "guest exit code 0")
    assert proc.returncode == 0


def test_repio_string_outs_arrive_one_element_per_exit(vmsup):
    proc = vmsup("launch", "repio")
    outs = [re.fullmatch(r"out port: (\d+), data: (\d+)", line) for line in proc.stdout.splitlines()
            if line.startswith("out port: ")]
    assert all(outs), proc.stdout
    debugcon = [int(m[2]) for m in outs if m[1] == "233"]
    seed_port = [int(m[2]) for m in outs if m[1] == "16"]
    assert len(outs) == 32
    assert bytes(debugcon) == b"repio: one exit, many bytes\n"  # 28 outs of one byte each
    assert seed_port == [0x1111, 0x2222, 0x3333, 0x4444]  # 4369, 8738, 13107, 17476
    assert "repio: one exit, many bytes\n" in proc.stdout  # the console text itself
    assert_status(status_of(proc.stderr), "halted")
    assert proc.returncode == 0


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_smp_prints_one_whole_line_per_vcpu(vmsup, vcpus):
    proc = vmsup("launch", "smp", "--vcpus", str(vcpus), "--quiet")
    assert proc.stdout.endswith("\n")
    assert sorted(proc.stdout.splitlines()) == [f"vcpu {n}" for n in range(vcpus)]
    fields = status_of(proc.stderr)
    assert_status(fields, "halted")
    assert fields["exits"] == 8 * vcpus  # 7 one-byte outs (`vcpu N\n`) and a HLT each
    assert proc.returncode == 0


def test_triple_fault_ends_in_shutdown_with_the_guest_registers_shown(vmsup):
    proc = vmsup("launch", "triplefault", "--quiet")
    assert_status(status_of(proc.stderr), "shutdown")
    assert proc.returncode == 3
    for reg, value in (("rax", 1), ("rbx", 2), ("rcx", 3), ("rdx", 4)):
        assert re.search(rf"\b{reg}=000000007f1e000{value}\b", proc.stderr), proc.stderr


def test_without_quiet_a_triple_faults_shutdown_exit_is_printed(vmsup):
    proc = vmsup("launch", "triplefault", "--no-trace")
    assert proc.stdout == "shutdown\n"  # its one exit, as every exit is printed without -q
    assert_status(status_of(proc.stderr), "shutdown")


def test_without_quiet_internal_error_exits_are_printed_the_handled_and_the_last(vmsup):
    proc = vmsup("launch", "x87unknown", "--no-trace")
    errors = [line for line in proc.stdout.splitlines() if line.startswith("internal error: ")]
    # finit's fwait and fninit, done by vmsup's fallback, then fsin, which ends the VM.
    assert len(errors) >= 2, proc.stdout
    assert all("suberror 1 (emulation failure)" in line for line in errors)
    fields = status_of(proc.stderr)
    assert_status(fields, "internal-error")
    out_lines = [line for line in proc.stdout.splitlines() if line.startswith("out port: ")]
    assert fields["exits"] == len(errors) + len(out_lines)  # each exit one line, no more, no less


def test_mmioflood_logs_every_unclaimed_mmio_write(vmsup):
    proc = vmsup("launch", "mmioflood")
    writes = [line for line in proc.stdout.splitlines() if line.startswith("mmio write addr: 0xe0000000")]
    assert len(writes) == 2000
    # The guest writes its loop counter, 2000 down to 1, in that order.
    assert writes == [f"mmio write addr: 0xe0000000, len: 4, data: {i:#x}" for i in range(2000, 0, -1)]
    assert_status(status_of(proc.stderr), "guest exit code 0")


def test_elf_guest_launched_by_path_runs_in_long_mode(vmsup):
    proc = vmsup("launch", "guest/elfhello64.elf", "--quiet")
    assert proc.stdout == "elfhello: hello from a 64-bit ELF\n"
    assert_status(status_of(proc.stderr), "guest exit code 0")
    assert proc.returncode == 0


@pytest.mark.parametrize("where", ["bundled path", "copy outside guest/"])
def test_flat_binary_by_path_runs_in_the_mode_given(vmsup, tmp_path, where):
    path = "guest/long64.bin"
    if where != "bundled path":  # no manifest defaults to fall back on: only --mode says "long"
        path = str(tmp_path / "fib.bin")
        shutil.copy(GUEST_DIR / "long64.bin", path)
    proc = vmsup("launch", path, "--mode", "long", "--quiet")
    assert proc.stdout == "long64: fib(90) = 2880067194370816120\n"
    assert proc.returncode == 0


@pytest.mark.parametrize("spelling", ["0x10000", "65536"])
def test_explicit_load_address_and_entry_equal_to_the_defaults_change_nothing(vmsup, tmp_path, spelling):
    path = tmp_path / "greeter.bin"
    shutil.copy(GUEST_DIR / "hello.bin", path)
    proc = vmsup("launch", str(path), "--mode", "real", "--load-addr", spelling, "--entry", spelling, "--quiet")
    assert proc.stdout == "Hello from vmsup!\n"
    fields = status_of(proc.stderr)
    assert fields["name"] == "greeter"
    assert_status(fields, "halted")
    assert proc.returncode == 0


@pytest.mark.parametrize("mem", ["1G", "512000000"])
@pytest.mark.parametrize("guest, text", [("hello", "Hello from vmsup!\n"),
                                         ("long64", "long64: fib(90) = 2880067194370816120\n")])
def test_guest_runs_with_large_memory(vmsup, mem, guest, text):
    # long64's stack sits at the top of RAM, so this also proves the whole size is mapped.
    proc = vmsup("launch", guest, "--mem", mem, "--quiet")
    assert proc.stdout == text
    assert proc.returncode == 0


def test_timeout_stops_the_endless_seed_guest(vmsup):
    proc = vmsup("launch", "seed16", "--timeout", "1", "--quiet", timeout=60)
    fields = status_of(proc.stderr)
    assert_status(fields, "timeout")
    assert fields["exits"] > 0
    assert proc.returncode == 4
    assert_clean(proc)


def test_timeout_stops_a_guest_that_spins_without_exits(vmsup, tmp_path):
    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xeb\xfe")  # jmp $ (real mode): never leaves the guest on its own
    proc = vmsup("launch", str(spin), "--timeout", "1", "--quiet", timeout=60)
    fields = status_of(proc.stderr)
    assert fields["name"] == "spin"
    assert_status(fields, "timeout")
    assert fields["exits"] == 0
    assert proc.returncode == 4


def test_guest_of_one_hlt_halts_after_one_exit(vmsup, tmp_path):
    guest = tmp_path / "hlt.bin"
    guest.write_bytes(b"\xf4")
    proc = vmsup("launch", str(guest))
    assert proc.stdout == "hlt\n"
    fields = status_of(proc.stderr)
    assert_status(fields, "halted")
    assert fields["exits"] == 1
    assert proc.returncode == 0


@pytest.mark.parametrize("code, process_code", [(0, 0), (7, 1), (255, 1)])
def test_guest_exit_code_maps_to_the_process_exit_code(vmsup, tmp_path, code, process_code):
    guest = tmp_path / "exit.bin"
    guest.write_bytes(bytes([0xB0, code, 0xE6, 0xF4, 0xF4]))  # mov $code,%al; out %al,$0xf4; hlt
    proc = vmsup("launch", str(guest), "--quiet")
    fields = status_of(proc.stderr)
    assert_status(fields, f"guest exit code {code}")
    assert fields["exits"] == 1
    assert proc.returncode == process_code


def test_guest_launched_with_stdin_left_open_ends_without_a_fatal_error(tmp_path):
    # Like a terminal: stdin stays open and empty for the whole run. hello never reads its UART.
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([*VMSUP, "launch", "hello", "--quiet"], stdin=subprocess.PIPE, stdout=o, stderr=e,
                                cwd=REPO)
        try:
            returncode = proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.stdin.close()
            proc.wait()
    stderr = err.read_text()
    assert out.read_text() == "Hello from vmsup!\n"
    assert returncode == 0
    assert "Fatal Python error" not in stderr
    assert stderr.splitlines()[-1].startswith("vmsup: hello: halted"), stderr  # ends with the status line
    assert all(line.startswith("vmsup: ") for line in stderr.splitlines()), stderr
