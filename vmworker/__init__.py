"""vmworker: a KVM virtual machine monitor built directly on /dev/kvm ioctls.

One worker process runs one VM; each vCPU is a thread looping on KVM_RUN.
"""
