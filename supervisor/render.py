"""Text for people: the status line and the register dump. Library code returns data; this renders it."""

from __future__ import annotations

from tracetool.exit_tally import unclaimed_text
from vmworker.status import End


def status_line(result: dict) -> str:
    name = result.get("name", "vm")
    what = result["status"]
    if what == End.GUEST_EXIT:
        what = f"guest exit code {result.get('guest_code')}"
    elif result.get("detail"):
        what += f" ({result['detail']})"
    exits = result.get("exits", 0)
    run = result.get("run_seconds", 0.0)
    rate = exits / run if run > 0 else 0.0
    unclaimed = unclaimed_text(result.get("unclaimed"))
    return (f"vmsup: {name}: {what} — {exits} exits in {run:.6f} s ({rate:.0f} exits/s), "
            f"wall {result.get('wall_seconds', 0.0):.3f} s" + (f"; unclaimed: {unclaimed}" if unclaimed else ""))


def register_lines(regs: dict) -> list[str]:
    if "error" in regs:
        return [f"registers: unavailable ({regs['error']})"]
    lines = [f"registers of vcpu {regs.get('vcpu', 0)}:"]
    gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"]
    for i in range(0, len(gprs), 4):
        lines.append("  " + " ".join(f"{n:>6}={regs[n]:016x}" for n in gprs[i:i + 4]))
    lines.append("  " + " ".join(f"{n}={regs[n]['selector']:04x}@{regs[n]['base']:x}" for n in
                                 ("cs", "ds", "es", "ss", "fs", "gs", "tr")))
    lines.append("  " + " ".join(f"{n}={regs[n]:x}" for n in ("cr0", "cr2", "cr3", "cr4", "efer"))
                 + f" gdt={regs['gdt']['base']:x}/{regs['gdt']['limit']:x} idt={regs['idt']['base']:x}/{regs['idt']['limit']:x}")
    return lines


def recording_line(trace: str, rec: dict, tally: dict | None = None) -> str:
    """The end line: figures from the trace's own accounting (`tally`, exit_tally.RunTally) when
    there is one — what `vmtrace info` says — else from the last recorder's stats."""
    figures = tally or rec
    gaps = figures.get("gaps", 0)
    if gaps:
        lost = [f"{figures.get('gap_events', 0)} events lost"]
        if figures.get("gaps_count_unknown"):
            lost.append(f"{figures['gaps_count_unknown']} cut with the count unknown")
        gap_text = f"{gaps} gap{'s' if gaps != 1 else ''} ({', '.join(lost)})"
    else:
        gap_text = "no gaps"
    bad = figures.get("refused", sum((rec.get("bad_messages") or {}).values()))
    bad_text = f", {bad} malformed messages dropped" if bad else ""
    return f"trace {trace}: {figures.get('events', 0)} events in {rec.get('batches', 0)} batches, {gap_text}{bad_text}"


def remote_line(link: dict, results: list[dict], run_id: str) -> str:
    """The end line of a launch whose recorder is elsewhere (--recorder): what this launch knows,
    its own counts, how long backpressure held the link and the VMs, and where the trace is."""
    exits = sum(r.get("exits_all_epochs", r.get("exits", 0)) for r in results)
    sent = [r.get("recording") or {} for r in results]  # each worker's own (vmworker/recording.py)
    dropped = sum(s.get("dropped_batches", 0) for s in sent) + link["undelivered"]
    waited = sum(s.get("blocked_seconds", 0.0) for s in sent)
    if not dropped:
        undelivered = "0 undelivered"
    else:  # the exits are still all counted: the relay counts what it takes, delivered or not
        undelivered = (f"{'at least ' if link.get('ended_down') else ''}{dropped} message"
                       f"{'s' if dropped != 1 else ''} could not be delivered")
    return (f"sent to the recorder at {link['endpoint']}: {exits} exits of {len(results)} VM"
            f"{'s' if len(results) != 1 else ''} in {link['messages']} messages ({link['bytes'] / 1e6:.1f} MB), "
            f"{undelivered}; backpressure: the link full {link['blocked_seconds']:.1f} s, the VMs waiting "
            f"{waited:.1f} s" + (f"; the connection dropped {link['drops']} time{'s' if link['drops'] != 1 else ''}"
                                 f" (a recorder that died or restarted)" if link.get("drops") else "")
            + f"; the trace is on the recorder's host (its VMs NAME@{run_id})")


