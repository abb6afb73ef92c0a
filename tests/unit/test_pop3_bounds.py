"""What a hostile POP3 server can make us do is bounded by what it told us (issue 13 item 4).

* A LIST or UIDL listing is capped by STAT's count (``listing_cap``), not by the 1 GiB message
  cap, and parsed without copies of its lines.
* A RETR may bring no more than LIST announced for the message, within ``retr_cap``'s
  tolerance for real servers' counting quirks.

The client and the cycle against servers that lie or drip: tests/component/test_pop3_bounds.py.
"""

from __future__ import annotations

import os
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.errors import Pop3ProtocolError
from connector.pop3.protocol import (
    CAPA_CAP,
    LISTING_LINE,
    MAX_MESSAGES,
    Command,
    Connection,
    Listing,
    Message,
    NeedData,
    Verb,
    _parse_listing,
    listing_cap,
    retr_cap,
)

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def transaction() -> Connection:
    conn = Connection(max_message_size=1 << 30)
    conn.send(Command(Verb.USER, ("u",)))
    conn.send(Command(Verb.PASS, ("p",)))
    conn.receive_data(b"+OK hi\r\n+OK\r\n+OK\r\n")
    while not isinstance(conn.next_event(), NeedData):
        pass
    return conn


def pour(conn: Connection, data: bytes, chunk: int) -> object:
    """Feed ``data`` in chunks; return the first event, or raise what the core raises."""
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i : i + chunk])
        ev = conn.next_event()
        if not isinstance(ev, NeedData):
            return ev
        # The buffer never holds much more than the reply's own cap.
        assert conn.buffered <= 2 * listing_cap(MAX_MESSAGES) + chunk
    return NeedData.NEED_DATA


# --------------------------------------------------------------------------------------------
# Listings: capped by STAT's count
# --------------------------------------------------------------------------------------------


@PROFILE
@given(
    count=st.integers(0, 200),
    extra_lines=st.integers(0, 400),
    uid_len=st.integers(1, 70),
    chunk=st.integers(1, 5000),
    verb=st.sampled_from([Verb.UIDL, Verb.LIST]),
)
def test_a_listing_longer_than_stat_allows_is_refused(
    count: int, extra_lines: int, uid_len: int, chunk: int, verb: Verb
) -> None:
    lines = count + extra_lines
    width = uid_len if verb is Verb.UIDL else 1
    body = b"".join(b"%d %0*d\r\n" % (i, width, i) for i in range(1, lines + 1))
    reply = b"+OK\r\n" + body + b".\r\n"
    conn = transaction()
    conn.send(Command(verb), expect=count)
    allowed = lines <= count + count // 100 + 16 and len(body) <= listing_cap(count)
    if allowed:
        ev = pour(conn, reply, chunk)
        assert isinstance(ev, Listing)
        assert len(ev.entries) == lines
    else:
        with pytest.raises(Pop3ProtocolError):
            pour(conn, reply, chunk)


def test_a_listing_of_endless_padding_stops_at_the_cap() -> None:
    conn = transaction()
    conn.send(Command(Verb.UIDL), expect=3)
    conn.receive_data(b"+OK\r\n")

    def flood() -> None:
        for _ in range(1000):
            conn.receive_data(b"1 " + b"x" * 60 + b"\r\n")
            assert isinstance(conn.next_event(), NeedData)

    with pytest.raises(Pop3ProtocolError, match="STAT"):
        flood()
    assert conn.buffered <= listing_cap(3) + 70


def test_stat_cannot_buy_more_than_max_messages() -> None:
    assert listing_cap(10**15) == listing_cap(MAX_MESSAGES)
    assert listing_cap(MAX_MESSAGES) < 200 * 1024 * 1024


def test_a_uidl_listing_costs_memory_for_its_entries_not_copies_of_lines() -> None:
    """Issue 13: a 32 MiB UIDL listing cost 436 MiB.  Now the entries are what stays."""
    count = 50_000
    body = b"".join(b"%d %070d\r\n" % (i, i) for i in range(1, count + 1))
    tracemalloc.start()
    try:
        entries = _parse_listing(body, True, count)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(entries) == count
    assert peak < 4 * len(body)  # 6.6x before
    assert peak / count < 300  # octets per listed message


# --------------------------------------------------------------------------------------------
# RETR: capped by what LIST announced
# --------------------------------------------------------------------------------------------


@PROFILE
@given(
    listed=st.integers(0, 20_000),
    more=st.integers(-2, 30_000),
    chunk=st.integers(1, 8192),
    dots=st.booleans(),
)
def test_a_retr_longer_than_list_announced_is_refused(
    listed: int, more: int, chunk: int, dots: bool
) -> None:
    size = max(0, listed + more)
    line = b".dotted line of text\r\n" if dots else b"a line of text, 24 octet\r\n"
    raw = (line * (size // len(line) + 1))[:size]
    raw = raw[: max(0, size - 2)] + b"\r\n" if size >= 2 else b""
    stuffed = raw.replace(b"\r\n.", b"\r\n..")
    stuffed = b"." + stuffed if stuffed.startswith(b".") else stuffed
    conn = transaction()
    conn.send(Command(Verb.RETR, (1,)), expect=listed)
    reply = b"+OK\r\n" + stuffed + b".\r\n"
    if len(raw) <= retr_cap(listed):
        ev = pour(conn, reply, chunk)
        assert isinstance(ev, Message)
        assert ev.raw == raw
    else:
        with pytest.raises(Pop3ProtocolError, match="LIST announced"):
            pour(conn, reply, chunk)


def test_a_message_of_bare_line_feeds_costs_no_object_per_line() -> None:
    """A server that sends bare LFs (tolerated, rewritten to CRLF): the rewrite used to make a
    list of every line, some 100 octets of objects per line of two."""
    body = b"x\n" * 1_000_000
    conn = transaction()
    conn.send(Command(Verb.RETR, (1,)))
    conn.receive_data(b"+OK\r\n" + body + b".\r\n")
    tracemalloc.start()
    try:
        ev = conn.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(ev, Message)
    assert ev.raw == b"x\r\n" * 1_000_000
    assert peak < 8 * len(body)  # copies of the body (1.5x), not 50x in objects per line


def test_a_capa_reply_has_its_own_cap() -> None:
    conn = transaction()
    conn.send(Command(Verb.CAPA))
    conn.receive_data(b"+OK\r\n")

    def flood() -> None:
        for _ in range(2000):
            conn.receive_data(b"X-CAP " + b"a" * 60 + b"\r\n")
            assert isinstance(conn.next_event(), NeedData)

    with pytest.raises(Pop3ProtocolError):
        flood()
    assert conn.buffered <= CAPA_CAP + 100


@pytest.mark.parametrize("short_by", [0, 1, 2])
def test_the_counting_quirks_of_real_servers_pass(short_by: int) -> None:
    """Courier, mailutils and Dovecot count a message without a final newline two short."""
    raw = b"Subject: x\r\n\r\nbody\r\n"
    conn = transaction()
    conn.send(Command(Verb.RETR, (1,)), expect=len(raw) - short_by)
    conn.receive_data(b"+OK\r\n" + raw + b".\r\n")
    ev = conn.next_event()
    assert isinstance(ev, Message)
    assert ev.raw == raw


# --------------------------------------------------------------------------------------------
# The client against a loopback server that lies or drips
# --------------------------------------------------------------------------------------------


def test_listing_line_allows_the_longest_rfc_1939_line() -> None:
    assert len(b"4294967295 " + b"x" * 70 + b"\r\n") <= LISTING_LINE
