"""Clone identity without libguestfs: the options and key files checked at plan time, the
plan's lines and JSON, the default hostname rule, and execution with an injected
virt-customize runner (parallel, the clone's own images only, a failure undoes every clone).

The real virt-customize runs in test_identity_system (about 40 s per clone under TCG)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.test_templates import Lab
from tui.cli import main
from tui.core import cancel
from tui.core.clones import execute_clone, plan_clone
from tui.core.errors import OperationError
from tui.core.hypervisor import Hypervisor
from tui.core.identity import (
    Customiser,
    Identity,
    IdentityError,
    disk_has_os,
    looks_like_os,
    read_ssh_keys,
)


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


def test_key_files_are_read_and_checked(key: Path, tmp_path: Path) -> None:
    (k,) = read_ssh_keys(key, "deploy")
    assert k.user == "deploy" and k.key == key.read_text().strip()
    assert k.line() == "ssh key for deploy (ed25519 ops@example)"
    bad = {
        "missing.pub": None,
        "private": (tmp_path / "id").read_text(),
        "junk.pub": "hello world\n",
        "damaged.pub": "ssh-ed25519 AAAAC3NzaC1yc2EAAAADAQAB x\n",  # rsa data, ed25519 label
        "empty.pub": "# nothing\n\n",
    }
    why = {
        "missing.pub": "no such file",
        "private": "is a private key: give the .pub file",
        "junk.pub": "line 1: not an OpenSSH public key",
        "damaged.pub": "line 1: the ssh-ed25519 key data is damaged",
        "empty.pub": "holds no public key",
    }
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(IdentityError, match=why[name]) as err:
            read_ssh_keys(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(IdentityError, match="not a valid user name"):
        read_ssh_keys(key, "Root User")


def test_options_that_contradict_or_cannot_be_filled_in_are_refused(key: Path) -> None:
    with pytest.raises(IdentityError, match="contradict"):
        Identity.from_options(hostname_template="{name}", keep_hostname=True)
    with pytest.raises(IdentityError, match=r"only \{name\} and \{n\}"):
        Identity.from_options(hostname_template="{host}")
    with pytest.raises(IdentityError, match="one line"):
        Identity.from_options(first_boot=["echo a\necho b"])
    with pytest.raises(IdentityError, match="--ssh-user needs --ssh-key"):
        Identity.from_options(ssh_user="deploy")
    assert Identity.from_options().hostname_by_default
    assert not Identity.from_options(keep_hostname=True).hostname_by_default
    assert not Identity().hostname_by_default and not Identity().explicit  # the Python default


def test_cli_bad_identity_input_is_one_line_and_exit_2(
    lab: Lab, key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.pub").write_text("not a key\n")
    base = ["-c", lab.uri, "clone", "template-base", "x"]
    cases = [
        (["--ssh-key", str(tmp_path / "bad.pub")], "not an OpenSSH public key"),
        (["--ssh-key", str(tmp_path / "nope.pub")], "no such file"),
        (["--keep-hostname", "--hostname-template", "{name}"], "contradict"),
        (["--hostname-template", "web_{n}"], "is not a valid host name"),
        (["--first-boot", " "], "--first-boot is empty"),
    ]
    for extra, why in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err and err.startswith("virtdeck: "), err
    assert {d.name for d in lab.hv.domains()}.isdisjoint({"x"})
    assert lab.files() == {"web.qcow2", "base.qcow2", "raw-base.qcow2", "paused.qcow2"}


def test_a_remote_host_is_refused_for_customisation(lab: Lab, key: Path) -> None:
    remote = Hypervisor("qemu+tls://far.example/system", lab.hv.conn)
    who = Identity.from_options(ssh_key_files=[key])
    with pytest.raises(IdentityError, match="far.example/system.*not proved to be this one"):
        plan_clone(remote, "template-base", "x", identity=who)


def test_the_plan_lists_each_clones_identity_and_json_carries_it(
    lab: Lab, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    who = Identity.from_options(
        hostname_template="{name}.lab", ssh_key_files=[key], first_boot=["echo hi > /x"]
    )
    plan = plan_clone(lab.hv, "template-base", "w", count=2, identity=who)
    lines = plan.summary()
    for n in (1, 2):
        assert (
            f"  identity: hostname w-{n}.lab; ssh key for root (ed25519 ops@example); "
            "first boot: echo hi > /x"
        ) in lines
    data = plan.to_json()
    assert data["customised"] == ["w-1", "w-2"]
    custom = data["items"][1]["customise"]
    assert custom["hostname"] == "w-2.lab" and custom["first_boot"] == ["echo hi > /x"]
    assert custom["images"] == [[str(lab.images / "w-2.qcow2"), "qcow2"]]  # its own only
    assert custom["ssh_keys"][0]["key"] == key.read_text().strip()

    argv = ["-c", lab.uri, "clone", "template-base", "j", "--ssh-key", str(key),
            "--first-boot", "true", "--dry-run", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    item = out["plan"]["items"][0]
    assert item["customise"]["first_boot"] == ["true"] and out["dry_run"]
    assert not (lab.images / "j.qcow2").exists()


def test_the_default_hostname_needs_a_sealed_template_whose_disk_has_an_os(
    lab: Lab, tmp_path: Path
) -> None:
    # template-base is sealed but blank: virt-customize would find no OS, so it is kept.
    plan = plan_clone(lab.hv, "template-base", "d", identity=Identity.from_options())
    assert plan.items[0].customise is None
    assert any("hostname kept: the template's disk shows no OS" in n for n in plan.summary())
    raw = tmp_path / "fs.img"
    subprocess.run(["truncate", "-s", "8M", str(raw)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True, capture_output=True)
    assert disk_has_os(str(raw), "raw") and not disk_has_os(lab.base, "qcow2")
    assert looks_like_os(bytes(510) + b"\x55\xaa") and not looks_like_os(bytes(4096))


Runner = Callable[[Sequence[str], Callable[[str], None]], int]


def test_customisation_runs_in_parallel_on_each_clones_own_image(
    lab: Lab, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    together = threading.Barrier(2, timeout=20)  # passes only if two run at the same time
    calls: list[list[str]] = []
    lock = threading.Lock()

    def runner(argv: Sequence[str], on_line: Callable[[str], None]) -> int:
        with lock:
            calls.append(list(argv))
            first_two = len(calls) <= 2
            key_file = argv[argv.index("--ssh-inject") + 1].split(":", 2)[2]
            assert Path(key_file).read_text().strip() == key.read_text().strip()
        if first_two:
            together.wait()
        on_line("[   1.0] Setting the hostname")
        return 0

    who = Identity.from_options(hostname_template="{name}", ssh_key_files=[key])
    plan = plan_clone(lab.hv, "template-base", "p", count=3, identity=who)
    seen: list[str] = []
    execute_clone(lab.hv, plan, lambda m, f: seen.append(m), customiser=Customiser(runner))
    assert len(calls) == 3
    for argv in calls:
        assert argv[:3] == ["env", "LIBGUESTFS_BACKEND=direct", "virt-customize"]
        image = argv[argv.index("-a") + 1]
        assert image != lab.base and image.startswith(str(lab.images / "p-"))
        assert argv[argv.index("--hostname") + 1] == Path(image).stem
    for n in (1, 2, 3):
        assert any(m.startswith(f"p-{n}: customise: [") for m in seen)
        assert lab.hv.domain(f"p-{n}").meta.complete


@pytest.mark.parametrize("how", ["fails", "interrupted"])
def test_a_failed_or_interrupted_customisation_undoes_every_clone(
    lab: Lab, key: Path, how: str
) -> None:
    def runner(argv: Sequence[str], on_line: Callable[[str], None]) -> int:
        if how == "interrupted":
            cancel.cancel("interrupted by SIGINT")
        on_line("virt-customize: error: no operating systems were found in the guest image")
        return 1

    who = Identity.from_options(first_boot=["true"])
    plan = plan_clone(lab.hv, "template-base", "f", count=2, identity=who)
    try:
        with pytest.raises((OperationError, cancel.Interrupted)) as err:
            execute_clone(lab.hv, plan, customiser=Customiser(runner))
    finally:
        cancel.reset_cancel()
    if how == "fails":
        assert "customising 'f-" in str(err.value) and "no operating systems" in str(err.value)
    else:
        assert isinstance(err.value, cancel.Interrupted)
    assert not {"f-1", "f-2"} & {d.name for d in lab.hv.domains()}
    assert lab.files() == {"web.qcow2", "base.qcow2", "raw-base.qcow2", "paused.qcow2"}


async def test_deploy_form_checks_the_key_and_the_plan_shows_each_identity(
    lab: Lab, key: Path, tmp_path: Path
) -> None:
    from textual.widgets import Input, Static

    from tests.test_templates_tui import select, start, wait_for
    from tui.app import VirtdeckApp
    from tui.modals.confirm import PlanScreen
    from tui.modals.template_forms import DeployScreen

    (tmp_path / "bad.pub").write_text("not a key\n")
    app = VirtdeckApp([lab.hv])
    async with app.run_test(size=(160, 50)) as pilot:
        pane = await start(app, pilot)
        await select(app, pilot, pane, "template-base")
        await pilot.press("c")
        await wait_for(
            pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen.is_mounted
        )
        form = app.screen
        assert form.query_one("#hostname", Input).value == "{name}"  # a sealed template
        form.query_one("#count", Input).value = "2"
        form.query_one("#name", Input).value = "idf"
        form.query_one("#ssh-key", Input).value = str(tmp_path / "bad.pub")
        form.query_one("#name", Input).focus()
        await pilot.press("enter")
        error = str(form.query_one("#error", Static).render())
        assert "not an OpenSSH public key" in error and app.screen is form
        form.query_one("#ssh-key", Input).value = str(key)
        form.query_one("#hostname", Input).value = "{name}-{n}.lab"
        form.query_one("#name", Input).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        body = str(app.screen.query_one("#body", Static).render())
        for n in (1, 2):
            assert f"identity: hostname idf-{n}-{n}.lab; ssh key for root (ed25519" in body
        await pilot.press("n")
        await wait_for(pilot, lambda: not pane.busy)
    assert not (lab.images / "idf-1.qcow2").exists()


# -- bounded input (issue 17, case 7) ----------------------------------------------------------


def test_key_files_are_bounded_before_they_are_read(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/dev/zero, a FIFO nobody writes to, a 3 GB sparse .pub: one line, exit 2, at once."""
    huge = tmp_path / "huge.pub"
    with open(huge, "wb") as fh:
        fh.truncate(3 * 1024**3)
    fifo = tmp_path / "fifo.pub"
    os.mkfifo(fifo)
    base = ["-c", lab.uri, "clone", "template-base", "x"]
    cases = [
        ("/dev/zero", "--ssh-key /dev/zero: is not a regular file"),
        (str(fifo), f"--ssh-key {fifo}: is not a regular file"),
        (str(huge), f"--ssh-key {huge}: is 3221225472 bytes, more than the 1048576 allowed"),
    ]
    for path, why in cases:
        started = time.monotonic()
        assert main([*base, "--ssh-key", path]) == 2, path
        assert time.monotonic() - started < 1.0, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, err
    assert lab.files() == {"web.qcow2", "base.qcow2", "raw-base.qcow2", "paused.qcow2"}


def test_ssh_key_dev_zero_stays_small(lab: Lab) -> None:
    """The whole command, as an operator runs it: its peak RSS stays far below 200 MB."""
    probe = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=30)\n"
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(p.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "tui", "-c", lab.uri, "clone",
         "template-base", "x", "--ssh-key", "/dev/zero"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    status, rss_kib = (int(v) for v in proc.stdout.split())
    assert status == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is not a regular file" in proc.stderr
    assert rss_kib * 1024 < 200 * 1024**2, rss_kib
