"""Per-run runtime directories: where a run's sockets and metadata live, private to its owner.

    $XDG_RUNTIME_DIR/vmsup/<run id>/     (or /tmp/vmsup-<uid>/<run id>/ without XDG_RUNTIME_DIR)
        run.json        what the run is: id, pid, start time, trace path, VMs
        events.sock     ZeroMQ PULL: workers push event batches to the recorder (lossless)
        live.sock       ZeroMQ PUB: the recorder republishes them for tail/top (best effort)
        recorder.sock   ZeroMQ REP: the recorder's control socket (stats, finish)
        control.sock    ZeroMQ REP: the supervisor's control socket (vmsup ps/stop/pause/resume/kill)

Directories are created 0700 and checked to be ours, so no other user can reach the sockets
(ipc sockets are files: the directory's permissions are the access control).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from vmworker.errors import VmsupError


class RuntimeDirError(VmsupError):
    pass


def base_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "vmsup"
    return Path("/tmp") / f"vmsup-{os.getuid()}"


def _denied(path: Path) -> RuntimeDirError:
    return RuntimeDirError(f"cannot use runtime dir {path}: permission denied (not yours; "
                           "check XDG_RUNTIME_DIR)")


def _private_dir(path: Path) -> Path:
    try:
        try:
            path.mkdir(mode=0o700, parents=False, exist_ok=True)
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except PermissionError:
        raise _denied(path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeDirError(f"runtime dir {path} is not a directory")
    if st.st_uid != os.getuid():
        raise RuntimeDirError(f"runtime dir {path} belongs to uid {st.st_uid}, not to you: refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists (someone else's counts: we may not signal it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunDir:
    run_id: str
    path: Path

    @property
    def events_endpoint(self) -> str:
        return f"ipc://{self.path / 'events.sock'}"

    @property
    def live_endpoint(self) -> str:
        return f"ipc://{self.path / 'live.sock'}"

    @property
    def recorder_endpoint(self) -> str:
        return f"ipc://{self.path / 'recorder.sock'}"

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.path / 'control.sock'}"

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    def write_info(self, info: dict) -> None:
        tmp = self.path / "run.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.info_path)

    def read_info(self) -> dict:
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def create_run() -> RunDir:
    """A new private run directory; its id is short enough to type (`--run ID`)."""
    base = _private_dir(base_dir())
    cleanup_stale(base)
    stamp = time.strftime("%H%M%S")
    run_id = f"{stamp}-{os.getpid()}"
    path = _private_dir(base / run_id)
    return RunDir(run_id, path)


def cleanup_stale(base: Path | None = None) -> list[str]:
    """Remove run dirs whose supervisor is gone (a killed run leaves one behind); their ids."""
    base = base or base_dir()
    removed = []
    for entry in _run_entries(base):
        info = RunDir(entry.name, entry).read_info()
        pid = info.get("pid")
        if isinstance(pid, int) and pid_alive(pid):
            continue
        if not isinstance(pid, int) and time.time() - entry.stat().st_mtime < 10:
            continue  # being created right now
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


def _run_entries(base: Path) -> list[Path]:
    """The run directories under `base` (none if it does not exist yet). Raises RuntimeDirError
    when `base` is another user's (XDG_RUNTIME_DIR pointing at theirs): Path.is_dir() lets
    EACCES through, and no caller should meet a PermissionError."""
    try:
        if not base.is_dir():
            return []
        return [entry for entry in base.iterdir() if entry.is_dir()]
    except PermissionError:
        raise _denied(base) from None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # a run that ended while we listed the dir
        return 0.0


def live_runs() -> list[RunDir]:
    """Runs whose supervisor is alive, oldest first."""
    runs = []
    for entry in sorted(_run_entries(base_dir()), key=_mtime):
        rd = RunDir(entry.name, entry)
        pid = rd.read_info().get("pid")
        if isinstance(pid, int) and pid_alive(pid):
            runs.append(rd)
    return runs


def find_run(run_id: str | None) -> RunDir:
    """The run to attach to: `run_id`, or the only live run. Raises RuntimeDirError otherwise."""
    runs = live_runs()
    if run_id is not None:
        for rd in runs:
            if rd.run_id == run_id:
                return rd
        known = ", ".join(r.run_id for r in runs) or "none"
        raise RuntimeDirError(f"no running vmsup launch with id {run_id} (running: {known})")
    if not runs:
        raise RuntimeDirError("no vmsup launch is running (start one with `vmsup launch GUEST`)")
    if len(runs) > 1:
        raise RuntimeDirError(f"{len(runs)} launches are running ({', '.join(r.run_id for r in runs)}): pick one with --run ID")
    return runs[0]
