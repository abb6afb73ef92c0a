"""carry_over (docs/design.md §15.2): when a folder's UIDVALIDITY changes, the ledger's rows
follow their messages by identity (on the cycle's fakes)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from connector.cycle.identity import carry_over
from connector.headers import header_digest
from connector.ledger import Identity
from tests.fakes import FakeLedger


class Renumbered:
    """A session whose folder got a new UIDVALIDITY (cycle.identity.Renumbering)."""

    family = "imap:"

    def __init__(self, epoch: int, headers: dict[int, bytes]) -> None:
        self.epoch = f"imap:{epoch}:"
        self.headers = headers
        self.asked: list[int] = []

    async def header_blocks(self, numbers: Sequence[int]) -> AsyncIterator[tuple[int, bytes]]:
        self.asked += numbers
        for n in numbers:
            if n in self.headers:
                yield n, self.headers[n]


def head(i: int) -> bytes:
    return f"Subject: {i}\r\nMessage-ID: <{i}@x>\r\n\r\n".encode()


def identity(i: int, size: int = 100) -> Identity:
    return Identity(size, header_digest(head(i)))


async def test_carry_over_pairs_rows_with_messages_by_identity() -> None:
    ledger = FakeLedger()
    # Old epoch 5: messages 1, 2 (two byte-identical copies of 2), 3 gone, 4 without identity.
    await ledger.record_delivered("a", "imap:5:10", 100, "250", 1.0, identity=identity(1))
    await ledger.record_delivered("a", "imap:5:11", 100, "250", 1.0, identity=identity(2))
    await ledger.record_deferred("a", "imap:5:12", 100, "451", 1.0, identity=identity(2))
    await ledger.record_delivered("a", "imap:5:13", 100, "250", 1.0, identity=identity(3))
    await ledger.record_delivered("a", "imap:5:14", 100, "250", 1.0)
    session = Renumbered(9, {1: head(2), 2: head(1), 3: head(2), 4: head(7)})
    listing = [(n, f"imap:9:{n}") for n in (1, 2, 3, 4)]
    moved = await carry_over(ledger, "a", session, listing, dict.fromkeys((1, 2, 3, 4), 100))
    assert sorted(moved) == ["imap:5:10", "imap:5:11", "imap:5:12"]
    keys = {uidl for (_, uidl) in ledger.rows}
    assert {"imap:9:1", "imap:9:2", "imap:9:3"} <= keys
    # Byte-identical copies pair in UID order: 11 -> 1 (delivered), 12 -> 3 (deferred).
    assert ledger.rows[("a", "imap:9:1")].state.value == "delivered"
    assert ledger.rows[("a", "imap:9:3")].state.value == "deferred"
    assert "imap:9:4" not in keys  # a new message: delivered
    assert {"imap:5:13", "imap:5:14"} <= keys  # left for the sync to forget


async def test_carry_over_costs_one_read_when_nothing_changed() -> None:
    ledger = FakeLedger()
    await ledger.record_delivered("a", "imap:9:1", 100, "250", 1.0, identity=identity(1))
    session = Renumbered(9, {1: head(1)})
    assert await carry_over(ledger, "a", session, [(1, "imap:9:1")], {1: 100}) == ()
    assert session.asked == []  # no header fetched
