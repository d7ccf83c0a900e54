"""ctypes mirrors of the linux/kvm.h (and asm/kvm.h, x86) ABI that vmworker uses.

Structure and field names are the header's, so a reader can hold this file next to kvm.h.
ioctl numbers are derived from the _IO/_IOR/_IOW/_IOWR macros of asm-generic/ioctl.h with the
structure sizes below, never typed in as hex. tests/test_kvm_abi.py checks every size and offset
against the real header through a small C program.
"""

from __future__ import annotations

import ctypes
from ctypes import Structure, Union, c_char, c_uint8, c_uint16, c_uint32, c_uint64, sizeof

# --- asm-generic/ioctl.h -----------------------------------------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ, type_, nr, sizeof(struct))


def _IOW(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_WRITE, type_, nr, sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, sizeof(struct))


KVMIO = 0xAE
KVM_API_VERSION = 12

# --- asm/kvm.h (x86) ---------------------------------------------------------------------------
KVM_NR_INTERRUPTS = 256


class kvm_regs(Structure):
    _fields_ = [(name, c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(Structure):
    _fields_ = [
        ("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16), ("type", c_uint8),
        ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8), ("s", c_uint8), ("l", c_uint8),
        ("g", c_uint8), ("avl", c_uint8), ("unusable", c_uint8), ("padding", c_uint8),
    ]


class kvm_dtable(Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class kvm_interrupt(Structure):
    """KVM_INTERRUPT's argument: the vector to inject (a userspace irqchip only)."""
    _fields_ = [("irq", c_uint32)]


class kvm_sregs(Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", c_uint64), ("cr2", c_uint64), ("cr3", c_uint64), ("cr4", c_uint64), ("cr8", c_uint64),
        ("efer", c_uint64), ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class _kvm_vcpu_events_exception(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8), ("pending", c_uint8),
                ("error_code", c_uint32)]


class _kvm_vcpu_events_interrupt(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _kvm_vcpu_events_nmi(Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _kvm_vcpu_events_smi(Structure):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8), ("latched_init", c_uint8)]


class _kvm_vcpu_events_triple_fault(Structure):
    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(Structure):
    _fields_ = [
        ("exception", _kvm_vcpu_events_exception), ("interrupt", _kvm_vcpu_events_interrupt),
        ("nmi", _kvm_vcpu_events_nmi), ("sipi_vector", c_uint32), ("flags", c_uint32),
        ("smi", _kvm_vcpu_events_smi), ("triple_fault", _kvm_vcpu_events_triple_fault),
        ("reserved", c_uint8 * 26), ("exception_has_payload", c_uint8), ("exception_payload", c_uint64),
    ]


# kvm_run.s.regs (KVM_CAP_SYNC_REGS): with kvm_run.kvm_valid_regs = KVM_SYNC_X86_REGS |
# KVM_SYNC_X86_SREGS the kernel fills regs and sregs at every exit, at no ioctl's cost.
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2


class kvm_sync_regs(Structure):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_cpuid_entry2(Structure):
    _fields_ = [
        ("function", c_uint32), ("index", c_uint32), ("flags", c_uint32), ("eax", c_uint32),
        ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32), ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(Structure):
    """The header's flexible array `entries[]` follows; see `cpuid2_with_entries`."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


def cpuid2_with_entries(count: int) -> type[Structure]:
    """A kvm_cpuid2 type with room for `count` entries (the header's flexible array)."""

    class kvm_cpuid2_n(Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * count)]

    return kvm_cpuid2_n


class kvm_debug_exit_arch(Structure):
    _fields_ = [("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64), ("dr6", c_uint64), ("dr7", c_uint64)]


class kvm_guest_debug_arch(Structure):
    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_fpu(Structure):
    """x87/SSE state in FXSAVE layout: fpr[i] is ST(i) (stack order), ftwx the abridged tag byte
    (bit n set = physical register n in use), as KVM_GET_FPU/KVM_SET_FPU exchange it."""

    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8), ("fcw", c_uint16), ("fsw", c_uint16), ("ftwx", c_uint8),
        ("pad1", c_uint8), ("last_opcode", c_uint16), ("last_ip", c_uint64), ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16), ("mxcsr", c_uint32), ("pad2", c_uint32),
    ]


class kvm_xsave(Structure):
    """The vCPU's XSAVE image: the legacy FXSAVE region at 0, the XSAVE header (XSTATE_BV first) at
    512 (SDM Vol. 1 §13.4.1-2). 4096 bytes cover this host (KVM_CAP_XSAVE2 reports 4096)."""

    _fields_ = [("region", c_uint32 * 1024)]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000

# --- linux/kvm.h -------------------------------------------------------------------------------


class kvm_userspace_memory_region(Structure):
    _fields_ = [
        ("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64), ("userspace_addr", c_uint64),
    ]


# kvm_userspace_memory_region.flags: guest writes to the slot exit as KVM_EXIT_MMIO (reads do not).
KVM_MEM_READONLY = 1 << 1

class kvm_irq_level(Structure):
    # union { __u32 irq; __s32 status; } — only `irq` is used going in.
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_pit_config(Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_translation(Structure):
    _fields_ = [("linear_address", c_uint64), ("physical_address", c_uint64), ("valid", c_uint8),
                ("writeable", c_uint8), ("usermode", c_uint8), ("pad", c_uint8 * 5)]


class kvm_mp_state(Structure):
    _fields_ = [("mp_state", c_uint32)]


# kvm_mp_state.mp_state values (KVM_GET_MP_STATE / KVM_SET_MP_STATE).
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1  # an AP waiting for INIT (in-kernel LAPIC only)
KVM_MP_STATE_INIT_RECEIVED = 2  # an AP waiting for SIPI
KVM_MP_STATE_HALTED = 3  # executed HLT, waiting for an interrupt (in-kernel LAPIC only)
KVM_MP_STATE_SIPI_RECEIVED = 4


class kvm_lapic_state(Structure):
    """The in-kernel LAPIC's register page (KVM_APIC_REG_SIZE = 0x400 bytes, as the APIC maps it)."""

    _fields_ = [("regs", c_uint8 * 0x400)]


class kvm_irqchip(Structure):
    """One in-kernel interrupt controller's state, chosen by chip_id (KVM_IRQCHIP_*): the union of
    struct kvm_pic_state / kvm_ioapic_state is kept as the header's 512 opaque bytes (`dummy`)."""

    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", c_uint8 * 512)]


# kvm_irqchip.chip_id (asm/kvm.h).
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_pit_channel_state(Structure):
    _fields_ = [
        ("count", c_uint32), ("latched_count", c_uint16), ("count_latched", c_uint8),
        ("status_latched", c_uint8), ("status", c_uint8), ("read_state", c_uint8), ("write_state", c_uint8),
        ("write_latch", c_uint8), ("rw_mode", c_uint8), ("mode", c_uint8), ("bcd", c_uint8), ("gate", c_uint8),
        ("count_load_time", ctypes.c_int64),
    ]


class kvm_pit_state2(Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", c_uint32), ("reserved", c_uint32 * 9)]


class kvm_stats_header(Structure):
    """The head of a KVM_GET_STATS_FD file (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD")."""

    _fields_ = [("flags", c_uint32), ("name_size", c_uint32), ("num_desc", c_uint32), ("id_offset", c_uint32),
                ("desc_offset", c_uint32), ("data_offset", c_uint32)]


class kvm_stats_desc(Structure):
    """One statistic's descriptor; `name_size` bytes of name follow (the header's flexible array)."""

    _fields_ = [("flags", c_uint32), ("exponent", ctypes.c_int16), ("size", c_uint16), ("offset", c_uint32),
                ("bucket_size", c_uint32)]


# kvm_stats_desc.flags (linux/kvm.h): the type in bits 0-3; single values are cumulative counts,
# instant values or peaks; the histogram types hold `size` buckets.
KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT, KVM_STATS_TYPE_PEAK = 0, 1, 2
KVM_STATS_SINGLE_VALUE_TYPES = (KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT, KVM_STATS_TYPE_PEAK)


class kvm_guest_debug(Structure):
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


class kvm_coalesced_mmio_zone(Structure):
    # union { __u32 pad; __u32 pio; } — `pio` is the meaningful name.
    _fields_ = [("addr", c_uint64), ("size", c_uint32), ("pio", c_uint32)]


class kvm_coalesced_mmio(Structure):
    _fields_ = [("phys_addr", c_uint64), ("len", c_uint32), ("pio", c_uint32), ("data", c_uint8 * 8)]


class kvm_coalesced_mmio_ring(Structure):
    # Followed by `struct kvm_coalesced_mmio coalesced_mmio[]` (a flexible array: not mirrored,
    # vmworker/coalesce.py reads entries at sizeof(this) + i * sizeof(kvm_coalesced_mmio)).
    _fields_ = [("first", c_uint32), ("last", c_uint32)]


# struct kvm_run's exit members (the anonymous union in the header).
class _kvm_run_hw(Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class _kvm_run_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _kvm_run_ex(Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class _kvm_run_io(Structure):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16), ("count", c_uint32),
                ("data_offset", c_uint64)]  # data_offset: relative to kvm_run start


class _kvm_run_debug(Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _kvm_run_mmio(Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class _kvm_run_internal(Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3


class _kvm_run_system_event(Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_exit(Union):
    _fields_ = [
        ("hw", _kvm_run_hw), ("fail_entry", _kvm_run_fail_entry), ("ex", _kvm_run_ex),
        ("io", _kvm_run_io), ("debug", _kvm_run_debug), ("mmio", _kvm_run_mmio),
        ("internal", _kvm_run_internal), ("system_event", _kvm_run_system_event),
        ("padding", c_char * 256),  # "Fix the size of the union."
    ]


SYNC_REGS_SIZE_BYTES = 2048


class _kvm_run_sync(Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", c_char * SYNC_REGS_SIZE_BYTES)]


class kvm_run(Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8), ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32), ("ready_for_interrupt_injection", c_uint8), ("if_flag", c_uint8),
        ("flags", c_uint16), ("cr8", c_uint64), ("apic_base", c_uint64),
        ("u", _kvm_run_exit),
        ("kvm_valid_regs", c_uint64), ("kvm_dirty_regs", c_uint64),
        ("s", _kvm_run_sync),
    ]


def run_offset(*path: str) -> int:
    """Byte offset of a (possibly nested) kvm_run field, e.g. run_offset("io", "port")."""
    struct: type = kvm_run
    offset = 0
    for name in path:
        if struct is kvm_run and name in {f for f, _ in _kvm_run_exit._fields_}:
            offset += kvm_run.u.offset
            struct = _kvm_run_exit
        field = getattr(struct, name)
        offset += field.offset
        struct = dict(struct._fields_)[name]
    return offset


# Exit reasons (KVM_EXIT_*).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

EXIT_REASON_NAMES = {value: name[len("KVM_EXIT_"):].lower() for name, value in dict(globals()).items()
                     if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")}

# KVM_EXIT_INTERNAL_ERROR suberrors.
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
# internal.data[0] of an emulation failure: data[1..2] hold insn_size (1 byte) + insn_bytes[15].
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# Capabilities (KVM_CAP_*).
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_PIT2 = 33
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_BINARY_STATS_FD = 203

# ioctls on /dev/kvm.
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# ioctls on a VM fd.
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_REGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x67, kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x68, kvm_coalesced_mmio_zone)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
# The header really declares GET as _IOWR and SET as _IOR (chip_id goes in both ways).
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, kvm_pit_state2)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)
# ioctls on a vCPU fd.
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, kvm_interrupt)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, kvm_translation)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, kvm_guest_debug)

# Every structure the oracle test compares with the C header (name → ctypes type).
ABI_STRUCTS: dict[str, type] = {
    "kvm_regs": kvm_regs, "kvm_segment": kvm_segment, "kvm_dtable": kvm_dtable,
    "kvm_sregs": kvm_sregs, "kvm_cpuid_entry2": kvm_cpuid_entry2, "kvm_cpuid2": kvm_cpuid2,
    "kvm_debug_exit_arch": kvm_debug_exit_arch, "kvm_guest_debug_arch": kvm_guest_debug_arch,
    "kvm_userspace_memory_region": kvm_userspace_memory_region, "kvm_irq_level": kvm_irq_level,
    "kvm_pit_config": kvm_pit_config, "kvm_guest_debug": kvm_guest_debug,
    "kvm_coalesced_mmio_zone": kvm_coalesced_mmio_zone, "kvm_coalesced_mmio": kvm_coalesced_mmio,
    "kvm_coalesced_mmio_ring": kvm_coalesced_mmio_ring,
    "kvm_run": kvm_run, "kvm_mp_state": kvm_mp_state, "kvm_translation": kvm_translation, "kvm_stats_header": kvm_stats_header,
    "kvm_stats_desc": kvm_stats_desc, "kvm_vcpu_events": kvm_vcpu_events, "kvm_sync_regs": kvm_sync_regs,
}
ABI_STRUCTS.update(kvm_fpu=kvm_fpu, kvm_xsave=kvm_xsave)  # x87 state for vmworker/emulate/
# Interrupt controller and timer state for snapshots (vmworker/snapshot.py).
ABI_STRUCTS.update(kvm_lapic_state=kvm_lapic_state, kvm_irqchip=kvm_irqchip,
                   kvm_pit_channel_state=kvm_pit_channel_state, kvm_pit_state2=kvm_pit_state2)

# Every ioctl number, by header name, for the oracle test.
IOCTLS: dict[str, int] = {name: globals()[name] for name in (
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_REGISTER_COALESCED_MMIO",
    "KVM_UNREGISTER_COALESCED_MMIO", "KVM_CREATE_PIT2", "KVM_GET_STATS_FD", "KVM_RUN", "KVM_GET_REGS",
    "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_SET_CPUID2", "KVM_SET_GUEST_DEBUG",
    "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_TRANSLATE")}
IOCTLS.update(KVM_GET_FPU=KVM_GET_FPU, KVM_SET_FPU=KVM_SET_FPU, KVM_GET_XSAVE=KVM_GET_XSAVE,
              KVM_SET_XSAVE=KVM_SET_XSAVE)
IOCTLS.update({name: globals()[name] for name in (
    "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_LAPIC", "KVM_SET_LAPIC",
    "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS")})

# Prevent a silent struct drift: the union must be exactly the header's 256 bytes.
assert sizeof(_kvm_run_exit) == 256, sizeof(_kvm_run_exit)
assert ctypes.sizeof(kvm_run) == 2352, ctypes.sizeof(kvm_run)
