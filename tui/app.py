"""The Textual dashboard: a thin face over tui.core.

The app owns the connections it was given (tests inject test-driver or real hypervisors), one
error funnel (`report_error`), libvirt events (posted as messages from libvirt's thread) and a
stats poll that re-arms itself after each refresh so polls never overlap. Every libvirt call
runs in a thread worker.
"""

from __future__ import annotations

from collections.abc import Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.screen import Screen
from textual.timer import Timer
from textual.worker import Worker, WorkerState

from tui.core.errors import VirtdeckError
from tui.core.hypervisor import Hypervisor, start_event_loop
from tui.core.models import DomainEvent, DomainInfo, DomainState, EventKind
from tui.messages import HostsLoaded, InventoryLoaded, LibvirtEvent, ShutdownTimedOut
from tui.screens.main import MainScreen


class VirtdeckApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "virtdeck"
    ENABLE_COMMAND_PALETTE = True

    def __init__(
        self,
        hypervisors: list[Hypervisor],
        *,
        poll_interval: float = 2.0,
        shutdown_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        if not hypervisors:
            raise ValueError("VirtdeckApp needs at least one hypervisor")
        start_event_loop()
        self.hypervisors = hypervisors
        self.poll_interval = poll_interval
        self.shutdown_timeout = shutdown_timeout
        self.domains: list[DomainInfo] = []  # the last inventory, for panes mounted after it
        self.lost: set[str] = set()
        self._poll_timer: Timer | None = None
        self._refreshing = False
        self._refresh_again = False

    def get_default_screen(self) -> Screen[None]:
        return MainScreen()

    @property
    def main(self) -> MainScreen:
        screen = self.screen_stack[0]  # the default screen stays at the bottom
        assert isinstance(screen, MainScreen)
        return screen

    def hypervisor(self, host: str) -> Hypervisor:
        for hv in self.hypervisors:
            if hv.uri == host:
                return hv
        raise VirtdeckError(f"not connected to {host}")

    # -- start-up ---------------------------------------------------------------------------

    def on_mount(self) -> None:
        if any(hv.demo for hv in self.hypervisors):
            self.title = "virtdeck  DEMO"
        for hv in self.hypervisors:
            hv.subscribe(self._libvirt_callback)
        self.load_hosts()
        self.refresh_inventory()

    def on_unmount(self) -> None:
        for hv in self.hypervisors:
            hv.unsubscribe(self._libvirt_callback)

    @work(thread=True, group="hosts", exit_on_error=False, description="reading host versions")
    def load_hosts(self) -> None:
        hosts = []
        for hv in self.hypervisors:
            try:
                hosts.append(hv.host_info())
            except VirtdeckError:
                continue
        self.post_message(HostsLoaded(hosts))

    def on_hosts_loaded(self, message: HostsLoaded) -> None:
        self.sub_title = f"{len(self.hypervisors)} hosts" if len(self.hypervisors) > 1 else ""
        if self.screen_stack:  # not closing
            self.main.set_hosts(message.hosts)

    # -- inventory --------------------------------------------------------------------------

    def refresh_inventory(self) -> None:
        """Start a refresh now, or right after the one running (polls never overlap)."""
        if self._refreshing:
            self._refresh_again = True
            return
        if self._poll_timer is not None:
            self._poll_timer.stop()
            self._poll_timer = None
        self._refreshing = True
        self._load_inventory()

    @work(thread=True, group="inventory", exit_on_error=False, description="refreshing domains")
    def _load_inventory(self) -> None:
        domains: list[DomainInfo] = []
        failures: dict[str, str] = {}
        for hv in self.hypervisors:
            if not hv.alive and not hv.reconnect():
                failures[hv.uri] = f"connection to {hv.uri} lost; retrying every few seconds"
                continue
            try:
                domains.extend(hv.domains())
            except VirtdeckError as err:
                failures[hv.uri] = str(err)
        self.post_message(InventoryLoaded(domains, failures))

    def on_inventory_loaded(self, message: InventoryLoaded) -> None:
        self._refreshing = False
        if not self.screen_stack:
            return  # a worker's result arriving while the app closes: the screens are gone
        for host, why in message.failures.items():
            if host not in self.lost:
                self.lost.add(host)
                self.notify(why, title="libvirt", severity="error", timeout=8)
        for host in [h for h in self.lost if h not in message.failures]:
            self.lost.discard(host)
            self.notify(f"reconnected to {host}", title="libvirt")
            self.load_hosts()
        self.domains = message.domains
        self.main.show_domains(message.domains)
        if self._refresh_again:
            self._refresh_again = False
            self.refresh_inventory()
        else:
            self._poll_timer = self.set_timer(self.poll_interval, self.refresh_inventory)

    def _libvirt_callback(self, event: DomainEvent) -> None:
        # Runs on libvirt's event thread: only post.
        self.post_message(LibvirtEvent(event))

    def on_libvirt_event(self, message: LibvirtEvent) -> None:
        event = message.event
        if event.kind is EventKind.CONNECTION_LOST and event.host not in self.lost:
            self.lost.add(event.host)
            self.notify(
                f"connection to {event.host} lost; reconnecting", title="libvirt", severity="error"
            )
        self.refresh_inventory()

    # -- errors -----------------------------------------------------------------------------

    def report_error(self, error: BaseException) -> None:
        """The one error funnel: a notification with the core's one-line message."""
        if isinstance(error, VirtdeckError):
            self.notify(str(error), title="virtdeck", severity="error", timeout=8)
        else:
            self.notify(
                f"{type(error).__name__}: {error}", title="unexpected error", severity="error"
            )

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.ERROR and event.worker.error is not None:
            if event.worker.group == "inventory":
                self._refreshing = False
                self._poll_timer = self.set_timer(self.poll_interval, self.refresh_inventory)
            self.report_error(event.worker.error)

    # -- lifecycle actions (called by MainScreen) -------------------------------------------

    @work(thread=True, group="lifecycle", exit_on_error=False, description="domain action")
    def run_lifecycle(self, host: str, name: str, action: str) -> None:
        hv = self.hypervisor(host)
        if action == "shutdown":
            hv.shutdown(name)
            self.call_from_thread(self.notify, f"{name}: shutdown requested")
            if not hv.wait_for_state(name, [DomainState.SHUTOFF], self.shutdown_timeout):
                self.post_message(ShutdownTimedOut(host, name, self.shutdown_timeout))
            return
        getattr(hv, action)(name)
        self.call_from_thread(self.notify, f"{name}: {_DONE[action]}")

    def on_shutdown_timed_out(self, message: ShutdownTimedOut) -> None:
        self.main.offer_force_off(message.host, message.name, message.timeout)

    # -- command palette --------------------------------------------------------------------

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if isinstance(screen, MainScreen):
            yield from screen.row_commands()


_DONE = {
    "start": "started",
    "destroy": "forced off",
    "reboot": "reboot requested",
    "suspend": "suspended",
    "resume": "resumed",
}
