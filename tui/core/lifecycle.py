"""Lifecycle and definitions of one hypervisor's domains: start, shut down, force off,
reboot, pause/resume, waiting for a state, and undefine/rename/define with libvirt's flag
fallbacks (a mixin of tui.core.hypervisor.Hypervisor, which owns the connection and the one
error translator)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import libvirt

from tui.core import debuglog, domxml
from tui.core.errors import StateError, VirtdeckError
from tui.core.models import DomainState

_Verb = TypeVar("_Verb", bound=Callable[..., None])


def _audited(title: str) -> Callable[[_Verb], _Verb]:
    """Record the verb in the audit trail (tui.core.audit), whoever calls it; inside a larger
    operation (a clone started after its deploy) the operation's record covers it."""

    def wrap(fn: _Verb) -> _Verb:
        @functools.wraps(fn)
        def verb(self: Lifecycle, name: str, *args: Any, **kwargs: Any) -> None:
            from tui.core import audit  # (not at import: `virtdeck ls` starts faster)

            with audit.recorded(self.uri, title.format(name=name), (name,)):
                fn(self, name, *args, **kwargs)

        return verb  # type: ignore[return-value]

    return wrap


class Lifecycle:
    """What a domain's owner does to it; every libvirt call goes through `call`/`translate`."""

    uri: str

    @property
    def conn(self) -> Any:
        raise NotImplementedError

    def call(self, fn: Callable[..., Any], *args: Any, what: str = "") -> Any:
        raise NotImplementedError

    def translate(self, err: libvirt.libvirtError, what: str = "") -> VirtdeckError:
        raise NotImplementedError

    def lookup(self, name: str) -> Any:
        raise NotImplementedError

    def _facts(self, dom: Any, uuid: str) -> Any:
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------

    def _state(self, dom: Any) -> DomainState:
        return DomainState.from_libvirt(self.call(dom.state)[0])

    @_audited("starting '{name}'")
    def start(self, name: str) -> None:
        dom = self.lookup(name)
        facts = self._facts(dom, dom.UUIDString())
        if facts.meta.role == "template":
            raise StateError(
                f"'{name}' is a template and is never started (its disks back clones); "
                f"deploy one with 'virtdeck clone {name} NEWNAME'"
            )
        if self._state(dom).active:
            raise StateError(f"'{name}' is already running")
        self.call(dom.create, what=f"starting '{name}'")

    @_audited("shutting down '{name}'")
    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI / agent); returns at once."""
        dom = self.lookup(name)
        if not self._state(dom).active:
            raise StateError(f"'{name}' is not running")
        self.call(dom.shutdown, what=f"shutting down '{name}'")

    @_audited("forcing off '{name}'")
    def destroy(self, name: str) -> None:
        """Force off: pull the plug."""
        dom = self.lookup(name)
        if not self._state(dom).active:
            raise StateError(f"'{name}' is not running")
        self.call(dom.destroy, what=f"forcing off '{name}'")

    @_audited("rebooting '{name}'")
    def reboot(self, name: str) -> None:
        dom = self.lookup(name)
        if self._state(dom) != DomainState.RUNNING:
            raise StateError(f"'{name}' is not running")
        self.call(dom.reboot, 0, what=f"rebooting '{name}'")

    @_audited("suspending '{name}'")
    def suspend(self, name: str) -> None:
        dom = self.lookup(name)
        if self._state(dom) != DomainState.RUNNING:
            raise StateError(f"'{name}' is not running, so it cannot be suspended")
        self.call(dom.suspend, what=f"suspending '{name}'")

    @_audited("resuming '{name}'")
    def resume(self, name: str) -> None:
        dom = self.lookup(name)
        if self._state(dom) != DomainState.PAUSED:
            raise StateError(f"'{name}' is not paused, so it cannot be resumed")
        self.call(dom.resume, what=f"resuming '{name}'")

    def wait_for_state(
        self, name: str, states: Iterable[DomainState], timeout: float, poll: float = 0.2
    ) -> bool:
        """Wait until the domain reaches one of `states`; False on timeout."""
        wanted = set(states)
        dom = self.lookup(name)
        deadline = time.monotonic() + timeout
        while True:
            if self._state(dom) in wanted:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)

    def shutdown_and_wait(self, name: str, timeout: float) -> bool:
        self.shutdown(name)
        return self.wait_for_state(name, [DomainState.SHUTOFF], timeout)

    # -- definitions ------------------------------------------------------------------------

    def undefine(self, dom: Any, *, keep_nvram: bool, what: str = "undefining") -> None:
        """Undefine, keeping (template) or removing (clone) its NVRAM and TPM state.

        The flags are newer than the call: KEEP_TPM needs libvirt 8.9, and some drivers reject
        the NVRAM flags, so each rejected set falls back to a smaller one (a domain without
        NVRAM or TPM never needs them).
        """
        debuglog.LOG.debug("undefine %s on %s (keep_nvram=%s)", _name(dom), self.uri, keep_nvram)
        managed = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        if keep_nvram:
            flags = [libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | managed]
            keep_tpm = getattr(libvirt, "VIR_DOMAIN_UNDEFINE_KEEP_TPM", 0)
            if keep_tpm:
                flags.insert(0, flags[0] | keep_tpm)
        else:
            flags = [libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | managed]
        rejected = (
            libvirt.VIR_ERR_NO_SUPPORT,
            libvirt.VIR_ERR_INVALID_ARG,
            libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        )
        for flag in flags:
            try:
                dom.undefineFlags(flag)
                return
            except libvirt.libvirtError as err:
                if err.get_error_code() not in rejected:
                    raise self.translate(err, what) from None
        self.call(dom.undefine, what=what)

    def undefine_all(self, dom: Any, what: str = "undefining") -> None:
        """Undefine with its managed save, snapshot metadata and NVRAM (removal of a domain;
        internal snapshots live in its images)."""
        try:
            dom.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            )
        except libvirt.libvirtError as err:
            first = self.translate(err, what)
            try:
                self.undefine(dom, keep_nvram=False, what=what)
            except VirtdeckError:
                raise first from None

    def rename(self, dom: Any, old: str, new: str) -> Any:
        """Rename a shut-off domain; returns the (possibly new) virDomain handle.

        virDomainRename exists since libvirt 1.2.19, but not every driver implements it; the
        fallback undefines the old definition and defines the same XML (same UUID) under the
        new name, restoring the old one if that define fails.
        """
        what = f"renaming '{old}' to '{new}'"
        debuglog.LOG.debug("rename %s to %s on %s", old, new, self.uri)
        try:
            dom.rename(new, 0)
            return self.call(self.conn.lookupByName, new, what=what)
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise self.translate(err, what) from None
        xml = self.call(
            dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE, what=what
        )
        root = domxml.parse(xml)
        name_elem = root.find("name")
        assert name_elem is not None
        name_elem.text = new
        self.undefine(dom, keep_nvram=True, what=what)
        try:
            return self.call(self.conn.defineXML, domxml.to_string(root), what=what)
        except BaseException:
            self.call(self.conn.defineXML, xml, what=f"restoring '{old}'")
            raise

    def define(self, xml: str, what: str = "defining") -> Any:
        before = self._definition_before(xml) if debuglog.on() else None
        dom = self.call(self.conn.defineXML, xml, what=what)
        if debuglog.on():
            name = domxml.parse(xml).findtext("name") or "?"
            debuglog.LOG.debug(
                "define %s on %s:\n%s", name, self.uri, debuglog.xml_diff(before, xml, name)
            )
        return dom

    def update_meta(self, name: str, what: str, *, live: bool = False, **changes: Any) -> None:
        """Change fields of virtdeck's metadata (tui.core.models.VirtdeckMeta) of the defined
        domain `name`: its persistent definition, and with `live` the running one too."""
        from dataclasses import replace

        dom = self.lookup(name)
        xml = self.call(dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE, what=name)
        meta = replace(domxml.read_meta(domxml.parse(xml)), **changes)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if live:
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        self.call(dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.meta_xml(meta),
                  domxml.PREFIX, domxml.NS, flags, what=what)  # fmt: skip

    def _definition_before(self, xml: str) -> str | None:
        """(debug log) The definition `xml` replaces: same UUID, else same name; None."""
        root = domxml.parse(xml)
        uuid, name = (root.findtext("uuid") or "").strip(), root.findtext("name") or ""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        for lookup, key in ((self.conn.lookupByUUIDString, uuid), (self.conn.lookupByName, name)):
            if key:
                try:
                    return str(lookup(key).XMLDesc(flags))
                except libvirt.libvirtError:
                    continue
        return None


def _name(dom: Any) -> str:
    try:
        return str(dom.name())
    except libvirt.libvirtError:
        return "?"
