"""One POP3 session for one account: list, diff with the ledger, fetch, deliver, record, DELE, QUIT.

This is the policy layer of PRODUCT §5.  It owns the order of operations that makes the connector
crash-safe; the modules below it (pop3, delivery, ledger, deadletter) only do what they are told.

The order for each message, oldest first (the order of the UIDL listing, RFC 1939 §7)::

    known delivered / dead-lettered  ->  DELE only (never handed to SMTP again), after a cheap
                                         check that it is the same message (_same_message:
                                         LIST size, TOP header digest; else it is new mail)
    new or deferred                  ->  RETR -> SMTP
        250 after DATA               ->  ledger "delivered" committed  -> DELE
                                         (group-committed on the ledger thread while the next
                                         message goes on; its DELE follows the commit: _settle)
        refused permanently          ->  dead-letter store (fsynced) -> "dead_lettered" -> DELE
                                         (the file removed again if that commit fails)
        refused temporarily          ->  ledger "deferred" (attempts, first seen); stays upstream,
                                         unless deferred longer than max_deferral: dead-letter it
    then QUIT                        ->  the server carries out the DELEs (RFC 1939 §6)

With ``leave_on_server`` the DELEs after "delivered" and "dead_lettered" are not sent: the message
stays upstream, and its ledger row (kept as long as the UIDL is listed) makes every later cycle
pass over it without a command, a log line or an observer call, so a mailbox of 10,000 kept
messages costs the UIDL listing and nothing per message.  With ``delete_after`` a kept message is
DELEd (once, counted as ``removed``) when that long has passed since it was delivered or
dead-lettered (the row's ``last_attempt``).

Crash anywhere: a DELE without QUIT deletes nothing (RFC 1939 §6), and every DELE we send follows a
ledger commit, so the next cycle sees each message again and the ledger says what was already done.
The only duplicate window is between SMTP's 250 and the ledger commit right after it.  Before a
cycle's first SMTP transaction the ledger proves it can commit (Ledger.prove_writable), so a full
or read-only disk stops deliveries instead of repeating them each cycle.

An unexpected error while handling one message (a parser's bug, an input nobody foresaw) is that
message's alone (_isolated, PRODUCT §5): it stays upstream, the cycle goes on, and after
ERROR_LIMIT such cycles it is dead-lettered with stage "error".  A failure of our own setup (SMTP
connect, TLS, AUTH; a 5xx to a fixed sender or recipient), of the dead-letter store or of the
ledger ends the cycle *before the next RETR* (a failed group commit of
a ``delivered`` row: before the next message's content goes to SMTP); the QUIT still goes out so
the DELEs of the messages already finished take effect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Final, Protocol

from connector import headers
from connector.cycle.identity import duplicate_key, uid_listing
from connector.cycle.refusal import Breaker
from connector.cycle.trace import trace_header
from connector.cycle.values import (
    AccountSpec,
    CycleStats,
    DeliveryPolicy,
    Outcome,
    Oversize,
)
from connector.deadletter import DeadLetterInfo, DeadLetterStore
from connector.delivery import Delivered, Envelope, envelope_sender
from connector.errors import (
    ConnectorError,
    DeadLetterError,
    DeliveryError,
    Disposition,
    Evidence,
    LedgerError,
    Pop3ResponseError,
    Pop3TimeoutError,
    RefusedAlikeError,
    SmtpStage,
    classify,
)
from connector.ledger import Identity, Ledger, LedgerEntry, MessageState, RecipientsDone
from connector.pop3 import Pop3Client
from connector.recipients import message_id, route

log = logging.getLogger(__name__)


SETTLE_EVERY: Final = 32
"""Delivered messages whose DELEs wait for their group-committed ledger rows (Cycle._settle)
before they are sent; a bound on the list, not on safety: a DELE counts only at QUIT."""

ERROR_LIMIT: Final = 3
"""Cycles in which handling a message may fail unexpectedly before it is dead-lettered with
stage ``error`` (PRODUCT §5)."""

FETCH_CEILING: Final = 1024 * 1024 * 1024
"""No message larger than this is read, whatever the policy: it is left upstream and reported.
A message is held in memory while it is handled; this bounds what one message may cost."""


class Deliverer(Protocol):
    """The part of ``delivery.SmtpDeliverer`` the fetcher uses (a seam for tests)."""

    async def deliver(
        self,
        raw: bytes,
        envelope: Envelope,
        *,
        trace: bytes = b"",
        wire: bytes | None = None,
        before_content: Callable[[], Awaitable[None]] | None = None,
    ) -> Delivered: ...

    async def close(self) -> None: ...


class CycleObserver(Protocol):
    """Told about every message; the service hangs logging and metrics on it."""

    def message(
        self, account: str, uidl: str, size: int, outcome: Outcome, response: str
    ) -> None: ...


class LogObserver:
    """The default observer: one log line per message (PRODUCT §8)."""

    def message(self, account: str, uidl: str, size: int, outcome: Outcome, response: str) -> None:
        log.info(
            "account=%s uidl=%s size=%d outcome=%s smtp=%r", account, uidl, size, outcome, response
        )


class CycleStopped(Exception):
    """Raised inside the loop to end a cycle early but still QUIT; carries the cause."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(str(cause))


