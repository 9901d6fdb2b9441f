"""The Textual dashboard: a thin face over tui.core.

The app owns the connections it was given (tests inject test-driver or real hypervisors), one
error funnel (`report_error`), libvirt events (posted as messages from libvirt's thread) and a
stats poll per host that re-arms itself after each refresh so polls never overlap.

Per-host isolation: every host has its own refresh worker (connect, subscribe, inventory and
stats), its own poll timer and its own state. A host that has not answered within its deadline
(settings.answer_timeout) is shown as not answering (header badge, greyed rows "no answer for
N s") while the others keep updating; a host that failed reconnects by itself with backoff.
No libvirt call ever runs on the UI thread, so a hung host never blocks a key press.

Idle costs nothing: a host's answer that equals what the table shows changes nothing on screen
(the table compares row by row and rewrites only changed cells); the panes hear of the
inventory only when it changed, or when the refresh was asked for (a libvirt event, an
operation, a key), not on every timer poll. The poll adapts: a host with running domains shown
whose CPU % is known (it moves) is read every `poll_interval`; one without is read every
IDLE_POLL_FACTOR times that (its states change by events; libvirt's test driver reports no CPU
time, so its running domains do not count). The header says when the figures were last read.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from textual import work
from textual.app import App, SystemCommand
from textual.screen import Screen
from textual.timer import Timer
from textual.worker import Worker, WorkerState

from tui.core import bases, ops, undo_kinds  # noqa: F401  (every undo kind registered)
from tui.core.errors import VirtdeckError
from tui.core.hypervisor import Hypervisor, start_event_loop
from tui.core.models import DomainEvent, DomainInfo, DomainState, EventKind, HostInfo
from tui.core.session import Session
from tui.core.settings import Settings
from tui.messages import (
    ErrorReported,
    HostLoaded,
    HostsViewChanged,
    LibvirtEvent,
    LifecycleRequested,
    RefreshRequested,
    ShutdownTimedOut,
)
from tui.screens.main import MainScreen
from tui.screens.palette import EverythingCommands

BACKOFF_MAX = 30.0  # seconds between reconnect attempts, at most
IDLE_POLL_FACTOR = 5  # a host without running domains shown is polled this many times slower


@dataclass
class HostState:
    """The UI thread's bookkeeping for one host (never touched by workers)."""

    refreshing: bool = False
    again: bool = False
    started: float = 0.0  # monotonic time the running refresh began
    last_answer: float = 0.0  # monotonic time of the last answer (0: never)
    failures: int = 0  # consecutive failed refreshes (backoff)
    error: str | None = None  # why the last refresh failed
    silent: bool = False  # no answer within the deadline (the refresh is still waiting)
    info: HostInfo | None = None
    timer: Timer | None = None
    polled: bool = True  # the running refresh is the timer's (not an event's or a request's)
    read_at: float = 0.0  # wall-clock time of the last answer (the header shows it)
    reads: int = 0  # answers so far


class VirtdeckApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "virtdeck"
    ENABLE_COMMAND_PALETTE = True
    # The selected row's actions (get_system_commands) and any domain's, template's or
    # snapshot's by typing (tui.screens.palette).
    COMMANDS = App.COMMANDS | {EverythingCommands}

    def __init__(
        self,
        hypervisors: list[Hypervisor],
        *,
        settings: Settings | None = None,
        unreachable: dict[str, str] | None = None,
        poll_interval: float | None = None,
        shutdown_timeout: float | None = None,
    ) -> None:
        super().__init__()
        if not hypervisors:
            raise ValueError("VirtdeckApp needs at least one hypervisor")
        # Too late for connections already open (they get no events): tui.cli.setup() calls
        # it before connecting. Kept for tests that build the app by hand.
        start_event_loop()
        settings = settings or Settings()
        if poll_interval is not None:
            settings = replace(settings, poll_interval=poll_interval)
        if shutdown_timeout is not None:
            settings = replace(settings, shutdown_timeout=shutdown_timeout)
        self.settings = settings
        self.hypervisors = hypervisors
        bases.ask_too(hypervisors)  # asked before a base is deleted or written (issue 17)
        self.poll_interval = settings.poll_interval
        self.shutdown_timeout = settings.shutdown_timeout
        self.hosts: dict[str, HostState] = {hv.uri: HostState() for hv in hypervisors}
        # What the screens and panes read (they get it passed in; they never import the App).
        self.session = Session(
            hypervisors,
            settings,
            not_answering=lambda: self.lost,
            has_answered=lambda: any(st.reads for st in self.hosts.values()),
        )
        self.polls = 0  # host refreshes finished (tests and the benchmark read it)
        self.interrupted: list[ops.Pending] = []  # operations a crash left half-done
        for uri, why in (unreachable or {}).items():
            if uri in self.hosts:
                self.hosts[uri].error = why
                self.hosts[uri].failures = 1
        self._by_host: dict[str, list[DomainInfo]] = {hv.uri: [] for hv in hypervisors}
        self._notified: set[str] = set()  # hosts whose trouble was notified (once each)
        if settings.keys:
            self.set_keymap(settings.keymap)

    @property
    def domains(self) -> list[DomainInfo]:
        """The last inventory, for panes mounted after it."""
        return self.session.domains

    @property
    def lost(self) -> set[str]:
        """Hosts not answering now: lost, unreachable, or silent past their deadline."""
        return {uri for uri, st in self.hosts.items() if st.error is not None or st.silent}

    def get_default_screen(self) -> Screen[None]:
        return MainScreen(self.session)

    @property
    def main(self) -> MainScreen:
        screen = self.screen_stack[0]  # the default screen stays at the bottom
        assert isinstance(screen, MainScreen)
        return screen

    def _shutting_down(self) -> bool:
        """Is the app shutting down? A worker's result or a timer can still arrive while its
        screens are being taken apart (the table already gone): such a message is dropped."""
        return not self.is_running or not self.screen_stack

    def hypervisor(self, host: str) -> Hypervisor:
        return self.session.hypervisor(host)

    # -- what the screens and panes ask for (tui.messages) ----------------------------------

    def on_refresh_requested(self, message: RefreshRequested) -> None:
        self.refresh_inventory(message.host)

    def on_lifecycle_requested(self, message: LifecycleRequested) -> None:
        self.run_lifecycle(message.host, message.name, message.action)

    def on_error_reported(self, message: ErrorReported) -> None:
        self.report_error(message.error)

    def on_hosts_view_changed(self, _message: HostsViewChanged) -> None:
        self._show_hosts()

    # -- start-up ---------------------------------------------------------------------------

    def on_mount(self) -> None:
        if any(hv.demo for hv in self.hypervisors):
            self.title = "virtdeck  DEMO"
        if len(self.hypervisors) > 1:
            self.sub_title = f"{len(self.hypervisors)} hosts"
        self.call_after_refresh(self._show_hosts)  # the main screen composes after this
        for uri, st in self.hosts.items():
            if st.error is not None:
                self._notify_trouble(uri, st.error)
        self.set_interval(1.0, self._watch_deadlines)
        self.refresh_inventory()
        self._listen_for_signals()
        self.find_interrupted()

    # -- interrupts: SIGTERM/SIGHUP unwind what runs; a crash's leftovers are offered back --

    def _listen_for_signals(self) -> None:
        """SIGTERM and SIGHUP (the SSH session dropped) stop a running operation the way a
        failure does: it unwinds, then the dashboard exits with 128 + the signal."""
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, self.interrupt, sig)

    def interrupt(self, sig: int) -> None:
        name = signal.Signals(sig).name
        ops.cancel(f"interrupted by {name}", sig)
        if ops.active():
            self.notify(f"{name}: undoing the running operation, then quitting", timeout=30)

        def exit_when_idle() -> None:
            if not ops.active():
                self.exit(return_code=128 + sig)

        exit_when_idle()
        self.set_interval(0.1, exit_when_idle)

    @work(thread=True, group="recover", exit_on_error=False, description="interrupted operations")
    def find_interrupted(self) -> None:
        scan = ops.scan()
        found = [p for p in scan.pending if p.host in self.hosts]
        if found:
            self.call_from_thread(self._offer_recover, found)
        if scan.broken:
            self.call_from_thread(
                self.notify,
                f"{len(scan.broken)} undo journal(s) cannot be read or were refused "
                f"({scan.broken[0].reason}); 'virtdeck recover' lists them with the reasons",
                severity="warning",
                timeout=30,
            )

    def _offer_recover(self, found: list[ops.Pending]) -> None:
        self.interrupted = found
        titles = "; ".join(f"{p.title} on {p.host}" for p in found)
        self.notify(
            f"{len(found)} operation(s) were left half-done when virtdeck stopped: {titles}. "
            "Roll them back from the command palette (ctrl+p: 'Roll back interrupted "
            "operations') or with 'virtdeck recover --yes'.",
            title="interrupted",
            severity="warning",
            timeout=30,
        )

    @work(thread=True, group="recover", exit_on_error=False, description="rolling back")
    def roll_back_interrupted(self) -> None:
        done: list[str] = []
        failed: list[str] = []
        skipped: list[str] = []
        for item in self.interrupted:
            left = bases.recover(self.hypervisor(item.host), item, skipped)
            (failed if left else done).append(item.title if not left else f"{item.title}: {left}")
        if skipped:  # what changed hands since: kept, and said so
            self.call_from_thread(self.notify, "; ".join(skipped), severity="warning", timeout=30)
        self.interrupted = []
        if done:
            self.call_from_thread(self.notify, f"rolled back: {'; '.join(done)}")
        if failed:
            self.call_from_thread(
                self.notify, f"could not undo: {'; '.join(failed)}", severity="error", timeout=30
            )
        self.call_from_thread(self.refresh_inventory)

    def on_unmount(self) -> None:
        for hv in self.hypervisors:
            hv.detach(self._libvirt_callback, timeout=0.2)

    # -- inventory, one worker per host ------------------------------------------------------

    def refresh_inventory(self, host: str | None = None, *, polled: bool = False) -> None:
        """Refresh every host (or one) now, or right after its running refresh: per host,
        polls never overlap, and a host that hangs delays only itself. `polled`: the timer's
        poll (the panes hear of it only if something changed)."""
        for uri in [host] if host is not None else list(self.hosts):
            st = self.hosts.get(uri)
            if st is None:
                continue
            if st.refreshing:
                st.again = True
                st.polled = st.polled and polled
                continue
            st.polled = polled
            if st.timer is not None:
                st.timer.stop()
                st.timer = None
            st.refreshing = True
            st.started = time.monotonic()
            self._load_host(self.hypervisor(uri), st.info is None)

    @work(thread=True, group="inventory", exit_on_error=False, description="refreshing a host")
    def _load_host(self, hv: Hypervisor, want_info: bool) -> None:
        # Only this host's calls run here: when its daemon hangs, this thread waits (keepalive
        # or the daemon waking ends it) and nothing else does.
        info: HostInfo | None = None
        try:
            if not hv.alive:
                hv.ensure_connected(self.settings.connect_timeout)
                want_info = True
            hv.subscribe(self._libvirt_callback)  # no-op once subscribed
            if want_info:
                info = hv.host_info()
            domains = hv.domains()
        except VirtdeckError as err:
            why = str(err)
            if not hv.alive and "lost" not in why and "no answer" not in why:
                why = f"connection to {hv.uri} lost: {why}"
            self.post_message(HostLoaded(hv.uri, None, why, info))
            return
        except Exception:
            self.post_message(HostLoaded(hv.uri, None, f"{hv.uri}: internal error", info))
            raise  # reported by the error funnel
        self.post_message(HostLoaded(hv.uri, domains, None, info))

    def on_host_loaded(self, message: HostLoaded) -> None:
        st = self.hosts.get(message.host)
        if st is None or self._shutting_down():
            return
        st.refreshing = False
        self.polls += 1
        if message.info is not None:
            st.info = message.info
        if message.error is not None:
            st.error = message.error
            st.failures += 1
            if time.monotonic() - st.started >= self.settings.answer_timeout:
                # It waited out the deadline: "no answer", known now (not only if the
                # once-a-second watch happened to look while it waited).
                st.silent = True
            self._notify_trouble(message.host, message.error)
            delay = min(BACKOFF_MAX, self.poll_interval * 2 ** (st.failures - 1))
        else:
            came_back = st.error is not None or st.silent
            st.error, st.silent, st.failures = None, False, 0
            st.last_answer = time.monotonic()
            if came_back and message.host in self._notified:
                self._notified.discard(message.host)
                self.notify(f"reconnected to {message.host}", title="libvirt")
            st.read_at = time.time()
            domains = message.domains or []
            changed = came_back or domains != self._by_host[message.host]
            self._by_host[message.host] = domains
            st.reads += 1
            delay = self.poll_interval
            # CPU % needs two reads: until the second, a running domain counts as measured.
            if not self.main.shows_running(message.host, measured=st.reads > 1):
                delay *= IDLE_POLL_FACTOR
            if changed or not st.polled:
                self._show_inventory(message.host, tell_panes=changed or not st.polled)
            else:
                self._show_hosts()  # "read at": the figures are fresh, nothing else moved
        if message.error is not None:
            self._show_inventory(message.host)
        if st.again:
            st.again = False
            self.refresh_inventory(message.host, polled=st.polled)
        else:
            host = message.host
            st.timer = self.set_timer(delay, lambda: self.refresh_inventory(host, polled=True))

    def _notify_trouble(self, host: str, why: str) -> None:
        if host not in self._notified:
            self._notified.add(host)
            self.notify(why, title="libvirt", severity="error", timeout=8)

    def _watch_deadlines(self) -> None:
        """Once a second: a refresh older than the deadline makes its host "no answer"."""
        if self._shutting_down():
            return
        now = time.monotonic()
        changed = False
        for uri, st in self.hosts.items():
            late = st.refreshing and now - st.started > self.settings.answer_timeout
            if late and not st.silent:
                st.silent = True
                self._notify_trouble(uri, f"{uri}: no answer for {now - st.started:.0f} s")
            changed = changed or st.silent or st.error is not None
        if changed:  # badges and "no answer for N s" only: the panes need no new inventory
            status = self.host_status()
            self._show_hosts()
            self.main.show_host_status(status)

    def host_status(self) -> dict[str, str]:
        """Host → badge text for hosts not answering ("" for those that are fine)."""
        now = time.monotonic()
        out = {}
        for uri, st in self.hosts.items():
            if st.silent:
                since = st.last_answer or st.started
                out[uri] = f"no answer for {now - since:.0f} s"
            elif st.error is not None:
                since = st.last_answer
                out[uri] = (f"no answer for {now - since:.0f} s" if since else "unreachable") + (
                    "; reconnecting" if not st.refreshing else "; connecting"
                )
        return out

    def _show_hosts(self) -> None:
        self.main.set_hosts(
            [(hv.uri, self.hosts[hv.uri].info, hv.demo) for hv in self.hypervisors],
            self.host_status(),
            {uri: len(domains) for uri, domains in self._by_host.items()},
            max((st.read_at for st in self.hosts.values()), default=0.0),
        )

    def _show_inventory(self, host: str | None = None, *, tell_panes: bool = True) -> None:
        """The table gets `host`'s domains (None: every host's); the panes hear of the whole
        inventory when `tell_panes`."""
        self.session.domains = [d for hv in self.hypervisors for d in self._by_host.get(hv.uri, [])]
        self._show_hosts()
        if host is None:
            self.main.show_domains(self.domains, self.host_status(), tell_panes=tell_panes)
        else:
            self.main.show_domains(
                self._by_host.get(host, []), self.host_status(), host=host, tell_panes=tell_panes
            )

    def _libvirt_callback(self, event: DomainEvent) -> None:
        # Runs on libvirt's event thread: only post.
        self.post_message(LibvirtEvent(event))

    def on_libvirt_event(self, message: LibvirtEvent) -> None:
        event = message.event
        st = self.hosts.get(event.host)
        if st is None or self._shutting_down():
            return
        if event.kind is EventKind.CONNECTION_LOST and st.error is None:
            st.error = f"connection to {event.host} lost; reconnecting"
            self._notify_trouble(event.host, st.error)
            self._show_inventory()
        self.refresh_inventory(event.host)

    # -- errors -----------------------------------------------------------------------------

    def report_error(self, error: BaseException) -> None:
        """The one error funnel: a notification with the core's one-line message."""
        if isinstance(error, VirtdeckError | ops.Interrupted):
            self.notify(str(error), title="virtdeck", severity="error", timeout=8)
        else:
            self.notify(
                f"{type(error).__name__}: {error}", title="unexpected error", severity="error"
            )

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.ERROR and event.worker.error is not None:
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
        if self._shutting_down():
            return
        self.main.offer_force_off(message.host, message.name, message.timeout)

    # -- command palette --------------------------------------------------------------------

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if self.interrupted:
            yield SystemCommand(
                "Roll back interrupted operations",
                "; ".join(p.describe() for p in self.interrupted),
                self.roll_back_interrupted,
            )
        if isinstance(screen, MainScreen):
            yield from screen.row_commands()


_DONE = {
    "start": "started",
    "destroy": "forced off",
    "reboot": "reboot requested",
    "suspend": "suspended",
    "resume": "resumed",
}
