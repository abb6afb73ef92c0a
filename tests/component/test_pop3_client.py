"""The asyncio POP3 shell against tiny scripted servers on loopback (asyncio.start_server, port 0).

Fakes are used only for faults a real server cannot be made to produce on demand: a greeting
that never comes, a stall or a cut in the middle of RETR, ``[IN-USE]`` at once, no STLS.  The
happy paths run against Dovecot in tests/integration/test_pop3_dovecot.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from connector.budget import MemoryBudget
from connector.errors import (
    Pop3AuthError,
    Pop3ConnectionError,
    Pop3ProtocolError,
    Pop3ResponseError,
    Pop3TimeoutError,
    Pop3TlsError,
    StateError,
)
from connector.pop3 import AuthMethod, Pop3Client, Pop3Endpoint, Pop3Timeouts
from connector.pop3.client import Spooling
from connector.pop3.protocol import apop_digest
from connector.spool import Spool, Spooled, SpoolWriter
from connector.tls import TlsMode
from tests.peek import noop, retr_many, rset

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

FAST = Pop3Timeouts(connect=2.0, command=2.0, idle_read=2.0)
CAPS = [b"TOP", b"UIDL", b"USER", b"RESP-CODES", b"SASL PLAIN"]
MSG = b"Subject: hello\r\n\r\n..dot line\r\nbody\r\n"


@contextlib.asynccontextmanager
async def serve(handler: Handler, tls: TlsMode = TlsMode.NONE) -> AsyncIterator[Pop3Endpoint]:
    """Run ``handler`` for each connection; re-raise its assertion failures in the test."""
    failures: list[BaseException] = []
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client hung up or the test is over
        except Exception as exc:  # noqa: BLE001 (handed to the test below)
            failures.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Pop3Endpoint("127.0.0.1", port, tls)
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
    if failures:
        raise failures[0]


async def expect(reader: asyncio.StreamReader, line: bytes) -> None:
    got = await reader.readline()
    assert got == line + b"\r\n", got


async def hello(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    caps: list[bytes] = CAPS,
    greeting: bytes = b"+OK fake ready",
) -> None:
    """Greeting, then the CAPA that connect() always sends."""
    writer.write(greeting + b"\r\n")
    await expect(reader, b"CAPA")
    writer.write(b"+OK\r\n" + b"".join(c + b"\r\n" for c in caps) + b".\r\n")


async def login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await expect(reader, b"USER alice")
    writer.write(b"+OK\r\n")
    await expect(reader, b"PASS secret")
    writer.write(b"+OK logged in\r\n")


async def until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept, then say nothing until the client gives up."""
    await until_eof(reader)


# ---------------------------------------------------------------------------------------------
# login
# ---------------------------------------------------------------------------------------------


async def test_in_use_at_pass_is_an_auth_error_with_its_code() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w)
        await expect(r, b"USER alice")
        w.write(b"+OK\r\n")
        await expect(r, b"PASS secret")
        w.write(b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n")
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        with pytest.raises(Pop3AuthError) as info:
            await pop.login("alice", "secret", AuthMethod.USER)
    assert info.value.resp_code == "IN-USE"
    assert info.value.command == "PASS"
    assert "secret" not in str(info.value)


async def test_user_and_pass_are_pipelined_when_offered() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w, [*CAPS, b"PIPELINING"])
        # Both lines must arrive before we answer either: else the client did not pipeline.
        assert await r.readline() == b"USER alice\r\n"
        assert await r.readline() == b"PASS secret\r\n"
        w.write(b"+OK\r\n+OK logged in\r\n")
        await expect(r, b"STAT")
        w.write(b"+OK 0 0\r\n")
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        assert pop.pipelining
        await pop.login("alice", "secret", AuthMethod.USER)
        assert await pop.stat() == (0, 0)


def _listings_script(uidl_reply: bytes) -> Handler:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w, [*CAPS, b"PIPELINING"])
        await login(r, w)
        await expect(r, b"STAT")
        w.write(b"+OK 2 30\r\n")
        # Both lines before we answer LIST: else the client did not pipeline them.
        assert await r.readline() == b"LIST\r\n"
        assert await r.readline() == b"UIDL\r\n"
        w.write(b"+OK\r\n1 10\r\n2 20\r\n.\r\n" + uidl_reply)
        await expect(r, b"QUIT")
        w.write(b"+OK bye\r\n")
        await until_eof(r)

    return script


