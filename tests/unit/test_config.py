"""connector.config: TOML + environment loading, validation messages, rendering, warnings."""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from connector.config import (
    MASK,
    AccountConfig,
    ImapDeadLetter,
    MaildirDeadLetter,
    MetricsSettings,
    RoutingRule,
    ServiceSettings,
    Settings,
    SharedConfig,
    SmtpConfig,
    config_warnings,
    dead_letter_path,
    format_duration,
    load_settings,
    parse_duration,
    parse_size,
    render_settings,
)
from connector.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
SECRET = "s3cr3t-Pa55word!"  # must never appear in an error or a rendering

SMTP = """
[smtp]
host = "exchange.example.local"
"""

ACCOUNT = f"""
[[accounts]]
name = "info"
host = "pop.example.net"
username = "info@firma.example"
password = "{SECRET}"
deliver_to = ["info@firma.local"]
"""

MINIMAL = SMTP + ACCOUNT


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test without any POP3_CONNECTOR_* variable from the outside."""
    for name in list(os.environ):
        if name.upper().startswith("POP3_CONNECTOR_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def load(tmp_path: Path, text: str) -> Settings:
    return load_settings(write(tmp_path, text))


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert SECRET not in str(info.value)
    assert all(SECRET not in p for p in info.value.problems)
    return info.value.problems


# --------------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    s = load(tmp_path, MINIMAL)
    assert s.service == ServiceSettings()
    assert s.service.state_dir == Path("/var/lib/pop3-connector")
    assert s.service.poll_interval == 900.0
    assert s.service.max_parallel_accounts == 8
    assert s.service.shutdown_grace == 30.0
    assert (s.service.log_level, s.service.log_format) == ("info", "text")
    assert s.metrics.listen == "127.0.0.1:9469"
    assert s.metrics.address == ("127.0.0.1", 9469)
    assert s.smtp.tls == "starttls"
    assert s.smtp.port == s.smtp.effective_port == 25
    assert s.smtp.verify_certificate is True
    assert s.smtp.ca_file is None
    assert s.smtp.username is None
    assert s.smtp.password is None
    assert s.smtp.secret() is None
    assert s.smtp.helo_name == socket.getfqdn()
    assert s.smtp.envelope_sender == "return-path"
    assert s.smtp.dsn is True
    assert s.smtp.timeout == 60.0
    assert s.dead_letter == MaildirDeadLetter(path=Path("/var/lib/pop3-connector/dead-letters"))
    assert dead_letter_path(s) == Path("/var/lib/pop3-connector/dead-letters")
    (a,) = s.accounts
    assert (a.name, a.host, a.port, a.tls) == ("info", "pop.example.net", 995, "implicit")
    assert a.verify_certificate is True
    assert a.auth == "auto"
    assert a.deliver_to == ["info@firma.local"]
    assert a.poll_interval == 900.0
    assert s.poll_interval_of(a) == 900.0
    assert a.enabled is True
    assert a.max_deferral == 5 * 86400
    assert a.secret() == SECRET


def test_dead_letter_path_follows_state_dir(tmp_path: Path) -> None:
    s = load(tmp_path, '[service]\nstate_dir = "/srv/pc"\n' + MINIMAL)
    assert s.dead_letter == MaildirDeadLetter(path=Path("/srv/pc/dead-letters"))
    s = load(tmp_path, '[dead_letter]\npath = "/srv/dl"\n' + MINIMAL)
    assert dead_letter_path(s) == Path("/srv/dl")


def test_account_poll_interval_overrides_service(tmp_path: Path) -> None:
    text = '[service]\npoll_interval = "10m"\n' + MINIMAL + 'poll_interval = "5m"\n'
    text += ACCOUNT.replace('"info"', '"other"')
    s = load(tmp_path, text)
    assert [a.poll_interval for a in s.accounts] == [300.0, 600.0]
    assert [s.poll_interval_of(a) for a in s.accounts] == [300.0, 600.0]


def test_models_are_frozen(tmp_path: Path) -> None:
    s = load(tmp_path, MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        s.smtp.host = "elsewhere"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.service = ServiceSettings()  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def test_env_deep_merges_over_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL.replace("[smtp]", '[smtp]\nport = 2525\ntls = "none"')
    monkeypatch.setenv("POP3_CONNECTOR_SMTP__HOST", "exchange2.example.local")
    monkeypatch.setenv("POP3_CONNECTOR_SERVICE__POLL_INTERVAL", "2m")
    monkeypatch.setenv("pop3_connector_metrics__listen", "")  # names are case-insensitive
    s = load(tmp_path, text)
    assert s.smtp.host == "exchange2.example.local"
    assert (s.smtp.port, s.smtp.tls) == (2525, "none")  # kept from the TOML
    assert s.service.poll_interval == 120.0
    assert s.accounts[0].poll_interval == 120.0  # the filled-in default sees the override
    assert s.metrics.address is None


def test_env_can_supply_a_whole_missing_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POP3_CONNECTOR_SMTP__HOST", "relay.example.local")
    assert load(tmp_path, ACCOUNT).smtp.host == "relay.example.local"


def test_a_byte_order_mark_at_the_start_is_dropped(tmp_path: Path) -> None:
    """Notepad writes one; the file loads, and the warning about its mode still finds the
    inline password."""
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    path.chmod(0o644)
    settings = load_settings(path)
    assert settings.accounts[0].secret() == SECRET
    assert [w.split(":")[0] for w in config_warnings(settings, path)] == [
        'accounts[0] (name "info").password'
    ]


def test_a_state_dir_or_dead_letter_path_that_is_a_file_is_named(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_text("")
    text = f'[service]\nstate_dir = "{file}"\n' + MINIMAL
    assert problems(tmp_path, text) == [f"service.state_dir: {file} exists and is not a directory"]
    text = f'[dead_letter]\npath = "{file}"\n' + MINIMAL
    assert problems(tmp_path, text) == [f"dead_letter.path: {file} exists and is not a directory"]


def test_config_path_variable_is_not_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POP3_CONNECTOR_CONFIG", str(tmp_path / "config.toml"))
    assert load(tmp_path, MINIMAL).smtp.host == "exchange.example.local"


def test_shard_count_variable_is_not_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # deploy/kubernetes/statefulset.yaml sets it for `run --shard auto/$(POP3_CONNECTOR_SHARDS)`.
    monkeypatch.setenv("POP3_CONNECTOR_SHARDS", "3")
    assert load(tmp_path, MINIMAL).smtp.host == "exchange.example.local"


def test_unknown_env_variable_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POP3_CONNECTOR_SMPT__HOST", "typo.example")
    assert problems(tmp_path, MINIMAL) == [
        "POP3_CONNECTOR_SMPT__HOST: unknown setting (environment variable)"
    ]
    monkeypatch.setenv("POP3_CONNECTOR_SMTP__HSOT", "typo.example")
    assert "POP3_CONNECTOR_SMTP__HSOT (environment variable, smtp.hsot): unknown key" in problems(
        tmp_path, MINIMAL
    )


def test_a_bad_value_from_the_environment_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment wins over the file, so its variable is the source to name; the same
    key in the file alone is named by its path."""
    monkeypatch.setenv("POP3_CONNECTOR_SMTP__PORT", "99999")
    assert problems(tmp_path, MINIMAL) == [
        "POP3_CONNECTOR_SMTP__PORT (environment variable, smtp.port): Input should be less "
        'than or equal to 65535 (got "99999")'
    ]
    monkeypatch.delenv("POP3_CONNECTOR_SMTP__PORT")
    assert problems(tmp_path, MINIMAL.replace("[smtp]", "[smtp]\nport = 99999")) == [
        "smtp.port: Input should be less than or equal to 65535 (got 99999)"
    ]


