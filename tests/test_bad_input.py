"""Bad input to `vmsup launch` ends in exactly one `vmsup: error: …` line on stderr, exit code 2
(status.EXIT_BAD_INPUT), nothing on stdout and never a traceback.

Images are written into tmp_path by the tests; malformed ELFs are built with struct from a
well-formed one (whose launch is the positive control) by changing one field at a time.
Most of these are rejected by the CLI before any worker or VM exists, so they need no KVM.
"""

from __future__ import annotations

import errno
import struct

import pytest

from vmworker.errors import KvmError
from vmworker.kvm import Kvm

EXIT_BAD_INPUT = 2
LOAD = 0x100000  # where the hand-made ELFs load: above the boot tables, inside 16 MiB of RAM
HLT = b"\xf4"


def assert_one_error_line(proc, *fragments: str) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmsup: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert proc.stdout == ""
    assert proc.returncode == EXIT_BAD_INPUT
    return lines[0]


# ELF header and program header layouts (System V gABI): ELF32 and ELF64, little-endian.
EHDR = {32: struct.Struct("<16sHHIIIIIHHHHHH"), 64: struct.Struct("<16sHHIQQQIHHHHHH")}
PHDR = {32: struct.Struct("<IIIIIIII"), 64: struct.Struct("<IIQQQQQQ")}
EM = {32: 3, 64: 62}  # EM_386, EM_X86_64
PT_LOAD, PT_NOTE, ET_EXEC, ET_DYN = 1, 4, 2, 3


def make_elf(bits: int = 32, *, code: bytes = HLT, e_type: int = ET_EXEC, machine: int | None = None,
             entry: int = LOAD, phnum: int | None = None, phoff: int | None = None, p_type: int = PT_LOAD,
             paddr: int = LOAD, filesz: int | None = None, memsz: int | None = None) -> bytes:
    """An executable ELF with one program header and `code` right after it; each keyword breaks one field."""
    ehdr, phdr = EHDR[bits], PHDR[bits]
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1, 1]) + bytes(9)  # class, LSB, EV_CURRENT
    offset = ehdr.size + phdr.size
    filesz = len(code) if filesz is None else filesz
    memsz = len(code) if memsz is None else memsz
    header = ehdr.pack(ident, e_type, EM[bits] if machine is None else machine, 1, entry,
                       ehdr.size if phoff is None else phoff, 0, 0, ehdr.size, phdr.size,
                       1 if phnum is None else phnum, 0, 0, 0)
    if bits == 32:  # p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align
        ph = phdr.pack(p_type, offset, paddr, paddr, filesz, memsz, 5, 0x1000)
    else:  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        ph = phdr.pack(p_type, 5, offset, paddr, paddr, filesz, memsz, 0x1000)
    return header + ph + code


