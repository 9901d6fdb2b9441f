"""The per-device rules of a clone's XML (see tui.core.clonexml, which walks the domain):
each handler looks at one `<devices>` child of the template and makes what must be unique
per domain unique (chardev logs and sockets, graphics ports, vsock CIDs), starts it fresh (a
TPM emulator's state), or names it as shared with the reason (host devices, shared
directories, listening TCP ports)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Protocol


class Walk(Protocol):
    """What a device rule records into one clone's rewrite (tui.core.clonexml.CloneWalk)."""

    def add(self, element: str, old: str, new: str, kind: str, why: str) -> None: ...

    def unique(self, element: str, old: str, why: str) -> str: ...

    def shared(self, element: str, what: str, why: str) -> None: ...


_LIBVIRT_CHANNEL_DIR = "/var/lib/libvirt/qemu/channel/"
_CHARDEVS = ("serial", "console", "parallel", "channel")

SOCKET_WHY = "one listening socket per domain"
PASSTHROUGH_WHY = "a host device goes to one domain at a time: only one clone can run at a time"


def _chardev_label(dev: ET.Element) -> str:
    target = dev.find("target")
    if dev.tag == "channel" and target is not None and target.get("name"):
        return f"channel {target.get('name')}"
    port = target.get("port") if target is not None else None
    return f"{dev.tag} {port}" if port is not None else dev.tag


