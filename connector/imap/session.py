"""An IMAP folder as the session a cycle drives (the cycle's ``Pop3Session`` Protocol).

The cycle (docs/design.md §5) is written against a mailbox that lists messages by number,
names each by a unique id, fetches, marks for deletion and deletes at the end.  An IMAP folder
does all of that with other words, so this module translates and the cycle stays one:

=================  ===========================================================================
cycle asks         IMAP does
=================  ===========================================================================
login              LOGIN / AUTHENTICATE (``client.login``), then SELECT the folder
stat, list         ``UID FETCH 1:* (UID RFC822.SIZE)``, once: the count, the octets, the sizes
uidl               each message's key: ``imap:<UIDVALIDITY>:<UID>`` (RFC 3501 §2.3.1.1: the
                   pair never names another message in this folder)
retrieve_many      ``UID FETCH <set> (UID BODY.PEEK[])``, up to 32 messages or 4 MiB a command;
                   ``.PEEK`` leaves ``\\Seen`` alone (a user reading the folder elsewhere sees
                   what is new)
top                ``BODY.PEEK[HEADER]``
dele               remembered; nothing is sent (a POP3 DELE takes effect only at QUIT either)
quit               ``UID STORE +FLAGS.SILENT (\\Deleted)`` for them, ``UID EXPUNGE`` (RFC 4315)
                   where UIDPLUS is offered, then LOGOUT
=================  ===========================================================================

A message's number in the cycle is its UID, so the numbers never shift when another client
expunges something meanwhile (sequence numbers would, RFC 3501 §7.4.1).

**Without UIDPLUS** there is no way to expunge some ``\\Deleted`` messages and not others: a
plain EXPUNGE removes every message flagged ``\\Deleted`` in the folder, including one another
client (a user's mail program) flagged and might still have undone.  So after flagging ours the
session asks ``UID SEARCH DELETED``: when every ``\\Deleted`` message is one of ours it sends
EXPUNGE; when any is not, it leaves ours flagged and expunges nothing (logged).  Ours are then
expunged by whoever expunges the folder next, or by a later cycle (the ledger knows them, so
the cycle only flags them again) once the others are gone.  The one race left: another client
flags a message between our SEARCH and our EXPUNGE; that message was meant to go anyway.

Crash safety is the POP3 kind: nothing is flagged before QUIT, every message flagged follows a
committed ledger row (the cycle calls ``dele`` only then), and a message flagged but not
expunged when the process dies is listed again, known to the ledger, and flagged again.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Final, Protocol, Self

from connector.budget import MemoryBudget
from connector.errors import ImapResponseError, Pop3ProtocolError
from connector.imap import ImapAuth, ImapOptions
from connector.imap.client import ImapClient, TokenSource
from connector.imap.protocol import literal_cap, uid_set, uid_sets
from connector.pop3.client import AuthMethod, Pop3Endpoint, Pop3Timeouts, Retrieved, Spooling

log = logging.getLogger(__name__)
TRANSCRIPT: Final = logging.getLogger("connector.transcript.imap")

FETCH_WINDOW: Final = 32  # messages one UID FETCH asks for at most (the POP3 RETR window)
FETCH_WINDOW_OCTETS: Final = 4 * 1024 * 1024  # and octets, beyond the first message
HEADER_BATCH: Final = 500  # messages per UID FETCH of header blocks (UIDVALIDITY changed)

_DEFAULT_TIMEOUTS: Final = Pop3Timeouts()


def message_key(uidvalidity: int, uid: int) -> str:
    """The ledger's key of a message: ``imap:<UIDVALIDITY>:<UID>``."""
    return f"imap:{uidvalidity}:{uid}"


KEY_PREFIX: Final = "imap:"


class Lender(Protocol):
    """Who lends a cycle a connection that is logged in with the folder selected
    (``idle.IdleWatcher``: its IDLE connection, between two waits)."""

    async def lend(self) -> ImapClient | None:
        """The connection, out of IDLE; None when there is none to lend."""
        ...

    def give_back(self, client: ImapClient) -> None:
        """The cycle is done with it (closed, if the cycle failed)."""
        ...


