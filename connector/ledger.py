"""The SQLite ledger: what happened to each message, so none is handed to SMTP twice.

docs/design.md §8 (schema, states, pruning, group commit).  One row per (account, UIDL) in
state ``delivered``, ``dead_lettered`` or ``deferred``, and one row per account with its last
cycle (for ``status`` and ``/status``).

Theory of operation
-------------------

* **One connection, one thread.**  ``sqlite3`` blocks, so every call runs on a dedicated
  single-thread executor (``loop.run_in_executor``), and the connection is created on that
  thread and never touched elsewhere (``check_same_thread`` enforces it).  The executor's queue
  serialises concurrent callers from many asyncio tasks: each public method is one job and one
  transaction.
* **Explicit transactions.**  The connection is in autocommit mode (``isolation_level=None``)
  and each job opens ``BEGIN IMMEDIATE`` itself, so the write lock is taken up front and a
  second process (a ``status`` command) can never make a write fail half-way through.
* **WAL with ``synchronous=NORMAL``.**  A commit then costs no fsync; a power loss may lose the
  last commits, never corrupt the file.  That is enough here because the ledger only prevents
  duplicates, it never holds the only copy of anything: a dead letter is fsynced in its store
  before the ledger records it (docs/design.md §5.1), and a delivered message is in Exchange.
  Losing a ``delivered`` or ``dead_lettered`` commit means the message is offered once more: a
  duplicate, never a loss.  A lost deferral only restarts its ``max_deferral`` clock.
* **The duplicate window.**  Between Exchange's ``250`` and the ``delivered`` commit a crash
  duplicates the message (docs/design.md §9).  The record methods keep that window to one thread hop
  and one small transaction, and they are shielded from cancellation, so a shutdown that
  cancels the cycle right after the ``250`` still gets the row committed.
* **Group commit for the common case.**  :meth:`Ledger.record_delivered_soon` queues a
  ``delivered`` row and returns at once with a ticket; the ledger thread commits every row
  queued so far in one transaction, starting as soon as it is free (the window stays one hop
  and one transaction long), and wakes nobody.  The cycle sends the message's DELE only
  after :meth:`Ledger.settle` has seen its ticket committed (docs/design.md §5.2, invariant 1;
  DELE takes effect at QUIT anyway, RFC 1939 §6), and it waits for the commit right before
  the next message's content goes out, so that a crash duplicates at most the message
  accepted last (docs/design.md §8.5, §9).  What the group commit and that wait cost and
  save is measured in bench/README.md.
* **A ledger that cannot be written.**  A full or read-only file system, or another process
  holding the write lock past :data:`BUSY_TIMEOUT_MS`, fails a commit.  Two things keep that
  from turning one delivery into one per cycle.  :meth:`Ledger.prove_writable` commits a
  heartbeat (a row whose counter goes up, so the page changes and SQLite must write it: an
  update to the same value writes nothing, and in WAL mode a full disk shows only when the WAL
  grows; and a disk with less than :data:`MIN_FREE_BYTES` free counts as full, since a
  commit may pass by reusing WAL frames a checkpoint freed) before a cycle's first SMTP
  transaction; the cycle delivers nothing if it fails.
  And a ``delivered`` row whose commit failed after the ``250`` is *owed*: the ledger keeps it
  in memory and writes it first in its next write transaction (the listing sync, the proof,
  the cycle record), so that while this process lives the message is known as delivered
  (never handed to SMTP again) and is DELEd only after that row is committed.
  :attr:`Ledger.writable` and :attr:`Ledger.write_error` say how the last write went, for
  ``status``, ``/status`` and the ``ledger_writable`` metric.
* **Migrations.**  ``PRAGMA user_version`` counts the scripts of :data:`MIGRATIONS` applied;
  pending ones run in one transaction on open.  Only ever append to that list.
* **Listing sync.**  :meth:`Ledger.sync_listing` reads an account's rows with one query and
  does the set arithmetic in Python; a steady mailbox of 10,000 kept messages costs one read and
  no writes per cycle (docs/design.md §5.2, invariant 5: a cycle costs what is new).  A row
  whose UIDL a complete listing no longer holds is forgotten at once (docs/design.md §5.1 step
  6): RFC 1939 §7 promises a unique-id only while its message exists, and a server that
  restarts its numbering lists a new message under an old UIDL, which must then be delivered,
  not only DELEd.
* **Identity.**  A row keeps the message's size as LIST gave it and a digest of its header
  block (:class:`Identity`), so that a message the ledger knows but a session has not read is
  DELEd only after a cheap check that it is the same one (``cycle.Identities.same``).
* **Errors.**  ``errors`` counts the cycles in which handling a message failed unexpectedly
  (:meth:`Ledger.record_failed`); the cycle dead-letters it after a few (docs/design.md §5.2,
  invariant 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self, TypeVar

from connector.errors import LedgerError
from connector.ledger_export import ImportResult, LedgerExport, export_rows, import_rows

log = logging.getLogger(__name__)

T = TypeVar("T")
A = TypeVar("A")

BUSY_TIMEOUT_MS: Final = 5000
"""How long to wait for another process's write lock (a CLI command) before failing."""

CYCLE_RECORD_DELAY: Final = 1.0
"""Seconds the cycle records (and empty listings) queue up before one transaction commits
them all (Ledger.record_cycle_soon)."""

MIN_FREE_BYTES: Final = 1024 * 1024
"""Room the ledger's file system must have for :meth:`Ledger.prove_writable` to pass.  A commit
can succeed on a full disk by overwriting WAL frames a checkpoint has freed, and the next one,
which needs a new frame, fail: the heartbeat alone does not show a disk that is nearly full.
A group commit of many rows writes a few pages of 4 KiB; a WAL checkpoint may grow the file."""

