"""What sealing adds to virt-sysprep, what the plan says, what the metadata records and what
`template ls` shows (libvirt's test driver; virt-sysprep only lists its operations, the seal
itself is recorded, not run). The real seal and boot: test_sealing_system."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.test_templates import Lab
from tui.cli import main
from tui.core import domxml, sealing
from tui.core.models import VirtdeckMeta
from tui.core.templates import (
    Sysprep,
    execute_template,
    list_templates,
    plan_template,
    run_streaming,
)


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    lab = Lab(tmp_path)
    yield lab
    lab.hv.close()


class Recording(Sysprep):
    """virt-sysprep that lists its operations for real and records the sealing argv."""

    def __init__(self) -> None:
        self.argv: list[str] = []

        def runner(argv: Sequence[str], on_line: Callable[[str], None]) -> int:
            if "--list-operations" in argv:
                return run_streaming(argv, on_line)
            self.argv = list(argv)
            return 0

        super().__init__(runner)


def seal(lab: Lab, operations: list[str] | None) -> tuple[list[str], list[str], str]:
    """(the plan's lines, virt-sysprep's argv, the template's name)."""
    sysprep = Recording()
    plan = plan_template(lab.hv, "web", operations=operations, backup_dir=lab.backups,
                         force=True, sysprep=sysprep)  # fmt: skip
    execute_template(lab.hv, plan, sysprep=sysprep)
    return plan.summary(), sysprep.argv, plan.name


def pairs(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def test_the_default_seal_empties_the_machine_id_after_customize_and_installs_the_unit(
    lab: Lab,
) -> None:
    summary, argv, name = seal(lab, None)
    assert "--operations" not in argv  # virt-sysprep's default set, customize included
    assert pairs(argv, "--touch") == ["/etc/machine-id"]
    assert pairs(argv, "--truncate") == ["/etc/machine-id"]  # empty, not missing
    assert "/var/lib/systemd/random-seed" in pairs(argv, "--delete")
    (unit,) = pairs(argv, "--write")
    assert unit.startswith(f"{sealing.UNIT_PATH}:[Unit]") and "ssh-keygen -A" in unit
    assert "Before=ssh.service sshd.service" in unit and "After=sshd-keygen.target" in unit
    assert pairs(argv, "--link") == [
        f"{sealing.UNIT_PATH}:/etc/systemd/system/multi-user.target.wants/{sealing.UNIT}"
    ]
    text = "\n".join(summary)
    assert "empty /etc/machine-id and delete the random seed" in text
    assert f"install {sealing.UNIT}" in text
    t = {t.name: t for t in list_templates(lab.hv, lab.backups)}[name]
    assert t.sealing == ("machine-id", "ssh-host-keys")
    assert t.first_boot.regenerates == ("machine-id", "random-seed", "ssh-host-keys")
    assert t.first_boot.shared == ()


def test_chosen_operations_without_machine_id_keep_it_and_the_plan_says_so(lab: Lab) -> None:
    summary, argv, name = seal(lab, ["ssh-hostkeys", "bash-history"])
    # The unit is a customize option: customize is added so that it runs.
    assert pairs(argv, "--operations") == ["ssh-hostkeys,bash-history,customize"]
    assert "--truncate" not in argv and "--touch" not in argv and "--delete" not in argv
    assert len(pairs(argv, "--write")) == 1
    assert any("keep the machine-id" in line for line in summary)
    t = {t.name: t for t in list_templates(lab.hv, lab.backups)}[name]
    assert t.sealing == ("ssh-host-keys",)
    assert t.first_boot.regenerates == ("ssh-host-keys",)
    assert t.first_boot.shared == ("the machine-id: no machine-id operation when it was sealed",)


def test_operations_without_identity_add_nothing(lab: Lab) -> None:
    summary, argv, name = seal(lab, ["bash-history"])
    assert pairs(argv, "--operations") == ["bash-history"]  # no customize step at all
    assert not {"--touch", "--truncate", "--write", "--link", "--delete"} & set(argv)
    assert any("keep the machine-id" in line for line in summary)
    assert any("keep the SSH host keys" in line for line in summary)
    assert lab.hv.domain(name).meta.sealing == ()  # recorded: nothing added


def test_metadata_is_backwards_compatible() -> None:
    old = VirtdeckMeta(role="template", sealed=True, operations=("machine-id", "customize"))
    root = domxml.parse(f"<domain><metadata>{ns(domxml.meta_xml(old))}</metadata></domain>")
    assert "sealing" not in domxml.meta_xml(old) and domxml.read_meta(root).sealing is None
    for recorded in ((), ("machine-id",), ("machine-id", "ssh-host-keys")):
        meta = VirtdeckMeta(role="template", sealed=True, sealing=recorded)
        root = domxml.parse(f"<domain><metadata>{ns(domxml.meta_xml(meta))}</metadata></domain>")
        assert domxml.read_meta(root).sealing == recorded


def ns(elem: str) -> str:
    return elem.replace("<virtdeck ", f"<virtdeck xmlns='{domxml.NS}' ", 1)


def test_first_boot_of_templates_sealed_before() -> None:
    default = ("machine-id", "ssh-hostkeys", "customize")
    old = sealing.first_boot(True, default, None)
    assert old.regenerates == ("ssh-host-keys?",)
    assert "sealed before virtdeck emptied it" in old.shared[0]
    assert sealing.first_boot(True, ("machine-id",), None).regenerates == ("machine-id",)
    assert sealing.first_boot(False, (), None).shared == (
        "everything: the template was not sealed",
    )


@pytest.mark.parametrize(
    ("xml", "windows"),
    [
        ("<domain><metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/"
         "libvirt/domain/1.0'><libosinfo:os id='http://microsoft.com/win/2k22'/>"
         "</libosinfo:libosinfo></metadata><os><type>hvm</type></os></domain>", True),
        ("<domain><features><acpi/><hyperv mode='custom'><relaxed state='on'/></hyperv>"
         "</features></domain>", True),
        ("<domain><metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/"
         "libvirt/domain/1.0'><libosinfo:os id='http://debian.org/debian/12'/>"
         "</libosinfo:libosinfo></metadata><os><type>hvm</type></os></domain>", False),
    ],
)  # fmt: skip
def test_a_windows_guest_gets_no_additions(xml: str, windows: bool) -> None:
    assert sealing.is_windows(domxml.parse(xml)) is windows
    ops = ("machine-id", "ssh-hostkeys", "customize")
    assert sealing.additions(ops, windows=windows) == (
        () if windows else (sealing.MACHINE_ID, sealing.SSH_HOST_KEYS)
    )


def test_cli_template_ls_shows_what_clones_regenerate_and_warns_what_they_share(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, name = seal(lab, ["ssh-hostkeys", "bash-history"])
    assert main(["-c", lab.uri, "template", "ls", "--backup-dir", str(lab.backups)]) == 0
    out, err = capsys.readouterr()
    header, *rows = out.splitlines()
    assert "FIRST BOOT" in header
    row = next(r for r in rows if r.startswith(name))
    assert "ssh-host-keys" in row.split()
    assert f"template {name}: its clones share the machine-id" in err
    assert main(["-c", lab.uri, "template", "ls", "--json", "--backup-dir", str(lab.backups)]) == 0
    data = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert data[name]["sealing"] == ["ssh-host-keys"]
    assert data[name]["first_boot"]["regenerates"] == ["ssh-host-keys"]
    # The fixture's template was sealed before virtdeck recorded what sealing added.
    assert data["template-base"]["sealing"] is None
    assert data["template-base"]["first_boot"] == {
        "regenerates": ["machine-id"],  # no customize among its operations: nothing wrote one
        "shared": ["the SSH host keys: no ssh-hostkeys operation when it was sealed"],
    }


def test_templates_pane_details_say_what_is_new_and_what_is_shared(lab: Lab) -> None:
    from tui.widgets.templates_pane import details_text

    _, _, name = seal(lab, ["ssh-hostkeys", "bash-history"])
    t = {t.name: t for t in list_templates(lab.hv, lab.backups)}[name]
    text = details_text(t)
    assert f"new       SSH host keys ({sealing.UNIT}" in text
    assert "SHARED    the machine-id: no machine-id operation" in text
