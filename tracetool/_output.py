"""Where a command writes its output file: whole or not at all.

A regular file (or a new one) is written to a temporary file beside it and renamed over it at
the end, so a failed export leaves nothing half-written; a symlink's target is what gets
replaced, never the link. Anything else that exists — a FIFO, a terminal, /dev/stdout — is
written in place (renaming over it would replace the device node). "-" is standard output.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from typing import Iterator


class OutputError(Exception):
    """The output cannot be written; the message is one line."""


@contextmanager
def output_path(path: str) -> Iterator[str]:
    """Yields the path to write to; on success the output ends up at `path`."""
    if path == "-":
        path = "/dev/stdout"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path}: is a directory")
        try:
            yield path
        except BrokenPipeError:
            raise  # the reader of a pipe left: click ends the command quietly
        except OSError as e:
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
        return
    target = os.path.realpath(path)
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.part-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
