"""SMTP targets (docs/design.md §14.1): ``[smtp_targets.NAME]`` and ``accounts[].smtp``."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from connector.config import (
    DEFAULT_TARGET,
    Settings,
    config_warnings,
    load_settings,
    render_settings,
)
from connector.errors import ConfigError
from connector.runtime import build_runtime
from connector.smtp import SenderPolicy

SECRET = "t4rget-Secret!"

BASE = """
[service]
state_dir = "/tmp/pop3-connector-test"

[smtp]
host = "exchange.provider.local"
tls = "none"

[smtp_targets.kunde-a]
host = "exchange.kunde-a.example"
port = 587
username = "connector@kunde-a.example"
password = "{secret}"
envelope_sender = "null"

[smtp_targets."kunde.b"]
host = "10.1.2.3"
tls = "implicit"

[[accounts]]
name = "a-info"
host = "pop.example.net"
username = "info@kunde-a.example"
password = "pw"
deliver_to = ["info@kunde-a.local"]
smtp = "kunde-a"

[[accounts]]
name = "b-info"
host = "pop.example.net"
username = "info@kunde-b.example"
password = "pw"
deliver_to = ["info@kunde-b.local"]
smtp = "kunde.b"

[[accounts]]
name = "ours"
host = "pop.example.net"
username = "ours@provider.example"
password = "pw"
deliver_to = ["ours@provider.local"]
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("POP3_CONNECTOR_"):
            monkeypatch.delenv(name)


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return load_settings(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert all(SECRET not in p for p in info.value.problems)
    return info.value.problems


def test_each_account_gets_its_targets_settings_and_policy(tmp_path: Path) -> None:
    runtime = build_runtime(load(tmp_path, BASE.format(secret=SECRET)))
    assert list(runtime.targets) == [DEFAULT_TARGET, "kunde-a", "kunde.b"]
    targets = runtime.account_targets()
    assert {name: t.name for name, t in targets.items()} == {
        "a-info": "kunde-a",
        "b-info": "kunde.b",
        "ours": DEFAULT_TARGET,
    }
    a = targets["a-info"]
    assert (a.settings.host, a.settings.port, a.settings.username) == (
        "exchange.kunde-a.example",
        587,
        "connector@kunde-a.example",
    )
    assert a.settings.password == SECRET
    assert a.policy.sender_policy is SenderPolicy.NULL  # its own envelope_sender
    b = targets["b-info"]
    assert (b.settings.port, b.settings.ssl_context is not None) == (465, True)
    assert b.policy.sender_policy is SenderPolicy.RETURN_PATH
    # Each TLS target has a context; [smtp] (plain) has none.  Targets that trust the same
    # (verify_certificate, ca_file) share one, as accounts do (tests/unit/test_runtime.py).
    assert targets["ours"].settings.ssl_context is None
    assert a.settings.ssl_context is b.settings.ssl_context
    # The default target is [smtp], and notices use it.
    assert runtime.smtp is runtime.default_target.settings
    assert runtime.smtp.host == "exchange.provider.local"


def test_unknown_target_is_an_error_naming_the_account_key(tmp_path: Path) -> None:
    text = BASE.format(secret=SECRET).replace('smtp = "kunde.b"', 'smtp = "kunde-c"')
    assert problems(tmp_path, text) == [
        'accounts[1] (name "b-info").smtp: no SMTP target "kunde-c": add a table '
        '[smtp_targets.kunde-c], or name one there is: "default" ([smtp]), "kunde-a", "kunde.b"'
    ]


def test_default_names_smtp_and_cannot_be_redefined(tmp_path: Path) -> None:
    text = BASE.format(secret=SECRET).replace('smtp = "kunde.b"', 'smtp = "default"')
    assert build_runtime(load(tmp_path, text)).account_targets()["b-info"].name == "default"
    redefined = text.replace("[smtp_targets.kunde-a]", "[smtp_targets.default]")
    redefined = redefined.replace('smtp = "kunde-a"', "")
    assert problems(tmp_path, redefined) == [
        'smtp_targets.default: "default" is [smtp]\'s name; give this target another one'
    ]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            ("port = 587", "port = 99999"),
            "smtp_targets.kunde-a.port: Input should be less than or equal to 65535 (got 99999)",
        ),
        (
            ('[smtp_targets."kunde.b"]', '[smtp_targets."kunde.b"]\nhots = "x"'),
            'smtp_targets."kunde.b".hots: unknown key',
        ),
        (
            ('[smtp_targets."kunde.b"]', '[smtp_targets."kunde b"]'),
            "smtp_targets.\"kunde b\": use 1-64 characters: letters, digits, '.', '_', '-' or "
            "'@' (got \"kunde b\")",
        ),
        (
            ('password = "{secret}"', ""),
            "smtp_targets.kunde-a.password: username is set: set password, password_file or "
            "password_env too",
        ),
    ],
)
def test_target_errors_name_the_key_path(
    tmp_path: Path, change: tuple[str, str], problem: str
) -> None:
    text = BASE.replace(*change).format(secret=SECRET)
    if "kunde b" in problem:
        text = text.replace('smtp = "kunde.b"', "")
    assert problems(tmp_path, text) == [problem]


