"""The remote storage backend's pure parts: the SSH target of a URI, quoting, refusals."""

from __future__ import annotations

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
