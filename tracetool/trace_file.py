"""Transition name for tracetool.trace (the trace file format, split into one module per concept
there); new code imports from tracetool.trace. Kept while modules written against the old
single-file layout are moved over."""

from .trace import *  # noqa: F401,F403
from .trace import __all__  # noqa: F401