async def test_list_and_uidl_go_out_together_when_pipelining_is_offered() -> None:
    script = _listings_script(b"+OK\r\n1 aaa\r\n2 bbb\r\n.\r\n")
    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        assert await pop.stat() == (2, 30)
        assert await pop.list() == [(1, 10), (2, 20)]
        assert await pop.uidl() == [(1, "aaa"), (2, "bbb")]
        await pop.quit()


@pytest.mark.parametrize(
    ("uidl_reply", "error"),
    [
        (b"-ERR [SYS/TEMP] try later\r\n", Pop3ResponseError),
        # Forty entries for STAT's two: the UIDL sent ahead is bounded by the count as well.
        (
            b"+OK\r\n" + b"".join(b"%d u%d\r\n" % (i, i) for i in range(1, 41)) + b".\r\n",
            Pop3ProtocolError,
        ),
    ],
)
async def test_a_uidl_sent_with_list_fails_as_one_sent_alone(
    uidl_reply: bytes, error: type[Exception]
) -> None:
    async with serve(_listings_script(uidl_reply)) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        await pop.stat()
        assert await pop.list() == [(1, 10), (2, 20)]
        with pytest.raises(error):
            await pop.uidl()


async def test_utf8_refused_by_the_server_leaves_the_login_as_it_was() -> None:
    """RFC 6856: UTF8 goes before the login when CAPA offers it; a -ERR to it is no failure.
    (Courier's acceptance is tested against Courier in tests/integration/test_interop.py.)"""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w, [*CAPS, b"UTF8 USER"])
        await expect(r, b"UTF8")
        w.write(b"-ERR [SYS/TEMP] not now\r\n")
        await login(r, w)
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        assert not pop.utf8_mode


async def test_utf8_is_sent_once_before_the_login() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w, [*CAPS, b"UTF8"])
        await expect(r, b"UTF8")
        w.write(b"+OK UTF8 enabled\r\n")
        await login(r, w)
        await expect(r, b"STAT")
        w.write(b"+OK 0 0\r\n")
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        assert await pop.utf8()
        await pop.login("alice", "secret", AuthMethod.USER)  # does not ask again
        assert pop.utf8_mode
        assert await pop.stat() == (0, 0)


async def test_auto_picks_apop_when_the_greeting_has_a_stamp() -> None:
    stamp = "<1896.697170952@dbc.mtview.ca.us>"

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w, greeting=f"+OK ready {stamp}".encode())
        await expect(r, f"APOP alice {apop_digest(stamp, 'secret')}".encode())
        w.write(b"+OK maildrop locked and ready\r\n")
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        assert pop.apop_stamp == stamp
        await pop.login("alice", "secret")


async def test_auto_picks_sasl_plain_without_a_stamp() -> None:
    ir = base64.b64encode(b"\0alice\0secret").decode()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w)
        await expect(r, f"AUTH PLAIN {ir}".encode())
        w.write(b"-ERR [AUTH] Authentication failed.\r\n")
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        with pytest.raises(Pop3AuthError) as info:
            await pop.login("alice", "secret")
    assert (info.value.command, info.value.resp_code) == ("AUTH", "AUTH")


async def test_sasl_plain_answers_an_empty_challenge_when_the_response_is_long() -> None:
    password = "p" * 300  # RFC 5034 §4: the AUTH line would pass 255 octets
    response = base64.b64encode(f"\0alice\0{password}".encode())

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w)
        await expect(r, b"AUTH PLAIN")
        w.write(b"+ \r\n")
        await expect(r, response)
        w.write(b"+OK Logged in.\r\n")
        await expect(r, b"NOOP")
        w.write(b"+OK\r\n")
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", password, AuthMethod.PLAIN)
        await noop(pop)


async def test_apop_without_a_stamp_is_an_auth_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w)
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        with pytest.raises(Pop3AuthError, match="APOP"):
            await pop.login("alice", "secret", AuthMethod.APOP)


# ---------------------------------------------------------------------------------------------
# timeouts, cuts, poisoning
# ---------------------------------------------------------------------------------------------


