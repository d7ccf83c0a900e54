"""The recorder as a process: a launch's own (`python -m supervisor.recorder_process`, started by
supervisor/launch.py) or a standalone one (`vmsup record`, supervisor/record_cli.py).

    python -m supervisor.recorder_process --run-dir DIR [--trace PATH] [--run-meta JSON]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import sys
from pathlib import Path

import zmq

from tracetool.bus_credentials import BusKeys
from vmworker.errors import VmsupError

from .recorder import Recorder
from .runtime import RunDir


# mallopt(3) parameter number (glibc <malloc.h>), and the value we pin it to: glibc's default.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 << 10


def keep_large_buffers_out_of_the_heap() -> None:
    """Pin glibc's mmap threshold for the life of the recorder process.

    Left alone, glibc raises the threshold to the size of each mmap'd buffer freed (up to 32 MiB),
    so after the first blocks the recorder's big short-lived buffers (batch columns, a block's
    concatenated columns and its compressed bytes: 100 KiB to a few MiB) come from the heap,
    interleaved with long-lived small objects; the freed space fragments and the heap's high-water
    mark creeps up for as long as the run lasts (measured: +4 MiB free-but-held after 6 minutes of
    the soak, RSS still rising). Pinned, they are mmap'd and handed back whole when freed. Any
    other allocator keeps its own policy."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


class RecorderStartError(VmsupError):
    """The recorder cannot start: its keys, its tcp endpoint or its trace file."""


def open_recorder(run_dir: RunDir, trace: str | None, run_meta: dict, bus_keys: BusKeys, **options) -> Recorder:
    """A Recorder, or RecorderStartError with one line saying why not."""
    keep_large_buffers_out_of_the_heap()  # the recorder lives as long as the run
    try:
        return Recorder(run_dir, trace, run_meta, bus_keys, **options)
    except VmsupError as e:  # --listen: keys or the tcp endpoint
        raise RecorderStartError(str(e)) from None
    except (OSError, zmq.ZMQError) as e:
        raise RecorderStartError(f"cannot start recording: {getattr(e, 'strerror', None) or e}") from None
    except Exception as e:
        from tracetool.trace import TraceWriteError
        if not isinstance(e, TraceWriteError):
            raise
        raise RecorderStartError(f"cannot start recording: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.recorder_process")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--trace", default=None)
    parser.add_argument("--run-meta", default="{}")
    parser.add_argument("--listen", default=None, help="also take events on this tcp endpoint (CURVE)")
    parser.add_argument("--keys-dir", default=None, help="CURVE keys for --listen (supervisor/keys.py)")
    parser.add_argument("--resume", action="store_true", help="continue an existing trace (a restarted recorder)")
    args = parser.parse_args(argv)
    # The run secret comes on stdin (argv is public): it checks every sender's credential.
    try:
        bus_keys = BusKeys(Path(args.run_dir).name, bytes.fromhex(sys.stdin.readline().strip()))
    except ValueError:
        print("error: no run secret on stdin", flush=True)
        return 2
    # Ctrl-C belongs to the supervisor, which asks us to finish; if the supervisor dies, the
    # kernel sends SIGTERM (PR_SET_PDEATHSIG) and we close the file cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG (linux/prctl.h)
    run_dir = RunDir(Path(args.run_dir).name, Path(args.run_dir))
    try:
        recorder = open_recorder(run_dir, args.trace, json.loads(args.run_meta), bus_keys, listen=args.listen,
                                 keys_dir=args.keys_dir, resume=args.resume)
    except RecorderStartError as e:
        print(f"error: {e}", flush=True)
        return 2

    def on_term(*_):
        recorder.terminate_requested = True

    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    try:
        recorder.serve()
    finally:
        recorder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
