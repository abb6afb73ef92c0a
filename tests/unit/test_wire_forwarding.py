"""Forwarding POP3's dot-stuffed body to SMTP's DATA as it is (issue 5, cut 1).

POP3 (RFC 1939 §3) and SMTP (RFC 5321 §4.5.2) stuff dots alike, so a CRLF-clean RETR body is
already DATA's content.  The pieces: the parser's ``Message.wire``, ``prepare_wire`` and
``stuffed_pieces`` in smtp/content.py; ``SmtpDeliverer.deliver(..., wire=...)`` against aiosmtpd
is tests/component/test_wire_forwarding.py.  Every check compares with what the old path
(un-stuff, check, re-stuff) produced.
"""

from __future__ import annotations

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.pop3.protocol import (
    NEED_DATA,
    WIRE_COPY_LIMIT,
    Command,
    Connection,
    Message,
    Verb,
)
from connector.smtp import (
    content_pieces,
    prepare_content,
    prepare_wire,
    stuffed_pieces,
)

TRACE = b"Received: from pop.test by connector.test with POP3 (pop3-connector); now\r\n"
BIG_LINE = b"QUJD" * 19 + b"\r\n"


def stuff(raw: bytes) -> bytes:
    """RFC 1939 §3 / RFC 5321 §4.5.2 dot-stuffing, as a correct server sends it."""
    return PERIOD_REGEX.sub(b"..", raw)


