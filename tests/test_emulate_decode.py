"""The fallback's decoder and its refusals, on a real vCPU's registers (no KVM_RUN needed).

Each case sets registers on a real vCPU built by vmworker.x86, decodes hand-assembled bytes (their
Intel-syntax source in the comment) and checks the memory operand's linear address, or hands an
instruction to InsnFallback and checks what it did or why it refused.
"""

from __future__ import annotations

import struct

import pytest

from test_kvm_core import LOAD, one_vcpu_vm
from vmworker.emulate import InsnFallback
from vmworker.emulate.cpu import GuestCpu
from vmworker.emulate.decode import decode

pytestmark = pytest.mark.kvm


def _ea(mode: str, code: bytes, **regs) -> tuple[int | None, int]:
    with one_vcpu_vm(b"\xf4", mode) as (vcpu, memory):
        r = vcpu.get_regs()
        for name, value in regs.items():
            setattr(r, name, value)
        vcpu.set_regs(r)
        cpu = GuestCpu(vcpu, memory)
        insn = decode(cpu, code, cpu.rip_linear)
        return insn.ea, insn.length


def test_sib_with_scaled_index_and_disp8_in_32_bit_code():
    # fld qword [ebx+esi*4+0x10]
    assert _ea("protected", bytes.fromhex("dd44b310"), rbx=0x1000, rsi=0x20) == (0x1000 + 0x80 + 0x10, 4)


def test_disp32_without_base_and_esp_based_operands_in_32_bit_code():
    assert _ea("protected", bytes.fromhex("dd0500200000")) == (0x2000, 6)  # fld qword [0x2000]
    assert _ea("protected", bytes.fromhex("d97c240e"), rsp=0x8000) == (0x800E, 4)  # fnstcw [esp+0xe]


def test_16_bit_addressing_in_real_mode_adds_the_segment_base():
    # fld qword [bx+si+8] with DS = 0x1000 (base 0x10000, vmworker.x86's real-mode entry)
    assert _ea("real", bytes.fromhex("dd4008"), rbx=0x100, rsi=0x20) == (0x10000 + 0x128, 3)
    # fld qword [bp+2]: BP-based operands use SS (also base 0x10000 here)
    assert _ea("real", bytes.fromhex("dd4602"), rbp=0xFFF0) == (0x10000 + 0xFFF2, 3)


def test_address_size_prefix_selects_16_bit_addressing_in_32_bit_code():
    # fld qword [bx+di] with a 0x67 prefix: only the low 16 bits of EBX and EDI count
    assert _ea("protected", bytes.fromhex("67dd01"), rbx=0x12340010, rdi=0x5) == (0x15, 3)


def test_rip_relative_rex_and_segment_override_in_64_bit_code():
    # fld qword [rip+0x10]: relative to the next instruction
    assert _ea("long", bytes.fromhex("dd0510000000")) == (LOAD + 6 + 0x10, 6)
    # fld qword [r8+r9*8]
    assert _ea("long", bytes.fromhex("43dd04c8"), r8=0x1_0000_0000, r9=2) == (0x1_0000_0010, 4)
    # fld qword [0x2000] through SIB (no base, no index): absolute, not RIP-relative
    assert _ea("long", bytes.fromhex("dd042500200000")) == (0x2000, 7)


def _xsave_with(vcpu, fcw: int, fsw: int) -> None:
    image = bytearray(bytes(vcpu.get_xsave()))
    struct.pack_into("<HH", image, 0, fcw, fsw)
    image[512] |= 1  # XSTATE_BV: the x87 component is in use
    vcpu.set_xsave(type(vcpu.get_xsave()).from_buffer_copy(image))


def test_fwait_is_a_no_op_without_a_pending_unmasked_exception():
    with one_vcpu_vm(bytes.fromhex("9bf4"), "protected") as (vcpu, memory):  # fwait; hlt
        _xsave_with(vcpu, fcw=0x037F, fsw=0x0001)  # IE set but masked
        fallback = InsnFallback(memory)
        assert fallback.handle(vcpu, ())
        assert vcpu.get_regs().rip == LOAD + 1
        assert fallback.counts["fwait"] == 1


def test_fwait_with_a_pending_unmasked_exception_is_refused_as_a_missing_mf():
    with one_vcpu_vm(bytes.fromhex("9bf4"), "protected") as (vcpu, memory):
        _xsave_with(vcpu, fcw=0x037E, fsw=0x0081)  # IE unmasked and pending (ES set)
        fallback = InsnFallback(memory)
        assert not fallback.handle(vcpu, ())
        assert "#MF is not emulated" in fallback.last_refusal
        assert "bytes 9b (fwait) at 0x10000" in fallback.last_refusal
        assert vcpu.get_regs().rip == LOAD


def test_an_x87_run_stops_before_the_first_other_instruction():
    # fld1; fld1; faddp; fistp dword [0x3000]; hlt
    code = bytes.fromhex("d9e8d9e8dec1db1d00300000f4")
    with one_vcpu_vm(code, "protected") as (vcpu, memory):
        fallback = InsnFallback(memory)
        assert fallback.handle(vcpu, ())
        assert [p.raw.hex() for p in fallback.performed] == ["d9e8", "d9e8", "dec1", "db1d00300000"]
        assert vcpu.get_regs().rip == LOAD + 12
        assert memory.read(0x3000, 4) == (2).to_bytes(4, "little")


def test_int_n_through_an_empty_idt_is_refused_with_the_reason():
    # int 0x21 with the VMM's boot IDT (limit 0): a real CPU would raise #GP, which is not emulated
    with one_vcpu_vm(bytes.fromhex("cd21f4"), "protected") as (vcpu, memory):
        fallback = InsnFallback(memory)
        assert not fallback.handle(vcpu, ())
        assert fallback.last_refusal == ("vector 0x21 is beyond the IDT limit 0x0 (a #GP): "
                                         "bytes cd 21 (int 21h) at 0x10000")
        assert vcpu.get_regs().rip == LOAD


def test_fcmov_copies_only_when_its_condition_holds():
    # fld1; fldz; stc; fcmovb st, st(1); fistp dword [0x3000]; fldz; clc; fcmovb st, st(1);
    # fistp dword [0x3004]; hlt  -- the runs stop at STC/CLC, which KVM executes
    code = bytes.fromhex("d9e8d9ee" "f9" "dac1db1d00300000" "d9ee" "f8" "dac1db1d04300000" "f4")
    with one_vcpu_vm(code, "protected") as (vcpu, memory):
        fallback = InsnFallback(memory)
        assert fallback.handle(vcpu, ())  # fld1; fldz
        regs = vcpu.get_regs()
        for step in (1, 1):  # stc (or clc), done here as KVM would, then the next x87 run
            regs.rflags = (regs.rflags & ~1) | (1 if regs.rip == LOAD + 4 else 0)
            regs.rip += step
            vcpu.set_regs(regs)
            assert fallback.handle(vcpu, ())
            regs = vcpu.get_regs()
        assert memory.read(0x3000, 8) == struct.pack("<ii", 1, 0)  # taken with CF=1, not with CF=0
