"""`python -m supervisor` is `vmsup`."""

from .cli import main

main()
