"""Kvm → Vm → Vcpu: thin owners of the /dev/kvm, VM and vCPU file descriptors.

Each object owns exactly one fd (and the vCPU its kvm_run mapping) and closes it
deterministically (context managers; a Vm closes its vCPUs before itself). Every failed ioctl
becomes a KvmError naming the ioctl and errno. Modelled on rust-vmm's kvm-ioctls layering.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from . import kvm_abi as abi
from .errors import KvmError
from .exits import VcpuExit, decode_exit

_IOCTL_NAMES = {value: name for name, value in abi.IOCTLS.items()}


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_INT_MAX = 2**31 - 1


def _ioctl(fd: int, request: int, arg=0):
    """One ioctl; a structure argument is passed by address and filled in place."""
    name = _IOCTL_NAMES.get(request, hex(request))
    if isinstance(arg, int) and not 0 <= arg <= _INT_MAX:
        # fcntl.ioctl takes an int argument as a C int; wider values (addresses) go through libc.
        ret = _libc.ioctl(fd, request, arg)
        if ret < 0:
            raise KvmError(name, ctypes.get_errno())
        return ret
    try:
        return fcntl.ioctl(fd, request, arg) if isinstance(arg, int) else fcntl.ioctl(fd, request, arg, True)
    except OSError as e:
        raise KvmError(name, e.errno or 0) from None


class Kvm:
    """The /dev/kvm system fd: API version check, capabilities, VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(f"open {path}", errno.ENOENT, "KVM is not available on this machine (no kvm module?)") from None
        except PermissionError:
            raise KvmError(f"open {path}", errno.EACCES, "not permitted (add your user to the kvm group or run as root)") from None
        except OSError as e:
            raise KvmError(f"open {path}", e.errno or 0) from None
        version = _ioctl(self.fd, abi.KVM_GET_API_VERSION)
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError("KVM_GET_API_VERSION", 0, f"API version {version}, expected {abi.KVM_API_VERSION}")
        self.vcpu_mmap_size = _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else a capability-specific positive value."""
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def max_vcpus(self) -> int:
        # api.rst: KVM_CAP_MAX_VCPUS, falling back to KVM_CAP_NR_VCPUS, then 4.
        return self.check_extension(abi.KVM_CAP_MAX_VCPUS) or self.check_extension(abi.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self, max_entries: int = 256):
        """KVM_GET_SUPPORTED_CPUID, retried with a larger array while the kernel says E2BIG."""
        while True:
            cpuid = abi.cpuid2_with_entries(max_entries)()
            cpuid.nent = max_entries
            try:
                _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid)
                return cpuid
            except KvmError as e:
                if e.errno != errno.E2BIG or max_entries >= 4096:
                    raise
                max_entries *= 2

    def create_vm(self) -> "Vm":
        return Vm(self, _ioctl(self.fd, abi.KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Vm:
    """A VM fd: memory slots, vCPUs, in-kernel devices."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = abi.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                                 memory_size=size, userspace_addr=host_addr)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, gpa: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_TSS_ADDR, gpa)

    def create_irqchip(self) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_PIT2, abi.kvm_pit_config(flags=flags))

    def get_irqchip(self, chip_id: int) -> abi.kvm_irqchip:
        """One in-kernel controller's state (abi.KVM_IRQCHIP_PIC_MASTER/_SLAVE/_IOAPIC)."""
        chip = abi.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, abi.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: abi.kvm_irqchip) -> None:
        _ioctl(self.fd, abi.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> abi.kvm_pit_state2:
        pit = abi.kvm_pit_state2()
        _ioctl(self.fd, abi.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, pit: abi.kvm_pit_state2) -> None:
        _ioctl(self.fd, abi.KVM_SET_PIT2, pit)

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, abi.KVM_IRQ_LINE, abi.kvm_irq_level(irq=irq, level=level))

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        zone = abi.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio))
        _ioctl(self.fd, abi.KVM_REGISTER_COALESCED_MMIO, zone)

    def stats_fd(self) -> int:
        """KVM_GET_STATS_FD: a new fd of binary statistics; the caller owns it."""
        return _ioctl(self.fd, abi.KVM_GET_STATS_FD)

    def stats(self) -> "KvmStats":
        """This VM's binary statistics (KVM_GET_STATS_FD on the VM fd)."""
        return KvmStats(self.stats_fd())

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        vcpu = Vcpu(self, vcpu_id, _ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in reversed(self.vcpus):
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Vcpu:
    """A vCPU fd and its shared `struct kvm_run` page(s)."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self.guest_debug: tuple[int, tuple[int, ...]] = (0, ())  # the last KVM_SET_GUEST_DEBUG's arguments
        try:
            self.run_page = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            raise KvmError("mmap(kvm_run)", e.errno or 0) from None

    # Registers ------------------------------------------------------------------------------
    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        _ioctl(self.fd, abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        _ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        _ioctl(self.fd, abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        fpu = abi.kvm_fpu()
        _ioctl(self.fd, abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        _ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def get_xsave(self) -> abi.kvm_xsave:
        xsave = abi.kvm_xsave()
        _ioctl(self.fd, abi.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: abi.kvm_xsave) -> None:
        _ioctl(self.fd, abi.KVM_SET_XSAVE, xsave)

    def get_lapic(self) -> abi.kvm_lapic_state:
        lapic = abi.kvm_lapic_state()
        _ioctl(self.fd, abi.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: abi.kvm_lapic_state) -> None:
        _ioctl(self.fd, abi.KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        """Pending exceptions, interrupts, NMIs and the interrupt shadow (api.rst, KVM_GET_VCPU_EVENTS)."""
        events = abi.kvm_vcpu_events()
        _ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        _ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events)

    def set_cpuid2(self, cpuid) -> None:
        _ioctl(self.fd, abi.KVM_SET_CPUID2, cpuid)

    def translate(self, linear: int) -> int | None:
        """KVM_TRANSLATE: the guest-physical address of a linear address now, or None if unmapped."""
        tr = self.translation(linear)
        return tr.physical_address if tr.valid else None

    def translation(self, linear: int) -> abi.kvm_translation:
        """KVM_TRANSLATE's whole answer: address, valid, and the page's writeable/usermode bits."""
        tr = abi.kvm_translation(linear_address=linear)
        _ioctl(self.fd, abi.KVM_TRANSLATE, tr)
        return tr

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (a KVM_MP_STATE_* value). Blocks while another thread is in KVM_RUN."""
        state = abi.kvm_mp_state()
        _ioctl(self.fd, abi.KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_MP_STATE, abi.kvm_mp_state(mp_state=mp_state))

    def stats(self) -> "KvmStats":
        """This vCPU's binary statistics (KVM_GET_STATS_FD), readable from any thread."""
        return KvmStats(_ioctl(self.fd, abi.KVM_GET_STATS_FD))

    def set_guest_debug(self, control: int, debugreg: tuple[int, ...] = ()) -> None:
        dbg = abi.kvm_guest_debug(control=control)
        for i, value in enumerate(debugreg):
            dbg.arch.debugreg[i] = value
        _ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, dbg)
        self.guest_debug = (control, tuple(debugreg))

    # Running --------------------------------------------------------------------------------
    def set_immediate_exit(self, value: bool) -> None:
        """kvm_run.immediate_exit: the next (or a signal-interrupted) KVM_RUN returns EINTR at once."""
        self.run_page[_IMMEDIATE_EXIT] = 1 if value else 0

    def run(self) -> VcpuExit:
        """One KVM_RUN; returns the typed exit (Interrupted when a signal kicked the vCPU)."""
        try:
            fcntl.ioctl(self.fd, abi.KVM_RUN, 0)
        except InterruptedError:
            return decode_exit(self.run_page, interrupted=True)
        except OSError as e:
            raise KvmError("KVM_RUN", e.errno or 0) from None
        return decode_exit(self.run_page)

    def complete_pending_io(self) -> None:
        """Finish the instruction of the last port-I/O or MMIO exit without entering the guest:
        KVM_RUN with immediate_exit set completes pending I/O first, then returns EINTR (api.rst,
        "immediate_exit"). A single-stepping vCPU needs it on this host: completed by a normal
        KVM_RUN, the instruction raises no single-step trap and the next instruction runs too.
        Leaves immediate_exit set; the caller clears it (after checking for kicks)."""
        self.set_immediate_exit(True)
        try:
            fcntl.ioctl(self.fd, abi.KVM_RUN, 0)
        except InterruptedError:
            return
        except OSError as e:
            raise KvmError("KVM_RUN", e.errno or 0) from None
        if self.run_page[_EXIT_REASON] == abi.KVM_EXIT_DEBUG:
            return  # single-stepping: completing an IN (emulated to its end) raises the step's trap
        raise RuntimeError("KVM_RUN with immediate_exit set entered the guest")  # a VMM bug: an exit went unseen

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page.close()
            os.close(self.fd)
            self.fd = -1


