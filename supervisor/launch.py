"""A launch: a recorder process and one worker process per VM, from start to summary.

    runtime dir (0700) ─ recorder (python -m supervisor.recorder_process) ─ trace file
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

import zmq

from tracetool import messages
from tracetool.bus_credentials import BusKeys
from tracetool.run_files import open_private_append
from vmworker.gdb.on_request import request_base
from vmworker import insn_counter, status
from vmworker.status import End
from vmworker.errors import VmsupError
from vmworker.publisher import EventPublisher
from vmworker.signals import PAUSE_SIGNAL, RESUME_SIGNAL
from vmworker.spec import VmSpec

from . import runtime
from .policy import RestartPolicy
from .quiet import QUIET_TEXT, QuietWatch
from .commands import RecorderClient, control_socket, serve_one
from .remote_link import RemoteLink, RemoteRecorderError
from .trace_path import keep_previous
from .vm_slot import VmSlot, rss_bytes
from .worker import Worker
from .worker_template import WorkerTemplate

RECORDER_START_TIMEOUT = 10.0
MAX_RECORDER_START_FAILURES = 5


class LaunchError(VmsupError):
    pass


def stopped_on_request(ended: str | None) -> tuple[End, str]:
    """What a VM stopped on request (vmsup stop, Ctrl-C or SIGTERM to launch) ended as, with how
    its worker ended: the one wording of launch's line, its summary and the trace."""
    return End.STOPPED, f"on request, after {ended or 'no start'}"


@dataclass
class LaunchOutcome:
    results: list[dict]
    recorder: dict | None = None
    run_id: str = ""
    trace: str | None = None
    notes: list[str] = field(default_factory=list)
    tally: dict | None = None  # exit_tally.RunTally.to_json(): from the trace when there is one
    remote: dict | None = None  # --recorder: what the launch knows of its link (remote_link.RemoteLink.close)


