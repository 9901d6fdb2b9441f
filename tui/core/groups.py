"""Groups: several domains, one plan, one confirmation.

A selection (names, `template=T` = the clones whose virtdeck metadata names T as their
template, a glob such as `web-*`) is resolved over the domains of every connected hypervisor
into members, (host, domain) pairs (`select`). `plan_group` then plans each member with the
single-domain planner of its verb (`snapshots.plan_create`, `plan_rollback`,
`removal.plan_remove`, or a lifecycle step) and wraps them in one `GroupPlan`: an `ops.Plan`
whose summary lists every member (grouped by host when there are several) and whose `run()`
carries them out.

Hosts: a plan runs on one hypervisor (`plan.run(hv, progress)`, hv = the plan's `host`). A
group may span hosts, so it is bound, when planned, to the hypervisors it was planned on (the
`hosts` resolver: the CLI's connections, the dashboard's); `run(hv, …)` uses `hv` for its own
host and the resolver for the others. The Plan protocol and its callers are unchanged, and
every member still runs and is journalled on its own host.

What a failure on member k does, said in the plan:
- snapshot: all or nothing. Each snapshot taken is journalled (undo `delete_snapshot`, per
  host) before it is taken, so a failure, Ctrl-C or a crash deletes those already taken
  (at once, or later by `virtdeck recover`).
- rollback and rm: they cannot be undone (the discarded state, the deleted files are gone), so
  the group stops at the failure: members 1..k-1 stay done, k+1.. are not touched.
- start, shutdown, force off, reboot, pause, resume: best effort, every member is tried, a
  line per member, and the group fails (non-zero exit) if any did.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tui.core import ops
from tui.core.errors import (
    ConnectError,
    InvalidInputError,
    NotFoundError,
    OperationError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainInfo, DomainState
from tui.core.progress import Progress, no_progress
from tui.core.snapshots import delete as _snapshot_kinds  # noqa: F401  (delete_snapshot)

HostResolver = Callable[[str], Hypervisor]

LIFECYCLE = ("start", "shutdown", "destroy", "reboot", "suspend", "resume")
VERBS = (*LIFECYCLE, "snapshot", "rollback", "rm")

_LIFECYCLE_DONE = {
    "start": "started",
    "shutdown": "shut off",
    "destroy": "forced off",
    "reboot": "reboot requested",
    "suspend": "paused",
    "resume": "resumed",
}
_LIFECYCLE_TITLE = {
    "start": "Start",
    "shutdown": "Shut down",
    "destroy": "Force off",
    "reboot": "Reboot",
    "suspend": "Pause",
    "resume": "Resume",
}


# -- selection -------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Member:
    host: str
    name: str


def clones_of(domains: Iterable[DomainInfo], template: str) -> list[DomainInfo]:
    """The clones whose virtdeck metadata names `template` as their template."""
    return [d for d in domains if d.meta.role == "clone" and d.meta.source == template]


def matching(domains: Iterable[DomainInfo], pattern: str) -> list[DomainInfo]:
    """The domains whose name matches the glob `pattern` (`web-*`, `db-?`, `[ab]*`)."""
    return [d for d in domains if fnmatch.fnmatchcase(d.name, pattern)]


def select(
    domains: Mapping[str, Sequence[DomainInfo]],
    *,
    names: Sequence[str] = (),
    template: str | None = None,
    match: str | None = None,
) -> list[Member]:
    """The members a selection names, over `domains` (host URI -> its domains): each name
    (found on exactly one host), the clones of `template`, the domains whose name matches the
    glob `match`; in that order, each once. One-line errors: a name on no host or on two, no
    such template, a template without clones, a glob that matches nothing, nothing asked."""
    if not names and template is None and match is None:
        raise InvalidInputError("name at least one domain, or give --template or --match")
    everyone = [d for ds in domains.values() for d in ds]
    out: list[Member] = []
    for name in names:
        where = sorted({d.host for d in everyone if d.name == name})
        if not where:
            raise NotFoundError(f"no domain named '{name}' ('virtdeck ls' lists them)")
        if len(where) > 1:
            raise InvalidInputError(
                f"'{name}' exists on {' and '.join(where)}: pick one with -c URI"
            )
        out.append(Member(where[0], name))
    if template is not None:
        if not any(d.name == template and d.is_template for d in everyone) and not any(
            d.meta.source == template for d in everyone
        ):
            raise NotFoundError(f"no template named '{template}' ('virtdeck template ls')")
        found = clones_of(everyone, template)
        if not found:
            raise InvalidInputError(f"template '{template}' has no clones")
        out += sorted(Member(d.host, d.name) for d in found)
    if match is not None:
        found = matching(everyone, match)
        if not found:
            raise InvalidInputError(f"no domain name matches '{match}'")
        out += sorted(Member(d.host, d.name) for d in found)
    return list(dict.fromkeys(out))


# -- member plans ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LifecyclePlan(ops.PlanDefaults):
    """One lifecycle step of one domain (a group's member; `timeout`: how long a shutdown
    waits for the guest to power off, None: it only asks)."""

    host: str
    domain: str
    action: str
    timeout: float | None = None

    @property
    def title(self) -> str:
        return f"{_LIFECYCLE_TITLE[self.action]} '{self.domain}'?"

    @property
    def confirm_label(self) -> str:
        return _LIFECYCLE_TITLE[self.action]

    @property
    def destructive(self) -> bool:
        return self.action == "destroy"

    def summary(self) -> list[str]:
        line = {
            "destroy": f"force '{self.domain}' off (pull the plug)",
            "shutdown": f"shut '{self.domain}' down",
            "suspend": f"pause '{self.domain}'",
        }.get(self.action, f"{self.action} '{self.domain}'")
        if self.action == "shutdown" and self.timeout is not None:
            line += f" and wait up to {self.timeout:g} s for it to power off"
        return [line]

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        progress(f"{self.action} '{self.domain}'", None)
        getattr(hv, self.action)(self.domain)
        if self.action != "shutdown":
            return f"{self.domain}: {_LIFECYCLE_DONE[self.action]}"
        if self.timeout is None:
            return f"{self.domain}: shutdown requested"
        return self.wait(hv, time.monotonic() + self.timeout)

    def wait(self, hv: Hypervisor, deadline: float) -> str:
        left = max(0.0, deadline - time.monotonic())
        if hv.wait_for_state(self.domain, [DomainState.SHUTOFF], left):
            return f"{self.domain}: shut off"
        raise OperationError(
            f"'{self.domain}' is still running after {self.timeout:g} s (the guest ignored "
            f"the request); force it off with 'virtdeck destroy {self.domain}'"
        )


@dataclass(frozen=True)
class MemberResult:
    host: str
    domain: str
    ok: bool
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "domain": self.domain, "ok": self.ok, "text": self.text}


# -- the group plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupPlan(ops.PlanDefaults):
    """One plan over several domains: one member plan per domain, in order."""

    verb: str
    members: tuple[Any, ...]  # ops.Plan values with .host and .domain (or .name for rm)
    snapshot: str | None = None  # verb "snapshot": its name
    hosts: HostResolver | None = field(default=None, compare=False, repr=False)

    # -- the Plan protocol

    @property
    def host(self) -> str:
        return str(self.members[0].host)

    @property
    def host_list(self) -> list[str]:
        return list(dict.fromkeys(str(m.host) for m in self.members))

    @property
    def names(self) -> list[str]:
        return [member_name(m) for m in self.members]

    @property
    def title(self) -> str:
        n = len(self.members)
        if self.verb == "snapshot":
            return f"Take snapshot '{self.snapshot}' of {n} domains?"
        if self.verb == "rollback":
            return f"Roll {n} domains back to their current snapshot?"
        if self.verb == "rm":
            return f"Remove {n} domains?"
        return f"{_LIFECYCLE_TITLE[self.verb]} {n} domains?"

    @property
    def confirm_label(self) -> str:
        return f"{self.members[0].confirm_label} {len(self.members)}"

    @property
    def destructive(self) -> bool:
        return any(m.destructive for m in self.members)

    @property
    def option(self) -> str | None:
        options = {m.option for m in self.members}
        if len(options) != 1 or None in options:
            return None
        only = next(iter(options))
        return str(only).replace("its own files", "each one's own files")

    def choose(self, on: bool) -> GroupPlan:
        return replace(self, members=tuple(m.choose(on) for m in self.members))

    def summary(self) -> list[str]:
        n = len(self.members)
        lines = [f"{n} domain{'s' if n != 1 else ''}: {', '.join(self.names)}"]
        lines += self.policy()
        several = len(self.host_list) > 1
        for host in self.host_list:
            indent = "  " if several else ""
            if several:
                lines.append(f"on {host}:")
            for m in self.members:
                if m.host != host:
                    continue
                first, *rest = m.summary() or [member_name(m)]
                lines.append(f"{indent}- {about(member_name(m), first)}")
                lines += [f"{indent}    {x}" for x in rest]
        return lines

    def policy(self) -> list[str]:
        """What a failure on one member does (one line)."""
        if self.verb == "snapshot":
            return [
                "all or nothing: if the snapshot fails on one domain, those already taken "
                "on the others are deleted again"
            ]
        if self.verb == "rollback":
            return [
                "a rollback cannot be undone: if one domain fails, the group stops there; "
                "those before it stay rolled back, those after it are not touched"
            ]
        if self.verb == "rm":
            return [
                "a removal cannot be undone once its files are deleted: if one domain fails, "
                "the group stops there; those before it stay removed"
            ]
        return ["each domain is tried, whatever happens to the others"]

    def to_json(self) -> dict[str, Any]:
        return {
            "verb": self.verb,
            "snapshot": self.snapshot,
            "hosts": self.host_list,
            "members": [
                {"host": m.host, "domain": member_name(m), "plan": ops.plan_json(m)}
                for m in self.members
            ],
            "summary": self.summary(),
        }

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        results = self.execute(hv, progress)
        return "\n".join(r.text for r in results)

    # -- carrying it out

    def _resolver(self, hv: Hypervisor | None) -> HostResolver:
        bound = self.hosts

        def resolve(uri: str) -> Hypervisor:
            if hv is not None and uri == hv.uri:
                return hv
            if bound is not None:
                return bound(uri)
            raise OperationError(f"no connection to {uri} for this group")

        return resolve

    def execute(
        self, hv: Hypervisor | None = None, progress: Progress = no_progress
    ) -> list[MemberResult]:
        """Carry the group out; returns a result per member. A lifecycle group tries every
        member and then raises GroupFailed (holding every member's result) if any failed."""
        resolve = self._resolver(hv)
        if self.verb == "snapshot":
            return self._snapshot(resolve, progress)
        if self.verb in LIFECYCLE:
            results = self._lifecycle(resolve, progress)
            failed = [r for r in results if not r.ok]
            if failed:
                raise GroupFailed(self, results)
            return results
        return self._in_order(resolve, progress)

    def _lifecycle(self, resolve: HostResolver, progress: Progress) -> list[MemberResult]:
        results: list[MemberResult] = []
        waiting: list[tuple[LifecyclePlan, Hypervisor]] = []
        for m in self.members:
            assert isinstance(m, LifecyclePlan)
            try:
                ops.check_cancelled()
                hv = resolve(m.host)
                if m.action == "shutdown" and m.timeout is not None:
                    progress(f"shutdown '{m.domain}'", None)
                    hv.shutdown(m.domain)
                    waiting.append((m, hv))
                    continue
                results.append(MemberResult(m.host, m.domain, True, m.run(hv, progress)))
            except VirtdeckError as err:
                results.append(MemberResult(m.host, m.domain, False, about(m.domain, str(err))))
        # Every guest was asked first; they power off together, within one deadline.
        deadline = time.monotonic() + max((m.timeout or 0.0 for m, _ in waiting), default=0.0)
        for m, hv in waiting:
            try:
                results.append(MemberResult(m.host, m.domain, True, m.wait(hv, deadline)))
            except VirtdeckError as err:
                results.append(MemberResult(m.host, m.domain, False, about(m.domain, str(err))))
        order = {member_name(m): i for i, m in enumerate(self.members)}
        return sorted(results, key=lambda r: order[r.domain])

    def _in_order(self, resolve: HostResolver, progress: Progress) -> list[MemberResult]:
        done: list[MemberResult] = []
        for i, m in enumerate(self.members):
            name = member_name(m)
            try:
                ops.check_cancelled()
                text = m.run(resolve(m.host), progress)
            except VirtdeckError as err:
                before = ", ".join(r.domain for r in done) or "none"
                after = ", ".join(member_name(x) for x in self.members[i + 1 :]) or "none"
                what = "rolled back" if self.verb == "rollback" else "removed"
                raise type(err)(
                    f"{self.verb} stopped at '{name}': {err}; {what} before it: {before}; "
                    f"not touched: {after}"
                ) from None
            done.append(MemberResult(m.host, name, True, text))
        return done

    def _snapshot(self, resolve: HostResolver, progress: Progress) -> list[MemberResult]:
        from tui.core import snapshots

        title = f"group snapshot '{self.snapshot}' of {', '.join(self.names)}"
        taken: list[MemberResult] = []
        failure: tuple[str, str] | None = None
        try:
            with contextlib.ExitStack() as stack:
                undos: dict[str, ops.Undo] = {}
                for m in self.members:
                    ops.check_cancelled()  # Ctrl-C between members: the taken ones go again
                    hv = resolve(m.host)
                    if m.host not in undos:
                        here = [x.domain for x in self.members if x.host == m.host]
                        undos[m.host] = stack.enter_context(ops.running(hv, title, domains=here))
                    undo = undos[m.host]
                    token = snapshots.new_token()  # proves the snapshot is ours (create)
                    undo.push(
                        f"delete snapshot '{m.name}' of '{m.domain}'",
                        "delete_snapshot",
                        domain=m.domain,
                        name=m.name,
                        token=token,
                    )
                    try:
                        node = snapshots.create(
                            hv, m, progress, journal=False, token=token, taken=undo.identify
                        )
                    except VirtdeckError as err:
                        recorded = undo.journal.actions[-1].identity is not None
                        if not isinstance(err, ConnectError) and not recorded:
                            # ATOMIC: libvirt took nothing; never delete another's. A lost
                            # connection keeps the step: the daemon may still take it.
                            undo.pop()
                        failure = (m.domain, str(err))
                        raise
                    text = f"{m.domain}: {node.kind} snapshot '{node.name}' taken"
                    taken.append(MemberResult(m.host, m.domain, True, text))
        except VirtdeckError as err:
            if failure is None or "could not undo" in str(err):
                raise
            domain, why = failure
            undone = (
                f"deleted it again on {', '.join(r.domain for r in taken)}"
                if taken
                else "no other domain had been snapshotted"
            )
            raise type(err)(
                f"group snapshot '{self.snapshot}' failed on '{domain}': {why}; {undone}"
            ) from None
        return taken


class GroupFailed(OperationError):
    """Some members of a best-effort group failed; `results` has a line for each member."""

    def __init__(self, plan: GroupPlan, results: list[MemberResult]) -> None:
        failed = [r for r in results if not r.ok]
        ok = [r.domain for r in results if r.ok]
        super().__init__(
            f"{plan.verb}: {len(failed)} of {len(results)} failed: "
            + "; ".join(r.text for r in failed)
            + (f" (done: {', '.join(ok)})" if ok else "")
        )
        self.results = results


def about(name: str, text: str) -> str:
    """`text` about domain `name`, prefixed with the name unless it already says it."""
    return text if f"'{name}'" in text else f"{name}: {text}"


def member_name(plan: Any) -> str:
    return str(getattr(plan, "domain", None) or plan.name)


# -- planning --------------------------------------------------------------------------------


def plan_group(
    hosts: HostResolver,
    verb: str,
    members: Sequence[Member],
    *,
    snapshot: str | None = None,
    external: bool = False,
    disk_only: bool = False,
    description: str = "",
    quiesce: bool = False,
    storage: bool = False,
    backup_dir: Any = None,
    timeout: float | None = None,
    others: Sequence[Any] = (),
    force: bool = False,
) -> GroupPlan:
    """Plan `verb` for every member (each with its single-domain planner); the first member
    that cannot be planned is named in the one-line error, and nothing is changed."""
    from tui.core import removal, snapshots

    if verb not in VERBS:
        raise InvalidInputError(f"a group cannot {verb}")
    if not members:
        raise InvalidInputError("the selection is empty")
    if verb == "snapshot" and not snapshot:
        raise InvalidInputError("a group snapshot needs a name")
    if verb == "rm":
        _refuse_template_with_its_clones(hosts, members)
    plans: list[Any] = []
    for m in members:
        hv = hosts(m.host)
        try:
            if verb == "snapshot":
                assert snapshot is not None
                plans.append(
                    snapshots.plan_create(
                        hv,
                        m.name,
                        snapshot,
                        external=external,
                        disk_only=disk_only,
                        description=description,
                        quiesce=quiesce,
                    )
                )
            elif verb == "rollback":
                plans.append(snapshots.plan_rollback(hv, m.name))
            elif verb == "rm":
                plans.append(
                    removal.plan_remove(
                        hv,
                        m.name,
                        storage=storage,
                        backup_dir=backup_dir,
                        others=others,
                        force=force,
                    )
                )
            else:
                plans.append(LifecyclePlan(hv.uri, m.name, verb, timeout))
        except VirtdeckError as err:
            if len(members) == 1:
                raise
            text = about(m.name, str(err))
            if "nothing was changed" not in text:  # (a refusal that says it already)
                text += " (nothing was changed)"
            raise type(err)(text) from None
    return GroupPlan(verb, tuple(plans), snapshot=snapshot, hosts=hosts)


def _refuse_template_with_its_clones(hosts: HostResolver, members: Sequence[Member]) -> None:
    """A template is removed after its clones are gone (its removal plan asks the storage
    graph, which still sees them): refuse both in one group, saying the order."""
    infos = {}
    for m in members:
        hv = hosts(m.host)
        if hv.exists(m.name):
            infos[m] = hv.domain(m.name)
    for m, info in infos.items():
        if not info.is_template:
            continue
        here = [x for x in infos.values() if x.host == m.host]
        clones = [x.name for x in clones_of(here, m.name)]
        if clones:
            raise InvalidInputError(
                f"template '{m.name}' and its clones ({', '.join(clones)}) are both selected: "
                f"remove the clones first ('virtdeck rm --template {m.name}'), then the template"
            )
