"""Handing the terminal to another program (`virsh console`, `ssh`) and taking it back.

Two halves, because Textual's suspend must happen on the main thread but nothing there may
wait on libvirt: `prepare()` runs in a worker (reads the domain, builds the command or refuses
with a one-line reason); the screen then gets an `AttachReady` message and `hand_over()`
suspends the app, runs the program on the terminal and resumes (Ctrl-] ends `virsh console`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from textual.app import App, SuspendNotSupported
from textual.message import Message

from tui.core.details import (
    console_command,
    read_details,
    refuse_demo_ssh,
    run_attached,
    ssh_command,
)
from tui.core.errors import VirtdeckError
from tui.core.hypervisor import Hypervisor

Runner = Callable[[Sequence[str]], int]
runner: Runner = run_attached  # tests swap it

CONSOLE, SSH = "console", "ssh"


@dataclass
class AttachReady(Message):
    """A worker built the command; the screen hands the terminal over on the main thread."""

    argv: list[str]
    what: str


def prepare(hv: Hypervisor, name: str, what: str, ssh_user: str = "root") -> AttachReady:
    """In a worker: the command for `what` (CONSOLE or SSH), or a StateError saying why not."""
    if what != CONSOLE:
        refuse_demo_ssh(hv)
    details = read_details(hv, name)
    if what == CONSOLE:
        return AttachReady(console_command(details), f"console of '{name}'")
    return AttachReady(ssh_command(details, ssh_user), f"ssh to '{name}'")


def hand_over(app: App[object], message: AttachReady) -> None:
    """On the main thread: suspend the dashboard, run the program, come back."""
    try:
        with app.suspend():
            print(f"virtdeck: {message.what}: {' '.join(message.argv)}", flush=True)
            status = runner(message.argv)
    except SuspendNotSupported:
        app.notify(
            f"this terminal cannot be handed over; run '{' '.join(message.argv)}' in another one",
            severity="error",
        )
        return
    except VirtdeckError as err:
        app.notify(str(err), severity="error")
        return
    app.refresh(layout=True)
    if status:
        app.notify(f"{message.argv[0]} exited with status {status}", severity="warning")