MIGRATIONS: Final[list[str]] = [
    # 1: the initial schema.  WITHOUT ROWID: the rows are small and always found by their key.
    """
    CREATE TABLE messages (
        account        TEXT    NOT NULL,
        uidl           TEXT    NOT NULL,
        state          TEXT    NOT NULL
                       CHECK (state IN ('delivered', 'dead_lettered', 'deferred')),
        size           INTEGER NOT NULL,
        attempts       INTEGER NOT NULL,
        first_seen     REAL    NOT NULL,
        last_attempt   REAL    NOT NULL,
        last_response  TEXT    NOT NULL,
        dead_letter_id TEXT,
        gone_since     REAL,
        PRIMARY KEY (account, uidl)
    ) WITHOUT ROWID;

    CREATE TABLE accounts (
        name                TEXT NOT NULL PRIMARY KEY,
        last_cycle_started  REAL,
        last_cycle_finished REAL,
        result              TEXT,
        last_error          TEXT,
        mailbox_messages    INTEGER,
        mailbox_bytes       INTEGER,
        next_poll           REAL
    ) WITHOUT ROWID;
    """,
    # 2: the recipients a message is done for (delivered or dead-lettered), by key: "uidl:<id>"
    # (a message delivered to some recipients and deferred for others is retried for the
    # others only) and "mid:..." (a shared mailbox's provider stores one copy per recipient;
    # the copies are suppressed).  See RecipientsDone for the keys, sync_listing for how long.
    """
    CREATE TABLE recipients_done (
        account   TEXT NOT NULL,
        key       TEXT NOT NULL,
        recipient TEXT NOT NULL,
        at        REAL NOT NULL,
        PRIMARY KEY (account, key, recipient)
    ) WITHOUT ROWID;
    """,
    # 3: a "uidl:" row lives as long as its message's row (sync_listing deletes them together).
    # One without its message's row would leave its recipients out if the server ever listed
    # the UIDL again, so a ledger that has such rows (schema 2 aged them out on their own)
    # drops them.
    """
    DELETE FROM recipients_done
    WHERE key >= 'uidl:' AND key < 'uidl;'
      AND NOT EXISTS (
          SELECT 1 FROM messages m
          WHERE m.account = recipients_done.account AND m.uidl = substr(recipients_done.key, 6)
      );
    """,
    # 4: the circuit breaker (docs/design.md §6.2, cycle.Breaker): the refusal that tripped it,
    # kept until a message of the account gets past MAIL and RCPT again, so that a target
    # refusing every real sender costs a handful of dead letters once, not a handful every cycle.
    """
    ALTER TABLE accounts ADD COLUMN breaker TEXT;
    """,
    # 5: the scheduler's memory of an account's failures (its consecutive failed cycles, bare
    # -ERRs at login, whether it is marked failing), so that `once` from cron counts them
    # across runs as `run` does, and `status` and the failing notice see them.
    """
    ALTER TABLE accounts ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE accounts ADD COLUMN bare_login_errors INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE accounts ADD COLUMN failing INTEGER NOT NULL DEFAULT 0;
    """,
    # 6: the heartbeat that Ledger.prove_writable commits before a cycle's first SMTP
    # transaction.  One row; ``beats`` counts up, so that every proof changes the page.
    """
    CREATE TABLE heartbeat (
        id    INTEGER PRIMARY KEY CHECK (id = 1),
        beats INTEGER NOT NULL,
        at    REAL    NOT NULL
    );
    """,
    # 7: per message, the cycles whose handling failed unexpectedly (docs/design.md §10.5:
    # dead-lettered with stage "error" after a few), and its identity for the check before a
    # DELE of a message this session has not read (docs/design.md §5.1 step 6): the size LIST
    # announced and a digest of the header block.  Rows from before have no identity and are
    # DELEd as they were.
    """
    ALTER TABLE messages ADD COLUMN errors INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN listed_size INTEGER;
    ALTER TABLE messages ADD COLUMN header_digest TEXT;
    """,
]


class MessageState(enum.StrEnum):
    """A message's state in the ledger.  ``delivered`` and ``dead_lettered`` are final."""

    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One message's row.  Times are unix seconds."""

    uidl: str
    state: MessageState
    size: int
    attempts: int
    first_seen: float
    last_attempt: float
    last_response: str
    dead_letter_id: str | None = None
    gone_since: float | None = None  # never set: a row no longer listed is deleted (sync_listing)
    errors: int = 0  # cycles whose handling of the message failed unexpectedly
    identity: Identity | None = None  # None: a row from before identities were recorded


@dataclass(frozen=True, slots=True)
class Identity:
    """What tells a message from another listed under the same UIDL (docs/design.md §5.1,
    step 1): its size as LIST announced it (RFC 1939 §5; None when LIST did not give it) and a
    digest of its header block (``headers.header_digest``, the same from RETR and from
    ``TOP n 0``)."""

    size: int | None
    digest: str


@dataclass(frozen=True, slots=True)
class RecipientsDone:
    """Recipients a message is done for, under each of ``keys``.

    ``uidl:<UIDL>``: a retry of a message that some recipients deferred goes to the others
    only; such rows live as long as the message's row.  ``mid:<Message-ID>:<body digest>``
    (built by the cycle): a shared mailbox's copies of one message meet there; such rows
    are kept for the duplicate window.
    """

    keys: tuple[str, ...]
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Failures:
    """An account's failures as the scheduler counts them (``service.AccountState``)."""

    failures: int = 0  # consecutive failed cycles
    bare_login_errors: int = 0  # consecutive -ERRs at login without a response code
    failing: bool = False  # marked failing: it needs an administrator


@dataclass(frozen=True, slots=True)
class CycleRecord:
    """The outcome of one account's cycle, for ``status`` and ``/status``.

    ``mailbox_messages`` and ``mailbox_bytes``: what the cycle left in the mailbox (STAT at
    its start minus what its QUIT deleted), None when it never got as far as STAT.
    """

    started: float
    finished: float
    result: str  # "ok" | "failed"
    error: str | None
    mailbox_messages: int | None
    mailbox_bytes: int | None
    next_poll: float | None
    failures: Failures = Failures()


@dataclass(frozen=True, slots=True)
class AccountStatus:
    """An account's last cycle plus its counts of rows, for ``status`` (docs/design.md §11).

    ``deferred`` counts deferred messages still listed upstream (waiting for a retry);
    ``dead_lettered`` counts the ledger's dead-lettered rows, which are forgotten like any other
    once gone upstream: the dead-letter store holds the lasting count.
    """

    name: str
    last_cycle_started: float | None
    last_cycle_finished: float | None
    result: str | None
    last_error: str | None
    mailbox_messages: int | None
    mailbox_bytes: int | None
    next_poll: float | None
    deferred: int
    dead_lettered: int
    failing: bool = False


_SELECT_ACCOUNT: Final = """
    SELECT uidl, state, size, attempts, first_seen, last_attempt, last_response,
           dead_letter_id, gone_since, errors, listed_size, header_digest
    FROM messages WHERE account = ?
"""
_SELECT_ONE: Final = _SELECT_ACCOUNT + " AND uidl = ?"

