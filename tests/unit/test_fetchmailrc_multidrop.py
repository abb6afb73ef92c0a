"""import-fetchmailrc: multidrop mailboxes become [accounts.shared], `limit` max_message_size.

Every converted text is parsed as TOML (the exact keys written) and loaded by load_settings.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from connector.config import AccountConfig, Settings, load_settings
from connector.fetchmailrc import convert

# fetchmail(1)'s multidrop example: one catch-all for a domain, the envelope recipient in
# X-Original-To, everyone delivered under their own name (`is * here`).
WILDCARD_RC = """
set daemon 300
poll mail.example.com localdomains example.com envelope X-Original-To
    user catchall there with password secret is * here
    smtphost exchange.firma.local smtpaddress firma.local
"""

# Name mappings ("remote" = "local") next to a plain name, two local domains, a full address
# on the server side, `set postmaster`, `limit` and the options that stay unsupported.
MAPPING_RC = """
set postmaster "admin"
poll pop.provider.example proto pop3 localdomains firma.example firma.de envelope 1 Delivered-To
    aka mx.firma.example qvirtual "firma-" dns checkalias
    user "office@firma.example" there with password "pw"
    is "jim" = "james", "bob" = "robert", "info@firma.example" = "chef", anna here
    smtphost exchange.firma.local/587 smtpaddress firma.local
    limit 5000000 warnings 3600
"""


def _convert_and_load(rc: str, tmp_path: Path) -> tuple[dict[str, Any], Settings, list[str]]:
    toml, notes = convert(rc)
    path = tmp_path / "config.toml"
    path.write_text(toml, encoding="utf-8")
    return tomllib.loads(toml), load_settings(path), notes


def _account(settings: Settings, name: str) -> AccountConfig:
    return next(a for a in settings.accounts if a.name == name)


def test_wildcard_catchall_rewrites_to_the_exchange_domain(tmp_path: Path) -> None:
    raw, settings, notes = _convert_and_load(WILDCARD_RC, tmp_path)

    table = raw["accounts"][0]
    assert table["deliver_to"] == ["postmaster@firma.local"]
    assert table["shared"] == {
        "domains": ["example.com"],
        "envelope_headers": ["X-Original-To"],
        "rewrite_domain": "firma.local",
    }
    account = _account(settings, "catchall")
    assert account.enabled
    assert account.shared is not None
    assert account.shared.rules == []
    assert "max_message_size" not in table  # no `limit`: our default applies
    assert any("postmaster@firma.local" in n and "RFC 5321" in n for n in notes)


def test_mappings_become_rules_per_local_domain_with_a_postmaster_fallback(
    tmp_path: Path,
) -> None:
    raw, settings, notes = _convert_and_load(MAPPING_RC, tmp_path)

    table = raw["accounts"][0]
    assert table["deliver_to"] == ["admin@firma.local"]  # `set postmaster "admin"`
    shared = table["shared"]
    assert shared["domains"] == ["firma.example", "firma.de"]
    assert shared["envelope_headers"] == ["Delivered-To"]
    assert "rewrite_domain" not in shared  # no `*`: only the listed names are ours
    assert [(r["match"], r["deliver_to"]) for r in shared["rules"]] == [
        ("jim@firma.example", ["james@firma.local"]),
        ("jim@firma.de", ["james@firma.local"]),
        ("bob@firma.example", ["robert@firma.local"]),
        ("bob@firma.de", ["robert@firma.local"]),
        ("info@firma.example", ["chef@firma.local"]),  # a remote name with @ as given
        ("anna@firma.example", ["anna@firma.local"]),
        ("anna@firma.de", ["anna@firma.local"]),
        # fetchmail gives a message naming none of the listed names to the postmaster
        ("*@firma.example", ["admin@firma.local"]),
        ("*@firma.de", ["admin@firma.local"]),
    ]
    assert table["max_message_size"] == 5000000
    assert table["oversize"] == "leave"

    account = _account(settings, "office@firma.example")
    assert account.enabled
    assert (account.max_message_size, account.oversize) == (5000000, "leave")
    assert account.shared is not None
    assert len(account.shared.rules) == 9
    joined = "\n".join(notes)
    assert "'envelope 1 HEADER': the skip count is not supported" in joined
    assert "line 4: 'qvirtual PREFIX' is not supported" in joined
    assert "a rule can match such addresses" in joined
    assert "line 4: 'aka' is not supported" in joined
    assert "line 4: 'dns' is not supported" in joined
    assert "line 4: 'checkalias' is not supported" in joined
    assert "line 8: 'warnings'" in joined
    assert "once per oversized message" in joined
    assert "firma-" not in joined  # a quoted value is never echoed
    assert "'pw'" not in joined
    assert '"pw"' not in joined


def test_no_envelope_reads_the_recipient_headers_only(tmp_path: Path) -> None:
    rc = """poll pop.provider.example proto pop3 localdomains firma.example no envelope
      user catchall pass x is alice bob here smtpaddress firma.local"""
    raw, settings, _ = _convert_and_load(rc, tmp_path)

    assert raw["accounts"][0]["shared"]["envelope_headers"] == []
    account = _account(settings, "catchall")
    assert account.shared is not None
    assert account.shared.envelope_headers == []
    assert account.shared.header_recipients


def test_multidrop_without_localdomains_is_a_disabled_placeholder(tmp_path: Path) -> None:
    rc = """poll pop.provider.example proto pop3
      user catchall pass x is * here smtpaddress firma.local"""
    raw, settings, notes = _convert_and_load(rc, tmp_path)

    assert raw["accounts"][0]["shared"]["domains"] == ["change-me.invalid"]
    assert raw["accounts"][0]["enabled"] is False
    assert not _account(settings, "catchall").enabled
    assert any("without 'localdomains'" in n and "put your mail domains there" in n for n in notes)
    # fetchmail's default envelope (Received: "for") is not ours: the note says what we read
    assert any("no 'envelope'" in n for n in notes)


def test_one_local_name_stays_single_drop_as_in_fetchmail(tmp_path: Path) -> None:
    # fetchmail(1): one local name is single-drop, localdomains and envelope unused.
    rc = """poll pop.provider.example proto pop3 localdomains firma.example envelope X-Original-To
      user info pass x is "info" = "chef" here smtpaddress firma.local"""
    raw, settings, notes = _convert_and_load(rc, tmp_path)

    assert "shared" not in raw["accounts"][0]
    assert _account(settings, "info").deliver_to == ["chef@firma.local"]
    assert any("'localdomains' only matters for a multidrop mailbox" in n for n in notes)
    assert any("'envelope' only matters for a multidrop mailbox" in n for n in notes)


def test_limit_flush_dead_letters_and_limit_zero_means_none(tmp_path: Path) -> None:
    rc = """poll a.example proto pop3 user u1 pass x is u1@firma.local here limit 100000 limitflush
    poll b.example proto pop3 user u2 pass x is u2@firma.local here limit 0"""
    raw, settings, notes = _convert_and_load(rc, tmp_path)

    first, second = raw["accounts"]
    assert (first["max_message_size"], first["oversize"]) == (100000, "dead-letter")
    assert "max_message_size" not in second
    assert "oversize" not in second
    assert _account(settings, "u1").oversize == "dead-letter"
    assert _account(settings, "u2").oversize == "dead-letter"  # the default, no limit given
    assert _account(settings, "u2").max_message_size == 256 * 1024 * 1024
    assert any("'limitflush' deleted oversized mail unread" in n for n in notes)
