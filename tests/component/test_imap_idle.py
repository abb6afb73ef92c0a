"""The IDLE watcher (connector/imap/idle.py) against the built-in loopback IMAP server: an
EXISTS wakes it, IDLE is renewed, a server without IDLE is polled, a failing connection backs
off, a stop ends IDLE with DONE and LOGOUT."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from connector.imap import ImapOptions
from connector.imap.idle import IdleWatcher, Wake
from connector.loopback_imap import LoopbackImapServer
from connector.pop3 import Pop3Timeouts
from tests.component.test_imap_client import (
    PASSWORD,
    TOKEN,
    USER,
    dripping,
    endpoint,
    mail,
    plain,
)


@pytest.fixture
async def server() -> AsyncIterator[LoopbackImapServer]:
    async with LoopbackImapServer({USER: PASSWORD}, xoauth2_tokens={USER: TOKEN}) as srv:
        yield srv


class Spec:
    """An IMAP account as the watcher sees it (connector.cycle.AccountSpec's fields)."""

    def __init__(self, srv: LoopbackImapServer, **options: object) -> None:
        self.name = "info"
        self.endpoint = endpoint(srv)
        self.username = USER
        self.password = PASSWORD
        self.timeouts = Pop3Timeouts(connect=5, command=5, idle_read=5)
        self.imap = ImapOptions(**options)  # type: ignore[arg-type]


async def test_exists_wakes_the_watcher_and_close_says_done_and_logout(
    server: LoopbackImapServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "connector.imap")
    watcher = IdleWatcher(Spec(server), interval=600)
    stop = asyncio.Event()
    assert await watcher.wait(600, [stop]) is Wake.MAIL  # a fresh connection: look once
    assert server.commands.count("SELECT") == 1
    waiting = asyncio.create_task(watcher.wait(600, [stop], stop=stop))
    server.add_message(USER, mail(1))
    assert await asyncio.wait_for(waiting, 10) is Wake.MAIL
    assert server.commands.count("SELECT") == 1
    waiting = asyncio.create_task(watcher.wait(600, [stop], stop=stop))
    # Still in IDLE (no cycle took the connection): let the wait start its read of the
    # server's next response.  Were it not started yet, the stop below would end it all the
    # same, and close() would still send DONE: the assertions hold either way.
    await asyncio.sleep(0.05)
    stop.set()  # as SIGTERM does
    assert await asyncio.wait_for(waiting, 10) is Wake.EVENT
    await watcher.close()
    assert (server.dones, server.logouts) == (1, 1)
    assert not watcher.active
    assert "failed" not in caplog.text  # DONE answered, then LOGOUT answered: a clean end


async def test_idle_is_renewed(server: LoopbackImapServer) -> None:
    watcher = IdleWatcher(Spec(server, idle_renewal=0.05), interval=600)
    stop = asyncio.Event()
    assert await watcher.wait(600, [stop]) is Wake.MAIL
    assert await watcher.wait(0.5, [stop]) is Wake.TIMEOUT
    assert server.idles >= 4  # the first IDLE and at least three renewals
    assert server.dones == server.idles - 1  # each renewal: DONE, then IDLE again
    server.add_message(USER, mail(1))  # still watching after the renewals
    assert await watcher.wait(10, [stop]) is Wake.MAIL
    await watcher.close()


async def test_a_server_without_idle_is_polled(server: LoopbackImapServer) -> None:
    server.idle = False
    watcher = IdleWatcher(Spec(server), interval=600)
    assert await watcher.wait(0.1, [asyncio.Event()]) is Wake.TIMEOUT
    assert watcher.supported is False
    assert server.commands.count("IDLE") == 0
    server.add_message(USER, mail(1))
    assert await watcher.wait(0.1, [asyncio.Event()]) is Wake.TIMEOUT  # no push: the poll
    await watcher.close()


async def test_a_failing_connection_backs_off_like_a_failing_cycle(
    server: LoopbackImapServer,
) -> None:
    """Reconnecting after failures waits the poll interval, doubled up to four times, with
    up to 10 % jitter (service.Service.delay_after's pace); no attempt in between."""
    offset = [0.0]

    def clock() -> float:
        return time.monotonic() + offset[0]

    spec = Spec(server)
    spec.password = "wrong"
    watcher = IdleWatcher(spec, interval=60, clock=clock)
    never = asyncio.Event()
    first = server.sessions
    for attempt, factor in enumerate((1, 2, 4, 4), 1):
        assert await watcher.wait(0.05, [never]) is Wake.TIMEOUT  # one attempt, refused
        assert server.sessions == first + attempt
        delay = watcher.next_attempt - clock()
        assert 60 * factor - 1 <= delay <= 60 * factor * 1.1
        assert await watcher.wait(0.05, [never]) is Wake.TIMEOUT
        assert server.sessions == first + attempt  # none before the retry time
        offset[0] += delay
    await watcher.close()


async def test_a_stop_ends_a_wait_that_is_still_opening_the_connection() -> None:
    # A server that answers IDLE with an untagged response every 50 ms and never with its
    # continuation: opening the watch lasts up to IDLE's `command` deadline (30 s here).
    # A stop set meanwhile ends the wait at once, and the half-open connection is dropped.
    async with dripping("IDLE", b"* OK still thinking\r\n") as (port, arrived):
        spec = Spec.__new__(Spec)
        spec.name, spec.username, spec.password = "info", USER, "secret"  # no literal
        spec.endpoint = plain(port)
        spec.timeouts = Pop3Timeouts(connect=30, command=30, idle_read=30)
        spec.imap = ImapOptions()
        watcher = IdleWatcher(spec, interval=600)
        stop = asyncio.Event()
        waiting = asyncio.create_task(watcher.wait(600, [stop], stop=stop))
        await asyncio.wait_for(arrived.wait(), 10)
        stop.set()
        assert await asyncio.wait_for(waiting, 5) is Wake.EVENT
        assert not watcher.active
        await watcher.abort()
