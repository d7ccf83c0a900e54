"""`vmsup record --listen tcp://HOST:PORT --trace PATH`: a recorder on its own, for launches on
other hosts (`vmsup launch … --recorder tcp://HOST:PORT`, supervisor/remote_link.py).

It runs in the foreground until Ctrl-C or SIGTERM, then closes the trace with its footer. Its tcp
socket is a CURVE server that takes only the client keys in KEYS/authorized_clients (supervisor/
keys.py); clients refused at the handshake are counted like refused messages, in the trace's
`refused` records and the end line. Its local sockets (live, control) sit in a private 0700
directory of their own, removed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from tracetool.bus_credentials import BusKeys
from vmworker.errors import VmsupError

from .keys import KeyPaths, check_listen
from .recorder_process import open_recorder
from .runtime import RunDir
from .trace_path import check_trace_path, keep_previous


def _default_trace() -> str:
    directory = os.environ.get("VMSUP_TRACE_DIR") or "traces"
    return os.path.join(directory, f"remote-{time.strftime('%Y%m%d-%H%M%S')}.vmtrace")


def record(listen: str, trace: str | None, keys_dir: str | None, say) -> int:
    """Run a standalone recorder until SIGINT/SIGTERM; `say(line)` tells the user. Exit code."""
    from vmworker import status
    from . import render

    endpoint, keys = check_listen(listen, keys_dir)
    trace_path = trace or _default_trace()
    check_trace_path(trace_path, create_dir=trace is None)
    kept = keep_previous(trace_path)
    run_id = f"record-{time.strftime('%H%M%S')}-{os.getpid()}"
    private = Path(tempfile.mkdtemp(prefix="vmsup-record-"))  # 0700: its live and control sockets
    try:
        meta = {"run_id": run_id, "argv": sys.argv, "host": os.uname().nodename, "started_wall_ns": time.time_ns(),
                "vms": [], "listen": endpoint}
        recorder = open_recorder(RunDir(run_id, private), trace_path, meta, BusKeys.new(run_id), listen=endpoint,
                                 keys_dir=keys, watch_handshakes=True)
        try:
            def on_signal(*_):
                recorder.terminate_requested = True

            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            paths = KeyPaths(keys)
            clients = len(list(paths.clients_dir.glob("*.key")))
            say(f"recording to {trace_path}" + (f" (the previous file of that name kept as {kept})" if kept else ""))
            say(f"listening on {endpoint} (CURVE); server public key {recorder_public(paths)}"
                f" in {paths.server_public}; {clients} authorized client key{'s' if clients != 1 else ''} in "
                f"{paths.clients_dir}; Ctrl-C ends the recording")
            try:
                recorder.serve()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
            stats = recorder.stats()
        finally:
            recorder.close()
    finally:
        shutil.rmtree(private, ignore_errors=True)
    runs = stats.get("runs", {})
    say(f"{len(runs)} run{'s' if len(runs) != 1 else ''} recorded: " + (", ".join(
        f"{run} from {r['host'] or '?'} ({len(r['vms'])} VM{'s' if len(r['vms']) != 1 else ''})" for run, r in runs.items()) or "none"))
    refused = stats.get("bad_messages") or {}
    if refused:
        say("refused: " + "; ".join(f"{n} × {cause}" for cause, n in sorted(refused.items())))
    # Refusals have their own line above (handshakes are not malformed messages).
    tally = {**(_tally(trace_path) or stats.get("tally") or {}), "refused": 0}
    say(render.recording_line(trace_path, stats, tally))
    if stats.get("recording_error"):
        say(f"error: {stats['recording_error']}")
        return status.EXIT_VM_ERROR
    return 0


def _tally(trace_path: str) -> dict | None:
    """The end line's figures from the trace's own accounting, as `vmtrace info` reads them."""
    from tracetool.exit_tally import RunTally
    from tracetool.trace import TraceError, TraceReader
    try:
        with TraceReader(trace_path) as reader:
            return RunTally.from_trace(reader).to_json()
    except (TraceError, OSError):
        return None


def recorder_public(paths: KeyPaths) -> str:
    """The server's public key, Z85 as in its key file: what a client's curve_serverkey must be."""
    import zmq.auth
    public, _ = zmq.auth.load_certificate(str(paths.server_public))
    return public.decode()


def register(app) -> None:
    """Add `vmsup record` to the Typer app."""
    import typer

    from vmworker import status

    @app.command("record")
    def record_command(
        listen: str = typer.Option(..., "--listen", help="Take events on tcp://HOST:PORT (CURVE; needs 'vmsup keys')."),
        trace: Optional[str] = typer.Option(None, "--trace", help="Trace file to record to (default: "
                                            "traces/remote-TIME.vmtrace, or under $VMSUP_TRACE_DIR)."),
        keys_dir: Optional[str] = typer.Option(None, "--keys-dir", help="CURVE keys (default: ~/.config/vmsup/keys)."),
    ) -> None:
        """Record the events of launches on other hosts (vmsup launch --recorder tcp://HOST:PORT) into one
        trace, until Ctrl-C. Only clients whose public key is in KEYS/authorized_clients get in."""
        try:
            code = record(listen, trace, keys_dir, lambda line: typer.echo(f"vmsup: {line}", err=True))
        except VmsupError as e:
            typer.echo(f"vmsup: error: {e}", err=True)
            raise typer.Exit(status.EXIT_BAD_INPUT)
        raise typer.Exit(code)
