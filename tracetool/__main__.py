"""`python -m tracetool`: the `vmtrace` command."""

from .cli import main

main()
