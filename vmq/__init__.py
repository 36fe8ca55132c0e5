"""vmq: keeps a libvirt/KVM virtual-machine cluster alive (probe, reply, judge, restart on the VM's own host)."""

__version__ = "0.1.0"