class Launch:
    """Start the recorder and the workers, supervise them (restart policy, limits, control
    commands) until every VM reached a final state, then close the trace."""

    STOP_TIMEOUT = 5.0  # SIGTERM, then SIGKILL after this long: nothing stays stuck in "stopping"
    RSS_CHECK_SECONDS = 0.5
    QUIET_CHECK_SECONDS = 1.0  # one recorder `stats` call: whether a VM has made no exit for a while

    def __init__(self, specs: list[VmSpec], trace_path: str | None, record: bool = True,
                 console_paths: list[str | None] | None = None, foreground: bool = True,
                 listen: str | None = None, keys_dir: str | None = None,
                 policy: RestartPolicy | None = None, rss_limit: int | None = None,
                 remote_recorder: str | None = None) -> None:
        self.specs = specs
        # --recorder tcp://…: events go to a recorder on another host (supervisor/remote_link.py)
        self.remote_recorder = remote_recorder
        self.link: RemoteLink | None = None
        self.listen = listen  # an extra tcp events endpoint (CURVE, keys in keys_dir): supervisor/keys.py
        self.keys_dir = keys_dir
        self.trace_path = trace_path
        self.record = record
        self.console_paths = console_paths or [None] * len(specs)
        self.foreground = foreground
        self.run_dir: runtime.RunDir | None = None
        self.recorder_proc: subprocess.Popen | None = None
        self.slots: list[VmSlot] = []
        for spec, console in zip(specs, self.console_paths):
            slot_policy = RestartPolicy(**spec.extra["policy"]) if "policy" in spec.extra else (policy or RestartPolicy())
            self.slots.append(VmSlot(spec, slot_policy, spec.extra.get("rss_limit", rss_limit), console))
        self._signalled = None
        self._previous_handlers: dict = {}
        self.recorder_restarts = 0
        self.recorder_start_failures = 0  # restarts in a row that did not come up
        self.notes: list[str] = []
        # Called (vm name, text) once when a VM makes no exit for a while (supervisor/quiet.py);
        # None: nobody to tell (the --screen view owns the terminal).
        self.on_quiet = None
        self._quiet = QuietWatch()
        self._context: zmq.Context | None = None
        self._lifecycle: EventPublisher | None = None
        self._control = None
        self.template: WorkerTemplate | None = None
        self.started_wall = time.time()

    @property
    def workers(self) -> list[Worker]:
        return [s.worker for s in self.slots if s.worker is not None]

    def start(self) -> None:
        # Ctrl-C and SIGTERM are the launch's from here on, not only once wait() runs: a forked
        # worker makes its first exits before start() has returned.
        self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._start()
        except BaseException:
            self._restore_signals()
            raise

    def _restore_signals(self) -> None:
        for s, handler in self._previous_handlers.items():
            signal.signal(s, handler)
        self._previous_handlers = {}

    def _start(self) -> None:
        self.run_dir = runtime.create_run()
        self.run_dir.write_info({"id": self.run_dir.run_id, "pid": os.getpid(), "started": self.started_wall,
                                 "trace": self.trace_path, "vms": [s.name for s in self.specs]})
        self._context = zmq.Context()
        self.bus_keys = BusKeys.new(self.run_dir.run_id)
        # The previous trace of that name is kept as PATH.N (supervisor/trace_path.py).
        self.kept_trace = keep_previous(self.trace_path) if self.trace_path else None
        if self.record and self.remote_recorder:
            self._connect_link()  # first: an unreachable or refusing recorder ends the launch before anything runs
        # A foreground VM shares the terminal and is spawned; the others are forked from the template.
        if any(spec.screen or not self.foreground for spec in self.specs):
            self.template = WorkerTemplate()
            self.template.start()  # it imports while the recorder starts
        if self.record:
            try:
                if self.link is not None:
                    self.link.start(self.run_dir.events_endpoint, self.run_dir.live_endpoint, self.bus_keys,
                                    [(s.vm_id, s.name) for s in self.specs])
                else:
                    self._start_recorder()
            except LaunchError:
                if self.template is not None:
                    self.template.close()
                raise
            self._lifecycle = EventPublisher(self._context, self.run_dir.events_endpoint, lambda: True,
                                             credential=self.bus_keys.supervisor().frame())
        self._control = control_socket(self._context, self.run_dir.control_endpoint)
        for slot in self.slots:
            self._spawn(slot)

    def _start_recorder(self, resume: bool = False) -> None:
        meta = {"run_id": self.run_dir.run_id, "argv": sys.argv, "host": os.uname().nodename,
                "started_wall_ns": time.time_ns(), "vms": [s.to_json() for s in self.specs],
                **insn_counter.host_check(self.run_dir.path.parent)}
        cmd = [sys.executable, "-m", "supervisor.recorder_process", "--run-dir", str(self.run_dir.path),
               "--run-meta", json.dumps(meta)]
        if self.trace_path:
            cmd += ["--trace", self.trace_path]
        if self.listen:
            cmd += ["--listen", self.listen, "--keys-dir", str(self.keys_dir)]
        if resume:
            cmd.append("--resume")
        self.recorder_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        try:  # the run secret goes on stdin: argv is readable by every local user
            self.recorder_proc.stdin.write(self.bus_keys.secret_hex.encode() + b"\n")
            self.recorder_proc.stdin.close()
        except OSError:
            pass  # a recorder that died at once: its missing "ready" says so below
        line = self._read_line(self.recorder_proc.stdout, RECORDER_START_TIMEOUT)
        if line.strip() != b"ready":
            self.recorder_proc.kill()
            self.recorder_proc.wait()
            if resume:
                raise LaunchError("the recorder died and could not be restarted: " +
                                  (line.decode(errors="replace").strip() or "no answer"))
            self.run_dir.remove()
            why = line.decode(errors="replace").strip().removeprefix("error: ") or "the recorder did not start"
            raise LaunchError(why)

    def _connect_link(self) -> None:
        """Connect to the remote recorder (a bounded wait for its CURVE handshake)."""
        link = RemoteLink(self._context, self.remote_recorder, self.keys_dir)
        try:
            link.connect()
        except RemoteRecorderError:
            self._context.destroy(linger=0)
            self.run_dir.remove()
            raise
        self.link = link

    @staticmethod
    def _read_line(stream, timeout: float) -> bytes:
        box: list[bytes] = []
        reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return box[0] if box else b""

    # Lifecycle ------------------------------------------------------------------------------------
    def _record(self, slot: VmSlot, event: str, **fields) -> None:
        if self._lifecycle is not None:
            self._lifecycle.send(messages.Lifecycle(vm=slot.spec.vm_id, epoch=max(slot.epoch, 0), event=event,
                                                    name=slot.spec.name, t=time.monotonic_ns(), wall=time.time_ns(),
                                                    **fields).to_msg())

    def _spawn(self, slot: VmSlot) -> None:
        slot.epoch += 1
        spec = VmSpec.from_json(slot.spec.to_json())
        spec.epoch = slot.epoch
        spec.bus_endpoint = self.run_dir.events_endpoint if self.record else None
        # Where the worker takes typed keys (vmsup screen): inside the private run dir.
        spec.input_endpoint = f"ipc://{self.run_dir.path / f'vm-{spec.vm_id}-input.sock'}"
        spec.gdb_request = request_base(self.run_dir.path, spec.vm_id)  # `vmsup gdb` (commands.Gdb)
        spec.control_endpoint = self.worker_control_endpoint(spec.vm_id)
        credential = self.bus_keys.worker(spec.vm_id, spec.epoch)
        if self.foreground and not spec.screen:
            worker = Worker(spec, credential=credential)
        else:
            out = open_private_append(slot.console) if slot.console else subprocess.DEVNULL
            # Of several VMs, the one given stdin (supervisor/fleet.py: specs_from_entries) inherits
            # it; a --screen VM's keys come from the screen view instead.
            stdin = None if spec.serial_in == "-" and not self.foreground else subprocess.DEVNULL
            try:
                worker = Worker(spec, stdout=out, stdin=stdin, own_group=True, credential=credential,
                                template=self.template)
            finally:
                if slot.console:
                    out.close()
        slot.worker = worker
        slot.state = "starting"
        slot.limit_hit = None
        self._record(slot, "restart" if slot.epoch else "spawn", pid=worker.proc.pid)

    def _ended(self, slot: VmSlot) -> None:
        result = slot.worker.result
        if slot.limit_hit:
            result["status"], result["detail"] = slot.limit_hit, slot.detail
            result["exit_code"] = status.EXIT_VM_ERROR
        rc = result.get("worker_returncode", 0)
        # A foreground worker gets the terminal's Ctrl-C too and may end before the loop has
        # acted on the supervisor's own signal: that is still a stop on request, not a failure.
        on_request = (slot.stop_requested or self._signalled is not None) and result.get("status") != End.ERROR
        # The trace gets the verdict launch prints (`vmtrace info` reads it): stopped, not the
        # worker's own "interrupted" or "terminated".
        ended, detail = (stopped_on_request(result.get("status")) if on_request
                         else (result.get("status"), result.get("detail", "")))
        self._record(slot, "exit", pid=slot.worker.proc.pid, status=ended,
                     code=rc if rc >= 0 else None, signal=-rc if rc < 0 else None, detail=detail,
                     no_record=bool(result.get("no_record")))
        ran = result.get("wall_seconds", 0.0)
        slot.exits_before += result.get("exits", 0)
        slot.result = result
        result["epoch"] = slot.epoch
        if slot.stop_requested or self._signalled is not None:
            slot.state = "stopped"
            return
        if result.get("status") == End.ERROR:  # the VM cannot start: retrying would not help
            slot.state = "exited"
            return
        failed = result.get("exit_code", status.EXIT_VM_ERROR) != 0
        quick = ran < slot.policy.startsecs
        slot.failed_starts = slot.failed_starts + 1 if quick else 0
        if not slot.policy.wants_restart(failed):
            slot.state = "exited"
        elif quick and slot.failed_starts > slot.policy.retries:
            slot.state = "fatal"
            slot.detail = (f"gave up after {slot.failed_starts} starts in a row that ended within "
                           f"{slot.policy.startsecs:g} s; last: {result.get('status')}")
            self._record(slot, "give-up", status=End.FATAL, detail=slot.detail)
        else:
            slot.state = "backoff"
            delay = slot.policy.delay(max(1, slot.failed_starts))
            slot.next_start = time.monotonic() + delay
            slot.restarts += 1
            slot.detail = f"restarting in {delay:.2f} s"

    def stop_slot(self, slot: VmSlot, kill: bool = False) -> None:
        """Stop a VM for good: TERM (the worker ends its VM and flushes), KILL after STOP_TIMEOUT."""
        slot.stop_requested = True
        if slot.state == "backoff":
            slot.state = "stopped"
            self._record(slot, "stop", status=End.STOPPED)
            return
        if slot.worker is not None and not slot.worker.done:
            self._record(slot, "kill" if kill else "stop")
            if slot.state == "paused":
                slot.worker.signal(RESUME_SIGNAL)
            slot.worker.signal(signal.SIGKILL if kill else signal.SIGTERM)
            slot.state = "stopping"
            slot.stop_deadline = time.monotonic() + self.STOP_TIMEOUT

    def worker_control_endpoint(self, vm_id: int) -> str:
        """Where VM vm_id's worker takes control commands (vmworker/control.py), in the private run dir."""
        return f"ipc://{self.run_dir.path / f'vm-{vm_id}-control.sock'}"

    def pause_slot(self, slot: VmSlot, pause: bool) -> bool:
        if slot.worker is None or slot.worker.done or slot.state not in (("starting", "running") if pause else ("paused",)):
            return False
        slot.worker.signal(PAUSE_SIGNAL if pause else RESUME_SIGNAL)
        slot.state = "paused" if pause else "running"
        self._record(slot, "pause" if pause else "resume")
        return True

    def _check_recorder(self) -> None:
        """A recorder that died (kill -9, a crash) is restarted on the same trace; workers' PUSH
        sockets reconnect by themselves, and what died with it shows up as gap records."""
        if self.recorder_proc is None or self.recorder_proc.poll() is None:
            return
        self.recorder_restarts += 1
        self.notes.append(f"the recorder died ({self.recorder_proc.returncode}) and was restarted")
        for name in ("events.sock", "live.sock", "recorder.sock"):
            try:
                os.unlink(self.run_dir.path / name)  # a stale ipc file would make the new bind fail
            except FileNotFoundError:
                pass
        try:
            self._start_recorder(resume=True)
            self.recorder_start_failures = 0
        except LaunchError as e:
            # One that dies while it starts (killed again, say) is tried again at the next tick;
            # only a recorder that cannot start several times in a row ends the recording.
            self.recorder_start_failures += 1
            if self.recorder_start_failures >= MAX_RECORDER_START_FAILURES:
                self.notes.append(str(e))
                self.recorder_proc = None

    def _tick(self, now: float, check_rss: bool) -> None:
        self._check_recorder()
        for slot in self.slots:
            worker = slot.worker
            if worker is not None and worker.done and not slot.terminal and slot.state != "backoff":
                self._ended(slot)
            elif slot.state == "backoff" and now >= slot.next_start:
                slot.detail = ""
                self._spawn(slot)
            elif worker is not None and not worker.done:
                if slot.state == "starting" and now - worker.started >= slot.policy.startsecs:
                    slot.state = "running"
                if slot.state == "stopping" and slot.stop_deadline is not None and now > slot.stop_deadline:
                    worker.signal(signal.SIGKILL)
                    slot.stop_deadline = None
                worker.enforce_timeout()
                if check_rss and slot.rss_limit and slot.limit_hit is None:
                    rss = rss_bytes(worker.proc.pid)
                    if rss is not None and rss > slot.rss_limit:
                        slot.limit_hit = End.RSS_LIMIT
                        slot.detail = f"worker RSS {rss >> 20} MiB over the limit of {slot.rss_limit >> 20} MiB"
                        worker.signal(signal.SIGKILL)

    def _on_signal(self, signum, _frame) -> None:
        # Ctrl-C reaches workers from the terminal too; handling it here as well makes `kill -TERM`
        # on the supervisor alone stop everything the same way.
        self._signalled = signum

    def _stop_all(self) -> None:
        for slot in self.slots:
            if not slot.terminal:
                self.stop_slot(slot)

    def wait(self, on_tick=None, tick: float = 0.5) -> LaunchOutcome:
        if not self._previous_handlers:
            self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            next_tick = next_rss = next_quiet = time.monotonic()
            stopping_all = False
            while not all(slot.terminal for slot in self.slots):
                if self._signalled is not None and not stopping_all:
                    stopping_all = True
                    self._stop_all()
                if self._control.poll(50):
                    self._serve_control()
                now = time.monotonic()
                self._tick(now, check_rss=now >= next_rss)
                if now >= next_rss:
                    next_rss = now + self.RSS_CHECK_SECONDS
                if self.on_quiet is not None and now >= next_quiet:
                    next_quiet = now + self.QUIET_CHECK_SECONDS
                    self._check_quiet(now)
                if on_tick is not None and now >= next_tick:
                    on_tick(self)
                    next_tick = now + tick
        finally:
            self._restore_signals()
        results = [self._final_result(slot) for slot in self.slots]
        outcome = LaunchOutcome(results=results, run_id=self.run_dir.run_id, trace=self.trace_path, notes=self.notes)
        if self._lifecycle is not None:
            self._lifecycle.close()
        if self.recorder_proc is not None:
            outcome.recorder = self._finish_recorder(results)
        if self.link is not None:
            outcome.remote = self.link.close()
        self._count_from_tally(outcome)
        if self.template is not None:
            self.template.close()
        self._control.close(linger=0)
        self._context.term()
        self.run_dir.remove()
        return outcome

    def _check_quiet(self, now: float) -> None:
        try:
            stats = self.recorder_stats()
        except VmsupError:
            return  # a recorder busy or restarting: look again next time
        if stats is None:
            return
        seen = stats.get("vms", {})
        vms = []
        for slot in self.slots:
            vm = seen.get(str(slot.spec.vm_id), {})
            # Only a VM running on its own: not starting up, paused, stopping or held by gdb.
            watched = (slot.state in ("starting", "running") and vm.get("state") == "running"
                       and vm.get("epoch") == slot.epoch and not slot.spec.gdb)
            vms.append((slot.spec.vm_id, slot.epoch, vm.get("covered", 0), watched))
        names = {slot.spec.vm_id: slot.spec.name for slot in self.slots}
        for vm_id in self._quiet.update(now, vms):
            self.on_quiet(names[vm_id], QUIET_TEXT)

    def _count_from_tally(self, outcome: LaunchOutcome) -> None:
        """Every figure printed at the end comes from one tally: the trace's own accounting
        (across epochs and recorders) when there is a trace, else the recorder's, or the relay's
        for a remote recorder (remote_link.RemoteLink counts what it forwards)."""
        tally = (outcome.recorder or outcome.remote or {}).get("tally")
        if self.trace_path and os.path.exists(self.trace_path):
            from tracetool.exit_tally import RunTally
            from tracetool.trace import TraceError, TraceReader
            try:
                with TraceReader(self.trace_path) as reader:
                    tally = RunTally.from_trace(reader).to_json()
            except TraceError as e:
                self.notes.append(f"counts from the recorder: the trace cannot be read ({e})")
        outcome.tally = tally
        for slot, result in zip(self.slots, outcome.results):
            vm = (tally or {}).get("vms", {}).get(str(slot.spec.vm_id))
            if vm is None:
                continue
            result["exits_all_epochs"] = vm["exits"]
            if "exits" not in result:  # a worker that died without a result: how far its streams got
                result["exits"] = vm["last_epoch_exits"]

    def _final_result(self, slot: VmSlot) -> dict:
        result = dict(slot.result or {"name": slot.spec.name, "status": End.WORKER_DIED})
        result["restarts"] = slot.restarts
        result["exits_all_epochs"] = slot.exits_before
        if slot.state == "fatal":
            result["status"], result["detail"] = End.FATAL, slot.detail
            result["exit_code"] = status.EXIT_VM_ERROR
        elif slot.state == "stopped" and result.get("status") != End.ERROR:
            # Stopped on request (vmsup stop, Ctrl-C, SIGTERM): the VM did what it was asked.
            result["status"], result["detail"] = stopped_on_request(result.get("status"))
            result["exit_code"] = status.EXIT_OK
        return result

    def _serve_control(self) -> None:
        serve_one(self, self._control)

    def recorder_stats(self) -> dict | None:
        if self.link is not None:
            return self.link.stats()
        if self.recorder_proc is None or self.recorder_proc.poll() is not None:
            return None
        client = RecorderClient(self.run_dir, timeout=1.0)
        try:
            return client.call("stats")
        finally:
            client.close()

    def _finish_recorder(self, results: list[dict]) -> dict | None:
        ended = [messages.VmEnd(vm=slot.spec.vm_id, epoch=max(slot.epoch, 0), name=slot.spec.name, status=r["status"],
                                detail=r.get("detail", ""), final_seq=None)
                 for slot, r in zip(self.slots, results) if r.get("no_record") or r.get("status") == End.ERROR]
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
