"""The config file: saved hosts, timeouts, key bindings by id; one-line errors naming the line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import libvirt
import pytest
from textual.widgets import DataTable

from tests.waiting import wait_for as _until
from tui.app import VirtdeckApp
from tui.core.errors import ConfigError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainState
from tui.core.settings import Settings, load_settings, parse_settings
from tui.widgets.domains import DomainsTable
from tui.widgets.templates_pane import TemplatesPane

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
poll_interval = 5
backup_dir = "/srv/tpl"

[timeouts]
connect = 3
answer = 4.5

[hosts]
local = "qemu:///system"
"kvm-2" = "qemu+ssh://root@kvm2/system"

[keys]
"domain.start" = "S"
"""


def test_a_valid_file_becomes_a_frozen_value() -> None:
    s = parse_settings(GOOD, Path("/c.toml"))
    assert (s.poll_interval, s.connect_timeout, s.answer_timeout) == (5.0, 3.0, 4.5)
    assert s.backup_dir == Path("/srv/tpl")
    assert s.host("kvm-2").uri == "qemu+ssh://root@kvm2/system"
    assert s.keymap == {"domain.start": "S"}
    with pytest.raises(AttributeError):
        s.poll_interval = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("poll_interval = 5\n[hosts\n", 2, "invalid TOML"),
        ("poll_interval = 5\n\nretries = 3\n", 3, "unknown setting 'retries'"),
        ("[timeouts]\nconnect = 3\nanswer = -1\n", 3, "timeouts.answer"),
        ('[hosts]\na = "qemu:///system"\nb = 7\n', 3, "host 'b'"),
        ('poll_interval = "fast"\n', 1, "poll_interval"),
    ],
)
def test_an_invalid_file_is_one_line_naming_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(text, Path("/c.toml"))
    msg = str(err.value)
    assert "\n" not in msg and words in msg and f"line {line}" in msg, msg


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(tmp_path / "none.toml") == Settings(source=tmp_path / "none.toml")


def test_unknown_binding_id_names_its_line() -> None:
    s = parse_settings('[keys]\n"domain.start" = "S"\n"domain.fly" = "F"\n', Path("/c.toml"))
    with pytest.raises(ConfigError, match="line 3: unknown binding id 'domain.fly'"):
        s.check_binding_ids({"domain.start"})


def _cli(env_home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CONFIG_HOME": str(env_home), "XDG_DATA_HOME": str(env_home)}
    return subprocess.run(
        [sys.executable, "-m", "tui", *argv],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )  # fmt: skip


def test_cli_saved_hosts_and_config_errors(tmp_path: Path, test_uri: str) -> None:
    (tmp_path / "virtdeck").mkdir()
    cfg = tmp_path / "virtdeck" / "config.toml"
    cfg.write_text(f'[hosts]\nlab = "{test_uri}"\nother = "test:///default"\n')
    one = _cli(tmp_path, "-H", "lab", "ls")
    assert one.returncode == 0, one.stderr
    assert "alpha" in one.stdout and "HOST" not in one.stdout
    both = _cli(tmp_path, "--all-hosts", "ls")
    assert both.returncode == 0, both.stderr
    assert both.stdout.startswith("HOST") and "test:///default" in both.stdout
    tpl = _cli(tmp_path, "--all-hosts", "template", "ls")
    assert tpl.returncode == 0, tpl.stderr
    assert tpl.stdout.startswith("HOST") and f"{test_uri}  template-web" in tpl.stdout
    unknown = _cli(tmp_path, "-H", "nope", "ls")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        f"virtdeck: no saved host named 'nope' in {cfg} (saved: lab, other)"
    )
    cfg.write_text('[hosts]\nlab = "test:///default"\nlab2 = \n')
    bad = _cli(tmp_path, "ls")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and f"{cfg}: invalid TOML" in bad.stderr
    assert "line 3" in bad.stderr


async def test_key_bindings_from_the_config_apply(test_hv: Hypervisor) -> None:
    settings = parse_settings('[keys]\n"domain.start" = "S"\n', Path("/c.toml"))
    app = VirtdeckApp([test_hv], settings=settings)
    async with app.run_test(size=(140, 45)) as pilot:
        table = app.screen.query_one(DomainsTable)
        await _until(pilot, lambda: table.select_name("beta"))
        await pilot.press("s")  # no longer start
        await app.workers.wait_for_complete()
        assert test_hv.domain("beta").state is DomainState.SHUTOFF
        await pilot.press("S")
        await _until(pilot, lambda: test_hv.domain("beta").state is DomainState.RUNNING)


async def test_templates_pane_has_a_host_column_with_several_hosts(test_hv: Hypervisor) -> None:
    other = Hypervisor.open(test_hv.uri)  # the same node file: the same template on 2 hosts
    other.uri = test_hv.uri + "#2"
    try:
        app = VirtdeckApp([test_hv, other])
        async with app.run_test(size=(160, 50)) as pilot:
            pane = app.screen.query_one(TemplatesPane)
            await _until(pilot, lambda: pane.loads >= 1 and len(pane.templates) == 2)
            table = pane.query_one("#tpl-table", DataTable)
            assert [str(c.label) for c in table.columns.values()][0] == "Host"
            hosts = {str(table.get_row_at(i)[0]) for i in range(table.row_count)}
            assert hosts == {test_hv.uri, other.uri}
            await app.workers.wait_for_complete()  # no worker still inside `other` when it closes
    finally:
        other.close()


class _Counting:
    """Forwards to a real virConnect/virDomain and counts the calls that reach the daemon."""

    LOCAL = {"name", "UUIDString", "UUID", "ID", "connect"}  # answered from the handle itself

    def __init__(self, target: Any, counter: list[str]) -> None:
        self._target = target
        self._counter = counter

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._target, attr)
        if not callable(value) or attr in self.LOCAL:
            return value

        def call(*args: Any) -> Any:
            self._counter.append(attr)
            result = value(*args)
            return _wrap(result, self._counter)

        return call


def _wrap(result: Any, counter: list[str]) -> Any:
    if isinstance(result, libvirt.virDomain):
        return _Counting(result, counter)
    if isinstance(result, list):
        return [_wrap(r, counter) for r in result]
    if isinstance(result, tuple):
        return tuple(_wrap(r, counter) for r in result)
    return result


def test_a_refresh_is_two_round_trips_whatever_the_number_of_domains(
    test_hv: Hypervisor,
) -> None:
    calls: list[str] = []
    test_hv._conn = _Counting(test_hv._conn, calls)
    first = test_hv.domains()
    assert len(first) == 4
    calls.clear()
    again = test_hv.domains()  # XML facts are cached: no call per domain
    assert calls == ["listAllDomains", "getAllDomainStats"]
    assert [d.persistent for d in again] == [True] * 4
    test_hv.conn.createXML(  # a transient domain: persistence comes from the list call
        "<domain type='test'><name>tr</name><memory>1024</memory>"
        "<os><type>hvm</type></os></domain>",
        0,
    )
    calls.clear()
    persistent = {d.name: d.persistent for d in test_hv.domains()}
    assert persistent["tr"] is False and persistent["alpha"] is True
    assert calls.count("listAllDomains") == 1 and calls.count("getAllDomainStats") == 1


def test_the_config_file_is_bounded_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "config.toml"
    with open(big, "wb") as fh:
        fh.truncate(3 * 1024**3)
    with pytest.raises(ConfigError, match=r"is 3221225472 bytes, more than the 1048576 allowed"):
        load_settings(big)
    with pytest.raises(ConfigError, match=r"/dev/zero: is not a regular file"):
        load_settings(Path("/dev/zero"))
