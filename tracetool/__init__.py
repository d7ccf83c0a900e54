"""tracetool: everything about exit traces; the `vmtrace` command."""
