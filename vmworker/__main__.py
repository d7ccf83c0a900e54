"""The worker process: `python -m vmworker --spec-json JSON --result-fd FD`.

Runs exactly one VM. Guest console text and (unless quiet) one line per exit go to stdout; the
`RunResult` (or an error) goes to the result fd as one JSON document for the supervisor.
"""

from __future__ import annotations

import signal

# Ctrl-C in the terminal reaches a foreground worker too; until the VM's own handler is in place
# (run_spec), ignore it, so an early one cannot kill the interpreter mid-import.
signal.signal(signal.SIGINT, signal.SIG_IGN)

import argparse  # noqa: E402
import contextlib
import ctypes
import json
import os
import sys
import time

from . import status
from .status import End
from .devices.console import Console
from .devices.i8042 import KEYBOARD_BUFFER
from .devices.keyboard import ClockedKeyScript, KeyFeeder, parse_key_script
from .devices.serial_input import SerialInput
from .devices.standard import StandardDevices
from .errors import GuestImageError, KvmError, SpecError, VmsupError
from .control import WorkerControl
from .exit_log import ExitLog
from .gdb.on_request import StubOnRequest
from .gdb.server import GdbServer
from .image import read_image_file
from .loader import load_image
from .machine import Machine
from . import deterministic
from .recording import Recording
from .screen import ScreenServices
from .signals import GDB_SIGNAL, PAUSE_SIGNAL, RESUME_SIGNAL
from .snapshot import Snapshot, command_handler
from .spec import VmSpec

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies, so a worker is never orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(status.EXIT_VM_ERROR)


def _serial_input(source: str | None, deterministic: bool = False) -> SerialInput:
    if source is None:
        return SerialInput.empty()
    if deterministic:
        return _whole_serial_input(source)
    if source == "-":
        if sys.stdin is None or sys.stdin.closed:
            return SerialInput.empty()
        # The raw (unbuffered) stream: a daemon thread blocked in a BufferedReader holds its lock,
        # and the interpreter aborts at exit trying to take it; a raw read holds no lock.
        return SerialInput.from_stream(sys.stdin.buffer.raw)
    try:
        return SerialInput.from_stream(open(source, "rb", buffering=0))
    except OSError as e:
        raise SpecError(f"serial input {source}: {e.strerror or e}") from None


DETERMINISTIC_SERIAL_LIMIT = 16 << 20  # bytes of serial input a --deterministic VM reads before it starts


def _whole_serial_input(source: str) -> SerialInput:
    """--deterministic: the whole serial input, read before the VM starts, so what the guest finds
    in the UART never depends on when a host read returned. A terminal's typing cannot be had
    that way: none, and one line says so."""
    if source == "-":
        if sys.stdin is None or sys.stdin.closed:
            return SerialInput.empty()
        if sys.stdin.isatty():
            print("vmworker: --deterministic: the terminal's typing does not reach the serial port "
                  "(it would come at host-timed moments); give --serial-in FILE", file=sys.stderr)
            return SerialInput.empty()
        stream = sys.stdin.buffer
    else:
        try:
            stream = open(source, "rb")
        except OSError as e:
            raise SpecError(f"serial input {source}: {e.strerror or e}") from None
    with stream if source != "-" else contextlib.nullcontext(stream):
        try:
            data = stream.read(DETERMINISTIC_SERIAL_LIMIT + 1)
        except OSError as e:
            raise SpecError(f"serial input {source}: {e.strerror or e}") from None
    if len(data) > DETERMINISTIC_SERIAL_LIMIT:
        raise SpecError(f"serial input {source}: --deterministic reads it whole before the VM starts, "
                        f"and it is over {DETERMINISTIC_SERIAL_LIMIT >> 20} MiB")
    return SerialInput.from_bytes(data)


def _type_keys(i8042, key_steps, typed_on=None, det=None) -> KeyFeeder | None:
    """A thread typing the key script (on `typed_on`, which records each press, when given); with
    --deterministic the script is typed at exits on the virtual clock instead (no thread)."""
    if not key_steps:
        return None
    if det is not None:
        det.keys = ClockedKeyScript(typed_on or i8042, key_steps, KEYBOARD_BUFFER)
        return None
    feeder = KeyFeeder(typed_on or i8042, key_steps)
    feeder.start()
    return feeder


def _step_tracers(spec: VmSpec, machine: Machine, recording) -> list:
    """--step-trace: one StepTracer per vCPU, sending on that vCPU's own publisher."""
    if recording is None:
        raise SpecError("--step-trace records into the trace; this VM has no recording")
    from tracetool._alloc import keep_freed_memory
    from .step_trace import StepTracer
    keep_freed_memory()  # each batch's numpy arrays reuse memory instead of faulting in fresh pages
    return [StepTracer(vcpu, machine.memory, publisher, spec.vm_id, spec.epoch, steps=spec.steps,
                       from_exit=spec.from_exit, to_exit=spec.to_exit)
            for vcpu, publisher in zip(machine.vm.vcpus, recording.publishers)]