def _fleet_table(run, rates: dict, title: str):
    from rich.table import Table

    stats = run.recorder_stats() or {}
    vms = stats.get("vms", {})
    table = Table(title=title, title_justify="left")
    for col in ("vm", "state", "exits", "exits/s", "last exit"):
        table.add_column(col, justify="right" if col in ("exits", "exits/s") else "left")
    now = __import__("time").monotonic()
    for worker in run.workers:
        spec = worker.spec
        vm = vms.get(str(spec.vm_id), {})
        events = vm.get("exits", 0)
        before = rates.get(spec.vm_id)
        rate = (events - before[1]) / (now - before[0]) if before and now > before[0] else 0.0
        rates[spec.vm_id] = (now, events)
        state = worker.result["status"] if worker.done else vm.get("state", "starting")
        last = vm.get("last")
        last_text = f"{last['reason']} {last['addr']:#x}" if last else ""
        table.add_row(spec.name, state, f"{events}", f"{rate:,.0f}", last_text)
    return table


def watch_fleet(run, console):
    """Live status table while several VMs run (refreshed twice a second); returns the outcome."""
    from rich.live import Live

    rates: dict = {}
    # A VM quiet for a while is told once, as a line above the table (or on its own without one).
    run.on_quiet = lambda name, text: console.print(f"vmsup: {name}: {text}", markup=False, highlight=False,
                                                    soft_wrap=True)
    if not console.is_terminal:
        return run.wait()
    with Live(_fleet_table(run, rates, f"run {run.run_dir.run_id}"), console=console, refresh_per_second=4,
              transient=True) as live:
        return run.wait(on_tick=lambda r: live.update(_fleet_table(r, rates, f"run {r.run_dir.run_id}")))


def summary_table(outcome, console) -> None:
    from rich.table import Table

    table = Table(title=f"run {outcome.run_id}: summary", title_justify="left")
    for col in ("vm", "status", "exits", "run s", "exits/s", "code"):
        table.add_column(col, justify="left" if col in ("vm", "status") else "right")
    for r in outcome.results:
        what = r.get("status", "?")
        if what == End.GUEST_EXIT:
            what = f"guest exit {r.get('guest_code')}"
        elif what == End.ERROR:
            what = f"error: {r.get('error', '')}"
        run_s = r.get("run_seconds", 0.0)
        exits = r.get("exits_all_epochs", r.get("exits", 0))
        # exits: every epoch's; the rate is the last epoch's (run_s is its run time)
        table.add_row(r.get("name", "?"), what, str(exits), f"{run_s:.3f}",
                      f"{r.get('exits', 0) / run_s:,.0f}" if run_s else "-", str(r.get("exit_code", "?")))
    console.print(table)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def ps_table(replies: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title_justify="left")
    for col in ("run", "vm", "state", "pid", "uptime", "exits", "restarts", "detail"):
        table.add_column(col, justify="right" if col in ("pid", "exits", "restarts") else "left")
    for reply in replies:
        if "error" in reply:
            table.add_row(reply["run"], "", "unreachable", "", "", "", "", reply["error"])
        for vm in reply.get("vms", []):
            table.add_row(reply["run"], vm["name"], vm["state"], str(vm["pid"] or "-"), _duration(vm["uptime"]),
                          str(vm["exits"]), str(vm["restarts"]),
                          "; ".join(filter(None, [vm.get("detail"), f"{vm['unclaimed']} unclaimed accesses"
                                                  if vm.get("unclaimed") else ""])))
    console.print(table)
