"""The vCPU thread: KVM_RUN, decode the exit, hand it to a device, repeat.

This is the hot path: an exit round trip costs ~12 µs here, so per exit it does one ioctl, one
precompiled read of the kvm_run mmap (exits.read_head), a dispatch on the exit reason and a device
call. No per-exit objects, no logging unless the VM prints exits. Exits other than IO, MMIO and
HLT are decoded to typed exits by exits.decode_exit and handled generically. Everything that ends the VM goes through `VcpuContext.stop`,
which kicks the other vCPUs out of KVM_RUN.
"""

from __future__ import annotations

import fcntl
import time

from . import kvm_abi as abi
from . import exits as ex
from .devices.bus import StopVm
from .event_batch import ROW
from .status import End

_KVM_RUN = abi.KVM_RUN
_EXIT_IO = abi.KVM_EXIT_IO
_EXIT_MMIO = abi.KVM_EXIT_MMIO
_EXIT_HLT = abi.KVM_EXIT_HLT
_EXIT_INTR = abi.KVM_EXIT_INTR
_EXIT_DEBUG = abi.KVM_EXIT_DEBUG
_IO_OUT = abi.KVM_EXIT_IO_OUT
_NEVER = float("inf")


class VcpuStats:
    """What one vCPU thread did; read by the machine after the thread ends."""

    __slots__ = ("exits", "kicks", "first_run", "last_exit", "halted", "by_reason")

    def __init__(self) -> None:
        self.exits = 0
        self.kicks = 0
        self.first_run = 0.0  # perf_counter() just before the first KVM_RUN
        self.last_exit = 0.0  # perf_counter() just after the last exit
        self.halted = False
        self.by_reason: dict[int, int] = {}


