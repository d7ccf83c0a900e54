"""The terminal's cbreak mode for the views that take keys (`vmsup top`, `vmsup screen`)."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def cbreak(fd: int | None):
    """Keys arrive one at a time, unechoed, while the block runs (Ctrl-C stays a signal, so it
    still ends the view); the terminal is restored after. fd None (not a terminal): no change."""
    if fd is None:
        yield
        return
    import termios
    import tty
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
