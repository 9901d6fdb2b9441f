"""Reading and editing libvirt domain XML, and virtdeck's own <metadata> element.

Pure functions over strings: no libvirt calls, so they are cheap to test and safe to use when
planning an operation before anything is changed.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from tui.core.models import DiskInfo, DiskKind, InterfaceInfo, VirtdeckMeta
from tui.core.text import has_control, printable

NS = "https://virtdeck.dev/xmlns/domain/1"
PREFIX = "virtdeck"
ET.register_namespace(PREFIX, NS)

_UNIT_BYTES = {
    "b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
    "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4,
    "tb": 1000**4,
}  # fmt: skip


def parse(xml: str) -> ET.Element:
    """The XML as libvirt stores it. libvirt writes a newline, tab or carriage return in an
    attribute value raw, and an XML parser normalises those to spaces (so a disk named
    '/d/-nl<newline>x' would read as the other file '/d/-nl x'): they are turned into
    character references first, so what is parsed is what libvirt stores."""
    if _CONTROL_IN_TAG.search(xml):  # (rare: libvirt's newlines are between tags)
        xml = _TAG.sub(_keep_controls, xml)
    return ET.fromstring(xml)


_CONTROL_IN_TAG = re.compile(r"<[^!?/<>][^<>\n\t\r]*[\n\t\r]")
_TAG = re.compile(r"<[^!?/<>][^<>]*[\n\t\r][^<>]*>")
_ATTR_VALUE = re.compile(r"""(=\s*)("[^"]*"|'[^']*')""")


def _keep_controls(tag: re.Match[str]) -> str:
    return _ATTR_VALUE.sub(
        lambda m: (
            m.group(1)
            + m.group(2).replace("\n", "&#10;").replace("\t", "&#9;").replace("\r", "&#13;")
        ),
        tag.group(),
    )


