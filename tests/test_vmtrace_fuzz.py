"""Every vmtrace command on mutated real traces ends cleanly: exit 0, 1 or 2, never a traceback,
in bounded time and memory; exit 2 comes with one `vmtrace: error: …` line.

A seeded mutator makes the bad files: cut at a random offset, flip bits, flip bits and fix the
block's crc32 (so the damage reaches the decoders behind the checksum), overwrite a range with
random bytes, zero the tail, a wrong magic, a future format version, and valid files full of
hostile values (TraceWriter with extreme columns, sequence jumps, payloads). The commands run
in-process (the CLI's real entry point, `tracetool.cli.main`) so the CI run stays short; a
few also run as real subprocesses. bench/fuzz_traces.py is the long run of the same thing.
"""

from __future__ import annotations

import io
import os
import random
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from conftest import VMSUP, kvm_unavailable_reason
from tracetool import cli, schema
from tracetool.trace import TraceWriter

REPO = Path(__file__).resolve().parent.parent
RUN = {"run_id": "fuzz"}
MUTATIONS = ("truncate", "flip", "flip-recrc", "overwrite", "zero-tail", "wrong-magic", "future-version", "hostile")
TIME_LIMIT_S = 30.0  # per command, generous for a loaded CI machine
MEMORY_LIMIT = 256 << 20  # peak traced allocations per command
_BLOCK_HEAD = struct.Struct("<4sIII")


def blocks(raw: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, length) of the whole blocks after the file header."""
    if len(raw) < 14:
        return []
    (n,) = struct.unpack_from("<I", raw, 10)
    pos, out = 14 + n + 4, []
    while pos + _BLOCK_HEAD.size <= len(raw) and raw[pos:pos + 4] == b"BLK\x01":
        _, btype, length, _ = _BLOCK_HEAD.unpack_from(raw, pos)
        if pos + _BLOCK_HEAD.size + length > len(raw):
            break
        out.append((pos, btype, length))
        pos += _BLOCK_HEAD.size + length
    return out


def hostile_trace(path: Path, rng: random.Random) -> None:
    """A well-formed file whose values are anything the schema's types allow."""
    nrng = np.random.default_rng(rng.getrandbits(32))
    with TraceWriter(path, RUN, block_events=rng.choice([1, 7, 300, 5000])) as w:
        w.write_record(schema.MSG_VM_START, {"vm": rng.randrange(3), "epoch": 0, "name": "x" * rng.randrange(40),
                                             "t": rng.choice([0, -5, 1 << 62, "soon", None])}, check=False)
        for _ in range(rng.randrange(1, 6)):
            n = rng.choice([1, 2, 50, 2000])
            cols = {}
            for name in schema.COLUMN_NAMES:
                dtype = schema.COLUMN_DTYPES[name]
                info = np.iinfo(dtype)
                pick = rng.random()
                if pick < 0.3:  # extremes
                    cols[name] = nrng.choice(np.array([info.min, info.max, 0, 1], dtype=dtype), n)
                elif pick < 0.6:
                    cols[name] = nrng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
                else:  # plausible
                    cols[name] = nrng.integers(0, 100_000, n).astype(dtype)
            if rng.random() < 0.5:
                cols["reason"] = nrng.choice(np.array([2, 5, 6, 8, 200], np.uint8), n)
                cols["addr"] = nrng.choice(np.array([0x3F8, 0x3FB, 0xE9, 0xD0000000, 1 << 63], np.uint64), n)
            first = rng.choice([0, 5, 1 << 40, (1 << 64) - n - 1])
            payloads = {0: bytes(nrng.integers(0, 256, rng.randrange(0, 64), dtype=np.uint8))} \
                if rng.random() < 0.3 else None
            if payloads:
                cols["count"][0] = rng.choice([2, 1 << 31])
            w.write_exits(rng.randrange(3), rng.randrange(3), rng.randrange(2), first, n, cols, payloads=payloads)
            if rng.random() < 0.3:
                w.write_record(schema.MSG_GAP, {"vm": 0, "vcpu": 0, "epoch": 0, "first_missing": rng.randrange(1 << 20),
                                                "count": rng.randrange(1, 1 << 20), "cause": "fuzz"})
        if rng.random() < 0.5:
            w.write_record(schema.MSG_VM_END, {"vm": 0, "epoch": 0, "status": "x", "final_seq": {0: rng.randrange(1 << 30)},
                                               "t": rng.randrange(1 << 62)})


