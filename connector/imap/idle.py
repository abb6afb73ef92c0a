"""Waiting for new mail with IMAP IDLE (RFC 2177) between an account's cycles.

An IMAP account with ``push = true`` does not only sleep until its next poll: while it waits,
an :class:`IdleWatcher` holds one connection on the folder (logged in, the folder selected) in
IDLE.  The scheduler (``service.Service``) calls :meth:`IdleWatcher.wait` instead of sleeping;
it returns

* :attr:`Wake.MAIL` when the server announces a new message (an ``EXISTS`` that raises the
  count), or when the watcher has just (re)connected: mail that came while it had no
  connection, or between the last cycle's listing and its EXAMINE, announced nothing to it;
* :attr:`Wake.EVENT` when one of the scheduler's events is set (a stop, ``POST /poll``);
* :attr:`Wake.TIMEOUT` when the time asked for has passed (the poll interval: a full cycle
  then runs anyway, the safety net for a push that never came).

The account's cycles run on the same connection: the watcher lends it (:meth:`IdleWatcher.lend`:
``DONE``, then the cycle lists, fetches, flags and expunges on it, with no new TCP connection,
login or SELECT) and takes it back (:meth:`IdleWatcher.give_back`) to issue IDLE again at the
next wait.  So a cycle that new mail starts costs what is new, and the time from Dovecot's
``EXISTS`` to Exchange's ``250`` is a few round trips (bench/README.md, "push").  A cycle that
fails closes the connection; the next wait opens a new one.  IDLE is ended with ``DONE`` and
issued again every ``idle_renewal`` seconds (RFC 2177 §3: at least every 29 minutes).

A server without IDLE (no ``IDLE`` capability after login) is not watched: ``wait`` sleeps as
for a POP3 account (:attr:`IdleWatcher.supported` is False).  A connection that fails or
drops is reopened with the POP3 accounts' backoff (docs/design.md §6.3): at once after a
connection that had lasted (:data:`HEALTHY_AFTER`), then after the poll interval, doubled
for each further failure up to four times, with up to 10 % jitter.  Meanwhile ``wait``
sleeps like a poll.  The watcher never fails the account: its errors are logged, and the
cycles (which keep running on the interval) are what marks an account failing.

:meth:`IdleWatcher.close` ends IDLE with ``DONE`` and logs out (SIGTERM, a reload that changes
the account, its removal); cancelled, it drops the connection.

The read that waits for the server's next response runs as a task of its own, kept across
calls to ``wait`` and never cancelled while the connection is to be used again: a read
cancelled after its bytes arrived would lose them (asyncio throws the cancellation in place of
the result).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from connector.errors import ConfigError, Pop3ConnectionError, Pop3Error
from connector.imap import ImapOptions
from connector.imap.client import ImapClient
from connector.imap.protocol import Response
from connector.pop3.client import Pop3Endpoint, Pop3Timeouts

log = logging.getLogger(__name__)

HEALTHY_AFTER: Final = 60.0
"""A connection that lasted this long before it dropped is reopened at once; one that dropped
sooner counts as a failure (a server that drops every IDLE at once must not be hammered)."""
MAX_BACKOFF_FACTOR: Final = 4  # service.MAX_BACKOFF_FACTOR: the same pace as failing cycles


class Wake(enum.Enum):
    """Why :meth:`IdleWatcher.wait` returned."""

    MAIL = "mail"
    EVENT = "event"
    TIMEOUT = "timeout"


class Account(Protocol):
    """What the watcher needs of an account (``connector.cycle.AccountSpec``)."""

    @property
    def name(self) -> str: ...

    @property
    def endpoint(self) -> Pop3Endpoint: ...

    @property
    def username(self) -> str: ...

    @property
    def password(self) -> str | Callable[[], Awaitable[str]]: ...

    @property
    def timeouts(self) -> Pop3Timeouts: ...

    @property
    def imap(self) -> ImapOptions | None: ...


class IdleWatcher:
    """One account's IDLE connection, between its cycles (see the module docstring)."""

    def __init__(
        self,
        spec: Account,
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        transcript: logging.Logger | None = None,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        if spec.imap is None:
            raise ValueError("an IdleWatcher needs an IMAP account")
        self.spec = spec
        self.options: ImapOptions = spec.imap
        self.interval = interval
        self.clock = clock
        self._transcript = transcript
        self._on_state = on_state
        self._client: ImapClient | None = None
        self._pending: asyncio.Task[Response] | None = None
        self._idle_since = 0.0
        self._connected_at = 0.0
        self._failures = 0
        self._retry_at = 0.0
        self._state = False
        self.supported: bool | None = None  # None: not known yet; False: no IDLE, polled

    @property
    def next_attempt(self) -> float:
        """When a failed connection is tried again (the watcher's clock); 0: at once."""
        return self._retry_at

    @property
    def active(self) -> bool:
        """True while a connection is held in IDLE."""
        return self._client is not None and self._client.idling

    def _report(self) -> None:
        state = self._client is not None
        if state != self._state:
            self._state = state
            if self._on_state is not None:
                self._on_state(state)

    # -- waiting -------------------------------------------------------------------------------

    async def wait(
        self,
        seconds: float,
        wake: Sequence[asyncio.Event],
        *,
        stop: asyncio.Event | None = None,
    ) -> Wake:
        """Wait up to ``seconds`` in IDLE; see :class:`Wake` for what ends the wait.  ``stop``
        (one of ``wake``) also gives up a connection still being opened: a stop must not wait
        for a slow server's login.  The other events only end the wait once it is open (the
        scheduler's ``leave_idle`` wants the connection for a cycle, not a second login)."""
        deadline = self.clock() + seconds
        while True:
            if any(e.is_set() for e in wake):
                return Wake.EVENT
            now = self.clock()
            if now >= deadline:
                return Wake.TIMEOUT
            if self.supported is False:
                return await _sleep(wake, deadline - now)
            client = self._client
            if client is not None and client.closed:
                # A cycle that ran on it failed, or the server went away while it was lent.
                await self._dropped(Pop3ConnectionError("the connection was closed"))
                continue
            if client is None:
                if now < self._retry_at:
                    if await _sleep(wake, min(deadline, self._retry_at) - now) is Wake.EVENT:
                        return Wake.EVENT
                    continue
                opened = await (self._open() if stop is None else self._open_unless(stop))
                if opened is None:
                    return Wake.EVENT
                if opened:
                    return Wake.MAIL  # mail may have come while nothing watched
                continue
            if client.new_mail:
                client.new_mail = False
                return Wake.MAIL
            try:
                if not client.idling:
                    # The server ended IDLE itself (RFC 2177 allows it): issue it again.
                    await client.idle()
                    self._idle_since = self.clock()
                    continue
                renew_at = self._idle_since + self.options.idle_renewal
                if now >= renew_at:
                    await self._renew(client)
                    continue
                if await self._next(client, min(deadline, renew_at) - now, wake) is Wake.EVENT:
                    return Wake.EVENT
            except Pop3Error as exc:
                await self._dropped(exc)

    async def _next(
        self, client: ImapClient, seconds: float, wake: Sequence[asyncio.Event]
    ) -> Wake:
        """Wait for the server's next response, an event, or ``seconds``; a response read is
        noted by the client (``new_mail``)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(client.idle_response())
        pending = self._pending
        waiters = [asyncio.ensure_future(e.wait()) for e in wake]
        try:
            await asyncio.wait(
                {pending, *waiters}, timeout=max(seconds, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if pending.done():
            self._pending = None
            pending.result()  # raises what the read raised
            return Wake.MAIL if client.new_mail else Wake.TIMEOUT
        return Wake.EVENT if any(e.is_set() for e in wake) else Wake.TIMEOUT

    async def _end_idle(self, client: ImapClient) -> None:
        """DONE, then read to IDLE's tagged answer (within the command deadline)."""
        client.send_done()
        async with asyncio.timeout(self.spec.timeouts.command):
            while client.idling:
                if self._pending is None:
                    self._pending = asyncio.ensure_future(client.idle_response())
                pending = self._pending
                try:
                    await pending
                finally:
                    if pending.done():
                        self._pending = None

    async def _renew(self, client: ImapClient) -> None:
        """RFC 2177 §3: end IDLE and issue it again before the server's inactivity timer."""
        try:
            await self._end_idle(client)
        except TimeoutError:
            raise Pop3Error("no answer to DONE in time") from None
        await client.idle()
        self._idle_since = self.clock()
        log.debug("account=%s: IDLE renewed", self.spec.name)

    # -- lending the connection to a cycle ----------------------------------------------------

    async def lend(self) -> ImapClient | None:
        """The connection, out of IDLE (DONE answered), its folder selected, for a cycle
        (``ImapSession``); None when there is none.  Given back with :meth:`give_back`."""
        client = self._client
        if client is None or client.closed:
            return None
        try:
            if client.idling:
                await self._end_idle(client)
        except (Pop3Error, TimeoutError) as exc:
            await self._dropped(Pop3ConnectionError(f"ending IDLE for a cycle: {exc}"))
            return None
        client.new_mail = False  # the cycle lists the folder: it sees what EXISTS announced
        return client

    def give_back(self, client: ImapClient) -> None:
        """The cycle is done with the connection; IDLE again at the next wait (a closed one:
        the next wait opens a new one)."""
        if client is not self._client:
            return

    # -- connecting ----------------------------------------------------------------------------

    async def _open_unless(self, stop: asyncio.Event) -> bool | None:
        """:meth:`_open`, given up (None) when ``stop`` is set first: a stop must not wait
        for a slow server's login or SELECT (each bounded only by its own deadline)."""
        opening = asyncio.ensure_future(self._open())
        waiters = [asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait({opening, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            if not opening.done():
                opening.cancel()  # _open closes the connection it was making
            await asyncio.gather(opening, *waiters, return_exceptions=True)
        if opening.cancelled():
            return None
        return opening.result()

    async def _open(self) -> bool:
        """Connect, log in, EXAMINE the folder, IDLE.  False (with the retry time set) on a
        failure, or when the server has no IDLE (``supported`` False)."""
        spec = self.spec
        client: ImapClient | None = None
        try:
            client = await ImapClient.connect(
                spec.endpoint, spec.timeouts, transcript=self._transcript
            )
            await client.login(spec.username, spec.password, self.options.auth)
            if "IDLE" not in client.capabilities:
                self.supported = False
                log.info(
                    "account=%s: the server does not offer IDLE; polling every %.0fs",
                    spec.name,
                    self.interval,
                )
                await client.logout()
                return False
            await client.select(self.options.folder)
            await client.idle()
        except (Pop3Error, ConfigError) as exc:
            if client is not None:
                await client.close()
            self._failed(f"cannot wait with IDLE: {exc}")
            return False
        except BaseException:  # cancelled (a stop while opening): drop what was opened
            if client is not None:
                await client.close()
            raise
        self._client = client
        self.supported = True
        self._connected_at = self._idle_since = self.clock()
        self._report()
        log.info(
            "account=%s: waiting for new mail with IDLE on %s (folder %r)",
            spec.name,
            spec.endpoint.host,
            self.options.folder,
        )
        return True

    async def _dropped(self, exc: Pop3Error) -> None:
        client, self._client = self._client, None
        self._report()
        await self._discard(client)
        if self.clock() - self._connected_at >= HEALTHY_AFTER:
            self._failures = 0
            self._retry_at = 0.0
            log.warning(
                "account=%s: the IDLE connection dropped (%s); reconnecting", self.spec.name, exc
            )
            return
        self._failed(f"the IDLE connection dropped: {exc}")

    def _failed(self, why: str) -> None:
        self._failures += 1
        factor = min(2 ** (self._failures - 1), MAX_BACKOFF_FACTOR)
        delay = self.interval * factor * random.uniform(1.0, 1.1)
        self._retry_at = self.clock() + delay
        log.warning("account=%s: %s; trying again in %.0fs", self.spec.name, why, delay)

    async def _discard(self, client: ImapClient | None) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
        if pending is not None:
            with contextlib.suppress(BaseException):
                await pending
        if client is not None:
            await client.close()

    async def abort(self) -> None:
        """Drop the connection without DONE or LOGOUT (a stop past its grace)."""
        client, self._client = self._client, None
        self._report()
        await self._discard(client)

    async def close(self) -> None:
        """End IDLE with DONE and LOGOUT (RFC 2177 §3, RFC 3501 §6.1.3); if that fails or is
        cancelled, drop the connection."""
        client, self._client = self._client, None
        self._report()
        if client is None:
            return
        try:
            if client.idling:
                await self._end_idle(client)
            await client.logout()
        except (Pop3Error, TimeoutError) as exc:
            log.debug("account=%s: ending IDLE: %s", self.spec.name, exc)
        finally:
            await self._discard(client)


async def _sleep(wake: Sequence[asyncio.Event], seconds: float) -> Wake:
    """Wait until an event is set (EVENT) or ``seconds`` pass (TIMEOUT)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in wake]
    try:
        await asyncio.wait(waiters, timeout=max(seconds, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return Wake.EVENT if any(e.is_set() for e in wake) else Wake.TIMEOUT