# A new row starts at one attempt; an existing one counts up and keeps first_seen.
_UPSERT: Final = """
    INSERT INTO messages (account, uidl, state, size, attempts, first_seen,
                          last_attempt, last_response, dead_letter_id, gone_since,
                          listed_size, header_digest)
    VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, NULL, ?, ?)
    ON CONFLICT (account, uidl) DO UPDATE SET
        state = excluded.state,
        size = excluded.size,
        attempts = messages.attempts + 1,
        last_attempt = excluded.last_attempt,
        last_response = excluded.last_response,
        dead_letter_id = coalesce(excluded.dead_letter_id, messages.dead_letter_id),
        gone_since = NULL,
        listed_size = coalesce(excluded.listed_size, messages.listed_size),
        header_digest = coalesce(excluded.header_digest, messages.header_digest)
"""
_HEARTBEAT: Final = """
    INSERT INTO heartbeat (id, beats, at) VALUES (1, 1, ?)
    ON CONFLICT (id) DO UPDATE SET beats = heartbeat.beats + 1, at = excluded.at
"""
_INSERT_DONE: Final = (
    "INSERT OR REPLACE INTO recipients_done (account, key, recipient, at) VALUES (?, ?, ?, ?)"
)
# A deferral never overwrites a final state.
_UPSERT_DEFERRAL: Final = _UPSERT + "    WHERE messages.state = 'deferred'\n"
# An unexpected failure while handling the message: counted, the message kept upstream as a
# deferred one (offered again next cycle); a final state stays final.  attempts counts SMTP
# attempts, so a row that only failed this way has none.
_UPSERT_FAILED: Final = """
    INSERT INTO messages (account, uidl, state, size, attempts, first_seen,
                          last_attempt, last_response, dead_letter_id, gone_since,
                          listed_size, header_digest, errors)
    VALUES (?, ?, 'deferred', ?, 0, ?, ?, ?, NULL, NULL, ?, ?, 1)
    ON CONFLICT (account, uidl) DO UPDATE SET
        errors = messages.errors + 1,
        last_attempt = excluded.last_attempt,
        last_response = excluded.last_response
    WHERE messages.state = 'deferred'
"""


_UPSERT_CYCLE: Final = """
    INSERT INTO accounts (name, last_cycle_started, last_cycle_finished, result, last_error,
                          mailbox_messages, mailbox_bytes, next_poll, failures,
                          bare_login_errors, failing)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (name) DO UPDATE SET
        last_cycle_started = excluded.last_cycle_started,
        last_cycle_finished = excluded.last_cycle_finished,
        result = excluded.result,
        last_error = excluded.last_error,
        mailbox_messages = excluded.mailbox_messages,
        mailbox_bytes = excluded.mailbox_bytes,
        next_poll = excluded.next_poll,
        failures = excluded.failures,
        bare_login_errors = excluded.bare_login_errors,
        failing = excluded.failing
"""


def _cycle_params(account: str, record: CycleRecord) -> tuple[object, ...]:
    return (
        account,
        record.started,
        record.finished,
        record.result,
        record.error,
        record.mailbox_messages,
        record.mailbox_bytes,
        record.next_poll,
        record.failures.failures,
        record.failures.bare_login_errors,
        record.failures.failing,
    )


def _entry(row: Any) -> LedgerEntry:
    uidl, state, size, attempts, first_seen, last_attempt, response, dl_id, gone = row[:9]
    errors, listed_size, digest = row[9:]
    return LedgerEntry(
        uidl,
        MessageState(state),
        size,
        attempts,
        first_seen,
        last_attempt,
        response,
        dl_id,
        gone,
        errors,
        Identity(listed_size, digest) if digest is not None else None,
    )


@dataclass(frozen=True, slots=True)
class _Row:
    """A message's row and its done recipients, as bound to the statements that write them."""

    params: tuple[object, ...]
    done: list[tuple[object, ...]]

    @classmethod
    def of(
        cls,
        account: str,
        uidl: str,
        state: MessageState,
        size: int,
        response: str,
        now: float,
        dead_letter_id: str | None,
        done: RecipientsDone | None,
        identity: Identity | None = None,
    ) -> _Row:
        params = (
            account,
            uidl,
            state.value,
            size,
            now,
            now,
            _storable(response),
            dead_letter_id,
            identity.size if identity is not None else None,
            identity.digest if identity is not None else None,
        )
        rows: list[tuple[object, ...]] = (
            [(account, k, r.lower(), now) for k in done.keys for r in done.recipients]
            if done is not None
            else []
        )
        return cls(params, rows)

    def write(self, conn: sqlite3.Connection, upsert: str) -> None:
        """Inside the caller's transaction."""
        conn.execute(upsert, self.params)
        if self.done:
            conn.executemany(_INSERT_DONE, self.done)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into statements (``executescript`` would commit on its own)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""
    if buf.strip():
        raise ValueError("migration script ends with an incomplete statement")


def _create_private(path: Path) -> None:
    """Create the database's directory (0700) and file (0600) if missing; keep existing modes.

    The ledger names the accounts and their mail's UIDLs: nothing for other local users.
    SQLite gives its -wal and -shm files the database file's mode.
    """
    directory = path.parent
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        os.chmod(path, 0o600)


