"""The SQLite ledger, on a real database file in tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from connector import ledger as ledger_module
from connector.errors import LedgerError
from connector.ledger import (
    MIGRATIONS,
    AccountStatus,
    CycleRecord,
    Failures,
    Identity,
    Ledger,
    LedgerEntry,
    MessageState,
    RecipientsDone,
)
from tests.peek import done_recipients, total_changes

T0 = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.sqlite3"


@pytest.fixture
async def ledger(db_path: Path) -> AsyncIterator[Ledger]:
    led = await Ledger.open(db_path)
    try:
        yield led
    finally:
        await led.close()


def _user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    conn.close()
    return int(version)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- opening, migrations, permissions ---------------------------------------------------------


async def test_open_creates_schema_and_reopen_is_idempotent(db_path: Path) -> None:
    led = await Ledger.open(db_path)
    await led.record_delivered("info", "u1", 100, "250 ok", T0)
    await led.close()
    assert _user_version(db_path) == len(MIGRATIONS) == 7

    with sqlite3.connect(db_path) as conn:
        (journal,) = conn.execute("PRAGMA journal_mode").fetchone()
        tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    conn.close()
    assert journal == "wal"
    assert set(tables) == {"messages", "accounts", "recipients_done", "heartbeat"}
    assert "WITHOUT ROWID" in tables["messages"]

    again = await Ledger.open(db_path)  # migration 1 would fail with "table exists" if re-run
    try:
        entry = await again.entry("info", "u1")
        assert entry is not None
        assert entry.state is MessageState.DELIVERED
    finally:
        await again.close()
    assert _user_version(db_path) == len(MIGRATIONS)


async def test_pending_migration_runs_once(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await (await Ledger.open(db_path)).close()
    migrations = [
        *MIGRATIONS,
        "CREATE TABLE extra (x INTEGER);\nCREATE INDEX extra_x ON extra (x);",
    ]
    monkeypatch.setattr(ledger_module, "MIGRATIONS", migrations)
    await (await Ledger.open(db_path)).close()
    assert _user_version(db_path) == len(migrations)
    await (await Ledger.open(db_path)).close()  # would fail on "table extra exists"
    assert _user_version(db_path) == len(migrations)


async def test_failing_migration_rolls_back(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await (await Ledger.open(db_path)).close()
    migrations = [*MIGRATIONS, "CREATE TABLE extra (x INTEGER);\nSELECT * FROM no_such_table;"]
    monkeypatch.setattr(ledger_module, "MIGRATIONS", migrations)
    with pytest.raises(LedgerError, match="no such table"):
        await Ledger.open(db_path)
    assert _user_version(db_path) == len(MIGRATIONS)
    with sqlite3.connect(db_path) as conn:
        names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "extra" not in names


async def test_newer_schema_is_refused(db_path: Path) -> None:
    await (await Ledger.open(db_path)).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(LedgerError, match="schema version 99 is newer"):
        await Ledger.open(db_path)


async def test_not_a_database_is_a_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"this is not SQLite\n" * 100)
    with pytest.raises(LedgerError, match="not a database"):
        await Ledger.open(path)


async def test_new_file_and_directory_are_owner_only(db_path: Path) -> None:
    led = await Ledger.open(db_path)
    await led.record_delivered("info", "u1", 1, "250 ok", T0)
    try:
        assert _mode(db_path.parent) == 0o700
        assert _mode(db_path) == 0o600
        # SQLite copies the database's mode to its WAL files, which hold the same data.
        assert _mode(db_path.with_name(db_path.name + "-wal")) == 0o600
        assert _mode(db_path.with_name(db_path.name + "-shm")) == 0o600
    finally:
        await led.close()


async def test_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    await (await Ledger.open(state / "ledger.sqlite3")).close()
    assert _mode(state) == 0o755
    assert _mode(state / "ledger.sqlite3") == 0o600


# -- per-message state ------------------------------------------------------------------------


async def test_state_transitions(ledger: Ledger) -> None:
    assert await ledger.sync_listing("info", ["a", "b", "c"]) == {}

    first = await ledger.record_deferred("info", "a", 10, "451 4.3.0 try later", T0)
    assert first == LedgerEntry("a", MessageState.DEFERRED, 10, 1, T0, T0, "451 4.3.0 try later")
    await ledger.record_delivered("info", "a", 10, "250 2.0.0 queued", T0 + 60)
    await ledger.record_dead_lettered("info", "b", 20, "554 5.1.0 Sender denied", T0 + 61, "dl-1")
    await ledger.record_deferred("info", "c", 30, "421 busy", T0 + 62)

    entries = await ledger.sync_listing("info", ["a", "b", "c", "d"])
    assert entries == {
        "a": LedgerEntry("a", MessageState.DELIVERED, 10, 2, T0, T0 + 60, "250 2.0.0 queued"),
        "b": LedgerEntry(
            "b",
            MessageState.DEAD_LETTERED,
            20,
            1,
            T0 + 61,
            T0 + 61,
            "554 5.1.0 Sender denied",
            "dl-1",
        ),
        "c": LedgerEntry("c", MessageState.DEFERRED, 30, 1, T0 + 62, T0 + 62, "421 busy"),
    }


async def test_deferral_counts_attempts_and_keeps_first_seen(ledger: Ledger) -> None:
    for i in range(1, 4):
        entry = await ledger.record_deferred("info", "u", 5, f"451 try {i}", T0 + i * 900)
        assert entry.attempts == i
        assert entry.first_seen == T0 + 900
        assert entry.last_attempt == T0 + i * 900
        assert entry.last_response == f"451 try {i}"
    # Then dead-lettered as expired (docs/design.md §5.1 step 5): first_seen still the first
    # deferral.
    await ledger.record_dead_lettered("info", "u", 5, "451 try 3", T0 + DAY * 5, "dl-9")
    final = await ledger.entry("info", "u")
    assert final is not None
    assert (final.state, final.attempts, final.first_seen) == (
        MessageState.DEAD_LETTERED,
        4,
        T0 + 900,
    )


async def test_deferral_never_demotes_a_final_state(ledger: Ledger) -> None:
    await ledger.record_delivered("info", "u", 5, "250 ok", T0)
    entry = await ledger.record_deferred("info", "u", 5, "451 later", T0 + 1)
    assert entry == LedgerEntry("u", MessageState.DELIVERED, 5, 1, T0, T0, "250 ok")


async def test_accounts_are_separate(ledger: Ledger) -> None:
    await ledger.record_delivered("info", "same-uidl", 1, "250 ok", T0)
    assert await ledger.sync_listing("sales", ["same-uidl"]) == {}
    assert set(await ledger.sync_listing("info", ["same-uidl"])) == {"same-uidl"}


# -- gone, reappearing, pruning ---------------------------------------------------------------


async def test_a_row_no_longer_listed_is_forgotten_at_once(ledger: Ledger) -> None:
    """docs/design.md §5.1 step 6: a UIDL that a complete listing no longer holds is gone;
    listed again, it is a new message (RFC 1939 §7 promises uniqueness only while a message
    exists)."""
    await ledger.record_delivered("info", "old", 1, "250 ok", T0)
    await ledger.record_delivered("info", "kept", 1, "250 ok", T0)
    await ledger.record_delivered(
        "info", "u", 1, "250 ok", T0, done=RecipientsDone(("uidl:u",), ("a@b",))
    )
    assert set(await ledger.sync_listing("info", ["old", "kept", "u"])) == {"old", "kept", "u"}
    assert set(await ledger.sync_listing("info", ["kept"])) == {"kept"}  # "old", "u" DELEd
    assert await ledger.entry("info", "old") is None
    assert await done_recipients(ledger, "info", ["uidl:u"]) == frozenset()
    # The server restarted its numbering: "old" now names another message, unknown to us.
    assert await ledger.sync_listing("info", ["kept", "old"]) == {
        "kept": LedgerEntry("kept", MessageState.DELIVERED, 1, 1, T0, T0, "250 ok")
    }


async def test_forget_drops_rows_and_their_uidl_recipients(ledger: Ledger) -> None:
    done = RecipientsDone(("uidl:u1", "mid:<m@x>:0"), ("a@b",))
    await ledger.record_delivered("info", "u1", 1, "250", T0, done=done)
    await ledger.record_delivered("sales", "u1", 1, "250", T0)
    await ledger.forget("info", ["u1"])
    assert await ledger.entry("info", "u1") is None
    assert await done_recipients(ledger, "info", ["uidl:u1"]) == frozenset()
    assert await done_recipients(ledger, "info", ["mid:<m@x>:0"]) == {"a@b"}  # a copy's key
    assert await ledger.entry("sales", "u1") is not None


async def test_identity_is_kept_with_each_state(ledger: Ledger) -> None:
    ident = Identity(1234, "abcd")
    await ledger.record_delivered("info", "d", 1200, "250", T0, identity=ident)
    await ledger.record_dead_lettered("info", "x", 1200, "554", T0, identity=ident)
    await ledger.record_deferred("info", "f", 1200, "451", T0, identity=ident)
    ticket = ledger.record_delivered_soon("info", "s", 1200, "250", T0, identity=ident)
    assert await ledger.settle([ticket]) == [None]
    await ledger.record_delivered("info", "legacy", 1200, "250", T0)
    entries = await ledger.sync_listing("info", ["d", "x", "f", "s", "legacy"])
    assert {u: e.identity for u, e in entries.items()} == {
        "d": ident,
        "x": ident,
        "f": ident,
        "s": ident,
        "legacy": None,
    }
    # A later record without one keeps it.
    await ledger.record_delivered("info", "f", 1200, "250", T0 + 1)
    again = await ledger.entry("info", "f")
    assert again is not None
    assert again.identity == ident


async def test_record_failed_counts_and_never_demotes_a_final_state(ledger: Ledger) -> None:
    first = await ledger.record_failed("info", "u", 10, "error: X", T0, identity=Identity(10, "d"))
    assert (first.state, first.errors, first.attempts) == (MessageState.DEFERRED, 1, 0)
    assert first.identity == Identity(10, "d")
    second = await ledger.record_failed("info", "u", 10, "error: Y", T0 + 1)
    assert (second.errors, second.last_response, second.first_seen) == (2, "error: Y", T0)
    deferred = await ledger.record_deferred("info", "u", 10, "451 later", T0 + 2)
    assert (deferred.errors, deferred.attempts) == (2, 1)
    await ledger.record_delivered("info", "u", 10, "250", T0 + 3)
    final = await ledger.record_failed("info", "u", 10, "error: Z", T0 + 4)
    assert (final.state, final.errors) == (MessageState.DELIVERED, 2)


async def test_sync_listing_of_10000_kept_messages_writes_nothing_when_steady(
    db_path: Path,
) -> None:
    await (await Ledger.open(db_path)).close()
    uidls = [f"{i:016x}" for i in range(10_000)]
    with sqlite3.connect(db_path) as conn:
        conn.executemany(
            "INSERT INTO messages VALUES"
            " ('info', ?, 'delivered', 1000, 1, ?, ?, '250 ok', NULL, NULL, 0, NULL, NULL)",
            [(u, T0, T0) for u in uidls],
        )
        conn.executemany(
            "INSERT INTO messages VALUES"
            " ('info', ?, 'deferred', 1, 1, ?, ?, '451', NULL, NULL, 0, NULL, NULL)",
            [(f"vanished-{i}", T0, T0) for i in range(3)],
        )
    conn.close()

    led = await Ledger.open(db_path)
    try:
        before = await total_changes(led)
        entries = await led.sync_listing("info", uidls)
        assert len(entries) == 10_000
        assert entries[uidls[1234]].size == 1000
        first = await total_changes(led)
        assert first - before == 3  # only the three vanished rows were forgotten

        entries = await led.sync_listing("info", uidls)
        assert len(entries) == 10_000
        assert await total_changes(led) == first  # the steady state writes nothing
    finally:
        await led.close()


# -- accounts ---------------------------------------------------------------------------------


async def test_record_cycle_and_account_status(ledger: Ledger) -> None:
    await ledger.record_cycle(
        "info", CycleRecord(T0, T0 + 5, "failed", "timeout", None, None, T0 + 900)
    )
    await ledger.record_cycle(
        "info", CycleRecord(T0 + 900, T0 + 903, "ok", None, 12, 3456, T0 + 1800)
    )
    await ledger.record_deferred("info", "d1", 1, "451", T0)
    await ledger.record_deferred("info", "d2", 1, "451", T0)
    await ledger.record_dead_lettered("info", "x1", 1, "554", T0)
    await ledger.record_delivered("info", "ok1", 1, "250", T0)
    await ledger.sync_listing("info", ["d1", "x1", "ok1"])  # d2 vanished upstream
    await ledger.record_delivered("orphan", "u", 1, "250", T0)  # rows, but no cycle record yet

    assert await ledger.account_status() == [
        AccountStatus("info", T0 + 900, T0 + 903, "ok", None, 12, 3456, T0 + 1800, 1, 1),
        AccountStatus("orphan", None, None, None, None, None, None, None, 0, 0),
    ]


async def test_failures_are_kept_with_the_cycle_record(ledger: Ledger) -> None:
    """``once`` from cron is a new process each time: the failures live in the ledger."""
    assert await ledger.failures("info") == Failures()  # never ran
    failing = Failures(failures=3, bare_login_errors=2, failing=True)
    await ledger.record_cycle(
        "info", CycleRecord(T0, T0 + 1, "failed", "-ERR", None, None, T0 + 900, failing)
    )
    assert await ledger.failures("info") == failing
    [status] = await ledger.account_status()
    assert status.failing is True
    await ledger.record_cycle("info", CycleRecord(T0, T0 + 1, "ok", None, 0, 0, T0 + 900))
    assert await ledger.failures("info") == Failures()
    assert (await ledger.account_status())[0].failing is False


async def test_a_version_3_ledger_gains_the_failure_columns(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db_path) as conn:
        for script in MIGRATIONS[:3]:
            conn.executescript(script)
        conn.execute("INSERT INTO accounts VALUES ('info', 1, 2, 'failed', 'x', 3, 4, 5)")
        conn.execute("PRAGMA user_version = 3")
    conn.close()
    led = await Ledger.open(db_path)
    try:
        assert await led.failures("info") == Failures()
        [status] = await led.account_status()
        assert (status.result, status.mailbox_messages, status.failing) == ("failed", 3, False)
    finally:
        await led.close()
    assert _user_version(db_path) == len(MIGRATIONS)


# -- concurrency, cancellation, close ---------------------------------------------------------


async def test_breaker_is_remembered_per_account_and_survives_cycle_records(
    ledger: Ledger,
) -> None:
    # The circuit breaker's trip (fetcher.Breaker) lives in the accounts row, beside what
    # record_cycle writes there, which must not forget it.
    assert await ledger.breaker("info") is None
    await ledger.set_breaker("info", "550 5.7.60 SMTP; not as this sender (at mail)")
    await ledger.record_cycle("info", CycleRecord(T0, T0 + 1, "failed", "x", 3, 30, T0 + 900))
    assert await ledger.breaker("info") == "550 5.7.60 SMTP; not as this sender (at mail)"
    assert await ledger.breaker("other") is None
    await ledger.set_breaker("info", None)
    assert await ledger.breaker("info") is None
    # A reply decoded with surrogateescape (aiosmtplib) is stored, not refused by SQLite.
    await ledger.set_breaker("other", "550 bad \udcff byte")
    assert await ledger.breaker("other") == "550 bad \\udcff byte"


async def test_concurrent_tasks_are_serialised(ledger: Ledger) -> None:
    async def defer_many(uidl: str) -> None:
        for i in range(20):
            await ledger.record_deferred("info", uidl, 1, "451", T0 + i)

    async def sync_many() -> None:
        for _ in range(20):
            await ledger.sync_listing("info", [f"u{n}" for n in range(10)])

    async with asyncio.TaskGroup() as tg:
        for n in range(10):
            tg.create_task(defer_many(f"u{n}"))
        tg.create_task(sync_many())
        tg.create_task(ledger.record_cycle("info", CycleRecord(T0, T0, "ok", None, 10, 10, None)))

    entries = await ledger.sync_listing("info", [f"u{n}" for n in range(10)])
    assert {e.attempts for e in entries.values()} == {20}
    assert len(entries) == 10


async def test_cancelled_record_still_commits(ledger: Ledger) -> None:
    # Hold the ledger thread, so the record job is still queued when its caller is cancelled:
    # the delivered commit after a 250 must not be dropped (docs/design.md §9).
    gate = threading.Event()
    hold = asyncio.create_task(ledger._submit("hold", lambda conn: gate.wait(10)))
    await asyncio.sleep(0)
    record = asyncio.create_task(ledger.record_delivered("info", "u", 1, "250 ok", T0))
    await asyncio.sleep(0)
    record.cancel()
    with pytest.raises(asyncio.CancelledError):
        await record
    gate.set()
    assert await hold is True
    entry = await ledger.entry("info", "u")
    assert entry is not None
    assert entry.state is MessageState.DELIVERED


async def test_close_then_use_is_a_ledger_error(db_path: Path) -> None:
    led = await Ledger.open(db_path)
    pending = asyncio.create_task(led.record_delivered("info", "u", 1, "250 ok", T0))
    await asyncio.sleep(0)  # queued before close: must still run
    await led.close()
    await pending
    await led.close()  # idempotent
    with pytest.raises(LedgerError, match="closed"):
        await led.sync_listing("info", [])
    # Closing checkpointed the WAL: the row is in the main file and survives.
    assert not db_path.with_name(db_path.name + "-wal").exists()
    again = await Ledger.open(db_path)
    try:
        assert await again.entry("info", "u") is not None
    finally:
        await again.close()


async def test_sqlite_errors_become_ledger_errors(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="no such table"):
        await ledger._submit("probe", lambda conn: conn.execute("SELECT * FROM nope"))


# -- recipients done (partial deliveries, a shared mailbox's copies) -----------------------------


async def test_a_version_1_ledger_is_migrated_and_keeps_its_rows(db_path: Path) -> None:
    """A ledger written before migration 2 opens, keeps its rows and gains the new table."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db_path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute(
            "INSERT INTO messages VALUES ('info', 'u1', 'delivered', 5, 1, 1, 1, '250', NULL, NULL)"
        )
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    led = await Ledger.open(db_path)
    try:
        entry = await led.entry("info", "u1")
        assert entry is not None
        assert entry.state is MessageState.DELIVERED
        assert await done_recipients(led, "info", ["uidl:u1"]) == frozenset()
    finally:
        await led.close()
    assert _user_version(db_path) == len(MIGRATIONS)