def _gdb_on_request(spec: VmSpec, machine: Machine, gdb_server, recording) -> StubOnRequest | None:
    """`vmsup gdb VM`: a stub opened on request (GDB_SIGNAL) while the VM runs."""
    if not spec.gdb_request:
        return None

    def make_server(endpoint: str) -> GdbServer:
        if spec.step_trace:
            raise SpecError("this VM is single-stepped by --step-trace; a gdb stub would fight it for the vCPUs")
        server = GdbServer(endpoint, describe=lambda: f"VM {spec.name}: {spec.guest}, {spec.vcpus} vCPU(s)",
                           record=recording.lifecycle if recording else None)
        server.start(machine, wait=False)
        return server

    on_request = StubOnRequest(spec.gdb_request, make_server)
    on_request.server = gdb_server  # --gdb already serves one: a request gets its endpoint
    signal.signal(GDB_SIGNAL, on_request)
    return on_request


def _set_rtc_clock(spec: VmSpec, rtc, det) -> None:
    """The CMOS RTC's time: --deterministic, the virtual clock from rtc_base (fixed: no host time
    reaches the guest); else the host's, moved to start at rtc_base when one is given."""
    if det is not None:
        rtc.clock = det.rtc_clock(deterministic.parse_rtc_base(spec.rtc_base or deterministic.RTC_BASE_DEFAULT))
    elif spec.rtc_base:
        shift = deterministic.parse_rtc_base(spec.rtc_base) - time.time()
        rtc.clock = lambda: time.time() + shift


