"""Typed errors of the action layer.

Every message is one line an operator can act on: what failed, why, and what to try.
The CLI prints it on stderr and exits 1 (2 for a UsageError or a ConfigError); the TUI shows
it as a notification.
"""


class VirtdeckError(Exception):
    """Base of every error the core raises on purpose."""


class ConnectError(VirtdeckError):
    """The hypervisor cannot be reached, or the connection was lost."""


class NotFoundError(VirtdeckError):
    """A domain, template, snapshot or image that does not exist."""


class InvalidInputError(VirtdeckError):
    """Bad input: a malformed or duplicate name, a wrong format, an impossible option."""


class UsageError(InvalidInputError):
    """A malformed argument the command line itself holds (a control character in a
    description): the CLI exits 2, as for argparse's usage errors."""


class StateError(VirtdeckError):
    """The object is in the wrong state for the action (e.g. starting a running domain)."""


class DependencyError(VirtdeckError):
    """Refused because something else still depends on the object (e.g. a base of thin clones)."""


class OperationError(VirtdeckError):
    """libvirt, qemu-img or virt-sysprep failed while doing the work."""


class ConfigError(VirtdeckError):
    """The config file is not valid TOML or holds a wrong value (the message names the line)."""
