"""connector.addresses: the RFC 5321 Mailbox and Reverse-path scanners, the RFC 5322
address-list scanner, and the plain address forms of the config."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.addresses import (
    address_list,
    address_needs_smtputf8,
    is_address_pattern,
    is_domain,
    is_field_name,
    is_plain_address,
    mailbox,
    mailbox_problem,
    reverse_path,
)

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# --------------------------------------------------------------------------------------------
# Mailboxes (RFC 5321 §4.1.2, RFC 6531 §3.3)
# --------------------------------------------------------------------------------------------

_ATOM = st.text(alphabet=st.sampled_from("abcXYZ019!#$%&'*+-/=?^_`{|}~é中"), min_size=1, max_size=8)
_DOT_STRING = st.lists(_ATOM, min_size=1, max_size=3).map(".".join)
_QTEXT = st.text(alphabet=st.sampled_from('ab (),:;<>@[]."\\é'), min_size=0, max_size=12).map(
    lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,5}[a-z0-9])?", fullmatch=True) | st.just("müller")
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=3).map(".".join) | st.sampled_from(
    ["[192.0.2.1]", "[IPv6:2001:db8::1]"]
)
MAILBOXES = st.tuples(_DOT_STRING | _QTEXT, _DOMAIN).map(lambda p: f"{p[0]}@{p[1]}")


@PROFILE
@given(address=MAILBOXES)
def test_every_mailbox_is_read_and_minimally_quoted(address: str) -> None:
    if len(address.encode()) > 254 or len(address.rpartition("@")[0].encode()) > 64:
        return
    normal = mailbox(address)
    assert normal is not None, address
    assert mailbox_problem(normal) is None
    assert mailbox(normal) == normal  # idempotent
    assert address_needs_smtputf8(normal) == (not address.isascii())
    # Whatever the quoting, the same mailbox comes back from a Return-Path.
    assert reverse_path(f"<{address}>") == normal
    assert reverse_path(f" <@relay.test,@[192.0.2.9]:{address}> (via relay)") == normal


@pytest.mark.parametrize(
    ("address", "normal"),
    [
        ('"john doe"@partner.example', '"john doe"@partner.example'),
        ('"john"@partner.example', "john@partner.example"),
        ('"a.b"@x.test', "a.b@x.test"),
        ('"a..b"@x.test', '"a..b"@x.test'),  # not a Dot-string: stays quoted
        ('"a\\b"@x.test', "ab@x.test"),  # a needless quoted-pair
        ('"a\\"b"@x.test', '"a\\"b"@x.test'),
        ('""@x.test', '""@x.test'),
        ("jörg@müller.example", "jörg@müller.example"),
    ],
)
def test_minimal_quoting(address: str, normal: str) -> None:
    assert mailbox(address) == normal


@PROFILE
@given(text=st.text(max_size=300))
def test_any_text_gives_a_mailbox_or_none_never_an_exception(text: str) -> None:
    normal = mailbox(text)
    assert (normal is None) == (mailbox_problem(text) is not None)
    if normal is not None:
        assert "\r" not in normal
        assert "\n" not in normal
        assert "\x00" not in normal
    path = reverse_path(text)
    assert path is None or path == "" or mailbox_problem(path) is None
    for candidate in address_list(text):
        mailbox_problem(candidate)


# --------------------------------------------------------------------------------------------
# Address lists (RFC 5322 §3.4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("a@x.test", ["a@x.test"]),
        ("A <a@x.test>, b@y.test", ["a@x.test", "b@y.test"]),
        ('"Doe, John" <j@x.test>', ["j@x.test"]),
        ("j@x.test (John (the (nested)) builder), k@x.test", ["j@x.test", "k@x.test"]),
        ("Team: a@x.test, b@x.test;, c@x.test", ["a@x.test", "b@x.test", "c@x.test"]),
        ("undisclosed-recipients:;", []),
        ("<@route.test,@r2.test:a@x.test>", ["a@x.test"]),
        ('"q p"@x.test', ['"q p"@x.test']),
        ("a @ x . test", ["a@x.test"]),
        ("a@[192.0.2.1]", ["a@[192.0.2.1]"]),
        ("(" * 5000 + "a@x.test", []),  # never closed: all comment
        ("(" * 5000 + ")" * 5000 + "a@x.test", ["a@x.test"]),
    ],
)
def test_address_list(value: str, found: list[str]) -> None:
    assert address_list(value) == found


# --------------------------------------------------------------------------------------------
# The plain forms of the config (config.py validates with them, fetchmailrc.py checks with them)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "plain"),
    [
        ("info@firma.local", True),
        ("o'brien+tag@sub.firma-1.example", True),
        ("a..b@firma.local", False),  # no dot-atom (RFC 5322 §3.2.3)
        (".a@firma.local", False),
        ('"quoted"@firma.local', False),
        ("jü@firma.local", False),  # UTF-8 needs SMTPUTF8
        ("info@-firma.local", False),
        ("info@firma.local.", False),
        ("<info@firma.local>", False),
        ("a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 61, True),  # 254
        ("a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 62, False),  # 255
    ],
)
def test_plain_address(value: str, plain: bool) -> None:
    assert is_plain_address(value) is plain


def test_domain_field_name_and_pattern() -> None:
    assert is_domain("firma.example")
    assert is_domain("xn--mller-kva.example")
    assert not is_domain("firma..example")
    assert not is_domain("-firma.example")
    assert not is_domain("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 62)  # 254
    assert is_field_name("X-Original-To")
    assert not is_field_name("Bad Header")
    assert not is_field_name("Bad:Header")
    assert not is_field_name("x" * 77)
    assert is_address_pattern("*@sales.firma.example")
    assert is_address_pattern("info?@[1.2.3.4]")
    assert not is_address_pattern("*sales.firma.example")
    assert not is_address_pattern("a b@c")