def aiosmtplib_content(message: bytes) -> bytes:
    """What aiosmtplib 5.1 writes after DATA's 354, and what the old path wrote."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


def old_content(trace: bytes, raw: bytes) -> tuple[bytes, int]:
    parts, size = prepare_content((trace, raw))
    return b"".join(content_pieces(parts)), size


def retr(body: bytes, *, announced: int | None = None, chunk: int = 1 << 30) -> Message:
    """Feed ``+OK`` + ``body`` + the terminator to a logged-in Connection; the one Message."""
    conn = Connection()
    conn.send(Command(Verb.USER, ("alice",)))
    conn.send(Command(Verb.PASS, ("pw",)))  # exclusive: RETR waits for its reply
    conn.receive_data(b"+OK ready\r\n+OK\r\n+OK\r\n")
    while conn.next_event() is not NEED_DATA:
        pass
    conn.send(Command(Verb.RETR, (1,)))
    status = b"+OK %d octets\r\n" % announced if announced is not None else b"+OK\r\n"
    data = status + body + b".\r\n"
    events = []
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i : i + chunk])
        while (ev := conn.next_event()) is not NEED_DATA:
            events.append(ev)
    messages = [ev for ev in events if isinstance(ev, Message)]
    assert len(messages) == 1
    return messages[0]


# ------------------------------------------------------------------------------------------
# The parser: Message.wire
# ------------------------------------------------------------------------------------------

CLEAN = [
    b"Subject: x\r\n\r\nbody\r\n",
    b"Subject: dots\r\n\r\n.\r\n..\r\n.middle\r\n...\r\nend\r\n.\r\n",  # middle and end
    b"Subject: dot last\r\n\r\n.last",  # POP3 adds the final CRLF; raw below has it
    "Subject: 8-bit Grüße\r\n\r\näöü\r\n".encode(),
    b"Subject: big\r\n\r\n" + (BIG_LINE * 5000 + b".dot\r\n") * 4,
]


@pytest.mark.parametrize("chunk", [1, 7, 65536, 1 << 30])
@pytest.mark.parametrize("message", CLEAN)
def test_a_crlf_clean_body_is_forwarded_as_received(message: bytes, chunk: int) -> None:
    raw = message if message.endswith(b"\r\n") else message + b"\r\n"
    if chunk == 1 and len(raw) > 10_000:
        chunk = 997  # byte by byte over 1.5 MB would take seconds
    body = stuff(raw)
    got = retr(body, announced=len(raw), chunk=chunk)
    assert got.raw == raw
    if body != raw and len(body) > WIRE_COPY_LIMIT:
        # Stuffed and large: not kept beside its unstuffed copy (memory); the old path.
        assert got.wire is None
        return
    assert got.wire == body
    # It is exactly what the old path wrote after DATA (without the final dot line).
    assert got.wire + b".\r\n" == old_content(b"", raw)[0]


def test_the_wire_limit_is_on_stuffed_bodies_only() -> None:
    small = b"Subject: x\r\n\r\n" + (BIG_LINE + b".dot\r\n") * 10
    assert len(stuff(small)) <= WIRE_COPY_LIMIT
    assert retr(stuff(small), announced=len(small)).wire == stuff(small)
    unstuffed = b"Subject: x\r\n\r\n" + BIG_LINE * (2 * WIRE_COPY_LIMIT // len(BIG_LINE))
    got = retr(unstuffed, announced=len(unstuffed), chunk=65536)
    assert got.wire is got.raw  # no second copy: forwarded whatever its size


def test_an_unstuffed_body_is_not_copied_for_the_wire() -> None:
    raw = b"Subject: x\r\n\r\n" + BIG_LINE * 1000
    got = retr(raw)
    assert got.wire is got.raw  # one bytes object serves both


@pytest.mark.parametrize(
    ("body", "announced", "raw"),
    [
        # Bare LF: tolerated and rewritten to CRLF, so the wire form is not the message.
        (b"Subject: LF\n\n.. dot\nx\n", None, b"Subject: LF\r\n\r\n. dot\r\nx\r\n"),
        # A lone CR stays in raw; SMTP must not see it (RFC 5321 §2.3.8): the old path.
        (b"Subject: CR\r\n\r\nx\ry\r\n", None, b"Subject: CR\r\n\r\nx\ry\r\n"),
        (b"", 0, b""),  # empty: the old path sends its CRLF
        # First line starting with a dot, correctly stuffed.
        (b"..first\r\nx\r\n", 9, b".first\r\nx\r\n"),
        # Dovecot 2.3 does not stuff line 1: ".first" as is, "..first" as is, "." as is.
        (b".first\r\nx\r\n", 11, b".first\r\nx\r\n"),
        (b"..first\r\nx\r\n", 12, b"..first\r\nx\r\n"),
        (b".\r\n", 3, b".\r\n"),
    ],
)
def test_no_wire_form_where_it_would_be_wrong(
    body: bytes, announced: int | None, raw: bytes
) -> None:
    got = retr(body, announced=announced)
    assert got.raw == raw
    assert got.wire is None


def test_wire_is_left_out_of_equality_and_repr() -> None:
    assert Message(b"x\r\n", b"x\r\n") == Message(b"x\r\n")
    assert "wire" not in repr(Message(b"x\r\n", b"x\r\n"))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from([b".", b"..", b"a", b"\xff", b" ", b"\r", b"\n"])).map(b"".join)
    ),
    st.booleans(),
)
def test_any_body_gives_the_old_paths_content_or_none(lines: list[bytes], quirk: bool) -> None:
    # A server's body: lines stuffed, each ended by CRLF; ``quirk``: line 1 not stuffed.
    raw = b"".join(line + b"\r\n" for line in lines)
    if quirk and b"\n" in raw.replace(b"\r\n", b""):
        return  # the quirk is Dovecot's, and Dovecot sends CRLF line ends only
    body = stuff(raw)
    if quirk and raw.startswith(b"."):
        body = body[1:]
    got = retr(body, announced=len(raw))
    if got.wire is None:
        clean = raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")
        assert not clean or not raw or raw.startswith(b".")
        return
    assert got.raw == raw
    assert got.wire + b".\r\n" == aiosmtplib_content(raw)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from([b".", b"..", b"a", b" "])).map(b"".join),
            st.booleans(),
        )
    )
)
def test_a_server_that_skips_stuffing_never_gets_its_body_forwarded(
    lines: list[tuple[bytes, bool]],
) -> None:
    # A non-conforming server: each line stuffed, or (False) sent as it is; a "." line always
    # stuffed, or it would end the reply.  Whatever comes, a wire form kept must be exactly
    # what DATA carries for raw, or SMTP would deliver a message other than the one the ledger
    # and the dead-letter store see.
    body = b"".join((stuff(line) if ok or line == b"." else line) + b"\r\n" for line, ok in lines)
    got = retr(body)
    if got.wire is not None:
        assert got.wire + b".\r\n" == aiosmtplib_content(got.raw)


# ------------------------------------------------------------------------------------------
# smtp/content.py: prepare_wire and stuffed_pieces
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trace", [b"", TRACE, b".dotted: trace\r\n\t.folded\r\n"])
@pytest.mark.parametrize("message", CLEAN)
def test_prepare_wire_matches_the_old_path(trace: bytes, message: bytes) -> None:
    raw = message if message.endswith(b"\r\n") else message + b"\r\n"
    prepared = prepare_wire(trace, raw, stuff(raw))
    assert prepared is not None
    parts, size = prepared
    assert (b"".join(stuffed_pieces(parts)), size) == old_content(trace, raw)


@pytest.mark.parametrize(
    ("trace", "wire"),
    [
        (b"Received: bare LF\n", b"x\r\n"),  # a trace that is not CRLF-clean
        (b"Received: no line end", b"x\r\n"),
        (b"Received: lone\rCR\r\n", b"x\r\n"),
        (TRACE, b"x"),  # a wire form without its final CRLF is not one
    ],
)
def test_prepare_wire_declines(trace: bytes, wire: bytes) -> None:
    assert prepare_wire(trace, wire, wire) is None


def test_the_wire_form_is_sliced_not_copied() -> None:
    chunk = b"x" * (1024 * 1024 - 2) + b"\r\n"
    raw = b"Subject: big\r\n\r\n" + (chunk + b".dot\r\n") * 3 + chunk * 2
    wire = stuff(raw)
    prepared = prepare_wire(TRACE, raw, wire)
    assert prepared is not None
    parts, size = prepared
    assert parts[-1] is wire
    assert size == len(TRACE) + len(raw)  # RFC 1870: before dot-stuffing
    pieces = list(stuffed_pieces(parts))
    assert all(p.obj is wire for p in pieces[1:-1] if isinstance(p, memoryview))
    assert max(len(p) for p in pieces) <= 1024 * 1024
    assert pieces[-1] == b".\r\n"
    assert b"".join(pieces) == aiosmtplib_content(TRACE + raw)