def _connect(path: Path) -> sqlite3.Connection:
    _create_private(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise LedgerError(f"ledger {path}: cannot use WAL journal mode (got {mode})")
        # Enough with WAL: see "WAL with synchronous=NORMAL" in the module docstring.
        conn.execute("PRAGMA synchronous = NORMAL")
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    with _transaction(conn):
        # Read inside the write transaction, so two processes opening a new file cannot both
        # run migration 1.
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise LedgerError(
                f"ledger {path}: schema version {version} is newer than this program "
                f"knows ({len(MIGRATIONS)}); upgrade pop3-connector"
            )
        for number in range(version + 1, len(MIGRATIONS) + 1):
            log.info("ledger %s: applying migration %d", path, number)
            for statement in _statements(MIGRATIONS[number - 1]):
                conn.execute(statement)
            # PRAGMA takes no parameters; number is our own int.
            conn.execute(f"PRAGMA user_version = {number:d}")


class Ledger:
    """The ledger.  Open with :meth:`open`; every method is async and raises only LedgerError."""

    def __init__(
        self,
        path: Path,
        executor: ThreadPoolExecutor,
        conn: sqlite3.Connection,
    ) -> None:
        self.path = path
        self._executor = executor
        self._conn = conn
        self._closed = False
        # Group commit (record_delivered_soon): rows queued on the event loop's thread, taken
        # by the ledger thread's drain job under the lock.
        self._lock = threading.Lock()
        self._queued: list[tuple[int, _Row]] = []  # (ticket, row)
        self._tickets = 0  # the last ticket handed out
        self._draining = False  # a drain job is queued or running
        self._settled = 0  # every ticket up to this one is committed or failed (thread writes)
        self._failed: dict[int, LedgerError] = {}  # tickets whose commit failed (rare)
        # Rows of messages SMTP accepted whose commit failed: (statement, row), written first by
        # the next write transaction (_writing).  Touched on the ledger thread only.
        self._owed: list[tuple[str, _Row]] = []
        # Why the last write failed; None once one succeeds (set on the ledger thread).
        self._write_error: LedgerError | None = None
        # record_cycle_soon: the newest row per account, and sync_listing's empty listings
        # (account -> recipients_before), taken by one drain job at a time.
        self._cycles: dict[str, tuple[object, ...]] = {}
        self._emptied: dict[str, float | None] = {}
        self._cycles_draining = False

    @classmethod
    async def open(cls, path: Path) -> Self:
        """Open (creating it if missing) and migrate the ledger at ``path``."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _guarded, path, "open", _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, executor, conn)

    async def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL) and stop the thread.  Idempotent."""
        if self._closed:
            return
        self._closed = True  # calls queued before this one still run first (FIFO)
        try:
            await self._submit("close", self._close, closing=True)
        finally:
            self._executor.shutdown(wait=False)

    def _close(self, conn: sqlite3.Connection) -> None:
        """On the ledger thread: a last try at the owed rows, then close the connection."""
        try:
            if self._owed:
                with self._writing(conn):
                    pass
        except (sqlite3.Error, OSError) as exc:
            error = _ledger_error(self.path, "record delivered", exc)
            for _, row in self._owed:
                # The message is in Exchange and still upstream, unknown to the ledger: the
                # next run delivers it again (docs/design.md §9's window, widened by the failure).
                log.error(
                    "account=%s uidl=%s: accepted by SMTP but not recorded (%s): "
                    "it will be delivered again",
                    row.params[0],
                    row.params[1],
                    error,
                )
        finally:
            conn.close()

    # -- writability ---------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """False after a write failed, until one succeeds (True before any write)."""
        return self._write_error is None

    @property
    def write_error(self) -> str | None:
        """Why the last write failed (with a hint: which file, what to check), or None."""
        return None if self._write_error is None else str(self._write_error)

    @property
    def unrecorded(self) -> int:
        """Messages SMTP accepted whose rows are owed (their commit failed; see _writing)."""
        return len(self._owed)

    async def prove_writable(self, now: float) -> None:
        """Commit a heartbeat that SQLite must write to the file; raise LedgerError if it cannot.

        The cycle calls it before a cycle's first SMTP transaction: the listing sync commits
        nothing when nothing changed, so without it the first real write would be the row after
        a ``250``, and a message would be delivered again on every cycle while the disk is full
        or read-only.  The heartbeat's counter goes up, so the page changes: SQLite skips
        writing a row updated to the value it has.  Owed rows are written first.  Less room
        than :data:`MIN_FREE_BYTES` counts as a full disk.
        """

        def run(conn: sqlite3.Connection) -> None:
            free = shutil.disk_usage(self.path.parent).free  # what this user may take
            if free < MIN_FREE_BYTES:
                raise OSError(
                    errno.ENOSPC,
                    f"{free} bytes left on its file system; the ledger wants "
                    f"{MIN_FREE_BYTES // 1024} KiB of room",
                )
            with self._writing(conn):
                conn.execute(_HEARTBEAT, (now,))

        await self._submit("prove writable", run, shield=True, writes=True)

    @contextlib.contextmanager
    def _writing(self, conn: sqlite3.Connection) -> Iterator[None]:
        """On the ledger thread: a write transaction that first writes the owed rows.

        Rows owed are those of messages SMTP accepted whose commit failed (the group commit's,
        or :meth:`_record`'s): written before anything else, so that a listing sync knows
        their messages as delivered before it says what is new.  They stay owed until a
        transaction with them commits.
        """
        owed, self._owed = self._owed, []
        try:
            with _transaction(conn):
                for sql, row in owed:
                    row.write(conn, sql)
                yield
        except BaseException:
            self._owed[:0] = owed
            raise
        if owed:
            log.warning(
                "ledger %s: recorded %d message(s) accepted by SMTP whose commit had failed",
                self.path,
                len(owed),
            )

    def _wrote(self, error: LedgerError | None) -> None:
        """On the ledger thread: remember how a write went; log when that changes."""
        if error is None:
            if self._write_error is not None:
                log.warning("ledger %s is writable again", self.path)
            self._write_error = None
            return
        if self._write_error is None:
            log.error("%s; no mail is handed to SMTP until a write to the ledger succeeds", error)
        self._write_error = error

    # -- the per-message interface -------------------------------------------------------------

    async def sync_listing(
        self,
        account: str,
        listed: Collection[str],
        *,
        recipients_before: float | None = None,
    ) -> dict[str, LedgerEntry]:
        """The entries of ``account`` whose UIDL is in ``listed`` (a complete UIDL listing).

        In the same transaction, every other row of the account is forgotten, with the
        recipients done under its ``uidl:`` key: its message is gone upstream, and if the
        server ever lists that UIDL again it is a new message (docs/design.md §5.1 step 6;
        RFC 1939 §7).
        With ``leave_on_server`` a kept message stays listed, so its row stays; one deleted
        upstream by someone else is forgotten like any other.  One read of the account's rows;
        writes only for the rows forgotten.  ``recipients_before``: forget the account's
        ``mid:`` rows (the duplicate window) recorded before then.

        An empty listing (the idle poll of an emptied mailbox, by far the most common) has no
        entries to return: its forgetting is queued with the cycle records
        (:meth:`record_cycle_soon`) instead of a round trip to the ledger thread, and done
        before any later job of the ledger (the next cycle's sync among them).
        """
        if not listed:
            if self._closed:
                raise LedgerError(f"ledger {self.path}: closed")
            self._soon(lambda: self._emptied.__setitem__(account, recipients_before))
            return {}
        wanted = frozenset(listed)  # a snapshot: the caller may reuse its collection
        return await self._submit(
            "sync_listing",
            lambda conn: self._sync_listing(conn, account, wanted, recipients_before),
            shield=True,
            writes=True,
        )

    def _sync_listing(
        self,
        conn: sqlite3.Connection,
        account: str,
        wanted: frozenset[str],
        recipients_before: float | None,
    ) -> dict[str, LedgerEntry]:
        # Most cycles change nothing here (a steady or empty mailbox): then one read, without
        # the write lock and the commit of an empty transaction (bench/README.md, "fleet").
        # The read is repeated inside the write transaction when something is to be written.
        if not self._owed and not _mid_rows_due(conn, account, recipients_before):
            known = {row[0]: _entry(row) for row in conn.execute(_SELECT_ACCOUNT, (account,))}
            if known.keys() <= wanted:
                return known
        known = {}
        gone: list[str] = []
        with self._writing(conn):
            if recipients_before is not None:
                # Only the "mid:" rows (the keys from "mid:" up to "mid;", ';' following ':'
                # in ASCII: a range of the primary key).  Not the "uidl:" rows: a message
                # deferred for some recipients may stay upstream longer than any age (the
                # connector down, the account parked), and a retry that forgot who has it
                # would send it to them again; they go with their message's row.
                conn.execute(
                    "DELETE FROM recipients_done"
                    " WHERE account = ? AND key >= 'mid:' AND key < 'mid;' AND at < ?",
                    (account, recipients_before),
                )
            for row in conn.execute(_SELECT_ACCOUNT, (account,)):
                if row[0] in wanted:
                    known[row[0]] = _entry(row)
                else:
                    gone.append(row[0])
            if gone:
                _forget(conn, account, gone)
        if gone:
            log.debug("ledger: account %s: %d no longer listed, forgotten", account, len(gone))
        return known

    async def forget(self, account: str, uidls: Collection[str]) -> None:
        """Delete the rows of ``uidls`` and the recipients done under their ``uidl:`` keys:
        the messages listed under them now are new ones (docs/design.md §5.1 step 6)."""
        gone = list(uidls)

        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                _forget(conn, account, gone)

        await self._submit("forget", run, shield=True)

    async def entries_outside(self, account: str, family: str, current: str) -> list[LedgerEntry]:
        """The rows of ``account`` whose key starts with ``family`` but not with ``current``:
        an IMAP folder's rows under another UIDVALIDITY than the one it has now (``imap:``,
        ``imap:<UIDVALIDITY>:``, docs/design.md §15.2).  Two ranges of the primary key: ":"
        ends each prefix, and ";" follows ":" in ASCII."""
        if not family.endswith(":") or not current.startswith(family) or not current.endswith(":"):
            raise ValueError("prefixes must end with ':' and current must extend family")

        def run(conn: sqlite3.Connection) -> list[LedgerEntry]:
            rows = conn.execute(
                _SELECT_ACCOUNT + " AND ((uidl >= ? AND uidl < ?) OR (uidl >= ? AND uidl < ?))",
                (account, family, current, current[:-1] + ";", family[:-1] + ";"),
            )
            return [_entry(row) for row in rows]

        return await self._submit("entries_outside", run)

    async def rekey(self, account: str, renames: Mapping[str, str]) -> None:
        """Move rows (and the recipients done under their ``uidl:`` keys) from old keys to new
        ones, in one transaction: the same messages listed under new identifiers (an IMAP
        folder whose UIDVALIDITY changed, docs/design.md §15.2).  A new key that already has
        a row keeps it; the old row then stays, to be forgotten by the listing sync."""
        pairs = [(new, account, old) for old, new in renames.items()]

        def run(conn: sqlite3.Connection) -> None:
            with self._writing(conn):
                conn.executemany(
                    "UPDATE OR IGNORE messages SET uidl = ? WHERE account = ? AND uidl = ?", pairs
                )
                conn.executemany(
                    "UPDATE OR IGNORE recipients_done SET key = 'uidl:' || ?"
                    " WHERE account = ? AND key = 'uidl:' || ?",
                    pairs,
                )

        await self._submit("rekey", run, shield=True, writes=True)

    async def record_failed(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        *,
        identity: Identity | None = None,
    ) -> LedgerEntry:
        """Commit that handling the message failed unexpectedly in this cycle (docs/design.md
        §5.2, invariant 7); return its row, ``errors`` counted.  A message not yet in the
        ledger gets a deferred row (it stays upstream and is offered again); a final state
        stays final."""
        params = (
            account,
            uidl,
            size,
            now,
            now,
            _storable(response),
            identity.size if identity is not None else None,
            identity.digest if identity is not None else None,
        )

        def run(conn: sqlite3.Connection) -> LedgerEntry:
            with _transaction(conn):
                conn.execute(_UPSERT_FAILED, params)
                found = conn.execute(_SELECT_ONE, (account, uidl)).fetchone()
            return _entry(found)

        return await self._submit("record failed", run, shield=True)

    async def record_delivered(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        *,
        dead_letter_id: str | None = None,
        done: RecipientsDone | None = None,
        identity: Identity | None = None,
    ) -> None:
        """Commit that SMTP accepted the message (``response`` is the ``250`` line).

        ``dead_letter_id``: a copy for the recipients who refused it is in the store.
        ``done``: the recipients it is now done for, recorded in the same transaction.
        ``identity``: kept for the check before a later DELE (docs/design.md §5.1 step 1).
        """
        await self._record(
            account,
            uidl,
            MessageState.DELIVERED,
            size,
            response,
            now,
            dead_letter_id,
            done,
            identity,
        )

    def record_delivered_soon(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        *,
        done: RecipientsDone | None = None,
        identity: Identity | None = None,
    ) -> int:
        """Queue a ``delivered`` row for the next group commit; return its ticket at once.

        The ledger thread starts committing it as soon as it is free (see "Group commit" in
        the module docstring).  Nothing may rely on the row, and no DELE may go out for the
        message, before :meth:`settle` has seen the ticket committed.
        """
        if self._closed:
            raise LedgerError(f"ledger {self.path}: closed")
        row = _Row.of(
            account, uidl, MessageState.DELIVERED, size, response, now, None, done, identity
        )
        with self._lock:
            self._tickets += 1
            ticket = self._tickets
            self._queued.append((ticket, row))
            start, self._draining = not self._draining, True
        if start:
            # A plain executor job, not run_in_executor: its end wakes no event loop.
            self._executor.submit(self._drain)
        return ticket

    def _drain(self) -> None:
        """On the ledger thread: commit what is queued, one transaction per batch taken,
        until the queue is empty.  Every ticket taken ends up committed or failed, never
        dropped: ``settle`` counts on it."""
        conn = self._conn
        while True:
            with self._lock:
                batch, self._queued = self._queued, []
                if not batch:
                    # In the same locked step as the empty check: a row queued after this
                    # submits a new drain job (record_delivered_soon), so none waits unseen.
                    self._draining = False
                    return
            error: LedgerError | None = None
            try:
                with _transaction(conn):
                    for _, row in batch:
                        row.write(conn, _UPSERT)
            except (sqlite3.Error, OSError) as exc:
                error = _ledger_error(self.path, "record delivered", exc)
                error.__cause__ = exc
            except Exception as exc:  # noqa: BLE001 - a row that is not committed must fail
                error = LedgerError(f"ledger {self.path}: record delivered failed: {exc!r}")
                error.__cause__ = exc
            if error is not None:
                # SMTP took these messages: owed, so that none is handed to SMTP again.
                self._owed.extend((_UPSERT, row) for _, row in batch)
            self._wrote(error)
            with self._lock:
                if error is not None:
                    self._failed.update((ticket, error) for ticket, _ in batch)
                self._settled = batch[-1][0]

    @property
    def settled(self) -> int:
        """Every ticket up to this one is committed or failed (see :meth:`failed`)."""
        return self._settled

    def failed(self, tickets: Iterable[int]) -> bool:
        """Whether the group commit of any of ``tickets`` has failed already (a cheap check,
        without waiting, before each message: the caller stops before sending more mail)."""
        return bool(self._failed) and any(ticket in self._failed for ticket in tickets)

    async def settle(self, tickets: Sequence[int]) -> list[LedgerError | None]:
        """Wait until every ticket of :meth:`record_delivered_soon` so far is committed; for
        each of ``tickets``, None if its row is committed, else why it is not."""
        if tickets and self._settled < max(tickets):
            # The executor runs jobs in order: this one runs after the drain job that takes
            # the rows queued before it.
            try:
                await self._submit("commit", lambda conn: None, closing=True)
            except RuntimeError as exc:  # the executor is shut down: the ledger was closed
                raise LedgerError(f"ledger {self.path}: closed") from exc
        with self._lock:
            settled = self._settled
            return [
                self._failed.pop(ticket, None)
                if ticket <= settled
                else LedgerError(f"ledger {self.path}: record delivered: not committed")
                for ticket in tickets
            ]

    async def record_dead_lettered(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        dead_letter_id: str | None = None,
        *,
        done: RecipientsDone | None = None,
        identity: Identity | None = None,
    ) -> None:
        """Commit that the message is durably in the dead-letter store (as ``dead_letter_id``)."""
        await self._record(
            account,
            uidl,
            MessageState.DEAD_LETTERED,
            size,
            response,
            now,
            dead_letter_id,
            done,
            identity,
        )

    async def record_deferred(
        self,
        account: str,
        uidl: str,
        size: int,
        response: str,
        now: float,
        *,
        dead_letter_id: str | None = None,
        done: RecipientsDone | None = None,
        identity: Identity | None = None,
    ) -> LedgerEntry:
        """Commit a temporary refusal; return the row (``attempts`` counted, ``first_seen`` kept).

        A row already delivered or dead-lettered stays so (those states are final); the
        returned entry shows it.  ``done``: recipients it was delivered (or dead-lettered) to
        while others deferred it; a retry leaves them out.
        """
        return await self._record(
            account,
            uidl,
            MessageState.DEFERRED,
            size,
            response,
            now,
            dead_letter_id,
            done,
            identity,
        )

    async def recipients_by_key(
        self, account: str, keys: Collection[str], *, prefix: str = ""
    ) -> dict[str, frozenset[str]]:
        """The recipients (lower case) recorded as done under each of ``keys``, and under
        every key that starts with ``prefix`` (none when empty); keys without any are absent.

        One job (one thread hop) for both, so that the cycle learns at once whether a
        message is a copy and whether its Message-ID came before with another body.
        """
        wanted = tuple(keys)
        # Every key that starts with prefix sorts in [prefix, prefix with its last character
        # incremented): a range of the primary key, not a scan.
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""

        def run(conn: sqlite3.Connection) -> dict[str, frozenset[str]]:
            found: dict[str, set[str]] = {}
            for key in wanted:
                for (r,) in conn.execute(
                    "SELECT recipient FROM recipients_done WHERE account = ? AND key = ?",
                    (account, key),
                ):
                    found.setdefault(key, set()).add(r)
            if prefix:
                for key, r in conn.execute(
                    "SELECT key, recipient FROM recipients_done"
                    " WHERE account = ? AND key >= ? AND key < ?",
                    (account, prefix, upper),
                ):
                    found.setdefault(key, set()).add(r)
            return {key: frozenset(rs) for key, rs in found.items()}

        return await self._submit("recipients_by_key", run)

    async def _record(
        self,
        account: str,
        uidl: str,
        state: MessageState,
        size: int,
        response: str,
        now: float,
        dead_letter_id: str | None,
        done: RecipientsDone | None,
        identity: Identity | None = None,
    ) -> LedgerEntry:
        sql = _UPSERT_DEFERRAL if state is MessageState.DEFERRED else _UPSERT
        row = _Row.of(account, uidl, state, size, response, now, dead_letter_id, done, identity)
        # SMTP took the message (for some recipients at least): if the commit fails the row is
        # owed.  Not a dead letter's: the cycle removes its file instead (the message is
        # still upstream and is dead-lettered again).
        owe = state is MessageState.DELIVERED or (state is MessageState.DEFERRED and bool(done))

        def run(conn: sqlite3.Connection) -> LedgerEntry:
            try:
                with _transaction(conn):
                    row.write(conn, sql)
                    found = conn.execute(_SELECT_ONE, (account, uidl)).fetchone()
            except Exception:
                if owe:
                    self._owed.append((sql, row))
                raise
            return _entry(found)

        return await self._submit(f"record {state.value}", run, shield=True, writes=True)

    async def dead_letter_ids(self) -> frozenset[str]:
        """Every dead-letter id a row records (deadletter.reconcile: which are not)."""

        def run(conn: sqlite3.Connection) -> frozenset[str]:
            rows = conn.execute(
                "SELECT dead_letter_id FROM messages WHERE dead_letter_id IS NOT NULL"
            )
            return frozenset(dl_id for (dl_id,) in rows)

        return await self._submit("dead_letter_ids", run)

    async def entry(self, account: str, uidl: str) -> LedgerEntry | None:
        """The row of one message, or None; changes nothing (for ``status`` and tests)."""

        def run(conn: sqlite3.Connection) -> LedgerEntry | None:
            row = conn.execute(_SELECT_ONE, (account, uidl)).fetchone()
            return None if row is None else _entry(row)

        return await self._submit("entry", run)

    # -- the per-account interface -------------------------------------------------------------

    async def record_cycle(self, account: str, record: CycleRecord) -> None:
        """Upsert the account's row with the outcome of its latest cycle."""
        params = _cycle_params(account, record)

        def run(conn: sqlite3.Connection) -> None:
            with self._writing(conn):
                conn.execute(_UPSERT_CYCLE, params)

        await self._submit("record_cycle", run, writes=True)

    def record_cycle_soon(self, account: str, record: CycleRecord) -> None:
        """Queue :meth:`record_cycle`'s row and return at once: the rows queued while the
        ledger thread is busy are committed together, in one transaction (bookkeeping for
        ``status``, nothing waits on it).  A failure is logged, and shows in :attr:`writable`.
        The rows go before any later job of the ledger (its single thread runs jobs in order),
        so a ``status`` read after it, or :meth:`close`, sees them."""
        if self._closed:
            raise LedgerError(f"ledger {self.path}: closed")
        params = _cycle_params(account, record)
        self._soon(lambda: self._cycles.__setitem__(account, params))  # the newest wins

    def _soon(self, queue: Callable[[], None]) -> None:
        """Queue work for the next drain job (``queue`` runs under the lock), which starts
        CYCLE_RECORD_DELAY after the first work queued: the cycles that end within it share
        one transaction (spread over the interval, each poll would otherwise commit alone),
        and nobody waits for it.  Every other job of the ledger thread (a listing sync,
        account_status, close...) commits what is queued first (_call), so none sees the
        ledger without it."""
        with self._lock:
            queue()
            start, self._cycles_draining = not self._cycles_draining, True
        if start:
            asyncio.get_running_loop().call_later(CYCLE_RECORD_DELAY, self._submit_drain)

    def _submit_drain(self) -> None:
        if not self._closed:  # else close() drained it
            self._executor.submit(self._drain_cycles)

    def _drain_cycles(self) -> None:
        """On the ledger thread: the queued empty listings, then the cycle rows, in one
        transaction (see sync_listing and record_cycle_soon).  Nothing queued: nothing done."""
        with self._lock:
            rows, self._cycles = list(self._cycles.values()), {}
            emptied, self._emptied = self._emptied, {}
            self._cycles_draining = False
        if not rows and not emptied:
            return
        conn = self._conn
        before = conn.total_changes
        try:
            with self._writing(conn):
                for account, recipients_before in emptied.items():
                    _forget_account(conn, account, recipients_before)
                conn.executemany(_UPSERT_CYCLE, rows)
        except (sqlite3.Error, OSError) as exc:
            error = _ledger_error(self.path, "record_cycle", exc)
            log.error("cannot record %d cycle(s) in the ledger: %s", len(rows), error)
            self._wrote(error)
            return
        except Exception:  # a job of the executor nobody awaits: say it here, or never
            log.exception("cannot record %d cycle(s) in the ledger", len(rows))
            return
        if emptied:
            log.debug("ledger: %d account(s) with an empty listing synced", len(emptied))
        if conn.total_changes != before:
            self._wrote(None)

    async def deferred_count(self, account: str) -> int:
        """The account's deferred messages still listed upstream (``deferred`` of
        :meth:`account_status`, for one account)."""

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM messages"
                " WHERE account = ? AND state = 'deferred' AND gone_since IS NULL",
                (account,),
            ).fetchone()
            return int(row[0])

        return await self._submit("deferred_count", run)

    async def breaker(self, account: str) -> str | None:
        """The refusal that tripped the account's circuit breaker, or None (cycle.Breaker)."""

        def run(conn: sqlite3.Connection) -> str | None:
            found = conn.execute(
                "SELECT breaker FROM accounts WHERE name = ?", (account,)
            ).fetchone()
            tripped: str | None = None if found is None else found[0]
            return tripped

        return await self._submit("breaker", run)

    async def set_breaker(self, account: str, tripped: str | None) -> None:
        """Remember (or, with None, forget) the refusal that tripped the circuit breaker."""
        text = None if tripped is None else _storable(tripped)

        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(
                    """
                    INSERT INTO accounts (name, breaker) VALUES (?, ?)
                    ON CONFLICT (name) DO UPDATE SET breaker = excluded.breaker
                    """,
                    (account, text),
                )

        await self._submit("set_breaker", run, shield=True)

    async def account_status(self) -> list[AccountStatus]:
        """Every account with a cycle record or ledger rows, by name."""

        def run(conn: sqlite3.Connection) -> list[AccountStatus]:
            rows = conn.execute(
                """
                WITH counts AS (
                    SELECT account,
                           sum(state = 'deferred' AND gone_since IS NULL) AS deferred,
                           sum(state = 'dead_lettered') AS dead_lettered
                    FROM messages GROUP BY account
                ),
                names AS (SELECT name FROM accounts UNION SELECT account FROM counts)
                SELECT names.name, a.last_cycle_started, a.last_cycle_finished, a.result,
                       a.last_error, a.mailbox_messages, a.mailbox_bytes, a.next_poll,
                       coalesce(c.deferred, 0), coalesce(c.dead_lettered, 0),
                       coalesce(a.failing, 0) != 0
                FROM names
                LEFT JOIN accounts a ON a.name = names.name
                LEFT JOIN counts c ON c.account = names.name
                ORDER BY names.name
                """
            ).fetchall()
            statuses = []
            for name, started, finished, result, error, messages, octets, poll, *rest in rows:
                deferred, dead_lettered, failing = rest
                statuses.append(
                    AccountStatus(
                        name, started, finished, result, error, messages, octets, poll,
                        deferred, dead_lettered, bool(failing),
                    )
                )  # fmt: skip
            return statuses

        return await self._submit("account_status", run)

    async def failures(self, account: str) -> Failures:
        """The failures recorded with the account's last cycle (none: never ran)."""

        def run(conn: sqlite3.Connection) -> Failures:
            row = conn.execute(
                "SELECT failures, bare_login_errors, failing FROM accounts WHERE name = ?",
                (account,),
            ).fetchone()
            return Failures() if row is None else Failures(row[0], row[1], bool(row[2]))

        return await self._submit("failures", run)

    # -- moving an account to another ledger (docs/design.md §14.3) ----------------------------

    async def export_accounts(self, names: Sequence[str], *, exported_at: str) -> LedgerExport:
        """The rows of each named account, one snapshot (``ledger export``)."""
        wanted = tuple(names)
        return await self._submit(
            "export", lambda conn: export_rows(conn, wanted, exported_at=exported_at)
        )

    async def import_accounts(self, export: LedgerExport, *, replace: bool) -> ImportResult:
        """Write the rows of ``export`` in one transaction (``ledger import``); an account with
        rows here already is a conflict unless ``replace`` (see ``ledger_export.import_rows``).
        ``ValueError`` for a file this ledger cannot take (a newer schema, unknown columns)."""
        schema = len(MIGRATIONS)
        return await self._submit(
            "import",
            lambda conn: import_rows(conn, export, replace=replace, schema=schema),
        )

    # -- the thread hop ------------------------------------------------------------------------

    async def _submit(
        self,
        op: str,
        fn: Callable[[sqlite3.Connection], T],
        *,
        shield: bool = False,
        closing: bool = False,
        writes: bool = False,
    ) -> T:
        """Run ``fn(conn)`` on the ledger thread.

        ``shield``: if the caller is cancelled while the job is queued or running, the job
        still runs to its commit (and the caller still gets CancelledError).  Without it a
        queued job would be dropped by the cancellation.  ``writes``: ``fn`` takes the write
        lock; its outcome sets :attr:`writable` (a success only when it changed rows: a commit
        of nothing proves nothing).
        """
        if self._closed and not closing:
            raise LedgerError(f"ledger {self.path}: closed")
        loop = asyncio.get_running_loop()
        call = functools.partial(self._call, op, fn, writes=writes)
        future = loop.run_in_executor(self._executor, call)
        if shield:
            # If the caller is gone, nobody awaits the result: retrieve a failure here so that
            # asyncio does not log "exception was never retrieved".
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            return await asyncio.shield(future)
        return await future

    def _call(self, op: str, fn: Callable[[sqlite3.Connection], T], *, writes: bool) -> T:
        """On the ledger thread: ``fn(conn)``, with SQLite and OS errors as LedgerError."""
        conn = self._conn
        self._drain_cycles()  # what record_cycle_soon and empty listings queued, first
        before = conn.total_changes
        try:
            result = fn(conn)
        except (sqlite3.Error, OSError) as exc:
            error = _ledger_error(self.path, op, exc)
            if writes:
                self._wrote(error)
            raise error from exc
        if writes and conn.total_changes != before:
            self._wrote(None)
        return result