async def test_a_greeting_that_never_comes_times_out() -> None:
    async with serve(silent) as ep:
        with pytest.raises(Pop3TimeoutError):
            await Pop3Client.connect(ep, Pop3Timeouts(connect=2.0, command=0.2, idle_read=2.0))


async def test_a_refusing_greeting_is_a_response_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"-ERR [SYS/TEMP] too many connections\r\n")

    async with serve(script) as ep:
        with pytest.raises(Pop3ResponseError) as info:
            await Pop3Client.connect(ep, FAST)
    assert info.value.resp_code == "SYS/TEMP"


async def test_connection_refused() -> None:
    async with serve(silent) as ep:
        pass  # the server is closed again: its port refuses connections
    with pytest.raises(Pop3ConnectionError, match="cannot connect"):
        await Pop3Client.connect(ep, FAST)


async def logged_in_script(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, caps: list[bytes] = CAPS
) -> None:
    await hello(r, w, caps)
    await login(r, w)


async def test_a_server_stalling_mid_retr_hits_the_idle_timeout_and_poisons() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await logged_in_script(r, w)
        await expect(r, b"RETR 1")
        w.write(b"+OK 100000 octets\r\n" + b"x" * 5000)
        await until_eof(r)  # and never more

    timeouts = Pop3Timeouts(connect=2.0, command=2.0, idle_read=0.2)
    async with serve(script) as ep, await Pop3Client.connect(ep, timeouts) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        with pytest.raises(Pop3TimeoutError, match="stalled"):
            await pop.retr(1)
        with pytest.raises(Pop3ConnectionError, match="unusable"):
            await noop(pop)


async def test_a_big_message_may_take_longer_than_the_command_deadline() -> None:
    pieces = [b"line %d " % i + b"y" * 5000 + b"\r\n" for i in range(6)]

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await logged_in_script(r, w)
        await expect(r, b"RETR 1")
        w.write(b"+OK\r\n")
        for piece in pieces:  # bytes keep coming, each well within idle_read
            w.write(piece)
            await w.drain()
            await asyncio.sleep(0.05)
        w.write(b".\r\n")
        await until_eof(r)

    # 6 x 50 ms is more than the whole-reply `command` deadline, less than `idle_read` per read.
    timeouts = Pop3Timeouts(connect=2.0, command=0.15, idle_read=2.0)
    async with serve(script) as ep, await Pop3Client.connect(ep, timeouts) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        assert await pop.retr(1) == b"".join(pieces)


async def test_connection_cut_mid_retr() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await logged_in_script(r, w)
        await expect(r, b"RETR 1")
        w.write(b"+OK\r\nSubject: half a mess")
        await w.drain()
        w.transport.abort()

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        with pytest.raises(Pop3ConnectionError, match="middle of a reply"):
            await pop.retr(1)
        with pytest.raises(Pop3ConnectionError):
            await pop.dele(1)


async def test_garbage_is_a_protocol_error_and_poisons() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await logged_in_script(r, w)
        await expect(r, b"STAT")
        w.write(b"* OK this is IMAP\r\n")
        await until_eof(r)

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        with pytest.raises(Pop3ProtocolError):
            await pop.stat()
        with pytest.raises(Pop3ConnectionError, match="unusable"):
            await pop.stat()


async def test_a_message_over_the_cap_is_refused() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await logged_in_script(r, w)
        await expect(r, b"RETR 1")
        w.write(b"+OK\r\n" + b"z" * 3000 + b"\r\n.\r\n")
        await until_eof(r)

    async with (
        serve(script) as ep,
        await Pop3Client.connect(ep, FAST, max_message_size=1000) as pop,
    ):
        await pop.login("alice", "secret", AuthMethod.USER)
        with pytest.raises(Pop3ProtocolError, match="1000 octets"):
            await pop.retr(1)


# ---------------------------------------------------------------------------------------------
# STLS
# ---------------------------------------------------------------------------------------------


async def test_stls_required_but_not_offered_is_a_tls_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w)  # no STLS in CAPA
        await until_eof(r)  # and the client must not go on to log in

    async with serve(script, TlsMode.STARTTLS) as ep:
        with pytest.raises(Pop3TlsError, match="does not offer STLS"):
            await Pop3Client.connect(ep, FAST)


