"""A clone's domain XML from its template's: every per-domain resource made unique, copied,
fresh, or named as shared.

virt-clone (virt-manager's `virtinst/cloner.py`) makes "elements which require uniqueness"
unique; this walks the whole definition with the same aim, so clones of one template run side
by side: serial/console/parallel/channel log files, output files and unix sockets get per-clone
paths; the UEFI variables file (`<os><nvram>`) becomes a per-clone copy of the template's
(its boot entries survive); fixed VNC/SPICE ports become automatic; a TPM emulator starts
fresh (libvirt keeps swtpm state per domain UUID); a fixed vsock CID and a VM generation ID
are renewed. What cannot be made unique (host devices passed through, shared directories,
static security labels, a TCP port a chardev listens on, unknown elements that name a host
path) is kept and named in a "shared-warning" record, so the plan says it instead of producing
clones that cannot run together.

Pure: no libvirt and no file system. The caller supplies the clone's identity (name, UUID,
MACs, disk mapping, whether the template's NVRAM file exists) and gets the new XML, the
`Rewrite` records the plan shows and the files to copy.
"""

from __future__ import annotations

import copy
import posixpath
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tui.core import domxml
from tui.core.clonedevices import DEVICE_HANDLERS, PASSTHROUGH_WHY, SOCKET_WHY, pci_address
from tui.core.errors import InvalidInputError
from tui.core.models import VirtdeckMeta

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

#: Rewrite kinds: a new per-clone value; a per-clone copy of the template's file; new state
#: the clone starts with; something left out (libvirt makes it); kept although clones share it.
KINDS = ("unique", "copy", "fresh", "dropped", "shared-warning")

# libvirt regards a channel socket under its own channel directory as generated (it drops such
# a path from the inactive XML and makes a per-domain one at start).
# Where a host path is expected and shared by design (read-only inputs, host tuning, the
# emulator), or handled by the disk code: the scan for unknown paths skips these subtrees.
_BENIGN_TOP = {"description", "title", "metadata", "os", "resource", "blkiotune", "bootloader"}
_BENIGN_DEVICES = {"emulator", "disk", "rng", "video", "controller", "memballoon", "watchdog"}


@dataclass(frozen=True)
class Rewrite:
    """One change (or deliberate non-change) to a per-domain resource, with the reason."""

    element: str  # e.g. "serial 0 log", "os nvram", "graphics vnc"
    old: str
    new: str
    kind: str  # one of KINDS
    why: str

    def line(self) -> str:
        """The change in a few words (the reason is separate: plans print it once)."""
        if self.kind == "shared-warning":
            return f"{self.element} {self.old} is shared by every clone"
        if self.kind == "copy":
            return f"{self.element}: copy of {self.old} -> {self.new}"
        if self.kind == "dropped":
            return f"{self.element}: {self.old} dropped ({self.new})"
        if self.kind == "fresh":
            return f"{self.element}: {self.new}"
        return f"{self.element}: {self.old} -> {self.new}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FileCopy:
    """A file the clone gets a copy of (the template's NVRAM); bytes filled in by the planner."""

    what: str
    source: str
    destination: str
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CloneIdentity:
    """What the caller decided for one clone."""

    name: str
    uuid: str
    macs: tuple[str, ...]  # one per <interface>, in document order
    disks: tuple[tuple[str, str, str], ...]  # (target, new path, new format) per own disk
    meta: VirtdeckMeta
    # Names to replace in the template's file names (the template's, the VM it was made from):
    # web-serial.log of template-web (made from web) becomes web-1-serial.log for clone web-1.
    old_names: tuple[str, ...] = ()
    nvram_present: bool = True  # does the template's NVRAM file exist?


@dataclass(frozen=True)
class CloneXml:
    xml: str
    rewrites: tuple[Rewrite, ...]
    copies: tuple[FileCopy, ...]


def interface_count(root: ET.Element) -> int:
    return len(root.findall("./devices/interface"))