def _forget_account(conn: sqlite3.Connection, account: str, before: float | None) -> None:
    """Inside the caller's transaction: what an empty listing leaves of ``account`` (every row
    gone upstream, with its ``uidl:`` recipients; ``mid:`` rows recorded before ``before``)."""
    conn.execute("DELETE FROM messages WHERE account = ?", (account,))
    conn.execute(
        "DELETE FROM recipients_done WHERE account = ? AND key >= 'uidl:' AND key < 'uidl;'",
        (account,),
    )
    if before is not None:
        conn.execute(
            "DELETE FROM recipients_done"
            " WHERE account = ? AND key >= 'mid:' AND key < 'mid;' AND at < ?",
            (account, before),
        )


def _mid_rows_due(conn: sqlite3.Connection, account: str, before: float | None) -> bool:
    """Whether ``account`` has ``mid:`` rows recorded before ``before`` (sync_listing)."""
    if before is None:
        return False
    row = conn.execute(
        "SELECT 1 FROM recipients_done"
        " WHERE account = ? AND key >= 'mid:' AND key < 'mid;' AND at < ? LIMIT 1",
        (account, before),
    ).fetchone()
    return row is not None


def _forget(conn: sqlite3.Connection, account: str, uidls: Sequence[str]) -> None:
    """Inside the caller's transaction: delete the rows of ``uidls`` and their ``uidl:`` rows."""
    conn.executemany(
        "DELETE FROM messages WHERE account = ? AND uidl = ?", [(account, u) for u in uidls]
    )
    conn.executemany(
        "DELETE FROM recipients_done WHERE account = ? AND key = ?",
        [(account, f"uidl:{u}") for u in uidls],
    )