def mutate(raw: bytes, kind: str, rng: random.Random, path: Path) -> None:
    """Write a mutation of the trace bytes `raw` to `path`."""
    data = bytearray(raw)
    if kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "flip":
        for _ in range(rng.randrange(1, 9)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "flip-recrc":
        found = blocks(bytes(data))
        if found:
            offset, btype, length = rng.choice(found)
            start = offset + _BLOCK_HEAD.size
            if length:
                for _ in range(rng.randrange(1, 5)):
                    data[start + rng.randrange(length)] ^= 1 << rng.randrange(8)
            payload = bytes(data[start:start + length])
            struct.pack_into("<I", data, offset + 12, zlib.crc32(payload, zlib.crc32(struct.pack("<II", btype, length))))
    elif kind == "overwrite":
        at = rng.randrange(len(data))
        n = min(rng.randrange(1, 200), len(data) - at)
        data[at:at + n] = bytes(rng.getrandbits(8) for _ in range(n))
    elif kind == "zero-tail":
        at = rng.randrange(len(data))
        data[at:] = bytes(len(data) - at)
    elif kind == "wrong-magic":
        data[:8] = rng.choice([b"VMSUPTRX", b"PK\x03\x04\x00\x00\x00\x00", b"\x00" * 8])
    elif kind == "future-version":
        struct.pack_into("<H", data, 8, rng.choice([2, 7, 0xFFFF, 0]))
    elif kind == "hostile":
        hostile_trace(path, rng)
        return
    path.write_bytes(bytes(data))


def commands(trace: Path, original: Path, out_dir: Path, with_plot: bool) -> list[tuple[list[str], set[int]]]:
    """(argv, allowed exit codes) of every command to try on `trace`."""
    ok = {0, 2}
    cmds = [
        (["info", trace], ok), (["info", trace, "--json"], ok),
        (["summary", trace], ok), (["summary", trace, "--by", "ioport", "--json"], ok),
        (["summary", trace, "--by", "mmio", "--sort", "max"], ok), (["summary", trace, "--by", "vcpu", "--sort", "time"], ok),
        (["show", trace, "-n", "40"], ok), (["show", trace, "--json", "--from", "0", "--to", "2ms"], ok),
        (["replay", trace, "--speed", "inf", "-n", "40"], ok), (["replay", trace, "--max-sleep", "0", "-n", "20"], ok),
        (["console", trace], ok), (["console", trace, "--json"], ok),
        (["diff", trace, original], {0, 1, 2}), (["diff", original, trace, "--json"], {0, 1, 2}),
        (["export", trace, "--format", "csv", "-o", out_dir / "x.csv"], ok),
        (["export", trace, "--format", "perfetto", "-o", out_dir / "x.json"], ok),
        (["export", trace, "--format", "parquet", "-o", out_dir / "x.parquet"], ok),
        (["verify", trace], {0, 1, 2}), (["verify", trace, "--json"], {0, 1, 2}),
        (["screen", trace], ok), (["replay", trace, "--screen", "--speed", "inf", "-n", "10"], ok),
    ]
    if with_plot:
        cmds.append((["plot", trace, "-o", out_dir / "x.png"], ok))
    return [([str(a) for a in argv], codes) for argv, codes in cmds]


def run_cli(argv: list[str], trace_memory: bool = True) -> tuple[int, str, str, float, int]:
    """Run `vmtrace ARGV` in this process through its real entry point: (exit code, stdout,
    stderr, seconds, peak bytes allocated). Any exception other than SystemExit propagates."""
    out_raw, err_raw = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_raw, encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(err_raw, encoding="utf-8", write_through=True)
    saved = sys.argv
    sys.argv = ["vmtrace", *argv]
    if trace_memory:
        tracemalloc.start()
    start = time.perf_counter()
    code = None
    try:
        with redirect_stdout(out), redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if trace_memory else 0
        if trace_memory:
            tracemalloc.stop()
        sys.argv = saved
    return code, out_raw.getvalue().decode("utf-8", "replace"), err_raw.getvalue().decode("utf-8", "replace"), elapsed, peak


def check_outcome(label: str, argv: list[str], allowed: set[int], result) -> None:
    code, out, err, elapsed, peak = result
    where = f"{label}: vmtrace {' '.join(argv)}"
    assert code in allowed, f"{where}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in out, f"{where}: traceback\n{err[-4000:]}"
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("vmtrace: error: ")]
        assert len(errors) == 1, f"{where}: expected one error line, got:\n{err[-2000:]}"
    assert elapsed < TIME_LIMIT_S, f"{where}: took {elapsed:.1f} s"
    assert peak < MEMORY_LIMIT, f"{where}: peak {peak >> 20} MiB"


def fuzz(bases: dict[str, Path], work: Path, seed: int, iterations: int, plot_every: int = 8,
         memory_every: int = 8, report=None) -> dict[str, int]:
    """Mutate the base traces `iterations` times and run every command on each mutant;
    returns {exit code: count}. Fails (AssertionError) on the first unclean outcome. Memory is
    traced (tracemalloc, which slows Python code down several times) on every `memory_every`-th
    mutant, plot (matplotlib, slow to draw) runs on every `plot_every`-th."""
    rng = random.Random(seed)
    raw = {name: path.read_bytes() for name, path in bases.items()}
    outcomes: dict[str, int] = {}
    some = next(iter(bases.values()))
    for argv, allowed in commands(some, some, work, with_plot=False):  # imports happen here, untraced
        check_outcome("warm-up on an unmutated trace", argv, allowed, run_cli(argv, trace_memory=False))
    for i in range(iterations):
        name = rng.choice(sorted(raw))
        kind = MUTATIONS[i % len(MUTATIONS)] if i < len(MUTATIONS) else rng.choice(MUTATIONS)
        mutant = work / f"m{i}.vmtrace"
        mutate(raw[name], kind, rng, mutant)
        label = f"seed {seed} iteration {i} ({kind} of {name})"
        for argv, allowed in commands(mutant, bases[name], work, with_plot=i % plot_every == 0):
            result = run_cli(argv, trace_memory=i % memory_every == 0 and argv[0] != "plot")
            check_outcome(label, argv, allowed, result)
            outcomes[str(result[0])] = outcomes.get(str(result[0]), 0) + 1
            if report is not None:
                report(label, argv, result)
        mutant.unlink()
    return outcomes


