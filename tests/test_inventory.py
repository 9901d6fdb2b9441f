"""Inventory and lifecycle of the core against libvirt's test driver."""

import pytest

from tui.core.errors import ConnectError, NotFoundError, StateError
from tui.core.hypervisor import Hypervisor, default_uris
from tui.core.models import DomainState


def test_domains_lists_every_domain_with_state_and_size(test_hv: Hypervisor) -> None:
    doms = {d.name: d for d in test_hv.domains()}
    assert set(doms) == {"alpha", "beta", "gamma", "template-web"}
    assert doms["alpha"].state is DomainState.RUNNING
    assert doms["beta"].state is DomainState.SHUTOFF
    assert doms["gamma"].state is DomainState.PAUSED
    assert doms["alpha"].vcpus == 2
    assert doms["alpha"].memory_bytes == 1024 * 1024**2
    assert doms["alpha"].disks[0].path == "/var/tmp/vd-alpha.qcow2"
    assert doms["alpha"].disks[0].format == "qcow2"
    assert doms["alpha"].interfaces[0].mac == "52:54:00:aa:00:01"
    assert doms["template-web"].is_template
    assert doms["template-web"].meta.operations == ("ssh-hostkeys",)
    assert all(d.host == test_hv.uri for d in doms.values())


def test_lifecycle_changes_state(test_hv: Hypervisor) -> None:
    test_hv.start("beta")
    assert test_hv.domain("beta").state is DomainState.RUNNING
    test_hv.suspend("beta")
    assert test_hv.domain("beta").state is DomainState.PAUSED
    test_hv.resume("beta")
    test_hv.reboot("beta")
    assert test_hv.domain("beta").state is DomainState.RUNNING
    test_hv.destroy("beta")
    assert test_hv.domain("beta").state is DomainState.SHUTOFF


def test_wrong_state_and_unknown_domain_are_clear_errors(test_hv: Hypervisor) -> None:
    with pytest.raises(StateError, match="'alpha' is already running"):
        test_hv.start("alpha")
    with pytest.raises(StateError, match="not paused"):
        test_hv.resume("alpha")
    with pytest.raises(NotFoundError, match="no domain named 'nosuch'"):
        test_hv.destroy("nosuch")


def test_a_template_is_never_started(test_hv: Hypervisor) -> None:
    with pytest.raises(StateError, match="is a template"):
        test_hv.start("template-web")
    assert test_hv.domain("template-web").state is DomainState.SHUTOFF


def test_unreachable_uri_is_one_line_naming_the_uri() -> None:
    with pytest.raises(ConnectError) as info:
        Hypervisor.open("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    msg = str(info.value)
    assert "\n" not in msg
    assert "qemu+unix:///system?socket=/nonexistent/libvirt-sock" in msg
    assert "virtdeck --demo" in msg


def test_default_uri_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert default_uris([]) == ["qemu:///system"]
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    assert default_uris(None) == ["test:///default"]
    assert default_uris(["a:///", "b:///", "a:///"]) == ["a:///", "b:///"]
