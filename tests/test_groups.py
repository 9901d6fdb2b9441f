"""Groups on libvirt's test driver: selection, one plan for several domains, the group snapshot
undone when one member fails, the CLI's group shapes and bad input, the dashboard's marks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Checkbox, Input, Static

from tests.waiting import wait_for
from tui import cli
from tui.app import VirtdeckApp
from tui.core import groups, ops
from tui.core import snapshots as S
from tui.core.errors import InvalidInputError, NotFoundError, OperationError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainState, VirtdeckMeta
from tui.core.testdriver import DiskSpec, DomainSpec, node_xml
from tui.modals.confirm import PlanScreen
from tui.modals.group_forms import MatchScreen
from tui.modals.snapshot_forms import NewSnapshotScreen
from tui.widgets.domains import DomainsTable


def fleet(
    prefix: str = "web", states: tuple[str, ...] = ("shutoff", "running", "shutoff")
) -> list[DomainSpec]:
    specs = [
        DomainSpec(f"template-{prefix}", "shutoff",
                   disks=(DiskSpec(f"/var/tmp/vd-{prefix}.qcow2"),),
                   meta=VirtdeckMeta(role="template", sealed=True)),
        DomainSpec("db-1", "shutoff", disks=(DiskSpec("/var/tmp/vd-db-1.qcow2"),)),
    ]  # fmt: skip
    for i, state in enumerate(states, 1):
        specs.append(
            DomainSpec(
                f"{prefix}-{i}",
                state,
                disks=(
                    DiskSpec(
                        f"/var/tmp/vd-{prefix}-{i}.qcow2", backing=f"/var/tmp/vd-{prefix}.qcow2"
                    ),
                ),
                meta=VirtdeckMeta(role="clone", source=f"template-{prefix}", mode="thin"),
            )  # fmt: skip
        )
    return specs


def node(tmp_path: Path, name: str, specs: list[DomainSpec]) -> str:
    path = tmp_path / f"{name}.xml"
    path.write_text(node_xml(specs))
    return f"test://{path}"


@pytest.fixture
def group_uri(tmp_path: Path) -> str:
    return node(tmp_path, "group", fleet())


@pytest.fixture
def group_hv(group_uri: str) -> Iterator[Hypervisor]:
    hv = Hypervisor.open(group_uri)
    yield hv
    hv.close()


def one_host(hv: Hypervisor) -> dict[str, list]:
    return {hv.uri: hv.domains()}


# -- selection -------------------------------------------------------------------------------


def test_select_by_name_template_and_glob(group_hv: Hypervisor) -> None:
    doms = one_host(group_hv)
    by_template = groups.select(doms, template="template-web")
    assert [m.name for m in by_template] == ["web-1", "web-2", "web-3"]
    assert {m.host for m in by_template} == {group_hv.uri}
    mixed = groups.select(doms, names=["db-1", "web-2"], match="web-*")
    assert [m.name for m in mixed] == ["db-1", "web-2", "web-1", "web-3"]  # each once


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({}, InvalidInputError, "at least one domain"),
        ({"names": ["nope"]}, NotFoundError, "no domain named 'nope'"),
        ({"template": "nope"}, NotFoundError, "no template named 'nope'"),
        ({"template": "db-1"}, NotFoundError, "no template named 'db-1'"),
        ({"match": "zz*"}, InvalidInputError, "no domain name matches 'zz*'"),
    ],
)
def test_select_refuses_with_one_line(
    group_hv: Hypervisor, kwargs: dict, error: type[Exception], words: str
) -> None:
    with pytest.raises(error) as info:
        groups.select(one_host(group_hv), **kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_select_refuses_a_name_on_two_hosts_and_a_template_without_clones(
    tmp_path: Path,
) -> None:
    a = Hypervisor.open(node(tmp_path, "a", fleet()))
    b = Hypervisor.open(node(tmp_path, "b", fleet("app", states=())))
    try:
        doms = {a.uri: a.domains(), b.uri: b.domains()}
        with pytest.raises(InvalidInputError, match="'db-1' exists on .* and .*-c URI"):
            groups.select(doms, names=["db-1"])
        with pytest.raises(InvalidInputError, match="template 'template-app' has no clones"):
            groups.select(doms, template="template-app")
    finally:
        a.close()
        b.close()


# -- plans and runs --------------------------------------------------------------------------


def resolver(*hvs: Hypervisor) -> Callable[[str], Hypervisor]:
    return {hv.uri: hv for hv in hvs}.__getitem__


def test_group_snapshot_lists_every_domain_and_takes_them_all(group_hv: Hypervisor) -> None:
    members = groups.select(one_host(group_hv), template="template-web")
    plan = groups.plan_group(resolver(group_hv), "snapshot", members, snapshot="pre")
    lines = plan.summary()
    assert plan.title == "Take snapshot 'pre' of 3 domains?"
    for name in ("web-1", "web-2", "web-3"):
        assert any(f"of '{name}'" in line for line in lines), lines
    assert any("all or nothing" in line for line in lines)
    text = plan.run(group_hv, lambda *_: None)
    assert text.count("snapshot 'pre' taken") == 3
    for name in ("web-1", "web-2", "web-3"):
        assert S.snapshot_tree(group_hv, name).names == ("pre",)
    data = ops.plan_json(plan)
    assert [m["domain"] for m in data["members"]] == ["web-1", "web-2", "web-3"]


def test_group_snapshot_failing_on_the_last_deletes_the_others(group_hv: Hypervisor) -> None:
    members = groups.select(one_host(group_hv), template="template-web")
    plan = groups.plan_group(resolver(group_hv), "snapshot", members, snapshot="pre")
    # Someone takes 'pre' on web-3 between the plan and the run: its member fails.
    S.create(group_hv, S.plan_create(group_hv, "web-3", "pre", description="someone else's"))
    with pytest.raises(OperationError) as info:
        plan.run(group_hv, lambda *_: None)
    message = str(info.value)
    assert "failed on 'web-3'" in message and "deleted it again on web-1, web-2" in message
    assert S.snapshot_tree(group_hv, "web-1").names == ()
    assert S.snapshot_tree(group_hv, "web-2").names == ()
    # web-3's own snapshot is someone else's: untouched
    assert S.snapshot_tree(group_hv, "web-3").get("pre").description == "someone else's"
    assert ops.pending() == [] and not list(ops.journal_dir().glob("*.json"))


def test_group_snapshot_interrupted_after_the_first_deletes_it(group_hv: Hypervisor) -> None:
    members = groups.select(one_host(group_hv), template="template-web")
    plan = groups.plan_group(resolver(group_hv), "snapshot", members, snapshot="pre")

    def progress(text: str, _fraction: float | None) -> None:
        if text == "snapshot 'pre' taken":
            ops.cancel()  # as Ctrl-C or SIGTERM would, once web-1's snapshot is taken

    try:
        with pytest.raises(ops.Interrupted, match="undid 1 step"):
            plan.run(group_hv, progress)
    finally:
        ops.reset_cancel()
    for name in ("web-1", "web-2", "web-3"):
        assert S.snapshot_tree(group_hv, name).names == (), name
    assert not list(ops.journal_dir().glob("*.json"))


def test_delete_snapshot_undo_is_idempotent_and_recoverable(group_hv: Hypervisor) -> None:
    S.create(group_hv, S.plan_create(group_hv, "web-1", "pre"))
    action = ops.UndoAction("delete snapshot 'pre' of 'web-1'", "delete_snapshot",
                            {"domain": "web-1", "name": "pre"})  # fmt: skip
    assert ops.unwind(group_hv, [action]) == []
    assert S.snapshot_tree(group_hv, "web-1").names == ()
    assert ops.unwind(group_hv, [action]) == []  # gone already: not an error
    gone = ops.UndoAction("x", "delete_snapshot", {"domain": "no-such", "name": "pre"})
    assert ops.unwind(group_hv, [gone]) == []


def test_group_rollback_stops_at_the_first_failure(group_hv: Hypervisor) -> None:
    for name in ("web-1", "web-3"):
        S.create(group_hv, S.plan_create(group_hv, name, "pre"))
    members = groups.select(one_host(group_hv), names=["web-1", "web-3"])
    plan = groups.plan_group(resolver(group_hv), "rollback", members)
    assert plan.destructive
    assert any("cannot be undone" in line for line in plan.summary())
    assert plan.run(group_hv, lambda *_: None).count("back at 'pre'") == 2
    with pytest.raises(NotFoundError, match="web-2.*no current snapshot.*nothing was changed"):
        groups.plan_group(
            resolver(group_hv), "rollback", [*members, groups.Member(group_hv.uri, "web-2")]
        )


def test_lifecycle_group_is_best_effort(group_hv: Hypervisor) -> None:
    members = groups.select(one_host(group_hv), template="template-web")
    plan = groups.plan_group(resolver(group_hv), "start", members)
    with pytest.raises(groups.GroupFailed) as info:
        plan.run(group_hv, lambda *_: None)
    results = {r.domain: r.ok for r in info.value.results}
    assert results == {"web-1": True, "web-2": False, "web-3": True}  # web-2 was running
    assert "1 of 3 failed" in str(info.value) and "already running" in str(info.value)
    for name in ("web-1", "web-2", "web-3"):
        assert group_hv.domain(name).state is DomainState.RUNNING


def test_a_group_across_hosts_is_listed_per_host_and_runs_on_each(tmp_path: Path) -> None:
    a = Hypervisor.open(node(tmp_path, "a", fleet()))
    b = Hypervisor.open(node(tmp_path, "b", fleet("app", states=("shutoff",))))
    try:
        doms = {a.uri: a.domains(), b.uri: b.domains()}
        members = groups.select(doms, names=["web-1", "app-1"])
        plan = groups.plan_group(resolver(a, b), "snapshot", members, snapshot="s1")
        lines = plan.summary()
        assert f"on {a.uri}:" in lines and f"on {b.uri}:" in lines
        assert lines.index(f"on {a.uri}:") < lines.index(f"on {b.uri}:")
        plan.run(a, lambda *_: None)
        assert S.snapshot_tree(a, "web-1").names == ("s1",)
        assert S.snapshot_tree(b, "app-1").names == ("s1",)
    finally:
        a.close()
        b.close()


# -- CLI -------------------------------------------------------------------------------------


def test_cli_group_dry_run_json_lists_every_member(
    group_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["-c", group_uri, "snapshot", "create", "pre", "--template", "template-web"]
    assert cli.main([*args, "--dry-run", "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["dry_run"] is True
    assert [m["domain"] for m in data["plan"]["members"]] == ["web-1", "web-2", "web-3"]
    assert "virtdeck: plan: 3 domains: web-1, web-2, web-3" in err


def test_cli_group_lifecycle_prints_a_line_per_domain_and_fails_if_one_did(
    group_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-c", group_uri, "start", "--match", "web-*"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == ["web-1: started", "web-3: started"]
    assert "virtdeck: 'web-2' is already running" in err
    assert "Traceback" not in err


def test_cli_existing_single_shapes_still_work(
    group_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-c", group_uri, "start", "db-1"]) == 0
    assert capsys.readouterr().out == "db-1: start done\n"
    assert cli.main(["-c", group_uri, "snapshot", "create", "web-1", "one", "--dry-run"]) == 0
    assert "internal snapshot 'one' of 'web-1'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "status", "words"),
    [
        (["start"], 2, "name at least one domain"),
        (["rollback"], 2, "name at least one domain"),
        (["rm"], 2, "name at least one domain"),
        (["rm", "web-1", "--force"], 2, "--force only makes sense with --storage"),
        (["snapshot", "create", "a", "b", "--domain", "web-1"], 2, "give only the snapshot NAME"),
        (["snapshot", "create", "a"], 2, "give DOMAIN NAME"),
        (["start", "--template", "nope"], 1, "no template named 'nope'"),
        (["shutdown", "--match", "zz*"], 1, "no domain name matches 'zz*'"),
        (["destroy", "web-1", "nope"], 1, "no domain named 'nope'"),
        (["rm", "--template", "template-web"], 1, "'web-2' is running"),
        (["rm", "template-web", "web-1"], 1, "remove the clones first"),
        (["snapshot", "create", "bad/name", "--template", "template-web"], 1, "snapshot name"),
        (["detach", "web-1", "--bandwidth", "fast"], 2, "'fast' is not a whole number"),
        (["detach", "web-1", "--bandwidth", "0"], 2, "0: give a positive number"),
    ],
)
def test_cli_group_bad_input_is_one_line(
    group_uri: str, capsys: pytest.CaptureFixture[str], argv: list[str], status: int, words: str
) -> None:
    if status == 2:
        with pytest.raises(SystemExit) as info:
            cli.main(["-c", group_uri, *argv])
        assert info.value.code == 2
    else:
        assert cli.main(["-c", group_uri, *argv]) == status
    out, err = capsys.readouterr()
    assert words in err and "Traceback" not in err
    lines = [x for x in err.splitlines() if not x.startswith(("usage:", " "))]
    assert len(lines) == 1, err


# -- the dashboard ---------------------------------------------------------------------------


def marked(app: VirtdeckApp) -> list[str]:
    return [d.name for d in app.screen.query_one(DomainsTable).marked_domains()]


async def ready(app: VirtdeckApp, pilot: Pilot[None]) -> DomainsTable:
    table = app.screen.query_one(DomainsTable)
    await wait_for(pilot, lambda: len(table.domains) == 5)
    await app.workers.wait_for_complete()
    await pilot.pause()
    return table


async def test_marking_keys(group_hv: Hypervisor) -> None:
    app = VirtdeckApp([group_hv])
    async with app.run_test(size=(150, 50)) as pilot:
        table = await ready(app, pilot)
        assert table.select_name("db-1")
        await pilot.press("space")  # marks db-1, moves down
        await wait_for(pilot, lambda: marked(app) == ["db-1"])
        assert app.screen.sub_title == "1 selected"
        assert "●" in str(table.get_cell_at((0, 0)))
        await pilot.press("shift+down")  # marks the row under the cursor and the next
        await wait_for(pilot, lambda: len(marked(app)) == 3)
        await pilot.press("U")
        await wait_for(pilot, lambda: marked(app) == [])
        assert app.screen.sub_title == ""
        # t on a clone: its template's clones
        assert table.select_name("web-2")
        await pilot.press("t")
        await wait_for(pilot, lambda: marked(app) == ["web-1", "web-2", "web-3"])
        assert app.screen.sub_title == "3 selected"
        await pilot.press("escape")
        await wait_for(pilot, lambda: marked(app) == [])
        # m: a glob
        await pilot.press("m")
        await wait_for(pilot, lambda: isinstance(app.screen, MatchScreen) and app.screen.is_mounted)
        app.screen.query_one("#pattern", Input).value = "*-1"
        await pilot.press("enter")
        await wait_for(pilot, lambda: marked(app) == ["db-1", "web-1"])

        # x: one removal plan for both, with the files checkbox; y removes both
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        body = str(app.screen.query_one("#body", Static).render())
        assert "undefine domain 'db-1'" in body and "undefine domain 'web-1'" in body
        assert app.screen.query("#option").first(Checkbox).label.plain.startswith("Also delete")
        await pilot.press("y")
        await wait_for(pilot, lambda: not group_hv.exists("db-1") and not group_hv.exists("web-1"))
        await wait_for(pilot, lambda: marked(app) == [])  # the marks go with their rows
        assert group_hv.exists("web-2") and group_hv.exists("template-web")


async def test_keys_act_on_the_marked_domains_through_one_confirmation(
    group_hv: Hypervisor,
) -> None:
    app = VirtdeckApp([group_hv])
    async with app.run_test(size=(150, 50)) as pilot:
        table = await ready(app, pilot)
        table.mark_clones("template-web")
        await wait_for(pilot, lambda: len(marked(app)) == 3)

        # f: force off, one confirmation naming every marked domain; No changes nothing
        await pilot.press("f")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        body = str(app.screen.query_one("#body", Static).render())
        for name in ("web-1", "web-2", "web-3"):
            assert f"force '{name}' off" in body
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, PlanScreen))
        assert group_hv.domain("web-2").state is DomainState.RUNNING

        # n: one snapshot name for all; y takes it on every one
        await pilot.press("n")
        await wait_for(
            pilot, lambda: isinstance(app.screen, NewSnapshotScreen) and app.screen.is_mounted
        )
        app.screen.query_one("#name", Input).value = "pre"
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        assert "of 3 domains" in str(app.screen.query_one("#title", Static).render())
        await pilot.press("y")
        await wait_for(
            pilot,
            lambda: all(S.snapshot_tree(group_hv, n).names == ("pre",)
                        for n in ("web-1", "web-2", "web-3")),
        )  # fmt: skip

        # R: rollback of all three, destructive (No is focused), y reverts each
        await app.workers.wait_for_complete()
        await pilot.press("R")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        body = str(app.screen.query_one("#body", Static).render())
        assert body.count("revert '") == 3 and "cannot be undone" in body
        await pilot.press("y")
        await app.workers.wait_for_complete()

        # s: start offers one plan for the three
        await wait_for(pilot, lambda: not isinstance(app.screen, PlanScreen))
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        assert "Start 3 domains?" in str(app.screen.query_one("#title", Static).render())
        await pilot.press("n")
        await wait_for(pilot, lambda: not isinstance(app.screen, PlanScreen))


async def test_palette_offers_the_group_actions(group_hv: Hypervisor) -> None:
    app = VirtdeckApp([group_hv])
    async with app.run_test(size=(150, 50)) as pilot:
        table = await ready(app, pilot)
        titles = [c.title for c in app.screen.row_commands()]
        assert "Mark matching domains…" in titles and not any("marked" in t for t in titles)
        table.mark_clones("template-web")
        await wait_for(pilot, lambda: len(marked(app)) == 3)
        commands = {c.title: c for c in app.screen.row_commands()}
        assert "Snapshot 3 marked domains" in commands and "Remove 3 marked domains" in commands
        commands["Start 3 marked domains"].callback()
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        assert "Start 3 domains?" in str(app.screen.query_one("#title", Static).render())
        await pilot.press("y")
        await wait_for(pilot, lambda: all(group_hv.domain(n).state is DomainState.RUNNING
                                          for n in ("web-1", "web-3")))  # fmt: skip


def test_cli_group_across_two_hosts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = node(tmp_path, "a", fleet()), node(tmp_path, "b", fleet("app", states=("shutoff",)))
    argv = ["-c", a, "-c", b, "snapshot", "create", "s1", "--domain", "web-1", "--domain", "app-1"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert f"virtdeck: plan: on {a}:" in err and f"virtdeck: plan: on {b}:" in err
    assert out.splitlines() == ["web-1: internal snapshot 's1' taken",
                                "app-1: internal snapshot 's1' taken"]  # fmt: skip
    # db-1 is on both: the name alone is refused, with the way out
    assert cli.main(["-c", a, "-c", b, "start", "db-1", "web-1"]) == 1
    assert "'db-1' exists on" in capsys.readouterr().err


def test_a_group_refusal_says_nothing_was_changed_once(test_hv: Hypervisor) -> None:
    """A template's refusal already says "nothing was changed"; the group added it again."""
    from tui.core.errors import DependencyError

    members = [groups.Member(test_hv.uri, n) for n in ("alpha", "template-web")]
    with pytest.raises(DependencyError) as err:
        groups.plan_group(resolver(test_hv), "snapshot", members, snapshot="s1")
    assert "it is a template" in str(err.value)
    assert str(err.value).count("nothing was changed") == 1, str(err.value)