class ImapSession:
    """One IMAP session over the configured folder, as the cycle's ``Pop3Session``.

    ``lender``: the connection is borrowed, already logged in with the folder selected: the
    cycle sends no LOGIN, SELECT or LOGOUT on it, and :meth:`quit` gives it back.
    """

    def __init__(
        self,
        client: ImapClient,
        options: ImapOptions,
        *,
        max_message_size: int,
        keep: bool = False,
        lender: Lender | None = None,
    ) -> None:
        self._client = client
        self._options = options
        self._max_message_size = max_message_size
        self._keep = keep
        self._lender = lender
        self._sizes: dict[int, int] = {}
        self._deleted: list[int] = []
        self.uidvalidity = 0
        self.expunged = True  # False when quit() left our \Deleted messages in place
        self._returned = False  # a borrowed connection given back by quit()

    @classmethod
    async def connect(
        cls,
        endpoint: Pop3Endpoint,
        timeouts: Pop3Timeouts = _DEFAULT_TIMEOUTS,
        *,
        options: ImapOptions,
        max_message_size: int = 256 * 1024 * 1024,
        keep: bool = False,
        transcript: logging.Logger | None = None,
    ) -> Self:
        """Connect (TLS as configured); ``keep`` (leave_on_server): a read-only folder will do."""
        client = await ImapClient.connect(endpoint, timeouts, transcript=transcript)
        return cls(client, options, max_message_size=max_message_size, keep=keep)

    @classmethod
    def opener(
        cls, options: ImapOptions, *, keep: bool, lender: Lender | None = None
    ) -> Callable[..., Awaitable[ImapSession]]:
        """The cycle's ``connect`` for an IMAP account: the lender's connection when it has
        one (a cycle that IDLE woke, or any cycle of an account that waits with IDLE: no new
        login, docs/design.md §15.3), else a new one."""

        async def connect(
            endpoint: Pop3Endpoint,
            timeouts: Pop3Timeouts,
            *,
            max_message_size: int,
            transcript: logging.Logger | None = None,
        ) -> ImapSession:
            client = await lender.lend() if lender is not None else None
            if client is not None:
                return cls(
                    client, options, max_message_size=max_message_size, keep=keep, lender=lender
                )
            # The IMAP transcript has a logger of its own (docs/design.md §11.3).
            log_to = TRANSCRIPT if transcript is not None else None
            return await cls.connect(
                endpoint,
                timeouts,
                options=options,
                keep=keep,
                max_message_size=max_message_size,
                transcript=log_to,
            )

        return connect

    @property
    def client(self) -> ImapClient:
        return self._client

    @property
    def capabilities(self) -> Mapping[str, Sequence[str]]:
        return dict.fromkeys(self._client.capabilities, ())

    def key(self, uid: int) -> str:
        return message_key(self.uidvalidity, uid)

    @property
    def family(self) -> str:
        """What every key of an IMAP folder starts with (``cycle.identity.Renumbering``)."""
        return KEY_PREFIX

    @property
    def epoch(self) -> str:
        """What every key of this session starts with: ``imap:<UIDVALIDITY>:``."""
        return message_key(self.uidvalidity, 0)[:-1]

    async def login(
        self,
        username: str,
        password: str | TokenSource,
        method: AuthMethod | ImapAuth = ImapAuth.AUTO,
    ) -> None:
        """Log in as the account's ``auth`` says (``method``, a POP3 name, is not used), then
        SELECT the folder; ImapResponseError if it cannot be opened for what we must do.
        A borrowed connection is logged in and selected already."""
        selected = self._client.selected
        if self._lender is None or selected is None:
            await self._client.login(username, password, self._options.auth)
            selected = await self._client.select(self._options.folder)
        if selected.read_only and not self._keep:
            # Nothing could be deleted: every message would be delivered, then stay.
            raise ImapResponseError(
                "SELECT",
                f"the folder {self._options.folder!r} is read-only for this user; delivered "
                "mail could not be removed (set leave_on_server = true, or grant the right)",
                "NOPERM",
            )
        self.uidvalidity = selected.uidvalidity

    async def stat(self) -> tuple[int, int]:
        """(messages, octets) of the folder, from its listing (read here, once)."""
        listing = await self._client.listing()
        self._sizes = dict(listing)
        return len(listing), sum(self._sizes.values())

    async def list(self) -> builtins.list[tuple[int, int]]:
        """(UID, RFC822.SIZE), ascending: the order mail arrived in (RFC 3501 §2.3.1.1)."""
        return sorted(self._sizes.items())

    async def uidl(self) -> builtins.list[tuple[int, str]]:
        return [(uid, self.key(uid)) for uid in sorted(self._sizes)]

    def _cap(self, uid: int) -> int:
        size = self._sizes.get(uid, self._max_message_size)
        return literal_cap(min(size, self._max_message_size))

    async def _one(self, uid: int, section: str) -> bytes:
        peek = f"BODY.PEEK[{section}]"
        async for item in self._client.uid_fetch(
            str(uid), f"(UID {peek})", max_literal=self._cap(uid)
        ):
            if item.uid == uid:
                body = item.bodies.get(f"BODY[{section}]")
                if body is not None:
                    return body
        raise ImapResponseError("UID FETCH", f"UID {uid} is no longer in the folder", None)

    async def top(self, number: int, lines: int) -> bytes:
        """The header block of message ``number`` (``lines`` must be 0: only that is used)."""
        return await self._one(number, "HEADER")

    async def retr(self, number: int) -> bytes:
        return await self._one(number, "")

    async def header_blocks(self, numbers: Sequence[int]) -> AsyncIterator[tuple[int, bytes]]:
        """(UID, header block) of each of ``numbers`` still in the folder."""
        for start in range(0, len(numbers), HEADER_BATCH):
            batch = numbers[start : start + HEADER_BATCH]
            cap = max(self._cap(uid) for uid in batch)
            async for item in self._client.uid_fetch(
                uid_set(batch), "(UID BODY.PEEK[HEADER])", max_literal=cap
            ):
                body = item.bodies.get("BODY[HEADER]")
                if item.uid is not None and item.uid in batch and body is not None:
                    yield item.uid, body

    async def retrieve_many(
        self,
        numbers: Sequence[int],
        *,
        sizes: Mapping[int, int] | None = None,
        spooling: Spooling | None = None,
        budget: MemoryBudget | None = None,
    ) -> AsyncGenerator[Retrieved, None]:
        """Yield each message of ``numbers`` (UIDs) in order, fetched in batches of up to
        FETCH_WINDOW messages and FETCH_WINDOW_OCTETS octets beyond the first; a message
        expunged meanwhile by another client is skipped.  Each body is bounded by its
        RFC822.SIZE (protocol.literal_cap) and by ``max_message_size``.

        ``budget``: each message is charged its RFC822.SIZE before its FETCH is sent, given
        back when the caller asks for the next one (docs/design.md §10.6); the first of a batch
        waits for room, the others join the batch only if they fit now.  ``spooling`` is not
        used: an IMAP message is read into memory whatever its size (docs/design.md §15.1).
        """
        del spooling  # see the docstring
        sizes = sizes if sizes is not None else self._sizes
        charges: dict[int, int] = {}  # UID -> what it holds of the budget

        def release(uid: int) -> None:
            charge = charges.pop(uid, 0)
            if charge and budget is not None:
                budget.release(charge)

        try:
            i = 0
            while i < len(numbers):
                batch = [numbers[i]]
                if budget is not None:
                    charges[numbers[i]] = await budget.acquire(self._cost(numbers[i], budget))
                octets = 0
                i += 1
                while (
                    i < len(numbers)
                    and len(batch) < FETCH_WINDOW
                    and octets + sizes.get(numbers[i], 0) <= FETCH_WINDOW_OCTETS
                ):
                    if budget is not None:
                        taken = budget.try_acquire(self._cost(numbers[i], budget))
                        if taken is None:
                            break  # no room now: the next batch waits for it
                        charges[numbers[i]] = taken
                    octets += sizes.get(numbers[i], 0)
                    batch.append(numbers[i])
                    i += 1
                wanted = set(batch)
                cap = max(self._cap(uid) for uid in batch)
                async for item in self._client.uid_fetch(
                    uid_set(batch), "(UID BODY.PEEK[])", max_literal=cap
                ):
                    if item.uid not in wanted or "BODY[]" not in item.bodies:
                        continue  # another client's flag change (RFC 3501 §7.4.2), or a repeat
                    wanted.discard(item.uid)
                    body = item.bodies["BODY[]"]
                    if body is None:
                        raise Pop3ProtocolError(f"the server sent no content for UID {item.uid}")
                    if len(body) > self._cap(item.uid):
                        raise Pop3ProtocolError(f"UID {item.uid} is longer than RFC822.SIZE said")
                    yield Retrieved(item.uid, body, None)
                    release(item.uid)  # the caller asks for the next: done with this one
                for uid in batch:
                    release(uid)  # expunged by another client meanwhile: never yielded
        finally:
            for uid in list(charges):
                release(uid)

    def _cost(self, uid: int, budget: MemoryBudget) -> int:
        """What a message may cost in memory: its RFC822.SIZE; unknown, the whole budget."""
        size = self._sizes.get(uid)
        return size if size is not None else budget.total

    async def dele(self, number: int) -> None:
        """Remember message ``number`` for deletion at :meth:`quit` (nothing is sent now)."""
        self._deleted.append(number)

    async def quit(self) -> str:
        """Flag the remembered messages ``\\Deleted`` and expunge them (see the module doc),
        then LOGOUT; closes the connection."""
        client = self._client
        try:
            if self._deleted:
                uids = sorted(set(self._deleted))
                for uids_part in uid_sets(uids):
                    await client.store_deleted(uids_part)
                if "UIDPLUS" in client.capabilities:
                    for uids_part in uid_sets(uids):
                        await client.uid_expunge(uids_part)
                else:
                    await self._expunge_if_only_ours(uids)
            if self._lender is not None:
                lender, self._lender = self._lender, None
                lender.give_back(client)  # back to IDLE at the next wait, no LOGOUT
                self._returned = True
                return ""
            return await client.logout()
        finally:
            if not self._returned:
                await client.close()

    async def _expunge_if_only_ours(self, ours: Sequence[int]) -> None:
        flagged = set(await self._client.uid_search("DELETED"))
        others = flagged - set(ours)
        if others:
            self.expunged = False
            log.warning(
                "IMAP folder %r: %d message(s) flagged \\Deleted by another client; without "
                "UIDPLUS an EXPUNGE would remove them too, so the %d delivered message(s) stay "
                "flagged until the folder is expunged",
                self._options.folder,
                len(others),
                len(ours),
            )
            return
        await self._client.expunge()

    async def close(self) -> None:
        """Drop the connection (a borrowed one too: after a failure it is out of step)."""
        if self._returned:
            return
        await self._client.close()
        if self._lender is not None:
            lender, self._lender = self._lender, None
            lender.give_back(self._client)  # closed: the lender opens a new one

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