def synthetic_bases(work: Path) -> dict[str, Path]:
    """Traces written here: a seed-like stream over several blocks and a two-VM mix with a gap."""
    rng = np.random.default_rng(3)
    path = work / "synthetic.vmtrace"
    with TraceWriter(path, RUN, block_events=500) as w:
        w.write_record(schema.MSG_VM_START, {"vm": 0, "epoch": 0, "name": "seed16", "t": 10**12})
        n = 3000
        guest = rng.integers(8000, 12000, n)
        t = 10**12 + np.cumsum(guest + 900)
        cols = {"t_exit": t, "guest_ns": guest, "addr": np.full(n, 0x10, np.uint64),
                "data": np.arange(n, dtype=np.uint64) & 0xFFFF, "count": np.ones(n, np.uint32),
                "reason": np.full(n, schema.REASON_IO, np.uint8), "size": np.full(n, 2, np.uint8),
                "flags": np.ones(n, np.uint8)}
        for i in range(0, n, 250):
            w.write_exits(0, 0, 0, i, 250, {k: v[i:i + 250] for k, v in cols.items()})
        text = b"Hello from vmsup!\n"
        m = len(text)
        uart = {"t_exit": 10**12 + np.arange(m) * 20000, "guest_ns": np.full(m, 9000), "addr": np.full(m, 0x3F8, np.uint64),
                "data": np.frombuffer(text, np.uint8).astype(np.uint64), "count": np.ones(m, np.uint32),
                "reason": np.full(m, schema.REASON_IO, np.uint8), "size": np.ones(m, np.uint8), "flags": np.ones(m, np.uint8)}
        w.write_exits(1, 0, 0, 0, m, uart)
        w.write_record(schema.MSG_GAP, {"vm": 1, "vcpu": 0, "epoch": 0, "first_missing": m, "count": 3, "cause": "test"})
        w.write_exits(1, 0, 0, m + 3, m, uart, payloads={0: b"abc"})
    return {"synthetic": path}


def real_bases(work: Path) -> dict[str, Path]:
    """Traces of real launches: seed16 (several blocks), hello (UART), smp (4 vCPUs), mmio."""
    runtime = work / "xdg"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), VMSUP_TRACE_DIR=str(work / "traces"))
    out = {}
    for name, args in {"seed16": ["seed16", "--max-exits", "3000"], "hello": ["hello"], "smp": ["smp"],
                       "mmio": ["mmio"]}.items():
        trace = work / f"{name}.vmtrace"
        proc = subprocess.run([*VMSUP, "launch", *args, "-q", "--trace", str(trace)], input=b"", capture_output=True,
                              timeout=120, cwd=REPO, env=env)
        assert trace.exists(), proc.stderr.decode(errors="replace")
        out[name] = trace
    return out


CI_ITERATIONS = 10  # × ~19 commands each; the CI run of this file stays under 20 s


def test_every_command_ends_cleanly_on_mutated_written_traces(tmp_path):
    outcomes = fuzz(synthetic_bases(tmp_path), tmp_path, seed=20240601, iterations=len(MUTATIONS))
    assert set(outcomes) >= {"0", "2"}


@pytest.mark.kvm
def test_every_command_ends_cleanly_on_mutated_real_traces(tmp_path):
    outcomes = fuzz(real_bases(tmp_path), tmp_path, seed=1234, iterations=CI_ITERATIONS)
    assert set(outcomes) >= {"0", "1", "2"}


def test_a_few_mutants_as_real_processes(tmp_path):
    """The same outcome through a real `python -m tracetool` process: exit code and stderr."""
    bases = synthetic_bases(tmp_path)
    rng = random.Random(99)
    raw = bases["synthetic"].read_bytes()
    for kind in ("flip", "future-version", "hostile"):
        mutant = tmp_path / f"{kind}.vmtrace"
        mutate(raw, kind, rng, mutant)
        for argv, allowed in commands(mutant, bases["synthetic"], tmp_path, with_plot=False)[::7]:
            proc = subprocess.run([sys.executable, "-m", "tracetool", *argv], capture_output=True, text=True, errors="replace",
                                  timeout=120, cwd=REPO)
            check_outcome(f"process {kind}", argv, allowed, (proc.returncode, proc.stdout, proc.stderr, 0.0, 0))
