"""``Pop3Client.retrieve_many`` with a spool and a memory budget (docs/design.md §5.3, §10.6),
against a small scripted maildrop on loopback (Dovecot runs the same paths in
tests/integration/test_spool.py): large messages come back as spool files, small ones in
memory, in order; nothing is left in the spool by an early stop, a failing sink or a
cancellation; the budget bounds the RETRs in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from connector.budget import MemoryBudget
from connector.errors import Pop3ConnectionError, StateError
from connector.pop3 import AuthMethod, Pop3Client, Pop3Endpoint, Pop3Timeouts
from connector.pop3.client import Spooling
from connector.spool import Spool, Spooled, SpoolWriter
from connector.tls import TlsMode

FAST = Pop3Timeouts(connect=2.0, command=2.0, idle_read=2.0)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def message(n: int, size: int) -> bytes:
    line = b".%d line of message %d, dot-stuffed on the wire\r\n" % (n, n)
    return b"Subject: %d\r\n\r\n" % n + line * (size // len(line) + 1)


MESSAGES = [message(n, size) for n, size in enumerate([100, 300_000, 50, 1_000_000, 200], 1)]
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
    async with maildrop(MESSAGES, log) as ep, await Pop3Client.connect(ep, FAST) as pop:
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
    assert got == [(n, m, len(m) > ABOVE) for n, m in enumerate(MESSAGES, 1)]
    assert files(spool) == []


async def test_an_early_stop_leaves_no_spool_file(tmp_path: Path) -> None:
    # Messages 2 and 4 are large; the caller stops at 1 with RETR 2..5 in flight (some read
    # ahead into the stash by the DELE's reply, some abandoned): none may stay in the spool.
    spool = spool_in(tmp_path)
    log: list[bytes] = []
    async with maildrop(MESSAGES, log) as ep, await Pop3Client.connect(ep, FAST) as pop:
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
    async with maildrop(MESSAGES, []) as ep, await Pop3Client.connect(ep, FAST) as pop:
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
    async with maildrop(MESSAGES, [], stall_in=4) as ep, await Pop3Client.connect(ep, FAST) as pop:
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
    assert files(spool) == []


async def test_the_budget_bounds_what_is_in_flight_and_is_all_given_back(tmp_path: Path) -> None:
    # 40 messages of 3,000 octets, in memory; a budget of 10,000 holds three at a time: the
    # window (32 RETRs, 4 MiB) is cut down to what the budget allows.
    messages = [message(n, 3_000) for n in range(1, 41)]
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
    async with maildrop(MESSAGES, []) as ep, await Pop3Client.connect(ep, FAST) as pop:
        await pop.login("alice", "secret", AuthMethod.USER)
        sizes = dict(await pop.list())
        async for item in pop.retrieve_many(
            [4], sizes=sizes, spooling=Spooling(ABOVE, spool.writer), budget=budget
        ):
            assert isinstance(item.spooled, Spooled)
            assert budget.in_use == ABOVE  # not the 1 MB LIST announced
            item.spooled.remove()
    assert budget.in_use == 0