async def test_done_recipients_are_recorded_with_the_state_and_found_by_any_key(
    ledger: Ledger,
) -> None:
    done = RecipientsDone(("uidl:u1", "mid:<a@b>"), ("Bob@Firma.local", "carol@firma.local"))
    entry = await ledger.record_deferred("info", "u1", 10, "451 later", T0, done=done)
    assert entry.state is MessageState.DEFERRED
    assert await done_recipients(ledger, "info", ["uidl:u1"]) == {
        "bob@firma.local",
        "carol@firma.local",
    }
    assert await done_recipients(ledger, "info", ["mid:<a@b>", "uidl:other"]) == {
        "bob@firma.local",
        "carol@firma.local",
    }
    # Per account, and nothing under an unknown key.
    assert await done_recipients(ledger, "sales", ["uidl:u1"]) == frozenset()
    assert await done_recipients(ledger, "info", ["uidl:u2"]) == frozenset()
    # A later deferral keeps the dead letter id of an earlier copy.
    await ledger.record_deferred("info", "u1", 10, "451 later", T0 + 1, dead_letter_id="dl-1")
    await ledger.record_deferred("info", "u1", 10, "451 later", T0 + 2)
    again = await ledger.entry("info", "u1")
    assert again is not None
    assert again.dead_letter_id == "dl-1"