def test_environment_still_reaches_smtp_and_the_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POP3_CONNECTOR_SMTP__HOST", "exchange2.provider.local")
    monkeypatch.setenv("POP3_CONNECTOR_SMTP_TARGETS__KUNDE-A__PORT", "2525")
    settings = load(tmp_path, BASE.format(secret=SECRET))
    assert settings.smtp.host == "exchange2.provider.local"
    assert settings.smtp.tls == "none"  # the rest of [smtp] is the file's
    assert settings.smtp_targets["kunde-a"].port == 2525
    assert settings.smtp_targets["kunde-a"].host == "exchange.kunde-a.example"


def test_rendered_config_loads_again_with_targets_masked(tmp_path: Path) -> None:
    settings = load(tmp_path, BASE.format(secret=SECRET))
    text = render_settings(settings)
    assert SECRET not in text
    assert '[smtp_targets."kunde.b"]' in text
    assert 'smtp = "kunde-a"' in text
    data = tomllib.loads(text)
    assert data["smtp_targets"]["kunde-a"]["password"] == "********"
    assert data["accounts"][2].get("smtp") is None  # the default is not written out
    again = load(tmp_path, text.replace("********", "other"))
    assert again.smtp_targets.keys() == settings.smtp_targets.keys()
    assert [a.smtp for a in again.accounts] == ["kunde-a", "kunde.b", None]


def test_check_warns_about_a_target_by_its_key(tmp_path: Path) -> None:
    text = BASE.format(secret=SECRET).replace(
        'username = "connector@kunde-a.example"',
        'username = "connector@kunde-a.example"\ntls = "none"',
    )
    settings = load(tmp_path, text)
    warnings = config_warnings(settings, tmp_path / "config.toml")
    assert (
        'smtp_targets.kunde-a.tls: "none" sends the password in clear text to '
        "exchange.kunde-a.example" in warnings
    )
    wrong_port = text.replace('tls = "implicit"', 'tls = "starttls"\nport = 465')
    warnings = config_warnings(load(tmp_path, wrong_port), tmp_path / "config.toml")
    assert any(w.startswith('smtp_targets."kunde.b".port: 465 expects a TLS') for w in warnings)


def test_a_disabled_account_keeps_its_target_for_its_dead_letters(tmp_path: Path) -> None:
    """No spec is built for a disabled account, but its dead letters (requeue --to) and its
    ledger rows (ledger export) are still its own: the runtime knows its target by name."""
    text = BASE.format(secret=SECRET).replace(
        'smtp = "kunde.b"', 'smtp = "kunde.b"\nenabled = false'
    )
    runtime = build_runtime(load(tmp_path, text))
    assert [s.name for s in runtime.accounts] == ["a-info", "ours"]
    assert runtime.account_targets()["b-info"].name == "kunde.b"
    assert "gone" not in runtime.account_targets()  # requeue: [smtp] for an unknown account