def _guarded(path: Path, op: str, fn: Callable[[A], T], arg: A) -> T:
    """Call ``fn(arg)`` on the ledger thread, turning SQLite and OS errors into LedgerError."""
    try:
        return fn(arg)
    except (sqlite3.Error, OSError) as exc:
        raise _ledger_error(path, op, exc) from exc


def _storable(text: str) -> str:
    """``text`` as SQLite can store it (UTF-8).  An SMTP reply decoded with surrogateescape
    (aiosmtplib does) holds a lone surrogate for each byte that is not UTF-8; binding it would
    fail the commit after the message was delivered, and deliver it again every cycle."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _ledger_error(path: Path, op: str, exc: sqlite3.Error | OSError) -> LedgerError:
    """One line an administrator can act on: the file, what failed, why, and what to check.

    The failures that are the disk's or another process's (full, read-only, I/O error, lock)
    read ``ledger PATH not writable: ...; <hint>``, at start (exit status 74, see cli) and
    mid-cycle alike.
    """
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        detail = f"{exc} [{name}]"
        hint = _hint(path, name.split("_")[1] if name.startswith("SQLITE_") else "")
    else:
        detail = exc.strerror or str(exc)
        hint = _hint(path, _ERRNO_KIND.get(exc.errno or 0, ""))
    if hint is None:
        return LedgerError(f"ledger {path}: {op} failed: {detail}")
    return LedgerError(f"ledger {path} not writable: {op}: {detail}; {hint}")


def os_error_text(path: Path, what: str, exc: OSError) -> str:
    """An OSError on a file of the state directory as one line, as :func:`_ledger_error` puts
    the ledger's: ``PATH not writable: WHAT: reason; hint`` when a hint applies."""
    reason = exc.strerror or str(exc)
    hint = _hint(path, _ERRNO_KIND.get(exc.errno or 0, ""))
    if hint is None:
        return f"{path}: {what}: {reason}"
    return f"{path} not writable: {what}: {reason}; {hint}"


