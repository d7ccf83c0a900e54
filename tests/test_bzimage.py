"""Linux boot protocol kernels (bzImage): the setup header read, the zero page written, both entries.

The KVM tests run the real CLI on the bundled bzguest, which prints the boot_params fields it reads
(loader type, segment selectors, e820 map, command line, screen_info, initrd address, size and byte
sum); each is checked against what was asked. Bad images are the bundled one with one header field
patched or its tail cut. The library tests check the parser and the initrd placement without a VM.
"""

from __future__ import annotations

import re
import struct

import pytest

from conftest import GUEST_DIR
from vmworker import bzimage, layout
from vmworker.errors import GuestImageError, SpecError
from vmworker.loader import load_image
from vmworker.memory import GuestMemory

EXIT_BAD_INPUT = 2
BZGUEST = GUEST_DIR / "bzguest.bin"
E820_LINE = re.compile(r"^e820 ([0-9a-f]{16}) ([0-9a-f]{16}) ([0-9a-f]{2})$", re.M)


def patched(tmp_path, name: str, *fields: tuple[int, str, int], cut: int | None = None):
    """A copy of bzguest with header fields (offset, struct code, value) replaced, or cut to `cut` bytes."""
    data = bytearray(BZGUEST.read_bytes())
    for off, code, value in fields:
        struct.pack_into("<" + code, data, off, value)
    path = tmp_path / name
    path.write_bytes(bytes(data[:cut]) if cut is not None else bytes(data))
    return path


def assert_one_error_line(proc, *fragments: str) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmsup: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.returncode == EXIT_BAD_INPUT
    return lines[0]


def report(out: str) -> dict:
    """bzguest's lines, by their first word (e820 rows as a list of (addr, size, type))."""
    fields = {"e820": [(int(a, 16), int(s, 16), int(t, 16)) for a, s, t in E820_LINE.findall(out)]}
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("loader", "screen", "initrd", "cmdline"):
            fields[word] = rest
    fields["entry"] = re.search(r"^bzguest: (\d+)-bit entry, boot_params ([0-9a-f]{8})$", out, re.M).groups()
    return fields


def assert_e820_covers(rows, mem: int) -> None:
    """The map lists every byte of [0, mem) once, as RAM or reserved, and the RAM in it is RAM."""
    pos = 0
    for addr, size, kind in sorted(r for r in rows if r[0] < mem):
        assert addr == pos, rows
        assert kind in (bzimage.E820_RAM, bzimage.E820_RESERVED)
        pos = addr + size
    assert pos == mem, rows
    ram = sum(size for addr, size, kind in rows if kind == bzimage.E820_RAM)
    assert ram == mem - (layout.LINUX_AREA_END - layout.BOOT_GDT) - (layout.HIGH_RAM_START - layout.LOW_RAM_END)


# --- the parser, without a VM -------------------------------------------------------------------

def test_bundled_guest_is_detected_by_its_setup_header_with_both_entries():
    image = load_image(str(BZGUEST))
    assert image.format == "bzimage" and image.linux.version == 0x020F and image.linux.kernel_64
    assert image.describe() == "bzImage, protocol 2.15, 64-bit entry"
    assert (image.mode, image.entry) == ("long", layout.LINUX_KERNEL_ADDR + 0x200)
    image32 = load_image(str(BZGUEST), boot_entry="32")
    assert image32.describe() == "bzImage, protocol 2.15, 32-bit entry"
    assert (image32.mode, image32.entry) == ("protected", image32.linux.code32_start)
    # The protected-mode kernel is the file from (setup_sects + 1) * 512 on, loaded at 1 MiB.
    data = BZGUEST.read_bytes()
    segment, = image.segments
    assert segment.gpa == 0x100000 and segment.data == data[(data[0x1F1] + 1) * 512:]
    assert image.linux.setup_header == data[0x1F1:0x202 + data[0x201]]


