"""What a hostile POP3 server can make us do is bounded by what it told us (issue 13 item 4),
against loopback servers that lie or drip; the parser's own caps are tests/unit/test_pop3_bounds.py.

* A RETR may bring no more than LIST announced for the message.
* A whole cycle has a deadline (``cycle_timeout``): a server that sends a byte just before each
  read timeout can no longer hold it open.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connector.cycle import Outcome
from connector.errors import Pop3ProtocolError, Pop3TimeoutError
from connector.pop3 import Pop3Client, Pop3Endpoint, Pop3Timeouts
from connector.tls import TlsMode
from tests.component.test_cycle_lifecycle import USER, Recorder, mail, make_rig

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
