"""The step stream's schema: one row per guest instruction of a step trace (`--step-trace`).

A step row says where the instruction was and what it did, and is stored apart from the exit
stream (its own message, schema.MSG_STEPS, and its own block type in the trace):

  t        CLOCK_MONOTONIC ns when the single step's KVM_EXIT_DEBUG returned (comparable with
           the exits' t_exit)
  addr     the instruction's linear address (CS base + IP outside 64-bit code)
  bits     the CPU mode it ran in: 16, 32 or 64 (CR0.PE, CS.L, CS.D/B)
  insn     MAX_INSN_BYTES bytes read from guest memory at addr before it ran; the instruction is
           the first of them (its length is what a decoder finds). Bytes past the end of guest
           RAM or on an unmapped page read as 0.
  changed  a bitmask over REGISTERS: which ones differ after the instruction
  values   the new values of the changed registers, in REGISTERS order (u64 each), all rows'
           concatenated

The first batch of a stream (first_seq 0) carries `initial`: every register's value before the
first instruction, so each row's registers can be rebuilt exactly. Stepping a vCPU gives one
KVM_EXIT_DEBUG per instruction (KVM_GUESTDBG_SINGLESTEP); those debug exits are the steps and are
not exit events; the exits an instruction makes (port I/O, MMIO) are recorded as usual.
"""

from __future__ import annotations

from typing import NamedTuple

# The registers a step row tracks, in bit order of `changed`: kvm_regs' general registers, RIP
# and RFLAGS, the segment selectors, and the control registers that change the CPU's mode.
REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
             "cs", "ds", "es", "fs", "gs", "ss", "cr0", "cr3", "cr4", "efer")
MAX_INSN_BYTES = 15  # the longest x86 instruction (SDM Vol. 2A §2.3.11)
MAX_STEP_BATCH = 2048  # rows per message: 2048 × (8+8+1+15+4 + 28×8) bytes stays under a record's 1 MiB
MODES = (16, 32, 64)


class StepColumn(NamedTuple):
    name: str
    dtype: str  # numpy dtype, little-endian; insn is MAX_INSN_BYTES per row
    per_row: int  # bytes per row (values: variable, 0 here)
    meaning: str


STEP_COLUMNS = (
    StepColumn("t", "<u8", 8, "CLOCK_MONOTONIC ns of the step's debug exit"),
    StepColumn("addr", "<u8", 8, "linear address of the instruction"),
    StepColumn("bits", "u1", 1, "CPU mode the instruction ran in (16, 32, 64)"),
    StepColumn("insn", "u1", MAX_INSN_BYTES, "guest bytes at addr before it ran"),
    StepColumn("changed", "<u4", 4, "bitmask over REGISTERS: changed by the instruction"),
    StepColumn("values", "<u8", 0, "new values of the changed registers, concatenated"),
)
STEP_COLUMN_NAMES = tuple(c.name for c in STEP_COLUMNS)


class StepSchemaError(ValueError):
    """Step columns that do not follow this schema."""


def decode_step_columns(cols: dict, count: int) -> dict:
    """Validate step columns (bytes) and view them as numpy arrays; StepSchemaError otherwise.
    insn becomes a (count, MAX_INSN_BYTES) array."""
    import numpy as np
    if not isinstance(cols, dict):
        raise StepSchemaError("step columns are not a map")
    if not 0 <= count <= MAX_STEP_BATCH:
        raise StepSchemaError(f"step batch of {count} rows is out of range")
    out = {}
    for col in STEP_COLUMNS:
        raw = cols.get(col.name)
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise StepSchemaError(f"step column {col.name!r} missing or not bytes")
        if col.per_row and len(raw) != count * col.per_row:
            raise StepSchemaError(f"step column {col.name!r} has {len(raw)} bytes, expected {count * col.per_row}")
        out[col.name] = np.frombuffer(raw, dtype=col.dtype)
    out["insn"] = out["insn"].reshape(count, MAX_INSN_BYTES)
    changed = out["changed"]
    if changed.size and int(changed.max()) >> len(REGISTERS):
        raise StepSchemaError("changed names a register beyond REGISTERS")
    need = int(np.unpackbits(changed.view(np.uint8)).sum()) if changed.size else 0
    if len(out["values"]) != need:
        raise StepSchemaError(f"values holds {len(out['values'])} registers, the masks name {need}")
    if count and not np.isin(out["bits"], MODES).all():
        raise StepSchemaError("bits is not 16, 32 or 64")
    return out
