"""One POP3 session of one account: list, diff with the ledger, fetch, deliver, record, DELE, QUIT.

The policy layer of docs/design.md §5.  :class:`Cycle` owns the order of operations that makes
the connector crash-safe; the modules below it (pop3, delivery, ledger, deadletter) only do what
they are told, through the Protocols declared here (:class:`Ledger`, :class:`Pop3Session`,
:class:`Deliverer`, :class:`CycleObserver`), so that a cycle runs on fakes as well.

Theory of operation
-------------------

A cycle logs in, reads STAT, LIST and UIDL, and the ledger's rows for the listed UIDLs
(:meth:`Cycle._run`).  It sorts the listing (:meth:`Cycle._sort`): a message the ledger knows as
finished is only DELEd (after a cheap check that it is the same message:
:meth:`Identities.same <connector.cycle.identity.Identities.same>`), or passed over without a
command while ``leave_on_server`` keeps it; a message over its size limit is left upstream or
dead-lettered unsent; the rest is fetched, oldest first, and each message takes one path
(:meth:`Cycle._handle`), whose every outcome ends in the same tail, :meth:`Cycle._conclude`::

    outcome          what records it (the tail awaits it)        then, upstream
    delivered        "delivered" row, group-committed (§8.5)      DELE once that row is committed
    partly           copy for the refused (store), the row        DELE; or stays, deferred
    skipped          "delivered" row (every recipient has it)     DELE
    dead-lettered    store (fsynced), then "dead_lettered" row    DELE
    deferred         "deferred" row (attempts, first seen)        stays; dead-lettered past
                                                                  max_deferral
    failed           the failure counted in its row               stays; dead-lettered (stage
                                                                  "error") after ERROR_LIMIT
    held (breaker)   nothing                                      stays, decided again this
                                                                  session or the next

The tail's DELE is skipped while ``leave_on_server`` keeps the message (a known message whose
``delete_after`` has passed is DELEd by :meth:`Cycle._sort`, counted as ``removed``).  Then QUIT:
the server carries out the DELEs (RFC 1939 §6).

Crash anywhere: a DELE without QUIT deletes nothing, and every DELE follows a ledger commit
(docs/design.md §5.2, invariant 1), so the next cycle sees each message again and the ledger
says what was done.  The only duplicate window is between SMTP's 250 and the commit of the
``delivered`` row (docs/design.md §9); the earlier rows are committed before the next message's
content goes out (:meth:`Cycle._before_content`), so it is one message wide.  Before the first
SMTP transaction the ledger proves it can commit, so a full or read-only disk stops deliveries
instead of repeating them each cycle.

What ends a cycle early: a failure of our own setup (SMTP connect, TLS, AUTH; a 5xx to a fixed
sender or recipient), of the dead-letter store or of the ledger raises :class:`CycleStopped`
before the next RETR (a failed group commit: before the next message's content goes to SMTP);
the QUIT still goes out, so the DELEs of the messages already finished take effect.  Any other
``ConnectorError`` (the POP3 server's fault) ends the cycle without QUIT.  An unexpected error
while handling one message is that message's alone (docs/design.md §5.2, invariant 7): it stays
upstream and the cycle goes on.

Cancellation: every ledger write runs to its commit once started (the ``Ledger`` Protocol); the
cycle shields only what must finish as a pair, a dead letter and its row (docs/design.md §10.3).

Memory (docs/design.md §5.3, §10.6): a message above the spool threshold is streamed by RETR into
a spool file and handled from there (:class:`~connector.spool.Spooled` stands in for its bytes:
its head for the header readers, its file for DATA and the dead letter); every RETR is charged
to the memory budget shared by all accounts.  The spool file goes once the message is handled.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import enum
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, NamedTuple, Protocol, Self, TypeVar

from connector.budget import MemoryBudget
from connector.cycle.commit import GroupCommit, Tickets
from connector.cycle.identity import (
    Identities,
    Reader,
    Renumbering,
    carry_over,
    duplicate_key,
    uid_listing,
)
from connector.cycle.refusal import Breaker, Verdict, refusal_summary, verdict
from connector.cycle.trace import trace_header
from connector.cycle.values import AccountSpec, CycleStats, DeliveryPolicy, Outcome, Oversize
from connector.deadletter import DeadLetterInfo, DeadLetterStore
from connector.errors import (
    ConnectorError,
    DeadLetterError,
    DeliveryError,
    Evidence,
    LedgerError,
    Pop3TimeoutError,
    RefusedAlikeError,
    SmtpStage,
)
from connector.ledger import Identity, LedgerEntry, MessageState, RecipientsDone
from connector.pop3 import AuthMethod, Pop3Client, Retrieved
from connector.pop3.client import Spooling, TokenSource
from connector.recipients import message_id, route
from connector.smtp import Delivered, Envelope, envelope_sender
from connector.spool import Spool, Spooled, head_of, size_of

log = logging.getLogger(__name__)

T = TypeVar("T")

ERROR_LIMIT: Final = 3
"""Cycles in which handling a message may fail unexpectedly before it is dead-lettered with
stage ``error`` (docs/design.md §5.2, invariant 7)."""

FETCH_CEILING: Final = 1024 * 1024 * 1024
"""No message larger than this is read, whatever the policy: it is left upstream and reported.
A large message is spooled to disk while it is handled (docs/design.md §5.3); this bounds what
one message may cost in disk and in time."""


# --------------------------------------------------------------------------------------------
# The seams
# --------------------------------------------------------------------------------------------


class Ledger(Tickets, Protocol):
    """What a cycle asks of the ledger (``connector.ledger.Ledger``; ``tests.fakes.FakeLedger``).

    Each method raises only LedgerError.  Every write runs to its commit once started, even if
    the cycle is cancelled meanwhile (docs/design.md §10.3): the cycle never shields one.
    """

    async def sync_listing(
        self, account: str, listed: Collection[str], *, recipients_before: float | None = None
    ) -> dict[str, LedgerEntry]: ...

    async def forget(self, account: str, uidls: Collection[str]) -> None: ...

    async def entries_outside(
        self, account: str, family: str, current: str
    ) -> builtins.list[LedgerEntry]: ...

    async def rekey(self, account: str, renames: Mapping[str, str]) -> None: ...

    async def prove_writable(self, now: float) -> None: ...

    async def breaker(self, account: str) -> str | None: ...

    async def set_breaker(self, account: str, tripped: str | None) -> None: ...

    async def recipients_by_key(
        self, account: str, keys: Collection[str], *, prefix: str = ""
    ) -> dict[str, frozenset[str]]: ...

    async def entry(self, account: str, uidl: str) -> LedgerEntry | None: ...

    def record_delivered_soon(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        *,
        done: RecipientsDone | None = None,
        identity: Identity | None = None,
    ) -> int: ...

    async def record_delivered(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        *,
        dead_letter_id: str | None = None,
        done: RecipientsDone | None = None,
        identity: Identity | None = None,
    ) -> None: ...

    async def record_dead_lettered(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        dead_letter_id: str | None = None,
        *,
        done: RecipientsDone | None = None,
        identity: Identity | None = None,
    ) -> None: ...

    async def record_deferred(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        *,
        dead_letter_id: str | None = None,
        done: RecipientsDone | None = None,
        identity: Identity | None = None,
    ) -> LedgerEntry: ...

    async def record_failed(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        *,
        identity: Identity | None = None,
    ) -> LedgerEntry: ...


class Pop3Session(Reader, Protocol):
    """The POP3 session a cycle drives (``connector.pop3.Pop3Client``; ``tests.fakes.FakePop3``).

    Connected by the cycle's ``connect``; ``async with`` closes it (without QUIT, if the cycle
    did not get that far).
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def login(
        self, username: str, password: str | TokenSource, method: AuthMethod = AuthMethod.AUTO
    ) -> None: ...

    async def stat(self) -> tuple[int, int]: ...

    async def list(self) -> builtins.list[tuple[int, int]]: ...

    def retrieve_many(
        self,
        numbers: Sequence[int],
        *,
        sizes: Mapping[int, int] | None = None,
        spooling: Spooling | None = None,
        budget: MemoryBudget | None = None,
    ) -> AsyncGenerator[Retrieved, None]: ...

    async def dele(self, number: int) -> None: ...

    async def quit(self) -> str: ...


