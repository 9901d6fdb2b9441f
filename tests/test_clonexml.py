"""The clone XML walk (tui.core.clonexml) on XML strings: what each per-domain resource becomes."""

from __future__ import annotations

import pytest

from tui.core import domxml
from tui.core.clonexml import CloneIdentity, Rewrite, clone_path, clone_xml, interface_count
from tui.core.errors import InvalidInputError
from tui.core.models import VirtdeckMeta

TEMPLATE = """
<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>template-web</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <genid>aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee</genid>
  <title>Web server</title>
  <description>nginx, PHP</description>
  <metadata>
    <app:info xmlns:app='https://example.org/app'>keep me</app:info>
    <virtdeck:virtdeck xmlns:virtdeck='https://virtdeck.dev/xmlns/domain/1' role='template'
        sealed='yes'><virtdeck:source>web</virtdeck:source></virtdeck:virtdeck>
  </metadata>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>ACME</entry>
      <entry name='serial'>ds=nocloud;s=http://10.0.0.1/</entry>
      <entry name='uuid'>11111111-2222-3333-4444-555555555555</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'
      >/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <resource><partition>/machine</partition></resource>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/web.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/debian.iso'/><target dev='sda' bus='sata'/><readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:00:00:01'/><source network='default'/>
      <target dev='vnet3'/>
    </interface>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/web-serial.log' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <log file='/var/log/libvirt/qemu/web-serial.log' append='off'/>
      <target type='serial' port='0'/>
    </console>
    <serial type='file'>
      <source path='/var/log/guest/output.txt'/><target port='1'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='/run/vms/web.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web.org.example.0'/>
      <target type='virtio' name='org.example.0'/>
    </channel>
    <channel type='unix'>
      <source mode='connect' path='/run/collector.sock'/>
      <target type='virtio' name='org.example.collector'/>
    </channel>
    <serial type='tcp'>
      <source mode='bind' host='127.0.0.1' service='4555'/><target port='2'/>
    </serial>
    <graphics type='vnc' port='5977' autoport='no' websocket='5700' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <graphics type='spice' autoport='yes'/>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <filesystem type='mount' accessmode='passthrough'>
      <source dir='/srv/share'/><target dir='share'/>
    </filesystem>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x03' slot='0x00' function='0x1'/></source>
    </hostdev>
    <vsock model='virtio'><cid auto='no' address='7'/></vsock>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <frobnicator path='/var/lib/frob/web.state'/>
  </devices>
  <seclabel type='static' model='selinux' relabel='yes'>
    <label>system_u:system_r:svirt_t:s0:c1,c2</label>
  </seclabel>
  <qemu:commandline>
    <qemu:arg value='-fw_cfg'/><qemu:arg value='name=opt/x,file=/x'/>
  </qemu:commandline>
</domain>
"""


def ident(name: str = "web-1", **kw: object) -> CloneIdentity:
    values: dict = dict(
        name=name,
        uuid="99999999-8888-7777-6666-555555555555",
        macs=("52:54:00:aa:bb:cc",),
        disks=(("vda", f"/images/{name}.qcow2", "qcow2"),),
        meta=VirtdeckMeta(role="clone", source="template-web", mode="thin"),
        old_names=("template-web", "web"),
    )
    values.update(kw)
    return CloneIdentity(**values)


def by_element(rewrites: tuple[Rewrite, ...]) -> dict[str, Rewrite]:
    return {r.element: r for r in rewrites}


