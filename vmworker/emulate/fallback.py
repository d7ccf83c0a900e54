"""The dispatcher: which family performs the instruction KVM's emulator gave up on.

Used only on KVM_EXIT_INTERNAL_ERROR with suberror KVM_INTERNAL_ERROR_EMULATION, never on the
vCPU loop's hot path. The instruction is fetched at CS base + RIP (through the guest's page tables
when paging is on; KVM's own copy of the bytes when the exit carries one), decoded, and handed to
the family that owns its opcode. x87 instructions and FWAIT tend to come in runs, each of which
would cost an exit of its own: after one of them the following ones are performed in the same
exit, up to MAX_RUN, stopping at the first instruction that is not x87 or that is refused (KVM
then meets it again, and a refusal of the first instruction of an exit ends the VM).
Software interrupts from ring 3 arrive as a shutdown exit instead (see `handle_shutdown`).
"""

from __future__ import annotations

import struct
import threading
from typing import NamedTuple

from .. import kvm_abi as abi
from ..errors import KvmError
from .cpu import GuestCpu, Unsupported
from .decode import MAX_INSN, decode
from .disasm import disassemble
from .fpu import Fpu
from .interrupts import InterruptReturn, SoftwareInterrupt
from .x87 import X87, Fwait

MAX_RUN = 64


class Performed(NamedTuple):
    """One instruction the VMM performed for the guest (a row of the trace's `emulated` records)."""

    address: int  # linear
    raw: bytes
    family: str


class InsnFallback:
    """Performs the instruction a vCPU's emulation failure stopped at, if a family knows it.

    `counts` says how many instructions each family performed; `performed` lists those of the
    last exit the calling vCPU thread handled; `last_refusal` explains the last refusal (bytes and
    disassembly included).
    """

    def __init__(self, memory) -> None:
        self.memory = memory
        self._fpu_families = (Fwait(), X87())
        families = (SoftwareInterrupt(), InterruptReturn(), *self._fpu_families)
        self._by_opcode = {op: fam for fam in families for op in fam.opcodes}
        self.counts = {fam.name: 0 for fam in families}
        self._per_thread = threading.local()  # one fallback serves every vCPU thread of the VM
        self.last_refusal = ""

    @property
    def performed(self) -> list[Performed]:
        return getattr(self._per_thread, "performed", [])

    @performed.setter
    def performed(self, value: list[Performed]) -> None:
        self._per_thread.performed = value

    def take_performed(self) -> list[Performed]:
        """The instructions of the last handled exit, once (the vCPU loop records them)."""
        performed, self.performed = self.performed, []
        return performed

    @property
    def irets(self) -> int:
        return self.counts["iret"]

    def handle(self, vcpu, data: tuple[int, ...]) -> bool:
        """True if at least one instruction was performed and the vCPU may run on."""
        try:
            return self._handle(vcpu, data)
        except KvmError as e:  # a register or FPU ioctl failed: the VM ends with the emulation failure
            self.last_refusal = str(e)
            return False

    def _handle(self, vcpu, data: tuple[int, ...]) -> bool:
        cpu = GuestCpu(vcpu, self.memory)
        fpu = None
        self.performed = []
        while len(self.performed) < MAX_RUN:
            first = not self.performed
            address = cpu.rip_linear
            code = b""
            try:
                code = _fetch_or_reported(cpu, address, data if first else ())
                insn = decode(cpu, code, address)
                family = self._by_opcode.get(insn.opcode)
                if family is None:
                    raise Unsupported("not an instruction vmsup emulates")
                if family in self._fpu_families:
                    fpu = fpu or Fpu(vcpu)
                    family.run(cpu, insn, fpu)
                elif first:
                    family.run(cpu, insn)
                else:
                    break  # INT/IRET start an exit of their own
            except Unsupported as e:
                if first:
                    self.last_refusal = _describe(cpu, address, code, str(e))
                    return False
                break
            self.performed.append(Performed(address, insn.raw, family.name))
            self.counts[family.name] += 1
            if family not in self._fpu_families:
                break
        if fpu is not None:
            fpu.save()
        cpu.commit()
        return True

    def handle_shutdown(self, vcpu) -> bool:
        """A shutdown exit at a ring-3 INT n/INT3/INTO: perform the interrupt; True if done.

        Measured on this PVM host: ring-3 guest code runs natively, and a software interrupt there
        ends KVM_RUN with KVM_EXIT_SHUTDOWN ("triple fault"), RIP still at the instruction and the
        registers intact, whatever the guest's IDT says; KVM_RUN resumes after the VMM performs it.
        Only that case is taken: a real triple fault (anything else, or an INT the guest's IDT
        cannot deliver) stays a shutdown.
        """
        try:
            return self._handle_shutdown(vcpu)
        except KvmError as e:
            self.last_refusal = str(e)
            return False

    def _handle_shutdown(self, vcpu) -> bool:
        cpu = GuestCpu(vcpu, self.memory)
        if not cpu.protected or cpu.cpl != 3:
            return False
        address = cpu.rip_linear
        try:
            insn = decode(cpu, _fetch(cpu, address), address)
            family = self._by_opcode.get(insn.opcode)
            if not isinstance(family, SoftwareInterrupt):
                return False
            family.run(cpu, insn)
        except Unsupported as e:
            self.last_refusal = str(e)
            return False
        self.performed = [Performed(address, insn.raw, family.name)]
        self.counts[family.name] += 1
        cpu.commit()
        return True


def _bytes_from_exit(data: tuple[int, ...]) -> bytes:
    """The instruction bytes KVM reports with an emulation failure, if it does (kvm.h:
    internal.data[0] flags, then insn_size (1 byte) and insn_bytes[15] in data[1..2])."""
    if data and data[0] & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES and len(data) >= 3:
        raw = struct.pack("<QQ", data[1], data[2])
        return raw[1:1 + min(raw[0], MAX_INSN)]
    return b""


def _fetch_or_reported(cpu: GuestCpu, address: int, data: tuple[int, ...]) -> bytes:
    """The bytes at `address`, or KVM's copy when the guest's own mapping cannot be read."""
    try:
        return _fetch(cpu, address)
    except Unsupported:
        reported = _bytes_from_exit(data)
        if reported:
            return reported
        raise


def _fetch(cpu: GuestCpu, address: int) -> bytes:
    """Up to 15 bytes at `address`; only those of the first page if the next one is not readable."""
    in_page = min(MAX_INSN, 0x1000 - (address & 0xFFF))
    code = cpu.read(address, in_page, what="instruction")
    if in_page < MAX_INSN:
        try:
            code += cpu.read(address + in_page, MAX_INSN - in_page, what="instruction")
        except Unsupported:
            pass  # a short instruction at a page's end needs no more; decode says if it does
    return code


def _describe(cpu: GuestCpu, address: int, code: bytes, reason: str) -> str:
    if not code:
        return reason
    try:
        length = decode(cpu, code, address).length
    except Unsupported:
        length = min(len(code), 8)
    bitness = 64 if cpu.code64 else (32 if cpu.code_size == 4 else 16)
    shown = code[:length]
    return f"{reason}: bytes {shown.hex(' ')} ({disassemble(code, bitness, cpu.regs.rip)}) at {address:#x}"