async def test_done_recipients_are_forgotten_by_sync_listing(ledger: Ledger) -> None:
    await ledger.record_delivered(
        "info", "u1", 10, "250", T0, done=RecipientsDone(("mid:<old@x>",), ("a@b",))
    )
    await ledger.record_delivered(
        "info", "u2", 10, "250", T0 + 100, done=RecipientsDone(("mid:<new@x>",), ("a@b",))
    )
    await ledger.sync_listing("info", ["u1", "u2"], recipients_before=T0 + 50)
    assert await done_recipients(ledger, "info", ["mid:<old@x>"]) == frozenset()
    assert await done_recipients(ledger, "info", ["mid:<new@x>"]) == {"a@b"}
    # A steady listing with nothing to forget writes nothing.
    before = await total_changes(ledger)
    await ledger.sync_listing("info", ["u1", "u2"], recipients_before=T0 + 50)
    assert await total_changes(ledger) == before


async def test_uidl_rows_stay_while_the_message_is_listed_however_old(ledger: Ledger) -> None:
    """A message delivered to some recipients and deferred for others stays upstream: who has
    it must be remembered for as long as it is listed (the connector may have been down, or the
    account parked, for longer than any age), or the retry sends it to them again."""
    mid = "mid:<a@b>:" + "0" * 64
    done = RecipientsDone(("uidl:u1", mid), ("bob@firma.local",))
    await ledger.sync_listing("info", ["u1"])
    await ledger.record_deferred("info", "u1", 10, "451 later", T0, done=done)
    later = T0 + 100 * DAY
    await ledger.sync_listing("info", ["u1"], recipients_before=later - DAY)
    assert await done_recipients(ledger, "info", ["uidl:u1"]) == {"bob@firma.local"}
    # The duplicate window's rows age out as before.
    assert await done_recipients(ledger, "info", [mid]) == frozenset()


