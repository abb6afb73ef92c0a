"""connector.smtp.envelope: the envelope sender read from a message, the address checks, and
when SMTPUTF8 is needed."""

from __future__ import annotations

import time

import pytest

from connector.smtp import (
    Envelope,
    SenderPolicy,
    address_problem,
    envelope_sender,
    needs_smtputf8,
)

FIXED = Envelope("relay@firma.local", ("info@firma.local",), sender_fixed=True)

# ------------------------------------------------------------------------------------------
# envelope_sender
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "sender"),
    [
        (b"Return-Path: <a@example.test>\r\nSubject: x\r\n\r\nbody\r\n", "a@example.test"),
        (b"return-PATH:<a@example.test>\r\n\r\n", "a@example.test"),
        (b"Return-Path: <>\r\nSubject: x\r\n\r\n", ""),
        (b"Return-Path: < >\r\n\r\n", ""),
        (b"Subject: no return path\r\n\r\nReturn-Path: <body@x.test>\r\n", ""),
        # The first one counts (RFC 5321 §4.4: the delivering MTA puts it on top).
        (b"Return-Path: <first@x.test>\r\nReturn-Path: <second@x.test>\r\n\r\n", "first@x.test"),
        (b"Received: by x\r\nReturn-Path: <later@x.test>\r\n\r\n", "later@x.test"),
        # Folded (RFC 5322 §2.2.3), bare LF, a source route, a comment, no brackets.
        (b"Return-Path:\r\n <folded@x.test>\r\n\r\n", "folded@x.test"),
        (b"Return-Path: <lf@x.test>\nSubject: y\n\nbody\n", "lf@x.test"),
        (b"Return-Path: <@relay.test,@b.test:routed@x.test>\r\n\r\n", "routed@x.test"),
        (b"Return-Path: <c@x.test> (from the MTA)\r\n\r\n", "c@x.test"),
        (b"Return-Path: bare@x.test\r\n\r\n", "bare@x.test"),
        # Unparseable or unsendable: the null sender.
        (b"Return-Path: <a@x.test\r\n\r\n", ""),
        (b"Return-Path: <no-at-sign>\r\n\r\n", ""),
        (b"Return-Path: <a b@x.test>\r\n\r\n", ""),
        (b"Return-Path: <\xe9@x.test>\r\n\r\n", ""),  # Latin-1: not UTF-8, no address
        (b"Return-Path: <a@x.test> <b@x.test>\r\n\r\n", ""),
        (b'Return-Path: <"unterminated@x.test>\r\n\r\n', ""),
        (b"Return-Path: <a@x.test> trailing\r\n\r\n", ""),
        (b"Return-Path: <a@x.test> (unclosed comment\r\n\r\n", ""),
        (b"Return-Path: <@relay.test:>\r\n\r\n", ""),
        (b"Return-Path: <@relay.test x@y.test>\r\n\r\n", ""),
        # RFC 5321 §4.1.2 Quoted-string local parts, sent with the least quoting possible,
        # and RFC 6531 UTF-8 (issue 12: both were sent as <> before).
        (b'Return-Path: <"john doe"@partner.example>\r\n\r\n', '"john doe"@partner.example'),
        (b'Return-Path: <"john"@partner.example>\r\n\r\n', "john@partner.example"),
        (b'Return-Path: <"a\\"b"@x.test>\r\n\r\n', '"a\\"b"@x.test'),
        (b'Return-Path: <"a>b"@x.test>\r\n\r\n', '"a>b"@x.test'),
        (b"Return-Path: <\xc3\xa9@x.test>\r\n\r\n", "\xe9@x.test"),
        ("Return-Path: <jörg@müller.example>\r\n\r\n".encode(), "jörg@müller.example"),
        (b"Return-Path: <a@[192.0.2.1]> (literal)\r\n\r\n", "a@[192.0.2.1]"),
        (b"Return-Path: <@[192.0.2.9],@b.test:r@x.test>\r\n\r\n", "r@x.test"),
        # A header-like line after the empty line is body, not header.
        (b"\r\nReturn-Path: <body@x.test>\r\n", ""),
        (b"Return-Path-Extra: <no@x.test>\r\n\r\n", ""),
        (b"X-Return-Path: <no@x.test>\r\n\r\n", ""),
        (b"", ""),
        # No empty line at all: the whole thing is the header block.
        (b"Return-Path: <only@x.test>", "only@x.test"),
    ],
)
def test_envelope_sender_return_path(raw: bytes, sender: str) -> None:
    assert envelope_sender(raw, SenderPolicy.RETURN_PATH) == (sender, False)


def test_envelope_sender_null_and_fixed() -> None:
    raw = b"Return-Path: <a@example.test>\r\n\r\nx\r\n"
    assert envelope_sender(raw, SenderPolicy.NULL) == ("", True)
    assert envelope_sender(raw, SenderPolicy.NULL, "ignored@x.test") == ("", True)
    assert envelope_sender(raw, SenderPolicy.FIXED, "relay@firma.local") == (
        "relay@firma.local",
        True,
    )
    with pytest.raises(ValueError, match="fixed_address"):
        envelope_sender(raw, SenderPolicy.FIXED)


