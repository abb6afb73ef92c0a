"""Who a message is: its identifier in the ledger (the UIDL, or a stand-in on a server without
UIDL) and the key under which a shared mailbox's copies of one message meet."""

from __future__ import annotations

import hashlib
import logging
from typing import Final

from connector import headers
from connector.errors import Pop3ResponseError
from connector.pop3 import Pop3Client

log = logging.getLogger(__name__)


def header_digest(data: bytes, size: int | None = None) -> str:
    """A stand-in UIDL for servers without UIDL: a digest of the header block (TOP n 0) and
    the message's size, or of the whole message when headers and size are not unique."""
    digest = hashlib.sha256(data)
    if size is not None:
        digest.update(b"\0%d" % size)
    return "sha256:" + digest.hexdigest()[:40]


# A Message-ID longer than this goes into a duplicate key as its digest, to bound the key.
_MAX_KEY_MESSAGE_ID: Final = 200


def duplicate_key(mid: str, raw: bytes) -> str:
    """The ledger key under which a shared mailbox's copies of one message meet:
    ``mid:<Message-ID>:<SHA-256 of the body, hex>``.

    A provider stores one copy per recipient of ours, and the copies differ only in the trace
    fields at the top (``Delivered-To``, ``Received``: RFC 5321 §4.4), so the Message-ID and the
    body (the bytes after the header block) identify them.  The Message-ID alone does not: a
    broken mailer reuses one, and a forged message could reuse one to have the real one
    dropped; a different body is a different message, and is delivered.  The digest has a
    fixed length at the end, so no two (Message-ID, body) pairs give one key.
    """
    # The body after the header block (headers.bounds: an empty line within its cap; without
    # one the whole message is taken, which is safe).
    found = headers.bounds(raw)
    body = memoryview(raw)[found[1] :] if found is not None else raw
    if len(mid) > _MAX_KEY_MESSAGE_ID:
        mid = "sha256:" + hashlib.sha256(mid.encode("ascii")).hexdigest()
    return f"mid:{mid}:{hashlib.sha256(body).hexdigest()}"


async def uid_listing(pop: Pop3Client, count: int, sizes: dict[int, int]) -> list[tuple[int, str]]:
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
        groups.setdefault(header_digest(await pop.top(n, 0), sizes.get(n)), []).append(n)
    listing: list[tuple[int, str]] = []
    for uid, numbers in groups.items():
        if len(numbers) == 1:
            listing.append((numbers[0], uid))
            continue
        seen: dict[str, int] = {}
        for n in numbers:
            full = header_digest(await pop.retr(n))
            seen[full] = seen.get(full, 0) + 1
            listing.append((n, full if seen[full] == 1 else f"{full}#{seen[full]}"))
    return sorted(listing)
