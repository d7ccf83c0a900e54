"""Real kernels: multiboot loading, the boot information, timer interrupts through the in-kernel
irqchip and PIT, and keys typed into the i8042 from a key script.

The KVM tests run the real CLI (`python -m supervisor`) on the bundled guests mbkernel (a multiboot
ELF32 kernel in C), mbaout (the a.out-kludge form) and mbbadsum, and on multiboot headers built
here with struct, one broken field at a time. The library tests check the boot information and
the keyboard tables byte for byte. Subprocess timeouts are hang guards only; the one use of wall
time is an upper bound: a 100 Hz timer cannot tick more than 100 times a second.
"""

from __future__ import annotations

import re
import struct
import time

import pytest

from conftest import GUEST_DIR
from vmworker import layout
from vmworker.devices.i8042 import I8042
from vmworker.devices.keyboard import (KeyScriptError, inject_keys, key_stroke, parse_key_script_text,
                                       text_strokes)
from vmworker.errors import GuestImageError
from vmworker.loader import load_image
from vmworker.memory import GuestMemory
from vmworker.multiboot import BOOTLOADER_MAGIC, write_boot_info

EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 4
MB_MAGIC = 0x1BADB002
AOUT = 1 << 16
LOAD = 0x100000
# mov $0x2a,%al; out %al,$0xe9; xor %eax,%eax; out %al,$0xf4; hlt — prints '*' and exits 0
CODE = bytes.fromhex("b02ae6e931c0e6f4f4")

BANNER = "mbkernel: hello from a multiboot kernel\n"
STATUS_NAME = re.compile(r"^vmsup: (?P<name>\S+): (?P<status>.+?) — (?P<exits>\d+) exits", re.M)


def status_of(stderr: str) -> str:
    m = STATUS_NAME.search(stderr.splitlines()[-1])
    assert m, stderr
    return m.group("status")


def assert_clean(proc) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr


