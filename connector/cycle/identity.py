"""Who a message is, so that the ledger never takes one message for another.

* :func:`uid_listing`: each message's identifier, its UIDL (RFC 1939 §7) or, on a server
  without UIDL, a stand-in (:func:`stand_in_uidl`) that never depends on the other messages.
* :class:`Identities`: what the ledger keeps of each message (LIST's size and a digest of its
  header block), and the cheap check that a message the ledger knows as finished is still the
  one listed under its UIDL before it is DELEd unread (docs/design.md §5.1 step 1).
* :func:`duplicate_key`: the ledger key under which a shared mailbox's copies of one message
  meet (docs/design.md §8.2).
* :func:`carry_over`: an IMAP folder whose UIDVALIDITY changed lists every message under a new
  identifier; the ledger's rows follow them, matched by identity (docs/design.md §15.2).
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Final, Protocol, runtime_checkable

from connector import headers
from connector.errors import Pop3ResponseError
from connector.ledger import Identity, LedgerEntry
from connector.spool import Spooled, head_of

log = logging.getLogger(__name__)


class Reader(Protocol):
    """The POP3 commands that tell messages apart (``connector.pop3.Pop3Client``)."""

    @property
    def capabilities(self) -> Mapping[str, Sequence[str]]:
        """CAPA's answer: upper-case capability name -> its arguments."""
        ...

    async def uidl(self) -> builtins.list[tuple[int, str]]:
        """UIDL: (message number, unique-id) of every message."""
        ...

    async def top(self, number: int, lines: int) -> bytes:
        """TOP: the header block and ``lines`` lines of the body."""
        ...

    async def retr(self, number: int) -> bytes:
        """RETR: the whole message."""
        ...


def stand_in_uidl(data: bytes, size: int | None = None) -> str:
    """A stand-in UIDL for servers without UIDL: a digest of the header block (TOP n 0) and
    the message's size, or of the whole message when headers and size are not unique."""
    digest = hashlib.sha256(data)
    if size is not None:
        digest.update(b"\0%d" % size)
    return "sha256:" + digest.hexdigest()[:40]


# A Message-ID longer than this goes into a duplicate key as its digest, to bound the key.
_MAX_KEY_MESSAGE_ID: Final = 200


def duplicate_key(mid: str, raw: bytes | Spooled) -> str:
    """The ledger key under which a shared mailbox's copies of one message meet:
    ``mid:<Message-ID>:<SHA-256 of the body, hex>``.

    A provider stores one copy per recipient of ours, and the copies differ only in the trace
    fields at the top (``Delivered-To``, ``Received``: RFC 5321 §4.4), so the Message-ID and the
    body (the bytes after the header block) identify them.  The Message-ID alone does not: a
    broken mailer reuses one, and a forged message could reuse one to have the real one
    dropped; a different body is a different message, and is delivered.  The digest has a
    fixed length at the end, so no two (Message-ID, body) pairs give one key.

    A spooled message's body digest was taken while it was written (``Spooled.body_digest``,
    the same octets); the cycle asks its spool writer for it whenever a key may be needed.
    """
    if isinstance(raw, bytes):
        # The body after the header block (headers.bounds: an empty line within its cap;
        # without one the whole message is taken, which is safe).
        found = headers.bounds(raw)
        body = memoryview(raw)[found[1] :] if found is not None else raw
        digest = hashlib.sha256(body).hexdigest()
    elif raw.body_digest is None:
        raise ValueError("a spooled message without the digest of its body")
    else:
        digest = raw.body_digest
    if len(mid) > _MAX_KEY_MESSAGE_ID:
        mid = "sha256:" + hashlib.sha256(mid.encode("ascii")).hexdigest()
    return f"mid:{mid}:{digest}"


async def uid_listing(pop: Reader, count: int, sizes: Mapping[int, int]) -> list[tuple[int, str]]:
    """(number, uid) of every message: UIDL (RFC 1939 §7), or digests on a server without it.

    An identifier must never depend on which other messages are in the mailbox: the ledger
    would then take one message for another, and delete one that was never delivered.  So
    messages whose headers and size are alike are told apart by a digest of their whole bytes;
    only byte-identical copies share one, and are numbered (one copy delivered stands for all).
    """
    try:
        return await pop.uidl()
    except Pop3ResponseError as exc:
        # RFC 1939 §7: UIDL is optional, and only a server that lacks it gets the fallback.  A
        # response code ([SYS/TEMP], [IN-USE]) or UIDL in CAPA means "later": falling back then
        # would give every message a new identity and deliver it all again.
        if exc.resp_code is not None or "UIDL" in pop.capabilities:
            raise
        log.warning("server has no UIDL; identifying messages by digests of their content")
    groups: dict[str, list[int]] = {}
    for n in range(1, count + 1):
        groups.setdefault(stand_in_uidl(await pop.top(n, 0), sizes.get(n)), []).append(n)
    listing: list[tuple[int, str]] = []
    for uid, numbers in groups.items():
        if len(numbers) == 1:
            listing.append((numbers[0], uid))
            continue
        seen: dict[str, int] = {}
        for n in numbers:
            full = stand_in_uidl(await pop.retr(n))
            seen[full] = seen.get(full, 0) + 1
            listing.append((n, full if seen[full] == 1 else f"{full}#{seen[full]}"))
    return sorted(listing)


