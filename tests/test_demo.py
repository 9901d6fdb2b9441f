"""The demo lab: real images, a test-driver hypervisor, rebuilt when anything is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tui.core import demo
from tui.core.hypervisor import Hypervisor


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "virtdeck" / "demo"


def _info(path: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return list(json.loads(out))


def test_lab_has_a_template_two_thin_clones_and_a_full_one(cache: Path) -> None:
    uri = demo.ensure_lab()
    assert uri == f"test://{cache / 'lab.xml'}"
    base = cache / "template-web.qcow2"
    assert base.stat().st_mode & 0o222 == 0  # the base is read-only
    assert base.stat().st_blocks * 512 >= 48 * 1024**2  # it holds real data
    for thin in ("web-1", "web-2"):
        chain = _info(cache / f"{thin}.qcow2")
        assert [c["filename"] for c in chain] == [str(cache / f"{thin}.qcow2"), str(base)]
    full = _info(cache / "web-3.qcow2")
    assert len(full) == 1 and "backing-filename" not in full[0]

    hv = Hypervisor.open(uri, demo=True)
    try:
        doms = {d.name: d for d in hv.domains()}
        assert set(doms) == {"template-web", "web-1", "web-2", "web-3", "db"}
        assert doms["template-web"].is_template
        assert doms["web-1"].meta.mode == "thin" and doms["web-3"].meta.mode == "full"
        assert doms["web-1"].disks[0].backing_path == str(base)
        assert hv.host_info().demo
    finally:
        hv.close()


def test_deploying_from_the_demo_template_gives_each_clone_its_own_resources(
    cache: Path,
) -> None:
    from tui.core.clones import execute_clone, plan_clone

    hv = Hypervisor.open(demo.ensure_lab(), demo=True)
    try:
        plan = plan_clone(hv, "template-web", "api", count=2)
        kinds = {(r.element, r.kind) for r in plan.items[0].rewrites}
        assert {("os nvram", "copy"), ("serial 0 log", "unique"), ("graphics vnc", "unique"),
                ("tpm tpm-crb emulator", "fresh")} <= kinds  # fmt: skip
        execute_clone(hv, plan)
        template_vars = (cache / "web_VARS.fd").read_bytes()
        assert (cache / "api-1_VARS.fd").read_bytes() == template_vars
        assert (cache / "api-2_VARS.fd").read_bytes() == template_vars
    finally:
        hv.close()


def test_lab_is_rebuilt_when_an_image_is_missing_or_on_reset(cache: Path) -> None:
    demo.ensure_lab()
    web1 = cache / "web-1.qcow2"
    first = web1.stat().st_ino, web1.stat().st_mtime_ns
    demo.ensure_lab()
    assert (web1.stat().st_ino, web1.stat().st_mtime_ns) == first  # kept as it was
    (cache / "web-2.qcow2").unlink()
    demo.ensure_lab()
    assert (cache / "web-2.qcow2").exists()
    again = web1.stat().st_ino, web1.stat().st_mtime_ns
    demo.ensure_lab(reset=True)
    assert (web1.stat().st_ino, web1.stat().st_mtime_ns) != again


def test_cli_demo_lists_the_lab_and_rejects_demo_with_connect(cache: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent.parent)}
    ls = subprocess.run(
        [sys.executable, "-m", "tui", "--demo", "ls", "--json"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert ls.returncode == 0, ls.stderr
    assert {d["name"] for d in json.loads(ls.stdout)} >= {"template-web", "web-1", "db"}
    both = subprocess.run(
        [sys.executable, "-m", "tui", "--demo", "-c", "test:///default", "ls"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert both.returncode == 1
    assert both.stderr.strip() == "virtdeck: --demo and -c/--connect exclude each other"


def test_screenshot_script_renders_every_pane(tmp_path: Path) -> None:
    out = tmp_path / "shots"
    run = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "scripts" / "screenshots.py"), str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    svgs = {p.stem: p.read_text() for p in out.glob("*.svg")}
    assert set(svgs) == {"snapshots", "templates", "usage", "fleet", "details", "group"}
    assert "52:54:00:00:0b:01" in svgs["details"] and "lease" in svgs["details"]
    for text in svgs.values():
        assert text.startswith("<svg") and "DEMO" in text
    assert "NO&#160;ANSWER" in svgs["fleet"] or "NO ANSWER" in svgs["fleet"]  # the silent host
    assert "before-upgrade" in svgs["snapshots"]  # the demo's snapshot tree
    assert "template-web" in svgs["templates"]
    group = svgs["group"].replace("&#160;", " ")  # the group plan: every clone listed
    assert "3 selected" in group and "pre-upgrade" in group
    assert all(f"of '{n}'" in group.replace("&#x27;", "'") for n in ("web-1", "web-2", "web-3"))


def test_dashboard_without_a_terminal_says_so_instead_of_hanging(cache: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent.parent)}
    run = subprocess.run(
        [sys.executable, "-m", "tui", "--demo"],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=30,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip().startswith("virtdeck: the dashboard needs a terminal")


def test_cli_ssh_refuses_in_the_demo(cache: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tui", "--demo", "ssh", "web-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == (
        "virtdeck: ssh is off in the demo: its addresses are invented by libvirt's test "
        "driver (no guest answers there)"
    )