async def test_uidl_rows_are_forgotten_with_their_message_row(ledger: Ledger) -> None:
    for uidl in ("u1", "u2"):
        await ledger.record_delivered(
            "info", uidl, 10, "250", T0, done=RecipientsDone((f"uidl:{uidl}",), ("a@b",))
        )
    await ledger.record_delivered(
        "sales", "u1", 10, "250", T0, done=RecipientsDone(("uidl:u1",), ("c@d",))
    )
    await ledger.sync_listing("info", ["u2"])  # u1 gone upstream
    assert await ledger.entry("info", "u1") is None
    assert await done_recipients(ledger, "info", ["uidl:u1"]) == frozenset()
    assert await done_recipients(ledger, "info", ["uidl:u2"]) == {"a@b"}
    assert await done_recipients(ledger, "sales", ["uidl:u1"]) == {"c@d"}  # another account's


async def test_recipients_by_key_finds_the_keys_and_every_key_with_the_prefix(
    ledger: Ledger,
) -> None:
    rows = {
        "uidl:u1": ("a@b",),
        "mid:<x@y>:" + "1" * 64: ("Bob@Firma.local",),
        "mid:<x@y>:" + "2" * 64: ("carol@firma.local",),
        "mid:<x@y>z:" + "3" * 64: ("dave@firma.local",),  # another Message-ID
        "mid:<x@y>": ("erin@firma.local",),  # the form without a digest
    }
    for i, (key, recipients) in enumerate(rows.items()):
        await ledger.record_delivered(
            "info", f"m{i}", 10, "250", T0, done=RecipientsDone((key,), recipients)
        )
    await ledger.record_delivered(
        "sales", "s1", 10, "250", T0, done=RecipientsDone(("mid:<x@y>:" + "4" * 64,), ("f@g",))
    )
    found = await ledger.recipients_by_key(
        "info", ["uidl:u1", "mid:<x@y>:" + "1" * 64, "uidl:none"], prefix="mid:<x@y>:"
    )
    assert found == {
        "uidl:u1": {"a@b"},
        "mid:<x@y>:" + "1" * 64: {"bob@firma.local"},
        "mid:<x@y>:" + "2" * 64: {"carol@firma.local"},
    }
    assert await ledger.recipients_by_key("info", ["uidl:none"]) == {}


