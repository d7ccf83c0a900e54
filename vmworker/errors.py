"""One error type per layer, each carrying the context a user needs in one line."""

from __future__ import annotations

import errno as _errno
import os


class VmsupError(Exception):
    """Base of every expected failure; the CLI turns each into one line and an exit code."""


class KvmError(VmsupError):
    """A KVM ioctl (or opening /dev/kvm) failed."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.errno = errno
        self.detail = detail
        name = _errno.errorcode.get(errno, str(errno))
        msg = f"{ioctl} failed: {name} ({os.strerror(errno)})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class GuestMemoryError(VmsupError):
    """A guest-physical access or memory layout outside the VM's RAM."""


class GuestImageError(VmsupError):
    """A guest image that cannot be loaded (missing, empty, malformed, does not fit)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class SpecError(VmsupError):
    """A VM specification value that is out of range (memory size, vCPU count, addresses)."""
