"""The supervisor's side of the worker template (vmworker/forkserver.py): start it, fork workers
from it, and fall back to a plain spawn whenever it is not there.

The supervisor becomes a child subreaper (PR_SET_CHILD_SUBREAPER), so a worker forked by the
template is adopted by the supervisor and is its child like a spawned one: `AdoptedWorker` waits for
it and signals it as subprocess.Popen does. A template that died is restarted and is used again once
it says it is ready; until then workers are spawned. Only the thread that started the template may
call `fork` (the template's PR_SET_PDEATHSIG watches that thread).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
START_TIMEOUT = 10.0  # a first template slower than this to import: spawn meanwhile
REPLY_TIMEOUT = 5.0
MAX_REPLY = 4096


def become_subreaper() -> None:
    """Orphaned descendants (the forked workers) become our children rather than init's."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class AdoptedWorker:
    """A child the supervisor did not start itself (adopted): the part of Popen's interface a
    Worker uses — pid, returncode, poll, wait, send_signal, kill."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        if self.returncode is None and self._lock.acquire(blocking=False):
            try:  # a blocked wait() holds the lock: then it is still running
                if self.returncode is None:
                    pid, wstatus = os.waitpid(self.pid, os.WNOHANG)
                    if pid:
                        self.returncode = os.waitstatus_to_exitcode(wstatus)
            except ChildProcessError:
                pass
            finally:
                self._lock.release()
        return self.returncode

    def wait(self) -> int:
        with self._lock:
            if self.returncode is None:
                _, wstatus = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(wstatus)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _fd_of(stream, own: int, opened: list[int]) -> int:
    """The fd a Popen-style stdin/stdout argument stands for (None: the supervisor's own)."""
    if stream is None:
        return own
    if stream == subprocess.DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR)
        opened.append(fd)
        return fd
    return stream if isinstance(stream, int) else stream.fileno()


class WorkerTemplate:
    """The template process and the socket to it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._ready_by = 0.0
        self.restarts = 0
        self.forked = 0
        self.spawned = 0  # workers started by the fallback while the template was missing

    def start(self) -> None:
        become_subreaper()
        self._launch(wait=START_TIMEOUT)

    def _launch(self, wait: float) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmworker.forkserver", "--socket-fd", str(theirs.fileno()),
                 "--supervisor", str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                process_group=0)  # the terminal's Ctrl-C is the supervisor's, as for background workers
        except OSError:
            ours.close()
            self.proc = None
            return
        finally:
            theirs.close()
        self._sock, self._ready, self._ready_by = ours, False, time.monotonic() + wait

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _alive(self) -> bool:
        """Whether the template can take a request now; a dead one is restarted for later ones."""
        if self.proc is None:
            return False
        if self.proc.poll() is not None:
            self._drop()
            self.restarts += 1
            self._launch(wait=0.0)  # in the background: workers are spawned until it is ready
            return False
        if not self._ready:
            if not select.select([self._sock], [], [], max(0.0, self._ready_by - time.monotonic()))[0]:
                return False
            try:
                self._ready = json.loads(self._sock.recv(MAX_REPLY)).get("ready") is True
            except (OSError, ValueError, AttributeError):
                self._ready = False
        return self._ready

    def fork(self, spec_json: dict, result_fd: int, stdin=None, stdout=None, env: dict | None = None,
             own_group: bool = False) -> AdoptedWorker | None:
        """A worker forked from the template, or None: the caller spawns one instead."""
        if not self._alive():
            self.spawned += 1
            return None
        opened: list[int] = []
        try:
            fds = [result_fd, _fd_of(stdin, 0, opened), _fd_of(stdout, 1, opened), 2]
            request = {"spec": spec_json, "env": dict(os.environ if env is None else env), "own_group": own_group}
            socket.send_fds(self._sock, [json.dumps(request).encode()], fds)
            if not select.select([self._sock], [], [], REPLY_TIMEOUT)[0]:
                raise OSError("the worker template did not answer")
            reply = json.loads(self._sock.recv(MAX_REPLY) or b"{}")
        except (OSError, ValueError):
            reply = {}
        finally:
            for fd in opened:
                os.close(fd)
        if not isinstance(reply, dict) or not isinstance(reply.get("pid"), int):
            # A template that died mid-request (EOF) is restarted at the next call; one that
            # refused (reply["error"]) stays for the next.
            self.spawned += 1
            return None
        self.forked += 1
        return AdoptedWorker(reply["pid"])

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ready = False

    def close(self) -> None:
        """End the template: EOF on its socket, SIGKILL if it does not go."""
        self._drop()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=REPLY_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