def test_every_per_domain_resource_is_rewritten_or_named() -> None:
    out = clone_xml(domxml.parse(TEMPLATE), ident())
    root = domxml.parse(out.xml)
    r = by_element(out.rewrites)
    # identity, MAC, disk: as before
    assert root.findtext("name") == "web-1"
    assert root.findtext("uuid") == "99999999-8888-7777-6666-555555555555"
    assert root.find("devices/interface/mac").get("address") == "52:54:00:aa:bb:cc"
    assert root.find("devices/interface/target") is None
    assert domxml.disks(root)[0].path == "/images/web-1.qcow2"
    assert domxml.disks(root)[1].path == "/iso/debian.iso"  # a read-only CD-ROM stays shared
    # serial log: per clone; the console repeating it gets the same new file, said once
    logs = {e.get("file") for e in root.iter("log")}
    assert logs == {"/var/log/libvirt/qemu/web-1-serial.log"}
    assert r["serial 0 log"].kind == "unique" and "console 0 log" not in r
    assert "virtlogd" in r["serial 0 log"].why
    assert root.find("devices/serial[@type='file']/source").get("path") == (
        "/var/log/guest/output-web-1.txt"
    )
    agent = root.find("devices/channel/target[@name='org.qemu.guest_agent.0']/..")
    assert agent.find("source").get("path") == "/run/vms/web-1.agent"
    assert r["channel org.qemu.guest_agent.0 socket"].new == "/run/vms/web-1.agent"
    auto = root.find("devices/channel/target[@name='org.example.0']/..")
    assert auto.find("source").get("path") is None  # libvirt generates it per domain
    assert r["channel org.example.0 socket"].kind == "dropped"
    assert r["channel org.example.collector socket"].kind == "shared-warning"
    assert r["serial 2 tcp listener"].kind == "shared-warning"
    assert "127.0.0.1:4555" in r["serial 2 tcp listener"].old
    # nvram: the template's file copied (not the firmware template), template attribute kept
    nvram = root.find("os/nvram")
    assert nvram.text == "/var/lib/libvirt/qemu/nvram/web-1_VARS.fd"
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    assert [(c.what, c.source, c.destination) for c in out.copies] == [
        ("nvram", "/var/lib/libvirt/qemu/nvram/web_VARS.fd", nvram.text)
    ]
    assert r["os nvram"].kind == "copy"
    # graphics: fixed port and websocket -> automatic; the listen address stays
    vnc = root.find("devices/graphics[@type='vnc']")
    assert vnc.get("autoport") == "yes" and vnc.get("port") is None
    assert vnc.get("websocket") == "-1" and vnc.get("listen") == "127.0.0.1"
    assert vnc.find("listen").get("address") == "127.0.0.1"
    assert (
        "port 5977" in r["graphics vnc"].old and "address 127.0.0.1 kept" in r["graphics vnc"].why
    )
    assert "graphics spice" not in r  # already automatic
    # TPM: fresh state (libvirt keys swtpm state by the new UUID)
    tpm = r["tpm tpm-crb emulator"]
    assert tpm.kind == "fresh" and "11111111" in tpm.old and "UUID" in tpm.why
    # sysinfo UUID follows the domain's; the serial is kept with a warning
    entries = {e.get("name"): e.text for e in root.iter("entry")}
    assert entries["uuid"] == "99999999-8888-7777-6666-555555555555"
    assert entries["serial"] == "ds=nocloud;s=http://10.0.0.1/"
    assert r["sysinfo system serial"].kind == "shared-warning"
    # vsock CID and generation ID renewed
    assert root.find("devices/vsock/cid").attrib == {"auto": "yes"}
    assert root.find("genid").text is None and r["genid"].kind == "fresh"
    # shared with a warning: hostdev, filesystem, static label, QEMU args, unknown path
    assert r["hostdev pci"].old == "0000:03:00.1" and r["hostdev pci"].kind == "shared-warning"
    assert r["filesystem share (mount)"].old == "/srv/share"
    assert r["seclabel selinux"].kind == "shared-warning"
    assert r["qemu:commandline"].kind == "shared-warning"
    assert r["frobnicator"].old == "/var/lib/frob/web.state"
    assert "does not know" in r["frobnicator"].why
    # paths shared by design raise nothing
    olds = {x.old for x in out.rewrites}
    assert not olds & {"/dev/urandom", "/machine", "/usr/bin/qemu-system-x86_64", "/iso/debian.iso"}
    # kept: title, description, other applications' metadata; virtdeck's updated
    assert root.findtext("title") == "Web server" and root.findtext("description") == "nginx, PHP"
    assert root.find("metadata/{https://example.org/app}info").text == "keep me"
    assert domxml.read_meta(root).role == "clone"
    assert {x.kind for x in out.rewrites} <= {
        "unique",
        "copy",
        "fresh",
        "dropped",
        "shared-warning",
    }


def test_three_clones_get_distinct_paths_and_the_template_keeps_its_own() -> None:
    template = domxml.parse(TEMPLATE)
    before = domxml.to_string(template)
    outs = [clone_xml(template, ident(f"web-{i}")) for i in (1, 2, 3)]
    assert domxml.to_string(template) == before  # the template's parsed XML is not touched
    per_clone = [{x.new for x in o.rewrites if x.kind in ("unique", "copy")} for o in outs]
    per_clone = [{p for p in paths if p.startswith("/")} for paths in per_clone]
    assert all(len(p) == len(per_clone[0]) == 4 for p in per_clone)
    assert not (per_clone[0] & per_clone[1]) and not (per_clone[1] & per_clone[2])
    template_paths = {x.old for x in outs[0].rewrites}
    assert not any(p & template_paths for p in per_clone)


