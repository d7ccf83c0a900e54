"""Re-execution of a recorded VM: run it again from its trace and compare every exit.

`python -m vmworker.rerun TRACE [--vm ID] [--to-seq SEQ] [--trace OUT] [--gdb [HOST:]PORT]` (what
`vmtrace rerun` starts: a fresh worker process). The recording is read by rerun_recording.py, the
machine built and driven along the recorded exits by rerun_loop.py (`Replay`): every value the
guest read from outside comes from the trace and every exit it makes is compared with the
recorded one. The first difference ends the rerun with the registers and the instruction at the
guest's address; otherwise the rerun ends after the last recorded exit ("identical").

What the guest sees that no trace can hold: RDTSC (no exit on this host), and interrupts of the
in-kernel PIT/PIC (host-timed). A VM recorded with the in-kernel irqchip reruns until its timing
differs, and the divergence says so.

With `--gdb` the rerun stops before exit SEQ (or at the start) and the gdb stub (vmworker/gdb/)
serves there, on this thread's vCPU: gdb reads and steps, continues forward (inputs still fed
from the trace, exits still compared: a divergence is a stop with the reason as console output;
the end of the recording is a `replaylog:end` stop), and runs backwards (rerun_travel.py).

The result is one JSON document on stdout; exit code 0 identical, 1 diverged, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from tracetool.trace import TraceError

from .errors import GuestImageError, KvmError, SpecError, VmsupError
from .gdb.control import SIGTRAP, Stop
from .gdb.server import GdbServer
from .machine import register_dump
from .recording import cpuid_table
from .rerun_loop import END, IRQCHIP_CAUSE, STOPPED, Replay
from .rerun_stops import Divergence, TravelRequest, VmEnded, as_hex
from .rerun_recording import RerunInputError, image_file, open_recording
from .rerun_travel import END_OF_LOG, TimeTravel

EXIT_IDENTICAL, EXIT_DIVERGED, EXIT_BAD_INPUT = 0, 1, 2


def rerun(path: str, vm: int | None = None, to_seq: int | None = None, out: str | None = None,
          gdb: str | None = None, announce=lambda line: None) -> dict:
    """Rerun VM `vm` of the trace at `path`; the result document (see the module's docstring).
    With `gdb` ([HOST:]PORT) a stub serves the rerun; `announce(line)` says where, once it does."""
    rec = open_recording(path, vm)
    if gdb is not None and out is not None:
        raise RerunInputError("--gdb and --trace together: a rerun that gdb moves back and forth is not recorded")
    server = GdbServer(gdb) if gdb is not None else None  # bound now: a port in use is one line, before the run
    try:
        with tempfile.TemporaryDirectory(prefix="vmsup-rerun-") as scratch:
            job = Replay(rec, image_file(rec, scratch), out, keep_history=server is not None)
            try:
                return _run(job, to_seq, server, announce)
            finally:
                job.close()
                rec.reader.close()
    finally:
        if server is not None:
            server.close()


def _run(job: Replay, to_seq: int | None, server: GdbServer | None, announce) -> dict:
    rec, vcpu = job.rec, job.vcpu
    notes = []
    if rec.reader.torn_tail is not None:
        notes.append("the trace has a torn tail: rerun up to its last whole block")
    recorded_cpuid = rec.image_record.get("cpuid")
    if recorded_cpuid is not None and recorded_cpuid != cpuid_table(job.machine.kvm):
        notes.append("this host's CPUID table differs from the recording's: the guest may see other features")
    job.start()
    started = time.perf_counter()
    stopped_at = None
    divergence = None
    travel = None
    try:
        if server is None:
            if job.advance(to_seq=to_seq) == STOPPED:
                stopped_at = job.seq_next()
                vcpu.complete_pending_io()  # the registers after the last exit's instruction, as gdb sees them
        else:
            travel = TimeTravel(job, None)
            notes += _serve_gdb(job, travel, server, to_seq, announce)
    except Divergence as d:
        divergence = d
    finally:
        job.finish()
    seconds = time.perf_counter() - started
    result = {"trace": rec.reader.path, "vm": rec.vm, "epoch": rec.epoch, "exits": job.ordinal,
              "seconds": seconds, "exits_per_second": job.ordinal / seconds if seconds > 0 else 0.0,
              "insn_count_exact": job.counter is not None, "notes": notes}
    if job.counter is not None:
        result["instructions"] = job.count_now()
    if travel is not None:
        result["gdb"] = f"{server.host}:{server.port}"
        result["checkpoints"] = len(travel.checkpoints)
        result["checkpoint_bytes"] = travel.memory_bytes()
        result["restores"] = travel.restores
    if divergence is not None:
        d = divergence
        result.update(identical=False, seq=d.seq, field=d.field, recorded=as_hex(d.recorded), now=as_hex(d.now),
                      recorded_exit=d.recorded_exit, now_exit=d.now_exit)
        result["registers"] = register_dump(vcpu)
        result["instruction"] = _instruction_at(job, job.now_rip)
        result["cause"] = IRQCHIP_CAUSE if job.irqchip else None
    else:
        result["identical"] = True
        if stopped_at is not None:
            result["stopped_before_seq"] = stopped_at
            result["registers"] = register_dump(vcpu)
    if server is not None:
        server.finish(EXIT_IDENTICAL if divergence is None else EXIT_DIVERGED)
    return result


def _serve_gdb(job: Replay, travel: TimeTravel, server: GdbServer, to_seq: int | None, announce) -> list[str]:
    """Run to the stop, let gdb drive until it detaches (then run on to the end) or kills the VM."""
    if to_seq is not None:
        job.advance(to_seq=to_seq)
    server.start(job.machine, wait=True)  # the next entry parks the vCPU until gdb says otherwise
    dbg = job.debugger = server.debugger
    dbg.travel, travel.dbg = travel, dbg
    seq = job.seq_next()
    where = f"before seq {seq}" if seq is not None else "at the end of the recording"
    announce(f"rerun: stopped {where} (exit {job.ordinal:,}, instruction {job.count_now():,}); "
             f"gdb stub on {server.host}:{server.port}: gdb -ex 'target remote {server.host}:{server.port}'")
    diverged: Divergence | None = None
    try:
        while True:
            try:
                if diverged is not None:  # nothing runs forward from a divergence; backwards does
                    job.park_for_gdb()
                    if not dbg.attached:
                        raise diverged
                    dbg.notes.append(diverged.line())
                    dbg.report(Stop(0, SIGTRAP))
                    continue
                if job.advance() == END:
                    if not dbg.attached:
                        return []
                    dbg.report(Stop(0, SIGTRAP, END_OF_LOG))
                    job.park_for_gdb()
            except TravelRequest as request:
                diverged = None
                travel.serve(request.kind)
            except Divergence as d:
                if not dbg.attached:
                    raise
                diverged = d
                dbg.notes.append(d.line())
                dbg.report(Stop(0, SIGTRAP))
    except VmEnded:
        return ["killed from gdb"]


def _instruction_at(job: Replay, linear: int) -> dict:
    """The instruction at a guest linear address, disassembled (iced-x86) in the vCPU's mode."""
    vcpu = job.vcpu
    sregs = vcpu.get_sregs()
    bitness = 64 if sregs.cs.l else 32 if sregs.cs.db else 16
    info = {"address": linear, "bitness": bitness}
    try:
        gpa = vcpu.translate(linear)
        memory = job.machine.memory
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmworker.rerun", description="Rerun a recorded VM.")
    parser.add_argument("trace")
    parser.add_argument("--vm", type=int, default=None)
    parser.add_argument("--to-seq", type=int, default=None)
    parser.add_argument("--trace", dest="out", default=None)
    parser.add_argument("--gdb", default=None)
    args = parser.parse_args(argv)

    def announce(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    try:
        result = rerun(args.trace, args.vm, args.to_seq, args.out, args.gdb, announce)
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