def nvram_path(root: ET.Element) -> str | None:
    """The template's NVRAM file, if it names a local one (`<nvram>PATH</nvram>` or libvirt
    8.5's `<nvram type='file'><source file=PATH/></nvram>`)."""
    nvram = root.find("os/nvram")
    if nvram is None or nvram.get("type", "file") != "file":
        return None
    source = nvram.find("source")
    path = source.get("file") if source is not None else (nvram.text or "").strip()
    return path or None


def clone_path(path: str, old_names: Sequence[str], new: str) -> str:
    """A per-clone path in the same directory: the template's name in the file name replaced
    by the clone's (web-serial.log -> web-1-serial.log), else the clone's name appended before
    the extension (serial.log -> serial-web-1.log). Never the template's own path."""
    directory, base = posixpath.split(path)
    for old in sorted({n for n in old_names if n}, key=len, reverse=True):
        pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(old)}(?![A-Za-z0-9])")
        if pattern.search(base):
            candidate = posixpath.join(directory, pattern.sub(lambda _: new, base, count=1))
            if candidate != path:
                return candidate
    stem, ext = base, ""
    if "." in base.lstrip(".") and len(base.rsplit(".", 1)[1]) <= 7:
        stem, ext = base.rsplit(".", 1)
        ext = "." + ext
    return posixpath.join(directory, f"{stem}-{new}{ext}")


class CloneWalk:
    """One clone's rewrite: keeps the old -> new path map (a console repeats its serial's log
    file: both get the same new one) and the records."""

    def __init__(self, ident: CloneIdentity) -> None:
        self.ident = ident
        self.paths: dict[str, str] = {}
        self.rewrites: list[Rewrite] = []
        self.copies: list[FileCopy] = []
        self.handled: set[int] = set()  # id() of elements whose subtree was looked at

    def add(self, element: str, old: str, new: str, kind: str, why: str) -> None:
        self.rewrites.append(Rewrite(element, old, new, kind, why))

    def new_path(self, old: str) -> str:
        """The clone's path for the template's `old` (the same one each time it is asked)."""
        if old not in self.paths:
            new = clone_path(old, self.ident.old_names, self.ident.name)
            n = 2
            while new in self.paths.values():  # two template paths that map alike
                new = clone_path(old, (), f"{self.ident.name}-{n}")
                n += 1
            self.paths[old] = new
        return self.paths[old]

    def unique(self, element: str, old: str, why: str) -> str:
        """The clone's path for `old`, recorded the first time it is seen."""
        seen = old in self.paths
        new = self.new_path(old)
        if not seen:
            self.add(element, old, new, "unique", why)
        return new

    def shared(self, element: str, what: str, why: str) -> None:
        self.add(element, what, what, "shared-warning", why)


def clone_xml(template: ET.Element, ident: CloneIdentity) -> CloneXml:
    """The clone's XML, what was rewritten (or kept although shared) and why, files to copy.

    Raises InvalidInputError when the clone could not get a working definition (a missing
    NVRAM file with no firmware template to start a fresh one from)."""
    root = copy.deepcopy(template)
    walk = CloneWalk(ident)
    old_uuid = (root.findtext("uuid") or "").strip()
    _identity(root, ident)
    _interfaces(root, ident, walk)
    _disks(root, ident)
    _nvram(root, walk)
    devices = root.find("devices")
    if devices is not None:
        for dev in list(devices):
            handler = DEVICE_HANDLERS.get(dev.tag)
            if handler is not None:
                handler(dev, walk, old_uuid)
                walk.handled.add(id(dev))
    _sysinfo(root, ident, walk)
    _seclabels(root, walk)
    _genid(root, walk)
    _qemu_commandline(root, walk)
    _unknown_paths(root, walk)
    root.attrib.pop("id", None)  # a running domain's number (live XML only)
    domxml.write_meta(root, ident.meta)
    return CloneXml(domxml.to_string(root), tuple(walk.rewrites), tuple(walk.copies))


# -- identity, interfaces and disks (virtdeck's rewrite before the whole-domain walk) ----------


