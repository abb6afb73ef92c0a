"""connector.addresses and connector.headers: the RFC 5321 Mailbox and Reverse-path scanners,
the RFC 5322 address-list scanner, the bounded header reader, the IMAP SEARCH answer."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector import headers
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
from connector.deadletter.imap import _search_uids

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
# The header reader
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"A: b\r\n\r\nbody", (4, 8)),
        (b"A: b\n\nbody", (4, 6)),
        (b"A: b\n\r\nbody", (4, 7)),
        (b"\r\nbody", (0, 2)),
        (b"\nbody", (0, 1)),
        (b"A: b\r\n", None),
        (b"", None),
    ],
)
def test_bounds(raw: bytes, expected: tuple[int, int] | None) -> None:
    assert headers.bounds(raw) == expected


def test_bounds_looks_only_within_the_cap() -> None:
    raw = b"X: " + b"a" * headers.MAX_HEADER_BLOCK + b"\r\n\r\nbody"
    assert headers.bounds(raw) is None
    assert headers.header_block(raw) == raw[: headers.MAX_HEADER_BLOCK]


def test_a_long_value_is_cut_and_marked() -> None:
    raw = b"To: " + b"a@x.test, " * 10_000 + b"\r\nSubject: s\r\n\r\n"
    to, subject = headers.fields(raw)
    assert to.cut
    assert headers.MAX_VALUE - 1 <= len(to.value) <= headers.MAX_VALUE
    assert subject == headers.Field("subject", b"s")


def test_fields_stop_at_the_caps() -> None:
    raw = b"".join(b"X-%d: v\r\n" % i for i in range(headers.MAX_FIELDS + 10)) + b"\r\n"
    assert len(list(headers.fields(raw))) == headers.MAX_FIELDS
    start = time.perf_counter()
    list(headers.fields(b"x\r\n" * 100_000))  # lines that are not fields
    assert time.perf_counter() - start < 1.0


def test_header_digest_is_the_same_for_retr_and_top() -> None:
    raw = b"From: a@x.test\r\nSubject: s\r\n\r\nbody\r\nmore\r\n"
    top = b"From: a@x.test\r\nSubject: s\r\n\r\n"  # TOP n 0 (RFC 1939 §7)
    assert headers.header_digest(raw) == headers.header_digest(top)
    assert headers.header_digest(raw) != headers.header_digest(b"From: b@x.test\r\n\r\n")
    headers_only = b"From: a@x.test\r\nSubject: s\r\n"
    assert headers.header_digest(headers_only) == headers.header_digest(headers_only)


# --------------------------------------------------------------------------------------------
# The IMAP store's SEARCH answer (its pattern backtracked exponentially)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "uids"),
    [
        (b"3 7", [3, 7]),
        (b"SEARCH 3 7", [3, 7]),
        (b"", []),
        (b"3 x", []),
        (b"1" * 40 + b"x", []),
    ],
)
def test_search_uids(line: bytes, uids: list[int]) -> None:
    assert _search_uids(line) == uids


def test_search_answer_of_digits_is_linear() -> None:
    start = time.perf_counter()
    assert _search_uids(b"1" * 100_000 + b"x") == []
    assert time.perf_counter() - start < 0.05


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