async def test_migration_3_drops_uidl_rows_that_outlived_their_message(db_path: Path) -> None:
    """Before migration 3 "uidl:" rows aged out on their own and could outlive their message's
    row; one left over must not leave recipients out if the server lists that UIDL again."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db_path) as conn:
        for script in MIGRATIONS[:2]:
            conn.executescript(script)
        conn.execute(
            "INSERT INTO messages"
            " VALUES ('info', 'kept', 'deferred', 5, 1, 1, 1, '451', NULL, NULL)"
        )
        conn.executemany(
            "INSERT INTO recipients_done VALUES (?, ?, 'a@b', 1)",
            [
                ("info", "uidl:kept"),
                ("info", "uidl:pruned"),
                ("sales", "uidl:kept"),  # its message row is another account's
                ("info", "mid:<x@y>"),
            ],
        )
        conn.execute("PRAGMA user_version = 2")
    conn.close()
    led = await Ledger.open(db_path)
    try:
        assert await done_recipients(led, "info", ["uidl:kept"]) == {"a@b"}
        assert await done_recipients(led, "info", ["uidl:pruned"]) == frozenset()
        assert await done_recipients(led, "sales", ["uidl:kept"]) == frozenset()
        assert await done_recipients(led, "info", ["mid:<x@y>"]) == {"a@b"}  # by age, later
    finally:
        await led.close()
    assert _user_version(db_path) == len(MIGRATIONS)


# -- group commit (record_delivered_soon / settle) -----------------------------------------------


async def _fail_uidl(ledger: Ledger, uidl: str) -> None:
    """A real SQLite failure for one row: a temporary trigger that aborts its insert."""
    await ledger._submit(
        "trigger",
        lambda conn: conn.execute(
            "CREATE TEMP TRIGGER fail_one BEFORE INSERT ON main.messages"
            f" WHEN NEW.uidl = '{uidl}' BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        ),
    )


async def test_rows_queued_soon_are_committed_once_settled(ledger: Ledger) -> None:
    tickets = [ledger.record_delivered_soon("info", f"u{i}", 10, "250 ok", T0) for i in range(100)]
    assert tickets == sorted(set(tickets))  # distinct and in order
    assert await ledger.settle(tickets) == [None] * 100
    for i in (0, 57, 99):
        entry = await ledger.entry("info", f"u{i}")
        assert entry is not None
        assert entry.state is MessageState.DELIVERED
        assert entry.last_response == "250 ok"


async def test_rows_queued_while_the_thread_is_busy_are_committed_together(
    ledger: Ledger,
) -> None:
    statements: list[str] = []
    await ledger._submit("trace", lambda conn: conn.set_trace_callback(statements.append))
    # Hold the thread: every row queued meanwhile lands in one transaction.
    gate = threading.Event()
    hold = asyncio.create_task(ledger._submit("hold", lambda conn: gate.wait(10)))
    await asyncio.sleep(0)
    tickets = [ledger.record_delivered_soon("info", f"u{i}", 10, "ok", T0) for i in range(20)]
    gate.set()
    assert await hold is True
    assert await ledger.settle(tickets) == [None] * 20
    assert statements.count("COMMIT") == 1
    assert sum(s.lstrip().startswith("INSERT INTO messages") for s in statements) == 20


async def test_a_failed_group_commit_is_reported_for_each_of_its_tickets(ledger: Ledger) -> None:
    await _fail_uidl(ledger, "bad")
    gate = threading.Event()
    hold = asyncio.create_task(ledger._submit("hold", lambda conn: gate.wait(10)))
    await asyncio.sleep(0)
    # Queued behind the hold, so all three go into one transaction, which the trigger fails.
    tickets = [ledger.record_delivered_soon("info", u, 10, "ok", T0) for u in ("a", "bad", "c")]
    gate.set()
    await hold
    errors = await ledger.settle(tickets)
    assert all(isinstance(e, LedgerError) for e in errors)
    assert "disk says no" in str(errors[0])
    # Rolled back as a whole: no row of the group is there, so none may be DELEd.
    for u in ("a", "bad", "c"):
        assert await ledger.entry("info", u) is None
    # A later row commits again; an error is reported once.
    later = ledger.record_delivered_soon("info", "d", 10, "ok", T0)
    assert await ledger.settle([later]) == [None]


async def test_settle_of_nothing_and_soon_after_close(db_path: Path) -> None:
    led = await Ledger.open(db_path)
    assert await led.settle([]) == []
    ticket = led.record_delivered_soon("info", "u", 1, "250 ok", T0)
    await led.close()  # the queued row is committed before the connection closes
    with pytest.raises(LedgerError, match="closed"):
        led.record_delivered_soon("info", "v", 1, "250 ok", T0)
    again = await Ledger.open(db_path)
    try:
        assert ticket == 1
        assert await again.entry("info", "u") is not None
    finally:
        await again.close()


async def test_soon_rows_record_their_done_recipients(ledger: Ledger) -> None:
    ticket = ledger.record_delivered_soon(
        "info", "u", 10, "ok", T0, done=RecipientsDone(("uidl:u", "mid:x"), ("B@x.example",))
    )
    assert await ledger.settle([ticket]) == [None]
    found = await ledger.recipients_by_key("info", ("uidl:u", "mid:x"))
    assert found == {"uidl:u": frozenset({"b@x.example"}), "mid:x": frozenset({"b@x.example"})}


async def test_a_row_queued_as_a_drain_ends_is_seen_by_the_next_job(ledger: Ledger) -> None:
    # The drain job finds the queue empty and returns; a row queued in that instant must start
    # a new drain that runs before any job submitted after it (a shared mailbox's duplicate
    # check, settle), or the check misses the row and settle calls it uncommitted.  The instant
    # is forced: the ledger thread is paused right after its empty check.
    paused, go = threading.Event(), threading.Event()
    real = ledger._lock
    exits = 0

    class PauseAfterEmptyCheck:
        def __enter__(self) -> None:
            real.acquire()

        def __exit__(self, *exc: object) -> None:
            nonlocal exits
            real.release()
            if threading.current_thread().name.startswith("ledger"):
                exits += 1
                if exits == 3:  # 1: take A, 2: mark A committed, 3: find the queue empty
                    paused.set()
                    assert go.wait(10)

    ledger._lock = PauseAfterEmptyCheck()  # type: ignore[assignment]
    ledger.record_delivered_soon("shared", "A", 1, "250 ok", T0)
    assert await asyncio.to_thread(paused.wait, 10)  # A committed; the drain is returning
    later = ledger.record_delivered_soon(
        "shared", "B", 1, "250 ok", T0, done=RecipientsDone(("mid:<z@y>:d",), ("ann@x",))
    )
    check = asyncio.ensure_future(ledger.recipients_by_key("shared", ["mid:<z@y>:d"]))
    settle = asyncio.ensure_future(ledger.settle([later]))
    await asyncio.sleep(0)  # both jobs are submitted now
    go.set()
    assert await check == {"mid:<z@y>:d": frozenset({"ann@x"})}
    assert await settle == [None]


async def test_any_failure_of_a_group_commit_fails_its_tickets(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not only SQLite's errors: whatever stops a batch must fail its tickets, or settle would
    # take them for committed once a later batch moves the mark past them.
    real = ledger_module._transaction
    calls = 0

    def broken_once(conn: sqlite3.Connection) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("unexpected")
        return real(conn)

    monkeypatch.setattr(ledger_module, "_transaction", broken_once)
    first = ledger.record_delivered_soon("info", "u1", 1, "250 ok", T0)
    (error,) = await ledger.settle([first])
    assert isinstance(error, LedgerError)
    assert "unexpected" in str(error)
    second = ledger.record_delivered_soon("info", "u2", 1, "250 ok", T0)
    assert await ledger.settle([second]) == [None]
    assert await ledger.entry("info", "u1") is None
    assert await ledger.entry("info", "u2") is not None


async def test_a_reply_with_bytes_that_are_not_utf8_is_stored(ledger: Ledger) -> None:
    # aiosmtplib decodes replies with surrogateescape: "\udcff" stands for the byte 0xFF.  The
    # commit must not fail on it (the message is delivered already).
    reply = "250 2.0.0 queued as caf\udcff"
    ticket = ledger.record_delivered_soon("info", "u1", 1, reply, T0)
    assert await ledger.settle([ticket]) == [None]
    await ledger.record_deferred("info", "u2", 1, "451 busy \udcfe", T0)
    one, two = await ledger.entry("info", "u1"), await ledger.entry("info", "u2")
    assert one is not None
    assert two is not None
    assert one.last_response == "250 2.0.0 queued as caf\\udcff"
    assert two.last_response == "451 busy \\udcfe"


# -- a ledger that cannot be written (issue 18) ---------------------------------------------------


def _wal_size(db_path: Path) -> int:
    wal = db_path.with_name(db_path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


async def test_prove_writable_writes_to_the_file_even_when_nothing_else_changes(
    ledger: Ledger, db_path: Path
) -> None:
    # SQLite writes no page for a row updated to the value it has, and in WAL mode a full disk
    # shows only when the WAL grows: each proof must append to the WAL, even at the same time.
    await ledger.prove_writable(T0)
    sizes = [_wal_size(db_path)]
    for _ in range(3):
        await ledger.prove_writable(T0)
        sizes.append(_wal_size(db_path))
    assert sizes == sorted(set(sizes)), sizes  # grew every time
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT beats, at FROM heartbeat").fetchall() == [(4, T0)]
    conn.close()
    assert ledger.writable


async def test_a_steady_listing_still_writes_nothing(ledger: Ledger) -> None:
    # The proof is the cycle's to call, in a cycle with something to deliver; the listing sync
    # stays free when nothing changed (docs/design.md §5.2, invariant 5: a cycle costs what is
    # new).
    await ledger.record_delivered("info", "u1", 1, "250 ok", T0)
    await ledger.sync_listing("info", ["u1"])
    before = await total_changes(ledger)
    await ledger.sync_listing("info", ["u1"])
    assert await total_changes(ledger) == before


async def test_a_failed_write_makes_the_ledger_not_writable_until_one_succeeds(
    ledger: Ledger,
) -> None:
    def writable() -> bool:
        return ledger.writable

    await _fail_uidl(ledger, "bad")
    assert writable()
    with pytest.raises(LedgerError):
        await ledger.record_deferred("info", "bad", 1, "451 later", T0)
    assert not writable()
    assert "disk says no" in (ledger.write_error or "")
    # A read proves nothing; a commit that changed nothing proves nothing either.
    await ledger.entry("info", "x")
    await ledger.sync_listing("info", [])
    assert not writable()
    await ledger.prove_writable(T0)
    assert writable()
    assert ledger.write_error is None


async def test_rows_of_accepted_messages_whose_commit_failed_are_owed_to_the_next_write(
    ledger: Ledger,
) -> None:
    # SMTP took these messages; their rows failed.  The ledger keeps them and writes them
    # first in its next write transaction, so the listing knows them as delivered (never
    # handed to SMTP again) and a DELE follows a committed row.  A dead letter's row is not
    # owed (the fetcher removes its file), nor a bare deferral.
    await ledger._submit(
        "trigger",
        lambda conn: conn.execute(
            "CREATE TEMP TRIGGER full BEFORE INSERT ON main.messages"
            " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        ),
    )
    (error,) = await ledger.settle([ledger.record_delivered_soon("info", "u1", 5, "250 ok", T0)])
    assert error is not None
    done = RecipientsDone(("uidl:u5",), ("a@x",))
    attempts = [
        ledger.record_delivered("info", "u2", 6, "250 ok", T0),
        ledger.record_dead_lettered("info", "u3", 7, "554 no", T0, "dl-3"),
        ledger.record_deferred("info", "u4", 8, "451 later", T0),
        ledger.record_deferred("info", "u5", 9, "250 ok (refused: <b@x> 451)", T0, done=done),
    ]
    for attempt in attempts:
        with pytest.raises(LedgerError, match="disk is full"):
            await attempt
    assert ledger.unrecorded == 3
    listed = ["u1", "u2", "u3", "u4", "u5"]
    with pytest.raises(LedgerError, match="disk is full"):  # still failing: all stay owed
        await ledger.sync_listing("info", listed)
    assert ledger.unrecorded == 3
    assert not ledger.writable
    await ledger._submit("drop", lambda conn: conn.execute("DROP TRIGGER full"))
    known = await ledger.sync_listing("info", listed)
    assert {uid: e.state for uid, e in known.items()} == {
        "u1": MessageState.DELIVERED,
        "u2": MessageState.DELIVERED,
        "u5": MessageState.DEFERRED,
    }
    assert await done_recipients(ledger, "info", ["uidl:u5"]) == {"a@x"}
    assert ledger.unrecorded == 0
    assert ledger.writable


async def test_rows_still_owed_at_close_are_named_in_the_log(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    led = await Ledger.open(db_path)
    await led._submit(
        "trigger",
        lambda conn: conn.execute(
            "CREATE TEMP TRIGGER full BEFORE INSERT ON main.messages"
            " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        ),
    )
    with pytest.raises(LedgerError):
        await led.record_delivered("info", "u1", 5, "250 ok", T0)
    await led.close()
    assert "account=info uidl=u1: accepted by SMTP but not recorded" in caplog.text
    assert "it will be delivered again" in caplog.text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SQLITE_FULL", "is full: free space there"),
        ("SQLITE_READONLY", "mounted read-write"),
        ("SQLITE_READONLY_DBMOVED", "mounted read-write"),
        ("SQLITE_IOERR_WRITE", "failed a write: check that it has free space"),
        ("SQLITE_BUSY", "held the write lock"),
        ("SQLITE_CANTOPEN", "exists and that this user can create files"),
    ],
)
def test_a_ledger_error_of_the_disk_or_a_lock_names_the_file_and_what_to_check(
    tmp_path: Path, name: str, expected: str
) -> None:
    exc = sqlite3.OperationalError("some text")
    exc.sqlite_errorname = name  # as the sqlite3 module sets it
    text = str(ledger_module._ledger_error(tmp_path / "ledger.sqlite3", "record delivered", exc))
    assert text.startswith(f"ledger {tmp_path}/ledger.sqlite3 not writable: record delivered:")
    assert f"[{name}]" in text
    assert expected in text


def test_other_ledger_errors_keep_their_plain_text(tmp_path: Path) -> None:
    exc = sqlite3.DatabaseError("file is not a database")
    exc.sqlite_errorname = "SQLITE_NOTADB"
    text = str(ledger_module._ledger_error(tmp_path / "l.sqlite3", "open", exc))
    assert (
        text == f"ledger {tmp_path}/l.sqlite3: open failed: file is not a database [SQLITE_NOTADB]"
    )


async def test_a_nearly_full_disk_fails_the_proof(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A commit may pass on a full disk by reusing WAL frames a checkpoint freed; the rows after
    # it then fail.  Less room than MIN_FREE_BYTES counts as full.
    monkeypatch.setattr(ledger_module, "MIN_FREE_BYTES", 1 << 62)
    with pytest.raises(LedgerError, match="bytes left on its file system") as info:
        await ledger.prove_writable(T0)
    assert "is full: free space there" in str(info.value)
    assert not ledger.writable


# -- what an idle poll costs the ledger (bench/README.md, "fleet") ----------------------------


async def test_a_steady_listing_takes_no_write_lock(ledger: Ledger, db_path: Path) -> None:
    """Another process holds the write lock (a `dead-letters requeue`): a cycle whose listing
    changed nothing reads and goes on; it does not wait BUSY_TIMEOUT_MS for a lock it needs
    not."""
    await ledger.record_delivered("info", "u1", 1, "250 ok", T0)
    other = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")
        known = await asyncio.wait_for(ledger.sync_listing("info", ["u1", "new"]), 1.0)
        assert set(known) == {"u1"}
        assert await asyncio.wait_for(ledger.sync_listing("empty", []), 1.0) == {}
        other.execute("ROLLBACK")
    finally:
        other.close()


async def test_cycle_records_queued_soon_are_committed_the_newest_per_account(
    ledger: Ledger,
) -> None:
    # The ledger thread is busy: the records queued meanwhile go in one transaction.
    release = threading.Event()
    busy = asyncio.ensure_future(ledger._submit("busy", lambda conn: release.wait(10)))
    ledger.record_cycle_soon("info", CycleRecord(T0, T0 + 1, "failed", "x", None, None, T0 + 60))
    ledger.record_cycle_soon("info", CycleRecord(T0 + 60, T0 + 61, "ok", None, 0, 0, T0 + 120))
    ledger.record_cycle_soon("sales", CycleRecord(T0, T0 + 2, "ok", None, 3, 300, T0 + 60))
    release.set()
    await busy
    statuses = {s.name: s for s in await ledger.account_status()}  # runs after the drain
    assert statuses["info"].result == "ok"
    assert statuses["info"].last_cycle_started == T0 + 60
    assert statuses["sales"].mailbox_messages == 3


async def test_cycle_records_queued_before_close_are_committed(db_path: Path) -> None:
    led = await Ledger.open(db_path)
    led.record_cycle_soon("info", CycleRecord(T0, T0 + 1, "ok", None, 0, 0, T0 + 60))
    await led.close()
    with pytest.raises(LedgerError):
        led.record_cycle_soon("info", CycleRecord(T0, T0 + 1, "ok", None, 0, 0, T0 + 60))
    led = await Ledger.open(db_path)
    try:
        [status] = await led.account_status()
        assert status.result == "ok"
    finally:
        await led.close()


async def test_deferred_count_of_one_account(ledger: Ledger) -> None:
    await ledger.record_deferred("info", "d1", 1, "451", T0)
    await ledger.record_deferred("info", "d2", 1, "451", T0)
    await ledger.record_delivered("info", "ok1", 1, "250", T0)
    await ledger.record_deferred("sales", "d3", 1, "451", T0)
    assert await ledger.deferred_count("info") == 2
    assert await ledger.deferred_count("nobody") == 0
    await ledger.sync_listing("info", ["d1", "ok1"])  # d2 is gone upstream
    assert await ledger.deferred_count("info") == 1


async def test_an_empty_listing_is_synced_without_a_round_trip_and_forgets_everything(
    ledger: Ledger,
) -> None:
    await ledger.record_delivered("info", "u1", 1, "250 ok", T0)
    done = RecipientsDone(("uidl:u2", "mid:<m@x>:digest"), ("a@x",))
    await ledger.record_deferred("info", "u2", 1, "250 ok (refused: <b@x> 451)", T0, done=done)
    await ledger.record_delivered("sales", "s1", 1, "250 ok", T0)
    release = threading.Event()
    busy = asyncio.ensure_future(ledger._submit("busy", lambda conn: release.wait(10)))
    # The ledger thread is busy: an empty listing does not wait for it.
    assert (
        await asyncio.wait_for(ledger.sync_listing("info", [], recipients_before=T0 + 1), 1) == {}
    )
    release.set()
    await busy
    assert await ledger.entry("info", "u1") is None  # runs after the queued forgetting
    assert await ledger.entry("info", "u2") is None
    assert await done_recipients(ledger, "info", ["uidl:u2", "mid:<m@x>:digest"]) == set()
    assert await ledger.entry("sales", "s1") is not None


async def test_queued_cycle_records_commit_by_themselves_within_the_delay(
    ledger: Ledger, db_path: Path
) -> None:
    """No other job comes: the rows still reach the file, CYCLE_RECORD_DELAY later."""
    ledger.record_cycle_soon("info", CycleRecord(T0, T0 + 1, "ok", None, 0, 0, T0 + 60))

    def committed() -> bool:
        with contextlib.closing(sqlite3.connect(db_path)) as outside:
            rows: int = outside.execute("SELECT count(*) FROM accounts").fetchone()[0]
            return rows == 1

    assert not committed()  # queued, not written yet: the next ones may join it
    deadline = asyncio.get_running_loop().time() + ledger_module.CYCLE_RECORD_DELAY + 5
    while not committed():
        assert asyncio.get_running_loop().time() < deadline, "never committed"
        await asyncio.sleep(0.05)