def test_password_env_variable_with_our_prefix_is_not_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POP3_CONNECTOR_INFO_PW", SECRET)
    text = MINIMAL.replace(f'password = "{SECRET}"', 'password_env = "POP3_CONNECTOR_INFO_PW"')
    assert load(tmp_path, text).accounts[0].secret() == SECRET


def test_bad_json_in_env_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POP3_CONNECTOR_ACCOUNTS", f"[{{password: {SECRET}")
    (problem,) = problems(tmp_path, MINIMAL)
    assert problem.startswith("environment: ")
    assert '"accounts"' in problem


def test_env_validation_error_names_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POP3_CONNECTOR_SMTP__PORT", "abc")
    assert problems(tmp_path, MINIMAL) == [
        "POP3_CONNECTOR_SMTP__PORT (environment variable, smtp.port): Input should be a valid "
        'integer, unable to parse string as an integer (got "abc")'
    ]


# --------------------------------------------------------------------------------------------
# Passwords
# --------------------------------------------------------------------------------------------


def with_password(source: str) -> str:
    return MINIMAL.replace(f'password = "{SECRET}"', source)


@pytest.mark.parametrize("content", [f"{SECRET}\n", f"{SECRET}\r\n", SECRET])
def test_password_file(tmp_path: Path, content: str) -> None:
    pw = tmp_path / "pw"
    pw.write_text(content, encoding="utf-8", newline="")
    s = load(tmp_path, with_password(f'password_file = "{pw}"'))
    a = s.accounts[0]
    assert a.secret() == SECRET
    assert a.password is not None
    assert a.password.get_secret_value() == SECRET
    assert a.password_file == pw


def test_password_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFO_PASSWORD", SECRET)
    a = load(tmp_path, with_password('password_env = "INFO_PASSWORD"')).accounts[0]
    assert a.secret() == SECRET
    assert a.password_env == "INFO_PASSWORD"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            f'password = "{SECRET}"\npassword_env = "PW"',
            'accounts[0] (name "info"): set only one of password, password_file, password_env '
            "(got password, password_env)",
        ),
        (
            'password_file = "/nonexistent/pw"\npassword_env = "PW"',
            'accounts[0] (name "info"): set only one of password, password_file, password_env '
            "(got password_file, password_env)",
        ),
        (
            "",
            'accounts[0] (name "info").password: '
            "required: set password, password_file or password_env",
        ),
        ('password = ""', 'accounts[0] (name "info").password: must not be empty'),
        (
            'password_file = "/nonexistent/pw"',
            'accounts[0] (name "info").password_file: '
            "cannot read /nonexistent/pw: No such file or directory",
        ),
        (
            'password_env = "POP3_TEST_UNSET_VARIABLE"',
            'accounts[0] (name "info").password_env: '
            "environment variable POP3_TEST_UNSET_VARIABLE is not set",
        ),
        (
            'password_env = "NOT A NAME"',
            'accounts[0] (name "info").password_env: not a valid environment variable name '
            '(got "NOT A NAME")',
        ),
    ],
)
def test_password_problems(tmp_path: Path, source: str, expected: str) -> None:
    assert problems(tmp_path, with_password(source)) == [expected]


def test_empty_password_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("\n", encoding="utf-8")
    assert problems(tmp_path, with_password(f'password_file = "{tmp_path / "pw"}"')) == [
        f'accounts[0] (name "info").password_file: {tmp_path / "pw"} is empty'
    ]
    monkeypatch.setenv("EMPTY_PW", "")
    assert problems(tmp_path, with_password('password_env = "EMPTY_PW"')) == [
        'accounts[0] (name "info").password_env: environment variable EMPTY_PW is empty'
    ]


@pytest.mark.parametrize(
    "content",
    [
        # Windows PowerShell 5.1: Set-Content -NoNewline -Encoding utf8 (a BOM, no line end)
        b"\xef\xbb\xbf" + "Pässwort!".encode(),
        # Notepad: a BOM and a CRLF
        b"\xef\xbb\xbf" + "Pässwort!".encode() + b"\r\n",
        # [IO.File]::WriteAllText(path, pw), or printf on Linux
        "Pässwort!".encode(),
        "Pässwort!\n".encode(),
    ],
)
def test_password_file_is_utf8_and_a_byte_order_mark_is_dropped(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "pw").write_bytes(content)
    settings = load(tmp_path, with_password(f'password_file = "{tmp_path / "pw"}"'))
    assert settings.accounts[0].secret() == "Pässwort!"


