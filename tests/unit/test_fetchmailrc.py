"""import-fetchmailrc: rc files as people write them, converted and loaded by load_settings."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from connector.config import AccountConfig, Settings, config_text_problems, load_settings
from connector.errors import ConfigError
from connector.fetchmailrc import convert, main

# A home user's file after years of edits: set lines, a defaults block, comments everywhere,
# quoted passwords with escapes, both quote styles, noise words and punctuation.
HOME_RC = r"""
# fetchmail for the family, run as a daemon
set daemon 600            # every 10 minutes
set logfile "/home/max/.fetchmail.log"
set postmaster "max"
set no bouncemail

defaults
    proto pop3
    timeout 90
    fetchall

poll pop.gmx.net with proto POP3 and options no dns
    user "max.muster@gmx.de" there with password "s3cr\"et #1" is "max@familie.local" here
    options ssl, fetchall

poll pop.web.de:
    user 'anna.muster@web.de' there with password 'a;b,c:d' is anna@familie.local here;
    options ssl sslcertck smtphost mail.familie.local
"""

# An office that moved from a small ISP setup: several users on one server, STLS, SMTP AUTH.
OFFICE_RC = """
set daemon 300
set syslog

poll mail.provider.example proto pop3 port 110 sslproto tls1 auth password
    user "info@firma.example" there with password "Info-2019!" is info@firma.local here
    user "sales@firma.example" there with password "S4les" is sales@firma.local here
        smtphost exchange.firma.local/587 esmtpname connector@firma.local
        esmtppassword "smtp-pw"
    user "jobs@firma.example" there is jobs@firma.local here keep
"""

# Typical of old how-tos: unquoted values, local user names without a domain, smtpaddress,
# a skipped server, an IMAP server, APOP, `interval`, and a multidrop mailbox.
LEGACY_RC = """
set daemon 120
poll pop3.isp.example protocol apop username joe password joepw is joe here
    smtpaddress example.local interval 5
skip old.isp.example proto pop3 user joe2 pass x is joe here
poll imap.isp.example proto imap user joe3 pass y is joe here
poll multi.isp.example proto pop3 localdomains example.local envelope 1 "X-Original-To"
    user catchall pass z is * here
