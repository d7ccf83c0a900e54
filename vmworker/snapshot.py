"""Snapshots of a running VM: what `vmsup snapshot` saves and `vmsup launch --restore` loads.

A snapshot is taken with every vCPU parked outside KVM_RUN after a KVM_RUN with immediate_exit
set, which completes a pending I/O or MMIO exit (api.rst, "immediate_exit": the state is then
consistent for migration). It holds guest RAM; per vCPU the registers, sregs, XSAVE image (FPU
when XSAVE is not readable), pending events, MP state and, with an in-kernel irqchip, the LAPIC;
the in-kernel PIC/IOAPIC and PIT; the device models' state (with --deterministic the user-space
PIC pair and PIT among them); a --deterministic VM's virtual clock (vmworker/deterministic.py);
and the trace position (per vCPU next sequence number, the epoch). Not saved: MSRs beyond what
sregs carry (the TSC runs on).

The file format is vmworker.snapshot_file; this module only decides what goes in and out.
"""

from __future__ import annotations

import ctypes
import os
import time

from . import kvm_abi as abi
from .errors import KvmError, SpecError
from .snapshot_file import SnapshotError, file_sha256, read_header, read_snapshot, unpack_section, write_snapshot

_CHIPS = {"pic_master": abi.KVM_IRQCHIP_PIC_MASTER, "pic_slave": abi.KVM_IRQCHIP_PIC_SLAVE,
          "ioapic": abi.KVM_IRQCHIP_IOAPIC}


def _raw(struct) -> bytes:
    return bytes(memoryview(struct).cast("B"))


def _load(cls, data, path: str, what: str):
    if not isinstance(data, bytes) or len(data) != ctypes.sizeof(cls):
        raise SnapshotError(f"{path}: corrupt snapshot ({what} is not a {cls.__name__})")
    return cls.from_buffer_copy(data)


def _vcpu_state(vcpu, irqchip: bool) -> dict:
    state = {"regs": _raw(vcpu.get_regs()), "sregs": _raw(vcpu.get_sregs()), "mp_state": vcpu.get_mp_state(),
             "events": _raw(vcpu.get_vcpu_events())}
    try:
        state["xsave"] = _raw(vcpu.get_xsave())
    except KvmError:
        state["fpu"] = _raw(vcpu.get_fpu())
    if irqchip:
        state["lapic"] = _raw(vcpu.get_lapic())
    return state


def capture(machine, devices, batchers, spec) -> dict:
    """Every section of a snapshot of `machine`, whose vCPUs are parked (Machine.park_all)."""
    vm = machine.vm
    meta = {"vm": spec.vm_id, "name": spec.name, "epoch": spec.epoch, "guest": spec.guest,
            "vcpus": len(vm.vcpus), "mem": machine.memory.size, "irqchip": machine.irqchip,
            "next_seq": [b.next_seq if b is not None else 0 for b in batchers],
            "wall": time.time_ns()}
    sections: dict[str, object] = {
        "meta": meta,
        "vcpus": [_vcpu_state(v, machine.irqchip) for v in vm.vcpus],
        "devices": devices.saved_state(),
    }
    det = machine.ctx.deterministic
    if det is not None:
        sections["deterministic"] = det.state(vm.vcpus[0])
    if machine.irqchip:
        chips = {name: _raw(vm.get_irqchip(chip_id)) for name, chip_id in _CHIPS.items()}
        chips["pit"] = _raw(vm.get_pit2())
        sections["irqchip"] = chips
    region = machine.memory.regions[0]  # with_ram: one region at gpa 0
    sections["memory"] = memoryview(region.mapping)
    return sections


def take(path: str, machine, devices, batchers, spec, image_sha256: str) -> dict:
    """Pause (if running), save to `path`, resume; what `vmsup snapshot` replies."""
    t0 = time.perf_counter()
    sections = capture(machine, devices, batchers, spec)
    size = write_snapshot(path, machine.memory.size, image_sha256, sections)
    sections["memory"].release()
    return {"path": path, "bytes": size, "seconds": time.perf_counter() - t0,
            "next_seq": sections["meta"]["next_seq"], "epoch": spec.epoch}


PARK_TIMEOUT = 10.0  # seconds for every vCPU to leave KVM_RUN and park