def test_password_file_with_only_a_byte_order_mark_is_empty(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(b"\xef\xbb\xbf\r\n")
    assert problems(tmp_path, with_password(f'password_file = "{tmp_path / "pw"}"')) == [
        f'accounts[0] (name "info").password_file: {tmp_path / "pw"} is empty'
    ]


def test_unreadable_password_file_names_the_key(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (the tests may run as root).
    assert problems(tmp_path, with_password(f'password_file = "{tmp_path}"')) == [
        f'accounts[0] (name "info").password_file: cannot read {tmp_path}: Is a directory'
    ]


def test_smtp_auth_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PW", SECRET)
    text = MINIMAL.replace("[smtp]", '[smtp]\nusername = "connector"\npassword_env = "SMTP_PW"')
    s = load(tmp_path, text)
    assert (s.smtp.username, s.smtp.secret()) == ("connector", SECRET)
    assert problems(tmp_path, MINIMAL.replace("[smtp]", '[smtp]\nusername = "connector"')) == [
        "smtp.password: username is set: set password, password_file or password_env too"
    ]
    assert problems(tmp_path, MINIMAL.replace("[smtp]", f'[smtp]\npassword = "{SECRET}"')) == [
        "smtp.username: required when a password is set (SMTP AUTH)"
    ]


def test_imap_dead_letter_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAP_PW", SECRET)
    dl = '[dead_letter]\nstore = "imap"\nhost = "imap.example"\nusername = "dl"\n'
    s = load(tmp_path, dl + 'password_env = "IMAP_PW"\n' + MINIMAL)
    assert isinstance(s.dead_letter, ImapDeadLetter)
    assert (s.dead_letter.port, s.dead_letter.tls) == (993, "implicit")
    assert s.dead_letter.folder == "POP3 Connector/Dead Letters"
    assert s.dead_letter.secret() == SECRET
    assert dead_letter_path(s) is None
    assert problems(tmp_path, dl + MINIMAL) == [
        "dead_letter.password: required: set password, password_file or password_env"
    ]
    assert problems(tmp_path, '[dead_letter]\nstore = "imap"\npath = "/x"\n' + MINIMAL) == [
        "dead_letter.host: Field required",
        "dead_letter.username: Field required",
        "dead_letter.path: unknown key",
    ]
    assert problems(tmp_path, '[dead_letter]\nstore = "mbox"\n' + MINIMAL) == [
        'dead_letter.store: must be "maildir" or "imap"'
    ]


# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("5d", 432000.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s", 93784.0),
        ("1.5h", 5400.0),
        ("0.5s", 0.5),
        (" 10S ", 10.0),
        ("90", 90.0),
        (90, 90.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "",
        "s",
        "5x",
        "30 s",
        "1m1h",
        "1h1h",
        "-5s",
        "0s",
        0,
        -5,
        True,
        None,
        [],
        "inf",
        float("nan"),
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30.0, "30s"), (900.0, "15m"), (5400.0, "1h30m"), (432000.0, "5d"), (93784.0, "1d2h3m4s")],
)
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds
    assert format_duration(0.25) == 0.25


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("shutdown_grace", '"soon"', 'service.shutdown_grace: expected a duration like "30s", '),
        ("poll_interval", "0", "service.poll_interval: a duration must be greater than 0"),
        ("poll_interval", "true", "service.poll_interval: expected a duration"),
    ],
)
def test_bad_duration_names_the_key(tmp_path: Path, key: str, value: str, expected: str) -> None:
    (problem,) = problems(tmp_path, f"[service]\n{key} = {value}\n" + MINIMAL)
    assert problem.startswith(expected)


# --------------------------------------------------------------------------------------------
# Validation messages
# --------------------------------------------------------------------------------------------


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    text = (
        '[servic]\nx = 1\n[dead_letter]\npth = "/x"\n'
        + MINIMAL.replace("[smtp]", '[smtp]\nhots = "x"')
        + "secuirty = 1\n"
    )
    assert problems(tmp_path, text) == [
        "smtp.hots: unknown key",
        "dead_letter.pth: unknown key",
        'accounts[0] (name "info").secuirty: unknown key',
        "servic: unknown key",
    ]


@pytest.mark.parametrize("second", ["info", "INFO"])
def test_duplicate_account_names(tmp_path: Path, second: str) -> None:
    text = MINIMAL + ACCOUNT.replace('"info"', '"other"') + ACCOUNT.replace('"info"', f'"{second}"')
    assert problems(tmp_path, text) == [
        f'accounts[2] (name "{second}").name: duplicate account name (also accounts[0])'
    ]


@pytest.mark.parametrize("name", ["info", "a", "info@firma.example", "x_y-z.1", "n" * 64])
def test_good_account_names(tmp_path: Path, name: str) -> None:
    assert load(tmp_path, MINIMAL.replace('"info"', f'"{name}"', 1)).accounts[0].name == name


@pytest.mark.parametrize("name", ["", "n" * 65, "has space", "a/b", "..", "ünï", "a:b"])
def test_bad_account_names(tmp_path: Path, name: str) -> None:
    shown = name if len(name) <= 60 else name[:60] + "..."
    assert problems(tmp_path, MINIMAL.replace('"info"', f'"{name}"', 1)) == [
        "accounts[0].name: use 1-64 characters: letters, digits, '.', '_', '-' or '@' "
        f'(got "{shown}")'
    ]


@pytest.mark.parametrize(
    ("model", "tls", "port"),
    [
        ("accounts", "implicit", 995),
        ("accounts", "starttls", 110),
        ("accounts", "none", 110),
        ("smtp", "implicit", 465),
        ("smtp", "starttls", 25),
        ("smtp", "none", 25),
    ],
)
def test_port_defaults_by_tls(tmp_path: Path, model: str, tls: str, port: int) -> None:
    header = "[smtp]" if model == "smtp" else "[[accounts]]"
    s = load(tmp_path, MINIMAL.replace(header, f'{header}\ntls = "{tls}"'))
    section: SmtpConfig | AccountConfig = s.smtp if model == "smtp" else s.accounts[0]
    assert section.port == section.effective_port == port
    s = load(tmp_path, MINIMAL.replace(header, f'{header}\ntls = "{tls}"\nport = 1234'))
    section = s.smtp if model == "smtp" else s.accounts[0]
    assert section.port == section.effective_port == 1234


