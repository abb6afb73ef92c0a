"""The ledger for IMAP accounts (docs/design.md §15.2): the rows of another UIDVALIDITY, and
moving them to new keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connector.ledger import Ledger, RecipientsDone


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


async def test_entries_outside_takes_every_other_epoch_and_nothing_else(ledger: Ledger) -> None:
    keys = [
        "imap:123:1",
        "imap:123:99",
        "imap:12:5",  # ":" sorts after "3": the range must not be a prefix test
        "imap:1234:5",
        "imap:124:1",
        "0000000165a1b2c",  # a POP3 UIDL of the same account (a protocol change)
    ]
    for key in keys:
        await ledger.record_delivered("a", key, 10, "250 ok", 1.0)
    await ledger.record_delivered("b", "imap:1:1", 10, "250 ok", 1.0)
    outside = await ledger.entries_outside("a", "imap:", "imap:123:")
    assert sorted(e.uidl for e in outside) == ["imap:1234:5", "imap:124:1", "imap:12:5"]
    with pytest.raises(ValueError, match="prefixes"):
        await ledger.entries_outside("a", "imap", "imap:1:")


async def test_rekey_moves_rows_and_their_recipients_and_keeps_a_row_already_there(
    ledger: Ledger,
) -> None:
    done = RecipientsDone(("uidl:imap:1:7",), ("anna@firma.local",))
    await ledger.record_deferred("a", "imap:1:7", 10, "451 later", 5.0, done=done)
    await ledger.record_delivered("a", "imap:1:8", 10, "250 ok", 5.0)
    await ledger.record_delivered("a", "imap:2:2", 10, "250 ok", 6.0)  # already there
    await ledger.rekey("a", {"imap:1:7": "imap:2:1", "imap:1:8": "imap:2:2"})
    moved = await ledger.entry("a", "imap:2:1")
    assert moved is not None
    assert (moved.state.value, moved.first_seen) == ("deferred", 5.0)
    assert await ledger.entry("a", "imap:1:7") is None
    assert await ledger.recipients_by_key("a", ["uidl:imap:2:1"]) == {
        "uidl:imap:2:1": frozenset({"anna@firma.local"})
    }
    kept = await ledger.entry("a", "imap:2:2")
    assert kept is not None
    assert kept.last_attempt == 6.0
    assert await ledger.entry("a", "imap:1:8") is not None  # left for the listing sync
