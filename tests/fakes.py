"""In-memory implementations of the connector's seams (docs/design.md §2), for cycle and service
tests that open no sockets.

The dead-letter store passes the same contract suite as the real stores
(tests/test_deadletter_contract.py); the cycle's fakes (FakeLedger, FakeMailbox/FakePop3,
FakeDeliverer) keep the rules of the real ledger and of RFC 1939 that a cycle can see, and mypy
checks them against the Protocols in connector/cycle/lifecycle.py.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import itertools
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Self

from connector.budget import MemoryBudget
from connector.deadletter import (
    DeadLetterInfo,
    DeadLetterRecord,
    parse_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.errors import DeadLetterError, DeliveryError, LedgerError, SmtpStage
from connector.ledger import Identity, LedgerEntry, MessageState, RecipientsDone
from connector.pop3 import AuthMethod, Retrieved
from connector.pop3.client import Spooling, TokenSource
from connector.smtp import Delivered, Envelope
from connector.spool import Spooled


class InMemoryDeadLetterStore:
    """A :class:`~connector.deadletter.DeadLetterArchive` in a dict.

    It stores the same bytes a real store would (our header lines, then the original), and
    parses them back the same way.  Set ``fail_put`` to make ``put`` raise DeadLetterError, as
    a full disk or a refused IMAP APPEND would; ``put_calls`` counts every call, failed or not.
    """

    store_name = "memory"

    def __init__(self) -> None:
        self.messages: dict[str, bytes] = {}
        self.fail_put = False
        self.put_calls = 0
        self._ids = itertools.count(1)

    async def put(self, raw: bytes | Spooled, info: DeadLetterInfo) -> str:
        """Store a copy; return its id, or raise DeadLetterError while ``fail_put`` is set."""
        self.put_calls += 1
        if self.fail_put:
            raise DeadLetterError(self.store_name, "injected failure")
        id = f"mem-{next(self._ids):06d}"
        self.messages[id] = with_dead_letter_headers(_bytes(raw), info)
        return id

    async def chunks(self, id: str) -> AsyncIterator[bytes]:
        """The stored bytes in chunks of 1,000 octets.  Unknown id: KeyError."""
        data = self.messages[id]
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    async def list(self) -> builtins.list[DeadLetterRecord]:
        """Every dead letter, oldest first."""
        records = []
        for id, data in self.messages.items():
            parsed = parse_dead_letter_headers(data)
            assert parsed is not None  # put() wrote them
            info, header_len = parsed
            records.append(
                DeadLetterRecord(
                    id=id,
                    account=info.account,
                    uidl=info.uidl,
                    stage=info.stage,
                    response=info.response,
                    failed_at=info.failed_at,
                    size=len(data) - header_len,
                )
            )
        records.sort(key=lambda r: (r.failed_at, r.id))
        return records

    async def get(self, id: str) -> bytes:
        """The stored bytes.  Unknown id: KeyError."""
        return self.messages[id]

    async def remove(self, id: str) -> None:
        """Forget one dead letter.  Unknown id: KeyError."""
        del self.messages[id]

    async def count_by_account(self) -> dict[str, int]:
        """Number of dead letters per account."""
        return dict(collections.Counter(r.account for r in await self.list()))


# --------------------------------------------------------------------------------------------
# The cycle's seams (connector.cycle.lifecycle: Ledger, Pop3Session, Deliverer)
# --------------------------------------------------------------------------------------------


class Events(builtins.list[tuple[str, str]]):
    """What the fakes did, in order, shared between them: ("commit", uidl), ("DELE", uidl),
    ("QUIT", ""), ("content", uidl) (a message's content handed to SMTP), ("250", uidl)."""

    def index_of(self, kind: str, uidl: str) -> int:
        return self.index((kind, uidl))


class FakeLedger:
    """The cycle's ``Ledger`` Protocol in memory, with the real ledger's rules where a cycle
    can see them: ``delivered`` and ``dead_lettered`` rows overwrite, a deferral never
    overwrites a final state, ``first_seen`` is kept, attempts and errors count up, done
    recipients are recorded by key.

    The group commit is explicit: a row from ``record_delivered_soon`` is committed only when
    the cycle settles (``settle``) or a test calls :meth:`commit_queued`, so ``settled`` lags as
    the real ledger thread's does.  A UIDL in ``fail_commit`` fails its group commit; every
    write raises LedgerError while ``fail_writes`` is set.
    """

    def __init__(self, events: Events | None = None) -> None:
        self.events = events if events is not None else Events()
        self.rows: dict[tuple[str, str], LedgerEntry] = {}
        self.done: dict[tuple[str, str], set[str]] = {}
        self.breakers: dict[str, str | None] = {}
        self.fail_commit: set[str] = set()
        self.fail_writes = False
        self._queued: builtins.list[tuple[int, tuple[str, str, int, str, float]]] = []
        self._dones: dict[int, tuple[RecipientsDone | None, Identity | None]] = {}
        self._tickets = 0
        self._settled = 0
        self._failed: dict[int, LedgerError] = {}

    # -- the group commit ----------------------------------------------------------------

    @property
    def settled(self) -> int:
        return self._settled

    def failed(self, tickets: Iterable[int]) -> bool:
        return any(t in self._failed for t in tickets)

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
    ) -> int:
        self._write_check()
        self._tickets += 1
        self._queued.append((self._tickets, (account, uidl, size, response, now)))
        self._dones[self._tickets] = (done, identity)
        return self._tickets

    def commit_queued(self) -> None:
        """What the ledger thread's drain job does: commit (or fail) every queued row."""
        for ticket, (account, uidl, size, response, now) in self._queued:
            done, identity = self._dones.pop(ticket)
            if uidl in self.fail_commit:
                self._failed[ticket] = LedgerError(f"record delivered {uidl}: injected failure")
                continue
            self._upsert(account, uidl, MessageState.DELIVERED, size, response, now, None, done)
            self._identify(account, uidl, identity)
            self.events.append(("commit", uidl))
        if self._queued:
            self._settled = self._queued[-1][0]
        self._queued = []

    async def settle(self, tickets: Sequence[int]) -> builtins.list[LedgerError | None]:
        self.commit_queued()
        return [self._failed.pop(t, None) for t in tickets]

    # -- the rest of the Protocol --------------------------------------------------------

    async def sync_listing(
        self, account: str, listed: Collection[str], *, recipients_before: float | None = None
    ) -> dict[str, LedgerEntry]:
        wanted = set(listed)
        for key in [k for k in self.rows if k[0] == account and k[1] not in wanted]:
            del self.rows[key]
            self.done.pop((account, f"uidl:{key[1]}"), None)
        return {uidl: e for (a, uidl), e in self.rows.items() if a == account}

    async def forget(self, account: str, uidls: Collection[str]) -> None:
        self._write_check()
        for uidl in uidls:
            self.rows.pop((account, uidl), None)
            self.done.pop((account, f"uidl:{uidl}"), None)

    async def entries_outside(
        self, account: str, family: str, current: str
    ) -> builtins.list[LedgerEntry]:
        return [
            e
            for (a, uidl), e in self.rows.items()
            if a == account and uidl.startswith(family) and not uidl.startswith(current)
        ]

    async def rekey(self, account: str, renames: Mapping[str, str]) -> None:
        self._write_check()
        for old, new in renames.items():
            if (account, old) in self.rows and (account, new) not in self.rows:
                self.rows[(account, new)] = dataclasses.replace(
                    self.rows.pop((account, old)), uidl=new
                )
                done = self.done.pop((account, f"uidl:{old}"), None)
                if done is not None:
                    self.done[(account, f"uidl:{new}")] = done

    async def prove_writable(self, now: float) -> None:
        self._write_check()

    async def breaker(self, account: str) -> str | None:
        return self.breakers.get(account)

    async def set_breaker(self, account: str, tripped: str | None) -> None:
        self._write_check()
        self.breakers[account] = tripped

    async def recipients_by_key(
        self, account: str, keys: Collection[str], *, prefix: str = ""
    ) -> dict[str, frozenset[str]]:
        found = {k: frozenset(self.done[(account, k)]) for k in keys if (account, k) in self.done}
        if prefix:
            found.update(
                (k, frozenset(rs))
                for (a, k), rs in self.done.items()
                if a == account and k.startswith(prefix)
            )
        return found

    async def entry(self, account: str, uidl: str) -> LedgerEntry | None:
        return self.rows.get((account, uidl))

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
    ) -> None:
        self._write_check()
        self._upsert(
            account, uidl, MessageState.DELIVERED, size, response, now, dead_letter_id, done
        )
        self._identify(account, uidl, identity)
        self.events.append(("commit", uidl))

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
    ) -> None:
        self._write_check()
        state = MessageState.DEAD_LETTERED
        self._upsert(account, uidl, state, size, response, now, dead_letter_id, done)
        self._identify(account, uidl, identity)
        self.events.append(("commit", uidl))

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
    ) -> LedgerEntry:
        self._write_check()
        old = self.rows.get((account, uidl))
        if old is None or old.state is MessageState.DEFERRED:
            state = MessageState.DEFERRED
            self._upsert(account, uidl, state, size, response, now, dead_letter_id, done)
            self._identify(account, uidl, identity)
        else:
            self._add_done(account, done, now)
        self.events.append(("commit", uidl))
        return self.rows[(account, uidl)]

    async def record_failed(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        *,
        identity: Identity | None = None,
    ) -> LedgerEntry:
        self._write_check()
        old = self.rows.get((account, uidl))
        if old is None:
            self.rows[(account, uidl)] = LedgerEntry(
                uidl, MessageState.DEFERRED, size, 0, now, now, response, errors=1
            )
            self._identify(account, uidl, identity)
        elif old.state is MessageState.DEFERRED:
            self.rows[(account, uidl)] = dataclasses.replace(
                old, errors=old.errors + 1, last_attempt=now, last_response=response
            )
        return self.rows[(account, uidl)]

    # -- helpers -------------------------------------------------------------------------

    def _write_check(self) -> None:
        if self.fail_writes:
            raise LedgerError("ledger: injected write failure")

    def _upsert(
        self,
        account: str,
        uidl: str,
        state: MessageState,
        size: int,
        response: str,
        now: float,
        dead_letter_id: str | None,
        done: RecipientsDone | None,
    ) -> None:
        old = self.rows.get((account, uidl))
        self.rows[(account, uidl)] = LedgerEntry(
            uidl,
            state,
            size,
            1 if old is None else old.attempts + 1,
            now if old is None else old.first_seen,
            now,
            response,
            dead_letter_id if dead_letter_id is not None or old is None else old.dead_letter_id,
            None,
            0 if old is None else old.errors,
            None if old is None else old.identity,
        )
        self._add_done(account, done, now)

    def _identify(self, account: str, uidl: str, identity: Identity | None) -> None:
        if identity is not None:
            self.rows[(account, uidl)] = dataclasses.replace(
                self.rows[(account, uidl)], identity=identity
            )

    def _add_done(self, account: str, done: RecipientsDone | None, now: float) -> None:
        if done is not None:
            for key in done.keys:
                self.done.setdefault((account, key), set()).update(
                    r.lower() for r in done.recipients
                )


