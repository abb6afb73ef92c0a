"""IMAP accounts in the config (docs/design.md §15): the keys and their checks, the default
ports, the runtime values an IMAP account becomes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from connector.config import Settings, load_settings, render_settings
from connector.errors import ConfigError
from connector.imap import ImapAuth, ImapOptions
from connector.runtime import build_runtime

BASE = """
[service]
state_dir = "{state}"
[smtp]
host = "exchange.example.local"
[[accounts]]
name = "office"
host = "imap.example.net"
username = "office@firma.example"
password = "pw-not-shown"
deliver_to = ["office@firma.local"]
"""


def load(tmp_path: Path, extra: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(BASE.format(state=tmp_path) + extra)
    path.chmod(0o600)
    return load_settings(path)


def problems(tmp_path: Path, extra: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    return "\n".join(info.value.problems)


@pytest.mark.parametrize(
    ("extra", "port"),
    [
        ('protocol = "imap"', 993),
        ('protocol = "imap"\ntls = "starttls"', 143),
        ('protocol = "imap"\ntls = "none"', 143),
        ("", 995),
        ('protocol = "pop3"\ntls = "starttls"', 110),
    ],
)
def test_default_ports_follow_the_protocol(tmp_path: Path, extra: str, port: int) -> None:
    runtime = build_runtime(load(tmp_path, extra))
    (spec,) = runtime.accounts
    assert spec.endpoint.port == port


def test_an_imap_account_becomes_imap_options(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        'protocol = "imap"\nauth = "login"\nfolder = "Eingang/Firma"\npush = false\n'
        'idle_renewal = "10m"',
    )
    (spec,) = build_runtime(settings).accounts
    assert spec.imap == ImapOptions("Eingang/Firma", ImapAuth.LOGIN, False, 600.0)
    (pop3,) = build_runtime(load(tmp_path, "")).accounts
    assert pop3.imap is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('folder = "INBOX"', 'folder: only used with protocol = "imap"'),
        ("push = false", 'push: only used with protocol = "imap"'),
        ('idle_renewal = "5m"', 'idle_renewal: only used with protocol = "imap"'),
        ('auth = "login"', '"login" is for IMAP accounts'),
        ('protocol = "imap"\nauth = "apop"', '"apop" is a POP3 login'),
        ('protocol = "imap"\nauth = "user"', '"user" is a POP3 login'),
        ('protocol = "imap"\nidle_renewal = "30m"', "idle_renewal"),
        ('protocol = "imap"\nfolder = "a//b"', "empty level"),
        ('protocol = "imap"\nfolder = "/INBOX"', "empty level"),
        ('protocol = "smtp"', "protocol"),
    ],
)
def test_keys_that_do_not_fit_the_protocol_are_errors(
    tmp_path: Path, extra: str, expected: str
) -> None:
    text = problems(tmp_path, extra)
    assert expected in text
    assert re.search(r"accounts\[0\]", text)
    assert "pw-not-shown" not in text


def test_check_renders_a_config_that_loads_again(tmp_path: Path) -> None:
    for extra in ("", 'protocol = "imap"\nfolder = "Archiv"'):
        settings = load(tmp_path, extra)
        rendered = render_settings(settings)
        again = tmp_path / "again.toml"
        again.write_text(rendered.replace("**********", "pw-not-shown"))
        again.chmod(0o600)
        assert render_settings(load_settings(again)) == rendered
        assert ("folder =" in rendered) == bool(extra)