def run_vcpu(vcpu, ctx, stats: VcpuStats, batcher=None) -> None:
    """Loop on KVM_RUN until the VM stops or this vCPU halts. `ctx` is the machine's VcpuContext.

    With a `batcher`, every return of KVM_RUN (kicks included, as the kernel counts them) is
    packed as one event row: exit time, time in the guest, and the exit's fields.
    """
    fd = vcpu.fd
    run = vcpu.run_page
    vcpu_id = vcpu.id
    ioctl = fcntl.ioctl
    clock = time.perf_counter
    now_ns = time.monotonic_ns
    # One read gives the exit reason and, for the common IO exit, its fields (meaningless for
    # other reasons, and then not used): exits.read_head, bound here to save a call per exit.
    exit_at = ex.HEAD.unpack_from
    reason_off = ex.EXIT_REASON_OFFSET
    port_write = ctx.port_bus.write
    # The bus's cache of claimed ports, used directly so a port write costs one Python call
    # (the device's) instead of two; misses and unclaimed ports take the bus's own path.
    port_claimant = ctx.port_bus.claimant_cache().get
    port_read = ctx.port_bus.read
    log = ctx.exit_log
    # --max-exits: one vCPU counts locally (exact, one compare per exit); several share an
    # atomic counter, consulted on every exit.
    budget = ctx.exit_budget
    limit = ctx.max_exits
    check_at = _NEVER if limit is None else (limit if budget is None else 0)
    by_reason = stats.by_reason
    io_exits = 0  # counted apart from by_reason, which a dict update would slow on the hot path
    n = 0
    recording = batcher is not None
    if recording:
        ex.sync_exit_registers(run)  # every event records the guest's address: exits.linear_rip, inlined
        sync_at = ex.SYNC_ADDRESS.unpack_from
        rip_off = ex.RIP_OFFSET
        linear_32 = ex.LINEAR_32
        rows = batcher.rows
        pack_row = ROW.pack_into
        row_size = ROW.size
        rows_end = len(rows)
        flush_ns = batcher.flush_ns
    pos = 0
    flush_at = now_ns() + (flush_ns if recording else 0)
    # --step-trace (vmworker/step_trace.py): its single steps are rows of their own, not exits.
    tracer = ctx.step_tracers[vcpu_id] if recording and ctx.step_tracers else None
    if tracer is not None and tracer.starts_at_entry():
        tracer.arm(from_sync=False)
    # --coalesce (vmworker/coalesce.py): writes KVM queued instead of exiting reach their device
    # before this exit is handled, so they keep their order with the exit's own access.
    coalesced = ctx.coalesced
    if coalesced is not None:
        drain, sink = coalesced.drain, batcher.add_coalesced if recording else None
    # --deterministic (vmworker/deterministic.py): interrupts injected after guest exits only.
    det = ctx.deterministic
    if det is not None:
        ex.sync_exit_registers(run)

    stats.first_run = clock()
    try:
        while True:
            t0 = now_ns()
            try:
                ioctl(fd, _KVM_RUN, 0)
            except InterruptedError:
                # A kick (signal + immediate_exit): not a guest exit, but a return the kernel counts.
                t1 = now_ns()
                stats.kicks += 1
                if coalesced is not None:
                    drain(sink, pos, vcpu_id)
                if recording:
                    rip, cs_base, cs_l = sync_at(run, rip_off)  # the kernel syncs them on EINTR too
                    rip = rip if cs_l else (cs_base + rip) & linear_32
                    pack_row(rows, pos, t1, t1 - t0, 0, b"", 1, _EXIT_INTR, 0, 0, rip)
                    pos += row_size
                    # Paused or held by gdb: what it did so far reaches the recorder before it waits.
                    if (pos >= rows_end or t1 >= flush_at or ctx.paused
                            or (ctx.debugger is not None and ctx.debugger.holds(vcpu_id))):
                        batcher.flush(pos)
                        pos = 0
                        flush_at = t1 + flush_ns
                if _after_kick(vcpu, ctx):
                    break
                if ctx.halt_probe is not None:  # halt_watch asks whether this vCPU sleeps for good
                    stats.halted = ctx.halt_probe.answer(vcpu)
                continue
            except BlockingIOError:
                # EAGAIN: an AP the in-kernel LAPIC held for INIT/SIPI woke with one of them
                # (KVM_RUN of a vCPU in KVM_MP_STATE_UNINITIALIZED returns it, arch/x86/kvm/x86.c);
                # entering again runs it from the STARTUP vector or blocks it until one comes.
                continue
            t1 = now_ns()
            if coalesced is not None:
                drain(sink, pos, vcpu_id)
            reason, direction, size, addr, count, data_offset = exit_at(run, reason_off)
            if reason == _EXIT_DEBUG and tracer is not None and tracer.active:
                tracer.step()
                continue
            n += 1
            stop = None
            done = False
            if reason == _EXIT_IO:
                io_exits += 1
                try:
                    if direction == _IO_OUT:
                        flags = 1
                        if count == 1:
                            data = run[data_offset:data_offset + size]
                            hit = port_claimant(addr)
                            if hit is None:
                                port_write(addr, data)
                            else:
                                hit[1].write(addr - hit[0], data)
                        else:
                            data = run[data_offset:data_offset + size * count]
                            for i in range(0, size * count, size):
                                port_write(addr, data[i:i + size])
                    else:
                        flags = 0
                        data = b""
                        if count == 1:
                            data = port_read(addr, size)
                        else:
                            data = b"".join([port_read(addr, size) for _ in range(count)])
                        run[data_offset:data_offset + size * count] = data
                except StopVm as e:
                    stop = e
                if log is not None:
                    log.io(vcpu_id, flags == 1, addr, size, count, data)
                if count != 1:
                    if recording:
                        batcher.add_payload(pos, data)
                    data = data[:size]
            else:
                by_reason[reason] = by_reason.get(reason, 0) + 1
                if reason == _EXIT_MMIO:
                    addr, data, flags = 0, b"", 0
                    try:
                        addr, data, flags = _mmio(run, ctx)
                    except StopVm as e:
                        stop = e
                    size, count = len(data), 1
                    if log is not None:
                        log.mmio(vcpu_id, flags == 1, addr, data)
                else:
                    addr, data, count, size, flags = 0, b"", 1, 0, 0
                    if reason == _EXIT_HLT:
                        if log is not None:
                            log.event(vcpu_id, "hlt")
                        stats.halted = done = True
                    else:
                        done, data = _slow_exit(vcpu, ctx, log)
                        if recording and ctx.insn_fallback is not None and ctx.insn_fallback.performed:
                            batcher.add_emulated(pos, ctx.insn_fallback.take_performed())  # their own rows
            if recording:
                if pos == 0:
                    batcher.pending_since = t1  # lets the machine kick a quiet vCPU to flush
                rip, cs_base, cs_l = sync_at(run, rip_off)
                rip = rip if cs_l else (cs_base + rip) & linear_32
                pack_row(rows, pos, t1, t1 - t0, addr, data, count, reason, size, flags, rip)
                pos += row_size
                if tracer is not None:
                    tracer.after_exit(batcher.next_seq + pos // row_size - 1, ctx,
                                      (reason == _EXIT_IO or reason == _EXIT_MMIO) and not done and stop is None)
                if pos >= rows_end or t1 >= flush_at:
                    batcher.flush(pos)
                    pos = 0
                    flush_at = t1 + flush_ns
            if ctx.debugger is not None and stop is None and (reason == _EXIT_IO or reason == _EXIT_MMIO):
                # gdb's stepi over an I/O instruction ends here; `monitor catch mmio` stops here
                ctx.debugger.after_io(vcpu, (addr, data, flags) if reason == _EXIT_MMIO else None)
            if det is not None and stop is None and (not done or reason == _EXIT_HLT):
                asleep = det.after_exit(vcpu, ex.linear_rip(run), reason == _EXIT_HLT)
                if reason == _EXIT_HLT:
                    stats.halted = done = asleep
            if stop is not None:
                ctx.stop(stop.reason, code=stop.code, detail=stop.detail)
                break
            if done:
                break
            if n >= check_at and (budget is None or next(budget) + 1 >= limit):
                ctx.stop(End.MAX_EXITS)
                break
    except OSError as e:
        ctx.stop(End.VMM_ERROR, detail=f"KVM_RUN on vcpu {vcpu_id} failed: {e.strerror or e}", vcpu=vcpu)
    finally:
        stats.last_exit = clock()
        stats.exits = n
        if io_exits:
            by_reason[_EXIT_IO] = by_reason.get(_EXIT_IO, 0) + io_exits
        if tracer is not None:
            tracer.finish()
        if recording:
            batcher.flush(pos, final=True)  # a record-time filter's held-back row too