async def test_stls_refused_is_a_tls_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w, [*CAPS, b"STLS"])
        await expect(r, b"STLS")
        w.write(b"-ERR TLS not available right now\r\n")
        await until_eof(r)

    async with serve(script, TlsMode.STARTTLS) as ep:
        with pytest.raises(Pop3TlsError, match="refused STLS"):
            await Pop3Client.connect(ep, FAST)


async def test_plaintext_injected_after_stls_is_refused() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await hello(r, w, [*CAPS, b"STLS"])
        await expect(r, b"STLS")
        w.write(b"+OK Begin TLS\r\n+OK injected\r\n")
        await until_eof(r)

    async with serve(script, TlsMode.STARTTLS) as ep:
        with pytest.raises(Pop3ProtocolError, match="STLS"):
            await Pop3Client.connect(ep, FAST)


# ---------------------------------------------------------------------------------------------
# commands and retr_many
# ---------------------------------------------------------------------------------------------


def mailbox_server(
    messages: list[bytes], *, pipelining: bool, window: int = 0, commands: list[bytes] | None = None
) -> Handler:
    """A small in-memory maildrop.  With ``window``, it waits until that many RETRs are queued
    before it answers any, so a client that does not pipeline deadlocks (and times out)."""
    caps = [*CAPS, b"PIPELINING"] if pipelining else CAPS
    log = commands if commands is not None else []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await logged_in_script(r, w, caps)
        held: list[int] = []
        while line := await r.readline():
            log.append(line.rstrip())
            verb, *args = line.decode().split()
            if verb == "RETR":
                held.append(int(args[0]))
                if len(held) < window:
                    continue
                for n in held:
                    if n > len(messages):
                        w.write(b"-ERR no such message\r\n")
                        continue
                    body = messages[n - 1].replace(b"\r\n.", b"\r\n..")
                    w.write(b"+OK %d octets\r\n" % len(messages[n - 1]) + body + b".\r\n")
                held = []
            elif verb == "DELE":
                w.write(b"+OK marked\r\n")
            elif verb == "QUIT":
                w.write(b"+OK bye\r\n")
                return
            else:
                w.write(b"-ERR unknown\r\n")

    return script


MESSAGES = [b"Subject: %d\r\n\r\n.%d\r\n" % (i, i) for i in range(1, 13)]


async def test_retr_many_pipelines_and_keeps_order() -> None:
    async with (
        serve(mailbox_server(MESSAGES, pipelining=True, window=4)) as ep,
        await Pop3Client.connect(ep, FAST) as pop,
    ):
        await pop.login("alice", "secret", AuthMethod.USER)
        got = [item async for item in retr_many(pop, range(1, 13), window=4)]
        assert await pop.quit() == "bye"
    assert got == list(zip(range(1, 13), MESSAGES, strict=True))


async def test_retr_many_one_by_one_without_pipelining() -> None:
    async with (
        serve(mailbox_server(MESSAGES, pipelining=False)) as ep,
        await Pop3Client.connect(ep, FAST) as pop,
    ):
        await pop.login("alice", "secret", AuthMethod.USER)
        assert not pop.pipelining
        got = [item async for item in retr_many(pop, [3, 1, 2])]
    assert got == [(3, MESSAGES[2]), (1, MESSAGES[0]), (2, MESSAGES[1])]


async def test_retr_many_with_dele_between_and_an_early_stop() -> None:
    commands: list[bytes] = []
    async with (
        serve(mailbox_server(MESSAGES, pipelining=True, commands=commands)) as ep,
        await Pop3Client.connect(ep, FAST) as pop,
    ):
        await pop.login("alice", "secret", AuthMethod.USER)
        seen = []
        # As the fetcher does it: no aclose(), the generator is finalised whenever.
        async for number, raw in retr_many(pop, range(1, 13), window=5):
            assert raw == MESSAGES[number - 1]
            seen.append(number)
            await pop.dele(number)  # queued behind the RETRs in flight
            if number == 3:
                break  # RETR 4..7 are still in flight: the session must stay usable
        assert await pop.quit() == "bye"
    assert seen == [1, 2, 3]
    assert b"DELE 3" in commands
    assert commands[-1] == b"QUIT"