@pytest.mark.parametrize(("tls", "port"), [("implicit", 993), ("none", 143)])
def test_imap_port_defaults_by_tls(tmp_path: Path, tls: str, port: int) -> None:
    dl = '[dead_letter]\nstore = "imap"\nhost = "h"\nusername = "u"\npassword = "p"\n'
    dl += f'tls = "{tls}"\n'
    assert load(tmp_path, dl + MINIMAL).dead_letter == ImapDeadLetter(
        store="imap",
        host="h",
        username="u",
        password="p",
        tls=tls,
        port=port,
    )


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9469", ("127.0.0.1", 9469)),
        ("[::1]:9469", ("::1", 9469)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),  # noqa: S104
        ("metrics.example.local:9469", ("metrics.example.local", 9469)),
        ("localhost:0", ("localhost", 0)),
        ("", None),
    ],
)
def test_metrics_listen(listen: str, address: tuple[str, int] | None) -> None:
    assert MetricsSettings(listen=listen).address == address


@pytest.mark.parametrize(
    "listen", ["9469", "::1:9469", "[nothost]:1", "host:70000", "host:", ":80"]
)
def test_metrics_listen_rejects(tmp_path: Path, listen: str) -> None:
    (problem,) = problems(tmp_path, f'[metrics]\nlisten = "{listen}"\n' + MINIMAL)
    assert problem.startswith("metrics.listen: ")


@pytest.mark.parametrize("sender", ["return-path", "null", "bounce@firma.example"])
def test_envelope_sender(tmp_path: Path, sender: str) -> None:
    text = MINIMAL.replace("[smtp]", f'[smtp]\nenvelope_sender = "{sender}"')
    assert load(tmp_path, text).smtp.envelope_sender == sender


@pytest.mark.parametrize("sender", ["<>", "", "nobody", "a b@x", "x@y\\r\\nRCPT TO:<z@w>"])
def test_bad_envelope_sender(tmp_path: Path, sender: str) -> None:
    text = MINIMAL.replace("[smtp]", f'[smtp]\nenvelope_sender = "{sender}"')
    (problem,) = problems(tmp_path, text)
    assert problem.startswith(
        'smtp.envelope_sender: expected "return-path", "null" or a mail address (got "'
    )
    assert "\r" not in problem
    assert "\n" not in problem  # control characters escaped


def test_several_problems_all_listed(tmp_path: Path) -> None:
    text = f"""
[service]
max_parallel_accounts = 0
log_level = "verbose"

[smtp]
port = "twenty-five"

[[accounts]]
name = "ok"
host = "pop.example.net"
username = "u"
password = "{SECRET}"
deliver_to = []

[[accounts]]
name = "bad one"
port = 70000
tls = "ssl"
username = "u"
password = "{SECRET}"
deliver_to = ["info@firma.local", "not an address"]
poll_interval = "7x"
secuirty = "tls"
"""
    # Each account is named next to its index, and a bad value is shown (never a secret, nor
    # the value of an unknown key, which may be a misspelt password).
    bad = 'accounts[1] (name "bad one")'
    assert problems(tmp_path, text) == [
        "service.max_parallel_accounts: Input should be greater than or equal to 1 (got 0)",
        "service.log_level: Input should be 'debug', 'info', 'warning' or 'error' "
        '(got "verbose")',
        "smtp.host: Field required",
        "smtp.port: Input should be a valid integer, unable to parse string as an integer "
        '(got "twenty-five")',
        'accounts[0] (name "ok").deliver_to: List should have at least 1 item after validation, '
        "not 0",
        f"{bad}.host: Field required",
        f"{bad}.port: Input should be less than or equal to 65535 (got 70000)",
        f"{bad}.tls: Input should be 'implicit', 'starttls' or 'none' (got \"ssl\")",
        "accounts[1].name: use 1-64 characters: letters, digits, '.', '_', '-' or '@' "
        '(got "bad one")',
        f"{bad}.deliver_to[1]: not a valid mail address (expected user@domain, ASCII, no <>) "
        '(got "not an address")',
        f'{bad}.poll_interval: expected a duration like "30s", "15m", "2h", "5d", '
        '"1h30m" or seconds (got "7x")',
        f"{bad}.secuirty: unknown key",
    ]


