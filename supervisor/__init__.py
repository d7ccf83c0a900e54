"""supervisor: the `vmsup` command — launches one worker process per VM and reports how each ended.

Note: supervisord's PyPI package also imports as `supervisor`; the two cannot share one
environment (install vmsup in its own venv).
"""
