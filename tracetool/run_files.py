"""Files a run writes (the trace, each VM's console file, a detached launch's log): all private.

They hold whatever the guests wrote, so every one of them is created 0600, like the control
sockets' directory is 0700; one helper so no file of a run is created with another mode.
"""

from __future__ import annotations

import os

RUN_FILE_MODE = 0o600


def open_private(path, flags: int) -> int:
    """os.open with the run files' mode; an existing file appended to is made private too."""
    fd = os.open(path, flags | os.O_CLOEXEC, RUN_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, RUN_FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def open_private_append(path):
    """A binary file object appending to `path` (created 0600)."""
    return os.fdopen(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab")