class Identities:
    """The identities of one session's messages: recorded with each row, checked before a DELE.

    ``sizes`` is the session's LIST (message number -> octets), set once it is read.
    """

    __slots__ = ("_no_top", "account", "sizes")

    def __init__(self, account: str) -> None:
        self.account = account
        self.sizes: Mapping[int, int] = {}
        self._no_top = False  # the server answered TOP with a bare -ERR: it has none

    def of(self, number: int, raw: bytes | Spooled) -> Identity:
        """What the ledger keeps to recognise message ``number`` later (docs/design.md §5.1)."""
        return Identity(self.sizes.get(number), headers.header_digest(head_of(raw)))

    async def same(self, pop: Reader, number: int, uid: str, entry: LedgerEntry) -> bool:
        """Whether the message listed as ``number`` is the one ``entry`` recorded, checked
        cheaply before it is DELEd unread (docs/design.md §5.1 step 1): the size LIST gave,
        then, only when that matches, a digest of its header block from ``TOP n 0``.

        Runs only for a finished message being DELEd now (after a crash before QUIT, or when
        ``delete_after`` has passed), never for the kept messages of a ``leave_on_server``
        mailbox, so a steady cycle costs nothing more.  A row without an identity, and a server
        without UIDL (whose identifiers are such digests already), are taken as they are.  A
        server without TOP (a bare ``-ERR``; TOP is optional) gets a RETR instead: the whole
        message, once, for the rare DELE that needs the check.
        """
        identity = entry.identity
        if identity is None or uid.startswith(("sha256:", "imap:")):
            # IMAP: a UID is never reused while the UIDVALIDITY in the key stands (RFC 3501
            # §2.3.1.1), so the key alone says it is the same message.
            return True
        listed = self.sizes.get(number)
        if identity.size is not None and listed is not None and listed != identity.size:
            return False  # a size LIST did not give now tells nothing: the digest decides
        if not self._no_top:
            try:
                return headers.header_digest(await pop.top(number, 0)) == identity.digest
            except Pop3ResponseError as exc:
                if exc.resp_code is not None:
                    raise  # [SYS/TEMP] and the like: the cycle fails, nothing is guessed
                self._no_top = True
                log.info("account=%s: the server has no TOP; checking by RETR", self.account)
        return headers.header_digest(await pop.retr(number)) == identity.digest


@runtime_checkable
class Renumbering(Protocol):
    """A session whose identifiers hold the epoch they are valid in, ``family`` + epoch + ":"
    (IMAP: ``imap:<UIDVALIDITY>:<UID>``; ``connector.imap.ImapSession``)."""

    @property
    def family(self) -> str:
        """The prefix every identifier of this kind has (``imap:``)."""
        ...

    @property
    def epoch(self) -> str:
        """The prefix of this session's identifiers (``imap:<UIDVALIDITY>:``)."""
        ...

    def header_blocks(self, numbers: Sequence[int]) -> AsyncIterator[tuple[int, bytes]]:
        """(number, header block) of each message of ``numbers`` still there."""
        ...


class EpochLedger(Protocol):
    """The ledger methods :func:`carry_over` uses (``connector.ledger.Ledger``)."""

    async def entries_outside(
        self, account: str, family: str, current: str
    ) -> builtins.list[LedgerEntry]: ...

    async def rekey(self, account: str, renames: Mapping[str, str]) -> None: ...


_TRAILING_NUMBER: Final = re.compile(r"(\d{1,10})$")


def _order(uid: str) -> tuple[int, str]:
    m = _TRAILING_NUMBER.search(uid)
    return (int(m.group(1)) if m else 0, uid)


async def carry_over(
    ledger: EpochLedger,
    account: str,
    session: Renumbering,
    listing: Sequence[tuple[int, str]],
    sizes: Mapping[int, int],
) -> Collection[str]:
    """Give the ledger's rows of an earlier epoch to the messages listed now that are the same
    (docs/design.md §15.2); return the old keys carried over.

    An IMAP server that changes a folder's UIDVALIDITY (a rebuilt index, a restored or
    migrated mailbox) lists every message under a new UID; under the new keys the ledger
    would know none of them, and the listing sync would forget the old rows: every message
    kept upstream, deferred or finished but not yet expunged would be delivered again.  So,
    before the sync, when the ledger holds rows of another epoch, the listed messages' header
    blocks are read (once, after the change) and each old row that records an identity (LIST
    size and header digest, the same identity the check before a DELE uses) goes to the listed
    message with that identity, pairing in order of UID among equals (byte-identical copies).
    A row without an identity, or whose message is not listed any more, is left to the sync,
    which forgets it (its message is gone).  A steady folder costs one read of the ledger.
    """
    stale = await ledger.entries_outside(account, session.family, session.epoch)
    if not stale:
        return ()
    waiting: dict[tuple[int | None, str], list[str]] = {}
    for entry in sorted(stale, key=lambda e: _order(e.uidl)):
        if entry.identity is not None:
            key = (entry.identity.size, entry.identity.digest)
            waiting.setdefault(key, []).append(entry.uidl)
    keys = dict(listing)
    renames: dict[str, str] = {}
    if waiting:
        async for number, header in session.header_blocks(sorted(keys)):
            olds = waiting.get((sizes.get(number), headers.header_digest(header)))
            if olds and number in keys:
                renames[olds.pop(0)] = keys[number]
    if renames:
        await ledger.rekey(account, renames)
    log.warning(
        "account=%s: the folder's identifiers changed (%s, was %s): %d known message(s) "
        "recognised by size and header digest and kept as they were; %d row(s) of messages "
        "no longer there forgotten",
        account,
        session.epoch.rstrip(":"),
        ", ".join(sorted({e.uidl.rsplit(":", 1)[0] for e in stale}))[:200],
        len(renames),
        len(stale) - len(renames),
    )
    return renames.keys()
