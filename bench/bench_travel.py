"""reverse-stepi latency against the checkpoint interval, on a deterministic mbkernel rerun.

    .venv/bin/python bench/bench_travel.py [TICKS] [STEPS]    # defaults: 50 timer ticks, 20 steps

Records `vmsup launch mbkernel --deterministic --cmdline maxticks=TICKS`, then for each checkpoint
interval K reruns it in this process (vmworker/rerun_loop.Replay + rerun_travel.TimeTravel, what
`vmtrace rerun --gdb` drives), stops 10 exits before the end and times STEPS reverse-stepi moves
(`TimeTravel.goto(now - 1)`, without gdb's round trip of ~1 ms). Prints per K: median and worst
ms per reverse-stepi, checkpoints kept and their bytes.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tracetool import schema  # noqa: E402
from tracetool.trace import TraceReader  # noqa: E402
from vmworker.rerun_loop import Replay  # noqa: E402
from vmworker.rerun_recording import image_file, open_recording  # noqa: E402
from vmworker.rerun_travel import TimeTravel  # noqa: E402

VMSUP = Path(sys.executable).parent / "vmsup"


def one(trace: str, interval: int, steps: int, to_seq: int) -> tuple[list[float], int, int]:
    rec = open_recording(trace, None)
    with tempfile.TemporaryDirectory() as scratch:
        job = Replay(rec, image_file(rec, scratch), keep_history=True)
        try:
            job.start()
            travel = TimeTravel(job, None, interval=interval)
            job.advance(to_seq=to_seq)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                travel.goto(job.count_now() - 1)
                times.append(time.perf_counter() - t0)
            return times, len(travel.checkpoints), travel.memory_bytes()
        finally:
            job.close()
            rec.reader.close()


def main() -> None:
    ticks = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with tempfile.TemporaryDirectory() as tmp:
        trace = str(Path(tmp) / "mb.vmtrace")
        subprocess.run([str(VMSUP), "launch", "mbkernel", "--deterministic", "--cmdline", f"maxticks={ticks}",
                        "--quiet", "--trace", trace], check=True, capture_output=True)
        with TraceReader(trace) as reader:
            seqs = reader.exits()[schema.SEQ_COLUMN.name]
        to_seq = int(seqs[-10])
        print(f"mbkernel --deterministic, {ticks} ticks, {len(seqs)} exits; {steps} reverse-stepi before seq {to_seq}")
        for interval in (100, 1000, 10000):
            times, kept, size = one(trace, interval, steps, to_seq)
            ms = [t * 1e3 for t in times]
            print(f"  every {interval:>5} exits: {statistics.median(ms):7.1f} ms median, {max(ms):7.1f} ms worst per "
                  f"reverse-stepi; {kept} checkpoints, {size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