def test_missing_sections(tmp_path: Path) -> None:
    assert problems(tmp_path, "") == ["smtp: Field required", "accounts: Field required"]
    assert problems(tmp_path, "accounts = []\n" + SMTP) == [
        "accounts: List should have at least 1 item after validation, not 0"
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.toml")
    assert info.value.problems == [f"config file not found: {tmp_path / 'nope.toml'}"]
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    assert info.value.problems == [f"config file is a directory: {tmp_path}"]


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    text = MINIMAL + f'[[accounts]\npassword = "{SECRET}"\n'
    (problem,) = problems(tmp_path, text)
    line = text.count("\n", 0, text.index("[[accounts]\n")) + 1
    assert problem.startswith(f"{tmp_path / 'config.toml'}: TOML syntax error: ")
    assert re.search(rf"\(at line {line}, column \d+\)$", problem)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[smtp]\nhost = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(path)


@pytest.mark.parametrize(
    "text",
    [
        # model-level error: pydantic's error dict would carry the whole account with the password
        with_password(f'password = "{SECRET}"\npassword_env = "X"'),
        # missing fields next to an inline password
        f'[smtp]\nhost = "h"\n[[accounts]]\npassword = "{SECRET}"\n',
        # wrong type in the password itself
        MINIMAL.replace(f'password = "{SECRET}"', f'password = ["{SECRET}"]'),
        # SMTP password without a username
        MINIMAL.replace("[smtp]", f'[smtp]\npassword = "{SECRET}"'),
        # an unknown key whose value is the secret
        MINIMAL + f'pasword = "{SECRET}"\n',
        # a duration whose text is the secret
        MINIMAL + f'poll_interval = "{SECRET}"\n',
        f'[dead_letter]\nstore = "imap"\npassword = "{SECRET}"\n' + MINIMAL,
    ],
)
def test_no_secret_in_errors(tmp_path: Path, text: str) -> None:
    assert problems(tmp_path, text)  # problems() asserts the secret is absent


def test_no_secret_from_files_or_env_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pw").write_text(SECRET, encoding="utf-8")
    monkeypatch.setenv("PW", SECRET)
    text = with_password(f'password_file = "{tmp_path / "pw"}"\npassword_env = "PW"')
    assert problems(tmp_path, text)
    monkeypatch.setenv("POP3_CONNECTOR_SMTP__PASSWORD", SECRET)  # without a username
    assert problems(tmp_path, MINIMAL)


@pytest.mark.parametrize(
    "key",
    ["poll_interval", "tls", "port", "deliver_to", "max_message_size", "auth"],
)
@pytest.mark.parametrize("source", ["env", "file", "smtp-env"])
def test_a_secret_pasted_into_another_key_is_not_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, source: str
) -> None:
    """Bad values are shown, but never a password that landed in the wrong key, whichever way
    the password is given."""
    (tmp_path / "pw").write_bytes(b"\xef\xbb\xbf" + SECRET.encode() + b"\r\n")
    monkeypatch.setenv("PW", SECRET)
    given = {
        "env": 'password_env = "PW"',
        "file": f'password_file = "{tmp_path / "pw"}"',
        "smtp-env": f'password = "other-{SECRET[:3]}"',
    }[source]
    if source == "smtp-env":
        monkeypatch.setenv("POP3_CONNECTOR_SMTP__PASSWORD", SECRET)
    value = f'["{SECRET}"]' if key == "deliver_to" else f'"{SECRET}"'
    text = with_password(given).replace('name = "info"', f'name = "info"\n{key} = {value}')
    text = text.replace('deliver_to = ["info@firma.local"]\n', "") if key == "deliver_to" else text
    assert problems(tmp_path, text)  # problems() asserts the secret is absent


@pytest.mark.parametrize("key", ["host", "username", "deliver_to", "smtp-host", "target-host"])
@pytest.mark.parametrize("source", ["inline", "file", "smtp", "target"])
def test_check_masks_a_secret_pasted_into_a_valid_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, source: str
) -> None:
    """A password that is also a valid value elsewhere (the same text as a host, a user name,
    a recipient) loads, and ``check`` (the rendering and the warnings) masks it there too,
    whichever password it is: an account's, [smtp]'s or another target's."""
    secret = "Hunter2-secret@firma.local" if key == "deliver_to" else "Hunter2-secret"
    (tmp_path / "pw").write_text(secret + "\n", encoding="utf-8")
    password = {
        "inline": f'password = "{secret}"',
        "file": f'password_file = "{tmp_path / "pw"}"',
        "smtp": 'password = "pw"',
        "target": 'password = "pw"',
    }[source]
    smtp_login = f'username = "c"\npassword = "{secret}"\n' if source == "smtp" else ""
    target_login = f'username = "c"\npassword = "{secret}"\n' if source == "target" else ""
    values = dict.fromkeys(("host", "smtp-host", "target-host"), "x.example")
    values |= {"username": "info", "deliver_to": "info@firma.local", key: secret}
    text = f"""
[smtp]
host = "{values["smtp-host"]}"
tls = "none"
{smtp_login}
[smtp_targets.kunde]
host = "{values["target-host"]}"
tls = "none"
{target_login}
[[accounts]]
name = "info"
host = "{values["host"]}"
tls = "none"
username = "{values["username"]}"
{password}
deliver_to = ["{values["deliver_to"]}"]
smtp = "kunde"
"""
    path = write(tmp_path, text)
    settings = load_settings(path)
    shown = render_settings(settings) + "\n".join(config_warnings(settings, path))
    assert secret not in shown
    assert "Hunter2" not in shown
    assert MASK in shown


def test_errors_mask_a_secret_quoted_in_a_message(tmp_path: Path) -> None:
    """A message that quotes a configured value (here the name of an SMTP target that does
    not exist) masks a password in it."""
    text = MINIMAL.replace('name = "info"', f'name = "info"\nsmtp = "{SECRET[:6]}-x"').replace(
        f'password = "{SECRET}"', f'password = "{SECRET[:6]}-x"'
    )
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    (problem,) = info.value.problems
    assert problem.startswith('accounts[0] (name "info").smtp: no SMTP target')
    assert f"{SECRET[:6]}-x" not in problem


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def full_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pw").write_text(SECRET + "\n", encoding="utf-8")
    monkeypatch.setenv("IMAP_PW", SECRET)
    text = f"""
[service]
state_dir = "{tmp_path}"
poll_interval = "1h30m"
shutdown_grace = 2.5

[smtp]
host = "exchange.example.local"
username = "connector"
password = "{SECRET}"
helo_name = "connector.example.local"
envelope_sender = "null"

[dead_letter]
store = "imap"
host = "imap.example"
username = "dl"
password_env = "IMAP_PW"
folder = "Dead \\"Letters\\" \\\\ ünïcode"

[[accounts]]
name = "info"
host = "pop.example.net"
username = "info@firma.example"
password_file = "{tmp_path / "pw"}"
deliver_to = ["info@firma.local", "office@firma.local"]
max_deferral = "2d"
"""
    return write(tmp_path, text)


def test_render_round_trips_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = load_settings(full_config(tmp_path, monkeypatch))
    text = render_settings(s)
    assert SECRET not in text
    assert f'password = "{MASK}"' in text
    data = tomllib.loads(text)
    assert data["smtp"]["password"] == MASK
    assert data["service"]["poll_interval"] == "1h30m"
    assert data["service"]["shutdown_grace"] == 2.5
    assert data["dead_letter"]["password_env"] == "IMAP_PW"
    assert "password" not in data["dead_letter"]
    assert data["accounts"][0]["password_file"] == str(tmp_path / "pw")
    assert "password" not in data["accounts"][0]
    assert data["dead_letter"]["folder"] == 'Dead "Letters" \\ ünïcode'
    # The rendering is a valid config: loading it gives the same settings, masked password aside.
    again = load_settings(write(tmp_path, text, "rendered.toml"))
    assert again.smtp.secret() == MASK
    assert again.model_copy(update={"smtp": s.smtp}) == s