class FakeMailbox:
    """A POP3 mailbox that outlives its sessions: (UIDL, message) in listing order."""

    def __init__(self, events: Events | None = None) -> None:
        self.events = events if events is not None else Events()
        self.messages: builtins.list[tuple[str, bytes]] = []
        self._next = itertools.count(1)

    def add(self, raw: bytes, uidl: str | None = None) -> str:
        uid = uidl if uidl is not None else f"uid-{next(self._next):04d}"
        self.messages.append((uid, raw))
        return uid

    def uidls(self) -> builtins.list[str]:
        return [uid for uid, _ in self.messages]

    async def connect(self, *args: object, **kwargs: object) -> FakePop3:
        """The cycle's ``connect``: a new session on this mailbox."""
        return FakePop3(self)


class FakePop3:
    """The cycle's ``Pop3Session`` Protocol over a :class:`FakeMailbox`: RFC 1939's rules that a
    cycle relies on (message numbers fixed for the session, DELE takes effect only at QUIT)."""

    def __init__(self, mailbox: FakeMailbox) -> None:
        self.mailbox = mailbox
        self.events = mailbox.events
        self.capabilities: dict[str, builtins.list[str]] = {"UIDL": [], "TOP": []}
        self._messages = builtins.list(mailbox.messages)  # this session's numbering
        self._marked: set[int] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    async def login(
        self, username: str, password: str | TokenSource, method: AuthMethod = AuthMethod.AUTO
    ) -> None:
        pass

    async def stat(self) -> tuple[int, int]:
        return len(self._messages), sum(len(raw) for _, raw in self._messages)

    async def list(self) -> builtins.list[tuple[int, int]]:
        return [(n, len(raw)) for n, (_, raw) in enumerate(self._messages, 1)]

    async def uidl(self) -> builtins.list[tuple[int, str]]:
        return [(n, uid) for n, (uid, _) in enumerate(self._messages, 1)]

    async def top(self, number: int, lines: int) -> bytes:
        raw = self._messages[number - 1][1]
        end = raw.find(b"\r\n\r\n")
        return raw if end < 0 else raw[: end + 4]

    async def retr(self, number: int) -> bytes:
        return self._messages[number - 1][1]

    async def retrieve_many(
        self,
        numbers: Sequence[int],
        *,
        sizes: Mapping[int, int] | None = None,
        spooling: Spooling | None = None,
        budget: MemoryBudget | None = None,
    ) -> AsyncGenerator[Retrieved, None]:
        """Each message in turn; one above ``spooling.above`` goes through a spool sink, as
        the real client streams it (one write per 1,000 octets), and each is charged to
        ``budget`` while the caller has it."""
        for n in numbers:
            raw = self._messages[n - 1][1]
            charge = await budget.acquire(len(raw)) if budget is not None else 0
            try:
                if spooling is not None and len(raw) > spooling.above:
                    sink = spooling.sink()
                    for i in range(0, len(raw), 1000):
                        await sink.write(raw[i : i + 1000])
                    yield Retrieved(n, b"", None, await sink.finish())
                else:
                    yield Retrieved(n, raw, None)
            finally:
                if budget is not None:
                    budget.release(charge)

    async def dele(self, number: int) -> None:
        self._marked.add(number)
        self.events.append(("DELE", self._messages[number - 1][0]))

    async def quit(self) -> str:
        gone = {self._messages[n - 1][0] for n in self._marked}
        self.mailbox.messages = [(u, r) for u, r in self.mailbox.messages if u not in gone]
        self.events.append(("QUIT", ""))
        return "bye"


