"""What a hostile POP3 server can make us do is bounded by what it told us (issue 13 item 4).

* A LIST or UIDL listing is capped by STAT's count (``listing_cap``), not by the 1 GiB message
  cap, and parsed without copies of its lines.
* A RETR may bring no more than LIST announced for the message, within ``retr_cap``'s
  tolerance for real servers' counting quirks.
* A whole cycle has a deadline (``cycle_timeout``): a server that sends a byte just before each
  read timeout can no longer hold it open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.cycle import Outcome
from connector.errors import Pop3ProtocolError, Pop3TimeoutError
from connector.pop3 import Pop3Client, Pop3Endpoint, Pop3Timeouts
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
from connector.tls import TlsMode
from tests.component.test_cycle_lifecycle import USER, Recorder, mail, make_rig

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


@contextlib.asynccontextmanager
async def lying_server(
    listed: int, sent: bytes, drip: float = 0.0
) -> AsyncIterator[tuple[int, list[str]]]:
    """A POP3 server whose LIST says ``listed`` octets for its one message and whose RETR sends
    ``sent``; with ``drip``, one byte per ``drip`` seconds."""
    commands: list[str] = []
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await serve(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK ready\r\n")
        while line := await reader.readline():
            verb = line.split()[0].decode().upper() if line.split() else ""
            commands.append(verb)
            if verb == "CAPA":
                writer.write(b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\n.\r\n")
            elif verb in ("USER", "PASS", "NOOP", "DELE"):
                writer.write(b"+OK\r\n")
            elif verb == "STAT":
                writer.write(b"+OK 1 %d\r\n" % listed)
            elif verb == "LIST":
                writer.write(b"+OK\r\n1 %d\r\n.\r\n" % listed)
            elif verb == "UIDL":
                writer.write(b"+OK\r\n1 u1\r\n.\r\n")
            elif verb == "RETR":
                reply = b"+OK\r\n" + sent + b".\r\n"
                if not drip:
                    writer.write(reply)
                else:
                    for i in range(len(reply)):
                        writer.write(reply[i : i + 1])
                        await writer.drain()
                        await asyncio.sleep(drip)
            elif verb == "QUIT":
                writer.write(b"+OK bye\r\n")
                await writer.drain()
                break
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], commands
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_the_client_refuses_a_retr_longer_than_list_said() -> None:
    big = b"Subject: x\r\n\r\n" + b"y" * 70 + b"\r\n"
    async with lying_server(20, big * 1000) as (port, _):
        pop = await Pop3Client.connect(Pop3Endpoint("127.0.0.1", port, TlsMode.NONE))
        async with pop:
            await pop.login("u", "p")
            await pop.stat()
            assert await pop.list() == [(1, 20)]
            with pytest.raises(Pop3ProtocolError, match="LIST announced"):
                await pop.retr(1)


async def test_a_cycle_has_an_overall_deadline(tmp_path: Path) -> None:
    """One byte every 20 ms keeps every read within its timeout; the cycle still ends."""
    async for rig in make_rig(tmp_path):
        raw = mail(1)
        async with lying_server(len(raw), raw, drip=0.02) as (port, _):
            cycle = await rig.cycle(
                endpoint=Pop3Endpoint("127.0.0.1", port, TlsMode.NONE),
                timeouts=Pop3Timeouts(connect=5, command=5, idle_read=5),
                cycle_timeout=0.5,
            )
            start = time.monotonic()
            async with asyncio.timeout(10):  # what the test allows, not what the code does
                with pytest.raises(Pop3TimeoutError, match="cycle_timeout"):
                    await cycle.run()
            assert time.monotonic() - start < 5
        assert rig.sink.messages == []


async def test_a_cycle_within_its_deadline_is_not_disturbed(tmp_path: Path) -> None:
    async for rig in make_rig(tmp_path):
        rig.pop.add_message(USER, mail(1))
        rec = Recorder()
        await (await rig.cycle(rec, cycle_timeout=30.0)).run()
        assert rec.outcomes() == [Outcome.DELIVERED]


def test_listing_line_allows_the_longest_rfc_1939_line() -> None:
    assert len(b"4294967295 " + b"x" * 70 + b"\r\n") <= LISTING_LINE


async def test_bytes_nobody_asked_for_end_the_session() -> None:
    """A server that sends a line more after a reply: taken for the next reply, it would shift
    every reply after it by one (a RETR would deliver the wrong bytes, and DELE the message
    it did not deliver).  Found by tests/reliability/test_fuzz.py."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK ready\r\n")
        while line := await reader.readline():
            verb = line.split()[0].upper()
            if verb == b"CAPA":
                writer.write(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n")
            elif verb == b"UIDL":
                writer.write(b"+OK\r\n1 u1\r\n.\r\n+OK unsolicited\r\n")
            else:
                writer.write(b"+OK 1 20\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        pop = await Pop3Client.connect(Pop3Endpoint("127.0.0.1", port, TlsMode.NONE))
        async with pop:
            await pop.login("u", "p")
            await pop.stat()
            with pytest.raises(Pop3ProtocolError, match="no command asked for"):
                await pop.uidl()
    finally:
        server.close()
        await server.wait_closed()
