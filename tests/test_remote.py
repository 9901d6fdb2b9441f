"""The remote storage backend's pure parts: the SSH target of a URI, quoting, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from tui.core.hypervisor import Hypervisor
from tui.core.storage import LocalFiles, RemoteFiles, RemoteHostError, files_for
from tui.core.storage.remote import SshTarget, ssh_target
from tui.core.templates import sysprep_for


def test_ssh_target_from_uri() -> None:
    t = ssh_target("qemu+ssh://root@10.0.0.5:2222/system?keyfile=/k/id&no_verify=1")
    assert t == SshTarget(host="10.0.0.5", user="root", port=2222, keyfile="/k/id",
                          no_verify=True)  # fmt: skip
    argv = t.argv(["chmod", "444", "/images/a b; rm -rf /"])
    assert argv[:7] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o",
                        "LogLevel=ERROR"]  # fmt: skip
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-i") + 1] == "/k/id"
    assert "StrictHostKeyChecking=no" in argv and "UserKnownHostsFile=/dev/null" in argv
    assert argv[-2] == "root@10.0.0.5"
    # One shell word per argument: the remote shell never splits or runs the path.
    assert argv[-1] == "chmod 444 '/images/a b; rm -rf /'"
    plain = ssh_target("qemu+ssh://host.example/system")
    assert plain is not None and plain.argv(["true"])[-2:] == ["host.example", "true"]
    assert "StrictHostKeyChecking=no" not in plain.argv(["true"])


@pytest.mark.parametrize(
    "uri",
    ["qemu:///system", "qemu+tls://host/system", "qemu+tcp://host/system", "qemu://host/system",
     "qemu+ssh://-oProxyCommand=x/system"],
)  # fmt: skip
def test_no_ssh_target(uri: str) -> None:
    assert ssh_target(uri) is None


def test_transport_without_ssh_refuses_what_libvirt_cannot_do(test_hv: Hypervisor) -> None:
    remote = Hypervisor("qemu+tls://far.example/system", test_hv.conn)
    files = files_for(remote, "template create")
    assert isinstance(files, RemoteFiles) and isinstance(files_for(test_hv, "x"), LocalFiles)
    with pytest.raises(RemoteHostError, match="over tls, not SSH"):
        files.make_read_only("/images/base.qcow2")
    with pytest.raises(RemoteHostError, match="over tls, not SSH"):
        files.commit("/images/overlay.qcow2")
    with pytest.raises(RemoteHostError, match="virt-sysprep.*over tls, not SSH"):
        sysprep_for(remote)


def test_backups_of_undefined_templates_are_keyed_by_host(
    test_hv: Hypervisor, tmp_path: Path
) -> None:
    from tui.core import domxml
    from tui.core.models import VirtdeckMeta
    from tui.core.templates import backup_templates, host_key

    other = Hypervisor("qemu+tls://far.example/system", test_hv.conn)  # another host
    xml = (
        "<domain type='test'><name>{n}</name><memory>131072</memory>"
        "<os><type>hvm</type></os></domain>"
    )
    for name, host in (("tpl-here", host_key(test_hv)), ("tpl-far", "qemu+tls://far.example/x"),
                       ("tpl-old", None)):  # fmt: skip
        root = domxml.parse(xml.format(n=name))
        domxml.write_meta(root, VirtdeckMeta(role="template", host=host))
        (tmp_path / f"{name}.xml").write_text(domxml.to_string(root))
    assert host_key(test_hv) == test_hv.uri
    assert sorted(b.name for b in backup_templates(tmp_path)) == ["tpl-far", "tpl-here", "tpl-old"]
    # This machine's hypervisor: its own backups and those from before hosts were recorded.
    assert sorted(b.name for b in backup_templates(tmp_path, test_hv)) == ["tpl-here", "tpl-old"]
    far = Hypervisor("qemu+tls://far.example/x", test_hv.conn)
    assert [b.name for b in backup_templates(tmp_path, far)] == ["tpl-far"]
    assert backup_templates(tmp_path, other) == []