# errno -> the SQLite primary result code name of the same condition
_ERRNO_KIND: Final = {
    errno.ENOSPC: "FULL",
    errno.EDQUOT: "FULL",
    errno.EROFS: "READONLY",
    errno.EACCES: "READONLY",
    errno.EPERM: "READONLY",
    errno.EIO: "IOERR",
}


def _hint(path: Path, kind: str) -> str | None:
    """What to check, by SQLite's primary result code (https://sqlite.org/rescode.html)."""
    where = path.parent
    match kind:
        case "FULL":
            return f"the file system of {where} is full: free space there (df {where})"
        case "READONLY" | "PERM" | "AUTH":
            return (
                f"check that {where} is on a file system mounted read-write and that this "
                f"user can write {path.name} and its -wal and -shm files"
            )
        case "IOERR":
            return (
                f"the file system of {where} failed a write: check that it has free space "
                f"(df {where}) and is still mounted read-write (mount; the kernel log, dmesg)"
            )
        case "BUSY" | "LOCKED":
            return (
                f"another process held the write lock on {path} for more than "
                f"{BUSY_TIMEOUT_MS / 1000:g} s (an sqlite3 shell or a backup in a transaction?)"
            )
        case "CANTOPEN":
            return f"check that {where} exists and that this user can create files in it"
        case _:
            return None
