"""The modals of the Templates pane: make a template, deploy clones, show a plan, remove.

Forms only collect and check input; planning and the work run in the pane's workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import (
    Button,
    Checkbox,
    Input,
    Label,
    RadioButton,
    RadioSet,
    Select,
    SelectionList,
    Static,
)

from tui.core.errors import InvalidInputError, UsageError
from tui.core.hypervisor import validate_name
from tui.core.identity import DEFAULT_HOSTNAME, Identity
from tui.modals.form import error_and_buttons

_FORM_CSS = """
{cls} {{ align: center middle; }}
{cls} > Vertical {{
    width: 80; max-width: 100%; height: auto; max-height: 100%; padding: 1 2;
    border: thick $accent; background: $surface;
    overflow-y: auto;  /* at 80x24 the form scrolls: its buttons stay reachable */
}}
{cls} #title {{ text-style: bold; margin-bottom: 1; }}
{cls} #error {{ color: $error; height: auto; }}
{cls} #hint {{ color: $text-muted; height: auto; }}
{cls} #buttons {{ height: auto; align-horizontal: right; margin-top: 1; }}
{cls} Button {{ margin-left: 2; }}
{cls} SelectionList {{ height: 10; }}
{cls} RadioSet {{ width: 100%; }}
{cls} #plan {{ height: auto; max-height: 50vh; }}
"""


@dataclass(frozen=True)
class TemplateRequest:
    name: str
    seal: bool
    operations: tuple[str, ...] | None  # None: virt-sysprep's defaults
    undefine: bool
    force: bool


class MakeTemplateScreen(ModalScreen[TemplateRequest | None]):
    """Name, seal on/off, the virt-sysprep operations checklist, undefine, force off."""

    DEFAULT_CSS = _FORM_CSS.format(cls="MakeTemplateScreen")
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="template_form.cancel")]

    def __init__(
        self, vm: str, *, running: bool, operations: dict[str, bool], note: str = ""
    ) -> None:
        super().__init__()
        self.vm = vm
        self.running = running
        self.operations = operations  # name -> enabled by default
        self.note = note

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"Make a template from '{self.vm}'", id="title", markup=False)
            yield Label("Template name")
            yield Input(value=f"template-{self.vm}", id="name")
            yield Checkbox(
                "Seal with virt-sysprep", value=bool(self.operations), id="seal",
                disabled=not self.operations,
            )  # fmt: skip
            yield SelectionList[str](
                *[(op, op, default) for op, default in self.operations.items()], id="ops"
            )
            yield Checkbox("Undefine afterwards (keep XML backup and disks)", id="undefine")
            yield Checkbox(
                "Force off if the guest ignores the shutdown", id="force", disabled=not self.running
            )
            hint = self.note or (
                "The VM is shut down, sealed, renamed, backed up, and its disks made read-only."
            )
            yield Static(hint, id="hint", markup=False)
            yield from error_and_buttons()

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()

    @on(Checkbox.Changed, "#seal")
    def _seal_changed(self, event: Checkbox.Changed) -> None:
        self.query_one("#ops", SelectionList).disabled = not event.value

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        name = self.query_one("#name", Input).value.strip()
        try:
            validate_name(name)
        except InvalidInputError as err:
            self.query_one("#error", Static).update(str(err))
            return
        seal = self.query_one("#seal", Checkbox).value
        chosen = tuple(self.query_one("#ops", SelectionList).selected)
        defaults = tuple(op for op, default in self.operations.items() if default)
        if seal and not chosen:
            self.query_one("#error", Static).update("choose at least one operation, or unseal")
            return
        self.dismiss(
            TemplateRequest(
                name=name,
                seal=seal,
                operations=None if not seal or set(chosen) == set(defaults) else chosen,
                undefine=self.query_one("#undefine", Checkbox).value,
                force=self.query_one("#force", Checkbox).value,
            )
        )

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


@dataclass(frozen=True)
class DeployRequest:
    name: str
    count: int
    full: bool
    start: bool
    allow_unsealed: bool
    identity: Identity = Identity()


class DeployScreen(ModalScreen[DeployRequest | None]):
    """Name, count, thin or full, start afterwards (and allow an unsealed template); the
    clones' hostname (prefilled `{name}` for a sealed template), an SSH key file, and
    whether they get them as cloud-init seeds (with a static address)."""

    DEFAULT_CSS = _FORM_CSS.format(cls="DeployScreen")
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="deploy_form.cancel")]

    def __init__(self, template: str, *, sealed: bool, seeds: bool = False) -> None:
        super().__init__()
        self.template = template
        self.sealed = sealed
        self.seeds = seeds  # the template gives its clones cloud-init seeds by default

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(
                f"Deploy from '{self.template}'  (Enter plans, Esc cancels)",
                id="title",
                markup=False,
            )
            yield Label("Name (with a count above 1: NAME-1 … NAME-N)")
            yield Input(placeholder="e.g. web", id="name")
            yield Label("Count")
            yield Input(value="1", id="count", type="integer")
            with RadioSet(id="mode"):
                yield RadioButton("Thin (qcow2 overlay on the template)", value=True, id="thin")
                yield RadioButton("Full (independent copy)", id="full")
            yield Checkbox("Start after deploying", id="start")
            yield Label("Hostname ({name}: the clone's name, {n}: its number; empty: keep)")
            yield Input(value=DEFAULT_HOSTNAME if self.sealed else "", id="hostname")
            yield Label("SSH public key file for root (optional)")
            yield Input(placeholder="e.g. ~/.ssh/id_ed25519.pub", id="ssh-key")
            yield Checkbox(
                "As a cloud-init seed (fast; the guest must run cloud-init)",
                value=self.seeds,
                id="cloud-init",
            )
            yield Input(
                placeholder="cloud-init: static address, e.g. 10.0.0.10/24+ (optional)",
                id="ip",
            )
            if not self.sealed:
                yield Checkbox(
                    "Deploy although the template is not sealed (clones share its identity)",
                    id="unsealed",
                )
            yield from error_and_buttons()

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        error = self.query_one("#error", Static)
        name = self.query_one("#name", Input).value.strip()
        try:
            count = int(self.query_one("#count", Input).value or "1")
            validate_name(name if count == 1 else f"{name}-{count}")
        except ValueError:
            error.update("count must be a whole number")
            return
        except InvalidInputError as err:
            error.update(str(err))
            return
        if count < 1:
            error.update("count must be at least 1")
            return
        unsealed = self.query("#unsealed")
        allow = bool(unsealed) and unsealed.first(Checkbox).value
        if not self.sealed and not allow:
            error.update("the template is not sealed: tick the box to deploy anyway")
            return
        hostname = self.query_one("#hostname", Input).value.strip()
        key = self.query_one("#ssh-key", Input).value.strip()
        seeded = self.query_one("#cloud-init", Checkbox).value
        ip = self.query_one("#ip", Input).value.strip() or None
        try:
            identity = Identity.from_options(
                hostname_template=hostname or None,
                keep_hostname=not hostname and not seeded,  # a seed always names the host
                ssh_key_files=[os.path.expanduser(key)] if key else [],
                method="cloud-init" if seeded else "virt-customize",
                ip=ip,
            )
        except InvalidInputError as err:
            error.update(str(err))
            return
        if self.sealed and hostname == DEFAULT_HOSTNAME and not seeded:
            # Left as offered: the default, which applies when the template's disk has an
            # OS (the plan says when it does not), as `virtdeck clone` does.
            identity = replace(identity, hostname=None, hostname_by_default=True)
        self.dismiss(
            DeployRequest(
                name=name,
                count=count,
                full=self.query_one("#full", RadioButton).value,
                start=self.query_one("#start", Checkbox).value,
                allow_unsealed=allow,
                identity=identity,
            )
        )

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


@dataclass(frozen=True)
class ImportRequest:
    host: str
    source: str  # a file of this machine or an http(s) URL
    name: str
    checksum: str | None  # sha256:<hex>, checked when the image is read
    directory: str | None = None  # None: the host's image pool


def name_from_source(source: str) -> str:
    """A template name from an image's file name: debian-12-genericcloud-amd64.qcow2 ->
    debian-12-genericcloud-amd64."""
    base = source.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".qcow2", ".img", ".raw"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base).strip("-.") or "cloud"


class ImportScreen(ModalScreen[ImportRequest | None]):
    """`template import` as a form: the image (file or URL), the template's name, its
    checksum, and the host it goes to (tui.core.cloudimage plans and does the rest)."""

    DEFAULT_CSS = _FORM_CSS.format(cls="ImportScreen")
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="import_form.cancel")]

    def __init__(self, hosts: list[str], host: str) -> None:
        super().__init__()
        self.hosts = hosts
        self.host = host

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("Import a cloud image as a template", id="title", markup=False)
            yield Label("Image: a file of this machine, or an http(s) URL")
            yield Input(
                placeholder="https://cloud.debian.org/…/debian-12-genericcloud-amd64.qcow2",
                id="source",
            )
            yield Label("Template name")
            yield Input(placeholder="default: the image's file name", id="name")
            yield Label("Checksum")
            yield Input(placeholder="sha256:… (from the distribution's SHA256SUMS)", id="checksum")
            yield Label("Host")
            yield Select(
                [(uri, uri) for uri in self.hosts], value=self.host, allow_blank=False,
                id="host", disabled=len(self.hosts) < 2,
            )  # fmt: skip
            yield Label("Image directory there")
            yield Input(placeholder="its image pool (default)", id="dir")
            yield Static(
                "The image is copied or downloaded into the host's image directory, checked, "
                "and defined as a sealed template whose clones get cloud-init seeds. Enter "
                "shows the plan; nothing is written before you confirm it.",
                id="hint",
                markup=False,
            )
            yield from error_and_buttons()

    def on_mount(self) -> None:
        self.query_one("#source", Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        from tui.core.cloudimage import check_checksum, check_directory

        error = self.query_one("#error", Static)
        source = self.query_one("#source", Input).value.strip()
        if not source:
            error.update("give the image: a file path or an http(s) URL")
            return
        name = self.query_one("#name", Input).value.strip() or name_from_source(source)
        checksum = self.query_one("#checksum", Input).value.strip() or None
        directory = self.query_one("#dir", Input).value.strip() or None
        try:  # the checks `template import` makes of its options
            validate_name(name)
            checksum = check_checksum(checksum)
            if directory is not None:
                check_directory(directory)
        except (InvalidInputError, UsageError) as err:
            error.update(str(err).replace("--checksum ", "checksum ").replace("--dir ", ""))
            return
        host = str(self.query_one("#host", Select).value)
        self.dismiss(ImportRequest(host, source, name, checksum, directory))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
