"""Why a VM ended, and the process exit code each ending maps to (documented in README.md)."""

from __future__ import annotations

# End reasons, as printed in the status line and stored in results.
HALTED = "halted"  # every vCPU executed HLT
MAX_EXITS = "max-exits"  # --max-exits reached
GUEST_EXIT = "guest-exit"  # the guest wrote a code to the exit port (0xf4)
RESET = "reset"  # the guest pulsed the reset line (i8042 0xFE)
POWEROFF = "poweroff"  # KVM_SYSTEM_EVENT_SHUTDOWN
SHUTDOWN = "shutdown"  # triple fault
TIMEOUT = "timeout"  # --timeout elapsed
FAIL_ENTRY = "fail-entry"
INTERNAL_ERROR = "internal-error"
SYSTEM_EVENT = "system-event"
UNSUPPORTED_EXIT = "unsupported-exit"
VMM_ERROR = "vmm-error"
INTERRUPTED = "interrupted"  # SIGINT (Ctrl-C)
TERMINATED = "terminated"  # SIGTERM
ERROR = "error"  # the VM never started: bad input or KVM unavailable
WORKER_DIED = "worker-died"  # the worker process ended without a result

# Process exit codes.
EXIT_OK = 0
EXIT_GUEST_FAILURE = 1  # the guest reported a non-zero exit code
EXIT_BAD_INPUT = 2  # bad flags, bad guest image (typer also uses 2 for usage errors)
EXIT_SHUTDOWN = 3
EXIT_TIMEOUT = 4
EXIT_VM_ERROR = 5  # fail-entry, internal error, unsupported exit, VMM error, dead worker
EXIT_NO_KVM = 6  # /dev/kvm missing or not permitted
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_CODES = {
    HALTED: EXIT_OK, MAX_EXITS: EXIT_OK, RESET: EXIT_OK, POWEROFF: EXIT_OK,
    SHUTDOWN: EXIT_SHUTDOWN, TIMEOUT: EXIT_TIMEOUT,
    FAIL_ENTRY: EXIT_VM_ERROR, INTERNAL_ERROR: EXIT_VM_ERROR, SYSTEM_EVENT: EXIT_VM_ERROR,
    UNSUPPORTED_EXIT: EXIT_VM_ERROR, VMM_ERROR: EXIT_VM_ERROR, WORKER_DIED: EXIT_VM_ERROR,
    INTERRUPTED: EXIT_INTERRUPTED, TERMINATED: EXIT_TERMINATED, ERROR: EXIT_BAD_INPUT,
}


def exit_code_for(status: str, guest_code: int | None = None) -> int:
    if status == GUEST_EXIT:
        return EXIT_OK if guest_code == 0 else EXIT_GUEST_FAILURE
    return _CODES.get(status, EXIT_VM_ERROR)