async def test_retr_many_stops_on_err_but_the_session_stays_usable() -> None:
    async with (
        serve(mailbox_server(MESSAGES[:2], pipelining=True)) as ep,
        await Pop3Client.connect(ep, FAST) as pop,
    ):
        await pop.login("alice", "secret", AuthMethod.USER)
        got: list[tuple[int, bytes]] = []

        async def collect() -> None:
            async for item in retr_many(pop, [1, 2, 3, 4]):  # the server has no 3
                got.append(item)  # noqa: PERF401 (the items before the error matter)

        with pytest.raises(Pop3ResponseError) as info:
            await collect()
        assert info.value.command == "RETR"
        assert got == [(1, MESSAGES[0]), (2, MESSAGES[1])]
        await pop.dele(1)  # RETR 4's reply, still in flight, is read and dropped
        assert await pop.quit() == "bye"


async def test_single_commands_and_errors() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await logged_in_script(r, w)
        replies = {
            b"STAT": b"+OK 2 320\r\n",
            b"LIST": b"+OK\r\n1 120\r\n2 200\r\n.\r\n",
            b"UIDL": b"-ERR [SYS/PERM] UIDL not supported\r\n",
            b"TOP 1 0": b"+OK\r\nSubject: hello\r\n\r\n.\r\n",
            b"RETR 1": b"+OK\r\n" + MSG.replace(b"\r\n.", b"\r\n..") + b".\r\n",
            b"DELE 1": b"+OK\r\n",
            b"RSET": b"+OK\r\n",
            b"NOOP": b"+OK\r\n",
            b"QUIT": b"+OK see you\r\n",
        }
        while line := await r.readline():
            w.write(replies[line.rstrip()])

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        assert pop.capabilities["SASL"] == ["PLAIN"]
        assert pop.greeting_text == "fake ready"
        await pop.login("alice", "secret", AuthMethod.USER)
        assert await pop.stat() == (2, 320)
        assert await pop.list() == [(1, 120), (2, 200)]
        with pytest.raises(Pop3ResponseError) as info:
            await pop.uidl()
        assert (info.value.command, info.value.resp_code) == ("UIDL", "SYS/PERM")
        assert await pop.top(1, 0) == b"Subject: hello\r\n\r\n"
        assert await pop.retr(1) == MSG
        await pop.dele(1)
        await rset(pop)
        await noop(pop)
        assert await pop.quit() == "see you"
        with pytest.raises(Pop3ConnectionError):
            await noop(pop)
        await pop.close()  # idempotent