def test_envelope_sender_reads_only_the_header_block() -> None:
    # A 30 MB body after the headers must not be scanned line by line or parsed.
    raw = b"Return-Path: <big@x.test>\r\nSubject: big\r\n\r\n" + b"A" * 30_000_000
    start = time.perf_counter()
    for _ in range(100):
        assert envelope_sender(raw, SenderPolicy.RETURN_PATH) == ("big@x.test", False)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------
# address_problem
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "a@example.test",
        "first.last+tag@sub.example.test",
        "o'brien@x.test",
        "postmaster@localhost",
        "a@[192.0.2.1]",
        "a@[IPv6:2001:db8::1]",
        "x_y-z=1@x-y.test",
        '"quoted local"@x.test',  # RFC 5321 §4.1.2 Quoted-string
        '"a\\"b"@x.test',
        '"needless"@x.test',
        "\xe9@x.test",  # RFC 6531 §3.3
        "a@ex\xe4mple.test",
        "a..b@x.test",  # outside RFC 5321, but real and taken by MTAs
    ],
)
def test_address_ok(address: str) -> None:
    assert address_problem(address, utf8=True) is None
    # Without utf8 only ASCII passes: UTF-8 needs SMTPUTF8 (RFC 6531 §3.3).
    assert (address_problem(address) is None) == address.isascii()


@pytest.mark.parametrize(
    "address",
    [
        "no-at",
        "@x.test",
        "a@",
        "a b@x.test",
        "a@x .test",
        "<a@x.test>",
        "Name <a@x.test>",
        "bad\r\nRCPT TO:<x@y.test>",  # aiosmtplib would silently send x@y.test
        "a@x.test\r\n",
        '"quoted@x.test',
        '"a"b"@x.test',
        '"tab\there"@x.test',
        '"nul\x00"@x.test',
        "\udce9@x.test",  # an 8-bit byte that was not UTF-8 (surrogate escape)
        "a\u00a0b@x.test",  # a no-break space
        "a@x\u200b.test",  # a zero-width space
        "a,b@x.test",
        "a@x..test",
        "a@-x_y.test",
        "x" * 65 + "@x.test",
        "a@" + "d" * 260 + ".test",
    ],
)
def test_address_refused(address: str) -> None:
    assert address_problem(address, utf8=True) is not None


@pytest.mark.parametrize(
    "address",
    ["jürgen@bücher.example", "δοκιμή@παράδειγμα.δοκιμή", "用户@例子.广告", "a@exämple.test"],
)
def test_utf8_address_ok_only_where_utf8_is_allowed(address: str) -> None:
    """RFC 6531 §3.3: UTF-8 in a Mailbox, for an envelope (SMTPUTF8); never by default."""
    assert address_problem(address, utf8=True) is None
    assert address_problem(address) == "not ASCII"


@pytest.mark.parametrize(
    "address",
    [
        "j\u0085@x.test",  # a C1 control (NEL)
        "a\u2028b@x.test",  # LINE SEPARATOR
        "a\u00a0b@x.test",  # NO-BREAK SPACE
        "ü" * 33 + "@x.test",  # 66 octets: over RFC 5321 §4.5.3.1.1's 64
        "ü@x..test",
        "<ü@x.test>",
    ],
)
def test_utf8_address_refused(address: str) -> None:
    assert address_problem(address, utf8=True) is not None


ASCII_ENVELOPE = Envelope("a@x.test", ("b@x.test",), sender_fixed=False)


@pytest.mark.parametrize(
    ("raw", "needed"),
    [
        (b"Subject: K\xc3\xb6ln\r\n\r\nbody\r\n", True),
        (b"Subject: x\r\nX-Raw: \xff\r\n\r\n", True),  # 8-bit, not even UTF-8: still 8-bit
        (b"Subject: x\r\nX: \xc3\xb6", True),  # headers only, no empty line
        (b"Subject: x\r\n\r\nK\xc3\xb6ln\r\n", False),  # 8-bit body only: 8BITMIME
        (b"Subject: x\n\nK\xc3\xb6ln\n", False),  # bare LF
        (b"\r\nSubject: K\xc3\xb6ln\r\n", False),  # no header block at all
        (b"Subject: x\r\n\r\n", False),
    ],
)
def test_needs_smtputf8_looks_at_the_header_block(raw: bytes, needed: bool) -> None:
    assert needs_smtputf8(raw, ASCII_ENVELOPE) is needed


def test_needs_smtputf8_for_any_utf8_envelope_address() -> None:
    raw = b"Subject: x\r\n\r\n"
    assert needs_smtputf8(raw, Envelope("jü@x.test", ("b@x.test",), sender_fixed=False))
    assert needs_smtputf8(raw, Envelope("", ("b@x.test", "zoë@x.test"), sender_fixed=True))