class Deliverer(Protocol):
    """The part of ``delivery.SmtpDeliverer`` a cycle uses."""

    async def deliver(
        self,
        raw: bytes | Spooled,
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
    """The default observer: one log line per message (docs/design.md §11.3)."""

    def message(self, account: str, uidl: str, size: int, outcome: Outcome, response: str) -> None:
        log.info(
            "account=%s uidl=%s size=%d outcome=%s smtp=%r", account, uidl, size, outcome, response
        )


def _source(account: AccountSpec) -> Callable[..., Awaitable[Pop3Session]]:
    """How a cycle connects to the account's mailbox: POP3, or an IMAP folder
    (``connector.imap.ImapSession``, loaded only for an IMAP account)."""
    if account.imap is None:
        return Pop3Client.connect
    from connector.imap.session import ImapSession

    return ImapSession.opener(account.imap, keep=account.leave_on_server)


# --------------------------------------------------------------------------------------------
# The cycle
# --------------------------------------------------------------------------------------------


class CycleStopped(Exception):
    """Raised inside the loop to end a cycle early but still QUIT; carries the cause."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(str(cause))


class Upstream(enum.Enum):
    """What becomes of a message upstream once its outcome is recorded (:meth:`Cycle._conclude`)."""

    STAYS = enum.auto()  # not finished: offered again next cycle
    FINISHED = enum.auto()  # DELE now, unless leave_on_server keeps it
    COMMITTING = enum.auto()  # finished; its DELE follows its row's group commit (GroupCommit)
    DUE = enum.auto()  # a finished message whose DELE is due now (Cycle._sort decided): DELE


@dataclass(slots=True)
class InHand:
    """The message being handled: its number in this session, UIDL, bytes and ledger row.

    ``raw``: its bytes, or its spool file (docs/design.md §5.3).  ``wire``: the bytes as POP3
    sent them (still dot-stuffed), when that is SMTP's DATA content as it is (RFC 1939 §3,
    RFC 5321 §4.5.2): forwarded unscanned.
    """

    number: int
    uid: str
    raw: bytes | Spooled
    entry: LedgerEntry | None
    wire: bytes | None = None

    @property
    def size(self) -> int:
        return size_of(self.raw)

    @property
    def head(self) -> bytes:
        """What the header readers take (``connector.headers`` reads no further)."""
        return head_of(self.raw)


class Routed(NamedTuple):
    """Who a message goes to, and the keys under which the ledger remembers who has it."""

    recipients: tuple[str, ...]
    configured: frozenset[str]  # of a shared mailbox's recipients, those the config fixes
    keys: tuple[str, ...]  # "uidl:<UIDL>", and a shared mailbox's "mid:..." duplicate key
    mid_key: str | None


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
        connect: Callable[..., Awaitable[Pop3Session]] | None = None,
        spool: Spool | None = None,
        spool_threshold: int = 0,
        budget: MemoryBudget | None = None,
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
        self._connect = connect if connect is not None else _source(account)
        # Messages whose LIST size is above spool_threshold go to the spool (none without
        # one); every RETR is charged to the budget shared by all cycles (none: unbounded).
        self.spool = spool
        self.spool_threshold = spool_threshold
        self.budget = budget
        self.stats = CycleStats()
        self.commits = GroupCommit(ledger)
        self.identities = Identities(account.name)
        self.breaker = Breaker()
        # Refused at MAIL or RCPT and left upstream undecided (Breaker, Evidence.NO_PROBE):
        # (message number, the refusal), to be decided again once a message gets through.
        self._held: list[tuple[int, DeliveryError]] = []
        self._oversize: set[int] = set()  # to be dead-lettered unsent (stage "size")
        self._deles: list[int] = []  # the message numbers DELEd in this session
        self._content_out = False  # the message in hand went (or is going) to SMTP

    # -- the session -----------------------------------------------------------------------

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
            if listing and isinstance(pop, Renumbering):
                # Before the sync, which would forget rows listed under other identifiers.
                await carry_over(self.ledger, acct.name, pop, listing, sizes)
            known = await self.ledger.sync_listing(
                acct.name,
                [uid for _, uid in listing],
                recipients_before=self.clock() - self._recipients_kept(),
            )
            self.identities.sizes = sizes
            stopped: CycleStopped | None = None
            try:
                todo = await self._sort(pop, listing, known, sizes)
                if todo:
                    await self._deliver_new(pop, todo, known, sizes)
            except CycleStopped as exc:
                stopped = exc
            failure = self._held_failure() if stopped is None and self._held else None
            if failure is not None:
                stopped = CycleStopped(failure)
            try:
                await self._dele_committed(pop)  # the DELEs of the last delivered messages
            except CycleStopped as exc:
                stopped = stopped or exc
            # QUIT even after a stop: every DELE sent so far follows a committed ledger row.
            await pop.quit()
            self.stats.deleted = len(self._deles)
            self.stats.deleted_bytes = sum(sizes.get(n, 0) for n in self._deles)
        if stopped is not None:
            raise stopped.cause
        return self.stats

    async def _sort(
        self,
        pop: Pop3Session,
        listing: list[tuple[int, str]],
        known: dict[str, LedgerEntry],
        sizes: Mapping[int, int],
    ) -> list[tuple[int, str]]:
        """Conclude what needs no RETR; return the (number, UIDL) of the messages to fetch."""
        now = self.clock()
        todo: list[tuple[int, str]] = []
        for number, uid in listing:
            entry = known.get(uid)
            # Decided before the size check: a finished message is never fetched.
            if entry is not None and entry.state is not MessageState.DEFERRED:
                if await self._known(pop, number, uid, entry, now):
                    continue
                del known[uid]  # another message under this UIDL: new mail
            if not self._fetchable(number, uid, sizes.get(number, 0)):
                continue
            todo.append((number, uid))
        if self.stats.kept:
            log.debug(
                "account=%s: %d finished messages left upstream", self.account.name, self.stats.kept
            )
        return todo

    async def _known(
        self, pop: Pop3Session, number: int, uid: str, entry: LedgerEntry, now: float
    ) -> bool:
        """A message the ledger knows as finished: DELE it (docs/design.md §5.1 step 1), or
        pass over it without a command, a log line or an observer call while
        ``leave_on_server`` keeps it.  False: it is another message under a UIDL we know (a
        server that restarted its numbering), forgotten now, to be delivered like any other."""
        acct = self.account
        if not self._dele_due(entry, now):
            self.stats.kept += 1
            return True
        if await self.identities.same(pop, number, uid, entry):
            # Kept until delete_after passed, or left behind by a crash: two different things
            # for whoever reads the metrics.
            done = Outcome.REMOVED if acct.leave_on_server else Outcome.SKIPPED
            await self._conclude(
                pop, number, uid, entry.size, done, entry.last_response, Upstream.DUE
            )
            return True
        log.warning(
            "account=%s uidl=%s: listed under a UIDL the ledger knows, but not the "
            "message %s then; handled as a new message",
            acct.name,
            uid,
            entry.state.value.replace("_", "-"),
        )
        await self._recorded(self.ledger.forget(acct.name, [uid]))
        return False

    def _fetchable(self, number: int, uid: str, size: int) -> bool:
        """Whether to fetch message ``number``.  Over ``max_message_size`` it is fetched to be
        dead-lettered unsent (remembered in ``_oversize``); too large to fetch at all, it is
        left upstream and reported (docs/design.md §5.1)."""
        acct = self.account
        if size <= acct.max_message_size:
            return True
        if size <= self._fetch_limit():
            self._oversize.add(number)
            return True
        # Fetching it would exceed our cap and fail every cycle at this message, so the mail
        # behind it would never come.  Leave it upstream and say so.
        log.warning(
            "account=%s uidl=%s size=%d exceeds max_message_size (%d octets): left upstream",
            acct.name,
            uid,
            size,
            acct.max_message_size,
        )
        self.stats.oversize_left.append((uid, size))
        return False

    async def _deliver_new(
        self,
        pop: Pop3Session,
        todo: list[tuple[int, str]],
        known: dict[str, LedgerEntry],
        sizes: Mapping[int, int],
    ) -> None:
        """Fetch and handle ``todo``, then decide the held messages again if one got through."""
        acct = self.account
        # Before the first SMTP transaction: a ledger that cannot commit (a full or read-only
        # disk, a lock held elsewhere) would see each message delivered again every cycle, its
        # row failing after the 250.  One tiny transaction, only in a cycle with work.
        await self._recorded(self.ledger.prove_writable(self.clock()))
        uids = dict(todo)
        # Only a cycle with something to deliver reads (and may change) the breaker's memory.
        remembered = await self.ledger.breaker(acct.name)
        self.breaker = Breaker(remembered)
        try:
            try:
                await self._deliver_all(pop, [n for n, _ in todo], uids, known, sizes)
                if self._held and self.breaker.passed and not self.stopping.is_set():
                    await self._revisit(pop, uids, known, sizes)
            finally:
                await self.deliverer.close()
        finally:
            if self.breaker.tripped != remembered:
                await self._recorded(self.ledger.set_breaker(acct.name, self.breaker.tripped))

    async def _deliver_all(
        self,
        pop: Pop3Session,
        numbers: list[int],
        uids: dict[int, str],
        known: dict[str, LedgerEntry],
        sizes: Mapping[int, int],
    ) -> None:
        """RETR and handle ``numbers`` in order, until done or ``stopping``.  Closed as soon
        as the loop ends, so that the RETRs still in flight are abandoned at once (their
        replies read and dropped, none written to the spool) and their budget given back."""
        retrieved = pop.retrieve_many(
            numbers, sizes=sizes, spooling=self._spooling(), budget=self.budget
        )
        async with contextlib.aclosing(retrieved):
            await self._handle_all(pop, retrieved, uids, known)

    async def _handle_all(
        self,
        pop: Pop3Session,
        retrieved: AsyncGenerator[Retrieved, None],
        uids: dict[int, str],
        known: dict[str, LedgerEntry],
    ) -> None:
        async for item in retrieved:
            try:
                if self.stopping.is_set():
                    # Stop between messages, never inside one (docs/design.md §10.4); this
                    # one waits upstream.
                    self.stats.stopped_early = True
                    break
                uid = uids[item.number]
                message = InHand(item.number, uid, item.message, known.get(uid), item.wire)
                await self._handle(pop, message)
            finally:
                if item.spooled is not None:
                    item.spooled.remove()  # handled (or abandoned): its spool file goes now
            del message, item  # drop this message before the next is read: two copies at most

    def _spooling(self) -> Spooling | None:
        """Where RETR streams the messages above the spool threshold: a new spool file each.
        A shared mailbox that suppresses duplicates needs each body's digest (its duplicate
        key): the writer takes it on the way."""
        spool = self.spool
        if spool is None:
            return None
        shared = self.account.shared
        digest = shared is not None and shared.duplicate_window > 0
        return Spooling(self.spool_threshold, lambda: spool.writer(digest_body=digest))

    async def _revisit(
        self,
        pop: Pop3Session,
        uids: dict[int, str],
        known: dict[str, LedgerEntry],
        sizes: Mapping[int, int],
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

    # -- one message's path ----------------------------------------------------------------

    async def _handle(self, pop: Pop3Session, m: InHand) -> None:
        """Handle one message; an unexpected error is this message's alone.

        Our own errors go on as they were: ``CycleStopped`` (the ledger, the store, our SMTP
        setup) and every ``ConnectorError`` (a POP3 server's fault ends the cycle).  Anything
        else (a parser's bug, an input nobody foresaw) leaves the message upstream, counted in
        the ledger, and the cycle goes on with the next one (:meth:`_failed`;
        docs/design.md §5.2, invariant 7).
        """
        self._content_out = False
        try:
            if m.entry is not None and m.entry.errors >= ERROR_LIMIT:
                # Failed in ERROR_LIMIT cycles, and dead-lettering it failed too last time.
                await self._dead_letter_error(pop, m, m.entry.last_response)
            elif m.number in self._oversize:
                await self._dead_letter_oversize(pop, m)
            else:
                await self._deliver(pop, m)
        except (CycleStopped, ConnectorError):
            raise
        except Exception as exc:  # noqa: BLE001 - isolated by design (docs/design.md §5.2)
            await self._failed(pop, m, exc)

    async def _deliver(self, pop: Pop3Session, m: InHand) -> None:
        """Deliver one message to whoever does not have it yet, and conclude it by the answer."""
        acct, policy = self.account, self.policy
        sender, sender_fixed = envelope_sender(m.head, policy.sender_policy, policy.fixed_sender)
        routed = self._route(m)
        have = await self._done_for(m, routed)
        todo = tuple(r for r in routed.recipients if r.lower() not in have)
        if not todo:
            await self._already_delivered(pop, m, routed.recipients)
            return
        envelope = Envelope(
            sender,
            todo,
            sender_fixed=sender_fixed,
            recipients_fixed=acct.shared is None,
            configured=routed.configured,
        )
        trace = trace_header(
            m.head,
            pop_host=acct.endpoint.host,
            by_host=policy.helo_name,
            protocol="POP3" if acct.imap is None else "IMAP",
            uidl=m.uid,
            recipients=todo,
            now=datetime.fromtimestamp(self.clock(), UTC),
        )
        try:
            # The trace line travels beside the message, never joined to it (no copy).
            delivered = await self.deliverer.deliver(
                m.raw,
                envelope,
                trace=trace,
                wire=m.wire,
                before_content=lambda: self._before_content(pop),
            )
        except DeliveryError as exc:
            await self._refused(pop, m, exc, envelope, routed.keys)
            return
        self.stats.delivered_bytes += len(trace) + m.size
        self.breaker.through()
        if delivered.refused:
            await self._partly_delivered(pop, m, delivered, envelope, routed.keys)
        else:
            done = RecipientsDone(routed.keys, todo) if acct.shared is not None else None
            await self._delivered(pop, m, delivered.response, done)

    async def _delivered(
        self, pop: Pop3Session, m: InHand, response: str, done: RecipientsDone | None
    ) -> None:
        """Accepted by every recipient (250 after DATA).

        The duplicate window (docs/design.md §9): Exchange has the message, the ledger does not
        yet.  The row goes to the ledger thread's next group commit, which starts at once and
        which no cancellation can stop half-way; the DELE waits for it (:class:`GroupCommit`).
        """
        acct = self.account
        try:
            ticket = self.ledger.record_delivered_soon(
                acct.name,
                m.uid,
                m.size,
                response,
                self.clock(),
                done=done,
                identity=self.identities.of(m.number, m.raw),
            )
        except LedgerError as exc:
            raise CycleStopped(exc) from exc
        self.commits.add(None if acct.leave_on_server else m.number, ticket)
        await self._conclude(
            pop, m.number, m.uid, m.size, Outcome.DELIVERED, response, Upstream.COMMITTING
        )
        if self.commits.full:
            await self._dele_committed(pop)

    def _route(self, m: InHand) -> Routed:
        """The message's recipients: the account's ``deliver_to``, or a shared mailbox's
        recipients read from the message (``recipients.route``, docs/design.md §6.4)."""
        acct = self.account
        keys: tuple[str, ...] = (f"uidl:{m.uid}",)
        if acct.shared is None:
            return Routed(acct.deliver_to, frozenset(), keys, None)
        routing = route(m.head, acct.shared, acct.deliver_to)
        if routing.unread:
            # A hostile or broken header: routed on what could be read (the fallback when that
            # names nobody of ours); the administrator should know why.
            log.warning(
                "account=%s uidl=%s: %s could not be read whole; routed by %s to %s",
                acct.name,
                m.uid,
                ", ".join(routing.unread),
                routing.source,
                ", ".join(routing.recipients),
            )
        log.debug(
            "account=%s uidl=%s routed by %s %s to %s",
            acct.name,
            m.uid,
            routing.source,
            ", ".join(routing.found),
            ", ".join(routing.recipients),
        )
        mid = message_id(m.head) if acct.shared.duplicate_window > 0 else None
        mid_key = duplicate_key(mid, m.raw) if mid is not None else None
        if mid_key is not None:
            keys += (mid_key,)
        return Routed(routing.recipients, routing.configured, keys, mid_key)

    async def _done_for(self, m: InHand, routed: Routed) -> frozenset[str]:
        """The recipients (lower case) who have this message already: a provider's copy of it
        for another recipient (shared mailbox), or a retry after only some recipients deferred
        it.  With a Message-ID, also whether it came before with another body."""
        acct = self.account
        if acct.shared is None and (m.entry is None or len(routed.recipients) <= 1):
            return frozenset()
        mid_key, keys = routed.mid_key, routed.keys
        prefix = mid_key[: mid_key.rindex(":") + 1] if mid_key is not None else ""
        found = await self._recorded(self.ledger.recipients_by_key(acct.name, keys, prefix=prefix))
        if any(key not in keys for key in found):
            # Only the prefix matched: the same Message-ID with another body.
            log.info(
                "account=%s uidl=%s Message-ID %s came before with a different body: "
                "not a copy, delivered as a message of its own",
                acct.name,
                m.uid,
                prefix.removeprefix("mid:").removesuffix(":"),
            )
        return frozenset(r for key in keys for r in found.get(key, ()))

    async def _before_content(self, pop: Pop3Session) -> None:
        """The ``before_content`` hook, after the server's 354: the earlier messages' rows are
        committed (and their DELEs sent) before this message's content goes to SMTP, so a
        crash can duplicate at most the message Exchange took last, and a failed commit stops
        the cycle before another message is delivered (raised as CycleStopped; the
        transaction is abandoned unsent).  Then mark that the content goes out (for
        :meth:`_failed`'s log line)."""
        if self.commits.due_before_content():
            await self._dele_committed(pop)
        self._content_out = True

    async def _already_delivered(
        self, pop: Pop3Session, m: InHand, recipients: Sequence[str]
    ) -> None:
        """Every recipient has this message already: record it as done without SMTP."""
        acct = self.account
        response = f"duplicate: already delivered to {', '.join(recipients)}"
        record = self.ledger.record_delivered(
            acct.name,
            m.uid,
            m.size,
            response,
            self.clock(),
            identity=self.identities.of(m.number, m.raw),
        )
        await self._conclude(
            pop, m.number, m.uid, m.size, Outcome.SKIPPED, response, Upstream.FINISHED, record
        )

    async def _partly_delivered(
        self,
        pop: Pop3Session,
        m: InHand,
        delivered: Delivered,
        envelope: Envelope,
        keys: tuple[str, ...],
    ) -> None:
        """Accepted for some recipients and refused for others (RFC 5321 §3.3: the server has
        the message; sending it again would duplicate it for those who have it).

        Refused permanently (about this message, since a configured recipient refused
        permanently stops the cycle before DATA): a copy naming them goes to the dead-letter
        store.  Refused temporarily: the message stays upstream, deferred, and the recipients
        done so far are recorded under its UIDL, so a retry goes to the others only; once
        deferred longer than ``max_deferral`` they get a dead-letter copy too
        (docs/design.md §6.4).
        """
        acct = self.account
        now = self.clock()
        identity = self.identities.of(m.number, m.raw)
        refused = delivered.refused
        temporary = {r: why for r, why in refused.items() if r not in delivered.permanent}
        first_seen = m.entry.first_seen if m.entry is not None else now
        expired = bool(temporary) and now - first_seen >= acct.max_deferral
        copy_for = {r: why for r, why in refused.items() if expired or r not in temporary}
        accepted = tuple(r for r in envelope.recipients if r not in refused)
        response = f"{delivered.response} (refused: {refusal_summary(refused)})"
        dl_id: str | None = None
        if copy_for:

            def unstored() -> Awaitable[LedgerEntry]:
                # No copy: remember who has it, and keep it upstream for the others.
                return self.ledger.record_deferred(
                    acct.name,
                    m.uid,
                    m.size,
                    response,
                    now,
                    done=RecipientsDone(keys, accepted),
                    identity=identity,
                )

            dl_id = await self._dead_letter_copy(m, copy_for, delivered, unstored)
        deferred = bool(temporary) and not expired
        write = self.ledger.record_deferred if deferred else self.ledger.record_delivered
        record = write(
            acct.name,
            m.uid,
            m.size,
            response,
            now,
            dead_letter_id=dl_id,
            done=RecipientsDone(keys, (*accepted, *copy_for)),
            identity=identity,
        )
        if deferred:
            outcome, upstream = Outcome.DEFERRED, Upstream.STAYS
        else:
            outcome, upstream = Outcome.DELIVERED, Upstream.FINISHED
        await self._conclude(pop, m.number, m.uid, m.size, outcome, response, upstream, record)

    async def _dead_letter_copy(
        self,
        m: InHand,
        copy_for: Mapping[str, str],
        delivered: Delivered,
        unstored: Callable[[], Awaitable[object]],
    ) -> str:
        """Store the copy of a partly delivered message for the recipients in ``copy_for``
        (stage ``rcpt``, or ``expired`` when none refused it permanently); return its id.  If
        the store fails, ``unstored()`` records who has the message, and the cycle stops."""
        stage = "rcpt" if any(r in delivered.permanent for r in copy_for) else "expired"
        named = self._recipients_named(tuple(copy_for))
        info = self._dead_letter_info(m.uid, stage, refusal_summary(copy_for), named)
        try:
            dl_id = await asyncio.shield(self.store.put(m.raw, info))
        except DeadLetterError as exc:
            await self._recorded(unstored())
            raise CycleStopped(exc) from exc
        # The copy's own report (every refusal named); the message is concluded by the caller.
        self._report(
            m.uid, m.size, Outcome.DEAD_LETTERED, f"{stage}: {refusal_summary(delivered.refused)}"
        )
        return dl_id

    async def _refused(
        self,
        pop: Pop3Session,
        m: InHand,
        exc: DeliveryError,
        envelope: Envelope,
        keys: tuple[str, ...],
    ) -> None:
        """SMTP refused the message: stop, hold it, dead-letter it or defer it, as
        :func:`~connector.cycle.refusal.verdict` and the breaker decide (docs/design.md §6)."""
        if exc.stage is SmtpStage.DATA:
            self.breaker.through()  # it got past MAIL and RCPT: those stages work
        match verdict(exc):
            case Verdict.UNDECIDED:
                # A null sender refused, and nothing accepted yet to test another sender with:
                # not (yet) our setup.  A later message may show either (docs/design.md §6.2).
                self._hold(m, exc, "nothing to test the refusal with yet")
            case Verdict.OUR_SETUP:
                # Every message would fare the same (docs/design.md §6.1).
                raise CycleStopped(exc) from exc
            case Verdict.PERMANENT if self.breaker.holds(exc):
                self._hold(m, exc, "every message refused alike so far")
            case Verdict.PERMANENT:
                await self._dead_letter(
                    pop, m, str(exc.stage), self._refusal_text(exc), envelope, keys
                )
            case Verdict.TEMPORARY:
                await self._defer(pop, m, self._refusal_text(exc), envelope, keys)

    def _refusal_text(self, exc: DeliveryError) -> str:
        """The reply a refused message is recorded with; for a shared mailbox whose every
        recipient was refused, each of them named (for the dead letter and the log line)."""
        if exc.refused and self.account.shared is not None:
            return refusal_summary(exc.refused)
        return exc.response

    def _hold(self, m: InHand, exc: DeliveryError, why: str) -> None:
        """Leave a refused message upstream undecided (no ledger row, no dead letter)."""
        self._held.append((m.number, exc))
        log.warning("account=%s uidl=%s held upstream (%s): %s", self.account.name, m.uid, why, exc)

    async def _defer(
        self,
        pop: Pop3Session,
        m: InHand,
        response: str,
        envelope: Envelope,
        keys: tuple[str, ...],
    ) -> None:
        """Refused temporarily: recorded and left upstream; refused only temporarily for longer
        than ``max_deferral``, dead-lettered (stage ``expired``, docs/design.md §5.1 step 5)."""
        acct = self.account
        now = self.clock()
        entry = await self._recorded(
            self.ledger.record_deferred(
                acct.name,
                m.uid,
                m.size,
                response,
                now,
                identity=self.identities.of(m.number, m.raw),
            )
        )
        if now - entry.first_seen >= acct.max_deferral:
            await self._dead_letter(pop, m, "expired", response, envelope, keys)
            return
        await self._conclude(
            pop, m.number, m.uid, m.size, Outcome.DEFERRED, response, Upstream.STAYS
        )

    async def _dead_letter(
        self,
        pop: Pop3Session,
        m: InHand,
        stage: str,
        response: str,
        envelope: Envelope | None = None,
        keys: tuple[str, ...] = (),
    ) -> None:
        """Store the message as a dead letter, record it, DELE it (docs/design.md §5.1 step 4).

        The two are shielded as one: a shutdown must not leave a stored dead letter
        unrecorded, nor cut the removal of one whose commit failed.  Not stored durably, or
        not recorded: no DELE; the message stays upstream and the cycle stops.
        """
        # Named when they are not simply the account's deliver_to (see _recipients_named): a
        # shared mailbox's recipients (the copies of the message are then suppressed too), or
        # those still owed a message that others got on an earlier attempt.
        recipients = self._recipients_named(envelope.recipients) if envelope is not None else ()
        info = self._dead_letter_info(m.uid, stage, response, recipients)
        done = RecipientsDone(keys, recipients) if recipients else None
        record = asyncio.shield(self._store_and_record(m, info, done))
        await self._conclude(
            pop,
            m.number,
            m.uid,
            m.size,
            Outcome.DEAD_LETTERED,
            f"{stage}: {response}",
            Upstream.FINISHED,
            record,
        )

    async def _store_and_record(
        self, m: InHand, info: DeadLetterInfo, done: RecipientsDone | None
    ) -> None:
        acct = self.account
        dl_id = await self.store.put(m.raw, info)
        try:
            await self.ledger.record_dead_lettered(
                acct.name,
                m.uid,
                m.size,
                info.response,
                self.clock(),
                dead_letter_id=dl_id,
                done=done,
                identity=self.identities.of(m.number, m.raw),
            )
        except LedgerError:
            # Not recorded: the message stays upstream and the next cycle stores it again, so
            # this copy goes, or a requeue of both would deliver it twice.
            await self._remove_unrecorded(m.uid, dl_id)
            raise

    async def _dead_letter_oversize(self, pop: Pop3Session, m: InHand) -> None:
        """Over ``max_message_size``: dead-lettered without an SMTP attempt (stage ``size``,
        docs/design.md §7.1).  The code is the one a server gives for it (RFC 1870 §6.1: 552,
        RFC 3463 5.3.4)."""
        acct = self.account
        response = (
            f"552 5.3.4 message of {m.size} octets exceeds max_message_size of "
            f"{acct.max_message_size}; not sent"
        )
        envelope: Envelope | None = None
        if acct.shared is not None:
            # Named in the dead letter, so that a requeue goes to them, not to the fallback.
            recipients = route(m.head, acct.shared, acct.deliver_to).recipients
            envelope = Envelope("", recipients, sender_fixed=True, recipients_fixed=False)
        await self._dead_letter(pop, m, "size", response, envelope)

    async def _failed(self, pop: Pop3Session, m: InHand, exc: Exception) -> None:
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
            m.uid,
            m.size,
            " after its content went to SMTP (the server may have it)" if self._content_out else "",
            summary,
            exc_info=exc,
        )
        entry = await self._recorded(
            self.ledger.record_failed(
                acct.name,
                m.uid,
                m.size,
                f"error: {summary}",
                self.clock(),
                identity=self.identities.of(m.number, m.raw),
            )
        )
        if entry.state is MessageState.DELIVERED:
            # Recorded as finished before the failure (after SMTP took it): nothing to redo,
            # only the count the failure cut short.
            self.stats.count(Outcome.DELIVERED)
        elif entry.state is MessageState.DEAD_LETTERED:
            self.stats.count(Outcome.DEAD_LETTERED)
        elif entry.errors >= ERROR_LIMIT:
            await self._dead_letter_error(pop, m, entry.last_response)
        else:
            await self._conclude(
                pop, m.number, m.uid, m.size, Outcome.DEFERRED, f"error: {summary}", Upstream.STAYS
            )

    async def _dead_letter_error(self, pop: Pop3Session, m: InHand, response: str) -> None:
        """Dead-letter a message whose handling failed in ERROR_LIMIT cycles (stage ``error``).

        If even that fails unexpectedly, it is logged and the message stays upstream, counted
        as deferred; the next cycle tries the dead letter again, never the handling.
        """
        summary = response.removeprefix("error: ")
        try:
            await self._dead_letter(pop, m, "error", summary)
        except (CycleStopped, ConnectorError):
            raise
        except Exception as exc:
            log.error(
                "account=%s uidl=%s: dead-lettering the message failed unexpectedly; "
                "it stays upstream (%s)",
                self.account.name,
                m.uid,
                error_summary(exc),
                exc_info=exc,
            )
            self.stats.count(Outcome.DEFERRED)

    # -- the tail every outcome ends in ----------------------------------------------------

    async def _conclude(
        self,
        pop: Pop3Session,
        number: int,
        uid: str,
        size: int,
        outcome: Outcome,
        response: str,
        upstream: Upstream,
        record: Awaitable[object] | None = None,
    ) -> None:
        """Conclude one message: await ``record`` (what makes its outcome durable, if the
        caller has not awaited it already), send the DELE that allows (docs/design.md §5.2,
        invariant 1), tell the observer, count it."""
        if record is not None:
            await self._recorded(record)
        if upstream is Upstream.DUE or (
            upstream is Upstream.FINISHED and not self.account.leave_on_server
        ):
            await self._dele(pop, number)
        self._report(uid, size, outcome, response)

    def _report(self, uid: str, size: int, outcome: Outcome, response: str) -> None:
        self.observer.message(self.account.name, uid, size, outcome, response)
        self.stats.count(outcome)

    async def _recorded(self, write: Awaitable[T]) -> T:
        """Await what records an outcome (a ledger write, or a dead letter's store-and-record
        pair); a failure of the ledger or the store ends the cycle before the next RETR."""
        try:
            return await write
        except (LedgerError, DeadLetterError) as exc:
            raise CycleStopped(exc) from exc

    async def _dele_committed(self, pop: Pop3Session) -> None:
        """Settle the group commit: DELE the delivered messages whose rows are committed now
        (docs/design.md §8.5); a row that failed to commit stops the cycle, its message stays."""
        settled = await self.commits.settle()
        for number in settled.committed:
            await self._dele(pop, number)
        if settled.failed is not None:
            raise CycleStopped(settled.failed)

    async def _dele(self, pop: Pop3Session, number: int) -> None:
        """DELE ``number``, remembered for what the cycle leaves upstream (``left_upstream``)."""
        await pop.dele(number)
        self._deles.append(number)

    # -- helpers ---------------------------------------------------------------------------

    def _recipients_named(self, recipients: tuple[str, ...]) -> tuple[str, ...]:
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

    def _dead_letter_info(
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

    async def _remove_unrecorded(self, uid: str, dl_id: str) -> None:
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

    def _fetch_limit(self) -> int:
        """The most octets one message may have to be fetched (the POP3 client's cap)."""
        acct = self.account
        if acct.oversize is Oversize.LEAVE:
            return acct.max_message_size
        return max(acct.max_message_size, FETCH_CEILING)

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