def command_handler(machine, devices, recording, spec, image_sha256: str):
    """The worker control socket's `worker-snapshot` command (vmworker/control.py): pause the VM
    unless it is paused already, save it, let it run on."""
    def handle(req: dict) -> dict:
        path = req.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise SpecError("snapshot: the file must be an absolute path")
        was_paused = machine.ctx.paused
        machine.pause()
        try:
            if not machine.wait_parked(PARK_TIMEOUT):
                raise SpecError("snapshot: the VM is ending" if machine.ctx.stopping
                                else f"snapshot: the vCPUs did not park within {PARK_TIMEOUT:g} s")
            batchers = recording.batchers if recording is not None else [None] * len(machine.vm.vcpus)
            try:
                return take(path, machine, devices, batchers, spec, image_sha256)
            except OSError as e:
                raise SpecError(f"snapshot: {path}: {e.strerror or e}") from None
        finally:
            if not was_paused:
                machine.resume()
    return handle


class Snapshot:
    """A snapshot file read and checked, ready to put into a fresh machine."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.header, self._sections = read_snapshot(path)
        self.meta = unpack_section(path, self._sections, "meta")
        self.vcpus = unpack_section(path, self._sections, "vcpus")
        self.devices = unpack_section(path, self._sections, "devices")
        self.irqchip = unpack_section(path, self._sections, "irqchip") if "irqchip" in self._sections else None
        self.deterministic = (unpack_section(path, self._sections, "deterministic")
                              if "deterministic" in self._sections else None)
        self.memory = self._sections.get("memory")
        if not isinstance(self.meta, dict) or not isinstance(self.vcpus, list) or self.memory is None:
            raise SnapshotError(f"{path}: corrupt snapshot (meta, vcpus or memory missing)")
        if len(self.memory) != self.header.mem_size:
            raise SnapshotError(f"{path}: corrupt snapshot (memory is {len(self.memory)} bytes, header says {self.header.mem_size})")
        next_seq = self.meta.get("next_seq")
        if not isinstance(next_seq, list) or len(next_seq) != len(self.vcpus) or not all(
                isinstance(n, int) and n >= 0 for n in next_seq):
            raise SnapshotError(f"{path}: corrupt snapshot (trace position)")
        self.next_seq: list[int] = next_seq

    def check_fits(self, spec, image_sha256: str, irqchip: bool) -> None:
        """The VM being started must be the one snapshotted: SnapshotError (one line) if not."""
        check_header_against(self.path, self.header, spec.mem, image_sha256)
        if spec.vcpus != len(self.vcpus):
            raise SnapshotError(f"{self.path}: the snapshot has {len(self.vcpus)} vCPU(s), this VM {spec.vcpus}")
        if bool(self.irqchip) != irqchip:
            said = "with" if self.irqchip else "without"
            raise SnapshotError(f"{self.path}: the snapshot was taken {said} an in-kernel irqchip; give the same --irqchip")
        if (self.deterministic is not None) != bool(spec.deterministic):
            said = "with" if self.deterministic is not None else "without"
            raise SnapshotError(f"{self.path}: the snapshot was taken {said} --deterministic; give the same")

    def parent(self) -> dict:
        """What a restored VM's vm-start names as its parent (the file's sha256: a rerun of the
        restored epoch starts from this very file, vmworker/rerun.py)."""
        return {"snapshot": os.path.abspath(self.path), "sha256": file_sha256(self.path), "vm": self.meta.get("vm"),
                "name": self.meta.get("name"), "epoch": self.meta.get("epoch"), "next_seq": list(self.next_seq),
                "wall": self.meta.get("wall")}

    def clock_position(self) -> tuple[int, int] | None:
        """A --deterministic snapshot's virtual clock: (clock reading, guest exits), else None."""
        det = self.deterministic
        if det is None:
            return None
        at, exits = det.get("at") if isinstance(det, dict) else None, det.get("exits") if isinstance(det, dict) else None
        if not isinstance(at, int) or not isinstance(exits, int):
            raise SnapshotError(f"{self.path}: corrupt snapshot (deterministic clock)")
        return at, exits

    def restore(self, machine, devices) -> None:
        """Put the saved state into `machine` (made from the same image, not yet running; with
        --deterministic, its controller made already: its PIC/PIT are among the devices)."""
        self.restore_machine(machine)
        devices.restore_saved_state(self.devices, self.path)
        if self.deterministic is not None:
            machine.ctx.deterministic.restore(self.deterministic, machine.vm.vcpus[0], self.path)

    def restore_machine(self, machine) -> None:
        """Memory, in-kernel irqchip and vCPU state only (a rerun, whose devices are the trace)."""
        path = self.path
        machine.memory.regions[0].mapping[:] = self.memory
        vm = machine.vm
        if self.irqchip:  # controllers before the LAPICs that route through them
            for name, chip_id in _CHIPS.items():
                chip = _load(abi.kvm_irqchip, self.irqchip.get(name), path, name)
                if chip.chip_id != chip_id:
                    raise SnapshotError(f"{path}: corrupt snapshot ({name} holds chip {chip.chip_id})")
                vm.set_irqchip(chip)
            vm.set_pit2(_load(abi.kvm_pit_state2, self.irqchip.get("pit"), path, "pit"))
        for vcpu, state in zip(vm.vcpus, self.vcpus):
            if not isinstance(state, dict):
                raise SnapshotError(f"{path}: corrupt snapshot (vCPU {vcpu.id})")
            # sregs first: the APIC base and modes the LAPIC and registers are checked against
            vcpu.set_sregs(_load(abi.kvm_sregs, state.get("sregs"), path, "sregs"))
            vcpu.set_regs(_load(abi.kvm_regs, state.get("regs"), path, "regs"))
            if "xsave" in state:
                vcpu.set_xsave(_load(abi.kvm_xsave, state["xsave"], path, "xsave"))
            else:
                vcpu.set_fpu(_load(abi.kvm_fpu, state.get("fpu"), path, "fpu"))
            if machine.irqchip:
                vcpu.set_lapic(_load(abi.kvm_lapic_state, state.get("lapic"), path, "lapic"))
            mp_state = state.get("mp_state")
            if not isinstance(mp_state, int):
                raise SnapshotError(f"{path}: corrupt snapshot (mp_state)")
            vcpu.set_mp_state(mp_state)
            vcpu.set_vcpu_events(_load(abi.kvm_vcpu_events, state.get("events"), path, "events"))