"""


def _load(toml: str, tmp_path: Path) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(toml, encoding="utf-8")
    return load_settings(path)


def _account(settings: Settings, name: str) -> AccountConfig:
    return next(a for a in settings.accounts if a.name == name)


def test_home_rc_loads_with_passwords_tls_and_interval(tmp_path: Path) -> None:
    toml, notes = convert(HOME_RC, source="home")
    settings = _load(toml, tmp_path)

    assert settings.service.poll_interval == 600
    gmx = _account(settings, "max.muster@gmx.de")
    assert (gmx.host, gmx.tls, gmx.effective_port) == ("pop.gmx.net", "implicit", 995)
    assert gmx.secret() == 's3cr"et #1'  # the escape and the # inside quotes
    assert gmx.deliver_to == ["max@familie.local"]
    web = _account(settings, "anna.muster@web.de")
    assert web.secret() == "a;b,c:d"  # separators inside quotes are part of the string
    assert web.tls == "implicit"
    assert settings.smtp.host == "mail.familie.local"
    assert any("line 5: 'set postmaster'" in n for n in notes)  # line 1 is empty
    assert any("'set no bouncemail'" in n for n in notes)
    assert any("'timeout'" in n for n in notes)
    # The account without smtphost is told it now goes to the one SMTP server too.
    assert any("poll pop.gmx.net: no smtphost" in n for n in notes)


def test_office_rc_several_users_starttls_and_smtp_auth(tmp_path: Path) -> None:
    (tmp_path / "jobs@firma.example.password").write_text("jobs-pw\n", encoding="utf-8")
    toml, notes = convert(OFFICE_RC, password_dir=tmp_path)
    settings = _load(toml, tmp_path)

    assert [a.name for a in settings.accounts] == [
        "info@firma.example",
        "sales@firma.example",
        "jobs@firma.example",
    ]
    for account in settings.accounts:
        assert (account.host, account.tls, account.effective_port) == (
            "mail.provider.example",
            "starttls",
            110,
        )
        assert account.auth == "user"
    assert _account(settings, "info@firma.example").secret() == "Info-2019!"
    smtp = settings.smtp
    assert (smtp.host, smtp.port, smtp.tls, smtp.username) == (
        "exchange.firma.local",
        587,
        "starttls",
        "connector@firma.local",
    )
    assert smtp.secret() == "smtp-pw"
    jobs = _account(settings, "jobs@firma.example")
    assert jobs.password_file == tmp_path / "jobs@firma.example.password"
    assert jobs.secret() == "jobs-pw"
    assert not jobs.enabled  # keep: never start deleting a kept mailbox unasked
    assert jobs.leave_on_server  # and once enabled, it keeps mail upstream as fetchmail did
    assert not _account(settings, "info@firma.example").leave_on_server
    assert any("'keep' is written as leave_on_server = true" in n for n in notes)
    assert any("jobs@firma.example.password" in n for n in notes)
    assert any("'set syslog'" in n for n in notes)


def test_legacy_rc_domains_apop_interval_skip_imap_multidrop(tmp_path: Path) -> None:
    toml, notes = convert(LEGACY_RC)
    settings = _load(toml, tmp_path)

    joe = _account(settings, "joe")
    assert joe.auth == "apop"
    assert joe.deliver_to == ["joe@example.local"]  # smtpaddress supplies the domain
    assert joe.poll_interval == 600  # interval 5 x daemon 120
    assert settings.service.poll_interval == 120
    assert not _account(settings, "joe2").enabled  # skip
    assert "joe3" not in {a.name for a in settings.accounts}  # IMAP
    assert any("protocol IMAP is not supported" in n for n in notes)
    catchall = _account(settings, "catchall")
    assert catchall.enabled  # `is *` with localdomains: a shared mailbox
    assert catchall.shared is not None
    assert catchall.shared.domains == ["example.local"]
    assert catchall.shared.envelope_headers == ["X-Original-To"]
    assert catchall.shared.rewrite_domain is None  # smtpaddress is the local domain already
    assert catchall.deliver_to == ["postmaster@example.local"]
    assert any("'envelope 1 HEADER'" in n and "ignore_addresses" in n for n in notes)
    assert settings.smtp.host == "localhost"
    assert settings.smtp.tls == "none"
    assert any("names no smtphost" in n for n in notes)


@pytest.mark.parametrize(
    ("options", "tls", "port"),
    [
        ("ssl", "implicit", 995),
        ("ssl sslproto tls1.2", "implicit", 995),
        ("sslproto tls1", "starttls", 110),
        ("sslproto TLS1+", "starttls", 110),
        ("sslproto ''", "none", 110),
        ("", "starttls", 110),
        ("ssl port 1995", "implicit", 1995),
        ("service pop3s ssl", "implicit", 995),
    ],
)
def test_tls_mapping(options: str, tls: str, port: int, tmp_path: Path) -> None:
    rc = f'poll pop.example.net proto pop3 user u password "p" is u@firma.local here {options}'
    toml, _ = convert(rc)
    account = _load(toml, tmp_path).accounts[0]
    assert (account.tls, account.effective_port) == (tls, port)


def test_default_tls_note_and_no_sslcertck(tmp_path: Path) -> None:
    rc = "poll pop.example.net user u password p is u@firma.local here no sslcertck"
    toml, notes = convert(rc)
    account = _load(toml, tmp_path).accounts[0]
    assert account.verify_certificate is False
    assert any("STLS only when offered" in n for n in notes)
    assert any("verify_certificate = false" in n for n in notes)


def test_missing_password_becomes_a_password_file(tmp_path: Path) -> None:
    rc = "poll pop.example.net proto pop3 user info is info@firma.local here ssl"
    toml, notes = convert(rc, password_dir=tmp_path)
    assert 'password_file = "' + str(tmp_path / "info.password") + '"' in toml
    with pytest.raises(ConfigError, match=r"info\.password"):
        _load(toml, tmp_path)  # the placeholder must be filled in, and says so
    (tmp_path / "info.password").write_text("pw\n", encoding="utf-8")
    assert _load(toml, tmp_path).accounts[0].secret() == "pw"
    assert any("no password in the rc file" in n for n in notes)


def test_local_names_first_then_remote_there(tmp_path: Path) -> None:
    # fetchmail's other order: `user LOCAL here is REMOTE there`.
    rc = "poll pop.example.net user boss@firma.local here is chef@provider.example there pass q"
    toml, _ = convert(rc)
    account = _load(toml, tmp_path).accounts[0]
    assert (account.username, account.deliver_to) == ("chef@provider.example", ["boss@firma.local"])


def test_same_user_on_two_servers_gets_two_names(tmp_path: Path) -> None:
    rc = """
    poll a.example user info pass 1 is info@firma.local here
    poll b.example user info pass 2 is info@firma.local here
    """
    toml, _ = convert(rc)
    settings = _load(toml, tmp_path)
    assert [(a.name, a.host) for a in settings.accounts] == [
        ("info", "a.example"),
        ("info-2", "b.example"),
    ]


def test_placeholders_when_user_or_recipient_missing(tmp_path: Path) -> None:
    rc = "poll pop.example.net proto pop3 password secretpw\npoll pop2.example.net user u pass v"
    toml, notes = convert(rc)
    settings = _load(toml, tmp_path)
    assert all(not a.enabled for a in settings.accounts)
    assert settings.accounts[0].username == "change-me"
    assert settings.accounts[1].deliver_to == ["change-me@localhost"]
    assert any("no 'user'" in n for n in notes)
    assert any("Set deliver_to" in n for n in notes)


def test_untranslatable_options_are_listed_with_their_lines() -> None:
    rc = """poll pop.example.net proto pop3
      user u pass v is u@firma.local here
      mda "/usr/bin/procmail -d %T" limit 100000 plugin "ssh gw nc %h %p" fetchlimit 50"""
    _, notes = convert(rc)
    joined = "\n".join(notes)
    for keyword in ("'mda'", "'plugin'", "'fetchlimit'"):
        assert f"line 3: {keyword}" in joined


def test_notes_never_carry_a_password() -> None:
    # A misspelt keyword before a password must not make the password appear in a note.
    rc = """poll pop.example.net user u passwrd hunter2 is u@firma.local here
            poll pop2.example.net user v "quoted-secret" pass "pw-in-quotes" is v@firma.local here
            poll pop3.example.net user w password 'tail-secret"""
    toml, notes = convert(rc)
    for secret in ("hunter2", "quoted-secret", "pw-in-quotes", "tail-secret"):
        assert not any(secret in n for n in notes)
    assert any("line 1: extra words after the user name" in n for n in notes)
    assert any("line 3: unterminated quoted string" in n for n in notes)
    assert 'password = "pw-in-quotes"' in toml  # the earlier blocks still convert


