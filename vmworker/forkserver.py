"""The worker template: one pre-imported process from which each VM's worker is forked.

    python -m vmworker.forkserver --socket-fd FD --supervisor PID

A fresh `python -m vmworker` spends most of its start-up importing; the template imports everything
a worker imports before it builds a VM once, then forks a worker per request (the forkserver or
zygote pattern), so a worker starts at fork speed and shares the template's pages (copy on write).

The supervisor (supervisor/worker_template.py) talks to it over a SOCK_SEQPACKET unix socket, one
JSON message each way per request:

    template → supervisor   {"ready": true, "pid": N}                       once, after the imports
    supervisor → template   {"spec": …, "env": {…}, "own_group": bool}      + 4 fds (SCM_RIGHTS):
                            result pipe, stdin, stdout, stderr
    template → supervisor   {"pid": WORKER} or {"error": "…"}               (then: spawn instead)

The worker is forked twice (template → intermediate → worker) and the intermediate exits at once,
so the orphaned worker is adopted by the supervisor, which is a child subreaper
(PR_SET_CHILD_SUBREAPER): the worker is the supervisor's own child, like a spawned one — its exit
status comes from waitpid, signals reach a pid that cannot be reused before the supervisor reaps
it, PR_SET_PDEATHSIG (set once adopted) ties it to the supervisor, and the template's death takes
no worker with it. The template itself dies with the supervisor (PR_SET_PDEATHSIG).

Nothing here may start a thread: fork copies only the calling thread, and a lock another thread
held at the fork stays locked forever in the child. Each fork checks /proc/self/task first.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
import time

# Everything a worker imports before it builds a VM (vmworker.__main__ pulls in the VMM, its devices,
# gdb stub and recording), plus what those import lazily on common paths. Not numpy (nor
# tracetool.filters, which imports it): only filtered recording needs it, and OpenBLAS starts a
# thread at import (seen here: /proc/self/task grows to 2), which would make every fork unsafe.
import msgpack  # noqa: F401
import zmq  # noqa: F401  (a Context must never be inherited: each worker makes its own, after the fork)

import tracetool.screen  # noqa: F401
from . import bzimage, multiboot  # noqa: F401
from . import __main__ as worker_main
from . import status
from .devices import vga  # noqa: F401
from .signals import KICK_SIGNAL, PAUSE_SIGNAL, RESUME_SIGNAL

# linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15  # the 16-byte comm (ps, top, /proc/PID/comm)
COMM_BYTES = 15
TEMPLATE_NAME = "vmsup-template"
MAX_REQUEST = 1 << 20  # a spec and an environment: a few KiB
REQUEST_FDS = 4  # result pipe, stdin, stdout, stderr
ADOPTION_TIMEOUT = 5.0

_libc = ctypes.CDLL(None, use_errno=True)


class TemplateError(Exception):
    pass


def _die_with_parent(expected_parent: int) -> bool:
    """SIGKILL when the parent dies; False when it is already gone (or was never `expected_parent`)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return os.getppid() == expected_parent


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def fork_worker(sock: socket.socket, request: dict, fds: list[int], supervisor: int) -> tuple[int, int]:
    """Fork the worker of `request`; (its pid, the write end of its go pipe)."""
    threads = thread_count()
    if threads != 1:
        raise TemplateError(f"{threads} threads alive in the template: forking it is not safe")
    # The worker waits for one byte on `go`, written once the supervisor has its pid: a template
    # killed in between leaves no worker the supervisor does not know (it reads EOF and exits).
    go_read, go_write = os.pipe()
    pid_read, pid_write = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(go_write)
            os.close(pid_read)
            worker = os.fork()
            if worker == 0:
                os.close(pid_write)
                _become_worker(sock, request, fds, go_read, supervisor, threads)
            os.write(pid_write, str(worker).encode())
        finally:
            os._exit(0)  # orphans the worker: the supervisor (a subreaper) adopts it
    os.close(go_read)
    os.close(pid_write)
    with os.fdopen(pid_read, "rb") as f:
        answer = f.read()
    os.waitpid(middle, 0)
    if not answer:
        os.close(go_write)
        raise TemplateError("the worker could not be forked")
    return int(answer), go_write


def _become_worker(sock, request: dict, fds: list[int], go_read: int, supervisor: int, threads: int) -> None:
    """The forked worker: wait to be adopted, take the request's fds, environment and name, run the VM."""
    code = status.EXIT_VM_ERROR
    try:
        sock.close()  # the template's line to the supervisor is not the worker's
        deadline = time.monotonic() + ADOPTION_TIMEOUT
        while os.getppid() != supervisor:  # until the intermediate has exited
            if time.monotonic() > deadline:
                return
            time.sleep(0.0005)
        if not _die_with_parent(supervisor) or os.read(go_read, 1) != b"g":
            return  # the supervisor or the template died before the supervisor knew this worker
        os.close(go_read)
        if request.get("own_group"):
            os.setpgid(0, 0)  # a background worker is out of the terminal's reach, as when spawned
        result_fd, *stdio = fds
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])  # the run's credential among it (tracetool/bus_credentials.py)
        # What a spawned worker starts with (vmworker/__main__.py); its VM installs its own handlers.
        for signum in (signal.SIGTERM, signal.SIGCHLD, KICK_SIGNAL, PAUSE_SIGNAL, RESUME_SIGNAL):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        set_name(f"vm {request['spec'].get('name', '')}")
        # random re-seeds itself in a forked child (random.py registers os.register_at_fork); no zmq
        # Context or socket exists in the template, so the worker's are its own.
        code = worker_main.run_and_report(request["spec"], result_fd, {"forked": True, "template_threads": threads})
    except BaseException as e:  # noqa: BLE001 — a forked child must never return into the template's loop
        try:
            print(f"vmworker (forked): {type(e).__name__}: {e}", file=sys.stderr)
        except Exception:  # noqa: BLE001
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def set_name(name: str) -> None:
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:COMM_BYTES]), 0, 0, 0)


def serve(sock: socket.socket, supervisor: int) -> None:
    set_name(TEMPLATE_NAME)  # once ready, so one can see it is (ps -o comm)
    sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, REQUEST_FDS)
        except OSError:
            return
        if not data:
            return  # the supervisor closed its end: the run is over
        go_write = None
        try:
            if len(fds) != REQUEST_FDS:
                raise TemplateError(f"{len(fds)} fds with the request, expected {REQUEST_FDS}")
            pid, go_write = fork_worker(sock, json.loads(data), fds, supervisor)
            reply = {"pid": pid}
        except (TemplateError, OSError, ValueError, KeyError, TypeError) as e:
            reply = {"error": str(e)}
        finally:
            for fd in fds:
                os.close(fd)
        try:
            sock.send(json.dumps(reply).encode())
            if go_write is not None:
                os.write(go_write, b"g")
        except OSError:
            return
        finally:
            if go_write is not None:
                os.close(go_write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmworker.forkserver",
                                     description="The worker template vmsup forks each VM's worker from.")
    # Started in a process group of its own, out of the terminal's Ctrl-C (supervisor/worker_template.py).
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--supervisor", type=int, required=True, help="the supervisor's pid")
    args = parser.parse_args(argv)
    if not _die_with_parent(args.supervisor):
        return status.EXIT_VM_ERROR
    sock = socket.socket(fileno=args.socket_fd)
    try:
        serve(sock, args.supervisor)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