def assert_one_error_line(proc, *fragments: str) -> str:
    assert_clean(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmsup: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.stdout == ""
    assert proc.returncode == EXIT_BAD_INPUT
    return lines[0]


def aout_kernel(*, flags: int = AOUT, checksum: int | None = None, load_addr: int = LOAD, header_at: int = 4,
                header_addr: int | None = None, load_end: int | None = None, bss_end: int = 0,
                entry: int | None = None, code: bytes = CODE) -> bytes:
    """A flat multiboot kernel: `jmp` over the header at `header_at`, then `code`; each keyword breaks one field."""
    header_size = 32
    code_at = header_at + header_size
    image_len = code_at + len(code)
    checksum = (-(MB_MAGIC + flags)) & 0xFFFF_FFFF if checksum is None else checksum
    header_addr = load_addr + header_at if header_addr is None else header_addr
    header = struct.pack("<8I", MB_MAGIC, flags, checksum, header_addr, load_addr,
                         load_addr + image_len if load_end is None else load_end, bss_end,
                         load_addr + code_at if entry is None else entry)
    jmp = bytes([0xEB, code_at - 2]) + bytes(header_at - 2)  # jmp short to the code
    return jmp + header + code


# --- the bundled kernels ---------------------------------------------------------------------


@pytest.mark.kvm
def test_mbkernel_prints_its_banner_and_the_boot_information_it_was_given(vmsup):
    proc = vmsup("launch", "mbkernel", "--quiet", "--no-trace", "--cmdline", "hello world", "--mem", "32M")
    assert_clean(proc)
    out = proc.stdout
    assert out.startswith(BANNER), out
    # Multiboot info flags: mem (0), cmdline (2), mods (3), mmap (6), boot loader name (9).
    assert "flags: 0x0000024D\n" in out
    assert "mem_lower: 640 KiB, mem_upper: 31744 KiB\n" in out  # 32 MiB - 1 MiB
    assert ("mmap: base 0x0000000000000000 length 0x00000000000A0000 type 1\n"
            "mmap: base 0x00000000000A0000 length 0x0000000000060000 type 2\n"
            "mmap: base 0x0000000000100000 length 0x0000000001F00000 type 1\n") in out
    assert "cmdline: 'hello world'\n" in out
    assert "loader: 'vmsup'\n" in out
    assert out.endswith("ticks: 300\n"), out  # no keys: it stops itself after 300 ticks
    assert re.search(r"^vmsup: mbkernel\.elf: multiboot ELF32 kernel, entry 0x[0-9a-f]+$", proc.stderr, re.M)
    assert status_of(proc.stderr) == "guest exit code 0"
    assert proc.returncode == 0


@pytest.mark.kvm
def test_mbkernel_ticks_at_no_more_than_100_hz(vmsup):
    # 300 ticks of a 100 Hz PIT take at least 3 s: the upper bound holds whatever the host load.
    started = time.monotonic()
    proc = vmsup("launch", "mbkernel", "--quiet", "--no-trace")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    ticks = int(re.search(r"^ticks: (\d+)$", proc.stdout, re.M).group(1))
    assert ticks == 300
    assert ticks <= 100 * elapsed + 1


@pytest.mark.kvm
def test_timer_interrupts_arrive_until_the_timeout(vmsup):
    # maxticks=0: never stop by itself; report=10: a line every 10 ticks.
    started = time.monotonic()
    proc = vmsup("launch", "mbkernel", "--quiet", "--no-trace", "--cmdline", "maxticks=0 report=10", "--timeout", "1.5")
    elapsed = time.monotonic() - started
    assert_clean(proc)
    reported = [int(n) for n in re.findall(r"^tick (\d+)$", proc.stdout, re.M)]
    assert reported, proc.stdout
    assert reported == list(range(10, 10 * len(reported) + 1, 10))  # in order, none skipped
    assert reported[-1] <= 100 * elapsed + 1
    assert status_of(proc.stderr).startswith("timeout")
    assert proc.returncode == EXIT_TIMEOUT


@pytest.mark.kvm
def test_scripted_keys_are_echoed_and_q_ends_the_kernel(vmsup, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text('# type, show the tick count, quit\ntext:"hi"\nEnter\nwait:50\nq\n')
    proc = vmsup("launch", "mbkernel", "--quiet", "--no-trace", "--keys", str(keys), "--cmdline", "maxticks=0")
    assert_clean(proc)
    m = re.search(r"^ready: .*\nhi\nenter at tick (\d+)\nticks: (\d+)\n\Z", proc.stdout, re.M)
    assert m, proc.stdout
    assert int(m.group(1)) <= int(m.group(2))
    assert status_of(proc.stderr) == "guest exit code 0"
    assert proc.returncode == 0


@pytest.mark.kvm
def test_shifted_text_and_extended_keys_reach_the_kernel_as_set_1_scancodes(vmsup, tmp_path):
    keys = tmp_path / "keys.txt"
    # Shift for capitals and symbols; arrows (E0-prefixed) and chords echo nothing of their own.
    keys.write_text('text:"Hello, World!"\nUp\nLeft\nshift+a\nEnter\nq\n')
    proc = vmsup("launch", "mbkernel", "--quiet", "--no-trace", "--keys", str(keys), "--cmdline", "maxticks=0")
    assert "\nHello, World!A\nenter at tick " in proc.stdout, proc.stdout
    assert proc.returncode == 0, proc.stderr


@pytest.mark.kvm
def test_mbkernel_without_irqchip_halts_instead_of_waiting_for_ticks(vmsup):
    # No in-kernel irqchip: its `sti; hlt` exits to userspace and the VM ends halted, with no tick.
    proc = vmsup("launch", "mbkernel", "--quiet", "--no-trace", "--no-irqchip")
    assert_clean(proc)
    assert proc.stdout.startswith(BANNER)
    assert "ticks:" not in proc.stdout
    assert status_of(proc.stderr) == "halted"
    assert proc.returncode == 0


@pytest.mark.kvm
def test_mbaout_loads_by_its_aout_kludge_fields_and_zeroes_its_bss(vmsup):
    proc = vmsup("launch", "mbaout", "--quiet", "--no-trace")
    assert_clean(proc)
    assert proc.stdout == "mbaout: hello from an a.out-kludge multiboot kernel\n"
    assert "vmsup: mbaout.bin: multiboot a.out-kludge kernel, entry 0x100024\n" in proc.stderr
    assert proc.returncode == 0


@pytest.mark.kvm
def test_a_kernel_asking_for_a_video_mode_gets_the_ega_text_framebuffer(vmsup):
    # Header flag bit 2, once refused: mbvideo checks the framebuffer fields and writes into them.
    proc = vmsup("launch", "mbvideo", "--quiet", "--no-trace")
    assert_clean(proc)
    assert proc.stdout == "mbvideo: EGA text 80x25 at 0xb8000\n"
    assert status_of(proc.stderr) == "guest exit code 0"
    assert proc.returncode == 0


@pytest.mark.kvm
def test_video_mode_flag_no_longer_refuses_a_kernel(vmsup, tmp_path):
    path = tmp_path / "video.bin"
    path.write_bytes(aout_kernel(flags=AOUT | 1 << 2))
    proc = vmsup("launch", str(path), "--quiet", "--no-trace")
    assert proc.stdout == "*"
    assert proc.returncode == 0, proc.stderr


@pytest.mark.kvm
def test_handmade_aout_kernel_runs(vmsup, tmp_path):
    # The control for every broken header below: the builder makes a loadable kernel.
    path = tmp_path / "ok.bin"
    path.write_bytes(aout_kernel())
    proc = vmsup("launch", str(path), "--quiet", "--no-trace")
    assert proc.stdout == "*"
    assert proc.returncode == 0, proc.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("guest, status", [("protected32", "halted (every vCPU halted with interrupts disabled)"),
                                           ("smp", "halted (every vCPU halted with interrupts disabled)")])
def test_cli_hlt_guests_still_end_halted_with_an_irqchip(vmsup, guest, status):
    # With an irqchip KVM handles HLT itself; the VM must still end once no vCPU can ever wake.
    proc = vmsup("launch", guest, "--quiet", "--no-trace", "--irqchip", "--serial-in", "none")
    assert_clean(proc)
    assert status_of(proc.stderr) == status
    if guest == "smp":  # every vCPU ran from the entry, as without an irqchip
        assert sorted(proc.stdout.splitlines()) == [f"vcpu {i}" for i in range(4)]
    assert proc.returncode == 0


@pytest.mark.kvm
def test_multiboot_kernel_runs_on_the_bsp_only_and_halted_aps_do_not_keep_it_alive(vmsup, tmp_path):
    # A PC boots the BSP; APs wait for INIT/SIPI. `cli; hlt` on the BSP then ends the VM.
    path = tmp_path / "clihlt.bin"
    path.write_bytes(aout_kernel(code=bytes.fromhex("b02ae6e9faf4")))  # print '*'; cli; hlt
    proc = vmsup("launch", str(path), "--vcpus", "2", "--quiet", "--no-trace")
    assert proc.stdout == "*"  # once: only vCPU 0 ran
    assert status_of(proc.stderr) == ("halted (every vCPU halted with interrupts disabled; "
                                      "1 never started, waiting for INIT/SIPI)")
    assert proc.returncode == 0


# --- bad input: one line each, exit code 2 ----------------------------------------------------

BAD_KERNELS = {
    "bad checksum": (aout_kernel(checksum=0x12345678), [], "bad checksum 0x12345678"),
    "undefined required flag": (aout_kernel(flags=AOUT | 1 << 5), [], "requires flag bit 5"),
    "entry outside the image": (aout_kernel(entry=LOAD + 0x1000), [], "entry 0x101000 is outside the image"),
    "bss beyond --mem": (aout_kernel(bss_end=0x200_0000), ["--mem", "16M"], "does not fit in 16 MiB"),
    "image beyond guest RAM": (aout_kernel(load_addr=0xF000_0000), [], "beyond guest RAM"),
    "over the multiboot information": (aout_kernel(load_addr=0x9000), [], "multiboot information"),
    "load_end past the file": (aout_kernel(load_end=LOAD + 0x1000), [], "past the end of the"),
    "header_addr below load_addr": (aout_kernel(header_addr=LOAD - 0x10), [], "load_addr 0x100000 is above header_addr"),
    "header_addr before the file": (aout_kernel(header_addr=LOAD + 0x100), [], "reaches before the start of the file"),
    "no a.out fields and not ELF": (aout_kernel(flags=0), [], "not ELF"),
    "with --load-addr": (aout_kernel(), ["--load-addr", "0x200000"], "--load-addr applies to flat binaries"),
    "with --mode long": (aout_kernel(), ["--mode", "long"], "entered in protected mode, not long"),
}


@pytest.mark.kvm
@pytest.mark.parametrize("case", list(BAD_KERNELS))
def test_bad_multiboot_kernel_is_rejected_with_one_line(vmsup, tmp_path, case):
    data, args, fragment = BAD_KERNELS[case]
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    assert_one_error_line(vmsup("launch", str(path), *args), str(path), fragment)


@pytest.mark.kvm
def test_bundled_bad_checksum_kernel_is_refused(vmsup):
    assert_one_error_line(vmsup("launch", "mbbadsum"), "mbbadsum.bin", "bad checksum")


@pytest.mark.kvm
def test_unknown_key_name_is_refused_with_file_and_line(vmsup, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text('text:"hi"\n# a comment\nEntr\nq\n')
    assert_one_error_line(vmsup("launch", "mbkernel", "--keys", str(keys)), f"{keys}:3:", "unknown key name 'Entr'")


@pytest.mark.kvm
@pytest.mark.parametrize("script, fragment", [
    ('text:"caf\u00e9"\n', ":1: no key types '\u00e9'"),
    ("wait:soon\n", ":1: wait: wants a whole number"),
    ("text:hello\n", ":1: text: wants a double-quoted string"),
    ("Enter\nctrl+q+x\n", ":2: 'q' in 'ctrl+q+x' is not a modifier"),
])
def test_bad_key_script_line_is_refused_with_file_and_line(vmsup, tmp_path, script, fragment):
    keys = tmp_path / "keys.txt"
    keys.write_text(script)
    assert_one_error_line(vmsup("launch", "mbkernel", "--keys", str(keys)), str(keys) + fragment)


@pytest.mark.kvm
def test_missing_key_file_is_refused(vmsup, tmp_path):
    assert_one_error_line(vmsup("launch", "mbkernel", "--keys", str(tmp_path / "none.txt")), "none.txt",
                          "No such file")


@pytest.mark.kvm
def test_too_long_cmdline_is_refused(vmsup):
    assert_one_error_line(vmsup("launch", "mbkernel", "--cmdline", "x" * 8000), "--cmdline is 8000 bytes")


# --- the library, without KVM ---------------------------------------------------------------


def test_boot_information_structure_byte_for_byte():
    memory = GuestMemory.with_ram(16 << 20)
    try:
        info = write_boot_info(memory, 16 << 20, "root=/dev/null quiet")
        assert info == layout.MULTIBOOT_INFO
        fields = struct.unpack("<22I", memory.read(info, 88))
        flags, mem_lower, mem_upper, _boot_device, cmdline, mods_count = fields[:6]
        assert flags == 0x24D
        assert (mem_lower, mem_upper, mods_count) == (640, 15360, 0)
        assert memory.read(cmdline, 21) == b"root=/dev/null quiet\0"
        mmap_length, mmap_addr = fields[11], fields[12]
        entries = [struct.unpack_from("<IQQI", memory.read(mmap_addr, mmap_length), i)
                   for i in range(0, mmap_length, 24)]
        assert entries == [(20, 0, 0xA0000, 1), (20, 0xA0000, 0x60000, 2), (20, 0x100000, 0xF00000, 1)]
        assert memory.read(fields[16], 6) == b"vmsup\0"
        assert BOOTLOADER_MAGIC == 0x2BADB002
    finally:
        memory.close()


def test_video_mode_request_is_answered_with_ega_text_and_otherwise_not_mentioned():
    memory = GuestMemory.with_ram(16 << 20)
    try:
        info = write_boot_info(memory, 16 << 20, "", video=True)
        flags, = struct.unpack_from("<I", memory.read(info, 4))
        assert flags == 0x24D | 1 << 12  # framebuffer_* valid; bit 11 (VBE) not: there is no VBE BIOS
        # Multiboot 0.6.96 §3.3: framebuffer_addr, pitch, width, height, bpp, type 2 = EGA text.
        assert struct.unpack("<QIIIBB", memory.read(info + 88, 22)) == (0xB8000, 160, 80, 25, 16, 2)
        info = write_boot_info(memory, 16 << 20, "")
        assert struct.unpack_from("<I", memory.read(info, 4))[0] == 0x24D
        assert memory.read(info + 88, 22) == bytes(22)
    finally:
        memory.close()


def test_detection_order_multiboot_then_elf_then_flat(tmp_path):
    (tmp_path / "k.bin").write_bytes(aout_kernel())
    (tmp_path / "f.bin").write_bytes(CODE)
    assert load_image(str(tmp_path / "k.bin")).describe() == "multiboot a.out-kludge kernel, entry 0x100024"
    assert load_image(str(tmp_path / "f.bin")).describe() == "flat binary, 9 bytes at 0x10000, entry 0x10000, real mode"
    assert load_image(str(GUEST_DIR / "elfhello32.elf")).describe() == "ELF32 executable, entry 0x10000, protected mode"
    mb = load_image(str(GUEST_DIR / "mbkernel.elf"))
    assert mb.format == "multiboot" and mb.mode == "protected" and mb.segments[0].gpa == LOAD


def test_header_past_8_kib_is_not_a_multiboot_header(tmp_path):
    path = tmp_path / "late.bin"
    path.write_bytes(b"\xf4" * 8192 + aout_kernel())
    assert load_image(str(path)).format == "flat"


def test_header_at_an_unaligned_offset_is_not_found(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\xf4" + struct.pack("<3I", MB_MAGIC, 0, (-MB_MAGIC) & 0xFFFF_FFFF))
    assert load_image(str(path)).format == "flat"


def test_truncated_aout_fields_are_refused(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(struct.pack("<4I", MB_MAGIC, AOUT, (-(MB_MAGIC + AOUT)) & 0xFFFF_FFFF, LOAD))
    with pytest.raises(GuestImageError, match="address fields are cut off"):
        load_image(str(path))


@pytest.mark.parametrize("key, codes", [
    ("a", "1e9e"), ("A", "1e9e"), ("Enter", "1c9c"), ("esc", "0181"), ("F12", "58d8"), ("space", "39b9"),
    ("Up", "e048e0c8"), ("Right", "e04de0cd"), ("ctrl+c", "1d2eae9d"), ("RightCtrl", "e01de09d"),
    ("ctrl+alt+delete", "1d38e053e0d3b89d"), ("/", "35b5"),
])
def test_key_names_give_scan_code_set_1_make_and_break(key, codes):
    assert key_stroke(key).hex() == codes


def test_text_uses_shift_for_capitals_and_symbols():
    assert [s.hex() for s in text_strokes("aB!\n")] == ["1e9e", "2a30b0aa", "2a0282aa", "1c9c"]


def test_key_script_steps_and_errors():
    steps = parse_key_script_text('# c\n\ntext:"a\\"b"\nwait:250\nTab\n', "k")
    assert [s.line for s in steps] == [3, 4, 5]
    assert [c.hex() for c in steps[0].strokes] == ["1e9e", "2a28a8aa", "30b0"]
    assert steps[1].wait_s == 0.25 and steps[2].strokes == (bytes.fromhex("0f8f"),)
    with pytest.raises(KeyScriptError, match=r"^k:2: unknown key name 'Bogus'$"):
        parse_key_script_text("a\nBogus\n", "k")


def test_i8042_raises_one_irq1_edge_per_byte_made_readable():
    i8042 = I8042()
    levels: list[int] = []
    i8042.connect_irq(levels.append)  # the IRQ line seam: KVM_IRQ_LINE in a VM
    assert inject_keys(i8042, ["a"])  # make + break: 2 bytes, the first readable at once
    assert levels == [1, 0]
    assert i8042.read(4, 1)[0] & 0x01  # OBF
    assert i8042.read(0, 1) == b"\x1e"  # the break code becomes readable: another edge
    assert levels == [1, 0, 1, 0]
    assert i8042.read(0, 1) == b"\x9e"
    assert levels == [1, 0, 1, 0] and not i8042.read(4, 1)[0] & 0x01
    i8042.write(4, b"\x60")  # command byte without the keyboard interrupt (bit 0)
    i8042.write(0, b"\x44")
    inject_keys(i8042, ["b"])
    assert levels == [1, 0, 1, 0]  # no edge while IRQ 1 is disabled
    assert i8042.read(0, 1) == b"\x30"


def test_i8042_keyboard_commands_are_acknowledged_before_queued_keys():
    i8042 = I8042()
    inject_keys(i8042, ["a"])
    i8042.write(0, b"\xff")  # keyboard reset: clears its buffer, answers ACK then BAT passed
    got = [i8042.read(0, 1)[0] for _ in range(3)]
    assert got == [0x1E, 0xFA, 0xAA]  # 0x1E was already in the controller's output buffer
    assert not i8042.read(4, 1)[0] & 0x01
    i8042.write(0, b"\xf2")  # identify: ACK, AB 41 (an MF2 keyboard through translation)
    assert [i8042.read(0, 1)[0] for _ in range(3)] == [0xFA, 0xAB, 0x41]


def test_i8042_keys_wait_while_the_keyboard_interface_is_disabled():
    i8042 = I8042()
    i8042.write(4, b"\xad")  # disable the keyboard interface
    inject_keys(i8042, ["a"])
    assert not i8042.read(4, 1)[0] & 0x01
    i8042.write(4, b"\xae")
    assert i8042.read(0, 1) == b"\x1e"


def test_i8042_irq1_pulses_never_overlap_so_no_edge_is_lost():
    # The guest may take IRQ 1 while the injecting thread still holds the line high and read 0x60,
    # making the next byte readable: that second pulse must wait, or the 8259 sees no second edge.
    import threading

    i8042 = I8042()
    levels: list[int] = []
    reader: list[threading.Thread] = []

    def line(level: int) -> None:
        levels.append(level)
        if level == 1 and not reader:  # the "guest" reads while the injector's raise is in flight
            reader.append(threading.Thread(target=i8042.read, args=(0, 1)))
            reader[0].start()
            reader[0].join(0.2)

    i8042.connect_irq(line)
    inject_keys(i8042, ["a"])
    reader[0].join()
    assert levels == [1, 0, 1, 0]