def to_string(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def _memory_bytes(elem: ET.Element | None) -> int:
    if elem is None or not (elem.text or "").strip():
        return 0
    unit = elem.get("unit", "KiB").lower()
    return int(elem.text or 0) * _UNIT_BYTES.get(unit, 1024)


def memory_bytes(root: ET.Element) -> tuple[int, int]:
    """(current, maximum) memory in bytes."""
    maximum = _memory_bytes(root.find("memory"))
    current = _memory_bytes(root.find("currentMemory")) or maximum
    return current, maximum


def vcpus(root: ET.Element) -> int:
    elem = root.find("vcpu")
    if elem is None:
        return 1
    return int(elem.get("current") or elem.text or 1)


def disk_elements(root: ET.Element) -> list[ET.Element]:
    return root.findall("./devices/disk")


def disk_source(disk: ET.Element) -> str | None:
    """What the <source> names, for display: a path, `proto://host/name` or `pool/volume`."""
    src = disk.find("source")
    if src is None:
        return None
    if disk.get("type") == "network":
        proto = src.get("protocol", "network")
        host = src.find("host")
        where = host.get("name") or host.get("socket") or "" if host is not None else ""
        return f"{proto}://{where}/{src.get('name') or ''}"
    if disk.get("type") == "volume":
        return f"{src.get('pool', '?')}/{src.get('volume', '?')}"
    return src.get("file") or src.get("dev") or src.get("dir") or src.get("name") or None


def disk_kind(disk: ET.Element) -> DiskKind:
    src = disk.find("source")
    has = src is not None and any(
        src.get(a) for a in ("file", "dev", "dir", "name", "volume", "protocol")
    )
    backing = disk.find("backingStore/source")
    named = [*(src.attrib.values() if src is not None else ()),
             *(backing.attrib.values() if backing is not None else ())]  # fmt: skip
    if any(has_control(v) for v in named):
        return DiskKind.UNSAFE
    return DiskKind.from_xml(disk.get("type"), has)


def disks(root: ET.Element) -> tuple[DiskInfo, ...]:
    out = []
    for disk in disk_elements(root):
        target = disk.find("target")
        driver = disk.find("driver")
        kind = disk_kind(disk)
        source = disk_source(disk) if kind != DiskKind.EMPTY else None
        if kind == DiskKind.UNSAFE and source is not None:
            source = printable(source)
        backing = disk.find("backingStore/source")
        out.append(
            DiskInfo(
                target=target.get("dev", "?") if target is not None else "?",
                # Only a file disk has an image path; a device node, an NBD export name or a
                # volume name is never taken for one (it may match an unrelated local file).
                path=source if kind == DiskKind.FILE else None,
                format=driver.get("type") if driver is not None else None,
                device=disk.get("device", "disk"),
                readonly=disk.find("readonly") is not None,
                backing_path=backing.get("file") if backing is not None else None,
                kind=kind,
                source=source,
                shareable=disk.find("shareable") is not None,
            )
        )
    return tuple(out)


def interfaces(root: ET.Element) -> tuple[InterfaceInfo, ...]:
    out = []
    for iface in root.findall("./devices/interface"):
        mac = iface.find("mac")
        src = iface.find("source")
        source = None
        if src is not None:
            source = src.get("network") or src.get("bridge") or src.get("dev")
        out.append(
            InterfaceInfo(
                mac=mac.get("address") if mac is not None else None,
                type=iface.get("type", "?"),
                source=source,
            )
        )
    return tuple(out)


def _meta_element(root: ET.Element) -> ET.Element | None:
    return root.find(f"./metadata/{{{NS}}}virtdeck")


def read_meta(root: ET.Element) -> VirtdeckMeta:
    elem = _meta_element(root)
    if elem is None:
        return VirtdeckMeta()
    ops = elem.findtext(f"{{{NS}}}operations") or ""
    sealing = elem.find(f"{{{NS}}}sealing")
    return VirtdeckMeta(
        role=elem.get("role"),
        created=elem.findtext(f"{{{NS}}}created"),
        source=elem.findtext(f"{{{NS}}}source"),
        operations=tuple(o for o in ops.split(",") if o),
        sealed=elem.get("sealed") == "yes",
        mode=elem.findtext(f"{{{NS}}}mode"),
        xml_backup=elem.findtext(f"{{{NS}}}xml-backup"),
        complete=elem.get("complete") != "no",
        host=elem.findtext(f"{{{NS}}}host"),
        sealing=None if sealing is None else tuple(a for a in (sealing.text or "").split(",") if a),
        family=elem.findtext(f"{{{NS}}}family"),
        version=_int(elem.findtext(f"{{{NS}}}version")),
        base_identity=_read_identity(elem),
        seed=elem.findtext(f"{{{NS}}}seed"),
        identity=elem.findtext(f"{{{NS}}}identity"),
        imported=elem.findtext(f"{{{NS}}}imported"),
        address=elem.findtext(f"{{{NS}}}address"),
    )


def _read_identity(elem: ET.Element) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    found = elem.findall(f"{{{NS}}}base")
    if not found:
        return None
    return tuple(
        (b.get("disk") or "?", tuple(d for d in (b.get("layers") or "").split(",") if d))
        for b in found
    )


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def meta_xml(meta: VirtdeckMeta) -> str:
    """virtdeck's element under <metadata>, as setMetadata() wants it (no xmlns)."""
    elem = ET.Element("virtdeck")
    if meta.role:
        elem.set("role", meta.role)
    elem.set("sealed", "yes" if meta.sealed else "no")
    if not meta.complete:
        elem.set("complete", "no")
    for tag, value in (
        ("created", meta.created),
        ("source", meta.source),
        ("mode", meta.mode),
        ("xml-backup", meta.xml_backup),
        ("operations", ",".join(meta.operations) if meta.operations else None),
        ("host", meta.host),
        ("family", meta.family),
        ("version", str(meta.version) if meta.version else None),
        ("seed", meta.seed),
        ("identity", meta.identity),
        ("imported", meta.imported),
        ("address", meta.address),
    ):
        if value:
            ET.SubElement(elem, tag).text = value
    if meta.sealing is not None:  # present and empty: sealing added nothing (recorded)
        ET.SubElement(elem, "sealing").text = ",".join(meta.sealing)
    for disk, layers in meta.base_identity or ():
        ET.SubElement(elem, "base", disk=disk, layers=",".join(layers))
    return ET.tostring(elem, encoding="unicode")


def write_meta(root: ET.Element, meta: VirtdeckMeta) -> None:
    """Replace virtdeck's <metadata> element in a parsed domain XML."""
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    old = _meta_element(root)
    if old is not None:
        metadata.remove(old)
    elem = ET.fromstring(meta_xml(meta))
    for node in elem.iter():
        node.tag = f"{{{NS}}}{node.tag}"
    metadata.append(elem)
