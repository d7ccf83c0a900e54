"""A launch: a recorder process and one worker process per VM, from start to summary.

    runtime dir (0700) ─ recorder (python -m supervisor.recorder) ─ trace file
                      └ workers (python -m vmworker), one per VM, PUSHing event batches

Each worker reports its RunResult as JSON on a private pipe. The recorder is asked to `finish`
once every worker has ended, so the trace is closed with its index after the last batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from vmworker import status
from vmworker.errors import VmsupError
from vmworker.spec import VmSpec

from . import runtime
from .recorder import RecorderClient

# A worker ends itself at --timeout; if it is wedged past this grace, the supervisor kills it.
TIMEOUT_GRACE = 5.0
MAX_RESULT_BYTES = 1 << 20  # a result is a few KiB; more means a broken or hostile worker
RECORDER_START_TIMEOUT = 10.0


class LaunchError(VmsupError):
    pass


def worker_command(spec: VmSpec, result_fd: int) -> list[str]:
    return [sys.executable, "-m", "vmworker", "--spec-json", json.dumps(spec.to_json()), "--result-fd", str(result_fd)]


class Worker:
    """One worker process and the thread that collects its result."""

    def __init__(self, spec: VmSpec, stdout=None, stdin=None) -> None:
        self.spec = spec
        self.result: dict | None = None
        self.started = time.monotonic()
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(worker_command(spec, write_fd), pass_fds=(write_fd,), stdout=stdout, stdin=stdin)
        finally:
            os.close(write_fd)
        self._thread = threading.Thread(target=self._collect, args=(read_fd,), name=f"collect-{spec.name}", daemon=True)
        self._thread.start()

    def _collect(self, read_fd: int) -> None:
        chunks, total = [], 0
        with os.fdopen(read_fd, "rb") as pipe:
            while chunk := pipe.read(65536):
                total += len(chunk)
                if total <= MAX_RESULT_BYTES:
                    chunks.append(chunk)
        returncode = self.proc.wait()
        try:
            result = json.loads(b"".join(chunks)) if chunks and total <= MAX_RESULT_BYTES else None
        except ValueError:
            result = None
        if not isinstance(result, dict):
            how = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
            result = {"name": self.spec.name, "status": status.WORKER_DIED,
                      "detail": f"worker ended without a result ({how})", "exit_code": status.EXIT_VM_ERROR,
                      "no_record": True}
        result["wall_seconds"] = time.monotonic() - self.started
        result["worker_returncode"] = returncode
        result.setdefault("name", self.spec.name)
        self.result = result

    @property
    def done(self) -> bool:
        return self.result is not None

    def enforce_timeout(self) -> None:
        """Backstop for a wedged worker: kill it well after its own --timeout."""
        if self.spec.timeout is not None and self.proc.poll() is None:
            if time.monotonic() - self.started > self.spec.timeout + TIMEOUT_GRACE:
                self.proc.kill()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def join(self) -> dict:
        self._thread.join()
        return self.result


def check_trace_path(path: str) -> None:
    """Refuse an unwritable trace path before any VM starts."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise LaunchError(f"trace path {path} is a directory")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise LaunchError(f"cannot create trace directory {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise LaunchError(f"trace path {path} is not writable")


@dataclass
class LaunchOutcome:
    results: list[dict]
    recorder: dict | None = None
    run_id: str = ""
    trace: str | None = None
    notes: list[str] = field(default_factory=list)


class Launch:
    """Start the recorder and the workers; `wait()` until all VMs ended; return the outcome."""

    def __init__(self, specs: list[VmSpec], trace_path: str | None, record: bool = True,
                 console_paths: list[str | None] | None = None, foreground: bool = True,
                 listen: str | None = None, keys_dir: str | None = None) -> None:
        self.specs = specs
        self.listen = listen  # an extra tcp events endpoint (CURVE, keys in keys_dir): supervisor/keys.py
        self.keys_dir = keys_dir
        self.trace_path = trace_path
        self.record = record
        self.console_paths = console_paths or [None] * len(specs)
        self.foreground = foreground
        self.run_dir: runtime.RunDir | None = None
        self.recorder_proc: subprocess.Popen | None = None
        self.workers: list[Worker] = []
        self._signalled = None

    def start(self) -> None:
        self.run_dir = runtime.create_run()
        self.run_dir.write_info({"id": self.run_dir.run_id, "pid": os.getpid(), "started": time.time(),
                                 "trace": self.trace_path, "vms": [s.name for s in self.specs]})
        if self.record:
            self._start_recorder()
        for spec in self.specs:
            spec.bus_endpoint = self.run_dir.events_endpoint if self.record else None
        for spec, console in zip(self.specs, self.console_paths):
            if self.foreground:
                self.workers.append(Worker(spec))
            else:
                out = open(console, "wb") if console else subprocess.DEVNULL
                try:
                    self.workers.append(Worker(spec, stdout=out, stdin=subprocess.DEVNULL))
                finally:
                    if console:
                        out.close()

    def _start_recorder(self) -> None:
        meta = {"run_id": self.run_dir.run_id, "argv": sys.argv, "host": os.uname().nodename,
                "started_wall_ns": time.time_ns(), "vms": [s.to_json() for s in self.specs]}
        cmd = [sys.executable, "-m", "supervisor.recorder", "--run-dir", str(self.run_dir.path),
               "--run-meta", json.dumps(meta)]
        if self.trace_path:
            cmd += ["--trace", self.trace_path]
        if self.listen:
            cmd += ["--listen", self.listen, "--keys-dir", str(self.keys_dir)]
        self.recorder_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = self._read_line(self.recorder_proc.stdout, RECORDER_START_TIMEOUT)
        if line.strip() != b"ready":
            self.recorder_proc.kill()
            self.recorder_proc.wait()
            self.run_dir.remove()
            why = line.decode(errors="replace").strip().removeprefix("error: ") or "the recorder did not start"
            raise LaunchError(why)

    @staticmethod
    def _read_line(stream, timeout: float) -> bytes:
        box: list[bytes] = []
        reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return box[0] if box else b""

    def _on_signal(self, signum, _frame) -> None:
        # Ctrl-C reaches workers from the terminal too; forwarding makes `kill -INT/-TERM` on the
        # supervisor alone work the same. A worker stops its VM and reports (first reason wins).
        self._signalled = signum
        for w in self.workers:
            w.signal(signum)

    def wait(self, on_tick=None, tick: float = 0.5) -> LaunchOutcome:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            next_tick = time.monotonic()
            while not all(w.done for w in self.workers):
                time.sleep(0.05)
                for w in self.workers:
                    w.enforce_timeout()
                if on_tick is not None and time.monotonic() >= next_tick:
                    on_tick(self)
                    next_tick = time.monotonic() + tick
            results = [w.join() for w in self.workers]
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        outcome = LaunchOutcome(results=results, run_id=self.run_dir.run_id, trace=self.trace_path)
        if self.recorder_proc is not None:
            outcome.recorder = self._finish_recorder(results)
        self.run_dir.remove()
        return outcome

    def recorder_stats(self) -> dict | None:
        if self.recorder_proc is None or self.recorder_proc.poll() is not None:
            return None
        client = RecorderClient(self.run_dir, timeout=1.0)
        try:
            return client.call("stats")
        finally:
            client.close()

    def _finish_recorder(self, results: list[dict]) -> dict | None:
        ended = [{"vm": spec.vm_id, "epoch": spec.epoch, "name": spec.name, "status": r["status"],
                  "detail": r.get("detail", ""), "final_seq": None}
                 for spec, r in zip(self.specs, results) if r.get("no_record") or r.get("status") == status.ERROR]
        client = RecorderClient(self.run_dir, timeout=30.0)
        try:
            stats = client.call("finish", ended_without_record=ended)
        finally:
            client.close()
        try:
            self.recorder_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.recorder_proc.kill()
            self.recorder_proc.wait()
        return stats
