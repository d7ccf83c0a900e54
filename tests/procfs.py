"""A process's children as /proc shows them: what the fault tests and the bench scripts
(bench/runlib.py, bench/bench_rss.py) read to find a run's recorder, template and workers."""

from __future__ import annotations

import os


def children(pid: int) -> dict[int, bytes]:
    """{child pid: command line, arguments joined by spaces} of a process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # the parent pid is the 2nd field after the command name, which may hold spaces and ')'
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out[int(entry)] = f.read().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
    return out