Answer = Callable[[bytes, Envelope], "Delivered | DeliveryError"]


class FakeDeliverer:
    """The cycle's ``Deliverer`` Protocol: ``answer(raw, envelope)`` says what SMTP answers
    (by default ``250``).  A refusal at MAIL or RCPT comes before the content; anything else
    after ``before_content`` ran and the content went out, as a real transaction goes."""

    def __init__(self, events: Events, answer: Answer | None = None) -> None:
        self.events = events
        self.answer = answer or (lambda raw, envelope: Delivered("250 2.0.0 Ok"))
        self.accepted: builtins.list[bytes] = []

    async def deliver(
        self,
        raw_or_spooled: bytes | Spooled,
        envelope: Envelope,
        *,
        trace: bytes = b"",
        wire: bytes | None = None,
        before_content: Callable[[], Awaitable[None]] | None = None,
    ) -> Delivered:
        raw = _bytes(raw_or_spooled)  # a spooled one read whole: the fakes' messages are small
        answer = self.answer(raw, envelope)
        uid = _uid_of(raw)
        if isinstance(answer, DeliveryError) and answer.stage in (SmtpStage.MAIL, SmtpStage.RCPT):
            raise answer
        if before_content is not None:
            await before_content()
        self.events.append(("content", uid))
        if isinstance(answer, DeliveryError):
            raise answer
        self.accepted.append(raw)
        self.events.append(("250", uid))
        return answer

    async def close(self) -> None:
        pass


def _bytes(message: bytes | Spooled) -> bytes:
    return message if isinstance(message, bytes) else message.path.read_bytes()


def _uid_of(raw: bytes) -> str:
    """The ``X-Uid:`` field the fake tests put in each message, to name it in ``Events``."""
    for line in raw.split(b"\r\n"):
        if line.startswith(b"X-Uid: "):
            return line[7:].decode()
        if not line:
            break
    return ""
