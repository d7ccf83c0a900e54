"""vmtrace names where each exit came from: `show` prints `rip=… <symbol+off> (file:line)`,
`summary --by rip|symbol|line` groups by it, `--symbols FILE` overrides the trace's guest image.

Real VMs recorded with vmsup launch; the oracles are binutils (addr2line, nm) run here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.kvm

GUEST = REPO / "guest"
needs_binutils = pytest.mark.skipif(any(shutil.which(t) is None for t in ("addr2line", "nm", "objcopy")),
                                    reason="needs GNU binutils (addr2line, nm, objcopy)")


def vmtrace(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetool", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def record(vmsup, tmp_path, *args: str, name: str = "t.vmtrace"):
    trace = tmp_path / name
    proc = vmsup("launch", *args, "-q", "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    return trace


@pytest.fixture
def seed_trace(vmsup, tmp_path):
    return record(vmsup, tmp_path, "seed16", "--max-exits", "50", name="seed.vmtrace")


def addr2line(elf, offset: int) -> str:
    out = subprocess.run(["addr2line", "-e", str(elf), hex(offset)], capture_output=True, text=True, check=True)
    file, _, line = out.stdout.strip().rpartition(":")
    return f"{file.removeprefix('./')}:{line.split()[0]}"


@needs_binutils
def test_show_prints_each_exits_address_symbol_and_source_line(seed_trace):
    proc = vmtrace("show", seed_trace, "-n", "3")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    line = addr2line(GUEST / "seed16.elf", 0x4)  # linear 0x10004: offset 4 of seed16's code segment
    assert line == "seed16.S:15"
    for text in proc.stdout.splitlines():
        assert f" rip=0x10004 <loop1+0x2> ({line}) guest=" in text


def test_show_json_carries_the_address(seed_trace):
    proc = vmtrace("show", seed_trace, "-n", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(text)["rip"] for text in proc.stdout.splitlines()] == [0x10004, 0x10004]


@pytest.mark.parametrize("content,reason", [(None, "no such file"), (b"not a map at all\n", "nm-format map")])
def test_a_bad_symbols_file_is_one_line_and_exit_2(seed_trace, tmp_path, content, reason):
    path = tmp_path / "syms"
    if content is not None:
        path.write_bytes(content)
    for command in (["show"], ["summary", "--by", "symbol"]):
        proc = vmtrace(*command, seed_trace, "--symbols", path)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and reason in proc.stderr and "Traceback" not in proc.stderr


@needs_binutils
def test_a_stripped_elf_as_symbols_shows_bare_addresses_without_error(seed_trace, tmp_path):
    stripped = tmp_path / "seed16.stripped"
    subprocess.run(["objcopy", "--strip-all", str(GUEST / "seed16.elf"), str(stripped)], check=True)
    proc = vmtrace("show", seed_trace, "-n", "1", "--symbols", stripped)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert " rip=0x10004 guest=" in proc.stdout


@needs_binutils
def test_a_flat_guest_with_an_nm_map_as_symbols(seed_trace, tmp_path):
    nm = subprocess.run(["nm", str(GUEST / "seed16.elf")], capture_output=True, text=True, check=True).stdout
    (tmp_path / "seed16.map").write_text(nm)
    proc = vmtrace("show", seed_trace, "-n", "1", "--symbols", tmp_path / "seed16.map")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert " rip=0x10004 <loop1+0x2> guest=" in proc.stdout  # a map has no lines


def test_an_image_changed_after_recording_gives_addresses_and_one_warning(vmsup, tmp_path):
    for name in ("seed16.bin", "seed16.elf"):
        shutil.copy(GUEST / name, tmp_path / name)
    trace = record(vmsup, tmp_path, str(tmp_path / "seed16.bin"), "--mode", "real", "--max-exits", "20")
    proc = vmtrace("show", trace, "-n", "1")
    assert " rip=0x10004 <loop1+0x2> (seed16.S:15)" in proc.stdout and proc.stderr == ""
    (tmp_path / "seed16.bin").write_bytes((GUEST / "seed16.bin").read_bytes() + b"\x90")
    proc = vmtrace("show", trace, "-n", "1")
    assert proc.returncode == 0
    assert proc.stderr.count("\n") == 1 and "sha256" in proc.stderr and "warning" in proc.stderr
    assert " rip=0x10004 guest=" in proc.stdout


def test_summary_by_symbol_line_and_rip_on_mbkernel(vmsup, tmp_path):
    trace = record(vmsup, tmp_path, "mbkernel", "--cmdline", "maxticks=5", "--timeout", "60")
    by = {}
    for grouping in ("symbol", "line", "rip"):
        proc = vmtrace("summary", trace, "--by", grouping, "--json")
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        by[grouping] = json.loads(proc.stdout)
    c_source = (GUEST / "mbkernel.c").read_text()
    symbols = {g["symbol"] for g in by["symbol"]["groups"]}
    assert {"print", "kmain"} <= symbols
    assert all(f"{s}(" in c_source or s.startswith("isr") for s in symbols if s), symbols
    lines = [g["line"] for g in by["line"]["groups"] if g["line"]]
    assert lines and all(line.split(":")[0] in ("mbkernel.c", "mbkernel_entry.S") for line in lines)
    assert sum(g["count"] for g in by["rip"]["groups"]) == by["rip"]["events"] == by["symbol"]["events"]
    top = by["rip"]["groups"][0]
    assert top["key"].startswith(f"{top['rip']:#x} <") and "(mbkernel.c:" in top["key"]
    table = vmtrace("summary", trace, "--by", "symbol")
    assert table.returncode == 0 and "Exits by guest symbol" in table.stdout and "print" in table.stdout


def test_a_trace_without_addresses_groups_them_as_unknown():
    proc = vmtrace("summary", REPO / "tests" / "data" / "schema1_main.vmtrace", "--by", "symbol", "--json")
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(proc.stdout)["groups"]
    assert {g["key"] for g in groups} == {"(address unknown)"} and {g["symbol"] for g in groups} == {None}
    show = vmtrace("show", REPO / "tests" / "data" / "schema1_main.vmtrace", "-n", "1")
    assert show.returncode == 0 and " rip=" not in show.stdout