def test_clone_path_naming() -> None:
    names = ("template-web", "web")
    assert clone_path("/l/web-serial.log", names, "web-1") == "/l/web-1-serial.log"
    assert clone_path("/n/web_VARS.fd", names, "db") == "/n/db_VARS.fd"
    assert clone_path("/n/template-web_VARS.fd", names, "x") == "/n/x_VARS.fd"
    # only whole words: "webster" is not the template's name
    assert clone_path("/l/webster.log", names, "x") == "/l/webster-x.log"
    assert clone_path("/l/serial.log", names, "x") == "/l/serial-x.log"
    assert clone_path("/run/agent", names, "x") == "/run/agent-x"
    # a clone named like the VM the template was made from never gets the template's path
    assert clone_path("/l/web.log", names, "web") == "/l/web-web.log"


def test_missing_nvram_file_fresh_from_the_firmware_template_or_refused() -> None:
    out = clone_xml(domxml.parse(TEMPLATE), ident(nvram_present=False))
    r = by_element(out.rewrites)["os nvram"]
    assert r.kind == "fresh" and "OVMF_VARS_4M.fd" in r.why and not out.copies
    assert domxml.parse(out.xml).find("os/nvram").text.endswith("/web-1_VARS.fd")
    bare = TEMPLATE.replace(" template='/usr/share/OVMF/OVMF_VARS_4M.fd'", "")
    with pytest.raises(InvalidInputError, match="web_VARS.fd is missing.*no firmware template"):
        clone_xml(domxml.parse(bare), ident(nvram_present=False))


def test_nvram_source_form_and_automatic_firmware() -> None:
    new_form = TEMPLATE.replace(
        "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'\n      >/var/lib/libvirt/qemu/nvram/"
        "web_VARS.fd</nvram>",
        "<nvram type='file'><source file='/nv/web_VARS.fd'/></nvram>",
    )
    out = clone_xml(domxml.parse(new_form), ident())
    assert domxml.parse(out.xml).find("os/nvram/source").get("file") == "/nv/web-1_VARS.fd"
    assert out.copies[0].source == "/nv/web_VARS.fd"
    auto = (
        "<domain type='kvm'><name>t</name><os firmware='efi'><type>hvm</type></os>"
        "<devices/></domain>"
    )
    out = clone_xml(domxml.parse(auto), ident(macs=(), disks=()))
    assert by_element(out.rewrites)["os nvram"].kind == "fresh" and not out.copies


def test_plain_domain_needs_no_rewrite() -> None:
    xml = (
        "<domain type='kvm'><name>t</name><uuid>11111111-2222-3333-4444-555555555555</uuid>"
        "<os><type>hvm</type></os><devices><serial type='pty'/>"
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        "<graphics type='vnc' autoport='yes' port='-1'/>"
        "<interface type='user'/><interface type='user'/></devices></domain>"
    )
    root = domxml.parse(xml)
    assert interface_count(root) == 2
    out = clone_xml(root, ident(macs=("52:54:00:00:00:0a", "52:54:00:00:00:0b"), disks=()))
    assert out.rewrites == () and out.copies == ()
    macs = [m.get("address") for m in domxml.parse(out.xml).iter("mac")]
    assert macs == ["52:54:00:00:00:0a", "52:54:00:00:00:0b"]


VIRT_INSTALL = """<domain type='kvm'><name>deb12</name>
  <metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
    <libosinfo:os id="http://debian.org/debian/12"/></libosinfo:libosinfo></metadata>
  <memory unit='KiB'>2097152</memory><vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features><cpu mode='host-passthrough'/><clock offset='utc'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/deb12.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/var/lib/libvirt/images/debian-12.iso'/>
      <target dev='sda' bus='sata'/><readonly/></disk>
    <controller type='virtio-serial' index='0'/>
    <interface type='network'><mac address='52:54:00:6b:3c:58'/><source network='default'/>
      <model type='virtio'/></interface>
    <serial type='pty'><target type='isa-serial' port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <input type='tablet' bus='usb'/>
    <graphics type='spice' autoport='yes'><listen type='address'/></graphics>
    <sound model='ich9'/><audio id='1' type='spice'/><video><model type='qxl'/></video>
    <redirdev bus='usb' type='spicevmc'/><memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'/>
</domain>"""