def run_spec(spec: VmSpec) -> dict:
    """Build and run the VM of `spec`; a JSON-able result, errors included."""
    recording = None
    gdb_server = None
    on_request = None
    control = None
    try:
        spec.validate()
        image = load_image(spec.guest, load_addr=spec.load_addr, entry=spec.entry, mode=spec.mode,
                           boot_entry=spec.boot_entry)
        initrd = read_image_file(spec.initrd) if spec.initrd else None
        key_steps = parse_key_script(spec.keys) if spec.keys else None
        # In-kernel PIC/IOAPIC/LAPIC + PIT: asked for, or by default for a kernel (multiboot, bzImage).
        irqchip = spec.irqchip if spec.irqchip is not None else image.is_kernel
        if spec.deterministic:
            irqchip = False  # its own PIC and PIT (vmworker/deterministic.py)
        out = sys.stdout.buffer
        console = Console(out, line_buffered=not spec.quiet, file_limit=spec.console_limit)
        devices = StandardDevices(console, _serial_input(spec.serial_in, spec.deterministic), mem_size=spec.mem)
        exit_log = None if spec.quiet else ExitLog(out, multi_vcpu=spec.vcpus > 1)
        restored = Snapshot(spec.restore) if spec.restore else None
        if restored is not None:  # refused before any VM exists when it is not this VM's
            restored.check_fits(spec, image.sha256, irqchip)
        if spec.bus_endpoint:
            recording = Recording(spec, image)
            console.on_limit = lambda: recording.lifecycle(
                "console-limit", detail=f"the console file stopped at {console.file_limit} bytes (console_limit)")
            if restored is not None:
                recording.continue_from(restored.parent(), restored.next_seq)
        if spec.gdb:  # bound before the VM exists: a port in use is bad input, and no VM runs
            gdb_server = GdbServer(spec.gdb, describe=lambda: f"VM {spec.name}: {spec.guest}, {spec.vcpus} vCPU(s)",
                                   record=recording.lifecycle if recording else None)
        with Machine(spec.name, image, spec.mem, spec.vcpus, devices.port_bus, devices.mmio_bus,
                     exit_log=exit_log, max_exits=spec.max_exits, timeout=spec.timeout,
                     batchers=recording.batchers if recording else None, irqchip=irqchip,
                     cmdline=spec.cmdline, initrd=initrd, stats_interval=spec.stats_interval,
                     send_stats=recording.kvm_stats if recording else None, coalesce=spec.coalesce) as machine:
            if machine.irqchip:
                devices.connect_irqs(machine.vm)
            if spec.deterministic:  # before a restore: its PIC/PIT and clock are in the snapshot
                machine.ctx.deterministic = deterministic.for_machine(machine, devices.port_bus, recording)
                machine.ctx.deterministic.connect_keyboard(devices.i8042)
            _set_rtc_clock(spec, devices.rtc, machine.ctx.deterministic)
            if restored is not None:
                restored.restore(machine, devices)
                restored = None  # its memory copy is not needed any more
            if spec.step_trace:
                machine.ctx.step_tracers = _step_tracers(spec, machine, recording)
            if recording:
                # Once the VM is stopping, a recorder that takes nothing may not hold it forever.
                recording.set_stopping_check(lambda: machine.ctx.stopping)
            signal.signal(signal.SIGTERM, lambda *_: machine.stop(End.TERMINATED))
            signal.signal(signal.SIGINT, lambda *_: machine.stop(End.INTERRUPTED))
            signal.signal(PAUSE_SIGNAL, lambda *_: machine.pause())
            signal.signal(RESUME_SIGNAL, lambda *_: machine.resume())
            if recording:
                recording.start(machine)
            if gdb_server:
                gdb_server.start(machine, wait=spec.gdb_wait)
            on_request = _gdb_on_request(spec, machine, gdb_server, recording)
            if spec.control_endpoint:  # vmsup snapshot, forwarded by the supervisor
                control = WorkerControl(spec.control_endpoint,
                                        {"worker-snapshot": command_handler(machine, devices, recording, spec, image.sha256)},
                                        lambda: machine.ctx.stopping)
                control.start()
            # The VGA screen sampler and key input (vmworker/screen.py): threads of their own.
            screen = ScreenServices(spec, machine.memory, devices, recording, lambda: machine.ctx.stopping)
            try:
                screen.start()
                feeder = _type_keys(devices.i8042, key_steps, screen.keyboard_for_script(devices.i8042),
                                    machine.ctx.deterministic)
                result = machine.run()
                if machine.ctx.deterministic is not None:
                    machine.ctx.deterministic.finish()  # the last instruction counts reach the trace
                gdb_server = on_request.server if on_request else gdb_server  # `vmsup gdb` may have opened one
                if gdb_server:
                    gdb_server.finish(result.exit_code)
                if feeder is not None:
                    feeder.stop()
            finally:  # its sockets must close before the recording's context ends
                screen_stats = screen.stop()
                if control is not None:  # before the VM's fds close: a snapshot in progress finishes first
                    control.close()
                    control = None
            if recording:
                recording.set_stopping_check(lambda: True)
        console.flush()
        if exit_log is not None:
            exit_log.flush()
        out.flush()
        data = result.to_json()
        data.update(format=image.format, mode=image.mode, sha256=image.sha256)
        data["irqchip"] = irqchip
        if screen_stats:
            data["screen"] = screen_stats
        if recording:
            data["recording"] = recording.end(data)
        return data
    except KvmError as e:
        no_kvm = e.ioctl.startswith("open ")
        return {"status": End.ERROR, "error": str(e),
                "exit_code": status.EXIT_NO_KVM if no_kvm else status.EXIT_VM_ERROR}
    except (GuestImageError, SpecError) as e:
        return {"status": End.ERROR, "error": str(e), "exit_code": status.EXIT_BAD_INPUT}
    except VmsupError as e:
        return {"status": End.ERROR, "error": str(e), "exit_code": status.EXIT_VM_ERROR}
    finally:
        gdb_server = on_request.server if on_request else gdb_server
        if control is not None:
            control.close()
        if gdb_server:
            gdb_server.close()
        if recording:
            recording.close()


def run_and_report(spec_json, result_fd: int | None, started: dict | None = None) -> int:
    """Run the VM of a spec (JSON) and hand its result to the supervisor; the exit code. Shared by
    a spawned worker (main) and one forked from the template (vmworker/forkserver.py)."""
    try:
        spec = VmSpec.from_json(spec_json)
    except (ValueError, TypeError) as e:
        print(f"vmworker: bad --spec-json: {e}", file=sys.stderr)
        return status.EXIT_BAD_INPUT
    result = run_spec(spec)
    if started is not None:
        result["worker_start"] = started
    payload = json.dumps(result).encode()
    if result_fd is not None:
        with os.fdopen(result_fd, "wb") as f:
            f.write(payload)
    else:
        sys.stderr.write(payload.decode() + "\n")
    return int(result.get("exit_code", status.EXIT_VM_ERROR))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmworker", description="Run one VM (started by vmsup).")
    parser.add_argument("--spec-json", required=True, help="the VmSpec as JSON")
    parser.add_argument("--result-fd", type=int, default=None, help="write the result JSON to this fd")
    args = parser.parse_args(argv)
    _die_with_parent()
    try:
        spec_json = json.loads(args.spec_json)
    except ValueError as e:
        print(f"vmworker: bad --spec-json: {e}", file=sys.stderr)
        return status.EXIT_BAD_INPUT
    return run_and_report(spec_json, args.result_fd)


if __name__ == "__main__":
    sys.exit(main())
