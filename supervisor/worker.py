"""One worker process (python -m vmworker, or forked from the worker template) and the thread
that collects its result: the JSON document it writes on a private pipe when its VM ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from tracetool.bus_credentials import CREDENTIAL_ENV, Credential
from vmworker import status
from vmworker.publisher import STOPPING_SEND_TIMEOUT
from vmworker.recording import DRAIN_BOUND
from vmworker.spec import VmSpec
from vmworker.status import End

from .worker_template import WorkerTemplate

# A worker ends itself at --timeout; if it is wedged past this grace, the supervisor kills it.
# Beyond the worker's own end: a send to a stalled recorder given up on (publisher.STOPPING_SEND_TIMEOUT),
# then the wait for its queued batches to reach the recorder (recording.DRAIN_BOUND).
TIMEOUT_GRACE = 5.0 + STOPPING_SEND_TIMEOUT + DRAIN_BOUND
MAX_RESULT_BYTES = 1 << 20  # a result is a few KiB; more means a broken or hostile worker


def worker_command(spec: VmSpec, result_fd: int) -> list[str]:
    return [sys.executable, "-m", "vmworker", "--spec-json", json.dumps(spec.to_json()), "--result-fd", str(result_fd)]


class Worker:
    """One worker process and the thread that collects its result."""

    def __init__(self, spec: VmSpec, stdout=None, stdin=None, own_group: bool = False,
                 credential: Credential | None = None, template: WorkerTemplate | None = None) -> None:
        self.spec = spec
        self.result: dict | None = None
        self.started = time.monotonic()
        read_fd, write_fd = os.pipe()
        try:
            # own_group: a background worker is out of the terminal's reach (Ctrl-C goes to the
            # supervisor, which stops it in order); a foreground one shares the terminal for stdin.
            env = None if credential is None else {**os.environ, CREDENTIAL_ENV: credential.hex()}
            # Forked from the worker template when there is one (supervisor/worker_template.py),
            # else spawned: the same worker, with the same fds, environment and process group.
            forked = template.fork(spec.to_json(), write_fd, stdin=stdin, stdout=stdout, env=env,
                                   own_group=own_group) if template is not None else None
            self.proc = forked or subprocess.Popen(worker_command(spec, write_fd), pass_fds=(write_fd,), stdout=stdout,
                                                   stdin=stdin, process_group=0 if own_group else None, env=env)
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
            result = {"name": self.spec.name, "status": End.WORKER_DIED,
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
