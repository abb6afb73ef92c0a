"""Composition root: the per-account scheduler, signals, reload and shutdown.

It runs what :func:`connector.runtime.build_runtime` built from the configuration: frozen values
only; ``Settings`` stops at ``runtime`` and ``cli`` (docs/design.md §2).

Scheduling: one task, :meth:`Service._dispatch`, asks a :class:`~connector.schedule.Plan` which
accounts are due and may start (their slot spread over the interval, at most
``max_parallel_accounts`` sessions in all and ``max_sessions_per_host`` on one host, none on a
host that asked us to slow down; docs/design.md §10.2), starts a task for each cycle inside a
``TaskGroup``, and sleeps until the plan's next time or until a cycle ends.  Between its cycles
an account costs a few small objects and no task.  A per-account lock makes two cycles of one
account impossible (the POP3 server would lock the mailbox, or worse, both would deliver).  A
failing account backs off; only an unknown error (Disposition.BUG) escapes and ends the service,
so that systemd restarts it and someone reads the traceback.

Reload (SIGHUP): :meth:`Service.apply_runtime` takes a freshly built :class:`Runtime`.  A new
account is added to the plan; a removed one finishes the cycle in flight and is not polled again;
a changed one uses its new settings from its next cycle on (a cycle reads its account's spec
once, when it starts, so nothing in flight changes under it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from connector.budget import MemoryBudget
from connector.cycle import (
    AccountSpec,
    Cycle,
    CycleObserver,
    CycleStats,
    LogObserver,
    Outcome,
)
from connector.deadletter import DeadLetterArchive
from connector.deadletter.maildir import MaildirStore
from connector.deadletter.reconcile import ReconcilingStore
from connector.errors import (
    AlreadyRunningError,
    ConnectorError,
    Disposition,
    Pop3AuthError,
    StateError,
    classify,
    printable,
)
from connector.ledger import AccountStatus, CycleRecord, Failures, Ledger, os_error_text
from connector.notices import Notifier, RecordingStore
from connector.runtime import Runtime, open_store
from connector.schedule import MIN_GAP, Plan, Polled, host_key, next_slot, phase, slow_down_reason
from connector.shard import Shard
from connector.smtp import SmtpDeliverer
from connector.spool import Spool

if TYPE_CHECKING:
    # Imported where used: aioimaplib and prometheus_client cost start-up time (bench/README.md)
    # that a `once` from cron with a Maildir store and no metrics endpoint never needs.
    from connector.imap.idle import IdleWatcher
    from connector.metrics import Metrics

log = logging.getLogger(__name__)
POP3_TRANSCRIPT = logging.getLogger("connector.transcript.pop3")
SMTP_TRANSCRIPT = logging.getLogger("connector.transcript.smtp")
IMAP_TRANSCRIPT = logging.getLogger("connector.transcript.imap")

# A bare "-ERR" to PASS (no RFC 2449 code) may be a wrong password or a busy server; after this
# many in a row we treat the account as failing (docs/design.md §6.1).
BARE_LOGIN_ERROR_LIMIT = 3
# The slowest a failing account is retried, and the pace for parked accounts.
MAX_BACKOFF_FACTOR = 4
PARKED_MIN_DELAY = 3600.0
# How often `run` counts the dead letters again: the cycles count what they store, and this
# catches what `dead-letters requeue` and `purge` change from outside (so does a SIGHUP).
DEAD_LETTER_RECOUNT = 60.0


# --------------------------------------------------------------------------------------------
# TLS client contexts (runtime.build_runtime)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Single-instance lock
# --------------------------------------------------------------------------------------------


class StateLock:
    """An exclusive lock on ``<state_dir>/lock``: a second ``run`` or ``once`` on the same state
    would fetch and deliver the same messages (POP3 servers need not lock mailboxes)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; AlreadyRunningError if another holds it, StateError (one line,
        with a hint) if the directory cannot be written."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(os_error_text(self.path, "cannot open the lock file", exc)) from None
        try:
            _lock_fd(fd)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunningError(
                f"another pop3-connector (pid {holder}) is using {self.path.parent}; "
                "two would deliver every message twice"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise StateError(os_error_text(self.path, "cannot write the lock file", exc)) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _lock_fd(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: lock the first byte instead
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined,unused-ignore]
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


# --------------------------------------------------------------------------------------------
# Cycles and the scheduler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CycleResult:
    """How one account's cycle ended."""

    account: str
    ok: bool
    stats: CycleStats
    duration: float
    error: str | None = None
    disposition: Disposition | None = None
    logged_in: bool = False  # got past the login (STAT answered)
    slow_down: str | None = None  # the host asked us to slow down (schedule.slow_down_reason)


class Flag:
    """A flag the scheduler reads (``AccountState.poll_now``): an ``asyncio.Event`` per account
    would cost a waiter queue each, and nothing waits on this one."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set


@dataclass(slots=True)
class AccountState:
    """The scheduler's memory of one account."""

    spec: AccountSpec
    interval: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    poll_now: Flag = field(default_factory=Flag)
    forced: bool = False  # poll_now was set by SIGUSR1 or a reload: it overrides the backoff
    failures: int = 0
    bare_login_errors: int = 0
    failing: bool = False
    restored: bool = False  # the three above read back from the ledger (_restore)
    last: CycleResult | None = None
    next_poll: float | None = None
    removed: bool = False  # dropped from the config by a reload: not polled after this cycle
    offset: float = -1.0  # schedule.phase(name), once computed (_next_poll)
    watcher: IdleWatcher | None = None  # an IMAP account waiting with IDLE (docs/design.md §15.3)
    # Service._idle's task while it holds the watcher between cycles, and the event that ends
    # its wait when the plan starts the account's next cycle (which borrows the connection) or
    # a reload removes the account; made for an account with push only.
    idle: asyncio.Task[None] | None = None
    leave_idle: asyncio.Event | None = None


@dataclass(slots=True)
class _Gate:
    """One host's sessions for ``once`` and :meth:`Service.run_cycle` (``serve`` has its plan):
    at most ``max_sessions_per_host`` at once, and none more in this run once the host asked
    us to slow down (``slowed``: its answer)."""

    sessions: asyncio.Semaphore
    slowed: str | None = None


class _Observers:
    """Tells every observer about a message (the log line, the metrics, a caller's own)."""

    def __init__(self, *observers: CycleObserver) -> None:
        self.observers = observers

    def message(self, account: str, uidl: str, size: int, outcome: Outcome, response: str) -> None:
        for observer in self.observers:
            observer.message(account, uidl, size, outcome, response)


def rfc3339(ts: float | None) -> str | None:
    """Unix time as RFC 3339 UTC (``2026-11-27T15:49:35Z``), or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shown(text: str | None) -> str | None:
    return None if text is None else printable(text)


def status_document(
    names: Iterable[str],
    rows: Iterable[AccountStatus],
    dead_letters: dict[str, int],
    next_poll: dict[str, float | None] | None = None,
    ledger: dict[str, Any] | None = None,
    *,
    targets: Mapping[str, str] | None = None,
    shard: Shard | None = None,
    elsewhere: Collection[str] = (),
    disabled: Collection[str] = (),
) -> dict[str, Any]:
    """The ``/status`` and ``status --json`` document (docs/design.md §11.2).

    ``names`` (the configured accounts) come first, in config order, then accounts the ledger
    or the dead-letter store still knows (removed from the config), but those of ``elsewhere``
    (another shard's: rows left from before a resharding).  ``next_poll`` overrides the
    ledger's value with the scheduler's (SIGUSR1 or a reload may have moved it).  ``ledger``
    (:func:`ledger_health`) becomes the document's ``ledger`` object.  ``targets``: the SMTP
    target of each account (``smtp_target``); ``shard``: the document's ``shard`` object.
    ``disabled``: the accounts with ``enabled = false``, which have no next poll.
    """
    by_name = {row.name: row for row in rows}
    order = list(dict.fromkeys([*names, *sorted(by_name), *sorted(dead_letters)]))
    if elsewhere:
        skip = set(elsewhere) - set(names)
        order = [name for name in order if name not in skip]
    targets = targets or {}
    accounts = []
    for name in order:
        row = by_name.get(name)
        poll = row.next_poll if row is not None else None
        if next_poll is not None and next_poll.get(name) is not None:
            poll = next_poll[name]
        if name in disabled:
            poll = None  # never polled; the ledger's value is from before it was disabled
        accounts.append(
            {
                "name": name,
                "last_cycle_started": rfc3339(row.last_cycle_started if row else None),
                "last_cycle_finished": rfc3339(row.last_cycle_finished if row else None),
                "result": row.result if row else None,
                # Escaped again: a row written before errors were escaped at the edge.
                "last_error": _shown(row.last_error if row else None),
                "mailbox_messages": row.mailbox_messages if row else None,
                "failing": row.failing if row else False,
                "deferred": row.deferred if row else 0,
                "dead_letters": dead_letters.get(name, 0),
                "next_poll": rfc3339(poll),
                "smtp_target": targets.get(name),
            }
        )
    doc: dict[str, Any] = {"accounts": accounts}
    if shard is not None:
        doc["shard"] = {"index": shard.index, "count": shard.count}
    if ledger is not None:
        doc["ledger"] = ledger
    return doc


def ledger_health(path: Path, ledger: Ledger | None) -> dict[str, Any]:
    """The ``ledger`` object of the status document: whether its last write succeeded, why
    not, and how many accepted messages wait for their rows (``None``: no ledger opened)."""
    return {
        "path": str(path),
        "writable": None if ledger is None else ledger.writable,
        "error": None if ledger is None else ledger.write_error,
        "unrecorded": 0 if ledger is None else ledger.unrecorded,
    }


class Service:
    """The running connector: ledger, dead-letter store and one state per account."""

    def __init__(
        self,
        runtime: Runtime,
        ledger: Ledger,
        *,
        observer: CycleObserver | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.ledger = ledger
        # Matches a dead letter stored but never recorded (a run killed in between) to the
        # next copy of its message, instead of storing it twice (deadletter.reconcile).
        self.store: DeadLetterArchive = ReconcilingStore(
            open_store(runtime), ledger.dead_letter_ids
        )
        self.metrics = metrics
        base = observer if observer is not None else LogObserver()
        self.observer: CycleObserver = base if metrics is None else _Observers(base, metrics)
        self.clock = clock
        self.notifier = Notifier(runtime.state_dir / "notices.json", clock=clock)
        self.stopping = asyncio.Event()
        # One lock per account *name*, kept across reloads: an account removed and added back
        # while its old cycle still runs must not get a second, concurrent cycle.
        self._locks: dict[str, asyncio.Lock] = {}
        self.accounts = {spec.name: self._new_state(spec, runtime) for spec in runtime.accounts}
        self._semaphore = asyncio.Semaphore(runtime.max_parallel)
        self.plan = Plan(max_parallel=runtime.max_parallel, per_host=runtime.per_host)
        self._gates: dict[str, _Gate] = {}
        self._wake = asyncio.Event()  # the plan changed: the dispatcher looks again
        self._recount_now = asyncio.Event()
        # Shared by every cycle: the octets of messages in memory (docs/design.md §10.6), and
        # the directory the larger ones are streamed to (§5.3; open_service cleans it).
        self.budget = MemoryBudget(runtime.memory_budget)
        self.spool = Spool(runtime.spool_dir)
        self._tg: asyncio.TaskGroup | None = None
        self.alive = False
        # Dead letters per account: counted at start, then kept up to date by the cycles as
        # they store them, and counted again every DEAD_LETTER_RECOUNT seconds and at a reload
        # (for `dead-letters requeue` and `purge`).  /status reads this, since counting an IMAP
        # store means logging in to it, which a request must not cost.
        self.dead_letter_counts: dict[str, int] | None = None
        if metrics is not None:
            metrics.set_accounts(self.accounts)
            metrics.set_targets(self.smtp_targets())
            metrics.watch_ledger(lambda: ledger.writable)

    def _new_state(self, spec: AccountSpec, runtime: Runtime) -> AccountState:
        lock = self._locks.setdefault(spec.name, asyncio.Lock())
        return AccountState(spec, runtime.intervals[spec.name], lock=lock)

    async def run_cycle(self, name: str) -> CycleResult:
        """One cycle of one account; never two of the same account at once, nor more than
        ``max_sessions_per_host`` on its host (``once``)."""
        return await self._run_state(self.accounts[name])

    async def _run_state(self, state: AccountState, *, gated: bool = True) -> CycleResult:
        """A cycle under the account's lock and the parallel limits.  ``gated``: take a session
        of the host's :class:`_Gate` (``serve``'s plan has counted it already)."""
        # The account lock first, then the host, then the parallel slot: a cycle waiting for
        # its account or its host must not hold a slot that another host's account could use.
        async with state.lock:
            if not gated:
                return await self._slot(state)
            key = host_key(state.spec.endpoint.host)
            gate = self._gates.get(key)
            if gate is None:
                gate = self._gates[key] = _Gate(asyncio.Semaphore(self.runtime.per_host))
            async with gate.sessions:
                if gate.slowed is not None:
                    return CycleResult(
                        state.spec.name,
                        False,
                        CycleStats(),
                        0.0,
                        f"not started: {key} asked us to slow down ({gate.slowed})",
                    )
                result = await self._slot(state)
                if result.slow_down is not None and gate.slowed is None:
                    gate.slowed = result.slow_down
                    log.warning(
                        "host %s asked us to slow down (%s): no more sessions there in this run",
                        key,
                        result.slow_down,
                    )
                return result

    async def _slot(self, state: AccountState) -> CycleResult:
        async with self._semaphore:
            if self.stopping.is_set():
                # Queued behind others when SIGTERM came: do not start a session now.
                return CycleResult(
                    state.spec.name, False, CycleStats(), 0.0, "not started: stopping"
                )
            result = await self._cycle(state)
        state.last = result
        return result

    async def _restore(self, state: AccountState) -> None:
        """Take up the account's failures where the last process left them: ``once`` from
        cron is a new process every time, and must count consecutive failures (and mark the
        account failing, and notify) as ``run`` does; ``run`` keeps them across restarts."""
        if state.restored:
            return
        try:
            saved = await self.ledger.failures(state.spec.name)
        except ConnectorError as exc:
            log.warning(
                "account=%s cannot read its failures from the ledger: %s", state.spec.name, exc
            )
            return  # counted from zero in this process; tried again before the next cycle
        state.failures, state.bare_login_errors = saved.failures, saved.bare_login_errors
        state.failing = saved.failing
        state.restored = True

    def smtp_targets(self) -> dict[str, str]:
        """The name of each account's SMTP target (``/status``, ``account_info``)."""
        default = self.runtime.default_target.name
        return {
            name: state.spec.smtp.name if state.spec.smtp is not None else default
            for name, state in self.accounts.items()
        }

    async def _cycle(self, state: AccountState) -> CycleResult:
        spec = state.spec
        await self._restore(state)
        started = self.clock()
        # The account's own target (docs/design.md §14.1): its session, TLS context and
        # envelope policy; a target that fails fails only the cycles of its accounts.
        target = spec.smtp if spec.smtp is not None else self.runtime.default_target
        deliverer = SmtpDeliverer(
            target.settings, transcript=SMTP_TRANSCRIPT if self.runtime.transcripts else None
        )
        recorded = RecordingStore(self.store)  # what the dead-letter digest names
        connect = None
        if state.watcher is not None and state.watcher.spec == spec and spec.imap is not None:
            from connector.imap.session import ImapSession

            # The cycle runs on the watcher's connection: no new login (docs/design.md §15.3).
            connect = ImapSession.opener(spec.imap, keep=spec.leave_on_server, lender=state.watcher)
        cycle = Cycle(
            spec,
            ledger=self.ledger,
            store=recorded,
            deliverer=deliverer,
            policy=target.policy,
            observer=self.observer,
            stopping=self.stopping,
            clock=self.clock,
            transcript=POP3_TRANSCRIPT if self.runtime.transcripts else None,
            connect=connect,
            spool=self.spool,
            spool_threshold=self.runtime.spool_threshold,
            budget=self.budget,
        )
        try:
            stats = await cycle.run()
        except Exception as exc:
            disposition = classify(exc)
            if disposition is Disposition.BUG:
                log.exception("account=%s cycle failed with an unexpected error", spec.name)
                raise
            disposition = self._count_failure(state, exc, disposition)
            duration = self.clock() - started
            log.error(
                "account=%s cycle failed after %.2fs (%s): %s; so far: delivered=%d "
                "dead_lettered=%d deferred=%d skipped=%d removed=%d",
                spec.name,
                duration,
                "account failing" if disposition is Disposition.PARK_ACCOUNT else "will retry",
                exc,
                cycle.stats.delivered,
                cycle.stats.dead_lettered,
                cycle.stats.deferred,
                cycle.stats.skipped,
                cycle.stats.removed,
            )
            logged_in = cycle.stats.mailbox_known
            result = CycleResult(
                spec.name,
                False,
                cycle.stats,
                duration,
                str(exc),
                disposition,
                logged_in=logged_in,
                slow_down=slow_down_reason(exc, logged_in=logged_in),
            )
        else:
            state.failures = state.bare_login_errors = 0
            if state.failing:
                log.warning("account=%s recovered", spec.name)
            state.failing = False
            duration = self.clock() - started
            moved = stats.delivered + stats.dead_lettered + stats.deferred + stats.skipped
            # One line at info for a cycle that changed something; an idle cycle (the common
            # case by far: a line per account per interval) only at debug (docs/design.md §11.3).
            log.log(
                logging.INFO if moved or stats.removed or stats.oversize_left else logging.DEBUG,
                "account=%s cycle ok in %.2fs: mailbox=%d delivered=%d dead_lettered=%d "
                "deferred=%d skipped=%d removed=%d",
                spec.name,
                duration,
                stats.mailbox_messages,
                stats.delivered,
                stats.dead_lettered,
                stats.deferred,
                stats.skipped,
                stats.removed,
            )
            result = CycleResult(spec.name, True, stats, duration, logged_in=True)
        state.next_poll = self._next_poll(state, result)
        await self.notifier.after_cycle(  # never raises: a notice never fails the cycle
            self.runtime.notices,
            self.runtime.smtp,
            spec.name,
            ok=result.ok,
            failing=state.failing,
            error=result.error,
            dead_letters=recorded.notes,
            oversize=result.stats.oversize_left,
        )
        # What the admin sees as waiting upstream: what this cycle left there (status, README).
        left = result.stats.left_upstream if result.stats.mailbox_known else (None, None)
        try:
            # Queued, not awaited: the rows of the cycles that end together are committed in
            # one transaction (Ledger.record_cycle_soon).
            self.ledger.record_cycle_soon(
                spec.name,
                CycleRecord(
                    started=started,
                    finished=started + result.duration,
                    result="ok" if result.ok else "failed",
                    error=result.error,
                    mailbox_messages=left[0],
                    mailbox_bytes=left[1],
                    next_poll=state.next_poll,
                    failures=Failures(state.failures, state.bare_login_errors, state.failing),
                ),
            )
        except ConnectorError as exc:
            # The bookkeeping for `status` failed (a full disk, say); the cycle's own outcome
            # stands and the scheduler goes on.  Stopping every account would help nobody.
            log.error("account=%s cannot record the cycle in the ledger: %s", spec.name, exc)
        if recorded.notes and self.dead_letter_counts is not None:
            counts = self.dead_letter_counts
            counts[spec.name] = counts.get(spec.name, 0) + len(recorded.notes)
        if self.metrics is not None:
            self.metrics.data_timeouts(spec.name, deliverer.data_timeouts)
            # The gauges first: whoever sees cycles_total count up sees this cycle's backlog.
            await self._account_backlog(spec.name, result)
            self.metrics.cycle(
                spec.name,
                ok=result.ok,
                duration=result.duration,
                stats=result.stats,
                finished=started + result.duration,
                failing=state.failing,
            )
        return result

    def _next_poll(self, state: AccountState, result: CycleResult) -> float:
        """After a good cycle, the account's first slot at least half an interval away
        (connector.schedule); after a failure, the backoff (docs/design.md §6.3)."""
        now = self.clock()
        if result.ok:
            if state.offset < 0:
                state.offset = phase(state.spec.name)
            return next_slot(state.offset, state.interval, now + state.interval * MIN_GAP)
        return now + self.delay_after(state, result)

    async def _account_backlog(self, name: str, result: CycleResult) -> None:
        """Set the account's ``deferred_messages`` and ``dead_letters`` gauges after its cycle:
        this account's alone (every account's, after every cycle, made each poll cost time in
        proportion to the number of accounts: bench/README.md, "fleet")."""
        if self.metrics is None:
            return
        stats = result.stats
        if result.ok and stats.mailbox_known and stats.mailbox_messages == 0:
            deferred = 0  # an empty listing forgot every row (Ledger.sync_listing)
        else:
            try:
                deferred = await self.ledger.deferred_count(name)
            except ConnectorError as exc:
                log.warning("account=%s cannot count its deferred messages: %s", name, exc)
                return
        counts = self.dead_letter_counts
        self.metrics.account_backlog(
            name, deferred, None if counts is None else counts.get(name, 0)
        )

    # -- what the operators see (metrics, /status, /healthz, POST /poll) -----------------------

    async def refresh_backlog(self) -> None:
        """Set the ``deferred_messages`` and ``dead_letters`` gauges of every account, and the
        dead-letter counts /status shows, from the ledger and the dead-letter store (which
        ``dead-letters requeue/purge`` change from outside): at start, every
        DEAD_LETTER_RECOUNT seconds and after a reload."""
        try:
            rows = await self.ledger.account_status()
            counts = await self.store.count_by_account()
        except ConnectorError as exc:
            log.warning("cannot refresh the deferred and dead-letter gauges: %s", exc)
            return
        self.dead_letter_counts = counts
        if self.metrics is not None:
            self.metrics.backlog({r.name: r.deferred for r in rows}, counts)

    async def status(self) -> dict[str, Any]:
        """The ``/status`` document: the ledger's view plus the scheduler's next polls."""
        rows = await self.ledger.account_status()
        counts = self.dead_letter_counts
        if counts is None:  # not counted yet (the service counts at start and after cycles)
            try:
                counts = self.dead_letter_counts = await self.store.count_by_account()
            except ConnectorError as exc:
                log.warning("cannot count dead letters: %s", exc)
                counts = self.dead_letter_counts = {}
        polls = {
            name: self.plan.due(name) or state.next_poll for name, state in self.accounts.items()
        }
        health = ledger_health(self.ledger.path, self.ledger)
        runtime = self.runtime
        return status_document(
            self.accounts,
            rows,
            counts,
            polls,
            health,
            targets=self.smtp_targets(),
            shard=runtime.shard,
            elsewhere=runtime.elsewhere,
            disabled=runtime.disabled_names,
        )

    def metrics_text(self) -> bytes:
        """The Prometheus exposition (empty without metrics)."""
        return self.metrics.render() if self.metrics is not None else b""

    def healthy(self) -> bool:
        """True while :meth:`serve` runs its scheduler."""
        return self.alive

    def _count_failure(
        self, state: AccountState, exc: Exception, disposition: Disposition
    ) -> Disposition:
        state.failures += 1
        if isinstance(exc, Pop3AuthError) and exc.resp_code is None:
            state.bare_login_errors += 1
            if state.bare_login_errors >= BARE_LOGIN_ERROR_LIMIT:
                disposition = Disposition.PARK_ACCOUNT
        if disposition is Disposition.PARK_ACCOUNT and not state.failing:
            log.error("account=%s is failing: %s", state.spec.name, exc)
            state.failing = True
        return disposition

    def delay_after(self, state: AccountState, result: CycleResult) -> float:
        """Seconds until the next cycle: the interval, or a backoff after failures."""
        if result.ok:
            return state.interval
        if result.disposition is Disposition.PARK_ACCOUNT:
            base = max(state.interval * MAX_BACKOFF_FACTOR, PARKED_MIN_DELAY)
        else:
            base = state.interval * min(2 ** (state.failures - 1), MAX_BACKOFF_FACTOR)
        return base * random.uniform(1.0, 1.1)  # jitter: failing accounts do not poll in step

    async def run_once(self, names: Iterable[str] | None = None) -> list[CycleResult]:
        """One cycle of each (or the named) account, concurrently within the parallel limit."""
        selected = list(names) if names is not None else list(self.accounts)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.run_cycle(name)) for name in selected]
        return [t.result() for t in tasks]

    def held_until(self, state: AccountState) -> float | None:
        """When a failing account's backoff ends, while it runs; None if it may poll now."""
        if state.failures == 0 or state.next_poll is None or state.next_poll <= self.clock():
            return None
        return state.next_poll

    def poll_now(
        self, name: str | None = None, *, force: bool = False
    ) -> tuple[list[str], dict[str, float]]:
        """Start a cycle now (``POST /poll``, or SIGUSR1), like SBS's "Retrieve now".

        Returns the accounts woken, and those held back: a failing account polls at the end
        of its backoff and not before (docs/design.md §11.2: a wrong password must not be
        tried again at every request), unless ``force`` (SIGUSR1: only root or the service's
        own user can send it).  An unknown ``name`` raises KeyError.  An account in a cycle
        polls again right after it, unless that cycle fails.
        """
        if name is not None and name not in self.accounts:
            raise KeyError(name)
        woken: list[str] = []
        held: dict[str, float] = {}
        for n, state in self.accounts.items():
            if name is not None and n != name:
                continue
            until = None if force else self.held_until(state)
            if until is not None:
                held[n] = until
                continue
            state.forced |= force
            state.poll_now.set()
            self._poll_soon(state)
            woken.append(n)
        return woken, held

    def _poll_soon(self, state: AccountState) -> None:
        """Make the account due now (in a cycle: right after it, see :meth:`_polled`)."""
        self.plan.set_due(state.spec.name, self.clock())
        self._wake.set()

    async def _watcher(
        self, state: AccountState, current: IdleWatcher | None
    ) -> IdleWatcher | None:
        """The account's IDLE watcher (docs/design.md §15.3): kept while its spec and interval
        stay as they are, replaced when a reload changes them, None for a POP3 account or
        ``push = false``."""
        spec = state.spec
        if current is not None and current.spec == spec and current.interval == state.interval:
            return current
        if current is not None:
            await current.close()
        if spec.imap is None or not spec.imap.push:
            return None
        from connector.imap.idle import IdleWatcher  # only IMAP accounts load it

        metrics = self.metrics
        return IdleWatcher(
            spec,
            interval=state.interval,
            transcript=IMAP_TRANSCRIPT if self.runtime.transcripts else None,
            on_state=None if metrics is None else functools.partial(metrics.idle, spec.name),
        )

    async def _idle(self, state: AccountState) -> None:
        """An IMAP account with ``push`` between its cycles (docs/design.md §15.3): its watcher
        holds the connection in IDLE until the plan starts the next cycle (``leave_idle``), a
        stop or a removal; new mail makes the account due now, unless it is backing off (a
        failing account must not poll at every message: §6.3)."""
        from connector.imap.idle import Wake

        name = state.spec.name
        leave = state.leave_idle
        if leave is None:
            leave = state.leave_idle = asyncio.Event()
        watcher = state.watcher = await self._watcher(state, state.watcher)
        if watcher is None:
            return
        events = (self.stopping, leave)
        try:
            while not (self.stopping.is_set() or state.removed or leave.is_set()):
                due = self.plan.due(name)
                remaining = 0.0 if due is None else due - self.clock()
                if remaining <= 0:
                    break  # due (or started): the cycle takes the connection
                woke = await watcher.wait(remaining, events, stop=self.stopping)
                if woke is Wake.MAIL and self.held_until(state) is None:
                    log.debug("account=%s: new mail announced; polling now", name)
                    self._poll_soon(state)
                    break
        except asyncio.CancelledError:
            state.watcher = None
            await watcher.abort()  # past shutdown_grace: drop it, wait for nothing
            raise
        if self.stopping.is_set() or state.removed:
            await self._close_watcher(state)

    async def _close_watchers(self) -> None:
        """The watchers no task holds any more, at the end of ``serve``: an account whose new
        mail made it due just as the stop came (the dispatcher started no cycle, and its
        ``_idle`` had returned).  DONE and LOGOUT; dropped when cancelled (shutdown_grace)."""
        task = asyncio.current_task()
        cancelled = task is not None and task.cancelling() > 0
        for state in self.accounts.values():
            watcher, state.watcher = state.watcher, None
            if watcher is not None:
                await (watcher.abort() if cancelled else watcher.close())

    async def _close_watcher(self, state: AccountState) -> None:
        """SIGTERM, removal: DONE and LOGOUT (docs/design.md §15.3)."""
        watcher, state.watcher = state.watcher, None
        if watcher is not None:
            await watcher.close()

    def schedule_all(self) -> None:
        """Put every account not yet in the plan on it, their first polls ramped from now
        (``serve`` does this as it starts)."""
        self.plan.add([self._polled_as(state) for state in self.accounts.values()], self.clock())

    @staticmethod
    def _polled_as(state: AccountState) -> Polled:
        return Polled(state.spec.name, host_key(state.spec.endpoint.host), state.interval)

    async def _dispatch(self) -> None:
        """Start what the plan says may start; sleep until its next time or a change."""
        plan = self.plan
        while not self.stopping.is_set():
            self._wake.clear()  # before take(): a change from now on wakes the wait below
            if self._tg is None:  # pragma: no cover (serve sets it before starting us)
                raise AssertionError("dispatching outside serve()")
            for name in plan.take(self.clock()):
                state = self.accounts[name]
                self._tg.create_task(self._polled(state), name=f"account-{name}")
            when = plan.wakeup(self.clock())
            delay = None if when is None else max(when - self.clock(), 0.0)
            await _wait_any((self._wake,), delay)  # `stopping` sets it too (_wake_on_stop)

    async def _wake_on_stop(self) -> None:
        await self.stopping.wait()
        self._wake.set()

    async def _polled(self, state: AccountState) -> None:
        """One cycle the dispatcher started; then tell the plan when the account is due."""
        name = state.spec.name
        idle = state.idle
        if idle is not None and not idle.done():
            if state.leave_idle is not None:
                state.leave_idle.set()  # the IDLE wait ends: this cycle borrows its connection
            await asyncio.wait({idle})
        state.idle = None
        if state.leave_idle is not None:
            state.leave_idle.clear()
        state.poll_now.clear()
        state.forced = False
        result = await self._run_state(state, gated=False)
        if state.poll_now.is_set() and not state.forced and self.held_until(state):
            # Asked for while this cycle ran, and the cycle failed: the backoff stands.
            state.poll_now.clear()
        now = self.clock()
        if self.stopping.is_set() or state.removed:
            due = None
        elif state.poll_now.is_set():
            due = now
        else:
            due = state.next_poll if state.next_poll is not None else now + state.interval
        paused = self.plan.finish(
            name, now, next_due=due, logged_in=result.logged_in, slow_down=result.slow_down
        )
        if paused is not None:
            key = host_key(state.spec.endpoint.host)
            log.warning(
                "host %s asked us to slow down (%s): no new session there for %.0fs",
                key,
                result.slow_down,
                paused,
            )
            if self.metrics is not None:
                self.metrics.host_paused()
        if due is None:
            await self._close_watcher(state)
        elif state.spec.imap is not None and state.spec.imap.push and self._tg is not None:
            state.idle = self._tg.create_task(self._idle(state), name=f"idle-{name}")
        self._wake.set()

    async def _recount(self) -> None:
        """Count the dead letters (and every account's deferred messages) again, every
        DEAD_LETTER_RECOUNT seconds and after a reload."""
        while not self.stopping.is_set():
            await _wait_any((self.stopping, self._recount_now), DEAD_LETTER_RECOUNT)
            self._recount_now.clear()
            if not self.stopping.is_set():
                await self.refresh_backlog()

    async def serve(self) -> None:
        """Poll every account on its interval until ``stopping`` is set, then stop gracefully.

        After ``stopping``, the cycles in flight finish their current message and QUIT; if that
        takes longer than ``shutdown_grace`` they are cancelled, which drops the POP3 connection
        without QUIT: safe, since a server deletes nothing without QUIT (RFC 1939 §6).
        """

        async def loops() -> None:
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    self.schedule_all()
                    # The dispatcher lives until `stopping`, with or without accounts (a reload
                    # may add some); the cycles it starts are tasks of this group too.
                    tg.create_task(self._dispatch(), name="scheduler")
                    tg.create_task(self._wake_on_stop(), name="wake-on-stop")
                    tg.create_task(self._recount(), name="recount")
            finally:
                await self._close_watchers()

        loops_task = asyncio.create_task(loops(), name="accounts")
        stop_task = asyncio.create_task(self.stopping.wait(), name="stopping")
        self.alive = True
        try:
            await asyncio.wait({loops_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if not loops_task.done():
                grace = self.runtime.shutdown_grace
                log.info("stopping: finishing the messages in flight (grace %.0fs)", grace)
                done, _ = await asyncio.wait({loops_task}, timeout=grace)
                if not done:
                    log.warning("shutdown grace ran out; dropping connections without QUIT")
            if loops_task.done():
                loops_task.result()  # re-raise a BUG from an account loop
        finally:
            self.alive = False
            self._tg = None
            stop_task.cancel()
            if not loops_task.done():
                loops_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loops_task

    def apply_runtime(self, new: Runtime) -> None:
        """Take a reloaded config (SIGHUP) without disturbing a cycle in flight.

        New accounts start polling now; removed ones stop after their cycle in flight; changed
        ones use the new settings from their next cycle (a failing one is polled at once: the
        change may be the fix).  SMTP and service settings apply to the cycles started from
        now on.  ``state_dir`` and the dead-letter path need a restart: the ledger and the
        store stay open where they are.
        """
        old = self.runtime
        where = (new.state_dir, new.dead_letter_path, new.imap_store)
        if where != (old.state_dir, old.dead_letter_path, old.imap_store):
            log.warning(
                "reload: state_dir and [dead_letter] changes take effect at the next restart"
            )
            new = replace(
                new,
                state_dir=old.state_dir,
                dead_letter_path=old.dead_letter_path,
                imap_store=old.imap_store,
            )
        if new.max_parallel != old.max_parallel:
            # Cycles in flight keep the old semaphore; new ones queue on the new one.
            self._semaphore = asyncio.Semaphore(new.max_parallel)
        if new.per_host != old.per_host:
            self._gates.clear()  # likewise, for the host gates of once and run_cycle
        self.plan.set_limits(max_parallel=new.max_parallel, per_host=new.per_host)
        if new.memory_budget != old.memory_budget:
            # Likewise: cycles in flight finish on the old budget, new ones share the new.
            self.budget = MemoryBudget(new.memory_budget)
        now = self.clock()
        specs = {spec.name: spec for spec in new.accounts}
        for name in list(self.accounts):
            if name not in specs:
                state = self.accounts.pop(name)
                state.removed = True
                state.poll_now.set()
                if state.leave_idle is not None:
                    state.leave_idle.set()  # its IDLE wait ends, and the watcher logs out
                tg, idle = self._tg, state.idle
                held = (idle is not None and not idle.done()) or self.plan.due(name) is None
                if state.watcher is not None and not held and tg is not None:
                    # Due, not started (no _idle, no cycle): nothing else would log it out.
                    tg.create_task(self._close_watcher(state), name=f"unwatch-{name}")
                self.plan.remove(name)  # not polled again; a cycle in flight ends as it will
                log.info("reload: account=%s removed", name)
        added: list[Polled] = []
        for name, spec in specs.items():
            current = self.accounts.get(name)
            if current is None:
                state = self.accounts[name] = self._new_state(spec, new)
                added.append(self._polled_as(state))
                log.info("reload: account=%s added", name)
                continue
            interval = new.intervals[name]
            # By value: AccountSpec and everything in it are frozen values that compare by
            # their contents (an SSL context by what it was built from: Pop3Endpoint).
            if spec != current.spec or interval != current.interval:
                before = self._polled_as(current)
                current.spec, current.interval = spec, interval
                log.info("reload: account=%s changed; applies from its next cycle", name)
                if self._polled_as(current) != before:
                    self.plan.update(self._polled_as(current), now)
                if current.failing:
                    current.forced = True
                    current.poll_now.set()
                    self._poll_soon(current)
        self.plan.add(added, now)  # their first polls ramp from now
        # The runtime holds the specs the accounts poll with: an unchanged account keeps its
        # old spec (equal by value), so the new one is not kept alive beside it, nor, with
        # TLS, a second set of SSL contexts.
        self.runtime = replace(new, accounts=tuple(self.accounts[n].spec for n in specs))
        if self.metrics is not None:
            self.metrics.set_accounts(self.accounts)
            self.metrics.set_targets(self.smtp_targets())
        self._recount_now.set()  # the admin may have requeued or purged dead letters
        self._wake.set()
        log.info("configuration reloaded: %d account(s)", len(self.accounts))

    def install_signal_handlers(self, *, reload: Callable[[], None] | None = None) -> None:
        """SIGTERM/SIGINT stop gracefully; SIGUSR1 polls every account now; SIGHUP calls
        ``reload`` (docs/design.md §4.3)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_stop_signal, sig)
            except NotImplementedError:
                # Windows' event loops have no add_signal_handler; service wrappers (WinSW,
                # NSSM) stop a program with Ctrl+C, which Python delivers as SIGINT.
                signal.signal(
                    sig,
                    lambda signum, _frame: loop.call_soon_threadsafe(
                        self._on_stop_signal, signal.Signals(signum)
                    ),
                )
        if hasattr(signal, "SIGUSR1"):
            loop.add_signal_handler(signal.SIGUSR1, functools.partial(self.poll_now, force=True))
        if reload is not None and hasattr(signal, "SIGHUP"):
            loop.add_signal_handler(signal.SIGHUP, reload)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        log.info("received %s", sig.name)
        self.stopping.set()


async def _wait_any(events: Iterable[asyncio.Event], seconds: float | None) -> None:
    """Wait until any event is set or ``seconds`` pass (None: no time limit)."""
    events = tuple(events)
    if len(events) == 1:
        # The dispatcher's sleep, between every few polls: no waiter task for one event.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await events[0].wait()
        return
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


@contextlib.asynccontextmanager
async def open_service(
    runtime: Runtime, *, observer: CycleObserver | None = None, metrics: Metrics | None = None
) -> AsyncIterator[Service]:
    """Lock the state directory, open the ledger, and yield a :class:`Service`."""
    with StateLock(runtime.state_dir):
        ledger = await Ledger.open(runtime.ledger_path)
        try:
            # What a killed run left in the spool (docs/design.md §5.3): nothing else writes
            # there while we hold the lock, and no cycle has started yet.
            await asyncio.to_thread(Spool(runtime.spool_dir).clean)
            if runtime.dead_letter_path is not None:
                await _remove_stale_tmp(MaildirStore(runtime.dead_letter_path))
            yield Service(runtime, ledger, observer=observer, metrics=metrics)
        finally:
            await ledger.close()


async def _remove_stale_tmp(store: MaildirStore) -> None:
    """At start, the Maildir's partial files (writes that a kill or a power cut ended)."""
    try:
        await store.remove_stale_tmp()
    except ConnectorError as exc:  # the store's trouble shows at its first put, where it counts
        log.warning("%s", exc)
