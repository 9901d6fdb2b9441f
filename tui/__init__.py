"""virtdeck: a keyboard-driven terminal dashboard for KVM/libvirt hypervisors."""

__version__ = "0.1.0"
