"""Re-execution of a recorded VM: run it again from its trace and compare every exit.

`python -m vmworker.rerun TRACE [--vm ID] [--to-seq SEQ] [--trace OUT]` (what `vmtrace rerun`
starts: a fresh worker process). The VM is built as the recording's worker built it (the spec of
its vm-start record, the image embedded in its vm-image record, or the file at the recorded path
when its sha256 still matches), but no device answers the guest: every value the guest read from
outside — IN and MMIO-read data, string-I/O payloads, so serial input and keys too — comes from the
trace's exits, and every exit the guest makes is compared with the recorded one (reason, direction,
port/address, size, count, data written, guest address). The first difference ends the rerun with
the registers and the instruction at the guest's address; otherwise the rerun ends after the last
recorded exit ("identical"). Kicks (KVM_EXIT_INTR rows) are the VMM's, not the guest's: skipped.

What the guest sees that no trace can hold: RDTSC (no exit on this host), and interrupts of the
in-kernel PIT/PIC (host-timed). A VM recorded with the in-kernel irqchip reruns until its timing
differs, and the divergence says so.

The result is one JSON document on stdout; exit code 0 identical, 1 diverged, 2 bad input.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from tracetool import schema
from tracetool.trace import TraceError, TraceReader, TraceWriter

from . import exits as ex
from . import kvm_abi as abi
from .deterministic import inject, request_window
from .devices.bus import Bus
from .errors import GuestImageError, KvmError, SpecError, VmsupError
from .image import read_image_file, sha256_hex
from .insn_counter import TRACE_HEADER_KEY, InsnCounter
from .loader import load_image
from .machine import Machine, register_dump
from .signals import KICK_SIGNAL
from .spec import VmSpec

EXIT_IDENTICAL, EXIT_DIVERGED, EXIT_BAD_INPUT = 0, 1, 2
STALL_SECONDS = 5.0  # no exit for this long (plus 10× the recorded guest time) where the trace has one
_INTR, _IO, _MMIO, _HLT = abi.KVM_EXIT_INTR, abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, abi.KVM_EXIT_HLT
_IRQ_WINDOW = abi.KVM_EXIT_IRQ_WINDOW_OPEN
IRQCHIP_CAUSE = "interrupt timing: the in-kernel PIT was in use; record with --deterministic"


class RerunInputError(VmsupError):
    """A trace that cannot be rerun (one line for the user, exit 2)."""


@dataclass
class Recording:
    """What the trace says about the VM to rerun."""

    reader: TraceReader
    vm: int
    epoch: int
    spec: VmSpec
    image_record: dict
    insn_exact: bool
    irqchip: bool | None = None


def open_recording(path: str, vm: int | None) -> Recording:
    try:
        reader = TraceReader(path)
    except TraceError as e:
        raise RerunInputError(str(e)) from None
    starts = reader.records(schema.MSG_VM_START)
    vms = sorted({s["vm"] for s in starts})
    if not vms:
        raise RerunInputError(f"{path}: no VM started in this trace")
    if vm is None:
        if len(vms) > 1:
            raise RerunInputError(f"{path} holds VMs {', '.join(map(str, vms))}: choose one with --vm")
        vm = vms[0]
    mine = [s for s in starts if s["vm"] == vm]
    if not mine:
        raise RerunInputError(f"{path}: no VM {vm} (VMs: {', '.join(map(str, vms))})")
    start = mine[0]  # the first run of the VM (epoch 0 unless the trace begins later)
    images = [r for r in reader.records(schema.MSG_VM_IMAGE) if r["vm"] == vm and r["epoch"] == start["epoch"]]
    if not images:
        raise RerunInputError(f"{path}: VM {vm} was recorded without a vm-image record (a vmsup before rerun)")
    try:
        spec = VmSpec.from_json(start.get("spec") or {})
    except (TypeError, ValueError) as e:
        raise RerunInputError(f"{path}: VM {vm}'s recorded spec does not read: {e}") from None
    if spec.vcpus != 1:
        raise RerunInputError(f"{path}: VM {vm} has {spec.vcpus} vCPUs; rerun re-executes one-vCPU VMs only")
    if spec.record_only:
        raise RerunInputError(f"{path}: VM {vm} was recorded with --record-only {spec.record_only}: "
                              "a rerun needs every exit")
    return Recording(reader, vm, start["epoch"], spec, images[0], bool(reader.run.get(TRACE_HEADER_KEY)))


def image_file(rec: Recording, scratch: str) -> str:
    """A file holding the recorded guest image: the embedded bytes, or the recorded path when its
    sha256 still matches."""
    record = rec.image_record
    want = record["sha256"]
    data = record.get("image")
    if data is not None:
        if sha256_hex(data) != want:
            raise RerunInputError(f"the embedded guest image is not the recorded one (sha256 {want})")
        path = os.path.join(scratch, os.path.basename(record.get("path") or "guest.bin"))
        with open(path, "wb") as f:
            f.write(data)
        return path
    path = record.get("path") or rec.spec.guest
    try:
        found = sha256_hex(read_image_file(path))
    except (OSError, GuestImageError):
        found = None
    if found != want:
        what = "is gone" if found is None else f"has changed (sha256 {found})"
        raise RerunInputError(f"guest image not embedded and {path} {what}: need the image with sha256 {want}")
    return path


class _Watchdog(threading.Thread):
    """Kicks the vCPU out of KVM_RUN when the guest makes no exit where the trace has one."""

    def __init__(self, vcpu, target: int) -> None:
        super().__init__(name="rerun-watchdog", daemon=True)
        self.vcpu, self.target = vcpu, target
        self.deadline_ns = 0  # 0: not inside KVM_RUN
        self.fired = False
        self._quit = threading.Event()

    def run(self) -> None:
        while not self._quit.wait(0.2):
            deadline = self.deadline_ns
            if deadline and time.monotonic_ns() > deadline and not self.fired:
                self.fired = True
                self.vcpu.set_immediate_exit(True)
                signal.pthread_kill(self.target, KICK_SIGNAL)

    def rearm(self) -> None:
        self.vcpu.set_immediate_exit(False)
        self.fired = False

    def stop(self) -> None:
        self._quit.set()
        self.join()


class Divergence(Exception):
    def __init__(self, seq: int, field: str, recorded, now, recorded_exit: str, now_exit: str) -> None:
        super().__init__(field)
        self.seq, self.field, self.recorded, self.now = seq, field, recorded, now
        self.recorded_exit, self.now_exit = recorded_exit, now_exit


def _hex(value) -> str:
    return f"{value:#x}" if isinstance(value, int) else str(value)


class Rerun:
    """One re-execution: the machine, the loop over the recorded exits, the rerun's own trace."""

    def __init__(self, rec: Recording, image_path: str, out: str | None = None) -> None:
        spec = rec.spec
        self.rec = rec
        self.image = load_image(image_path, load_addr=spec.load_addr, entry=spec.entry, mode=spec.mode,
                                boot_entry=spec.boot_entry)
        if self.image.sha256 != rec.image_record["sha256"] and rec.image_record.get("image") is None:
            raise RerunInputError(f"guest image sha256 {self.image.sha256}, recorded {rec.image_record['sha256']}")
        initrd = read_image_file(spec.initrd) if spec.initrd else None
        self.irqchip = spec.irqchip if spec.irqchip is not None else self.image.is_kernel
        if spec.deterministic:
            self.irqchip = False  # interrupts come from the trace's interrupt records instead
        self.interrupts = [r for r in rec.reader.records(schema.MSG_INTERRUPT)
                           if r["vm"] == rec.vm and r["epoch"] == rec.epoch]
        self.next_interrupt = 0
        self.guest_exits = 0
        self.counter, self.count_base = None, 0
        rec.irqchip = self.irqchip
        # No devices: every value the guest reads comes from the trace.
        self.machine = Machine(spec.name, self.image, spec.mem, 1, Bus("port"), Bus("mmio"), irqchip=self.irqchip,
                               cmdline=spec.cmdline, initrd=initrd)
        self.writer = None
        if out is not None:
            self.writer = TraceWriter(out, {**rec.reader.run, "rerun_of": os.path.abspath(rec.reader.path)},
                                      overwrite=False)

    # The loop -----------------------------------------------------------------------------------
    def run(self, to_seq: int | None = None) -> dict:
        from .recording import cpuid_table
        rec, machine = self.rec, self.machine
        vcpu = machine.vm.vcpus[0]
        notes = []
        if rec.reader.torn_tail is not None:
            notes.append("the trace has a torn tail: rerun up to its last whole block")
        recorded_cpuid = rec.image_record.get("cpuid")
        if recorded_cpuid is not None and recorded_cpuid != cpuid_table(machine.kvm):
            notes.append("this host's CPUID table differs from the recording's: the guest may see other features")
        counter = None
        if rec.insn_exact:
            try:
                counter = InsnCounter(vcpu)
            except KeyError:
                counter = None
        start_count = counter.read() if counter is not None else 0
        self.counter, self.count_base = counter, start_count
        parent = next((r.get("parent") for r in rec.reader.records(schema.MSG_VM_START)
                       if r["vm"] == rec.vm and r["epoch"] == rec.epoch), None)
        if parent:  # an epoch restored from a snapshot starts from it, its clock where it stood
            from .snapshot import restore_for_rerun
            at, self.guest_exits = restore_for_rerun(parent, machine, self.image.sha256)
            self.count_base -= at
        if self.interrupts and self.interrupts[0]["clock"] == "insns" and counter is None:
            raise RerunInputError("the trace's interrupts are placed by instruction count, which this host "
                                  "cannot count exactly")
        if self.writer is not None:
            for kind in (schema.MSG_VM_START, schema.MSG_VM_IMAGE):
                for r in rec.reader.records(kind):
                    if r["vm"] == rec.vm and r["epoch"] == rec.epoch:
                        self.writer.write_record(kind, {**r, "pid": os.getpid()} if kind == schema.MSG_VM_START else r)
        signal.signal(KICK_SIGNAL, lambda *_: None)  # a handler, so KVM_RUN returns EINTR
        watchdog = _Watchdog(vcpu, threading.get_ident())
        watchdog.start()
        started = time.perf_counter()
        matched = 0
        stopped_at = None
        divergence = None
        try:
            for batch in rec.reader.exit_batches(vm=rec.vm, vcpu=0, epoch=rec.epoch):
                done, n, stopped_at = self._rerun_batch(vcpu, batch, watchdog, to_seq)
                matched += n
                if done:
                    break
        except Divergence as d:
            divergence = d
            matched += d.matched_in_batch
        finally:
            watchdog.stop()
        seconds = time.perf_counter() - started
        result = {"trace": rec.reader.path, "vm": rec.vm, "epoch": rec.epoch, "exits": matched,
                  "seconds": seconds, "exits_per_second": matched / seconds if seconds > 0 else 0.0,
                  "insn_count_exact": counter is not None, "notes": notes}
        if counter is not None:
            result["instructions"] = counter.read() - start_count
            counter.close()
        if divergence is not None:
            d = divergence
            result.update(identical=False, seq=d.seq, field=d.field, recorded=_hex(d.recorded), now=_hex(d.now),
                          recorded_exit=d.recorded_exit, now_exit=d.now_exit)
            result["registers"] = register_dump(vcpu)
            result["instruction"] = self._instruction_at(vcpu, self.now_rip)
            result["cause"] = self._cause()
        else:
            result["identical"] = True
            if stopped_at is not None:
                result["stopped_before_seq"] = stopped_at
                result["registers"] = register_dump(vcpu)
        if self.writer is not None:
            self.writer.close()
        return result

    def _cause(self) -> str | None:
        if self.irqchip:
            return IRQCHIP_CAUSE
        return None

    def _rerun_batch(self, vcpu, batch, watchdog, to_seq):
        """Rerun one recorded block: (whether to stop, exits matched, seq stopped before or None)."""
        cols = batch.columns
        seqs = cols[schema.SEQ_COLUMN.name].tolist()
        reasons, addrs, datas = cols["reason"].tolist(), cols["addr"].tolist(), cols["data"].tolist()
        sizes, counts, flags = cols["size"].tolist(), cols["count"].tolist(), cols["flags"].tolist()
        rips, guest_ns = cols["rip"].tolist(), cols["guest_ns"].tolist()
        payloads = batch.payloads
        fd, run, ioctl, now_ns = vcpu.fd, vcpu.run_page, fcntl.ioctl, time.monotonic_ns
        exit_at, reason_off, sync_at = ex.HEAD.unpack_from, ex.EXIT_REASON_OFFSET, ex.SYNC_ADDRESS.unpack_from
        rip_off, linear_32, rip_unknown = ex.RIP_OFFSET, ex.LINEAR_32, schema.RIP_UNKNOWN
        ex.sync_exit_registers(run)
        out = {name: [] for name in schema.COLUMN_NAMES}
        out_seq, out_payloads = [], []
        deterministic = bool(self.rec.spec.deterministic)
        stall_ns, kvm_run, io_out, flag_write = int(STALL_SECONDS * 1e9), abi.KVM_RUN, abi.KVM_EXIT_IO_OUT, schema.FLAG_WRITE
        matched = 0
        stopped = None
        try:
            for i, reason in enumerate(reasons):
                if reason == _INTR:
                    continue
                seq = seqs[i]
                if to_seq is not None and seq >= to_seq:
                    stopped = seq
                    break
                if deterministic:
                    request_window(run, reason == _IRQ_WINDOW)
                t0 = now_ns()
                deadline = watchdog.deadline_ns = t0 + stall_ns + 10 * guest_ns[i]
                while True:
                    try:
                        ioctl(fd, kvm_run, 0)
                        break
                    except InterruptedError:
                        if now_ns() >= deadline:
                            watchdog.deadline_ns = 0
                            self._diverge(seq, "reason", schema.reason_name(reason), "none", i, cols,
                                          f"no exit in {(now_ns() - t0) / 1e9:.1f} s", sync_at(run, rip_off), matched)
                        watchdog.rearm()  # a late kick meant for the previous exit
                t1 = now_ns()
                watchdog.deadline_ns = 0
                r, direction, size, port, count, data_offset = exit_at(run, reason_off)
                rip, cs_base, cs_l = sync_at(run, rip_off)
                rip = rip if cs_l else (cs_base + rip) & linear_32
                write = 0
                payload = None
                if r != reason:
                    self._diverge(seq, "reason", schema.reason_name(reason), schema.reason_name(r), i, cols,
                                  self._now_text(run, r), rip, matched)
                if r == _IO:
                    write = 1 if direction == io_out else 0
                    nbytes = size * count
                    if write:
                        data = run[data_offset:data_offset + nbytes]
                        if count != 1:
                            payload = data
                    else:
                        data = b""
                    now = (write, port, size, count)
                    value = int.from_bytes(data[:size], "little")
                elif r == _MMIO:
                    port, raw, size, write = ex.mmio_fields(run)
                    count = 1
                    now = (write, port, size, count)
                    value = int.from_bytes(raw[:size], "little") if write else 0
                elif r == _HLT:
                    port = size = value = 0
                    count = 1
                    now = (0, 0, 0, 1)
                else:
                    port = size = 0
                    count = 1
                    value = int.from_bytes(self._slow_exit(vcpu)[:8].ljust(8, b"\0"), "little")
                    now = (0, 0, 0, 1)
                recorded = (flags[i] & flag_write, addrs[i], sizes[i], counts[i])
                if now != recorded:
                    for name, a, b in zip(("direction", "addr", "size", "count"), recorded, now):
                        if a != b:
                            self._diverge(seq, name, a, b, i, cols, self._now_text(run, r), rip, matched)
                if (write or r not in (_IO, _MMIO)) and value != datas[i]:
                    self._diverge(seq, "data", datas[i], value, i, cols, self._now_text(run, r), rip, matched)
                if payload is not None and payloads.get(i, payload) != payload:
                    self._diverge(seq, "data", "string I/O payload", "another payload", i, cols,
                                  self._now_text(run, r), rip, matched)
                if rips[i] != rip_unknown and rips[i] != rip:
                    self._diverge(seq, "rip", rips[i], rip, i, cols, self._now_text(run, r), rip, matched)
                if not write:  # the guest reads: answer with what it read when recorded
                    if r == _IO:
                        answer = payloads.get(i) if count != 1 else None
                        if answer is None:
                            answer = datas[i].to_bytes(8, "little")[:size] * count
                        run[data_offset:data_offset + size * count] = answer[:size * count]
                        if count != 1:
                            payload = answer
                    elif r == _MMIO:
                        run[ex.MMIO_DATA_OFFSET:ex.MMIO_DATA_OFFSET + size] = datas[i].to_bytes(8, "little")[:size]
                matched += 1
                if deterministic:
                    self._give_interrupts(vcpu, seq, i, cols, rip, matched)
                if self.writer is not None:
                    for name, v in (("t_exit", t1), ("guest_ns", t1 - t0), ("addr", port), ("data", datas[i]),
                                    ("count", count), ("reason", r), ("size", size), ("flags", write), ("rip", rip)):
                        out[name].append(v)
                    if payload is not None:
                        out_payloads.append((len(out_seq), bytes(payload)))
                    out_seq.append(seq)
        finally:
            self._write_rows(batch, out, out_seq, out_payloads)
        return stopped is not None, matched, stopped

    def _give_interrupts(self, vcpu, seq, i, cols, rip, matched) -> None:
        """After a guest exit of a --deterministic recording: the interrupts it was given here."""
        self.guest_exits += 1
        pending = self.interrupts
        if self.next_interrupt >= len(pending):
            return
        first = pending[self.next_interrupt]
        at = self.counter.read() - self.count_base if first["clock"] == "insns" else self.guest_exits
        while self.next_interrupt < len(pending):
            irq = pending[self.next_interrupt]
            if irq["at"] > at:
                return
            if irq["at"] < at:
                self._diverge(seq, "interrupt", f"vector {irq['vector']:#x} at {irq['clock']} {irq['at']}",
                              f"{irq['clock']} {at} already", i, cols, f"past the interrupt's place", rip, matched)
            if irq["rip"] != rip:
                self._diverge(seq, "interrupt", f"vector {irq['vector']:#x} at rip {irq['rip']:#x}",
                              f"rip {rip:#x}", i, cols, "at the interrupt's count", rip, matched)
            inject(vcpu, irq["vector"])
            self.next_interrupt += 1

    def _write_rows(self, batch, out, out_seq, payloads) -> None:
        if self.writer is None or not out_seq:
            return
        import numpy as np
        dtypes = schema.column_dtypes()
        cols = {name: np.array(values, dtype=dtypes[name]) for name, values in out.items()}
        self.writer.write_exits(batch.vm, 0, batch.epoch, batch.first_seq, out_seq[-1] - batch.first_seq + 1, cols,
                                seq=np.array(out_seq, dtype=dtypes[schema.SEQ_COLUMN.name]), payloads=payloads)

    def _slow_exit(self, vcpu) -> bytes:
        """A rare exit: what the recording's vCPU loop did for it (the instruction fallbacks) and
        its data field."""
        exit_ = ex.decode_exit(vcpu.run_page)
        fallback = self.machine.ctx.insn_fallback
        if isinstance(exit_, ex.Shutdown) and fallback is not None:
            fallback.handle_shutdown(vcpu)
        elif isinstance(exit_, ex.InternalError) and exit_.suberror == abi.KVM_INTERNAL_ERROR_EMULATION \
                and fallback is not None:
            fallback.handle(vcpu, exit_.data)
        return exit_.event_data

    def _now_text(self, run, reason: int) -> str:
        if reason == _IO:
            _, direction, size, port, count, off = ex.read_head(run)
            write = direction == abi.KVM_EXIT_IO_OUT
            value = int.from_bytes(run[off:off + size], "little") if write else 0
            return schema.describe_exit(reason, int(write), port, size, value, count)
        if reason == _MMIO:
            addr, raw, length, write = ex.mmio_fields(run)
            return schema.describe_exit(reason, int(write), addr, length,
                                        int.from_bytes(raw[:length], "little") if write else 0, 1)
        return schema.reason_name(reason)

    def _diverge(self, seq, field, recorded, now, i, cols, now_text, rip, matched):
        if isinstance(rip, tuple):  # the sync-regs triple of an exit that did not happen
            r, base, l64 = rip
            rip = r if l64 else (base + r) & ex.LINEAR_32
        self.now_rip = rip
        recorded_text = schema.describe_exit(int(cols["reason"][i]), int(cols["flags"][i]), int(cols["addr"][i]),
                                             int(cols["size"][i]), int(cols["data"][i]), int(cols["count"][i]))
        rrip = int(cols["rip"][i])
        if rrip != schema.RIP_UNKNOWN:
            recorded_text += f" rip={rrip:#x}"
        d = Divergence(seq, field, recorded, now, recorded_text, f"{now_text} rip={rip:#x}")
        d.matched_in_batch = matched
        raise d

    def _instruction_at(self, vcpu, linear: int) -> dict:
        """The instruction at a guest linear address, disassembled (iced-x86) in the vCPU's mode."""
        sregs = vcpu.get_sregs()
        bitness = 64 if sregs.cs.l else 32 if sregs.cs.db else 16
        info = {"address": linear, "bitness": bitness}
        try:
            gpa = vcpu.translate(linear)
            memory = self.machine.memory
            if gpa is None or not memory.contains(gpa):
                info["error"] = "address not mapped"
                return info
            n = 15
            while n and not memory.contains(gpa, n):
                n -= 1
            code = memory.read(gpa, n)
            from iced_x86 import Decoder, Formatter, FormatterSyntax
            insn = Decoder(bitness, code, ip=linear).decode()
            info["bytes"] = code[:insn.len].hex()
            info["text"] = Formatter(FormatterSyntax.GAS).format(insn)
        except Exception as e:  # a courtesy: the divergence is reported regardless
            info["error"] = f"{type(e).__name__}: {e}"
        return info

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.machine.close()


def rerun(path: str, vm: int | None = None, to_seq: int | None = None, out: str | None = None) -> dict:
    """Rerun VM `vm` of the trace at `path`; the result document (see the module's docstring)."""
    rec = open_recording(path, vm)
    with tempfile.TemporaryDirectory(prefix="vmsup-rerun-") as scratch:
        image_path = image_file(rec, scratch)
        job = Rerun(rec, image_path, out)
        try:
            return job.run(to_seq)
        finally:
            job.close()
            rec.reader.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmworker.rerun", description="Rerun a recorded VM.")
    parser.add_argument("trace")
    parser.add_argument("--vm", type=int, default=None)
    parser.add_argument("--to-seq", type=int, default=None)
    parser.add_argument("--trace", dest="out", default=None)
    args = parser.parse_args(argv)
    try:
        result = rerun(args.trace, args.vm, args.to_seq, args.out)
        code = EXIT_IDENTICAL if result["identical"] else EXIT_DIVERGED
    except (RerunInputError, GuestImageError, SpecError) as e:
        result, code = {"error": str(e)}, EXIT_BAD_INPUT
    except (KvmError, VmsupError, TraceError, OSError) as e:
        result, code = {"error": str(e)}, EXIT_BAD_INPUT
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
