"""Node XML for libvirt's test driver (`test:///PATH`): a private, in-process hypervisor.

The demo lab, the tests and the benchmarks describe their domains with DomainSpec and get a
file libvirt's test driver serves. Each open() of such a URI gets its own fresh state.
"""

from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace

from tui.core import domxml
from tui.core.models import VirtdeckMeta

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
_RUNSTATE = {"running": 1, "paused": 3, "shutoff": 5}


@dataclass(frozen=True)
class DiskSpec:
    path: str
    format: str = "qcow2"
    target: str = "vda"
    backing: str | None = None
    backing_format: str | None = None


@dataclass(frozen=True)
class SnapshotSpec:
    """An internal snapshot the test driver loads with the domain (metadata only)."""

    name: str
    parent: str | None = None
    state: str = "shutoff"
    created: int = 1_763_630_000  # epoch seconds
    description: str = ""
    current: bool = False


@dataclass(frozen=True)
class DomainSpec:
    name: str
    state: str = "shutoff"  # running | paused | shutoff
    vcpus: int = 1
    memory_mib: int = 512
    disks: tuple[DiskSpec, ...] = ()
    macs: tuple[str, ...] = ()
    meta: VirtdeckMeta | None = None
    uuid: str = field(default="")
    snapshots: tuple[SnapshotSpec, ...] = ()
    os_xml: tuple[str, ...] = ()  # extra elements under <os> (e.g. <loader>, <nvram>)
    devices_xml: tuple[str, ...] = ()  # extra devices (e.g. <serial>, <graphics>, <tpm>)


def domain_element(spec: DomainSpec, domain_type: str = "test") -> ET.Element:
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid or str(
        uuidlib.uuid5(uuidlib.NAMESPACE_URL, spec.name)
    )
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type").text = "hvm"
    os_.extend(ET.fromstring(x) for x in spec.os_xml)
    devices = ET.SubElement(dom, "devices")
    for disk in spec.disks:
        d = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type=disk.format)
        ET.SubElement(d, "source", file=disk.path)
        if disk.backing:
            bs = ET.SubElement(d, "backingStore", type="file")
            ET.SubElement(bs, "format", type=disk.backing_format or "qcow2")
            ET.SubElement(bs, "source", file=disk.backing)
        ET.SubElement(d, "target", dev=disk.target, bus="virtio")
    for mac in spec.macs:
        iface = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(iface, "mac", address=mac)
        ET.SubElement(iface, "source", network="default")
    devices.extend(ET.fromstring(x) for x in spec.devices_xml)
    if spec.meta is not None:
        domxml.write_meta(dom, spec.meta)
    return dom


def node_xml(domains: list[DomainSpec]) -> str:
    ET.register_namespace("test", TEST_NS)
    node = ET.Element("node")
    for spec in domains:
        dom = domain_element(spec)
        # The test driver starts every domain of a node file unless told otherwise.
        ET.SubElement(dom, f"{{{TEST_NS}}}runstate").text = str(_RUNSTATE[spec.state])
        for snap in spec.snapshots:
            dom.append(_snapshot_element(spec, snap))
        node.append(dom)
    if any(spec.macs for spec in domains):
        # Their interfaces are on network 'default': define it, or the driver's address
        # queries fail with 'no network with matching name' (it makes up 192.168.122.x).
        node.append(ET.fromstring(_DEFAULT_NETWORK))
    return ET.tostring(node, encoding="unicode")


_DEFAULT_NETWORK = (
    "<network><name>default</name><bridge name='virbr0'/><forward/>"
    "<ip address='192.168.122.1' netmask='255.255.255.0'>"
    "<dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>"
)


def _snapshot_element(spec: DomainSpec, snap: SnapshotSpec) -> ET.Element:
    # The test driver reads <test:domainsnapshot> as the snapshot itself; <active> marks the
    # current one (libvirt's redefine format).
    elem = ET.Element(f"{{{TEST_NS}}}domainsnapshot")
    ET.SubElement(elem, "name").text = snap.name
    if snap.description:
        ET.SubElement(elem, "description").text = snap.description
    ET.SubElement(elem, "state").text = snap.state
    if snap.parent:
        ET.SubElement(ET.SubElement(elem, "parent"), "name").text = snap.parent
    ET.SubElement(elem, "creationTime").text = str(snap.created)
    ET.SubElement(elem, "memory", snapshot="internal" if snap.state == "running" else "no")
    ET.SubElement(elem, "active").text = "1" if snap.current else "0"
    elem.append(domain_element(replace(spec, snapshots=())))
    return elem