_IMMEDIATE_EXIT = abi.run_offset("immediate_exit")
_EXIT_REASON = abi.run_offset("exit_reason")  # a u32; every reason fits its low byte


class KvmStats:
    """A KVM_GET_STATS_FD file (api.rst, "KVM_GET_STATS_FD"): a header, descriptors, then u64 data.

    Owns its fd. Descriptors are read once; `read(name)` is one pread of the value, which needs no
    lock on the vCPU, so another thread may sample a vCPU blocked in KVM_RUN; `read_counters()` is
    one pread of the whole data area.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            head = abi.kvm_stats_header.from_buffer_copy(os.pread(fd, ctypes.sizeof(abi.kvm_stats_header), 0))
            desc_size = ctypes.sizeof(abi.kvm_stats_desc) + head.name_size
            raw = os.pread(fd, desc_size * head.num_desc, head.desc_offset)
        except OSError as e:
            os.close(fd)
            raise KvmError("read(stats fd)", e.errno or 0) from None
        self._offsets: dict[str, int] = {}
        self._data_offset = head.data_offset
        counters: dict[str, int] = {}  # name → offset in the data area, single-value statistics only
        end = 0
        for i in range(head.num_desc):
            at = i * desc_size
            desc = abi.kvm_stats_desc.from_buffer_copy(raw, at)
            name = raw[at + ctypes.sizeof(abi.kvm_stats_desc):at + desc_size].split(b"\0", 1)[0].decode()
            self._offsets[name] = head.data_offset + desc.offset
            end = max(end, desc.offset + 8 * desc.size)
            if desc.flags & abi.KVM_STATS_TYPE_MASK in abi.KVM_STATS_SINGLE_VALUE_TYPES and desc.size == 1:
                counters[name] = desc.offset
        self.names = frozenset(self._offsets)
        self._counters = counters
        self._data_size = end
        self.counter_names = tuple(counters)

    def read(self, name: str) -> int:
        """The (first) u64 of statistic `name`; KeyError if this kernel has no such statistic."""
        return int.from_bytes(os.pread(self.fd, 8, self._offsets[name]), "little")

    def read_counters(self) -> dict[str, int]:
        """Every single-value statistic (cumulative, instant or peak; not the histograms), by the
        kernel's name, from one pread."""
        data = os.pread(self.fd, self._data_size, self._data_offset)
        return {name: int.from_bytes(data[at:at + 8], "little") for name, at in self._counters.items()}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