@pytest.mark.kvm
@pytest.mark.parametrize("bits, mode", [(32, "protected"), (64, "long")])
def test_well_formed_handmade_elf_runs(vmsup, tmp_path, bits, mode):
    # The control for every malformed ELF below: the builder itself makes a loadable file.
    path = tmp_path / f"ok{bits}.elf"
    path.write_bytes(make_elf(bits))
    proc = vmsup("launch", str(path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"vmsup: ok{bits}: halted — 1 exits" in proc.stderr


MALFORMED_ELFS = {
    "truncated identification": (make_elf(64)[:10], [], "truncated identification"),
    "truncated header": (make_elf(64)[:40], [], "truncated header"),
    "wrong machine": (make_elf(32, machine=40), [], "machine 40 is not i386"),
    "ELF64 with the i386 machine": (make_elf(64, machine=3), [], "machine 3 is not x86-64"),
    "shared object, not executable": (make_elf(32, e_type=ET_DYN), [], "not an executable"),
    "no program headers": (make_elf(32, phnum=0), [], "no program headers"),
    "phnum huge": (make_elf(64, phnum=0xFFFF), [], "65535 program headers"),
    "program headers past the end": (make_elf(32, phoff=0x10000), [], "program headers run past the end of the file"),
    "no PT_LOAD": (make_elf(32, p_type=PT_NOTE), [], "no loadable (PT_LOAD) segment"),
    "segment past the end of the file": (make_elf(32, filesz=0x1000, memsz=0x1000), [], "runs past the end of the file"),
    "filesz > memsz": (make_elf(32, code=HLT * 2, filesz=2, memsz=1), [], "file size 2 exceeds memory size 1"),
    "entry outside every segment": (make_elf(64, entry=LOAD + 0x1000), [], "entry 0x101000 is outside every loadable segment"),
    "segment beyond guest RAM": (make_elf(32, paddr=0xF000_0000, entry=0xF000_0000), [], "beyond guest RAM"),
    "segment beyond --mem": (make_elf(32, paddr=0x200_0000, entry=0x200_0000), ["--mem", "16M"], "does not fit in 16 MiB"),
    "segment over the boot tables": (make_elf(32, paddr=0x1000, entry=0x1000), [], "boot tables"),
    "ELF64 forced into real mode": (make_elf(64), ["--mode", "real"], "runs in long mode, not real"),
    "ELF32 forced into long mode": (make_elf(32), ["--mode", "long"], "runs in protected mode, not long"),
    "ELF with --load-addr": (make_elf(32), ["--load-addr", "0x100000"], "--load-addr applies to flat binaries"),
}


@pytest.mark.parametrize("case", list(MALFORMED_ELFS))
def test_malformed_elf_is_rejected_with_one_line(vmsup, tmp_path, case):
    data, args, fragment = MALFORMED_ELFS[case]
    path = tmp_path / "bad.elf"
    path.write_bytes(data)
    assert_one_error_line(vmsup("launch", str(path), *args), str(path), fragment)


@pytest.fixture
def images(tmp_path):
    (tmp_path / "hlt.bin").write_bytes(HLT)
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "big.bin").write_bytes(HLT * (2 << 20))  # 2 MiB
    (tmp_path / "a-directory").mkdir()
    return tmp_path


# args ({d} = the images directory), fragments of the error line
BAD_IMAGES = {
    "missing file": (["{d}/missing.bin"], ["missing.bin", "no such file"]),
    "a directory": (["{d}/a-directory"], ["a-directory", "is a directory"]),
    "an empty file": (["{d}/empty.bin"], ["empty.bin", "is empty"]),
    "image larger than memory": (["{d}/big.bin", "--mem", "1M"], ["big.bin", "does not fit in 1 MiB"]),
    "load address outside memory": (["{d}/hlt.bin", "--mode", "protected", "--load-addr", "0x2000000"],
                                    ["0x2000000", "does not fit in 16 MiB"]),
    "entry past the image": (["{d}/hlt.bin", "--entry", "0x10005"], ["entry 0x10005 is outside the image"]),
    "entry before the image": (["{d}/hlt.bin", "--entry", "0xfff0"], ["entry 0xfff0 is outside the image"]),
    "real mode, unaligned load address": (["{d}/hlt.bin", "--load-addr", "0x10008"], ["16-byte aligned", "0x10008"]),
    "real mode, load address above 1 MiB": (["{d}/hlt.bin", "--load-addr", "0x100000"], ["below 1 MiB", "0x100000"]),
    "protected mode over the boot tables": (["{d}/hlt.bin", "--mode", "protected", "--load-addr", "0x1000"],
                                            ["boot tables"]),
    "unknown bundled guest": (["nosuchguest"], ["nosuchguest", "no such file or bundled guest", "seed16"]),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_is_rejected_with_one_line(vmsup, images, case):
    args, fragments = BAD_IMAGES[case]
    assert_one_error_line(vmsup("launch", *(a.format(d=images) for a in args)), *fragments)


BAD_FLAGS = {
    "--mem 0": (["--mem", "0"], ["memory size must be greater than 0"]),
    "--mem unaligned": (["--mem", "12345"], ["12345", "page size"]),
    "--mem below the minimum": (["--mem", "64K"], ["below the minimum"]),
    "--mem over the 3 GiB cap": (["--mem", "4G"], ["4294967296", "cap of 3072 MiB"]),
    "--mem not a size": (["--mem", "lots"], ["--mem", "'lots'", "not a size"]),
    "--vcpus 0": (["--vcpus", "0"], ["--vcpus", "at least 1"]),
    "--vcpus not a number": (["--vcpus", "abc"], ["--vcpus"]),
    "--max-exits negative": (["--max-exits", "-1"], ["--max-exits", "at least 1"]),
    "--timeout negative": (["--timeout", "-1"], ["--timeout", "positive"]),
    "--mode bogus": (["--mode", "bogus"], ["--mode", "bogus"]),
    "--load-addr not a number": (["--load-addr", "here"], ["--load-addr", "'here'", "not a number"]),
    "--entry negative": (["--entry", "-16"], ["--entry", "negative"]),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_is_rejected_with_one_line(vmsup, case):
    args, fragments = BAD_FLAGS[case]
    assert_one_error_line(vmsup("launch", "hello", *args), *fragments)


def test_unreadable_serial_input_file_is_rejected_with_one_line(vmsup, tmp_path):
    missing = tmp_path / "no-input.txt"
    assert_one_error_line(vmsup("launch", "echo", "--serial-in", str(missing)), "serial input", str(missing))


@pytest.fixture(scope="module")
def kvm_vcpu_limit(kvm_required) -> int:  # module scope runs before the marker's skip: ask for it here
    with Kvm() as kvm:
        return kvm.max_vcpus()


@pytest.mark.kvm
def test_vcpus_over_the_kvm_limit_names_the_limit(vmsup, kvm_vcpu_limit):
    proc = vmsup("launch", "smp", "--vcpus", str(kvm_vcpu_limit + 1), "--mem", "64M", "--serial-in", "none", "-q")
    assert_one_error_line(proc, f"--vcpus {kvm_vcpu_limit + 1}", f"KVM limit of {kvm_vcpu_limit}")


@pytest.mark.kvm
def test_vcpus_far_over_the_kvm_limit_names_the_limit_even_with_default_memory(vmsup, kvm_vcpu_limit):
    proc = vmsup("launch", "smp", "--vcpus", "5000", "--serial-in", "none", "-q")
    assert_one_error_line(proc, "--vcpus 5000", f"KVM limit of {kvm_vcpu_limit}")


def test_missing_kvm_device_raises_one_line_kvm_error_naming_the_path():
    # There is no flag for another device path, so the library is tested directly.
    with pytest.raises(KvmError) as raised:
        Kvm("/nonexistent/kvm")
    message = str(raised.value)
    assert "\n" not in message
    assert "/nonexistent/kvm" in message
    assert raised.value.errno == errno.ENOENT