def _after_kick(vcpu, ctx) -> bool:
    """Decide what a kick meant: stop (True), or go on — after a pause, if one is requested."""
    while True:
        if ctx.stopping:
            return True
        if ctx.paused:
            ctx.wait_while_paused()
            continue
        debugger = ctx.debugger  # a gdb stub (vmworker/gdb/control.py) parks stopped vCPUs here
        if debugger is not None and debugger.holds(vcpu.id):
            debugger.park(vcpu)
            continue
        vcpu.set_immediate_exit(False)
        # A stop or pause requested between the checks above and clearing immediate_exit would be
        # lost (its signal already came and went): re-arm and look again.
        if ctx.stopping or ctx.paused or (debugger is not None and debugger.holds(vcpu.id)):
            vcpu.set_immediate_exit(True)
            continue
        return False


def _mmio(run, ctx) -> tuple[int, bytes, int]:
    """Serve an MMIO exit; returns (address, data, is_write)."""
    addr, data, length, is_write = ex.mmio_fields(run)
    if is_write:
        data = data[:length]
        ctx.mmio_bus.write(addr, data)
    else:
        data = ctx.mmio_bus.read(addr, length)
        run[ex.MMIO_DATA_OFFSET:ex.MMIO_DATA_OFFSET + length] = data
    return addr, data, 1 if is_write else 0


def _slow_exit(vcpu, ctx, log) -> tuple[bool, bytes]:
    """Rare exits, decoded to a typed exit: (whether this vCPU must stop, the event's data field).

    Three exits have a special case here; every other one ends the VM or not as its type says
    (exits.py), so a new exit reason needs no change in this file.
    """
    exit_ = ex.decode_exit(vcpu.run_page)
    if log is not None:  # every exit is printed, the ones a fallback or gdb takes too
        log.event(vcpu.id, exit_.log_text())
    detail_suffix = ""
    match exit_:
        case ex.Shutdown():
            # A ring-3 INT n, which this host reports as a shutdown (vmworker/emulate/fallback.py).
            if ctx.insn_fallback is not None and ctx.insn_fallback.handle_shutdown(vcpu):
                return False, exit_.event_data
        case ex.InternalError(suberror=sub, data=data):
            # An int3 gdb planted: checked before any fallback, which must never swallow it.
            if ctx.debugger is not None and ctx.debugger.breakpoint_hit(vcpu, sub):
                return False, exit_.event_data
            fallback = ctx.insn_fallback
            if sub == abi.KVM_INTERNAL_ERROR_EMULATION and fallback is not None:
                if fallback.handle(vcpu, data):  # INT n, IRET, FWAIT, x87: vmworker/emulate/
                    return False, exit_.event_data
                detail_suffix = f"; not done by vmsup either: {fallback.last_refusal}"
        case ex.Debug():
            if ctx.debugger is not None:
                ctx.debugger.debug_exit(vcpu, exit_)
    ending = exit_.ending()
    if ending is None:
        return False, exit_.event_data
    end, detail = ending
    ctx.stop(end, detail=detail + detail_suffix, vcpu=vcpu)
    return True, exit_.event_data
