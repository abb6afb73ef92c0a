"""What only tests ask of the connector's objects, kept out of the package.

The ledger's change counter (a steady listing writes nothing) and its done recipients by key;
POP3 commands the connector never sends (NOOP, RSET) and RETR in its plain ``(number, raw)``
form; whether an SMTP session is open.  Each goes through the object's own machinery, so it
behaves as a method there would.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence

from connector.ledger import Ledger
from connector.pop3 import Pop3Client
from connector.pop3.client import RETR_WINDOW, RETR_WINDOW_OCTETS
from connector.pop3.protocol import Command, Verb
from connector.smtp import SmtpDeliverer


async def total_changes(ledger: Ledger) -> int:
    """Rows changed through the ledger's connection since it was opened (SQLite's counter)."""
    return await ledger._submit("total_changes", lambda conn: conn.total_changes)


async def done_recipients(ledger: Ledger, account: str, keys: Collection[str]) -> frozenset[str]:
    """The recipients (lower case) recorded as done under any of ``keys``."""
    found = await ledger.recipients_by_key(account, keys)
    return frozenset(r for recipients in found.values() for r in recipients)


async def noop(pop: Pop3Client) -> None:
    """NOOP (RFC 1939 §5)."""
    await pop._ok(Command(Verb.NOOP))


async def rset(pop: Pop3Client) -> None:
    """RSET (RFC 1939 §5): unmark every message marked by DELE in this session."""
    await pop._ok(Command(Verb.RSET))


async def retr_many(
    pop: Pop3Client,
    numbers: Sequence[int],
    window: int = RETR_WINDOW,
    window_octets: int = RETR_WINDOW_OCTETS,
    sizes: Mapping[int, int] | None = None,
) -> AsyncIterator[tuple[int, bytes]]:
    """``(number, raw)`` for each message in order: ``retrieve_many`` without the wire form.
    Closing this generator closes the inner one."""
    async with contextlib.aclosing(
        pop.retrieve_many(numbers, window, window_octets, sizes)
    ) as items:
        async for item in items:
            yield item.number, item.raw


def smtp_connected(deliverer: SmtpDeliverer) -> bool:
    """True while a set-up SMTP session is open (it may still be dropped by the server)."""
    return deliverer._smtp is not None and deliverer._smtp.is_connected
