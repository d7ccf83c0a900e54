"""The rerun's engine: the re-executed machine and its walk along the recorded exits.

`Replay` builds the VM as the recording's worker built it, but with no device: every value the
guest reads from outside (IN and MMIO-read data, string-I/O payloads, so serial input and keys
too) comes from the trace, and every exit the guest makes is compared with the recorded one
(reason, direction, port/address, size, count, data written, guest address). The first
difference raises `Divergence`. Kicks (KVM_EXIT_INTR rows) are the VMM's, not the guest's:
skipped. In a --deterministic recording the recorded interrupts are injected again at the exit
(and instruction count) where they were.

The position on the recording is (batch, row) of the next recorded exit, `ordinal` (guest exits
taken so far), the next interrupt and, where the counter is exact, the instruction count
(`count_now`, relative to `count_base`: KVM's counter never goes back, so a restored checkpoint
moves the base). With `keep_history` (gdb) the decoded batches and the count at every exit stay in
memory, so time travel (vmworker/rerun_travel.py) can go back to any position.

The loop runs on the calling thread, the vCPU's. It serves a gdb stub as vcpu_loop.py does: a
kick parks it in `Debugger.park`, KVM_EXIT_DEBUG goes to `Debugger.debug_exit`, an emulation
failure at a planted int3 to `Debugger.breakpoint_hit`, and an exit ends a gdb step (`after_io`).
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from array import array

from tracetool import schema
from tracetool.trace import TraceWriter

from . import exits as ex
from . import kvm_abi as abi
from .deterministic import inject, request_window
from .devices.bus import Bus
from .image import read_image_file
from .insn_counter import InsnCounter
from .loader import load_image
from .machine import Machine
from .rerun_recording import RecordedBatch, Recording, RerunInputError
from .rerun_stops import Divergence, TravelRequest, VmEnded, Watchdog, now_text
from .signals import KICK_SIGNAL

STALL_SECONDS = 5.0  # no exit for this long (plus 10× the recorded guest time) where the trace has one
_INTR, _IO, _MMIO, _HLT = abi.KVM_EXIT_INTR, abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, abi.KVM_EXIT_HLT
_DEBUG, _INTERNAL = abi.KVM_EXIT_DEBUG, abi.KVM_EXIT_INTERNAL_ERROR
_IRQ_WINDOW = abi.KVM_EXIT_IRQ_WINDOW_OPEN
IRQCHIP_CAUSE = "interrupt timing: the in-kernel PIT was in use; record with --deterministic"
HLT_BYTES = 1
END, STOPPED = "end", "stopped"  # what `advance` returns: the recording is over, or the stop was reached


class _StepDone(Exception):
    pass


class Replay:
    """One re-execution: the machine, the position on the recording, the loop over its exits."""

    def __init__(self, rec: Recording, image_path: str, out: str | None = None, keep_history: bool = False) -> None:
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
        rec.irqchip = self.irqchip
        self.deterministic = bool(spec.deterministic)
        self.interrupts = [r for r in rec.reader.records(schema.MSG_INTERRUPT)
                           if r["vm"] == rec.vm and r["epoch"] == rec.epoch]
        # No devices: every value the guest reads comes from the trace.
        self.machine = Machine(spec.name, self.image, spec.mem, 1, Bus("port"), Bus("mmio"), irqchip=self.irqchip,
                               cmdline=spec.cmdline, initrd=initrd)
        self.vcpu = self.machine.vm.vcpus[0]
        self.writer = None
        if out is not None:
            self.writer = TraceWriter(out, {**rec.reader.run, "rerun_of": os.path.abspath(rec.reader.path)},
                                      overwrite=False)
        # The position (see the module's docstring).
        self.keep_history = keep_history
        self._source = rec.reader.exit_batches(vm=rec.vm, vcpu=0, epoch=rec.epoch)
        self._kept: list[RecordedBatch] = []
        self.batch: RecordedBatch | None = None
        self.batch_no, self.row, self.ordinal, self.next_interrupt = -1, 0, 0, 0
        self.injected_at_last_exit = False  # KVM_INTERRUPT pending: no checkpoint here (vcpu events lack it)
        self.injected_vector = 0
        self._delivering = None  # guest debug to go back to once an injected interrupt is delivered
        self.exit_counts = array("q")  # instruction count at each guest exit, by ordinal: recorded, or learnt (gdb)
        self.check_counts = False  # compare each exit's instruction count (needs the exact counter)
        self.counter: InsnCounter | None = None
        self.count_base = 0
        self.exit_base = 0  # guest exits before this epoch (a restored one continues a snapshot's clock)
        self.debugger = None  # gdb.control.Debugger while a stub serves this rerun
        self.on_debug = None  # the time travel's own handler of KVM_EXIT_DEBUG while it works
        self.at_exit_boundary = None  # () -> None before each recorded exit: the travel's checkpoints
        self.now_rip = 0
        self._watchdog: Watchdog | None = None

    # Setting up and down ---------------------------------------------------------------------------
    def start(self) -> None:
        """Before the first exit, on the thread that runs the loop."""
        ex.sync_exit_registers(self.vcpu.run_page)
        if self.rec.insn_exact:
            try:
                self.counter = InsnCounter(self.vcpu)
            except KeyError:
                self.counter = None
        self.count_base = self.counter.read() if self.counter is not None else 0
        parent = next((r.get("parent") for r in self.rec.reader.records(schema.MSG_VM_START)
                       if r["vm"] == self.rec.vm and r["epoch"] == self.rec.epoch), None)
        if parent:  # an epoch restored from a snapshot starts from it, its clock where it stood
            from .snapshot import restore_for_rerun
            at, self.exit_base = restore_for_rerun(parent, self.machine, self.image.sha256)
            self.count_base -= at
        if self.counter is not None:
            self._load_recorded_counts()
        if self.interrupts and self.interrupts[0]["clock"] == "insns" and self.counter is None:
            raise RerunInputError("the trace's interrupts are placed by instruction count, which this host "
                                  "cannot count exactly")
        if self.writer is not None:
            rec = self.rec
            for kind in (schema.MSG_VM_START, schema.MSG_VM_IMAGE):
                for r in rec.reader.records(kind):
                    if r["vm"] == rec.vm and r["epoch"] == rec.epoch:
                        self.writer.write_record(kind, {**r, "pid": os.getpid()} if kind == schema.MSG_VM_START else r)
        signal.signal(KICK_SIGNAL, lambda *_: None)  # a handler, so KVM_RUN returns EINTR
        self.machine.adopt_current_thread()  # gdb's stops kick this thread out of KVM_RUN
        self._watchdog = Watchdog(self.vcpu, threading.get_ident())
        self._watchdog.start()

    def finish(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self.batch is not None:
            self._write_rows(self.batch)
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        self.finish()
        if self.counter is not None:
            self.counter.close()
            self.counter = None
        self.machine.close()

    def count_now(self) -> int:
        """Instructions the guest executed since the start of the recording (0 without an exact counter)."""
        return self.counter.read() - self.count_base if self.counter is not None else 0

    def seq_next(self) -> int | None:
        """The sequence number of the next recorded exit, or None at the end of the recording."""
        return self.batch.seqs[self.row] if self._next_row() else None

    # The position ----------------------------------------------------------------------------------
    def _next_row(self) -> bool:
        """Point (batch, row) at the next recorded guest exit; False at the end of the recording."""
        while True:
            b = self.batch
            if b is not None:
                reasons, row = b.reasons, self.row
                while row < len(reasons) and reasons[row] == _INTR:
                    row += 1
                self.row = row
                if row < len(reasons):
                    return True
            if not self._load(self.batch_no + 1):
                return False

    def _load(self, n: int) -> bool:
        if self.batch is not None:
            self._write_rows(self.batch)
        if n < len(self._kept):
            batch = self._kept[n]
        else:
            raw = next(self._source, None)
            if raw is None:
                return False
            batch = RecordedBatch(raw)
            if self.keep_history:
                self._kept.append(batch)
        self.batch, self.batch_no, self.row = batch, n, 0
        return True

    def seek(self, batch_no: int, row: int) -> None:
        """Put the position at a kept (batch, row) (keep_history only)."""
        self.batch, self.batch_no, self.row = self._kept[batch_no], batch_no, row

    # The loop ------------------------------------------------------------------------------------
    def advance(self, stop_before: int | None = None, to_seq: int | None = None) -> str:
        """Take recorded exits until `ordinal` reaches `stop_before` or the next exit's seq reaches
        `to_seq` (STOPPED, before entering the guest towards it), or the recording ends (END)."""
        while True:
            if stop_before is not None and self.ordinal >= stop_before:
                return STOPPED
            if not self._next_row():
                return END
            if to_seq is not None and self.batch.seqs[self.row] >= to_seq:
                return STOPPED
            if self.at_exit_boundary is not None:
                self.at_exit_boundary()
            self._one_exit()

    def step(self) -> bool:
        """One instruction, single-stepped (KVM_GUESTDBG_SINGLESTEP): an exit it makes is taken as
        the next recorded one. False at the end of the recording. Leaves guest debug to the caller."""
        if not self._next_row():
            return False
        self.vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)
        saved, self.on_debug = self.on_debug, self._end_step
        try:
            self._one_exit()
            # On this host an I/O instruction completed by a normal KVM_RUN raises no single-step
            # trap and the next instruction would run too: complete it now (vcpu_loop.py's stepping).
            self.vcpu.complete_pending_io()
            self.vcpu.set_immediate_exit(False)
        except _StepDone:
            pass
        finally:
            self.on_debug = saved
        return True

    def _end_step(self, exit_) -> bool:
        raise _StepDone

    def _one_exit(self) -> None:
        """Enter the guest until it makes the next recorded exit, and take it."""
        b, i, ordinal = self.batch, self.row, self.ordinal
        reason = b.reasons[i]
        vcpu, run, fd, now_ns, watchdog = self.vcpu, self.vcpu.run_page, self.vcpu.fd, time.monotonic_ns, self._watchdog
        if self.deterministic:
            request_window(run, reason == _IRQ_WINDOW)
        stall_ns = int(STALL_SECONDS * 1e9) + 10 * b.guest_ns[i]
        while True:
            if vcpu.guest_debug[0] & abi.KVM_GUESTDBG_SINGLESTEP:  # (gdb may have just asked for it)
                if reason == _HLT:
                    self._halt_unstepped(b.rips[i])
                if self.injected_at_last_exit:
                    self._deliver_unstepped()
            t0 = now_ns()
            deadline = watchdog.deadline_ns = t0 + stall_ns
            try:
                fcntl.ioctl(fd, abi.KVM_RUN, 0)
            except InterruptedError:
                watchdog.deadline_ns = 0
                if now_ns() >= deadline:
                    self._diverge("reason", schema.reason_name(reason), "none",
                                  f"no exit in {(now_ns() - t0) / 1e9:.1f} s", ex.linear_rip(run))
                watchdog.rearm()  # a late kick meant for the previous exit
                self._after_kick()
                continue
            t1 = now_ns()
            watchdog.deadline_ns = 0
            r = ex.HEAD.unpack_from(run, ex.EXIT_REASON_OFFSET)[0]
            if r == _DEBUG and self._debug_exit():
                if self.ordinal != ordinal:
                    return  # the handler stepped over an instruction that made this very exit
                continue
            if r == _INTERNAL and self.debugger is not None and \
                    self.debugger.breakpoint_hit(vcpu, ex.decode_exit(run).suberror):
                self.count_base += 1  # KVM counted its failed emulation of gdb's int3: not a guest instruction
                continue
            break
        self._take(r, t0, t1)

    def _halt_unstepped(self, after_hlt: int) -> None:
        """Single-stepped, a HLT raises the step's trap instead of its exit on this host, and the
        recorded HLT exit never comes: at the recorded HLT, enter without single-step (the HLT,
        the first instruction, exits at once; `_take` ends the step there). A HLT exit's address
        is past the instruction (F4, one byte: SDM Vol. 2A "HLT")."""
        from .gdb.regs import linear_pc
        vcpu = self.vcpu
        if linear_pc(vcpu.get_regs(), vcpu.get_sregs()) + HLT_BYTES == after_hlt:
            control, debugreg = vcpu.guest_debug
            vcpu.set_guest_debug(control & ~abi.KVM_GUESTDBG_SINGLESTEP, debugreg)

    def _deliver_unstepped(self) -> None:
        """Single-stepped, the entry that delivers an injected interrupt pushes EFLAGS with the
        step's TF (KVM sets it in the guest's RFLAGS to step), and the guest's IRET later turns
        tracing on in the guest itself. So that entry runs without single-step, up to a debug
        register on the handler's first instruction; `_debug_exit` then steps on as before."""
        from .interrupt_gate import handler_address
        vcpu = self.vcpu
        handler = handler_address(vcpu, self.machine.memory, self.injected_vector)
        self.injected_at_last_exit = False
        if handler is None:
            return
        self._delivering = vcpu.guest_debug
        dr7 = 1  # L0: DR0 enabled, R/W0 = LEN0 = 0: instruction execution (SDM Vol. 3B §17.2.4)
        vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW_BP, (handler, 0, 0, 0, 0, 0, 0, dr7))

    def _after_kick(self) -> None:
        """A kick: park for gdb while it holds the vCPU (as vcpu_loop._after_kick), or go on."""
        dbg, ctx, vcpu = self.debugger, self.machine.ctx, self.vcpu
        while True:
            if ctx.stopping:
                raise VmEnded
            if dbg is not None and dbg.holds(vcpu.id):
                dbg.park(vcpu)
                kind = dbg.take_reverse()
                if kind is not None:
                    raise TravelRequest(kind)
                continue
            vcpu.set_immediate_exit(False)
            if ctx.stopping or (dbg is not None and dbg.holds(vcpu.id)):
                vcpu.set_immediate_exit(True)  # a stop between the checks and the clearing: look again
                continue
            return

    def park_for_gdb(self) -> None:
        """Wait here (outside KVM_RUN) while gdb holds the vCPU: after a stop the loop itself reports."""
        self.vcpu.set_immediate_exit(True)
        self._after_kick()

    def _debug_exit(self) -> bool:
        """KVM_EXIT_DEBUG: the travel's or gdb's; True when handled (enter the guest again)."""
        exit_ = ex.decode_exit(self.vcpu.run_page)
        if self._delivering is not None:  # at the interrupt handler: single-step on from here
            self.vcpu.set_guest_debug(*self._delivering)
            self._delivering = None
            return True
        if self.on_debug is not None:
            return self.on_debug(exit_)
        if self.debugger is not None:
            self.debugger.debug_exit(self.vcpu, exit_)
            return True
        return False

    def _take(self, r: int, t0: int, t1: int) -> None:
        """Compare the exit the guest made with the recorded one, answer its reads from the trace and
        move the position past it."""
        b, i = self.batch, self.row
        vcpu, run = self.vcpu, self.vcpu.run_page
        reason, seq = b.reasons[i], b.seqs[i]
        _, direction, size, port, count, data_offset = ex.HEAD.unpack_from(run, ex.EXIT_REASON_OFFSET)
        rip = ex.linear_rip(run)
        write = 0
        payload = None
        if r != reason:
            self._diverge("reason", schema.reason_name(reason), schema.reason_name(r), now_text(run, r), rip)
        if r == _IO:
            write = 1 if direction == abi.KVM_EXIT_IO_OUT else 0
            data = b""
            if write:
                data = run[data_offset:data_offset + size * count]
                if count != 1:
                    payload = data
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
            value = int.from_bytes(self._slow_exit()[:8].ljust(8, b"\0"), "little")
            now = (0, 0, 0, 1)
        recorded = (b.flags[i] & schema.FLAG_WRITE, b.addrs[i], b.sizes[i], b.counts[i])
        if now != recorded:
            for name, a, c in zip(("direction", "addr", "size", "count"), recorded, now):
                if a != c:
                    self._diverge(name, a, c, now_text(run, r), rip)
        if (write or r not in (_IO, _MMIO)) and value != b.datas[i]:
            self._diverge("data", b.datas[i], value, now_text(run, r), rip)
        if payload is not None and b.payloads.get(i, payload) != payload:
            self._diverge("data", "string I/O payload", "another payload", now_text(run, r), rip)
        if b.rips[i] != schema.RIP_UNKNOWN and b.rips[i] != rip:
            self._diverge("rip", b.rips[i], rip, now_text(run, r), rip)
        if self.check_counts:
            self._check_count(self.count_now(), r, rip)
        if not write:  # the guest reads: answer with what it read when recorded
            if r == _IO:
                answer = b.payloads.get(i) if count != 1 else None
                if answer is None:
                    answer = b.datas[i].to_bytes(8, "little")[:size] * count
                run[data_offset:data_offset + size * count] = answer[:size * count]
                if count != 1:
                    payload = answer
            elif r == _MMIO:
                run[ex.MMIO_DATA_OFFSET:ex.MMIO_DATA_OFFSET + size] = b.datas[i].to_bytes(8, "little")[:size]
        self.ordinal += 1
        self.row = i + 1
        self.injected_at_last_exit = False
        if self.deterministic:
            self._give_interrupts(seq, rip)
        if self.writer is not None:
            for name, v in (("t_exit", t1), ("guest_ns", t1 - t0), ("addr", port), ("data", b.datas[i]),
                            ("count", count), ("reason", r), ("size", size), ("flags", write), ("rip", rip)):
                b.out[name].append(v)
            if payload is not None:
                b.out_payloads.append((len(b.out_seq), bytes(payload)))
            b.out_seq.append(seq)
        if self.debugger is not None:
            # gdb's stepi ends at any exit the stepped instruction made: the I/O ones (after_io's
            # reason), and a HLT or an instruction vmsup emulated, which raise no step trap either.
            self.debugger.after_io(vcpu)

    def _load_recorded_counts(self) -> None:
        """A --deterministic recording's instruction count at each guest exit (its insn-counts
        records), up to the first hole: every exit's count is compared with it."""
        rec = self.rec
        records = sorted((r for r in rec.reader.records(schema.MSG_INSN_COUNTS)
                          if r["vm"] == rec.vm and r["epoch"] == rec.epoch), key=lambda r: r["first"])
        for r in records:
            if r["first"] - self.exit_base != len(self.exit_counts):
                break
            self.exit_counts.frombytes(r["counts"])
        self.check_counts = bool(self.exit_counts) or self.keep_history

    def _check_count(self, count: int, r: int, rip: int) -> None:
        """The instruction count at this exit: the recorded one, or learnt the first time (gdb) and
        the same every time after."""
        n = self.ordinal
        if n < len(self.exit_counts):
            if self.exit_counts[n] != count:
                self._diverge("instructions", self.exit_counts[n], count, now_text(self.vcpu.run_page, r), rip)
        elif n == len(self.exit_counts) and self.keep_history:
            self.exit_counts.append(count)

    def _give_interrupts(self, seq: int, rip: int) -> None:
        """After a guest exit of a --deterministic recording: the interrupts it was given here."""
        pending = self.interrupts
        if self.next_interrupt >= len(pending):
            return
        first = pending[self.next_interrupt]
        at = self.count_now() if first["clock"] == "insns" else self.exit_base + self.ordinal
        while self.next_interrupt < len(pending):
            irq = pending[self.next_interrupt]
            if irq["at"] > at:
                return
            if irq["at"] < at:
                self._diverge("interrupt", f"vector {irq['vector']:#x} at {irq['clock']} {irq['at']}",
                              f"{irq['clock']} {at} already", "past the interrupt's place", rip, taken=True)
            if irq["rip"] != rip:
                self._diverge("interrupt", f"vector {irq['vector']:#x} at rip {irq['rip']:#x}",
                              f"rip {rip:#x}", "at the interrupt's count", rip, taken=True)
            inject(self.vcpu, irq["vector"])
            self.injected_at_last_exit, self.injected_vector = True, irq["vector"]
            self.next_interrupt += 1

    def _write_rows(self, b: RecordedBatch) -> None:
        if self.writer is None or not b.out_seq:
            return
        import numpy as np
        dtypes = schema.column_dtypes()
        cols = {name: np.array(values, dtype=dtypes[name]) for name, values in b.out.items()}
        raw = b.batch
        self.writer.write_exits(raw.vm, 0, raw.epoch, raw.first_seq, b.out_seq[-1] - raw.first_seq + 1, cols,
                                seq=np.array(b.out_seq, dtype=dtypes[schema.SEQ_COLUMN.name]), payloads=b.out_payloads)
        b.out = {name: [] for name in schema.COLUMN_NAMES}
        b.out_seq, b.out_payloads = [], []

    def _slow_exit(self) -> bytes:
        """A rare exit: what the recording's vCPU loop did for it (the instruction fallbacks) and
        its data field."""
        vcpu = self.vcpu
        exit_ = ex.decode_exit(vcpu.run_page)
        fallback = self.machine.ctx.insn_fallback
        if isinstance(exit_, ex.Shutdown) and fallback is not None:
            fallback.handle_shutdown(vcpu)
        elif isinstance(exit_, ex.InternalError) and exit_.suberror == abi.KVM_INTERNAL_ERROR_EMULATION \
                and fallback is not None:
            fallback.handle(vcpu, exit_.data)
        return exit_.event_data

    def _diverge(self, field, recorded, now, now_text, rip, taken: bool = False):
        """Raise the Divergence at the current recorded exit (`taken`: the one just taken)."""
        b, i = self.batch, self.row - 1 if taken else self.row
        self.now_rip = rip
        cols = b.cols
        recorded_text = schema.describe_exit(int(cols["reason"][i]), int(cols["flags"][i]), int(cols["addr"][i]),
                                             int(cols["size"][i]), int(cols["data"][i]), int(cols["count"][i]))
        rrip = int(cols["rip"][i])
        if rrip != schema.RIP_UNKNOWN:
            recorded_text += f" rip={rrip:#x}"
        raise Divergence(b.seqs[i], field, recorded, now, recorded_text, f"{now_text} rip={rip:#x}")
