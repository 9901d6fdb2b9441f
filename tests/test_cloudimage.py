"""`virtdeck template import FILE|URL` (issue 22) on the test driver with real image files: a
checksum that does not match, an image that names a backing file, a server that answers
404 leave nothing; the template made is sealed, read-only, records where it came from, and
its clones get cloud-init seeds by default."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_templates import Lab
from tui.cli import main
from tui.cli.templates import cmd_ls
from tui.core import cloudimage, domxml
from tui.core.clones import plan_clone
from tui.core.errors import OperationError
from tui.core.identity import Identity


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    lab = Lab(tmp_path)
    yield lab
    lab.hv.close()


def _image(path: Path, *extra: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), "64M"],
                   check=True)  # fmt: skip
    return path


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _served(directory: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 for `directory`: its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_import_from_a_file_makes_a_sealed_cloud_init_template(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _image(tmp_path / "cloud.qcow2")
    plan = cloudimage.plan_import(
        lab.hv, str(src), "cimg", directory=str(lab.images), checksum=_sha(src),
        virt_type="qemu", backup_dir=tmp_path / "backups",
    )  # fmt: skip
    assert any("check its sha256 against sha256:" in x for x in plan.summary())
    got = cloudimage.execute_import(lab.hv, plan)
    assert got == _sha(src)
    placed = lab.images / "cimg.qcow2"
    assert placed.read_bytes() == src.read_bytes()
    assert not os.stat(placed).st_mode & 0o222  # the base is read-only
    root = domxml.parse(lab.hv.xml("cimg", inactive=True))
    meta = domxml.read_meta(root)
    assert meta.role == "template" and meta.sealed and meta.identity == "cloud-init"
    assert meta.imported == got and meta.source == str(src)
    assert root.get("type") == "qemu"
    assert root.find("devices/disk/driver").get("type") == "qcow2"  # type: ignore[union-attr]
    from tui.core.catalog import get_template

    listed = get_template(lab.hv, "cimg")  # what template ls and the pane show
    assert listed.identity == "cloud-init" and listed.imported == got and listed.shares == ()
    assert cmd_ls(argparse.Namespace(json=False, backup_dir=tmp_path / "backups"), [lab.hv]) == 0
    out = capsys.readouterr().out
    assert f"cimg: imported from {src} ({got})" in out, out
    row = next(x for x in out.splitlines() if x.startswith("cimg "))
    assert "cloud-init seed" in row, row
    # Its clones get seeds without being asked.
    clone = plan_clone(lab.hv, "cimg", "c", identity=Identity.from_options(method=None))
    assert clone.items[0].seed is not None and clone.items[0].customise is None


def test_a_wrong_checksum_or_a_backing_file_leaves_nothing(lab: Lab, tmp_path: Path) -> None:
    src = _image(tmp_path / "cloud.qcow2")
    wrong = "sha256:" + "0" * 64
    plan = cloudimage.plan_import(lab.hv, str(src), "bad", directory=str(lab.images),
                                  checksum=wrong, virt_type="qemu")  # fmt: skip
    with pytest.raises(OperationError, match="nothing was kept"):
        cloudimage.execute_import(lab.hv, plan)
    other = _image(tmp_path / "secret.qcow2")
    tricky = _image(tmp_path / "tricky.qcow2", "-F", "qcow2", "-b", str(other))
    plan = cloudimage.plan_import(lab.hv, str(tricky), "bad", directory=str(lab.images),
                                  virt_type="qemu")  # fmt: skip
    with pytest.raises(OperationError, match="names a backing file"):
        cloudimage.execute_import(lab.hv, plan)
    assert not (lab.images / "bad.qcow2").exists() and not lab.hv.exists("bad")


def test_import_from_a_url_and_a_url_that_is_not_there(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = tmp_path / "www"
    served.mkdir()
    src = _image(served / "cloud.qcow2")
    with _served(served) as base:
        argv = ["-c", lab.uri, "template", "import", f"{base}/cloud.qcow2", "--name", "u",
                "--dir", str(lab.images), "--checksum", _sha(src),
                "--virt-type", "qemu"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert (lab.images / "u.qcow2").read_bytes() == src.read_bytes()
        assert main([*argv[:4], f"{base}/nope.qcow2", "--name", "v", "--dir",
                     str(lab.images)]) == 1  # fmt: skip
        err = capsys.readouterr().err
        assert "404" in err and err.strip().count("\n") == 0, err
    assert not (lab.images / "v.qcow2").exists()
    assert stat.S_ISREG(os.stat(lab.images / "u.qcow2").st_mode)


def test_bad_import_input_is_one_line_and_exit_2(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _image(tmp_path / "c.qcow2")
    base = ["-c", lab.uri, "template", "import"]
    for argv, says in (
        ([str(src), "--name", "x", "--checksum", "md5:abc"], "give sha256:<64 hex digits>"),
        ([str(src), "--name", "x", "--dir", "rel/dir"], "is not an absolute path"),
        ([str(tmp_path / "none.qcow2"), "--name", "x"], "no such file"),
        (["ftp://h/x.img", "--name", "x"], "only a file or an http(s):// URL"),
        ([str(src), "--name", "x", "--memory", "1"], "give MiB from 64"),
    ):
        assert main([*base, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert main([*base, str(src), "--name", "template-base"]) == 1
    assert "already exists" in capsys.readouterr().err


async def test_the_import_form_plans_and_imports(lab: Lab, tmp_path: Path) -> None:
    """Key I in the Templates pane: bad input is said in the form; a file with its checksum
    is planned, confirmed and imported as a template."""
    from textual.widgets import Input, Static

    from tests.test_templates_tui import start, wait_for
    from tui.app import VirtdeckApp
    from tui.modals.confirm import PlanScreen
    from tui.modals.template_forms import ImportScreen, name_from_source

    assert name_from_source("https://x/debian-12-genericcloud-amd64.qcow2") == (
        "debian-12-genericcloud-amd64"
    )
    src = _image(tmp_path / "noble-server.img")
    app = VirtdeckApp([lab.hv])
    async with app.run_test(size=(160, 50)) as pilot:
        pane = await start(app, pilot)
        await pilot.press("I")
        await wait_for(
            pilot, lambda: isinstance(app.screen, ImportScreen) and app.screen.is_mounted
        )
        form = app.screen
        error = form.query_one("#error", Static)
        await pilot.press("enter")
        assert "give the image" in str(error.render())
        form.query_one("#source", Input).value = str(src)
        form.query_one("#checksum", Input).value = "md5:abc"
        await pilot.press("enter")
        assert "give sha256:<64 hex digits>" in str(error.render())
        form.query_one("#checksum", Input).value = _sha(src)
        form.query_one("#dir", Input).value = "relative/dir"
        await pilot.press("enter")
        assert "not an absolute path" in str(error.render())
        form.query_one("#dir", Input).value = str(lab.images)
        form.query_one("#source", Input).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        body = str(app.screen.query_one("#body", Static).render())
        assert f"copy {src}" in body and "check its sha256 against sha256:" in body, body
        await pilot.press("y")
        await wait_for(pilot, lambda: lab.hv.exists("noble-server") and not pane.busy)
    meta = lab.hv.domain("noble-server").meta
    assert meta.role == "template" and meta.identity == "cloud-init" and meta.imported == _sha(src)
    assert (lab.images / "noble-server.qcow2").read_bytes() == src.read_bytes()
