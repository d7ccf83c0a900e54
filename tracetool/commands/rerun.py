"""`vmtrace rerun TRACE`: re-execute a recorded VM in a fresh worker and compare every exit.

The engine is vmworker/rerun.py (a process of its own: it needs /dev/kvm and runs the guest);
this module starts it, and renders its one JSON document: `identical: N exits` (exit 0), or the
first divergence — seq, field, recorded vs now, both exits, the registers and the instruction at
the guest's address (exit 1). Bad input (no such VM, the image gone or changed) is one line, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import typer

from . import _common as c

EXIT_DIVERGED = 1


def rerun_trace(trace: str, vm: int | None = None, to_seq: int | None = None, out: str | None = None,
                gdb: str | None = None) -> tuple[int, dict]:
    """(exit code, result document) of one rerun, run by `python -m vmworker.rerun`. With `gdb` the
    worker's standard error is the user's: it says where the stub listens."""
    argv = [sys.executable, "-m", "vmworker.rerun", trace]
    if vm is not None:
        argv += ["--vm", str(vm)]
    if to_seq is not None:
        argv += ["--to-seq", str(to_seq)]
    if out is not None:
        argv += ["--trace", out]
    if gdb is not None:
        argv += ["--gdb", gdb]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=None if gdb is not None else subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        last = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return c.EXIT_BAD_INPUT, {"error": f"the rerun worker failed: {last[0]}"}
    return proc.returncode, result


def render(result: dict) -> None:
    con = c.console()
    for note in result.get("notes", []):
        c.warn(note)
    n = result["exits"]
    insns = f", {result['instructions']:,} instructions" if "instructions" in result else ""
    if result.get("identical"):
        if "stopped_before_seq" in result:
            con.print(f"identical: {n:,} exits{insns}; stopped before seq {result['stopped_before_seq']}")
            _registers(con, result.get("registers"))
        else:
            con.print(f"identical: {n:,} exits{insns}")
        return
    con.print(f"diverged at seq {result['seq']} after {n:,} identical exits: "
              f"{result['field']} recorded {result['recorded']}, now {result['now']}")
    con.print(f"  recorded: {result['recorded_exit']}")
    con.print(f"  now:      {result['now_exit']}")
    if result.get("cause"):
        con.print(f"  cause:    {result['cause']}")
    insn = result.get("instruction") or {}
    if "text" in insn:
        con.print(f"  at {insn['address']:#x}: {insn['text']}  ({insn['bytes']}, {insn['bitness']}-bit)")
    elif insn:
        con.print(f"  at {insn.get('address', 0):#x}: {insn.get('error', '?')}")
    _registers(con, result.get("registers"))


def _registers(con, regs: dict | None) -> None:
    if not regs:
        return
    names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip", "rflags")
    con.print("  " + " ".join(f"{name}={regs[name]:#x}" for name in names if name in regs))
    segs = " ".join(f"{name}={regs[name]['selector']:#x}" for name in ("cs", "ds", "ss") if name in regs)
    crs = " ".join(f"{name}={regs[name]:#x}" for name in ("cr0", "cr3", "cr4", "efer") if name in regs)
    con.print(f"  {segs} {crs}")


def run(trace: str = c.TRACE_ARG,
        vm: int = typer.Option(None, "--vm", help="The VM to rerun (needed when the trace holds several)."),
        to_seq: int = typer.Option(None, "--to-seq", min=0, help="Stop just before the exit with this sequence number."),
        out: str = typer.Option(None, "--trace", help="Record the rerun into this new trace file (for vmtrace diff)."),
        gdb: str = typer.Option(None, "--gdb", metavar="[HOST:]PORT",
                                help="Serve a gdb stub where the rerun stops (--to-seq, else the start): "
                                     "step, continue, reverse-stepi, reverse-continue."),
        as_json: bool = typer.Option(False, "--json", help="The result as JSON."),
        ) -> int:
    """Re-execute a recorded VM and compare every exit with the trace."""
    if out is not None:
        c.refuse_overwriting(out, trace)
        if os.path.exists(out):
            c.bad_input(f"{out} exists; the rerun's trace must be a new file")
    code, result = rerun_trace(trace, vm, to_seq, out, gdb)
    if "error" in result:
        c.bad_input(result["error"])
    if as_json:
        c.dump_json(result)
    else:
        render(result)
    raise typer.Exit(code)