def test_notes_mask_a_password_also_written_as_a_host_or_name() -> None:
    """The notes quote hosts and names from the rc file; a password that is also one of them
    (written in the wrong place) is masked there."""
    rc = """poll pop.example.net user Pw-Sec-9 password Pw-Sec-9 is u@firma.local here
              smtphost Pw-Sec-9 keep"""
    _, notes = convert(rc)
    assert any("fetchmail spoke plain SMTP to ********" in n for n in notes)
    assert not any("Pw-Sec-9" in n for n in notes)


def test_main_warns_that_the_output_holds_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = tmp_path / ".fetchmailrc"
    rc.write_text(HOME_RC, encoding="utf-8")
    assert main(rc) == 0
    out, err = capsys.readouterr()
    count = sum(line.startswith("password = ") for line in out.splitlines())
    assert count
    assert f"note: standard output holds {count} password(s) from {rc} in clear text" in err


@pytest.mark.parametrize("rc", [HOME_RC, OFFICE_RC, LEGACY_RC])
def test_output_is_toml_and_passwords_only_in_password_keys(rc: str) -> None:
    toml, notes = convert(rc)
    data = tomllib.loads(toml)
    assert data["accounts"]
    assert all(not n.startswith(("s3cr", "Info-2019")) for n in notes)