def test_render_defaults(tmp_path: Path) -> None:
    data = tomllib.loads(render_settings(load(tmp_path, MINIMAL)))
    assert data["dead_letter"] == {
        "store": "maildir",
        "path": "/var/lib/pop3-connector/dead-letters",
    }
    assert data["smtp"]["port"] == 25
    assert data["smtp"]["timeout"] == "1m"
    assert data["service"]["cycle_timeout"] == "1h"  # as every other duration
    assert data["accounts"][0]["max_deferral"] == "5d"
    assert data["accounts"][0]["password"] == MASK
    assert list(data["accounts"][0])[:2] == ["name", "host"]


def test_render_shows_every_duration_key_as_a_duration(tmp_path: Path) -> None:
    # An IMAP account's idle_renewal was printed as 1500.0 seconds.
    text = MINIMAL.replace("deliver_to = ", 'protocol = "imap"\ndeliver_to = ', 1)
    data = tomllib.loads(render_settings(load(tmp_path, text)))
    assert data["accounts"][0]["idle_renewal"] == "25m"


# --------------------------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------------------------


def test_warnings_clear_text_password(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("[[accounts]]", '[[accounts]]\ntls = "none"'))
    assert config_warnings(load_settings(path), path) == [
        'accounts[0] (name "info").tls: "none" sends the password in clear text to pop.example.net'
    ]


def test_warnings_oauth2_token_in_clear_text(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("ya29.token\n")
    xoauth2 = SMTP + (
        '[[accounts]]\nname = "m365"\nhost = "{host}"\nusername = "info@firma.example"\n'
        f'auth = "xoauth2"\noauth2_token_file = "{token}"\ndeliver_to = ["info@firma.local"]\n'
    )
    path = write(tmp_path, xoauth2.format(host="pop.example.net") + 'tls = "none"\n')
    assert config_warnings(load_settings(path), path) == [
        'accounts[0] (name "m365").tls: "none" sends the OAuth2 access token in clear text to '
        "pop.example.net"
    ]
    for text in (
        xoauth2.format(host="pop.example.net"),  # implicit TLS, the default
        xoauth2.format(host="127.0.0.1") + 'tls = "none"\n',
    ):
        path = write(tmp_path, text)
        assert config_warnings(load_settings(path), path) == []


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "x.localhost"]
)
def test_no_clear_text_warning_for_loopback(tmp_path: Path, host: str) -> None:
    text = MINIMAL.replace("[[accounts]]", '[[accounts]]\ntls = "none"').replace(
        'host = "pop.example.net"', f'host = "{host}"'
    )
    path = write(tmp_path, text)
    assert config_warnings(load_settings(path), path) == []


def test_warnings_verify_certificate_and_smtp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PW", SECRET)
    text = MINIMAL.replace(
        "[smtp]", '[smtp]\ntls = "none"\nusername = "c"\npassword_env = "PW"'
    ).replace("[[accounts]]", "[[accounts]]\nverify_certificate = false\nenabled = false")
    path = write(tmp_path, text)
    warnings = config_warnings(load_settings(path), path)
    assert warnings == [
        'smtp.tls: "none" sends the password in clear text to exchange.example.local',
        'accounts[0] (name "info").verify_certificate: false accepts'
        " any certificate from pop.example.net "
        "(anyone on the path can read the password and the mail)",
        "accounts: no account is enabled; run and once will do nothing",
    ]
    assert all(SECRET not in w for w in warnings)


def test_warnings_file_modes(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    settings = load_settings(path)
    assert config_warnings(settings, path) == []
    path.chmod(0o640)
    assert config_warnings(settings, path) == [
        f'accounts[0] (name "info").password: {path} holds'
        f" a password and is accessible to group or others "
        "(mode 0640); chmod 600 it, or use password_file / password_env"
    ]
    pw = tmp_path / "pw"
    pw.write_text(SECRET, encoding="utf-8")
    pw.chmod(0o604)
    path = write(tmp_path, with_password(f'password_file = "{pw}"'))
    path.chmod(0o644)  # no inline password: the config's mode does not matter
    assert config_warnings(load_settings(path), path) == [
        f'accounts[0] (name "info").password_file: {pw} is accessible'
        f" to group or others (mode 0604); "
        "chmod 600 it"
    ]


def test_group_access_by_our_own_group_is_no_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """root:pop3-connector 0640, read by the service user (deploy/README.md): that is fine;
    the same file readable by a group we are not in is not."""
    pw = tmp_path / "pw"
    pw.write_text(SECRET, encoding="utf-8")
    pw.chmod(0o640)
    os.chown(pw, -1, 65534)
    path = write(tmp_path, with_password(f'password_file = "{pw}"'))
    settings = load_settings(path)
    assert len(config_warnings(settings, path)) == 1  # we (root) are not in group 65534
    monkeypatch.setattr(os, "getegid", lambda: 65534)  # as the service user would be
    assert config_warnings(settings, path) == []


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "port = 110",  # tls left at its default, "implicit"
            'accounts[0] (name "info").port: 110 speaks plain text (STARTTLS at most), but '
            'tls = "implicit" (the default: tls is not set) starts with a TLS handshake; use '
            'port 995, or tls = "starttls"',
        ),
        (
            'port = 995\ntls = "starttls"',
            'accounts[0] (name "info").port: 995 expects a TLS handshake first (implicit TLS), '
            'but tls = "starttls" waits for a greeting in plain text; use tls = "implicit"',
        ),
        (
            'port = 995\ntls = "none"',
            'accounts[0] (name "info").port: 995 expects a TLS handshake first (implicit TLS), '
            'but tls = "none" waits for a greeting in plain text; use tls = "implicit"',
        ),
        ("port = 995", None),
        ('port = 110\ntls = "starttls"', None),
        ("port = 1995", None),  # not a well-known port: the admin knows best
    ],
)
def test_warnings_pop3_port_against_tls(tmp_path: Path, setting: str, expected: str | None) -> None:
    path = write(tmp_path, MINIMAL.replace('name = "info"', f'name = "info"\n{setting}'))
    warnings = [w for w in config_warnings(load_settings(path), path) if ".port: " in w]
    assert warnings == ([expected] if expected else [])


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            'port = 587\ntls = "implicit"',
            'smtp.port: 587 speaks plain text (STARTTLS at most), but tls = "implicit" starts '
            'with a TLS handshake; use port 465, or tls = "starttls"',
        ),
        (
            "port = 465",  # tls left at its default, "starttls"
            'smtp.port: 465 expects a TLS handshake first (implicit TLS), but tls = "starttls" '
            'waits for a greeting in plain text; use tls = "implicit"',
        ),
        ("port = 587", None),
        ('port = 465\ntls = "implicit"', None),
    ],
)
def test_warnings_smtp_port_against_tls(tmp_path: Path, setting: str, expected: str | None) -> None:
    path = write(tmp_path, MINIMAL.replace("[smtp]", f"[smtp]\n{setting}"))
    assert config_warnings(load_settings(path), path) == ([expected] if expected else [])


