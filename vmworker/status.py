"""Why a VM ended (`End`), and the process exit code each ending maps to.

`End` is the one list of end statuses: the worker's result, the vm-end trace record, the lifecycle
log and the CLI's exit code all use its members, whose values are the strings on the wire and in
traces ("max-exits", "guest-exit", ...). README.md's "How a VM ends, and exit codes" table is held
against it by tests/test_status.py.
"""

from __future__ import annotations

import enum

# Process exit codes.
EXIT_OK = 0
EXIT_GUEST_FAILURE = 1  # the guest reported a non-zero exit code
EXIT_BAD_INPUT = 2  # bad flags, bad guest image (typer also uses 2 for usage errors)
EXIT_SHUTDOWN = 3
EXIT_TIMEOUT = 4
EXIT_VM_ERROR = 5  # fail-entry, internal error, unsupported exit, VMM error, dead worker
EXIT_NO_KVM = 6  # /dev/kvm missing or not permitted
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


class End(enum.StrEnum):
    """An end status: its wire string, the exit code(s) it maps to, and what it means.

    A member is a str (`End.HALTED == "halted"`), so results, msgpack and JSON carry the plain
    string. `codes[0]` is the usual exit code; the others are the ones `exit_code` may also give.
    """

    def __new__(cls, value: str, codes: tuple[int, ...], meaning: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.codes = codes
        member.meaning = meaning
        return member

    # Ended by the guest or by its limits.
    HALTED = "halted", (EXIT_OK,), "every vCPU executed HLT"
    MAX_EXITS = "max-exits", (EXIT_OK,), "--max-exits reached"
    GUEST_EXIT = "guest-exit", (EXIT_OK, EXIT_GUEST_FAILURE), "the guest wrote a code to the exit port (0 → 0, else 1)"
    RESET = "reset", (EXIT_OK,), "the guest pulsed the reset line (i8042 0xFE)"
    POWEROFF = "poweroff", (EXIT_OK,), "KVM system event: shutdown"
    SHUTDOWN = "shutdown", (EXIT_SHUTDOWN,), "triple fault"
    TIMEOUT = "timeout", (EXIT_TIMEOUT,), "--timeout elapsed"
    # The VM could not go on.
    FAIL_ENTRY = "fail-entry", (EXIT_VM_ERROR,), "KVM could not enter the guest"
    INTERNAL_ERROR = "internal-error", (EXIT_VM_ERROR,), "KVM internal error (e.g. emulation failure)"
    SYSTEM_EVENT = "system-event", (EXIT_VM_ERROR,), "a KVM system event other than shutdown"
    UNSUPPORTED_EXIT = "unsupported-exit", (EXIT_VM_ERROR,), "an exit reason vmsup does not handle"
    VMM_ERROR = "vmm-error", (EXIT_VM_ERROR,), "vmsup itself failed (a failed ioctl, a bug)"
    WORKER_DIED = "worker-died", (EXIT_VM_ERROR,), "the worker process ended without a result"
    # Signals to a worker alone.
    INTERRUPTED = "interrupted", (EXIT_INTERRUPTED,), "SIGINT (Ctrl-C)"
    TERMINATED = "terminated", (EXIT_TERMINATED,), "SIGTERM"
    GDB_KILL = "gdb-kill", (EXIT_TERMINATED,), "an attached gdb killed it (its `kill` command)"
    # The VM never started: bad input (2), /dev/kvm unavailable (6), or KVM refused the set-up (5).
    ERROR = "error", (EXIT_BAD_INPUT, EXIT_NO_KVM, EXIT_VM_ERROR), "the VM never started"
    # Set by the supervisor, not the worker.
    STOPPED = "stopped", (EXIT_OK,), "stopped on request (vmsup stop, or a signal to vmsup launch)"
    RSS_LIMIT = "rss-limit", (EXIT_VM_ERROR,), "the worker's RSS went over --rss-limit"
    FATAL = "fatal", (EXIT_VM_ERROR,), "the restart policy gave up"

    def exit_code(self, guest_code: int | None = None) -> int:
        if self is End.GUEST_EXIT:
            return EXIT_OK if guest_code == 0 else EXIT_GUEST_FAILURE
        return self.codes[0]


def exit_code_for(status: str, guest_code: int | None = None) -> int:
    """The exit code of a status read back from a result or trace; unknown ones are VM errors."""
    try:
        return End(status).exit_code(guest_code)
    except ValueError:
        return EXIT_VM_ERROR