async def test_transcript_redacts_credentials_and_bodies(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.pop3.transcript")
    async with (
        serve(mailbox_server([MSG], pipelining=False)) as ep,
        await Pop3Client.connect(ep, FAST, transcript=logger) as pop,
    ):
        with caplog.at_level(logging.DEBUG, logger=logger.name):
            await pop.login("alice", "secret", AuthMethod.USER)
            await pop.retr(1)
    lines = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert "C: USER alice" in lines
    assert "C: PASS ****" in lines
    assert "S: +OK logged in" in lines
    assert "C: RETR 1" in lines
    assert f"S: +OK [message, {len(MSG)} octets]" in lines
    text = "\n".join(lines)
    assert "secret" not in text
    assert "hello" not in text  # the message's Subject


# pipelined DELE and the RETR window in octets
# ---------------------------------------------------------------------------------------------


def dele_server(commands: list[bytes], *, refuse: int | None = None, hold: int = 0) -> Handler:
    """PIPELINING server that answers DELE (``-ERR`` to message ``refuse``), holding its DELE
    replies until ``hold`` DELEs are in: a client that waits for each reply deadlocks."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await logged_in_script(r, w, [*CAPS, b"PIPELINING"])
        held: list[bytes] = []
        while line := await r.readline():
            commands.append(line.rstrip())
            verb, *args = line.decode().split()
            if verb == "DELE":
                gone = int(args[0]) == refuse
                held.append(b"-ERR [SYS/PERM] gone\r\n" if gone else b"+OK marked\r\n")
                if len(held) >= hold:
                    w.write(b"".join(held))
                    held = []
            elif verb == "QUIT":
                w.write(b"+OK bye\r\n")
                return
            else:
                w.write(b"-ERR unknown\r\n")

    return script


async def test_dele_is_pipelined_and_quit_reads_the_replies() -> None:
    commands: list[bytes] = []
    async with (
        serve(dele_server(commands, hold=3)) as ep,
        await Pop3Client.connect(ep, FAST) as pop,
    ):
        await pop.login("alice", "secret", AuthMethod.USER)
        for n in (1, 2, 3):
            await pop.dele(n)  # returns at once: the server answers only after the third
        assert await pop.quit() == "bye"
    assert commands[-4:] == [b"DELE 1", b"DELE 2", b"DELE 3", b"QUIT"]


async def test_a_refused_dele_raises_and_no_quit_is_sent() -> None:
    # A -ERR to DELE means the server and we disagree: without QUIT nothing is deleted
    # (RFC 1939 §6), so every message stays upstream; the ledger knows what was delivered.
    commands: list[bytes] = []
    async with (
        serve(dele_server(commands, refuse=2)) as ep,
        await Pop3Client.connect(ep, FAST) as pop,
    ):
        await pop.login("alice", "secret", AuthMethod.USER)
        for n in (1, 2, 3):
            await pop.dele(n)
        with pytest.raises(Pop3ResponseError) as info:
            await pop.quit()
        assert (info.value.command, info.value.resp_code) == ("DELE 2", "SYS/PERM")
        with pytest.raises(Pop3ConnectionError):
            await noop(pop)
    assert b"QUIT" not in commands
    assert commands[-3:] == [b"DELE 1", b"DELE 2", b"DELE 3"]


async def test_a_refused_dele_surfaces_at_the_next_reply() -> None:
    messages = [b"Subject: %d\r\n\r\nx\r\n" % i for i in range(1, 5)]

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await logged_in_script(r, w, [*CAPS, b"PIPELINING"])
        while line := await r.readline():
            verb, *args = line.decode().split()
            if verb == "RETR":
                w.write(b"+OK\r\n" + messages[int(args[0]) - 1] + b".\r\n")
            elif verb == "DELE":
                w.write(b"-ERR no such message\r\n" if args[0] == "1" else b"+OK\r\n")
            else:
                w.write(b"-ERR unknown\r\n")

    async with serve(script) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        seen = []

        async def fetch_and_delete() -> None:
            async for number, _ in retr_many(pop, [1, 2, 3, 4], window=1):
                seen.append(number)
                await pop.dele(number)

        with pytest.raises(Pop3ResponseError, match="DELE 1"):
            await fetch_and_delete()
        assert seen == [1]  # DELE 1's reply came before RETR 2's


async def test_retr_window_is_bounded_by_octets(caplog: pytest.LogCaptureFixture) -> None:
    # LIST claims 1.5 MiB per message (the bodies are small: the window trusts LIST): with a
    # 4 MiB window no more than two RETRs may be outstanding, however large the count window.
    messages = [b"Subject: %d\r\n\r\nx\r\n" % i for i in range(1, 11)]
    big = 3 * 512 * 1024
    listing = b"".join(b"%d %d\r\n" % (i, big) for i in range(1, 11))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await logged_in_script(r, w, [*CAPS, b"PIPELINING"])
        while line := await r.readline():
            verb, *args = line.decode().split()
            if verb == "LIST":
                w.write(b"+OK\r\n" + listing + b".\r\n")
            elif verb == "RETR":
                w.write(b"+OK\r\n" + messages[int(args[0]) - 1] + b".\r\n")
            else:
                w.write(b"+OK\r\n")

    logger = logging.getLogger("test.pop3.window")
    async with (
        serve(script) as ep,
        await Pop3Client.connect(ep, FAST, transcript=logger) as pop,
    ):
        await pop.login("alice", "secret", AuthMethod.USER)
        with caplog.at_level(logging.DEBUG, logger=logger.name):
            got = [m async for m in retr_many(pop, range(1, 11), window=32)]
    assert got == list(zip(range(1, 11), messages, strict=True))
    outstanding, most = 0, 0
    for record in caplog.records:
        text = record.getMessage()
        outstanding += text.startswith("C: RETR") - text.startswith("S: +OK [message")
        most = max(most, outstanding)
    assert most == 2


# --------------------------------------------------------------------------------------------
# Spooling and the memory budget (docs/design.md §5.3, §10.6)
# --------------------------------------------------------------------------------------------
# ``Pop3Client.retrieve_many`` with a spool and a memory budget (docs/design.md §5.3, §10.6),
# against a small scripted maildrop on loopback (Dovecot runs the same paths in
# tests/integration/test_spool.py): large messages come back as spool files, small ones in
# memory, in order; nothing is left in the spool by an early stop, a failing sink or a
# cancellation; the budget bounds the RETRs in flight.


def spool_message(n: int, size: int) -> bytes:
    line = b".%d line of message %d, dot-stuffed on the wire\r\n" % (n, n)
    return b"Subject: %d\r\n\r\n" % n + line * (size // len(line) + 1)


SPOOL_MESSAGES = [
    spool_message(n, size) for n, size in enumerate([100, 300_000, 50, 1_000_000, 200], 1)
]
ABOVE = 10_000  # the spool threshold of these tests


@contextlib.asynccontextmanager
async def maildrop(
    messages: list[bytes], log: list[bytes], stall_in: int | None = None
) -> AsyncIterator[Pop3Endpoint]:
    """PIPELINING, USER/PASS, LIST, RETR, DELE, QUIT.  ``stall_in``: RETR of that message
    sends half of it and then nothing."""
    stalled = asyncio.Event()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"+OK ready\r\n")
        while line := await r.readline():
            log.append(line.rstrip())
            verb, *args = line.decode().split()
            if verb == "CAPA":
                w.write(b"+OK\r\nUSER\r\nPIPELINING\r\n.\r\n")
            elif verb == "LIST":
                listing = b"".join(b"%d %d\r\n" % (i, len(m)) for i, m in enumerate(messages, 1))
                w.write(b"+OK\r\n" + listing + b".\r\n")
            elif verb == "RETR":
                n = int(args[0])
                body = messages[n - 1].replace(b"\r\n.", b"\r\n..") + b".\r\n"
                if n == stall_in:
                    w.write(b"+OK\r\n" + body[: len(body) // 2])
                    stalled.set()
                    await r.read()  # nothing more, ever
                    return
                w.write(b"+OK %d octets\r\n" % len(messages[n - 1]) + body)
            elif verb == "QUIT":
                w.write(b"+OK bye\r\n")
                return
            else:
                w.write(b"+OK\r\n")
            await w.drain()

    tasks: set[asyncio.Task[None]] = set()

    async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await script(r, w)
        w.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield Pop3Endpoint("127.0.0.1", server.sockets[0].getsockname()[1], TlsMode.NONE)
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def spool_in(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.clean()
    return spool


def files(spool: Spool) -> list[Path]:
    return sorted(spool.directory.iterdir())


async def test_large_messages_come_as_spool_files_small_ones_in_memory_in_order(
    tmp_path: Path,
) -> None:
    spool = spool_in(tmp_path)
    log: list[bytes] = []
    got: list[tuple[int, bytes, bool]] = []
    async with maildrop(SPOOL_MESSAGES, log) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        sizes = dict(await pop.list())
        async for item in pop.retrieve_many(
            range(1, 6), sizes=sizes, spooling=Spooling(ABOVE, spool.writer)
        ):
            if item.spooled is not None:
                assert item.raw == b""
                got.append((item.number, item.spooled.path.read_bytes(), True))
                item.spooled.remove()
            else:
                got.append((item.number, item.raw, False))
            await pop.dele(item.number)
        assert await pop.quit() == "bye"
    assert got == [(n, m, len(m) > ABOVE) for n, m in enumerate(SPOOL_MESSAGES, 1)]
    assert files(spool) == []


async def test_an_early_stop_leaves_no_spool_file(tmp_path: Path) -> None:
    # Messages 2 and 4 are large; the caller stops at 1 with RETR 2..5 in flight (some read
    # ahead into the stash by the DELE's reply, some abandoned): none may stay in the spool.
    spool = spool_in(tmp_path)
    log: list[bytes] = []
    async with maildrop(SPOOL_MESSAGES, log) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        sizes = dict(await pop.list())
        async for item in pop.retrieve_many(
            range(1, 6), sizes=sizes, spooling=Spooling(ABOVE, spool.writer)
        ):
            await pop.dele(item.number)
            break
        assert await pop.quit() == "bye"
    assert log[-1] == b"QUIT"
    assert files(spool) == []


class BrokenWriter(SpoolWriter):
    """A spool on a full disk: the second write fails."""

    writes = 0

    async def write(self, data: bytes) -> None:
        BrokenWriter.writes += 1
        if BrokenWriter.writes == 2:
            raise StateError("spool: cannot write a spool file: No space left on device")
        await super().write(data)


async def test_a_sink_that_fails_ends_the_session_and_leaves_no_file(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    budget = MemoryBudget(4 * ABOVE)
    async with maildrop(SPOOL_MESSAGES, []) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        sizes = dict(await pop.list())

        def sink() -> SpoolWriter:
            return BrokenWriter(spool.directory, digest_body=False)

        spooling = Spooling(ABOVE, sink)
        with pytest.raises(StateError, match="No space"):
            async for _ in pop.retrieve_many([4], sizes=sizes, spooling=spooling, budget=budget):
                pass
        # The budget outlives the session: nothing may stay charged, not even by a RETR that
        # could not be sent on the broken stream.
        assert budget.in_use == 0
        with pytest.raises(Pop3ConnectionError, match="unusable"):
            async for _ in pop.retrieve_many([1], sizes=sizes, budget=budget):
                pass
        assert budget.in_use == 0
        with pytest.raises(Pop3ConnectionError, match="unusable"):
            await pop.quit()  # half a reply was read: the stream cannot be trusted
    assert files(spool) == []


async def test_a_cancellation_in_the_middle_of_a_streamed_retr_leaves_no_file(
    tmp_path: Path,
) -> None:
    spool = spool_in(tmp_path)
    async with (
        maildrop(SPOOL_MESSAGES, [], stall_in=4) as ep,
        await Pop3Client.connect(ep, FAST) as pop,
    ):
        await pop.login("alice", "secret", AuthMethod.USER)
        sizes = dict(await pop.list())
        written = asyncio.Event()

        class Watched(SpoolWriter):
            async def write(self, data: bytes) -> None:
                await super().write(data)
                written.set()

        async def fetch() -> None:
            spooling = Spooling(ABOVE, lambda: Watched(spool.directory, digest_body=False))
            async for _ in pop.retrieve_many([4], sizes=sizes, spooling=spooling):
                pass

        task = asyncio.create_task(fetch())
        await written.wait()
        assert len(files(spool)) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # A write whose thread was running at the cancellation removes the file when that thread
    # ends (connector/spool.py, SpoolWriter.discard), which may be after the task has ended.
    # No event marks that end (a file gone), so the condition is polled, with a deadline.
    async with asyncio.timeout(10):
        while files(spool):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_the_budget_bounds_what_is_in_flight_and_is_all_given_back(tmp_path: Path) -> None:
    # 40 messages of 3,000 octets, in memory; a budget of 10,000 holds three at a time: the
    # window (32 RETRs, 4 MiB) is cut down to what the budget allows.
    messages = [spool_message(n, 3_000) for n in range(1, 41)]
    budget = MemoryBudget(10_000)
    log: list[bytes] = []
    most = 0
    async with maildrop(messages, log) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        sizes = dict(await pop.list())
        count = 0
        async for item in pop.retrieve_many(range(1, 41), sizes=sizes, budget=budget):
            assert item.raw == messages[item.number - 1]
            most = max(most, budget.in_use)
            count += 1
        assert count == 40
    assert budget.peak <= budget.total
    assert most >= len(messages[0])  # the message in hand is charged
    assert budget.in_use == 0


async def test_a_spooled_message_is_charged_the_threshold_not_its_size(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    budget = MemoryBudget(4 * ABOVE)
    async with maildrop(SPOOL_MESSAGES, []) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        sizes = dict(await pop.list())
        async for item in pop.retrieve_many(
            [4], sizes=sizes, spooling=Spooling(ABOVE, spool.writer), budget=budget
        ):
            assert isinstance(item.spooled, Spooled)
            assert budget.in_use == ABOVE  # not the 1 MB LIST announced
            item.spooled.remove()
    assert budget.in_use == 0