def test_a_virt_install_domain_raises_no_false_warning() -> None:
    out = clone_xml(domxml.parse(VIRT_INSTALL), ident(old_names=("deb12",)))
    assert out.rewrites == () and out.copies == ()


@pytest.mark.parametrize(
    ("device", "element", "kind", "old"),
    [
        ("<interface type='hostdev'><source><address type='pci' domain='0' bus='5' slot='0' "
         "function='2'/></source></interface>", "interface 0 (hostdev)", "shared-warning",
         "0000:05:00.2"),
        ("<interface type='vhostuser'><source type='unix' path='/run/vhu/web.sock' "
         "mode='server'/></interface>", "interface 0 (vhostuser) socket", "unique",
         "/run/vhu/web.sock"),
        ("<interface type='vhostuser'><source type='unix' path='/run/ovs/port1' mode='client'/>"
         "</interface>", "interface 0 (vhostuser) socket", "shared-warning", "/run/ovs/port1"),
        ("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend>"
         "</tpm>", "tpm tpm-tis", "shared-warning", "/dev/tpm0"),
        ("<input type='evdev'><source dev='/dev/input/event3'/></input>", "input evdev",
         "shared-warning", "/dev/input/event3"),
        ("<memory model='nvdimm'><source><path>/srv/nvdimm</path></source></memory>",
         "memory nvdimm", "shared-warning", "/srv/nvdimm"),
        ("<graphics type='vnc' autoport='yes'><listen type='socket' socket='/run/web.vnc'/>"
         "</graphics>", "graphics vnc socket", "unique", "/run/web.vnc"),
        ("<graphics type='vnc' autoport='yes' websocket='5700'/>", "graphics vnc", "unique",
         "websocket 5700"),
        ("<hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/>"
         "<product id='0xbeef'/></source></hostdev>", "hostdev usb", "shared-warning",
         "0x1234:0xbeef"),
        ("<pstore backend='acpi-erst'><path>/var/lib/libvirt/qemu/nvram/web_acpi-erst</path>"
         "<size unit='KiB'>8</size></pstore>", "pstore", "unique",
         "/var/lib/libvirt/qemu/nvram/web_acpi-erst"),
        ("<parallel type='file'><source path='/tmp/printer.out'/><target port='0'/></parallel>",
         "parallel 0 file", "unique", "/tmp/printer.out"),
        ("<serial type='dev'><source path='/dev/ttyS0'/><target port='0'/></serial>",
         "serial 0 dev", "shared-warning", "/dev/ttyS0"),
        ("<shmem name='ivshmem0'><model type='ivshmem-plain'/></shmem>", "shmem ivshmem0",
         "shared-warning", "(shared memory)"),
    ],
)  # fmt: skip
def test_device_rules(device: str, element: str, kind: str, old: str) -> None:
    xml = f"<domain><name>web</name><os><type>hvm</type></os><devices>{device}</devices></domain>"
    root = domxml.parse(xml)
    out = clone_xml(root, ident(macs=("52:54:00:00:00:0a",) * interface_count(root), disks=()))
    assert [(r.element, r.kind, r.old) for r in out.rewrites] == [(element, kind, old)]
    if kind == "unique" and old.startswith("/"):
        assert out.rewrites[0].new in out.xml and old not in out.xml


def test_live_xml_leftovers_are_dropped() -> None:
    xml = (
        "<domain type='kvm' id='7'><name>web</name><os><type>hvm</type></os><devices>"
        "<serial type='pty'><source path='/dev/pts/3'/><target port='0'/></serial></devices>"
        "<seclabel type='dynamic' model='selinux' relabel='yes'>"
        "<label>system_u:system_r:svirt_t:s0:c5,c9</label>"
        "<imagelabel>system_u:object_r:svirt_image_t:s0:c5,c9</imagelabel></seclabel></domain>"
    )
    out = clone_xml(domxml.parse(xml), ident(macs=(), disks=()))
    root = domxml.parse(out.xml)
    assert root.get("id") is None and root.find("devices/serial/source").get("path") is None
    assert root.find("seclabel/label") is None and root.find("seclabel/imagelabel") is None
    assert {r.kind for r in out.rewrites} == {"dropped"}