def _chardev(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    label = _chardev_label(dev)
    log = dev.find("log")
    if log is not None and log.get("file"):
        log.set(
            "file",
            walk.unique(
                f"{label} log",
                log.get("file", ""),
                "virtlogd holds a log file for one domain: a second clone could not start",
            ),
        )
    kind = dev.get("type", "pty")
    source = dev.find("source")
    if source is None:
        return
    path = source.get("path")
    if kind == "file" and path:
        source.set("path", walk.unique(f"{label} file", path, "each clone writes its own output"))
    elif kind == "unix" and path:
        if path.startswith(_LIBVIRT_CHANNEL_DIR):
            source.attrib.pop("path")
            walk.add(
                f"{label} socket",
                path,
                "libvirt's automatic per-domain path",
                "dropped",
                "a path in libvirt's channel directory is generated per domain at start",
            )
        elif source.get("mode") == "bind":
            source.set("path", walk.unique(f"{label} socket", path, SOCKET_WHY))
        else:
            walk.shared(
                f"{label} socket",
                path,
                "every clone connects to the same listening program",
            )
    elif kind in ("tcp", "udp", "telnet") and source.get("mode", "connect") == "bind":
        where = f"{source.get('host', '')}:{source.get('service', '')}"
        walk.shared(
            f"{label} {kind} listener",
            where,
            "two clones cannot listen on one port: only one can run at a time",
        )
    elif kind in ("dev", "pipe") and path:
        walk.shared(f"{label} {kind}", path, "every clone opens the same host file")
    elif kind == "pty" and path:
        source.attrib.pop("path")  # the pty of the template's last run (live XML)


def _graphics(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    kind = dev.get("type", "")
    label = f"graphics {kind}"
    old: list[str] = []
    new: list[str] = []
    ports = [f"{a} {dev.get(a)}" for a in ("port", "tlsPort") if _fixed_port(dev.get(a))]
    if ports and dev.get("autoport") != "yes":
        for attr in ("port", "tlsPort"):
            dev.attrib.pop(attr, None)
        dev.set("autoport", "yes")
        old += ports
        new.append("autoport")
    websocket = dev.get("websocket")
    if _fixed_port(websocket):
        dev.set("websocket", "-1")
        old.append(f"websocket {websocket}")
        new.append("websocket -1 (automatic)")
    if old:
        address = dev.get("listen")
        walk.add(
            label,
            ", ".join(old),
            ", ".join(new),
            "unique",
            "two clones cannot listen on one port; libvirt picks a free one at start"
            + (f"; listen address {address} kept" if address else ""),
        )
    if dev.get("socket"):
        dev.set("socket", walk.unique(f"{label} socket", dev.get("socket", ""), SOCKET_WHY))
    for elem in dev.findall("listen"):
        if elem.get("type") == "socket" and elem.get("socket"):
            elem.set("socket", walk.unique(f"{label} socket", elem.get("socket", ""), SOCKET_WHY))


def _fixed_port(value: str | None) -> bool:
    return value not in (None, "", "-1", "0")


def _tpm(dev: ET.Element, walk: Walk, old_uuid: str) -> None:
    backend = dev.find("backend")
    kind = backend.get("type", "") if backend is not None else ""
    label = f"tpm {dev.get('model', '')}".strip()
    if backend is None:
        return
    if kind == "emulator":
        source = backend.find("source")  # an explicit state location (newer libvirt)
        if source is not None:
            backend.remove(source)
        walk.add(
            f"{label} emulator",
            f"state of {old_uuid or 'the template'}",
            "fresh TPM state",
            "fresh",
            "a TPM's keys identify one machine, so clones neither share nor copy the "
            "template's; libvirt keeps swtpm state per domain UUID",
        )
    elif kind == "passthrough":
        device = backend.find("device")
        walk.shared(label, device.get("path", "") if device is not None else "", PASSTHROUGH_WHY)
    elif kind == "external":
        source = backend.find("source")
        walk.shared(
            f"{label} external",
            source.get("path", "") if source is not None else "",
            "one swtpm process serves one domain: only one clone can run at a time",
        )


def _filesystem(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    source = dev.find("source")
    target = dev.find("target")
    tag = target.get("dir", "") if target is not None else ""
    kind = dev.get("type", "mount")
    if source is None:
        return
    if source.get("socket"):
        walk.shared(
            f"filesystem {tag}",
            source.get("socket", ""),
            "an externally started virtiofsd serves one domain: only one clone can run",
        )
        return
    what = source.get("dir") or source.get("file") or source.get("dev") or source.get("name")
    access = "read-only" if dev.find("readonly") is not None else "read-write"
    walk.shared(
        f"filesystem {tag} ({kind})",
        what or "",
        f"clones see the same host files ({access}); give each its own if they must not",
    )


def _hostdev(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    kind = dev.get("type", "")
    source = dev.find("source")
    if kind == "usb" and source is not None and source.find("vendor") is not None:
        vendor, product = source.find("vendor"), source.find("product")
        what = f"{vendor.get('id', '') if vendor is not None else ''}:" + (
            product.get("id", "") if product is not None else ""
        )
    elif kind == "mdev" and source is not None and (address := source.find("address")) is not None:
        what = address.get("uuid", "")
    else:
        what = pci_address(source) if kind == "pci" else _describe(source)
    walk.shared(f"hostdev {kind}".strip(), what, PASSTHROUGH_WHY)


def pci_address(source: ET.Element | None) -> str:
    address = source.find("address") if source is not None else None
    if address is None:
        return _describe(source)
    parts = [address.get(k, "0") for k in ("domain", "bus", "slot", "function")]
    try:
        d, b, s, f = (int(p, 0) for p in parts)
    except ValueError:
        return ":".join(parts)
    return f"{d:04x}:{b:02x}:{s:02x}.{f:x}"


def _describe(elem: ET.Element | None) -> str:
    if elem is None:
        return "?"
    values = [v for e in elem.iter() for v in e.attrib.values()]
    return " ".join(values) or "?"


def _input(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    source = dev.find("source")
    if dev.get("type") in ("evdev", "passthrough") and source is not None:
        what = source.get("dev") or source.get("evdev") or _describe(source)
        walk.shared(f"input {dev.get('type')}", what, PASSTHROUGH_WHY)


def _memory_device(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    path = dev.findtext("source/path")
    if path:
        walk.shared(
            f"memory {dev.get('model', '')}".strip(),
            path.strip(),
            "clones map the same file as guest memory; give each its own if they must not",
        )


def _vsock(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    cid = dev.find("cid")
    if cid is not None and cid.get("auto") != "yes" and cid.get("address"):
        walk.add(
            "vsock cid",
            cid.get("address", ""),
            "automatic",
            "unique",
            "two domains cannot have the same vsock CID",
        )
        cid.attrib.pop("address")
        cid.set("auto", "yes")


def _shmem(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    walk.shared(
        f"shmem {dev.get('name', '')}", "(shared memory)", "shared between domains by design"
    )


def _lease(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    target = dev.find("target")
    walk.shared(
        f"lease {dev.findtext('key') or ''}".strip(),
        target.get("path", "") if target is not None else "",
        "a lease guards one domain: clones holding the same one cannot run together",
    )


def _audio(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    if dev.get("type") == "file" and dev.get("path"):
        dev.set(
            "path", walk.unique("audio file", dev.get("path", ""), "each clone records its own")
        )


def _pstore(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    path_elem = dev.find("path")
    if path_elem is not None and (path_elem.text or "").strip():
        path_elem.text = walk.unique(
            "pstore", (path_elem.text or "").strip(), "the guest's crash records, per domain"
        )


def _passthrough_device(dev: ET.Element, walk: Walk, _uuid: str) -> None:
    if dev.tag == "smartcard" and dev.get("mode") == "host":
        walk.shared("smartcard", "host reader", PASSTHROUGH_WHY)
    elif dev.tag == "redirdev" and dev.get("type") == "tcp":
        source = dev.find("source")
        if source is not None and source.get("mode") == "bind":
            walk.shared(
                "redirdev tcp listener",
                f"{source.get('host', '')}:{source.get('service', '')}",
                "two clones cannot listen on one port: only one can run at a time",
            )


DEVICE_HANDLERS: dict[str, Callable[[ET.Element, Walk, str], None]] = {
    **{tag: _chardev for tag in _CHARDEVS},
    "graphics": _graphics,
    "tpm": _tpm,
    "filesystem": _filesystem,
    "hostdev": _hostdev,
    "input": _input,
    "memory": _memory_device,
    "vsock": _vsock,
    "shmem": _shmem,
    "lease": _lease,
    "audio": _audio,
    "pstore": _pstore,
    "smartcard": _passthrough_device,
    "redirdev": _passthrough_device,
}
