"""Clones with a cloud-init seed each (`clone --identity cloud-init`, issue 22): the plan, the
seed image and its CD-ROM, the options that need a seed, and `rm --storage` taking the seed
(the one removable medium virtdeck deletes: it made it and recorded where)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_templates import Lab
from tui.cli import main
from tui.core import cloudinit, domxml
from tui.core.clones import execute_clone, plan_clone, with_seed_cdrom
from tui.core.identity import Identity, IdentityError
from tui.core.removal import execute_remove, plan_remove


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    lab = Lab(tmp_path)
    yield lab
    lab.hv.close()


@pytest.fixture
def key(tmp_path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops@example", "-f",
         str(tmp_path / "id")], check=True)  # fmt: skip
    return tmp_path / "id.pub"


def _body(text: str) -> object:
    return json.loads(text.split("\n", 1)[1] if text.startswith("#") else text)


def test_each_clone_gets_its_own_seed_on_a_cdrom_and_rm_storage_takes_it(
    lab: Lab, key: Path
) -> None:
    who = Identity.from_options(
        method="cloud-init", ssh_key_files=[key], ip="10.99.0.10/24+", gateway="10.99.0.1"
    )
    plan = plan_clone(lab.hv, "template-base", "web", count=3, identity=who)
    assert [i.customise for i in plan.items] == [None] * 3  # no virt-customize
    lines = plan.summary()
    assert any(
        "identity: cloud-init seed: hostname web-2; ssh key for root (ed25519 ops@example); "
        "address 10.99.0.11/24, gateway 10.99.0.1" in x
        for x in lines
    ), lines
    data = plan.to_json()
    assert data["seeded"] == ["web-1", "web-2", "web-3"]
    assert "AAAA" not in json.dumps(data)  # the plan never carries the keys themselves
    execute_clone(lab.hv, plan)

    ids = set()
    for n, item in enumerate(plan.items, 1):
        path = lab.images / f"web-{n}-seed.iso"
        assert item.seed_path == str(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it holds keys
        files = cloudinit.read_iso(path.read_bytes())
        meta = _body(files["meta-data"])
        assert isinstance(meta, dict) and meta["local-hostname"] == f"web-{n}"
        ids.add(meta["instance-id"])
        config = _body(files["user-data"])
        assert isinstance(config, dict)
        assert config["ssh_authorized_keys"] == [key.read_text().strip()]
        net = _body(files["network-config"])
        assert isinstance(net, dict)
        nic = net["ethernets"]["nic0"]
        assert nic["addresses"] == [f"10.99.0.{9 + n}/24"]
        assert nic["match"] == {"macaddress": item.macs[0]}
        root = domxml.parse(lab.hv.xml(f"web-{n}", inactive=True))
        cdrom = root.find("devices/disk[@device='cdrom']")
        assert cdrom is not None and cdrom.find("readonly") is not None
        assert cdrom.find("source").get("file") == str(path)  # type: ignore[union-attr]
        assert domxml.read_meta(root).seed == str(path)
        assert domxml.read_meta(root).complete
    assert len(ids) == 3  # cloud-init runs its per-instance modules once per id
    assert domxml.read_meta(domxml.parse(lab.hv.xml("web-2"))).address == "10.99.0.11/24"
    with pytest.raises(IdentityError, match="10.99.0.12 is already given to 'web-3'"):
        plan_clone(lab.hv, "template-base", "more", count=2, identity=Identity.from_options(
            method="cloud-init", ip="10.99.0.12/24+"))  # fmt: skip
    with pytest.raises(IdentityError, match="already given"):
        plan_clone(lab.hv, "template-base", "more", count=1, identity=Identity.from_options(
            method="cloud-init", ip="10.99.0.10/24"))  # fmt: skip

    keep = plan_remove(lab.hv, "web-1")
    assert str(lab.images / "web-1-seed.iso") not in keep.delete_files
    gone = plan_remove(lab.hv, "web-2", storage=True)
    assert str(lab.images / "web-2-seed.iso") in gone.delete_files
    assert not any("seed" in f for f in gone.foreign), gone.foreign
    execute_remove(lab.hv, gone)
    assert not (lab.images / "web-2-seed.iso").exists()
    assert (lab.images / "web-3-seed.iso").exists()


def test_a_cdrom_somebody_else_put_at_a_recorded_path_is_kept(lab: Lab) -> None:
    """The metadata names the seed, but the CD-ROM now holds another file: neither goes."""
    plan = plan_clone(lab.hv, "template-base", "s", identity=Identity.from_options(
        method="cloud-init"))  # fmt: skip
    execute_clone(lab.hv, plan)
    other = lab.images / "installer.iso"
    other.write_bytes(b"x" * 4096)
    seed = lab.images / "s-seed.iso"
    xml = lab.hv.xml("s", inactive=True).replace(f"<source file='{seed}'/>",
                                                 f"<source file='{other}'/>")  # fmt: skip
    assert str(other) in xml
    lab.hv.conn.defineXML(xml)
    gone = plan_remove(lab.hv, "s", storage=True)
    assert str(other) not in gone.delete_files
    assert str(lab.images / "s-seed.iso") not in gone.delete_files


def test_seed_options_without_a_seed_and_bad_addresses_are_one_line_exit_2(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(IdentityError, match="add --identity cloud-init"):
        Identity.from_options(ip="10.0.0.1/24")
    with pytest.raises(IdentityError, match="add --ip"):
        Identity.from_options(method="cloud-init", gateway="10.0.0.1")
    with pytest.raises(IdentityError, match="give --hostname-template instead"):
        plan_clone(lab.hv, "template-base", "k", identity=Identity.from_options(
            method="cloud-init", keep_hostname=True))  # fmt: skip
    base = ["-c", lab.uri, "clone", "template-base", "b", "--identity", "cloud-init"]
    for extra, says in (
        (["--count", "3", "--ip", "10.0.0.10/24"], "end it with '+'"),
        (["--count", "3", "--ip", "10.0.0.253/24+"], "do not fit"),
        (["--ip", "10.0.0.10/24", "--gateway", "10.1.0.1"], "outside 10.0.0.0/24"),
        (["--ip", "nonsense"], "give an address with its prefix"),
        (["--user-data", "/nonexistent"], "no such file"),
    ):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert main(["-c", lab.uri, "clone", "template-base", "b", "--ip", "10.0.0.1/24"]) == 2
    assert "--identity cloud-init" in capsys.readouterr().err
    assert not list(lab.images.glob("b-*")) and not (lab.images / "b.qcow2").exists()


def test_the_seed_cdrom_takes_a_free_slot_of_the_machines_bus() -> None:
    pc = (
        "<domain><os><type machine='pc-i440fx-7.2'>hvm</type></os><devices>"
        "<disk device='cdrom'><target dev='hdc' bus='ide'/></disk></devices></domain>"
    )
    root = domxml.parse(with_seed_cdrom(pc, "/i/s.iso"))
    assert [t.get("dev") for t in root.findall("devices/disk/target")] == ["hdc", "hdd"]
    q35 = "<domain><os><type machine='pc-q35-7.2'>hvm</type></os><devices/></domain>"
    target = domxml.parse(with_seed_cdrom(q35, "/i/s.iso")).find("devices/disk/target")
    assert target is not None and (target.get("dev"), target.get("bus")) == ("sda", "sata")


async def test_the_deploy_form_offers_seeds_with_a_static_address(lab: Lab, key: Path) -> None:
    from textual.widgets import Checkbox, Input, Static

    from tests.test_templates_tui import select, start, wait_for
    from tui.app import VirtdeckApp
    from tui.modals.confirm import PlanScreen
    from tui.modals.template_forms import DeployScreen

    app = VirtdeckApp([lab.hv])
    async with app.run_test(size=(160, 50)) as pilot:
        pane = await start(app, pilot)
        await select(app, pilot, pane, "template-base")
        await pilot.press("c")
        await wait_for(
            pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen.is_mounted
        )
        form = app.screen
        form.query_one("#name", Input).value = "sf"
        form.query_one("#count", Input).value = "2"
        form.query_one("#ip", Input).value = "10.99.0.10/24+"
        form.query_one("#name", Input).focus()
        await pilot.press("enter")  # an address without a seed: said in the form
        assert "add --identity cloud-init" in str(form.query_one("#error", Static).render())
        form.query_one("#cloud-init", Checkbox).value = True
        form.query_one("#ssh-key", Input).value = str(key)
        form.query_one("#name", Input).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        body = str(app.screen.query_one("#body", Static).render())
        assert "identity: cloud-init seed: hostname sf-2; ssh key for root" in body, body
        assert "address 10.99.0.11/24" in body and "sf-2-seed.iso" in body, body
        await pilot.press("y")
        await wait_for(pilot, lambda: (lab.images / "sf-2-seed.iso").exists() and not pane.busy)
    assert cloudinit.read_iso((lab.images / "sf-1-seed.iso").read_bytes())["meta-data"]