def _identity(root: ET.Element, ident: CloneIdentity) -> None:
    for tag, text in (("name", ident.name), ("uuid", ident.uuid)):
        elem = root.find(tag)
        if elem is None:
            elem = ET.SubElement(root, tag)
        elem.text = text


def _interfaces(root: ET.Element, ident: CloneIdentity, walk: CloneWalk) -> None:
    ifaces = root.findall("./devices/interface")
    if len(ifaces) != len(ident.macs):
        raise ValueError(f"{len(ifaces)} interfaces but {len(ident.macs)} MACs")
    for n, (iface, address) in enumerate(zip(ifaces, ident.macs, strict=True)):
        walk.handled.add(id(iface))
        mac = iface.find("mac")
        if mac is None:
            mac = ET.SubElement(iface, "mac")
        mac.set("address", address)
        target = iface.find("target")
        if target is not None:
            iface.remove(target)  # vnetN names belong to the template's last run
        kind = iface.get("type", "")
        label = f"interface {n} ({kind})"
        source = iface.find("source")
        if kind == "hostdev":
            walk.shared(label, pci_address(source), PASSTHROUGH_WHY)
        elif kind == "vhostuser" and source is not None and source.get("path"):
            if source.get("mode") == "server":
                source.set(
                    "path", walk.unique(f"{label} socket", source.get("path", ""), SOCKET_WHY)
                )
            else:
                walk.shared(
                    f"{label} socket",
                    source.get("path", ""),
                    "a vhost-user port serves one domain: only one clone can run at a time",
                )
        if source is not None and source.get("portid"):
            source.attrib.pop("portid")  # libvirt's network port of a run (live XML)


def _disks(root: ET.Element, ident: CloneIdentity) -> None:
    by_target = {target: (path, fmt) for target, path, fmt in ident.disks}
    for disk in domxml.disk_elements(root):
        target = disk.find("target")
        new = by_target.get(target.get("dev", "") if target is not None else "")
        if new is None or disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
            continue
        disk.set("type", "file")
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.attrib.clear()
        source.set("file", new[0])
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", name="qemu")
        driver.set("type", new[1])
        for bs in disk.findall("backingStore"):
            disk.remove(bs)  # libvirt reads the chain from the overlay's header


# -- firmware ----------------------------------------------------------------------------------


def _nvram(root: ET.Element, walk: CloneWalk) -> None:
    os_elem = root.find("os")
    if os_elem is None:
        return
    loader = os_elem.find("loader")
    nvram = os_elem.find("nvram")
    if (
        loader is not None
        and loader.get("type") == "pflash"
        and loader.get("readonly") != "yes"
        and nvram is None
        and (loader.text or "").strip()
    ):
        walk.shared(
            "os loader",
            (loader.text or "").strip(),
            "a writable firmware file (no separate NVRAM): only one clone can run at a time",
        )
    if nvram is None:
        if os_elem.get("firmware") == "efi":
            walk.add(
                "os nvram",
                "(automatic)",
                "fresh UEFI variables from the firmware's template at first start",
                "fresh",
                "libvirt names and fills each domain's variables file itself; the template's "
                "boot entries are not carried over",
            )
        return
    kind = nvram.get("type", "file")
    if kind != "file":
        source = nvram.find("source")
        what = ET.tostring(source, encoding="unicode").strip() if source is not None else kind
        walk.shared(
            "os nvram",
            what,
            f"virtdeck copies only file NVRAM, not {kind}: clones would write the same variables",
        )
        return
    path = nvram_path(root)
    firmware_template = nvram.get("template")
    if path is None:
        walk.add(
            "os nvram",
            "(automatic)",
            "fresh UEFI variables from " + (firmware_template or "the firmware's template"),
            "fresh",
            "libvirt names each domain's variables file itself",
        )
        return
    if not walk.ident.nvram_present and not firmware_template:
        raise InvalidInputError(
            f"the template's NVRAM {path} is missing and its XML names no firmware "
            "template (<nvram template=...>) to start a fresh one from"
        )
    new = walk.new_path(path)
    source = nvram.find("source")
    if source is not None:
        source.set("file", new)
    else:
        nvram.text = new
    if walk.ident.nvram_present:
        walk.copies.append(FileCopy("nvram", path, new))
        walk.add(
            "os nvram",
            path,
            new,
            "copy",
            "its own UEFI variables, starting as the template's: boot entries and keys survive",
        )
    else:
        walk.add(
            "os nvram",
            path,
            f"fresh variables file {new}",
            "fresh",
            f"the template's variables file is missing: libvirt fills the clone's from "
            f"{firmware_template} at first start (the template's boot entries are lost)",
        )