def test_zero_page_holds_the_setup_header_and_what_the_loader_fills_in():
    image = load_image(str(BZGUEST))
    mem = 32 << 20
    plan = bzimage.plan_boot(image, mem, "console=ttyS0", 5000, 1)
    initrd = bytes(range(256)) * 19 + bytes(136)
    memory = GuestMemory.with_ram(mem)
    try:
        at = bzimage.write_boot_params(memory, image, mem, plan, initrd)
        zp = memory.read(at, 4096)
        assert zp[0x1F1:0x202] == BZGUEST.read_bytes()[0x1F1:0x202]
        assert zp[0x202:0x206] == b"HdrS" and zp[0x210] == 0xFF  # type_of_loader: no assigned id
        cmd_line_ptr, = struct.unpack_from("<I", zp, 0x228)
        assert memory.read(cmd_line_ptr, 14) == b"console=ttyS0\0"
        ramdisk_image, ramdisk_size = struct.unpack_from("<II", zp, 0x218)
        assert ramdisk_size == 5000 and ramdisk_image % 4096 == 0
        assert ramdisk_image >= image.linux.end and ramdisk_image + 5000 <= mem - layout.STACK_SLOT
        assert memory.read(ramdisk_image, 5000) == initrd
        assert (zp[0x06], zp[0x07], zp[0x0E], zp[0x0F]) == (3, 80, 25, 1)  # screen_info: VGA text 80x25
        rows = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(zp[0x1E8])]
        assert_e820_covers(rows, mem)
    finally:
        memory.close()


def test_initrd_goes_no_higher_than_initrd_addr_max(tmp_path):
    path = patched(tmp_path, "low.bin", (0x22C, "I", 0x3FFFFF))  # initrd_addr_max: 4 MiB - 1
    image = load_image(str(path))
    plan = bzimage.plan_boot(image, 64 << 20, "", 100_000, 1)
    assert plan.initrd_addr + 100_000 <= 0x400000
    with pytest.raises(GuestImageError, match="does not fit between the kernel's end .* and initrd_addr_max"):
        bzimage.plan_boot(image, 64 << 20, "", 3 << 20, 1)


def test_too_little_memory_for_kernel_and_initrd_names_the_need():
    image = load_image(str(BZGUEST))
    with pytest.raises(SpecError, match=r"--mem 2 MiB is too small for the kernel .* needs at least \d+ bytes"):
        bzimage.plan_boot(image, 2 << 20, "", 1 << 20, 1)


def test_a_command_line_longer_than_cmdline_size_is_refused(tmp_path):
    image = load_image(str(patched(tmp_path, "short.bin", (0x238, "I", 10))))
    with pytest.raises(SpecError, match="at most 10"):
        bzimage.plan_boot(image, 16 << 20, "x" * 11, 0, 1)


@pytest.mark.parametrize("fields, cut, reason", [
    ([], 0x700, "truncated: syssize says"),
    ([(0x1F1, "B", 40)], None, "setup_sects 40 puts the protected-mode kernel at offset 0x5200, past the end"),
    ([(0x206, "H", 0x0201)], None, "boot protocol 2.01 is older than 2.02"),
    ([(0x211, "B", 0)], None, "a zImage"),
    ([], 0x210, "truncated setup header"),
    ([(0x214, "I", 0x50000)], None, "32-bit entry 0x50000 is outside the protected-mode kernel"),
])
def test_broken_headers_are_refused_with_the_reason(tmp_path, fields, cut, reason):
    path = patched(tmp_path, "bad.bin", *fields, cut=cut)
    with pytest.raises(GuestImageError, match=re.escape(reason)):
        load_image(str(path), boot_entry="32")


def test_64_bit_entry_needs_xlf_kernel_64(tmp_path):
    path = patched(tmp_path, "only32.bin", (0x236, "H", 0))
    assert load_image(str(path)).describe() == "bzImage, protocol 2.15, 32-bit entry"
    with pytest.raises(GuestImageError, match="no 64-bit entry"):
        load_image(str(path), boot_entry="64")


