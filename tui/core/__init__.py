"""virtdeck's action layer: models, the libvirt and qemu-img backends, and the operations.

Never imports Textual or Rich (tests/test_import_hygiene.py checks it): the CLI starts fast and
the same code serves both faces.
"""