def parent_snapshot(parent: dict, mem: int, image_sha256: str) -> Snapshot:
    """The snapshot a restored epoch's vm-start names (`parent`), read and checked to be that
    very file; SnapshotError (one line) when it is gone, changed or of another VM."""
    path = parent.get("snapshot") if isinstance(parent, dict) else None
    if not isinstance(path, str):
        raise SnapshotError("the epoch was restored from a snapshot its vm-start record does not name")
    if not os.path.exists(path):
        raise SnapshotError(f"the epoch was restored from snapshot {path}, which is gone: a rerun starts from it")
    want = parent.get("sha256")
    if want is None:
        raise SnapshotError(f"the epoch was restored from snapshot {path} by a vmsup that did not record its "
                            "sha256: cannot tell it is the same file")
    if file_sha256(path) != want:
        raise SnapshotError(f"snapshot {path} has changed since the epoch was restored from it (sha256 {want})")
    snapshot = Snapshot(path)
    check_header_against(path, snapshot.header, mem, image_sha256)
    return snapshot


def check_header_against(path: str, header, mem: int, image_sha256: str | None) -> None:
    if header.mem_size != mem:
        raise SnapshotError(f"{path}: the snapshot's memory is {_size(header.mem_size)}, not --mem {_size(mem)}; "
                            f"give --mem {_size(header.mem_size)}")
    if image_sha256 is not None and header.image_sha256 != image_sha256:
        raise SnapshotError(f"{path}: taken of another guest image (sha256 {header.image_sha256[:16]}…)")


def check_file(path: str, mem: int) -> None:
    """The supervisor's check before any VM starts: a snapshot of this format and memory size."""
    check_header_against(path, read_header(path), mem, None)


def _size(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else str(n)


def restore_for_rerun(parent: dict, machine, image_sha256: str) -> tuple[int, int]:
    """A rerun of a restored epoch (vmworker/rerun.py) starts from its snapshot: memory and CPU
    state go into `machine`; returns where a --deterministic snapshot's clock stood (clock
    reading, guest exits), (0, 0) for another, so the epoch's interrupt records keep their places."""
    snapshot = parent_snapshot(parent, machine.memory.size, image_sha256)
    snapshot.restore_machine(machine)
    return snapshot.clock_position() or (0, 0)