# --- the bundled kernel on KVM ------------------------------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("entry", ["32", "64"])
def test_bzguest_reads_the_boot_params_it_was_given_through_either_entry(vmsup, tmp_path, entry):
    initrd = bytes((i * 7 + 3) & 0xFF for i in range(5000))
    (tmp_path / "initrd.img").write_bytes(initrd)
    proc = vmsup("launch", "bzguest", "--quiet", "--no-trace", "--boot-entry", entry, "--mem", "24M",
                 "--cmdline", "console=ttyS0 hello=world", "--initrd", str(tmp_path / "initrd.img"))
    assert proc.returncode == 0, proc.stderr
    assert f"vmsup: bzguest.bin: bzImage, protocol 2.15, {entry}-bit entry\n" in proc.stderr
    got = report(proc.stdout)
    assert got["entry"] == (entry, f"{layout.LINUX_BOOT_PARAMS:08x}")
    assert got["loader"] == "ff cs 10 ds 18 ss 18"  # __BOOT_CS / __BOOT_DS
    assert got["cmdline"] == "console=ttyS0 hello=world"
    assert got["screen"] == "mode 03 cols 50 lines 19 vga 01"  # 80 x 25, in hex
    addr, size, _, total = got["initrd"].split()
    assert int(size, 16) == len(initrd) and int(total, 16) == sum(initrd)
    assert int(addr, 16) % 4096 == 0 and int(addr, 16) + len(initrd) <= 24 << 20
    assert_e820_covers(got["e820"], 24 << 20)
    assert proc.stdout.endswith("bzguest: done\n")


@pytest.mark.kvm
def test_a_bzimage_gets_the_irqchip_and_runs_on_the_bsp_only(vmsup):
    # irqchip on by default, as for multiboot: the in-kernel LAPIC parks the AP until INIT/SIPI,
    # so the report appears once.
    proc = vmsup("launch", "bzguest", "--quiet", "--no-trace", "--vcpus", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bzguest: done\n") == 1
    assert report(proc.stdout)["initrd"] == "00000000 00000000 sum 00000000"


@pytest.mark.kvm
def test_bad_bzimages_and_initrds_are_one_line_and_exit_2(vmsup, tmp_path):
    assert_one_error_line(vmsup("launch", str(patched(tmp_path, "cut.bin", cut=0x600)), "--no-trace"),
                          "bzImage: truncated")
    assert_one_error_line(vmsup("launch", str(patched(tmp_path, "sects.bin", (0x1F1, "B", 200))), "--no-trace"),
                          "setup_sects 200", "past the end")
    big = tmp_path / "big.img"
    big.write_bytes(bytes(3 << 20))
    low = patched(tmp_path, "low.bin", (0x22C, "I", 0x3FFFFF))
    assert_one_error_line(vmsup("launch", str(low), "--no-trace", "--initrd", str(big)), "initrd_addr_max 0x3fffff")
    assert_one_error_line(vmsup("launch", "bzguest", "--no-trace", "--mem", "2M", "--initrd", str(big)),
                          "--mem 2 MiB is too small for the kernel")
    assert_one_error_line(vmsup("launch", "hello", "--no-trace", "--initrd", str(big)), "--initrd applies to bzImage")
    assert_one_error_line(vmsup("launch", "hello", "--no-trace", "--boot-entry", "64"), "--boot-entry applies to bzImage")
    assert_one_error_line(vmsup("launch", "bzguest", "--no-trace", "--mode", "real"), "--mode applies to flat")
    assert_one_error_line(vmsup("launch", "bzguest", "--no-trace", "--boot-entry", "16"), "--boot-entry")


@pytest.mark.kvm
def test_a_fleet_file_gives_initrd_relative_to_itself_and_the_boot_entry(vmsup, tmp_path):
    (tmp_path / "rd.img").write_bytes(b"\x01\x02\x03")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[vm]]\nname = "bz"\nguest = "{BZGUEST}"\ninitrd = "rd.img"\nboot_entry = "32"\n'
                     'cmdline = "from the fleet"\n')
    proc = vmsup("launch", "--fleet", str(fleet), "--quiet", "--no-trace")
    assert proc.returncode == 0, proc.stderr
    got = report(proc.stdout)
    assert got["entry"][0] == "32" and got["cmdline"] == "from the fleet"
    assert got["initrd"].split()[1:] == ["00000003", "sum", "00000006"]
