"""Guest symbols and source lines (tracetool.symbols) against binutils on the bundled guests.

The oracles are GNU nm and addr2line, run here on the same files; the guests are the real
committed ELFs (built with -g, see guest/Makefile).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shutil
import subprocess
import tomllib

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile

from tests.conftest import REPO
from tracetool.symbols import NO_ID, SymbolError, SymbolTable, _RangeMap, symbols_for_vm

GUEST = REPO / "guest"
needs_binutils = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("nm", "addr2line", "objdump", "objcopy")),
    reason="needs GNU binutils (nm, addr2line, objdump, objcopy) on PATH")


def manifest() -> dict:
    with open(GUEST / "guests.toml", "rb") as f:
        return tomllib.load(f)


def guest_elfs() -> list[tuple[str, int]]:
    """(ELF file, code segment base) of every bundled guest: real-mode guests' symbols are CS offsets."""
    out = []
    for name, entry in sorted(manifest().items()):
        elf = GUEST / (entry["file"] if entry["file"].endswith(".elf") else f"{name}.elf")
        out.append((elf.name, 0x10000 if entry.get("mode") == "real" else 0))
    return out


def vm_start_for(image, mode: str, sha256: str | None = None) -> dict:
    """The fields of a vm-start record symbols_for_vm reads (as vmworker.recording writes them)."""
    data = image.read_bytes()
    return {"name": image.stem, "mode": mode, "spec": {"guest": str(image), "load_addr": None},
            "sha256": sha256 or hashlib.sha256(data).hexdigest()}


def code_ranges(path) -> list[tuple[int, int]]:
    """[start, end) of every allocated, executable section (.text; .setup and .kernel in bzguest)."""
    from elftools.elf.constants import SH_FLAGS
    with open(path, "rb") as f:
        return [(sec["sh_addr"], sec["sh_addr"] + sec["sh_size"]) for sec in ELFFile(f).iter_sections()
                if sec["sh_flags"] & SH_FLAGS.SHF_ALLOC and sec["sh_flags"] & SH_FLAGS.SHF_EXECINSTR and sec["sh_size"]]


def text_range(path) -> tuple[int, int]:
    (low, high), = code_ranges(path)
    return low, high


@needs_binutils
@pytest.mark.parametrize("elf,base", guest_elfs())
def test_every_code_symbol_nm_lists_resolves_to_itself(elf, base):
    table = SymbolTable.from_file(GUEST / elf, bias=base)
    assert table.has_symbols and table.warnings == []
    nm = subprocess.run(["nm", "-n", str(GUEST / elf)], capture_output=True, text=True, check=True).stdout
    ranges = code_ranges(GUEST / elf)
    by_address: dict[int, set[str]] = {}
    for line in nm.splitlines():
        addr, kind, name = line.split()
        if kind in "tT" and any(low <= int(addr, 16) < high for low, high in ranges):
            by_address.setdefault(int(addr, 16), set()).add(name)
    assert by_address, f"nm lists no code symbols in {elf}"
    for addr, names in by_address.items():
        loc = table.resolve(addr + base)
        assert loc.symbol in names and loc.offset == 0, (elf, hex(addr), loc, names)


