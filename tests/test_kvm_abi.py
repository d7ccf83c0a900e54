"""The C compiler is the oracle for vmworker.kvm_abi.

A small C program, generated from the ctypes definitions themselves, includes <linux/kvm.h> and
prints the header's sizeof / offsetof / member sizes and ioctl numbers. Every struct in
ABI_STRUCTS, every field in its `_fields_` (recursively, through nested structs and the anonymous
exit union of kvm_run) and every macro in IOCTLS is compared, so a struct or field added later is
checked without touching this file. No /dev/kvm is needed.
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vmworker import kvm_abi

pytestmark = [
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler `cc` on PATH: cannot build the linux/kvm.h oracle"),
    pytest.mark.skipif(platform.machine() != "x86_64",
                       reason=f"kvm_abi mirrors the x86-64 ABI; this machine is {platform.machine()}"),
]

# Members of kvm_run that vmworker reads; the generator must reach each of them.
KVM_RUN_MEMBERS_READ = [
    "exit_reason", "immediate_exit", "kvm_valid_regs", "s", "s.regs.regs.rip", "s.regs.sregs.cs.base",
    "io.direction", "io.size", "io.port", "io.count", "io.data_offset",
    "mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write",
    "fail_entry.hardware_entry_failure_reason", "fail_entry.cpu",
    "internal.suberror", "internal.ndata", "internal.data",
    "system_event.type", "system_event.ndata", "system_event.data",
    "hw.hardware_exit_reason", "ex.exception", "ex.error_code", "debug.arch",
]


def _is_aggregate(ctype: type) -> bool:
    return isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union))


def field_paths(struct: type, prefix: str = "") -> Iterator[str]:
    """Dotted C member designators of every field of `struct`, nested ones included.

    A member listed in `_anonymous_` has no name in C (kvm_run's exit union), so its members are
    yielded at the level of the enclosing struct.
    """
    anonymous = set(getattr(struct, "_anonymous_", ()))
    for name, ctype, *_ in struct._fields_:
        if name in anonymous:
            yield from field_paths(ctype, prefix)
            continue
        path = prefix + name
        yield path
        if _is_aggregate(ctype):
            yield from field_paths(ctype, path + ".")


def ctypes_field(struct: type, path: str) -> tuple[int, int]:
    """(offset, size) of a dotted field path in a ctypes type, resolving anonymous members."""
    offset = 0
    for name in path.split("."):
        types = dict((n, t) for n, t, *_ in struct._fields_)
        if name not in types:  # reached through an anonymous member
            anon = next(a for a in getattr(struct, "_anonymous_", ())
                        if name in {n for n, *_ in types[a]._fields_})
            offset += getattr(struct, anon).offset
            struct = types[anon]
            types = dict((n, t) for n, t, *_ in struct._fields_)
        field = getattr(struct, name)
        offset += field.offset
        size = field.size
        struct = types[name]
    return offset, size


@dataclass(repr=False)
class HeaderLayout:
    sizes: dict[str, int]
    offsets: dict[tuple[str, str], int]
    member_sizes: dict[tuple[str, str], int]
    ioctls: dict[str, int]

    def __repr__(self) -> str:  # keeps failure tracebacks readable
        return (f"<HeaderLayout {len(self.sizes)} structs, {len(self.offsets)} fields, "
                f"{len(self.ioctls)} ioctls>")


def _c_program() -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/kvm.h>",
        "",
        "int main(void)",
        "{",
    ]
    for sname, struct in kvm_abi.ABI_STRUCTS.items():
        lines.append(f'\tprintf("size {sname} %zu\\n", sizeof(struct {sname}));')
        for path in field_paths(struct):
            lines.append(f'\tprintf("offset {sname} {path} %zu\\n", offsetof(struct {sname}, {path}));')
            lines.append(f'\tprintf("msize {sname} {path} %zu\\n", sizeof(((struct {sname} *)0)->{path}));')
    # kvm_cpuid2's flexible array is not in its _fields_; cpuid2_with_entries() mirrors it.
    lines.append('\tprintf("offset kvm_cpuid2 entries %zu\\n", offsetof(struct kvm_cpuid2, entries));')
    for macro in kvm_abi.IOCTLS:
        lines.append(f'\tprintf("ioctl {macro} %lu\\n", (unsigned long)({macro}));')
    lines += ["\treturn 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> HeaderLayout:
    work = tmp_path_factory.mktemp("kvm_abi_oracle")
    probe = work / "probe.c"
    probe.write_text("#include <linux/kvm.h>\nint main(void) { return 0; }\n")
    res = subprocess.run(["cc", "-o", str(work / "probe"), str(probe)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cc cannot compile a program including <linux/kvm.h> (linux-libc-dev missing?): "
                    f"{res.stderr.strip()[:300]}")

    src = work / "kvm_abi_oracle.c"
    src.write_text(_c_program())
    exe = work / "kvm_abi_oracle"
    res = subprocess.run(["cc", "-std=gnu11", "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"the generated oracle did not compile: a struct, field or macro of kvm_abi is not in "
                    f"<linux/kvm.h> under that name:\n{res.stderr}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout

    layout = HeaderLayout({}, {}, {}, {})
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            layout.sizes[rest[0]] = int(rest[1])
        elif kind == "offset":
            layout.offsets[(rest[0], rest[1])] = int(rest[2])
        elif kind == "msize":
            layout.member_sizes[(rest[0], rest[1])] = int(rest[2])
        elif kind == "ioctl":
            layout.ioctls[rest[0]] = int(rest[1])
        else:
            raise AssertionError(f"unexpected oracle output line: {line!r}")
    return layout


def _report(mismatches: list[str]) -> str:
    return f"{len(mismatches)} mismatch(es) with <linux/kvm.h>:\n  " + "\n  ".join(mismatches)


def test_struct_sizes_match_linux_header(header: HeaderLayout) -> None:
    mismatches = [f"sizeof(struct {name}): header {header.sizes[name]}, ctypes {ctypes.sizeof(struct)}"
                  for name, struct in kvm_abi.ABI_STRUCTS.items()
                  if header.sizes[name] != ctypes.sizeof(struct)]
    assert not mismatches, _report(mismatches)


def test_field_offsets_match_linux_header(header: HeaderLayout) -> None:
    mismatches = []
    for name, struct in kvm_abi.ABI_STRUCTS.items():
        for path in field_paths(struct):
            ours = ctypes_field(struct, path)[0]
            if header.offsets[(name, path)] != ours:
                mismatches.append(f"offsetof(struct {name}, {path}): header {header.offsets[(name, path)]}, "
                                  f"ctypes {ours}")
    assert not mismatches, _report(mismatches)


def test_field_sizes_match_linux_header(header: HeaderLayout) -> None:
    mismatches = []
    for name, struct in kvm_abi.ABI_STRUCTS.items():
        for path in field_paths(struct):
            ours = ctypes_field(struct, path)[1]
            if header.member_sizes[(name, path)] != ours:
                mismatches.append(f"sizeof(struct {name}.{path}): header {header.member_sizes[(name, path)]}, "
                                  f"ctypes {ours}")
    assert not mismatches, _report(mismatches)


def test_run_offset_matches_linux_header_for_every_kvm_run_member(header: HeaderLayout) -> None:
    """run_offset() is what the vCPU loop uses to build its unpackers; check it, not just ctypes."""
    mismatches = [f"run_offset({', '.join(map(repr, path.split('.')))}): header {header.offsets[('kvm_run', path)]}, "
                  f"ours {kvm_abi.run_offset(*path.split('.'))}"
                  for path in field_paths(kvm_abi.kvm_run)
                  if header.offsets[("kvm_run", path)] != kvm_abi.run_offset(*path.split("."))]
    assert not mismatches, _report(mismatches)


def test_oracle_checks_every_kvm_run_member_vmsup_reads() -> None:
    checked = set(field_paths(kvm_abi.kvm_run))
    missing = [m for m in KVM_RUN_MEMBERS_READ if m not in checked]
    assert not missing, f"kvm_run members read by vmworker but absent from kvm_abi.kvm_run: {missing}"


def test_cpuid2_entries_follow_the_header_flexible_array(header: HeaderLayout) -> None:
    sized = kvm_abi.cpuid2_with_entries(3)
    assert sized.entries.offset == header.offsets[("kvm_cpuid2", "entries")]
    assert ctypes.sizeof(sized) == header.sizes["kvm_cpuid2"] + 3 * header.sizes["kvm_cpuid_entry2"]


def test_ioctl_numbers_match_linux_header(header: HeaderLayout) -> None:
    mismatches = [f"{macro}: header {header.ioctls[macro]:#x}, kvm_abi {value:#x}"
                  for macro, value in kvm_abi.IOCTLS.items() if header.ioctls[macro] != value]
    assert not mismatches, _report(mismatches)


def test_coalesced_ring_slots_and_caps_match_linux_header(tmp_path) -> None:
    """KVM_COALESCED_MMIO_MAX (defined with the kernel's PAGE_SIZE, which user space supplies)
    and the capability numbers vmworker/coalesce.py asks for."""
    from vmworker.coalesce import ring_slots
    src = tmp_path / "ring.c"
    src.write_text("#include <stdio.h>\n#define PAGE_SIZE 4096\n#include <linux/kvm.h>\n"
                   "int main(void) { printf(\"%d %d %d\\n\", (int)KVM_COALESCED_MMIO_MAX, "
                   "KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO); return 0; }\n")
    exe = tmp_path / "ring"
    res = subprocess.run(["cc", "-o", str(exe), str(src)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cc cannot compile a program including <linux/kvm.h>: {res.stderr.strip()[:200]}")
    slots, cap_mmio, cap_pio = map(int, subprocess.run([str(exe)], capture_output=True, text=True,
                                                       check=True).stdout.split())
    assert (ring_slots(4096), kvm_abi.KVM_CAP_COALESCED_MMIO, kvm_abi.KVM_CAP_COALESCED_PIO) == (slots, cap_mmio, cap_pio)
    assert slots == 170