def test_warnings_imap_store_port_against_tls(tmp_path: Path) -> None:
    dl = '[dead_letter]\nstore = "imap"\nhost = "h"\nusername = "u"\npassword = "p"\nport = 143\n'
    path = write(tmp_path, dl + MINIMAL)
    assert config_warnings(load_settings(path), path) == [
        'dead_letter.port: 143 speaks plain text (STARTTLS at most), but tls = "implicit" '
        '(the default: tls is not set) starts with a TLS handshake; use port 993, or tls = "none"'
    ]


def test_warnings_poll_interval_under_a_minute(tmp_path: Path) -> None:
    """SBS said "every 15 minutes"; ``poll_interval = 15`` is fifteen seconds."""
    text = MINIMAL.replace("[smtp]", "[service]\npoll_interval = 15\n\n[smtp]")
    path = write(tmp_path, text)
    assert config_warnings(load_settings(path), path) == [
        "service.poll_interval: 15 s, a login every 15 seconds; a bare number is seconds: for "
        '15 minutes write "15m".  Providers may lock or refuse a mailbox polled this often '
        "(RFC 2449 LOGIN-DELAY)"
    ]
    # An account's own interval is named with the account; one inherited is not repeated.
    text = MINIMAL + ACCOUNT.replace('"info"', '"sales"', 1) + 'poll_interval = "30s"\n'
    path = write(tmp_path, text)
    (warning,) = config_warnings(load_settings(path), path)
    assert warning.startswith('accounts[1] (name "sales").poll_interval: 30 s, a login every')
    # Written with its unit, it means seconds: no hint at minutes.
    assert "bare number" not in warning
    path = write(
        tmp_path, MINIMAL + ACCOUNT.replace('"info"', '"sales"', 1) + "poll_interval = 30\n"
    )
    (warning,) = config_warnings(load_settings(path), path)
    assert 'a bare number is seconds: for 30 minutes write "30m"' in warning
    for fine in ("60", '"1m"', '"15m"', "900"):
        path = write(tmp_path, MINIMAL + f"poll_interval = {fine}\n")
        assert config_warnings(load_settings(path), path) == []


# --------------------------------------------------------------------------------------------
# The example file
# --------------------------------------------------------------------------------------------


def test_example_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POP3_INFO_PASSWORD", SECRET)
    (tmp_path / "sales.password").write_text("sales-secret\n", encoding="utf-8")
    (tmp_path / "sales.password").chmod(0o600)
    text = EXAMPLE.read_text(encoding="utf-8")
    assert '"/etc/pop3-connector/sales.password"' in text
    text = text.replace('"/etc/pop3-connector/sales.password"', f'"{tmp_path / "sales.password"}"')
    path = write(tmp_path, text)
    s = load_settings(path)
    assert [a.name for a in s.accounts] == ["info", "sales"]
    info, sales = s.accounts
    assert (info.secret(), sales.secret()) == (SECRET, "sales-secret")
    assert (info.port, info.poll_interval) == (995, 300.0)
    assert (sales.port, sales.poll_interval) == (110, 900.0)
    assert s.service == ServiceSettings()  # the example shows the defaults
    assert s.smtp.port == 25
    assert config_warnings(s, path) == []


@pytest.mark.parametrize(
    "model",
    [
        ServiceSettings,
        MetricsSettings,
        SmtpConfig,
        MaildirDeadLetter,
        ImapDeadLetter,
        AccountConfig,
        SharedConfig,
        RoutingRule,
    ],
)
def test_example_config_shows_every_key(model: type[BaseModel]) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in model.model_fields:
        # A key, or a table (``[accounts.shared]``, ``[[accounts.shared.rules]]``).
        assert re.search(
            rf"^[ \t]*(?:#[ \t]*)?(?:{key}[ \t]*=|\[\[?[\w.]*\b{key}\]\]?)", text, re.MULTILINE
        ), key
    for table in Settings.model_fields:
        # The SMTP targets are a table of tables, shown commented out (``# [smtp_targets.x]``):
        # a business with one Exchange has none.
        if table == "smtp_targets":
            assert re.search(r"^# \[smtp_targets\.[\w-]+\]$", text, re.MULTILINE), table
            continue
        assert re.search(rf"^\[\[?{table}\]\]?", text, re.MULTILINE), table


def test_models_can_be_built_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other modules' tests build these without a file: derived values are filled in too."""
    monkeypatch.setenv("PW", SECRET)
    a = AccountConfig(
        name="x", host="h", tls="starttls", username="u", password_env="PW", deliver_to=["a@b"]
    )
    assert (a.port, a.secret(), a.poll_interval) == (110, SECRET, None)
    smtp = SmtpConfig(host="relay", tls="implicit")
    assert (smtp.port, smtp.helo_name) == (465, socket.getfqdn())
    s = Settings(smtp=smtp, accounts=[a])
    assert s.accounts[0].poll_interval == 900.0
    assert dead_letter_path(s) == Path("/var/lib/pop3-connector/dead-letters")