_SUMMARY_MAX: Final = 300


def error_summary(exc: BaseException) -> str:
    """``exc`` as one short line of printable ASCII: its type and message, control and
    non-ASCII characters escaped (a parser's error may quote the hostile input)."""
    text = f"{type(exc).__name__}: {str(exc)[: _SUMMARY_MAX * 2]}".rstrip(": ")
    line = " ".join(text.split())
    escaped = "".join(
        ch if " " <= ch < "\x7f" else ch.encode("unicode_escape", "backslashreplace").decode()
        for ch in line
    )
    return escaped if len(escaped) <= _SUMMARY_MAX else escaped[: _SUMMARY_MAX - 3] + "..."


class Cycle:
    """One cycle of one account.  Construct, then ``await cycle.run()``; not reusable."""

    def __init__(
        self,
        account: AccountSpec,
        *,
        ledger: Ledger,
        store: DeadLetterStore,
        deliverer: Deliverer,
        policy: DeliveryPolicy,
        observer: CycleObserver | None = None,
        stopping: asyncio.Event | None = None,
        clock: Callable[[], float] = time.time,
        transcript: logging.Logger | None = None,
        connect: Callable[..., Awaitable[Pop3Client]] = Pop3Client.connect,
    ) -> None:
        self.account = account
        self.ledger = ledger
        self.store = store
        self.deliverer = deliverer
        self.policy = policy
        self.observer = observer or LogObserver()
        self.stopping = stopping or asyncio.Event()
        self.clock = clock
        self.transcript = transcript
        self._connect = connect
        self.stats = CycleStats()
        # Delivered messages whose ledger row is queued (record_delivered_soon): (message
        # number to DELE once the row is committed, or None with leave_on_server; ticket).
        self._unsettled: list[tuple[int | None, int]] = []
        self.breaker = Breaker()
        # Refused at MAIL or RCPT and left upstream undecided (Breaker, Evidence.NO_PROBE):
        # (message number, the refusal), to be decided again once a message gets through.
        self._held: list[tuple[int, DeliveryError]] = []
        self._deles: list[int] = []  # the message numbers DELEd in this session
        self._sizes: dict[int, int] = {}  # LIST: message number -> octets
        self._content_out = False  # the message in hand went (or is going) to SMTP
        self._no_top = False  # the server answered TOP with a bare -ERR: it has none

    async def run(self) -> CycleStats:
        """Run the cycle; raises the error that ended it (already classified by the caller).

        Past ``cycle_timeout`` the cycle is cancelled wherever it is (inside a RETR a hostile
        server drags out, or anywhere else) and fails with Pop3TimeoutError: the connections
        are dropped without QUIT, so the server deletes nothing (RFC 1939 §6); the ledger
        rows committed so far stand, and the next cycle DELEs those messages as known ones.
        """
        limit = self.account.cycle_timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await self._run()
        except TimeoutError:
            if not deadline.expired():
                raise  # a timeout of its own (a Pop3TimeoutError), already about its phase
            raise Pop3TimeoutError(
                f"the cycle took longer than cycle_timeout ({limit:g}s); "
                "connection dropped without QUIT"
            ) from None

    async def _run(self) -> CycleStats:
        acct = self.account
        pop = await self._connect(
            acct.endpoint,
            acct.timeouts,
            max_message_size=self._fetch_limit(),
            transcript=self.transcript,
        )
        async with pop:
            await pop.login(acct.username, acct.password, acct.auth)
            count, octets = await pop.stat()
            self.stats.mailbox_messages, self.stats.mailbox_bytes = count, octets
            self.stats.mailbox_known = True
            sizes = dict(await pop.list()) if count else {}
            listing = await uid_listing(pop, count, sizes) if count else []
            now = self.clock()
            known = await self.ledger.sync_listing(
                acct.name,
                [uid for _, uid in listing],
                recipients_before=now - self._recipients_kept(),
            )
            self._sizes = sizes
            stopped: CycleStopped | None = None
            try:
                await self._process(pop, listing, known, sizes)
            except CycleStopped as exc:
                stopped = exc
            failure = self._held_failure() if stopped is None and self._held else None
            if failure is not None:
                stopped = CycleStopped(failure)
            try:
                await self._settle(pop)  # the DELEs of the last delivered messages
            except CycleStopped as exc:
                stopped = stopped or exc
            # QUIT even after a stop: every DELE sent so far follows a committed ledger row.
            await pop.quit()
            self.stats.deleted = len(self._deles)
            self.stats.deleted_bytes = sum(sizes.get(n, 0) for n in self._deles)
        if stopped is not None:
            raise stopped.cause
        return self.stats

    async def _process(
        self,
        pop: Pop3Client,
        listing: list[tuple[int, str]],
        known: dict[str, LedgerEntry],
        sizes: dict[int, int],
    ) -> None:
        acct = self.account
        now = self.clock()
        todo: list[tuple[int, str]] = []
        oversize: set[int] = set()  # to be dead-lettered unsent (stage "size")
        for number, uid in listing:
            entry = known.get(uid)
            if entry is not None and entry.state is not MessageState.DEFERRED:
                # PRODUCT §5.1: done before; only DELE, never SMTP again.  Decided before the
                # size check: a finished message is never fetched, whatever its size.
                if not self._dele_due(entry, now):
                    self.stats.kept += 1  # leave_on_server: no command, no log line
                    continue
                if await self._same_message(pop, number, uid, entry):
                    await self._dele(pop, number)
                    # Kept until delete_after passed, or left behind by a crash: two different
                    # things for whoever reads the metrics.
                    done = Outcome.REMOVED if acct.leave_on_server else Outcome.SKIPPED
                    self.stats.count(done)
                    self.observer.message(acct.name, uid, entry.size, done, entry.last_response)
                    continue
                # PRODUCT §5.6: another message under a UIDL we know (a server that restarted
                # its numbering): new mail, delivered like any other.
                log.warning(
                    "account=%s uidl=%s: listed under a UIDL the ledger knows, but not the "
                    "message %s then; handled as a new message",
                    acct.name,
                    uid,
                    entry.state.value.replace("_", "-"),
                )
                try:
                    await self.ledger.forget(acct.name, [uid])
                except LedgerError as exc:
                    raise CycleStopped(exc) from exc
                del known[uid]
            size = sizes.get(number, 0)
            if size > acct.max_message_size:
                if size > self._fetch_limit():
                    # Fetching it would exceed our cap and fail every cycle at this message,
                    # so the mail behind it would never come.  Leave it upstream and say so.
                    log.warning(
                        "account=%s uidl=%s size=%d exceeds max_message_size (%d octets): "
                        "left upstream",
                        acct.name,
                        uid,
                        size,
                        acct.max_message_size,
                    )
                    self.stats.oversize_left.append((uid, size))
                    continue
                oversize.add(number)
            todo.append((number, uid))
        if self.stats.kept:
            log.debug("account=%s: %d finished messages left upstream", acct.name, self.stats.kept)
        if not todo:
            return
        # Before the first SMTP transaction: a ledger that cannot commit (a full or read-only
        # disk, a lock held elsewhere) would see each message delivered again every cycle, its
        # row failing after the 250.  One tiny transaction, only in a cycle with work.
        await self._commit(self.ledger.prove_writable(now))
        uids = dict(todo)
        # Only a cycle with something to deliver reads (and may change) the breaker's memory.
        remembered = await self.ledger.breaker(acct.name)
        self.breaker = Breaker(remembered)
        try:
            try:
                await self._deliver_all(pop, [n for n, _ in todo], uids, known, sizes, oversize)
                if self._held and self.breaker.passed and not self.stopping.is_set():
                    await self._revisit(pop, uids, known, sizes)
            finally:
                await self.deliverer.close()
        finally:
            if self.breaker.tripped != remembered:
                await self._commit(self.ledger.set_breaker(acct.name, self.breaker.tripped))

    async def _deliver_all(
        self,
        pop: Pop3Client,
        numbers: list[int],
        uids: dict[int, str],
        known: dict[str, LedgerEntry],
        sizes: dict[int, int],
        oversize: set[int] | None = None,
    ) -> None:
        """RETR and handle ``numbers`` in order, until done or ``stopping``."""
        async for item in pop.retrieve_many(numbers, sizes=sizes):
            number, raw = item.number, item.raw
            if self.stopping.is_set():
                # Stop between messages, never inside one (STYLE §4); this one waits.
                self.stats.stopped_early = True
                break
            outcome = await self._isolated(
                pop, number, uids[number], raw, known.get(uids[number]), item.wire, oversize
            )
            del raw, item  # drop this message before the next is read: two copies at most
            if outcome is not None:  # None: held upstream, undecided (Breaker)
                self.stats.count(outcome)

    async def _revisit(
        self,
        pop: Pop3Client,
        uids: dict[int, str],
        known: dict[str, LedgerEntry],
        sizes: dict[int, int],
    ) -> None:
        """Decide the held messages again, now that a message got past MAIL and RCPT in this
        session: the session's own evidence (docs/design.md §6.2) now speaks for or against each.

        They are fetched again (RETR is repeatable until QUIT, RFC 1939 §5); a message the
        server takes now is delivered.  One more pass at most: what is still held stays
        upstream and fails the cycle.
        """
        held, self._held = self._held, []
        log.info(
            "account=%s: a message got through; deciding the %d held message(s) again",
            self.account.name,
            len(held),
        )
        await self._deliver_all(pop, [n for n, _ in held], uids, known, sizes)

    def _held_failure(self) -> DeliveryError | None:
        """Why the cycle fails with mail held upstream: the breaker, or the first refusal
        there was nothing to test with (a null sender, no other sender accepted yet).  None
        when a message got through but a shutdown came before the held mail was decided
        again: it simply waits for the next cycle."""
        last = self._held[-1][1]
        if self.breaker.tripped is not None:
            return RefusedAlikeError(last, len(self._held))
        if self.stopping.is_set():
            return None  # a message got through, but the shutdown came before _revisit
        undecided = [exc for _, exc in self._held if exc.evidence is Evidence.NO_PROBE]
        return undecided[0] if undecided else RefusedAlikeError(last, len(self._held))

    def _hold(self, number: int, uid: str, exc: DeliveryError, why: str) -> None:
        """Leave a refused message upstream undecided (no ledger row, no dead letter)."""
        self._held.append((number, exc))
        log.warning("account=%s uidl=%s held upstream (%s): %s", self.account.name, uid, why, exc)

    async def _same_message(
        self, pop: Pop3Client, number: int, uid: str, entry: LedgerEntry
    ) -> bool:
        """Whether the message listed as ``number`` is the one ``entry`` recorded, checked
        cheaply before it is DELEd unread (PRODUCT §5.6): the size LIST gave, then, only when
        that matches, a digest of its header block from ``TOP n 0`` (RFC 1939 §7).

        Runs only for a finished message being DELEd now (after a crash before QUIT, or when
        ``delete_after`` has passed), never for the kept messages of a ``leave_on_server``
        mailbox, so a steady cycle costs what it did.  A row from before identities were
        recorded, and a server without UIDL (whose identifiers are such digests already), are
        taken as they are.  A server without TOP (a bare ``-ERR``; TOP is optional) gets a
        RETR instead: the whole message, once, for the rare DELE that needs the check.
        """
        identity = entry.identity
        if identity is None or uid.startswith("sha256:"):
            return True
        listed = self._sizes.get(number)
        if identity.size is not None and listed is not None and listed != identity.size:
            return False  # a size LIST did not give now tells nothing: the digest decides
        if not self._no_top:
            try:
                return headers.header_digest(await pop.top(number, 0)) == identity.digest
            except Pop3ResponseError as exc:
                if exc.resp_code is not None:
                    raise  # [SYS/TEMP] and the like: the cycle fails, nothing is guessed
                self._no_top = True
                log.info("account=%s: the server has no TOP; checking by RETR", self.account.name)
        return headers.header_digest(await pop.retr(number)) == identity.digest

    def _identity(self, number: int, raw: bytes) -> Identity:
        """What the ledger keeps to recognise this message later (PRODUCT §5.6)."""
        return Identity(self._sizes.get(number), headers.header_digest(raw))

    async def _isolated(
        self,
        pop: Pop3Client,
        number: int,
        uid: str,
        raw: bytes,
        entry: LedgerEntry | None,
        wire: bytes | None,
        oversize: set[int] | None,
    ) -> Outcome | None:
        """Handle one message; an unexpected error is this message's alone (PRODUCT §5).

        Our own errors go on as they were: ``CycleStopped`` (the ledger, the store, our SMTP
        setup) and every ``ConnectorError`` (a POP3 server's fault ends the cycle).  Anything
        else (a parser's bug, an input nobody foresaw) leaves the message upstream, counted in
        the ledger, and the cycle goes on with the next one; see :meth:`_failed`.
        """
        self._content_out = False
        try:
            if entry is not None and entry.errors >= ERROR_LIMIT:
                # Failed in ERROR_LIMIT cycles, and dead-lettering it failed too last time.
                return await self._give_up(pop, number, uid, raw, entry.last_response)
            if oversize and number in oversize:
                return await self._too_large(pop, number, uid, raw)
            return await self._handle(pop, number, uid, raw, entry, wire)
        except (CycleStopped, ConnectorError):
            raise
        except Exception as exc:  # noqa: BLE001 - isolated by design (PRODUCT §5)
            return await self._failed(pop, number, uid, raw, exc)

    async def _failed(
        self, pop: Pop3Client, number: int, uid: str, raw: bytes, exc: Exception
    ) -> Outcome:
        """Handling the message raised ``exc``, which nothing expected.

        Logged once, with its traceback; the ledger counts it; the message stays upstream
        (deferred: offered again next cycle).  In its ERROR_LIMIT-th such cycle it is
        dead-lettered with stage ``error`` and the error's one-line summary as the response.
        If its content had gone to SMTP by then, the server may have it: the next attempt may
        duplicate it (at most ERROR_LIMIT copies), which beats a process that stops, or an
        account that stops at this message.
        """
        acct = self.account
        summary = error_summary(exc)
        log.error(
            "account=%s uidl=%s size=%d: handling the message failed unexpectedly%s; "
            "it stays upstream (%s)",
            acct.name,
            uid,
            len(raw),
            " after its content went to SMTP (the server may have it)" if self._content_out else "",
            summary,
            exc_info=exc,
        )
        try:
            entry = await self.ledger.record_failed(
                acct.name,
                uid,
                len(raw),
                f"error: {summary}",
                self.clock(),
                identity=self._identity(number, raw),
            )
        except LedgerError as lexc:
            raise CycleStopped(lexc) from lexc
        if entry.state is not MessageState.DEFERRED:
            # Recorded as finished before the failure (after SMTP took it): nothing to redo.
            return (
                Outcome.DELIVERED
                if entry.state is MessageState.DELIVERED
                else (Outcome.DEAD_LETTERED)
            )
        if entry.errors >= ERROR_LIMIT:
            return await self._give_up(pop, number, uid, raw, entry.last_response)
        self.observer.message(acct.name, uid, len(raw), Outcome.DEFERRED, f"error: {summary}")
        return Outcome.DEFERRED

    async def _give_up(
        self, pop: Pop3Client, number: int, uid: str, raw: bytes, response: str
    ) -> Outcome:
        """Dead-letter a message whose handling failed in ERROR_LIMIT cycles (stage ``error``).

        If even that fails unexpectedly, it is logged and the message stays upstream; the
        next cycle tries the dead letter again, never the handling.
        """
        summary = response.removeprefix("error: ")
        try:
            await self._dead_letter(pop, number, uid, raw, "error", summary)
        except (CycleStopped, ConnectorError):
            raise
        except Exception as exc:  # isolated by design (PRODUCT §5)
            log.error(
                "account=%s uidl=%s: dead-lettering the message failed unexpectedly; "
                "it stays upstream (%s)",
                self.account.name,
                uid,
                error_summary(exc),
                exc_info=exc,
            )
            return Outcome.DEFERRED
        return Outcome.DEAD_LETTERED

    def _fetch_limit(self) -> int:
        """The most octets one message may have to be fetched (the POP3 client's cap)."""
        acct = self.account
        if acct.oversize is Oversize.LEAVE:
            return acct.max_message_size
        return max(acct.max_message_size, FETCH_CEILING)

    async def _too_large(self, pop: Pop3Client, number: int, uid: str, raw: bytes) -> Outcome:
        """Over ``max_message_size``: dead-lettered without an SMTP attempt (PRODUCT §7 "size").

        The code is the one a server gives for it (RFC 1870 §6.1: 552, RFC 3463 5.3.4).
        """
        acct = self.account
        response = (
            f"552 5.3.4 message of {len(raw)} octets exceeds max_message_size of "
            f"{acct.max_message_size}; not sent"
        )
        envelope: Envelope | None = None
        if acct.shared is not None:
            # Named in the dead letter, so that a requeue goes to them, not to the fallback.
            recipients = route(raw, acct.shared, acct.deliver_to).recipients
            envelope = Envelope("", recipients, sender_fixed=True, recipients_fixed=False)
        await self._dead_letter(pop, number, uid, raw, "size", response, envelope)
        return Outcome.DEAD_LETTERED

    def _recipients_kept(self) -> float:
        """How long a shared mailbox's ``mid:`` rows are remembered: its duplicate window.
        (The ``uidl:`` rows, who got a message some recipients deferred, stay as long as the
        message's own ledger row: ledger.sync_listing.)"""
        acct = self.account
        return acct.shared.duplicate_window if acct.shared is not None else 0.0

    def _dele_due(self, entry: LedgerEntry, now: float) -> bool:
        """Whether a finished message is to be DELEd now: always, unless leave_on_server
        keeps it and delete_after (counted from when it was finished) has not yet passed."""
        acct = self.account
        if not acct.leave_on_server:
            return True
        return acct.delete_after is not None and now - entry.last_attempt >= acct.delete_after

    async def _finished(self, pop: Pop3Client, number: int) -> None:
        """DELE a message just recorded as finished, unless leave_on_server keeps it."""
        if not self.account.leave_on_server:
            await self._dele(pop, number)

    async def _dele(self, pop: Pop3Client, number: int) -> None:
        """DELE ``number``, remembered for what the cycle leaves upstream (``left_upstream``)."""
        await pop.dele(number)
        self._deles.append(number)

    async def _handle(
        self,
        pop: Pop3Client,
        number: int,
        uid: str,
        raw: bytes,
        entry: LedgerEntry | None,
        wire: bytes | None = None,
    ) -> Outcome | None:
        """Deliver one message.  ``wire``: ``raw`` still dot-stuffed as POP3 sent it, when it
        is SMTP's DATA content as it is (RFC 1939 §3, RFC 5321 §4.5.2): forwarded unscanned.
        None: refused at MAIL or RCPT and held upstream, undecided (:class:`Breaker`)."""
        acct, policy = self.account, self.policy
        sender, sender_fixed = envelope_sender(raw, policy.sender_policy, policy.fixed_sender)
        keys: tuple[str, ...] = (f"uidl:{uid}",)
        mid_key: str | None = None
        if acct.shared is not None:
            routing = route(raw, acct.shared, acct.deliver_to)
            recipients, configured = routing.recipients, routing.configured
            if routing.unread:
                # A hostile or broken header: routed on what could be read (the fallback when
                # that names nobody of ours); the administrator should know why.
                log.warning(
                    "account=%s uidl=%s: %s could not be read whole; routed by %s to %s",
                    acct.name,
                    uid,
                    ", ".join(routing.unread),
                    routing.source,
                    ", ".join(recipients),
                )
            log.debug(
                "account=%s uidl=%s routed by %s %s to %s",
                acct.name,
                uid,
                routing.source,
                ", ".join(routing.found),
                ", ".join(recipients),
            )
            mid = message_id(raw) if acct.shared.duplicate_window > 0 else None
            if mid is not None:
                # Keys of the "mid:<Message-ID>" form, from before the body digest, match no
                # more: a copy whose sibling came just before an upgrade is delivered again,
                # once; those rows age out with the duplicate window.
                mid_key = duplicate_key(mid, raw)
                keys += (mid_key,)
        else:
            recipients, configured = acct.deliver_to, frozenset()
        done: frozenset[str] = frozenset()
        if acct.shared is not None or (entry is not None and len(recipients) > 1):
            # Who has it already: a provider's copy of the same message for another recipient
            # (shared mailbox), or a retry after only some recipients deferred it.  With a
            # Message-ID, also whether it came before with another body (the same prefix).
            prefix = mid_key[: mid_key.rindex(":") + 1] if mid_key is not None else ""
            try:
                found = await self.ledger.recipients_by_key(acct.name, keys, prefix=prefix)
            except LedgerError as exc:
                raise CycleStopped(exc) from exc
            done = frozenset(r for key in keys for r in found.get(key, ()))
            if any(key not in keys for key in found):
                # Only the prefix matched: the same Message-ID with another body.
                log.info(
                    "account=%s uidl=%s Message-ID %s came before with a different body: "
                    "not a copy, delivered as a message of its own",
                    acct.name,
                    uid,
                    prefix.removeprefix("mid:").removesuffix(":"),
                )
        todo = tuple(r for r in recipients if r.lower() not in done)
        if not todo:
            return await self._duplicate(pop, number, uid, raw, recipients)
        envelope = Envelope(
            sender,
            todo,
            sender_fixed=sender_fixed,
            recipients_fixed=acct.shared is None,
            configured=configured,
        )
        trace = trace_header(
            raw,
            pop_host=acct.endpoint.host,
            by_host=policy.helo_name,
            uidl=uid,
            recipients=todo,
            now=datetime.fromtimestamp(self.clock(), UTC),
        )
        try:
            # The trace line travels beside the message, never joined to it (no copy).
            delivered = await self.deliverer.deliver(
                raw, envelope, trace=trace, wire=wire, before_content=lambda: self._sending(pop)
            )
        except DeliveryError as exc:
            return await self._refused(pop, number, uid, raw, exc, envelope, keys)
        self.stats.delivered_bytes += len(trace) + len(raw)
        self.breaker.through()
        if delivered.refused:
            return await self._partly(pop, number, uid, raw, entry, delivered, envelope, keys)

        # The duplicate window of PRODUCT §5: Exchange has the message, the ledger does not yet.
        # The row goes to the ledger thread's next group commit, which starts at once and
        # which no cancellation can stop half-way (STYLE §4); the DELE waits for it (_settle).
        try:
            ticket = self.ledger.record_delivered_soon(
                acct.name,
                uid,
                len(raw),
                delivered.response,
                self.clock(),
                done=RecipientsDone(keys, todo) if acct.shared is not None else None,
                identity=self._identity(number, raw),
            )
        except LedgerError as exc:
            raise CycleStopped(exc) from exc
        self._unsettled.append((None if acct.leave_on_server else number, ticket))
        self.observer.message(acct.name, uid, len(raw), Outcome.DELIVERED, delivered.response)
        if len(self._unsettled) >= SETTLE_EVERY:
            await self._settle(pop)
        return Outcome.DELIVERED

    async def _sending(self, pop: Pop3Client) -> None:
        """The ``before_content`` hook: :meth:`_committed`, then mark that this message's
        content goes to SMTP now (for :meth:`_failed`'s log line)."""
        await self._committed(pop)
        self._content_out = True

    async def _committed(self, pop: Pop3Client) -> None:
        """Before a message's content goes to SMTP: the earlier messages' rows are committed.

        So a crash can duplicate at most the one message Exchange took last (invariant 2: the
        window stays one message wide), and a failed commit stops the cycle before another
        message is delivered (raised as CycleStopped; the transaction is abandoned unsent).
        With several accounts busy, the ledger thread has mostly not committed by then (it
        needs the GIL, which the busy loop rarely lets go of; 83 % of the messages waited in
        the benchmark): the wait costs ~10 % of a message's CPU, the price of that window.
        """
        unsettled = self._unsettled
        if unsettled and (
            self.ledger.settled < unsettled[-1][1]
            or self.ledger.failed(ticket for _, ticket in unsettled)
        ):
            await self._settle(pop)

    async def _settle(self, pop: Pop3Client) -> None:
        """DELE the delivered messages whose ``delivered`` rows are committed by now
        (invariant 1); a row that failed to commit stops the cycle and its message stays."""
        pending, self._unsettled = self._unsettled, []
        if not pending:
            return
        errors = await self.ledger.settle([ticket for _, ticket in pending])
        failed: LedgerError | None = None
        for (number, _), error in zip(pending, errors, strict=True):
            if error is not None:
                failed = failed or error
            elif number is not None:
                await self._dele(pop, number)
        if failed is not None:
            raise CycleStopped(failed)

    async def _commit(self, write: Awaitable[object]) -> None:
        """Await a ledger write, shielded; a failure ends the cycle before the next RETR."""
        try:
            await asyncio.shield(write)
        except LedgerError as exc:
            raise CycleStopped(exc) from exc

    async def _duplicate(
        self, pop: Pop3Client, number: int, uid: str, raw: bytes, recipients: Sequence[str]
    ) -> Outcome:
        """Every recipient has this message already: record it as done without SMTP."""
        acct = self.account
        response = f"duplicate: already delivered to {', '.join(recipients)}"
        await self._commit(
            self.ledger.record_delivered(
                acct.name,
                uid,
                len(raw),
                response,
                self.clock(),
                identity=self._identity(number, raw),
            )
        )
        await self._finished(pop, number)
        self.observer.message(acct.name, uid, len(raw), Outcome.SKIPPED, response)
        return Outcome.SKIPPED

    async def _partly(
        self,
        pop: Pop3Client,
        number: int,
        uid: str,
        raw: bytes,
        entry: LedgerEntry | None,
        delivered: Delivered,
        envelope: Envelope,
        keys: tuple[str, ...],
    ) -> Outcome:
        """Accepted for some recipients and refused for others (RFC 5321 §3.3: the server has
        the message; sending it again would duplicate it for those who have it).

        Refused permanently (PRODUCT §6: about this message, since a configured recipient
        refused permanently stops the cycle before DATA): a copy naming them goes to the
        dead-letter store.  Refused temporarily: the message stays upstream, deferred, and the
        recipients done so far are recorded under its UIDL, so a retry goes to the others
        only; once deferred longer than ``max_deferral`` they get a dead-letter copy too.
        """
        acct = self.account
        now = self.clock()
        identity = self._identity(number, raw)
        refused = delivered.refused
        temporary = {r: why for r, why in refused.items() if r not in delivered.permanent}
        first_seen = entry.first_seen if entry is not None else now
        expired = bool(temporary) and now - first_seen >= acct.max_deferral
        copy_for = {r: why for r, why in refused.items() if expired or r not in temporary}
        accepted = tuple(r for r in envelope.recipients if r not in refused)
        summary = "; ".join(f"<{r}> {why}" for r, why in refused.items())
        response = f"{delivered.response} (refused: {summary})"
        dl_id: str | None = None
        if copy_for:
            stage = "rcpt" if any(r in delivered.permanent for r in copy_for) else "expired"
            try:
                dl_id = await asyncio.shield(
                    self.store.put(
                        raw,
                        self._info(
                            uid,
                            stage,
                            "; ".join(f"<{r}> {why}" for r, why in copy_for.items()),
                            self._named(tuple(copy_for)),
                        ),
                    )
                )
            except DeadLetterError as exc:
                # No copy: remember who has it, and keep it upstream for the others.
                await self._commit(
                    self.ledger.record_deferred(
                        acct.name,
                        uid,
                        len(raw),
                        response,
                        now,
                        done=RecipientsDone(keys, accepted),
                        identity=identity,
                    )
                )
                raise CycleStopped(exc) from exc
            self.stats.count(Outcome.DEAD_LETTERED)
            self.observer.message(
                acct.name, uid, len(raw), Outcome.DEAD_LETTERED, f"{stage}: {summary}"
            )
        done = RecipientsDone(keys, (*accepted, *copy_for))
        if temporary and not expired:
            await self._commit(
                self.ledger.record_deferred(
                    acct.name,
                    uid,
                    len(raw),
                    response,
                    now,
                    dead_letter_id=dl_id,
                    done=done,
                    identity=identity,
                )
            )
            self.observer.message(acct.name, uid, len(raw), Outcome.DEFERRED, response)
            return Outcome.DEFERRED
        await self._commit(
            self.ledger.record_delivered(
                acct.name,
                uid,
                len(raw),
                response,
                now,
                dead_letter_id=dl_id,
                done=done,
                identity=identity,
            )
        )
        await self._finished(pop, number)
        self.observer.message(acct.name, uid, len(raw), Outcome.DELIVERED, response)
        return Outcome.DELIVERED

    def _named(self, recipients: tuple[str, ...]) -> tuple[str, ...]:
        """The recipients a dead letter names (its X-POP3-Connector-Recipients line), so that
        ``dead-letters requeue`` sends it to them and to nobody else.

        A shared mailbox's are always named: they were read from the message, and without
        them requeue would go to the fallback.  Otherwise they are named whenever they are not
        the account's whole ``deliver_to``: the others got the message (a retry after some
        recipients deferred it), and a requeue to all of ``deliver_to`` would duplicate it.
        """
        acct = self.account
        if acct.shared is None and {r.lower() for r in recipients} == {
            r.lower() for r in acct.deliver_to
        }:
            return ()
        return recipients

    def _info(
        self, uid: str, stage: str, response: str, recipients: tuple[str, ...] = ()
    ) -> DeadLetterInfo:
        return DeadLetterInfo(
            account=self.account.name,
            uidl=uid,
            stage=stage,
            response=response,
            failed_at=datetime.fromtimestamp(self.clock(), UTC),
            recipients=recipients,
        )

    async def _refused(
        self,
        pop: Pop3Client,
        number: int,
        uid: str,
        raw: bytes,
        exc: DeliveryError,
        envelope: Envelope,
        keys: tuple[str, ...],
    ) -> Outcome | None:
        acct = self.account
        disposition = classify(exc)
        if exc.stage is SmtpStage.DATA:
            self.breaker.through()  # it got past MAIL and RCPT: those stages work
        if disposition is Disposition.PARK_ACCOUNT and exc.evidence is Evidence.NO_PROBE:
            # A null sender refused, and nothing accepted yet to test another sender with:
            # undecided, not (yet) our setup.  A later message may show either
            # (docs/design.md §6.2).
            self._hold(number, uid, exc, "nothing to test the refusal with yet")
            return None
        if exc.stage.is_setup or disposition is Disposition.PARK_ACCOUNT:
            # PRODUCT §6: our own setup is wrong; every message would fare the same.
            raise CycleStopped(exc) from exc
        if disposition is Disposition.DEAD_LETTER and self.breaker.holds(exc):
            self._hold(number, uid, exc, "every message refused alike so far")
            return None
        response = exc.response
        if exc.refused and acct.shared is not None:
            # Every recipient refused: name each, for the dead letter and the log line.
            response = "; ".join(f"<{r}> {why}" for r, why in exc.refused.items())
        match disposition:
            case Disposition.DEAD_LETTER:
                await self._dead_letter(
                    pop, number, uid, raw, str(exc.stage), response, envelope, keys
                )
                return Outcome.DEAD_LETTERED
            case Disposition.RETRY:
                now = self.clock()
                entry = await self._deferred(number, uid, raw, response, now)
                if now - entry.first_seen >= acct.max_deferral:
                    # PRODUCT §5.5: refused only temporarily for longer than max_deferral.
                    await self._dead_letter(
                        pop, number, uid, raw, "expired", response, envelope, keys
                    )
                    return Outcome.DEAD_LETTERED
                self.observer.message(acct.name, uid, len(raw), Outcome.DEFERRED, response)
                return Outcome.DEFERRED
            case Disposition.BUG | Disposition.PARK_ACCOUNT:
                raise exc

    async def _deferred(
        self, number: int, uid: str, raw: bytes, response: str, now: float
    ) -> LedgerEntry:
        try:
            return await self.ledger.record_deferred(
                self.account.name,
                uid,
                len(raw),
                response,
                now,
                identity=self._identity(number, raw),
            )
        except LedgerError as exc:
            raise CycleStopped(exc) from exc

    async def _dead_letter(
        self,
        pop: Pop3Client,
        number: int,
        uid: str,
        raw: bytes,
        stage: str,
        response: str,
        envelope: Envelope | None = None,
        keys: tuple[str, ...] = (),
    ) -> None:
        acct = self.account
        # Named when they are not simply the account's deliver_to (see _named): a shared
        # mailbox's recipients (the copies of the message are then suppressed too), or those
        # still owed a message that others got on an earlier attempt.
        recipients = self._named(envelope.recipients) if envelope is not None else ()

        async def store_and_record() -> None:
            dl_id = await self.store.put(raw, self._info(uid, stage, response, recipients))
            try:
                await self.ledger.record_dead_lettered(
                    acct.name,
                    uid,
                    len(raw),
                    response,
                    self.clock(),
                    dead_letter_id=dl_id,
                    done=RecipientsDone(keys, recipients) if recipients else None,
                    identity=self._identity(number, raw),
                )
            except LedgerError:
                # Not recorded: the message stays upstream and the next cycle stores it again,
                # so this copy goes, or a requeue of both would deliver it twice.
                await self._discard(uid, dl_id)
                raise

        try:
            # Shielded as one: a shutdown must not leave a stored dead letter unrecorded, nor
            # cut the removal of one whose commit failed.
            await asyncio.shield(store_and_record())
        except (DeadLetterError, LedgerError) as exc:
            # Not stored durably, or not recorded: no DELE; the message stays upstream.
            raise CycleStopped(exc) from exc
        await self._finished(pop, number)
        self.observer.message(
            acct.name, uid, len(raw), Outcome.DEAD_LETTERED, f"{stage}: {response}"
        )

    async def _discard(self, uid: str, dl_id: str) -> None:
        """Remove the dead letter ``dl_id``, stored for ``uid`` but whose row failed to commit.

        Only when the ledger shows no row naming it: a commit reported failed yet durable
        would otherwise leave a recorded dead letter without its file, and the message would
        be DELEd next cycle.  If the ledger cannot be read or the store refuses, the file
        stays: a twin at worst, which the store's reconciliation matches to the next copy
        (``deadletter.reconcile``), never a loss.
        """
        acct = self.account
        try:
            entry = await self.ledger.entry(acct.name, uid)
        except LedgerError as exc:
            log.warning(
                "account=%s uidl=%s dead letter %s kept: cannot read the ledger: %s",
                acct.name,
                uid,
                dl_id,
                exc,
            )
            return
        if entry is not None and entry.dead_letter_id == dl_id:
            return
        try:
            await self.store.remove(dl_id)
        except (DeadLetterError, KeyError) as exc:
            log.warning(
                "account=%s uidl=%s dead letter %s not recorded and not removed: %s",
                acct.name,
                uid,
                dl_id,
                exc,
            )
            return
        log.info(
            "account=%s uidl=%s dead letter %s removed: its ledger row was not committed",
            acct.name,
            uid,
            dl_id,
        )
