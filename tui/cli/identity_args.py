"""The clone commands' identity options (`clone`, `clone --from-snapshot`) as an Identity."""

from __future__ import annotations

import argparse

from tui.core.identity import Identity


def identity_from_args(args: argparse.Namespace) -> Identity:
    """The identity the clone options ask for, checked (key and user-data files read now)."""
    user_data = None
    if args.user_data:
        from tui.core import cloudinit

        user_data = cloudinit.read_user_data(args.user_data)
    return Identity.from_options(
        hostname_template=args.hostname_template,
        keep_hostname=args.keep_hostname,
        ssh_key_files=args.ssh_key,
        ssh_user=args.ssh_user,
        first_boot=args.first_boot,
        method=args.identity,
        ip=args.ip,
        gateway=args.gateway,
        dns=args.dns,
        user_data=user_data,
    )
