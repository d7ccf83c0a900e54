"""Text for people: the status line and the register dump. Library code returns data; this renders it."""

from __future__ import annotations


def status_line(result: dict) -> str:
    name = result.get("name", "vm")
    what = result["status"]
    if what == "guest-exit":
        what = f"guest exit code {result.get('guest_code')}"
    elif result.get("detail"):
        what += f" ({result['detail']})"
    exits = result.get("exits", 0)
    run = result.get("run_seconds", 0.0)
    rate = exits / run if run > 0 else 0.0
    return (f"vmsup: {name}: {what} — {exits} exits in {run:.6f} s ({rate:.0f} exits/s), "
            f"wall {result.get('wall_seconds', 0.0):.3f} s")


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
