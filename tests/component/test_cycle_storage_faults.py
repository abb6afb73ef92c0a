"""Issue 18 in the cycle: a ledger that cannot be written delivers nothing twice, and a dead
letter whose row failed leaves no twin.

The loopback servers of tests/component/test_cycle_lifecycle.py, a real ledger (its failures
are real SQLite aborts from temporary triggers; tests/reliability/test_storage_faults.py does the
same with full and read-only file systems and a second process holding the lock) and real or
in-memory stores.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connector.deadletter import (
    DeadLetterInfo,
    DeadLetterRecord,
    parse_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.deadletter.maildir import STALE_TMP, MaildirStore
from connector.deadletter.reconcile import ReconcilingStore
from connector.errors import DeadLetterError, LedgerError
from connector.ledger import Ledger
from connector.notices import RecordingStore
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


async def test_the_admin_digest_forgets_a_dead_letter_that_was_removed() -> None:
    inner = InMemoryDeadLetterStore()
    recorded = RecordingStore(inner)
    kept = await recorded.put(mail(1), _info("u1"))
    gone = await recorded.put(mail(2), _info("u2"))
    await recorded.remove(gone)
    assert [n.id for n in recorded.notes] == [kept]
    assert list(inner.messages) == [kept]


# -- ReconcilingStore ---------------------------------------------------------------------------


def _info(uidl: str, recipients: tuple[str, ...] = (), account: str = "info") -> DeadLetterInfo:
    return DeadLetterInfo(
        account, uidl, "data", "554 5.1.0 Sender denied", datetime(2026, 1, 2, tzinfo=UTC),
        recipients,
    )  # fmt: skip


class CountingStore(InMemoryDeadLetterStore):
    def __init__(self) -> None:
        super().__init__()
        self.list_calls = 0

    async def list(self) -> list[DeadLetterRecord]:
        self.list_calls += 1
        return await super().list()


async def test_an_unrecorded_dead_letter_is_reused_only_for_the_same_message() -> None:
    inner = CountingStore()
    orphan = await inner.put(mail(1), _info("u1"))  # a run killed before the commit
    recorded_one = await inner.put(mail(2), _info("u2"))  # recorded: never reused
    named = await inner.put(mail(3), _info("u3", ("bob@firma.local",)))
    recorded = {recorded_one}

    async def ids() -> frozenset[str]:
        return frozenset(recorded)

    store = ReconcilingStore(inner, ids)
    assert await store.put(mail(1), _info("u1")) == orphan
    # Once matched it is recorded by the caller: the next copy is a new dead letter.
    assert await store.put(mail(1), _info("u1")) != orphan
    assert await store.put(mail(2), _info("u2")) != recorded_one
    # The same UIDL for other bytes (RFC 1939 §7: a server may reuse one), another account,
    # other recipients: other dead letters.
    assert await store.put(mail(9), _info("u3", ("bob@firma.local",))) != named
    assert await store.put(mail(3), _info("u3", ("eve@firma.local",))) != named
    assert await store.put(mail(3), _info("u3", ("bob@firma.local",), "sales")) != named
    assert await store.put(mail(3), _info("u3", ("bob@firma.local",))) == named
    assert inner.list_calls == 1  # one look at the store per process


async def test_reconciling_passes_on_a_store_it_cannot_list() -> None:
    class Unlistable(InMemoryDeadLetterStore):
        async def list(self) -> list[DeadLetterRecord]:
            raise DeadLetterError("memory", "timed out")

    async def ids() -> frozenset[str]:
        return frozenset()

    inner = Unlistable()
    store = ReconcilingStore(inner, ids)
    await store.put(mail(1), _info("u1"))
    assert len(inner.messages) == 1


async def test_reconciling_skips_a_dead_letter_removed_meanwhile() -> None:
    inner = InMemoryDeadLetterStore()
    orphan = await inner.put(mail(1), _info("u1"))

    async def ids() -> frozenset[str]:
        return frozenset()

    store = ReconcilingStore(inner, ids)
    await store.put(mail(5), _info("u5"))  # the scan happens here
    await inner.remove(orphan)  # `dead-letters purge` in another process
    new = await store.put(mail(1), _info("u1"))
    assert new != orphan
    parsed = parse_dead_letter_headers(inner.messages[new])
    assert parsed is not None
    assert inner.messages[new] == with_dead_letter_headers(mail(1), _info("u1"))


# -- the Maildir's tmp/ -------------------------------------------------------------------------


async def test_partial_files_in_tmp_older_than_36_hours_are_removed(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "dead")
    assert await store.remove_stale_tmp() == 0  # no Maildir yet
    await store.put(mail(1), _info("u1"))
    tmp = store.path / "tmp"
    now = time.time()
    old, young = tmp / "1.M1P1Q1.host", tmp / "2.M2P2Q2.host"
    for path, age in ((old, STALE_TMP + 60), (young, STALE_TMP - 3600)):
        path.write_bytes(b"X-POP3-Connector-Account: info\r\n")  # a write that died
        os.utime(path, (now - age, now - age))
    assert await store.remove_stale_tmp() == 1
    assert sorted(p.name for p in tmp.iterdir()) == [young.name]
    assert len(await store.list()) == 1  # what is in new/ is untouched
