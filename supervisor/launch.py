"""Run one VM in its own worker process (`python -m vmworker`) and collect its result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from vmworker import status
from vmworker.spec import VmSpec

# A worker ends itself at --timeout; if it is wedged past this grace, the supervisor kills it.
TIMEOUT_GRACE = 5.0
MAX_RESULT_BYTES = 1 << 20  # a result is a few KiB; more means a broken or hostile worker


def worker_command(spec: VmSpec, result_fd: int) -> list[str]:
    return [sys.executable, "-m", "vmworker", "--spec-json", json.dumps(spec.to_json()), "--result-fd", str(result_fd)]


def run_worker(spec: VmSpec, stdin=None) -> dict:
    """Start the worker, wait for it, return its result (or a worker-died / timeout result)."""
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    try:
        proc = subprocess.Popen(worker_command(spec, write_fd), pass_fds=(write_fd,), stdin=stdin)
    finally:
        os.close(write_fd)
    # Ctrl-C reaches the worker too (same process group); it stops its VM and reports. Wait for it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        chunks = []
        total = 0
        with os.fdopen(read_fd, "rb") as pipe:
            while chunk := pipe.read(65536):
                total += len(chunk)
                if total <= MAX_RESULT_BYTES:
                    chunks.append(chunk)
        deadline = None if spec.timeout is None else spec.timeout + TIMEOUT_GRACE
        try:
            returncode = proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    wall = time.monotonic() - started
    try:
        result = json.loads(b"".join(chunks)) if chunks and total <= MAX_RESULT_BYTES else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        result = {"name": spec.name, "status": status.WORKER_DIED, "detail": f"worker ended without a result ({how})",
                  "exit_code": status.EXIT_VM_ERROR}
    result["wall_seconds"] = wall
    result["worker_returncode"] = returncode
    return result
