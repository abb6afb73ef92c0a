"""Twin dead letters: a dead letter stored but never recorded is matched to its next copy.

The cycle stores a dead letter, commits its ledger row, then DELEs the message (docs/design.md §5.1
step 4).  A process killed between the store and the commit (or one whose removal of its own file
after a failed commit failed too) leaves a dead letter the ledger does not know, and its message
still upstream: the next cycle dead-letters it again.  Kept twice, a ``requeue`` of both would
deliver it twice.

:class:`ReconcilingStore` wraps the configured store.  At the first ``put`` of the process it
lists the store once and keeps aside the dead letters whose ids the ledger does not record,
by account and UIDL.  A ``put`` of a message whose account, UIDL, recipients (the
``X-POP3-Connector-Recipients`` line) and original bytes are those of one of them returns that
one's id instead of storing a second copy, and the ledger then records it.  The bytes decide,
not the UIDL alone: RFC 1939 §7 lets a server give a UIDL to a new message once the old one is
gone, and the dead letter of that old message must stay.

Why at the first ``put``, not at start: a cycle costs what is new (docs/design.md §5.2), and a
``once`` from cron that dead-letters nothing never reads the store.  Why matched, not removed: an
unrecorded dead letter may also be one whose ledger row was forgotten once its message left the
server (docs/design.md §5.1 step 6); only the same message arriving again says which it is.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

from connector.deadletter import (
    HEADER_BLOCK_MAX,
    DeadLetterArchive,
    DeadLetterInfo,
    DeadLetterRecord,
    header_block_continues,
    parse_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.errors import DeadLetterError, LedgerError
from connector.spool import Spooled, size_of

log = logging.getLogger(__name__)

_Key = tuple[str, str]  # (account, UIDL) as written in the header lines


class ReconcilingStore:
    """A :class:`DeadLetterArchive` that stores no second copy of an unrecorded dead letter.

    ``recorded`` returns the dead-letter ids the ledger records (``Ledger.dead_letter_ids``).
    """

    def __init__(
        self, store: DeadLetterArchive, recorded: Callable[[], Awaitable[Collection[str]]]
    ) -> None:
        self.store = store
        self._recorded = recorded
        # (account, UIDL) -> the unrecorded dead letters; None until the first put looks.
        self._unrecorded: dict[_Key, builtins.list[DeadLetterRecord]] | None = None
        self._scan = asyncio.Lock()  # cycles of several accounts dead-letter at once: one scan

    def __repr__(self) -> str:
        return f"ReconcilingStore({self.store!r})"

    async def put(self, raw: bytes | Spooled, info: DeadLetterInfo) -> str:
        """The id of an unrecorded dead letter of this very message, else ``store.put``."""
        twin = await self._twin(raw, info)
        if twin is not None:
            log.info(
                "account=%s uidl=%s: dead letter %s was stored before but not recorded "
                "(a run stopped in between): recorded now instead of a second copy",
                info.account,
                info.uidl,
                twin,
            )
            return twin
        return await self.store.put(raw, info)

    async def remove(self, id: str) -> None:
        """``store.remove``; if the store refuses, the next ``put`` looks at the store again,
        so that the file left behind is matched to its message's next copy."""
        try:
            await self.store.remove(id)
        except DeadLetterError:
            self._unrecorded = None
            raise

    async def list(self) -> builtins.list[DeadLetterRecord]:
        return await self.store.list()

    async def get(self, id: str) -> bytes:
        return await self.store.get(id)

    def chunks(self, id: str) -> AsyncIterator[bytes]:
        return self.store.chunks(id)

    async def count_by_account(self) -> dict[str, int]:
        return await self.store.count_by_account()

    async def _twin(self, raw: bytes | Spooled, info: DeadLetterInfo) -> str | None:
        index = await self._index()
        # Compare as written: the header values are sanitised (dead_letter_headers).
        parsed = parse_dead_letter_headers(with_dead_letter_headers(b"", info))
        want = parsed[0] if parsed is not None else info
        candidates = index.get((want.account, want.uidl)) if index else None
        if not candidates:
            return None
        mine: str | None = None  # a spooled message's digest, taken once a candidate fits
        for record in builtins.list(candidates):
            if record.size != size_of(raw):
                continue
            try:
                if isinstance(raw, bytes):
                    same = await self._same_bytes(record.id, want, raw)
                else:
                    theirs = await self._stored_digest(record.id, want)
                    if theirs is not None and mine is None:
                        mine = await _digest(raw.chunks())
                    same = theirs is not None and theirs == mine
            except KeyError:  # purged or requeued meanwhile
                candidates.remove(record)
                continue
            except DeadLetterError as exc:
                log.warning("cannot read dead letter %s to compare it: %s", record.id, exc)
                continue
            if same:
                candidates.remove(record)
                return record.id
        return None

    async def _same_bytes(self, id: str, want: DeadLetterInfo, raw: bytes) -> bool:
        stored = await self.store.get(id)
        found = parse_dead_letter_headers(stored)
        if found is None:
            return False
        head, header_len = found
        return head.recipients == want.recipients and stored[header_len:] == raw

    async def _stored_digest(self, id: str, want: DeadLetterInfo) -> str | None:
        """SHA-256 of the original message in dead letter ``id`` (read a chunk at a time,
        for a spooled message's twin: docs/design.md §5.3), or None when it is not one of
        ours or names other recipients."""
        head = bytearray()
        digest = hashlib.sha256()
        parsed: tuple[DeadLetterInfo, int] | None = None
        async for data in self.store.chunks(id):
            if parsed is not None:
                await asyncio.to_thread(digest.update, data)
                continue
            head += data
            if len(head) < HEADER_BLOCK_MAX or header_block_continues(bytes(head)):
                continue  # our header lines may go on in the next chunk
            parsed = parse_dead_letter_headers(bytes(head))
            if parsed is None:
                return None
            digest.update(memoryview(head)[parsed[1] :])
            head = bytearray()
        if parsed is None:
            parsed = parse_dead_letter_headers(bytes(head))
            if parsed is None:
                return None
            digest.update(memoryview(head)[parsed[1] :])
        if parsed[0].recipients != want.recipients:
            return None
        return digest.hexdigest()

    async def _index(self) -> dict[_Key, builtins.list[DeadLetterRecord]] | None:
        """The unrecorded dead letters, looked up once; None if the store or ledger failed
        (then a plain put: a twin is possible, a failure of the put for this is not)."""
        async with self._scan:
            if self._unrecorded is None:
                try:
                    records = await self.store.list()
                    known = frozenset(await self._recorded())
                except (DeadLetterError, LedgerError) as exc:
                    log.warning("cannot look for unrecorded dead letters: %s", exc)
                    return None
                index: dict[_Key, builtins.list[DeadLetterRecord]] = {}
                for record in records:
                    if record.id not in known:
                        index.setdefault((record.account, record.uidl), []).append(record)
                # Most are dead letters whose rows were forgotten; the others are twins to be.
                log.debug("%d dead letters without a ledger row", sum(map(len, index.values())))
                self._unrecorded = index
            return self._unrecorded


async def _digest(chunks: AsyncIterator[bytes]) -> str:
    """SHA-256 of what ``chunks`` yields, hashed in a worker thread (large messages)."""
    digest = hashlib.sha256()
    async for data in chunks:
        await asyncio.to_thread(digest.update, data)
    return digest.hexdigest()


__all__ = ["ReconcilingStore"]
