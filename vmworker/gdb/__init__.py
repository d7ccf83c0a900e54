"""A GDB Remote Serial Protocol stub for vmsup VMs (GDB manual, appendix "Remote Protocol").

packets    framing: $data#checksum, acks, escaping, the Ctrl-C byte
regs       the register layout gdb is told about, and its mapping to KVM regs/sregs
target_xml the target description served through qXfer:features:read
control    the VMM side: all-stop parking of vCPU threads, guest debug, breakpoints
catch      `monitor catch io`: stops at port I/O exits
watch      write watchpoints through read-only memory slots
stub       one gdb connection: packets in, replies out, against a `control.Debugger`
server     the listening socket and the stub's thread in the worker
"""
