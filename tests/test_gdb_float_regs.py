"""gdb reads the guest's x87 and SSE registers as the guest left them (KVM_GET_XSAVE), and what gdb
writes there reaches the vCPU (KVM_SET_XSAVE): Debian's real gdb against the stub, on x87calc (its
x87 instructions performed by vmsup's fallback) and on a tiny long-mode guest, assembled here, that
loads two XMM registers."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO
from test_gdb_stub import printed, stubbed  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("gdb") is None, reason="no gdb on PATH (apt-get install gdb)")]

# In x87calc's run_cw: `fldcw; fldpi; fstpt` … `call line_start; fldt; fld %st(0); fstpt`, each run
# of x87 instructions performed in one exit; the next instruction that is not x87 follows the second.
_AFTER_PI = re.compile(r"^\s*([0-9a-f]+):\s+db 6c 24 08\s+fldt", re.M)


def _after_second_x87_run() -> int:
    listing = subprocess.run(["objdump", "-d", str(REPO / "guest" / "x87calc.elf")], capture_output=True,
                             text=True, check=True).stdout
    fldt = int(_AFTER_PI.search(listing[listing.index("fldpi"):]).group(1), 16)
    return fldt + 4 + 2 + 7  # fldt 0x8(%esp), fld %st(0), fstpt 0x120(%esp)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump (binutils)")
def test_gdb_shows_the_x87_stack_and_control_words_the_guest_set_and_writes_them(kvm_required, stubbed):
    vm = stubbed("x87calc.elf", "")
    at = _after_second_x87_run()
    out = vm.gdb(f"hbreak *{at:#x}", "continue", "p $pc", "p $st0", "p/x $fstat", "p/x $ftag", "p/x $fctrl",
                 "info registers float", "set $fctrl = 0x27f", "set $st0 = 2.5", "stepi", "p/x $fctrl", "p $st0",
                 "kill")
    values = printed(out, [])
    assert values[0].startswith(f"(void (*)()) {at:#x}"), out
    assert values[1] == "3.14159265358979323851", out  # fldpi, all 64 bits of its significand
    # TOP = 7: fldt pushed pi into physical register 7, fld pushed a copy, fstpt popped it;
    # so the full tag word has register 7 valid (00) and the others empty (11).
    assert int(values[2], 16) >> 11 & 7 == 7 and values[3] == "0x3fff", out
    assert values[4] == "0x37f", out  # the guest's FLDCW of its first control word (x87calc.c CWS[0])
    assert re.search(r"^st0\s+3\.1415926535897932385", out, re.M), out
    assert re.search(r"^ftag\s+0x3fff", out, re.M), out
    assert values[5:] == ["0x27f", "2.5"], out  # gdb's writes, read back from KVM after a step


_SSE_GUEST = """
        .code64
        .globl _start
_start:
        movq    %cr4, %rax
        orq     $(1 << 9), %rax         # CR4.OSFXSR: SSE instructions allowed (SDM Vol. 3A §2.5)
        movq    %rax, %cr4
        movaps  first(%rip), %xmm0
        movaps  second(%rip), %xmm7
        .globl loaded
loaded:
        nop
        nop
        movaps  %xmm1, %xmm2            # what gdb wrote into xmm1 (a copy of xmm7), as the guest sees it
        .globl copied
copied:
        xorl    %eax, %eax
        outb    %al, $0xF4              # guest exit code 0
1:      hlt
        jmp     1b
        .balign 16
first:  .quad 0x1122334455667788, 0x99aabbccddeeff00
second: .quad 0x0123456789abcdef, 0xfedcba9876543210
"""


def _sse_guest(tmp_path) -> tuple[str, int, int]:
    """(flat binary, address of `loaded`, address of `copied`), linked at 0x10000."""
    src, obj, binary = tmp_path / "sse.S", tmp_path / "sse.o", tmp_path / "sse.bin"
    src.write_text(_SSE_GUEST)
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-Ttext=0x10000", "--oformat=binary", "-o", str(binary), str(obj)], check=True)
    symbols = dict(line.split()[::-2] for line in subprocess.run(["nm", str(obj)], capture_output=True, text=True,
                                                                  check=True).stdout.splitlines())
    return str(binary), 0x10000 + int(symbols["loaded"], 16), 0x10000 + int(symbols["copied"], 16)


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("as", "ld", "nm")), reason="no binutils")
def test_gdb_reads_the_xmm_registers_the_guest_loaded_and_writes_reach_the_guest(kvm_required, stubbed, tmp_path):
    binary, loaded, copied = _sse_guest(tmp_path)
    vm = stubbed(binary, "long")
    out = vm.gdb(f"hbreak *{loaded:#x}", "continue", "p/x $xmm0", "p/x $xmm7", "p/x $xmm3",
                 "set $xmm1 = $xmm7", "set $mxcsr = 0x7f80",
                 "stepi", "p/x $xmm1", "p/x $mxcsr",
                 f"hbreak *{copied:#x}", "continue", "p/x $xmm2", "info registers mxcsr", "kill")
    values = printed(out, [])
    assert values[:3] == ["0x99aabbccddeeff001122334455667788", "0xfedcba98765432100123456789abcdef", "0x0"], out
    # after a step (the cache gone, read again from KVM) and after the guest copied xmm1 itself
    assert values[3:] == ["0xfedcba98765432100123456789abcdef", "0x7f80", "0xfedcba98765432100123456789abcdef"], out
    assert re.search(r"^mxcsr\s+0x7f80", out, re.M), out
