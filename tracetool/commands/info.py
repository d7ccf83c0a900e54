"""`vmtrace info`: runs, VMs, streams, events per VM and reason, gaps, time span and size."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from datetime import datetime, timezone

import typer

from .. import schema
from ..exit_tally import unclaimed_text
from ..analysis import events_by_vm_and_reason
from ..trace import TraceReader
from . import _common as c

# info's tables hold long cells (a VM's spec): narrower than the other commands' when piped
PIPE_WIDTH = 160


def trace_info(path) -> dict:
    """Everything `vmtrace info` shows, as JSON-ready plain data."""
    with TraceReader(path) as reader:
        return _info(reader)


def _info(reader: TraceReader) -> dict:
    by_vm = events_by_vm_and_reason(reader)
    events = reader.event_count
    span = reader.time_range
    torn = reader.torn_tail
    return {
        "file": {
            "path": reader.path,
            "size": reader.size,
            "format_version": reader.format_version,
            "schema_version": reader.header["schema"].get("version"),
            "created_ns": reader.header.get("created"),
            "closed_cleanly": reader.closed_cleanly,
            "torn_tail": None if torn is None else {"offset": torn[0], "reason": torn[1]},
            "exit_blocks": len(reader.exit_blocks()),
            "unknown_blocks": reader.unknown_blocks,
            "warnings": list(reader.warnings),
        },
        "run": reader.run,
        "vms": _vms(reader),
        "streams": [asdict(s) for s in reader.streams()],
        "events": {
            "total": events,
            "by_vm": [{"vm": vm, "total": sum(counts.values()),
                       "by_reason": {schema.reason_name(code): n for code, n in sorted(counts.items())}}
                      for vm, counts in sorted(by_vm.items())],
        },
        "gaps": {
            "recorded": reader.gaps,
            "unexplained": [asdict(d) for d in reader.unexplained_gaps],
        },
        "time": None if span is None else {
            "first_ns": span[0], "last_ns": span[1], "span_s": (span[1] - span[0]) / 1e9},
        "bytes_per_event": reader.size / events if events else None,
    }


def _vms(reader: TraceReader) -> list[dict]:
    vms: dict[tuple, dict] = {}
    for rec in reader.records(schema.MSG_VM_START):
        key = (rec.get("vm"), rec.get("epoch"))
        vms[key] = {"vm": rec.get("vm"), "epoch": rec.get("epoch"), "name": rec.get("name"),
                    "spec": rec.get("spec"), "sha256": rec.get("sha256"), "mode": rec.get("mode"),
                    "vcpus": rec.get("vcpus"), "mem_size": rec.get("mem_size"), "pid": rec.get("pid"),
                    "started_ns": rec.get("t"), "status": None,
                    "parent": rec.get("parent") if isinstance(rec.get("parent"), dict) else None}
        if isinstance(rec.get("run"), dict):  # a remote launch's VM: its run, host and own vm id there
            vms[key]["run"] = rec["run"]
    for rec in reader.records(schema.MSG_VM_END):
        key = (rec.get("vm"), rec.get("epoch"))
        entry = vms.setdefault(key, {"vm": key[0], "epoch": key[1], "name": None})
        entry.update({"status": rec.get("status"), "guest_code": rec.get("guest_code"),
                      "detail": rec.get("detail"), "exits": rec.get("exits"), "ended_ns": rec.get("t"),
                      "unclaimed": rec.get("unclaimed")})
    for rec in reader.records(schema.MSG_LIFECYCLE):
        # The supervisor's verdict, as `vmsup launch` printed it, wins over the worker's own end:
        # a VM stopped on request is "stopped (on request, after terminated)", not "terminated".
        key = (rec.get("vm"), rec.get("epoch"))
        if rec.get("event") == "exit" and rec.get("status") and key in vms:
            vms[key].update({"status": rec.get("status"), "detail": rec.get("detail")})
    streams = reader.streams()
    for s in streams:
        vms.setdefault((s.vm, s.epoch), {"vm": s.vm, "epoch": s.epoch, "name": None, "status": None})
    out = []
    for key in sorted(vms, key=lambda k: tuple((0, x) if isinstance(x, int) else (1, str(x)) for x in k)):
        entry = vms[key]
        entry["events_in_trace"] = sum(s.events for s in streams if (s.vm, s.epoch) == key)
        out.append(entry)
    return out


def render(data: dict, console) -> None:
    from rich.text import Text

    def table(title: str, columns: list, rows: list[list]) -> None:
        """Numbers whole, text folded (c.fitted_table); a column named with a leading "~" is text."""
        cols = [c.Col(name.lstrip("~"), numeric=not name.startswith("~")) for name in columns]
        t, _ = c.fitted_table(console, title, cols, [[_text(cell) for cell in r] for r in rows])
        console.print(t)

    f = data["file"]
    console.print(Text(f"{f['path']}: {f['size']} bytes, trace format {f['format_version']}, "
                       f"event schema {f['schema_version']}, created {_when(f['created_ns'])}"))
    if f["torn_tail"] is not None:
        state = f"torn tail at offset {f['torn_tail']['offset']} ({f['torn_tail']['reason']})"
    elif f["closed_cleanly"]:
        state = "closed cleanly"
    else:
        state = "not closed (no index footer: the recorder did not finish)"
    console.print(Text(f"state: {state}"))

    if data["run"]:
        console.print(Text("Run", style="bold"))
        for key, value in _run_lines(data["run"]):
            console.print(Text(f"  {key}: {value}"))

    rows = []
    for vm in data["vms"]:
        sha = vm.get("sha256")
        status = vm.get("status") or "(no vm-end)"
        if vm.get("detail"):
            status += f" ({vm['detail']})"
        rows.append([vm["vm"], vm["epoch"], vm.get("name"), status, vm.get("exits"), vm.get("events_in_trace"),
                     vm.get("vcpus"), sha[:16] if isinstance(sha, str) else sha])
    table("VMs", ["vm", "epoch", "~name", "~status", "exits", "in\ntrace", "vcpus", "~guest sha256"], rows)
    for vm in data["vms"]:  # a spec is many settings: one line each, not one cell of JSON
        if isinstance(vm.get("spec"), dict):
            console.print(Text(f"vm {vm['vm']} epoch {vm['epoch']}" + (f" {vm['name']}" if vm.get("name") else "")
                               + " spec (settings left at none omitted):", style="bold"))
            for key, value in spec_lines(vm["spec"]):
                console.print(Text(f"  {key}: {value}"))

    for vm in data["vms"]:
        parent = vm.get("parent")
        if parent:  # vmsup launch --restore: where this epoch's numbering comes from
            console.print(Text(f"vm {vm['vm']} epoch {vm['epoch']}: restored from snapshot {parent.get('snapshot')} "
                               f"(VM {parent.get('name')} epoch {parent.get('epoch')}); streams go on from seq "
                               f"{', '.join(str(n) for n in parent.get('next_seq') or [])}"))
        if unclaimed_text(vm.get("unclaimed")):
            console.print(Text(f"vm {vm['vm']} epoch {vm['epoch']}: unclaimed accesses (no device there): "
                               f"{unclaimed_text(vm['unclaimed'])}"))

    table("Streams", ["vm", "vcpu", "epoch", "events", "covered", "first\nseq", "last\nseq", "blocks"],
          [[s["vm"], s["vcpu"], s["epoch"], s["events"], s["covered"], s["first_seq"], s["last_seq"], s["blocks"]]
           for s in data["streams"]])

    rows = []
    for entry in data["events"]["by_vm"]:
        for reason, n in sorted(entry["by_reason"].items(), key=lambda kv: -kv[1]):
            rows.append([entry["vm"], reason, n, f"{100 * n / entry['total']:.1f}%" if entry["total"] else "-"])
    table("Events", ["vm", "~reason", "events", "share"], rows)

    gaps = data["gaps"]
    if gaps["recorded"]:
        table("Gaps (recorded)", ["vm", "vcpu", "epoch", "first\nmissing", "count", "~cause"],
              [[g.get("vm"), g.get("vcpu"), g.get("epoch"), g.get("first_missing"), g.get("count"), g.get("cause")]
               for g in gaps["recorded"]])
    if gaps["unexplained"]:
        table("Gaps (unexplained)", ["vm", "vcpu", "epoch", "first\nseq", "count", "~kind", "offset"],
              [[g["vm"], g["vcpu"], g["epoch"], g["first_seq"], g["count"], g["kind"], g["offset"]]
               for g in gaps["unexplained"]])

    total = data["events"]["total"]
    span = data["time"]["span_s"] if data["time"] else 0.0
    per_event = data["bytes_per_event"]
    console.print(Text(
        f"{total} events in {span:.6f} s; gaps: {len(gaps['recorded'])} recorded, "
        f"{len(gaps['unexplained'])} unexplained; "
        + (f"{per_event:.3f} bytes/event" if per_event is not None else "no events")))


def spec_lines(spec: dict, prefix: str = "") -> list[tuple[str, str]]:
    """A VM's spec as (key, value) lines: nested settings as dotted keys, unset (None) ones left out."""
    out = []
    for key, value in spec.items():
        if isinstance(value, dict):
            out += spec_lines(value, f"{prefix}{key}.")
        elif value is not None:
            out.append((f"{prefix}{key}", _text(value)))
    return out


def _run_lines(run: dict) -> list[tuple[str, str]]:
    """The run header as (key, value) lines; its VM specs are shown per VM, its argv as a command."""
    out = []
    for key, value in run.items():
        if key == "vms" and isinstance(value, list):
            value = f"{len(value)} (each VM's spec below)"
        elif key == "argv" and isinstance(value, list):
            value = shlex.join(str(a) for a in value)
        out.append((key, _text(value)))
    return out


def _when(ns) -> str:
    if not isinstance(ns, int):
        return "?"
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=c.json_default, separators=(",", ":"))
    return str(value)


def run(
    trace: str = c.TRACE_ARG,
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of tables."),
) -> None:
    """Runs, VMs, streams, events per VM and reason, gaps, time span and size of a trace."""
    data = c.or_exit(trace_info, trace)
    torn = data["file"]["torn_tail"]
    c.warn_reader(trace, None if torn is None else (torn["offset"], torn["reason"]), data["file"]["warnings"])
    if as_json:
        c.dump_json(data)
    else:
        render(data, c.console(pipe_width=PIPE_WIDTH))
