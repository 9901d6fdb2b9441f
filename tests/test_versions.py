"""Template versions without a daemon: virtdeck's metadata carries family and version, the
Templates pane and its details say which version a template is."""

from __future__ import annotations

import dataclasses

from tui.core import domxml
from tui.core.catalog import Template
from tui.core.models import VirtdeckMeta


def test_family_and_version_survive_the_metadata_round_trip() -> None:
    meta = VirtdeckMeta(role="template", sealed=True, family="web", version=3)
    root = domxml.parse("<domain><name>web-v3</name></domain>")
    domxml.write_meta(root, meta)
    back = domxml.read_meta(domxml.parse(domxml.to_string(root)))
    assert (back.family, back.version, back.role) == ("web", 3, "template")
    plain = domxml.parse("<domain><name>web</name></domain>")
    domxml.write_meta(plain, VirtdeckMeta(role="template"))
    assert domxml.read_meta(plain).version is None  # made by 'template create': version 1


def test_templates_pane_names_the_version_and_its_family() -> None:
    from tui.widgets.templates_pane import details_text, row_cells

    v1 = Template("test:///default", "web", True, None, "vm", "2026-12-04T10:00:00+00:00",
                  False, (), (), ("c1",), ())  # fmt: skip
    v2 = dataclasses.replace(v1, name="web-v2", family="web", version=2, thin_clones=("c2",))
    assert row_cells(v1)[0] == "web"
    assert row_cells(v2)[0] == "web-v2 (v2 of web)"
    assert "version   2 of web (sealed 2026-12-04T10:00:00+00:00)" in details_text(v2)
    assert "thin      c2" in details_text(v2)
