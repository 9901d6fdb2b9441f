"""Seeds for cloud-init's NoCloud datasource, read back from the ISO image they are written as."""

from __future__ import annotations

import json
import os
import stat
from email import message_from_string
from pathlib import Path

import pytest

from tui.core import cloudinit
from tui.core.cloudinit import Network, Seed
from tui.core.identity import IdentityError, read_ssh_keys
from tui.core.private import UnsafeFileError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@example"


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "k.pub"
    path.write_text(KEY + "\n")
    return path


def _body(text: str) -> object:
    return json.loads(text.split("\n", 1)[1] if text.startswith("#") else text)


def test_seed_iso_holds_the_nocloud_files_under_their_names(key: Path) -> None:
    seed = Seed(
        "web-1",
        ssh_keys=read_ssh_keys(key),
        first_boot=("touch /root/first",),
        network=Network("10.99.0.10/24", "10.99.0.1", ("10.99.0.2",)),
        mac="52:54:00:aa:bb:cc",
    )
    data = cloudinit.iso_bytes(seed)
    assert cloudinit.volume_label(data) == "cidata"
    files = cloudinit.read_iso(data)
    assert sorted(files) == ["meta-data", "network-config", "user-data"]
    meta = _body(files["meta-data"])
    assert meta == {"instance-id": seed.instance_id, "local-hostname": "web-1"}
    assert files["user-data"].startswith("#cloud-config\n")
    config = _body(files["user-data"])
    assert isinstance(config, dict)
    assert config["hostname"] == "web-1"
    assert config["ssh_authorized_keys"] == [KEY]
    assert config["disable_root"] is False
    assert config["runcmd"] == [["sh", "-c", "touch /root/first"]]
    net = _body(files["network-config"])
    assert net == {
        "version": 2,
        "ethernets": {
            "nic0": {
                "addresses": ["10.99.0.10/24"],
                "match": {"macaddress": "52:54:00:aa:bb:cc"},
                "routes": [{"to": "0.0.0.0/0", "via": "10.99.0.1"}],
                "nameservers": {"addresses": ["10.99.0.2"]},
            }
        },
    }


def test_label_is_cidata_as_blkid_reads_it() -> None:
    data = cloudinit.iso_bytes(Seed("a"))
    # blkid (what cloud-init's ds-identify asks) reads the primary descriptor's identifier.
    assert cloudinit.volume_label(data).lower() == "cidata"
    assert "network-config" not in cloudinit.read_iso(data)


def test_every_seed_has_its_own_instance_id() -> None:
    assert Seed("a").instance_id != Seed("a").instance_id


def test_a_value_cannot_inject_keys() -> None:
    seed = Seed("a", first_boot=('echo "x"\nhostname: evil',))
    config = _body(seed.cloud_config())
    assert isinstance(config, dict)
    assert config["hostname"] == "a"


def test_operator_user_data_goes_as_a_second_part(tmp_path: Path) -> None:
    own = tmp_path / "ud"
    own.write_text("#cloud-config\npackages: [htop]\n")
    seed = Seed("a", user_data=cloudinit.read_user_data(own))
    message = message_from_string(cloudinit.read_iso(cloudinit.iso_bytes(seed))["user-data"])
    parts = [p for p in message.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/cloud-config"]
    assert "packages: [htop]" in parts[1].get_payload(decode=True).decode()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"packages: [x]\n", "neither"),
        (b"\xff\xfe", "UTF-8"),
        (b"#!" + b"x" * (2 << 20), "MiB|large|bytes|limit"),
    ],
)
def test_bad_user_data_is_one_line(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "ud"
    path.write_bytes(content)
    with pytest.raises(IdentityError, match=why) as err:
        cloudinit.read_user_data(path)
    assert "\n" not in str(err.value)
    with pytest.raises(IdentityError, match="no such file"):
        cloudinit.read_user_data(tmp_path / "missing")


def test_seed_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "seeds" / "a-seed.iso"
    data = cloudinit.iso_bytes(Seed("a"))
    cloudinit.write_seed(path, data)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes() == data
    with pytest.raises(UnsafeFileError, match="exists"):
        cloudinit.write_seed(path, b"other")
    assert path.read_bytes() == data


def test_consecutive_addresses() -> None:
    assert cloudinit.addresses("10.99.0.10/24+", 3) == (
        "10.99.0.10/24",
        "10.99.0.11/24",
        "10.99.0.12/24",
    )
    assert cloudinit.addresses("10.99.0.10/24", 1) == ("10.99.0.10/24",)


@pytest.mark.parametrize(
    ("spec", "count", "why"),
    [
        ("10.99.0.10", 1, "prefix"),
        ("10.99.0.300/24", 1, "not an address"),
        ("10.99.0.10/24", 2, r"end it with '\+'"),
        ("10.99.0.253/24+", 3, "do not fit"),
    ],
)
def test_bad_addresses_are_one_line(spec: str, count: int, why: str) -> None:
    with pytest.raises(IdentityError, match=why):
        cloudinit.addresses(spec, count)


def test_gateway_and_dns_are_checked() -> None:
    assert cloudinit.check_gateway("10.99.0.1", ["10.99.0.10/24"]) == "10.99.0.1"
    with pytest.raises(IdentityError, match="outside"):
        cloudinit.check_gateway("10.98.0.1", ["10.99.0.10/24"])
    with pytest.raises(IdentityError, match="not an IP"):
        cloudinit.check_dns(["1.1.1.1,nope"])
    assert cloudinit.check_dns(["1.1.1.1,9.9.9.9"]) == ("1.1.1.1", "9.9.9.9")


def test_plan_line_never_shows_key_material(key: Path) -> None:
    seed = Seed("a", ssh_keys=read_ssh_keys(key), user_data="#!/bin/sh\necho secret\n")
    assert "AAAA" not in seed.line() and "secret" not in seed.line()