# -- the rest of the domain --------------------------------------------------------------------


def _sysinfo(root: ET.Element, ident: CloneIdentity, walk: CloneWalk) -> None:
    for sysinfo in root.findall("sysinfo"):
        walk.handled.add(id(sysinfo))
        for section in ("system", "baseBoard", "chassis"):
            for entry in sysinfo.findall(f"{section}/entry"):
                name, value = entry.get("name"), (entry.text or "").strip()
                if section == "system" and name == "uuid" and value != ident.uuid:
                    entry.text = ident.uuid
                    walk.add(
                        "sysinfo system uuid",
                        value,
                        ident.uuid,
                        "unique",
                        "libvirt refuses an SMBIOS UUID that differs from the domain's",
                    )
                elif name == "serial" and value:
                    walk.shared(
                        f"sysinfo {section} serial",
                        value,
                        "kept (it may carry configuration, e.g. cloud-init's ds=nocloud): "
                        "software that keys on it sees one machine",
                    )


def _seclabels(root: ET.Element, walk: CloneWalk) -> None:
    for label in root.findall("seclabel"):
        walk.handled.add(id(label))
        model = label.get("model", "")
        if label.get("type") == "static" and model != "dac":
            walk.shared(
                f"seclabel {model}".strip(),
                label.findtext("label") or "",
                "clones run under the same static label: sVirt does not separate them",
            )
        elif label.get("type", "dynamic") == "dynamic":
            for tag in ("label", "imagelabel"):
                elem = label.find(tag)
                if elem is not None:  # the template's last run's label (live XML)
                    label.remove(elem)
                    walk.add(
                        f"seclabel {model} {tag}".strip(),
                        elem.text or "",
                        "generated at start",
                        "dropped",
                        "libvirt labels each run anew",
                    )


def _genid(root: ET.Element, walk: CloneWalk) -> None:
    genid = root.find("genid")
    if genid is not None and (genid.text or "").strip():
        walk.add(
            "genid",
            (genid.text or "").strip(),
            "a new one from libvirt",
            "fresh",
            "a VM generation ID must change when a machine is copied",
        )
        genid.text = None


def _qemu_commandline(root: ET.Element, walk: CloneWalk) -> None:
    for elem in root.findall(f"{{{QEMU_NS}}}commandline"):
        walk.handled.add(id(elem))
        args = [a.get("value", "") for a in elem.findall(f"{{{QEMU_NS}}}arg")]
        if args:
            walk.shared(
                "qemu:commandline",
                " ".join(args),
                "extra QEMU arguments are copied unchanged: virtdeck does not know whether "
                "they name ports, sockets or files",
            )


def _unknown_paths(root: ET.Element, walk: CloneWalk) -> None:
    """Host paths in elements no rule above looked at: kept, and said so."""

    def scan(elem: ET.Element, where: str) -> None:
        if id(elem) in walk.handled:
            return
        values = [v for v in elem.attrib.values()] + [(elem.text or "").strip()]
        for value in values:
            if value.startswith("/") and value not in walk.paths:
                walk.shared(
                    where,
                    value,
                    "virtdeck does not know how to make this element unique; check that "
                    "clones may share it",
                )
                break
        for child in elem:
            scan(child, f"{where}/{_local(child.tag)}")

    for child in root:
        tag = _local(child.tag)
        if tag in _BENIGN_TOP:
            continue
        if tag == "devices":
            for dev in child:
                if _local(dev.tag) not in _BENIGN_DEVICES:
                    scan(dev, _local(dev.tag))
        else:
            scan(child, tag)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