def test_nothing_convertible() -> None:
    _, notes = convert("# only IMAP here\npoll imap.example proto imap user u pass p")
    assert notes[-1] == "<fetchmailrc>: no POP3 account could be converted"


def test_main_prints_toml_and_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = tmp_path / ".fetchmailrc"
    rc.write_text(OFFICE_RC, encoding="utf-8")
    assert main(rc) == 0
    out, err = capsys.readouterr()
    assert tomllib.loads(out)["smtp"]["host"] == "exchange.firma.local"
    assert f"# pop3-connector configuration converted from {rc}" in out
    assert "note: " in err
    assert "Info-2019!" not in err


def test_main_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = tmp_path / ".fetchmailrc"
    rc.write_text("poll imap.example proto imap user u pass p\n", encoding="utf-8")
    assert main(rc) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "no POP3 account could be converted" in err
    assert main(tmp_path / "missing") == 1
    assert "cannot read" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# What it writes is checked by the config's own models and rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rc", [HOME_RC, OFFICE_RC, LEGACY_RC], ids=["home", "office", "legacy"])
def test_converted_configs_pass_the_config_models_without_their_secrets(rc: str) -> None:
    # The office file has an account without a password: its password_file does not exist
    # yet, and the check does not read it.
    toml, _ = convert(rc, password_dir=Path("/nonexistent/pop3-connector"))
    assert config_text_problems(toml) == []


def test_main_reports_a_config_that_would_not_load_and_prints_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A POP3 user name with a space: fetchmail quotes it, RFC 1939 §3 cannot send it.
    rc = tmp_path / ".fetchmailrc"
    rc.write_text(
        'poll pop.example.net user "john doe" password "pw-s3cret" is j@firma.local here\n',
        encoding="utf-8",
    )
    assert main(rc) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert 'error: accounts[0] (name "john-doe").username: must be non-empty, without spaces' in err
    assert "would not load, so it is not printed" in err
    assert "pw-s3cret" not in err


def test_the_check_words_problems_as_load_settings_does(tmp_path: Path) -> None:
    toml, _ = convert('poll "pop example" user "john doe" pass "" is j@firma.local here')
    with pytest.raises(ConfigError) as loaded:
        _load(toml, tmp_path)
    assert config_text_problems(toml) == loaded.value.problems
    assert [p.split(": ")[0] for p in loaded.value.problems] == [
        'accounts[0] (name "john-doe").host',
        'accounts[0] (name "john-doe").username',
    ]
    assert config_text_problems("[smtp\n")[0].startswith("TOML syntax error: ")


def test_a_local_name_the_config_would_refuse_is_dropped_with_a_note(tmp_path: Path) -> None:
    # "a..b" is no dot-atom (RFC 5322 §3.2.3): deliver_to would refuse it.
    toml, notes = convert("poll pop.example.net user j pass x is a..b@firma.local here")
    account = _load(toml, tmp_path).accounts[0]
    assert (account.deliver_to, account.enabled) == (["change-me@localhost"], False)
    assert any("a local name is not a mail address; dropped" in n for n in notes)


@pytest.mark.parametrize(
    ("smtphost", "tls"),
    [
        ("localhost", "none"),
        ("localhost.", "none"),
        ("mail.localhost", "none"),
        ("127.0.0.2", "none"),
        ("exchange.firma.local", "starttls"),
    ],
)
def test_smtp_tls_is_off_only_for_a_loopback_smtphost(
    smtphost: str, tls: str, tmp_path: Path
) -> None:
    # The same loopback test as `check`'s clear-text warning (connector.tls.is_loopback).
    rc = f"poll pop.example.net user j pass x is j@firma.local here smtphost {smtphost}"
    toml, _ = convert(rc)
    assert _load(toml, tmp_path).smtp.tls == tls
