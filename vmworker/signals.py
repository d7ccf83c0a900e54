"""Signals a worker understands, named once for the worker and the supervisor.

SIGUSR1 kicks a vCPU thread out of KVM_RUN (with kvm_run.immediate_exit set, KVM_RUN fails with
EINTR at once: api.rst, "immediate_exit"); the real-time pair pauses and resumes the VM (queued,
and never confused with job control).
SIGTERM / SIGINT stop the VM (status terminated / interrupted).
"""

import signal

KICK_SIGNAL = signal.SIGUSR1
PAUSE_SIGNAL = signal.SIGRTMIN + 1
RESUME_SIGNAL = signal.SIGRTMIN + 2
GDB_SIGNAL = signal.SIGRTMIN + 3  # open a gdb stub now (`vmsup gdb`; vmworker/gdb/on_request.py)
