"""Issue 18 in the cycle: a ledger that cannot be written delivers nothing twice, and a dead
letter whose row failed leaves no twin.

The loopback servers of tests/component/test_cycle_lifecycle.py, a real ledger (its failures
are real SQLite aborts from temporary triggers; tests/reliability/test_storage_faults.py does the
same with full and read-only file systems and a second process holding the lock) and real or
in-memory stores.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from connector.deadletter.maildir import MaildirStore
from connector.deadletter.reconcile import ReconcilingStore
from connector.errors import DeadLetterError, LedgerError
from connector.ledger import Ledger
from tests.component.test_cycle_lifecycle import USER, Rig, deny, mail, make_rig
from tests.fakes import InMemoryDeadLetterStore
from tests.peek import total_changes


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async for r in make_rig(tmp_path, deny("@bad.example")):
        yield r


async def _sql(ledger: Ledger, statement: str) -> None:
    await ledger._submit("test", lambda conn: conn.execute(statement))


async def _beats(ledger: Ledger) -> int:
    def run(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT beats FROM heartbeat").fetchone()
        return 0 if row is None else int(row[0])

    return await ledger._submit("beats", run)


def _files(store: MaildirStore) -> list[Path]:
    return sorted(p for sub in ("tmp", "new", "cur") for p in (store.path / sub).glob("*"))


# -- the proof before the first SMTP transaction ----------------------------------------------


async def test_the_ledger_proves_it_can_commit_only_in_a_cycle_with_something_new(
    rig: Rig,
) -> None:
    await (await rig.cycle()).run()  # empty mailbox
    assert await _beats(rig.ledger) == 0
    rig.pop.add_message(USER, mail(1))
    await (await rig.cycle()).run()
    assert await _beats(rig.ledger) == 1
    rig.pop.add_message(USER, mail(2))
    rig.pop.add_message(USER, mail(3))
    await (await rig.cycle()).run()  # one proof per cycle, not per message
    assert await _beats(rig.ledger) == 2
    await (await rig.cycle()).run()  # the listing sync notes m2 and m3 gone upstream
    before = await total_changes(rig.ledger)
    await (await rig.cycle()).run()  # nothing new: no write at all
    assert await total_changes(rig.ledger) == before
    assert len(rig.sink.messages) == 3


async def test_a_ledger_that_cannot_commit_stops_the_cycle_before_any_smtp(rig: Rig) -> None:
    # The listing sync commits nothing when nothing changed, so it passes; without the proof
    # the first real write is the row after the 250, and the message goes out every cycle.
    uid = rig.pop.add_message(USER, mail(1))
    await _sql(
        rig.ledger,
        "CREATE TEMP TRIGGER full BEFORE INSERT ON main.heartbeat"
        " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )
    for _ in range(3):
        with pytest.raises(LedgerError, match="disk is full"):
            await (await rig.cycle()).run()
    assert rig.sink.messages == []
    assert rig.sink.sessions == 0  # not even connected
    assert rig.pop.uidls(USER) == [uid]
    assert not rig.ledger.writable
    await _sql(rig.ledger, "DROP TRIGGER full")
    assert (await (await rig.cycle()).run()).delivered == 1
    assert len(rig.sink.messages) == 1
    assert rig.ledger.writable


async def test_a_delivered_row_that_fails_is_recorded_by_the_next_cycle_not_sent_again(
    rig: Rig,
) -> None:
    # The proof passed, the 250 came, then the row failed (the disk filled in between): the
    # message is known as delivered from then on, and DELEd once its row is committed.
    uids = [rig.pop.add_message(USER, mail(i)) for i in range(3)]
    await _sql(
        rig.ledger,
        "CREATE TEMP TRIGGER full BEFORE INSERT ON main.messages"
        " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )
    with pytest.raises(LedgerError, match="disk is full"):
        await (await rig.cycle()).run()
    assert len(rig.sink.messages) == 1  # the next content waited for that commit
    assert rig.ledger.unrecorded == 1
    for _ in range(2):  # still full: the owed row fails the listing sync, nothing is sent
        with pytest.raises(LedgerError, match="disk is full"):
            await (await rig.cycle()).run()
    assert len(rig.sink.messages) == 1
    assert rig.pop.uidls(USER) == uids
    await _sql(rig.ledger, "DROP TRIGGER full")
    stats = await (await rig.cycle()).run()
    assert (stats.skipped, stats.delivered) == (1, 2)  # m0 only DELEd
    assert [m.data.rsplit(b"\r\n", 2)[-2] for m in rig.sink.messages] == [
        b"body 0",
        b"body 1",
        b"body 2",
    ]
    assert rig.pop.uidls(USER) == []


# -- a dead letter whose row fails ------------------------------------------------------------


async def test_a_dead_letter_whose_row_fails_to_commit_is_removed(rig: Rig) -> None:
    assert isinstance(rig.store, MaildirStore)
    uid = rig.pop.add_message(USER, mail(1, "x@bad.example"))
    await _sql(
        rig.ledger,
        "CREATE TEMP TRIGGER locked BEFORE INSERT ON main.messages"
        " WHEN NEW.state = 'dead_lettered' BEGIN SELECT RAISE(ABORT, 'database is locked'); END",
    )
    with pytest.raises(LedgerError, match="locked"):
        await (await rig.cycle()).run()
    assert _files(rig.store) == []  # stored, then removed: no twin for the next cycle
    assert rig.pop.uidls(USER) == [uid]
    await _sql(rig.ledger, "DROP TRIGGER locked")
    assert (await (await rig.cycle()).run()).dead_lettered == 1
    (only,) = _files(rig.store)
    entry = await rig.ledger.entry("info", uid)
    assert entry is not None
    assert entry.dead_letter_id == only.name


async def test_a_dead_letter_is_kept_when_its_row_was_committed_after_all(rig: Rig) -> None:
    # A commit reported failed but durable: removing the file would leave a recorded dead
    # letter without its message, which the next cycle DELEs.  The ledger decides.
    assert isinstance(rig.store, MaildirStore)
    real = rig.ledger.record_dead_lettered

    async def committed_then_failed(*args: Any, **kwargs: Any) -> None:
        await real(*args, **kwargs)
        raise LedgerError("ledger: record dead_lettered failed: disk I/O error [SQLITE_IOERR]")

    rig.ledger.record_dead_lettered = committed_then_failed  # type: ignore[method-assign]
    uid = rig.pop.add_message(USER, mail(1, "x@bad.example"))
    with pytest.raises(LedgerError):
        await (await rig.cycle()).run()
    (kept,) = _files(rig.store)
    entry = await rig.ledger.entry("info", uid)
    assert entry is not None
    assert entry.dead_letter_id == kept.name


class UnremovableStore(InMemoryDeadLetterStore):
    """A store whose remove fails, as a read-only Maildir's would."""

    async def remove(self, id: str) -> None:
        raise DeadLetterError(self.store_name, "cannot remove: Read-only file system")


async def test_a_dead_letter_left_behind_is_matched_to_the_next_copy(rig: Rig) -> None:
    # The row failed and so did the removal: the next cycle's dead letter of the same
    # message is that one (recorded now), not a second copy.
    inner = UnremovableStore()
    rig.store = ReconcilingStore(inner, rig.ledger.dead_letter_ids)  # type: ignore[assignment]
    uid = rig.pop.add_message(USER, mail(1, "x@bad.example"))
    await _sql(
        rig.ledger,
        "CREATE TEMP TRIGGER locked BEFORE INSERT ON main.messages"
        " BEGIN SELECT RAISE(ABORT, 'database is locked'); END",
    )
    with pytest.raises(LedgerError):
        await (await rig.cycle()).run()
    assert len(inner.messages) == 1
    await _sql(rig.ledger, "DROP TRIGGER locked")
    assert (await (await rig.cycle()).run()).dead_lettered == 1
    assert len(inner.messages) == 1
    (dl_id,) = inner.messages
    entry = await rig.ledger.entry("info", uid)
    assert entry is not None
    assert entry.dead_letter_id == dl_id
    assert inner.put_calls == 1