# --------------------------------------------------------------------------------------------
# What POP3 cannot carry: refused at load time, not at every login
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("username", ["info firma", "info\tfirma", "in\x00fo"])
def test_pop3_username_without_spaces_or_controls(tmp_path: Path, username: str) -> None:
    text = SMTP + ACCOUNT.replace('"info@firma.example"', json.dumps(username))
    assert [p.split(":")[0] for p in problems(tmp_path, text)] == [
        'accounts[0] (name "info").username'
    ]


def test_password_with_a_line_break_is_refused_without_echoing_it(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(f"{SECRET}\nsecond line\n")
    text = SMTP + ACCOUNT.replace(f'password = "{SECRET}"', f'password_file = "{secret_file}"')
    (problem,) = problems(tmp_path, text)
    assert problem.startswith('accounts[0] (name "info").password: must not contain a line break')
    assert "second line" not in problem


# --------------------------------------------------------------------------------------------
# leave_on_server, delete_after, max_message_size
# --------------------------------------------------------------------------------------------


def test_leave_on_server_keys_load_and_render(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        MINIMAL + 'leave_on_server = true\ndelete_after = "7d"\nmax_message_size = "50MB"\n',
    )
    (a,) = s.accounts
    assert (a.leave_on_server, a.delete_after, a.max_message_size) == (
        True,
        7 * 86400.0,
        50 * 10**6,
    )
    rendered = render_settings(s)
    assert 'delete_after = "7d"' in rendered
    assert "max_message_size = 50000000" in rendered
    assert "leave_on_server = true" in rendered
    again = tomllib.loads(rendered)["accounts"][0]
    assert (again["delete_after"], again["max_message_size"]) == ("7d", 50_000_000)


def test_leave_on_server_defaults(tmp_path: Path) -> None:
    (a,) = load(tmp_path, MINIMAL).accounts
    assert (a.leave_on_server, a.delete_after, a.max_message_size) == (False, None, 256 * 2**20)


def test_delete_after_without_leave_on_server_names_the_key(tmp_path: Path) -> None:
    assert problems(tmp_path, MINIMAL + 'delete_after = "7d"\n') == [
        'accounts[0] (name "info").delete_after: only meaningful with leave_on_server = true'
    ]
    assert problems(tmp_path, MINIMAL + 'leave_on_server = false\ndelete_after = "1h"\n') == [
        'accounts[0] (name "info").delete_after: only meaningful with leave_on_server = true'
    ]


def test_example_leave_on_server_lines_load_when_uncommented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POP3_INFO_PASSWORD", SECRET)
    lines = [
        re.sub(r"^# (max_message_size|leave_on_server|delete_after)\b", r"\1", line)
        for line in EXAMPLE.read_text(encoding="utf-8").splitlines()
    ]
    text = "\n".join(lines).replace("leave_on_server = false", "leave_on_server = true")
    (tmp_path / "sales.password").write_text("x\n", encoding="utf-8")
    text = text.replace('"/etc/pop3-connector/sales.password"', f'"{tmp_path / "sales.password"}"')
    info = load(tmp_path, text).accounts[0]
    assert (info.leave_on_server, info.delete_after, info.max_message_size) == (
        True,
        7 * 86400.0,
        256 * 2**20,
    )


@pytest.mark.parametrize(
    ("value", "octets"),
    [
        (1000, 1000),
        ("1000", 1000),
        ("50MB", 50_000_000),
        ("25MiB", 25 * 2**20),
        ("25 mib", 25 * 2**20),
        ("512KiB", 512 * 1024),
        ("1.5KB", 1500),
        ("2GB", 2 * 10**9),
        ("1GiB", 2**30),
        ("10B", 10),
    ],
)
def test_parse_size(value: object, octets: int) -> None:
    assert parse_size(value) == octets


@pytest.mark.parametrize("value", [0, -5, "0MB", "", "MB", "5 XB", "1.5B", "0.1KiB", True, 2.5])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


def test_bad_max_message_size_names_the_key(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, MINIMAL + 'max_message_size = "lots"\n')
    assert line.startswith('accounts[0] (name "info").max_message_size: expected a size')


# --------------------------------------------------------------------------------------------
# Memory (docs/design.md §5.3, §10.6)
# --------------------------------------------------------------------------------------------


def test_the_memory_budget_defaults_to_twice_the_threshold_per_parallel_account(
    tmp_path: Path,
) -> None:
    s = load(tmp_path, MINIMAL)
    assert s.service.spool_threshold == 2 * 1024 * 1024
    assert s.service.memory_budget() == 2 * 2 * 1024 * 1024 * 8
    s = load(tmp_path, '[service]\nspool_threshold = "1MiB"\nmax_parallel_accounts = 3\n' + MINIMAL)
    assert s.service.memory_budget() == 2 * 1024 * 1024 * 3
    s = load(tmp_path, '[service]\nmessage_memory_budget = "50MB"\n' + MINIMAL)
    assert s.service.memory_budget() == 50_000_000


def test_a_budget_smaller_than_the_threshold_is_refused_by_name(tmp_path: Path) -> None:
    (problem,) = problems(
        tmp_path,
        '[service]\nspool_threshold = "8MiB"\nmessage_memory_budget = "1MiB"\n' + MINIMAL,
    )
    assert problem.startswith("service.message_memory_budget")
    assert "at least spool_threshold" in problem


@pytest.mark.parametrize(
    ("line", "key", "says"),
    [
        ('spool_threshold = "lots"', "spool_threshold", "expected a size"),
        ("spool_threshold = 0", "spool_threshold", "greater than 0"),
        ("spool_threshold = -1", "spool_threshold", "greater than 0"),
        ("spool_threshold = 1.5", "spool_threshold", "expected a size"),
        ('message_memory_budget = "some"', "message_memory_budget", "expected a size"),
        ("message_memory_budget = 0", "message_memory_budget", "greater than 0"),
        ("message_memory_budget = true", "message_memory_budget", "expected a size"),
    ],
)
def test_a_bad_memory_value_is_refused_naming_its_key(
    tmp_path: Path, line: str, key: str, says: str
) -> None:
    (problem,) = problems(tmp_path, f"[service]\n{line}\n" + MINIMAL)
    assert problem.startswith(f"service.{key}: "), problem
    assert says in problem