@needs_binutils
@pytest.mark.parametrize("elf,base", guest_elfs())
def test_every_code_byte_has_the_source_line_addr2line_gives(elf, base):
    table = SymbolTable.from_file(GUEST / elf, bias=base)
    addrs = [a for low, high in code_ranges(GUEST / elf) for a in range(low, high)]
    out = subprocess.run(["addr2line", "-e", str(GUEST / elf), *map(hex, addrs)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    ids = table.line_ids(np.array(addrs, np.uint64) + np.uint64(base))
    for addr, line_id, expected in zip(addrs, ids.tolist(), out):
        expected = expected.split(" (discriminator")[0]
        file, _, number = expected.rpartition(":")
        got = table.line_text(line_id) if line_id != NO_ID else None
        want = None if number == "?" or file == "??" else f"{posixpath.normpath(file)}:{number}"
        assert got == want, (elf, hex(addr))


@needs_binutils
def test_seed16_out_instruction_resolves_to_its_source_line_from_the_listing():
    # The listing: where objdump finds seed16's `out`, as an offset in its code segment.
    listing = subprocess.run(["objdump", "-d", "-m", "i8086", str(GUEST / "seed16.elf")],
                             capture_output=True, text=True, check=True).stdout
    out_offset = int(re.search(r"^\s*([0-9a-f]+):\s+e7 10\s+out", listing, re.M).group(1), 16)
    symbols = symbols_for_vm(vm_start_for(GUEST / "seed16.bin", "real"))
    assert symbols.warnings == []
    for linear in (0x10000 + out_offset, 0x10000 + out_offset + 2):  # at the out, or just after it
        loc = symbols.table.resolve(linear)
        assert loc.symbol == "loop1" and loc.file == "seed16.S"
    loc = symbols.table.resolve(0x10000 + out_offset)
    source = (GUEST / "seed16.S").read_text().splitlines()[loc.line - 1]
    assert "out" in source
    assert str(loc) == f"{0x10000 + out_offset:#x} <loop1> (seed16.S:{loc.line})"
    assert str(symbols.table.resolve(0x10004)).startswith("0x10004 <loop1+0x2> (seed16.S:")


def test_mbkernel_addresses_resolve_to_its_c_functions_and_lines():
    symbols = symbols_for_vm(vm_start_for(GUEST / "mbkernel.elf", "protected"))
    table = symbols.table
    assert symbols.warnings == []
    for function in ("kmain", "isr_dispatch", "print"):
        start = int(table.starts[table.names.index(function)])
        loc = table.resolve(start + 4)
        assert loc.symbol == function and loc.offset == 4
        assert loc.file == "mbkernel.c" and loc.line > 0
        assert str(loc) == f"{start + 4:#x} <{function}+0x4> (mbkernel.c:{loc.line})"
    assert table.resolve(0x1000).symbol is None and table.resolve(0x1000).file is None
    assert str(table.resolve(0x1000)) == "0x1000"


@needs_binutils
@pytest.mark.parametrize("nm_flags", [["-n"], ["-n", "-S"]])
def test_a_flat_guest_with_an_nm_map_resolves_like_its_elf(tmp_path, nm_flags):
    image = tmp_path / "protected32.bin"
    shutil.copy(GUEST / "protected32.bin", image)
    nm = subprocess.run(["nm", *nm_flags, str(GUEST / "protected32.elf")], capture_output=True, text=True, check=True)
    (tmp_path / "protected32.map").write_text(nm.stdout)
    symbols = symbols_for_vm(vm_start_for(image, "protected"))
    assert symbols.warnings == [] and symbols.table.source.endswith("protected32.map")
    from_elf = SymbolTable.from_file(GUEST / "protected32.elf")
    low, high = text_range(GUEST / "protected32.elf")
    addrs = np.arange(low, high, dtype=np.uint64)
    map_names = [symbols.table.symbol_name(i) for i in symbols.table.symbol_ids(addrs).tolist()]
    elf_names = [from_elf.symbol_name(i) for i in from_elf.symbol_ids(addrs).tolist()]
    assert map_names == elf_names
    assert not symbols.table.has_lines  # a map has no source lines


@needs_binutils
def test_a_stripped_elf_gives_addresses_without_symbols_and_no_error(tmp_path):
    stripped = tmp_path / "mbkernel.elf"
    subprocess.run(["objcopy", "--strip-all", str(GUEST / "mbkernel.elf"), str(stripped)], check=True)
    symbols = symbols_for_vm(vm_start_for(stripped, "protected"))
    assert symbols.warnings == []
    assert not symbols.table.has_symbols and not symbols.table.has_lines
    assert str(symbols.table.resolve(0x100010)) == "0x100010"
    assert (symbols.table.symbol_ids(np.arange(0x100000, 0x100100, dtype=np.uint64)) == NO_ID).all()


def test_corrupt_dwarf_keeps_the_symbols_and_warns_once(tmp_path):
    broken = tmp_path / "mbkernel.elf"
    data = bytearray((GUEST / "mbkernel.elf").read_bytes())
    with open(GUEST / "mbkernel.elf", "rb") as f:
        line = ELFFile(f).get_section_by_name(".debug_line")
        offset, size = line["sh_offset"], line["sh_size"]
    data[offset:offset + size] = b"\xff" * size  # every unit length says "64-bit DWARF", then nonsense
    broken.write_bytes(data)
    table = SymbolTable.from_file(broken)
    assert table.has_symbols and not table.has_lines
    assert len(table.warnings) == 1 and "DWARF" in table.warnings[0] and "\n" not in table.warnings[0]
    assert table.resolve(int(table.starts[table.names.index("kmain")])).symbol == "kmain"


def test_an_image_changed_after_recording_gives_addresses_only_and_one_warning(tmp_path):
    for name in ("seed16.bin", "seed16.elf"):
        shutil.copy(GUEST / name, tmp_path / name)
    record = vm_start_for(tmp_path / "seed16.bin", "real")
    (tmp_path / "seed16.bin").write_bytes(b"\x90" + (GUEST / "seed16.bin").read_bytes())
    symbols = symbols_for_vm(record)
    assert symbols.table is None
    assert len(symbols.warnings) == 1 and "sha256" in symbols.warnings[0]


def test_an_elf_beside_a_flat_image_is_used_only_when_its_code_is_the_images(tmp_path):
    shutil.copy(GUEST / "hello.bin", tmp_path / "seed16.bin")
    shutil.copy(GUEST / "seed16.elf", tmp_path / "seed16.elf")
    symbols = symbols_for_vm(vm_start_for(tmp_path / "seed16.bin", "real"))
    assert symbols.table is None and len(symbols.warnings) == 1


def test_symbols_file_given_wins_over_the_image(tmp_path):
    record = vm_start_for(GUEST / "seed16.bin", "real", sha256="0" * 64)  # image "changed": no matter
    symbols = symbols_for_vm(record, GUEST / "seed16.elf")
    assert symbols.warnings == [] and symbols.table.resolve(0x10002).symbol == "loop1"


@pytest.mark.parametrize("content,reason", [
    (None, "no such file"),
    (b"", "no symbol lines"),
    (b"\x00\x01\x02\xff\xfe", "binary data"),
    (b"this is not a map\n", "line 1"),
    (b"00010000 T _start\nzz T broken\n", "line 2"),
    (b"\x7fELF\x01\x01\x01garbage", "not a readable ELF file"),
])
def test_a_bad_symbols_file_is_one_error_line(tmp_path, content, reason):
    path = tmp_path / "symbols"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SymbolError) as raised:
        SymbolTable.from_file(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and reason in message and "\n" not in message
    with pytest.raises(SymbolError):
        symbols_for_vm(vm_start_for(GUEST / "seed16.bin", "real"), path)


def test_a_directory_is_not_a_symbols_file(tmp_path):
    with pytest.raises(SymbolError, match="is a directory"):
        SymbolTable.from_file(tmp_path)


def test_bulk_lookup_agrees_with_one_at_a_time_and_with_binary_search():
    table = SymbolTable.from_file(GUEST / "mbkernel.elf")
    addrs = np.arange(0xFF000, 0x106000, 3, dtype=np.uint64)
    ids = table.symbol_ids(addrs)
    for addr, sym in zip(addrs.tolist()[::17], ids.tolist()[::17]):
        assert table.resolve(addr).symbol == table.symbol_name(sym)
    sparse = _RangeMap([0x1000, 0x2000, 0x7000_0000_0000, 0x7000_0000_0010], [0, NO_ID, 1, NO_ID])
    assert sparse._dense is None  # spans too much memory for a dense table
    probe = np.array([0, 0xFFF, 0x1000, 0x1FFF, 0x2000, 0x7000_0000_0000, 0x7000_0000_000F, 0x7000_0000_0010,
                      2**64 - 1], np.uint64)
    assert sparse.lookup(probe).tolist() == [NO_ID, NO_ID, 0, 0, NO_ID, 1, 1, NO_ID, NO_ID]
    dense = _RangeMap([0x1000, 0x2000, 0x3000, 0x3010], [0, NO_ID, 1, NO_ID])
    assert dense._dense is not None
    probe = np.array([0, 0xFFF, 0x1000, 0x1FFF, 0x2000, 0x3000, 0x300F, 0x3010, 2**64 - 1], np.uint64)
    assert dense.lookup(probe).tolist() == [NO_ID, NO_ID, 0, 0, NO_ID, 1, 1, NO_ID, NO_ID]


def test_a_symbol_nested_in_a_sized_one_never_makes_ranges_overlap(tmp_path):
    path = tmp_path / "nested.map"
    path.write_text("00001000 00000040 T outer\n00001010 00000008 t inner\n00001100 T after\n")
    table = SymbolTable.from_file(path)
    probe = [0x1000, 0x100F, 0x1010, 0x1017, 0x1018, 0x1040, 0x1100]
    assert [table.resolve(a).symbol for a in probe] == ["outer", "outer", "inner", "inner", None, None, "after"]
    assert np.all(np.diff(table.starts.astype(np.int64)) > 0) and np.all(table.ends[:-1] <= table.starts[1:])
