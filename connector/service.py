"""Composition root: config -> runtime objects, the per-account scheduler, signals and shutdown.

Only this module and ``cli`` read :class:`connector.config.Settings`; everything below gets plain
frozen dataclasses (STYLE §1).

Scheduling: one loop per enabled account inside a ``TaskGroup``; a semaphore bounds how many cycles
run at once (``max_parallel_accounts``); a per-account lock makes two cycles of one account
impossible (the POP3 server would lock the mailbox, or worse, both would deliver).  A failing
account backs off; only an unknown error (Disposition.BUG) escapes and ends the service, so that
systemd restarts it and someone reads the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from connector.config import Settings, dead_letter_path
from connector.deadletter.maildir import MaildirStore
from connector.delivery import SenderPolicy, SmtpDeliverer, SmtpSettings
from connector.errors import (
    AlreadyRunningError,
    ConfigError,
    Disposition,
    Pop3AuthError,
    classify,
)
from connector.fetcher import AccountSpec, Cycle, CycleObserver, CycleStats, DeliveryPolicy
from connector.ledger import CycleRecord, Ledger
from connector.pop3 import AuthMethod, Pop3Endpoint, TlsMode

log = logging.getLogger(__name__)
POP3_TRANSCRIPT = logging.getLogger("connector.transcript.pop3")
SMTP_TRANSCRIPT = logging.getLogger("connector.transcript.smtp")

# A bare "-ERR" to PASS (no RFC 2449 code) may be a wrong password or a busy server; after this
# many in a row we treat the account as failing (STYLE §3).
BARE_LOGIN_ERROR_LIMIT = 3
# The slowest a failing account is retried, and the pace for parked accounts.
MAX_BACKOFF_FACTOR = 4
PARKED_MIN_DELAY = 3600.0


# --------------------------------------------------------------------------------------------
# Config -> runtime
# --------------------------------------------------------------------------------------------


def make_ssl_context(verify: bool, ca_file: Path | None, where: str) -> ssl.SSLContext:
    """A client context: system trust plus ``ca_file``; verification off only when asked."""
    ctx = ssl.create_default_context()
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}.ca_file: cannot load {ca_file}: {exc}") from exc
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True, slots=True)
class Runtime:
    """The config, turned into what the code below the composition root takes."""

    accounts: tuple[AccountSpec, ...]
    intervals: dict[str, float]
    smtp: SmtpSettings
    policy: DeliveryPolicy
    state_dir: Path
    dead_letter_path: Path
    max_parallel: int
    shutdown_grace: float
    transcripts: bool

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"


def build_runtime(settings: Settings) -> Runtime:
    """Turn validated settings into runtime objects; raises ConfigError (e.g. a bad ca_file)."""
    smtp_cfg = settings.smtp
    smtp_tls = TlsMode(smtp_cfg.tls)
    helo = smtp_cfg.helo_name or socket.getfqdn()
    smtp = SmtpSettings(
        host=smtp_cfg.host,
        port=smtp_cfg.effective_port,
        tls=smtp_tls,
        ssl_context=None
        if smtp_tls is TlsMode.NONE
        else make_ssl_context(smtp_cfg.verify_certificate, smtp_cfg.ca_file, "smtp"),
        helo_name=helo,
        username=smtp_cfg.username,
        password=smtp_cfg.secret(),
        dsn=smtp_cfg.dsn,
        timeout=smtp_cfg.timeout,
    )
    match smtp_cfg.envelope_sender:
        case "return-path":
            policy = DeliveryPolicy(SenderPolicy.RETURN_PATH, None, helo)
        case "null":
            policy = DeliveryPolicy(SenderPolicy.NULL, None, helo)
        case address:
            policy = DeliveryPolicy(SenderPolicy.FIXED, address, helo)

    accounts: list[AccountSpec] = []
    intervals: dict[str, float] = {}
    for i, acct in enumerate(settings.accounts):
        if not acct.enabled:
            continue
        tls = TlsMode(acct.tls)
        ctx = (
            None
            if tls is TlsMode.NONE
            else make_ssl_context(acct.verify_certificate, acct.ca_file, f"accounts[{i}]")
        )
        password = acct.secret()
        if password is None:  # the config guarantees one; be explicit for the type checker
            raise ConfigError(f"accounts[{i}].password: no password given")
        accounts.append(
            AccountSpec(
                name=acct.name,
                endpoint=Pop3Endpoint(acct.host, acct.effective_port, tls, ctx, acct.host),
                username=acct.username,
                password=password,
                auth=AuthMethod(acct.auth),
                deliver_to=tuple(acct.deliver_to),
                max_deferral=acct.max_deferral,
            )
        )
        intervals[acct.name] = settings.poll_interval_of(acct)
    state_dir = settings.service.state_dir
    dl_path = dead_letter_path(settings)
    if dl_path is None:
        # TODO(issue 6): the IMAP dead-letter store.
        raise ConfigError('dead_letter.store: only "maildir" is implemented in this version')
    return Runtime(
        accounts=tuple(accounts),
        intervals=intervals,
        smtp=smtp,
        policy=policy,
        state_dir=state_dir,
        dead_letter_path=dl_path,
        max_parallel=settings.service.max_parallel_accounts,
        shutdown_grace=settings.service.shutdown_grace,
        transcripts=settings.service.log_level == "debug",
    )


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
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock_fd(fd)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunningError(
                f"another pop3-connector (pid {holder}) is using {self.path.parent}; "
                "two would deliver every message twice"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
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


@dataclass(slots=True)
class AccountState:
    """The scheduler's memory of one account."""

    spec: AccountSpec
    interval: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    poll_now: asyncio.Event = field(default_factory=asyncio.Event)
    failures: int = 0
    bare_login_errors: int = 0
    failing: bool = False
    last: CycleResult | None = None
    next_poll: float | None = None


class Service:
    """The running connector: ledger, dead-letter store and one state per account."""

    def __init__(
        self,
        runtime: Runtime,
        ledger: Ledger,
        *,
        observer: CycleObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.ledger = ledger
        self.store = MaildirStore(runtime.dead_letter_path)
        self.observer = observer
        self.clock = clock
        self.stopping = asyncio.Event()
        self.accounts = {
            spec.name: AccountState(spec, runtime.intervals[spec.name]) for spec in runtime.accounts
        }
        self._semaphore = asyncio.Semaphore(runtime.max_parallel)

    async def run_cycle(self, name: str) -> CycleResult:
        """One cycle of one account; never two of the same account at once."""
        state = self.accounts[name]
        # The account lock first: a cycle waiting for its account must not hold a parallel slot.
        async with state.lock, self._semaphore:
            result = await self._cycle(state)
        state.last = result
        return result

    async def _cycle(self, state: AccountState) -> CycleResult:
        spec = state.spec
        started = self.clock()
        deliverer = SmtpDeliverer(
            self.runtime.smtp, transcript=SMTP_TRANSCRIPT if self.runtime.transcripts else None
        )
        cycle = Cycle(
            spec,
            ledger=self.ledger,
            store=self.store,
            deliverer=deliverer,
            policy=self.runtime.policy,
            observer=self.observer,
            stopping=self.stopping,
            clock=self.clock,
            transcript=POP3_TRANSCRIPT if self.runtime.transcripts else None,
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
                "dead_lettered=%d deferred=%d skipped=%d",
                spec.name,
                duration,
                "account failing" if disposition is Disposition.PARK_ACCOUNT else "will retry",
                exc,
                cycle.stats.delivered,
                cycle.stats.dead_lettered,
                cycle.stats.deferred,
                cycle.stats.skipped,
            )
            result = CycleResult(spec.name, False, cycle.stats, duration, str(exc), disposition)
        else:
            state.failures = state.bare_login_errors = 0
            if state.failing:
                log.warning("account=%s recovered", spec.name)
            state.failing = False
            duration = self.clock() - started
            log.info(
                "account=%s cycle ok in %.2fs: mailbox=%d delivered=%d dead_lettered=%d "
                "deferred=%d skipped=%d",
                spec.name,
                duration,
                stats.mailbox_messages,
                stats.delivered,
                stats.dead_lettered,
                stats.deferred,
                stats.skipped,
            )
            result = CycleResult(spec.name, True, stats, duration)
        state.next_poll = self.clock() + self.delay_after(state, result)
        await self.ledger.record_cycle(
            spec.name,
            CycleRecord(
                started=started,
                finished=started + result.duration,
                result="ok" if result.ok else "failed",
                error=result.error,
                mailbox_messages=result.stats.mailbox_messages,
                mailbox_bytes=result.stats.mailbox_bytes,
                next_poll=state.next_poll,
            ),
        )
        return result

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

    def poll_now(self, name: str | None = None) -> None:
        """Start a cycle now (SIGUSR1, or ``POST /poll``), like SBS's "Retrieve now"."""
        for state in self.accounts.values():
            if name is None or state.spec.name == name:
                state.poll_now.set()

    async def _account_loop(self, state: AccountState) -> None:
        while not self.stopping.is_set():
            state.poll_now.clear()
            result = await self.run_cycle(state.spec.name)
            delay = (state.next_poll or self.clock()) - self.clock()
            if self.stopping.is_set():
                return
            log.debug("account=%s next poll in %.0fs (ok=%s)", state.spec.name, delay, result.ok)
            await _wait_any((self.stopping, state.poll_now), max(delay, 0.0))

    async def serve(self) -> None:
        """Poll every account on its interval until ``stopping`` is set, then stop gracefully.

        After ``stopping``, the cycles in flight finish their current message and QUIT; if that
        takes longer than ``shutdown_grace`` they are cancelled, which drops the POP3 connection
        without QUIT: safe, since a server deletes nothing without QUIT (RFC 1939 §6).
        """

        async def loops() -> None:
            async with asyncio.TaskGroup() as tg:
                for state in self.accounts.values():
                    tg.create_task(self._account_loop(state), name=f"account-{state.spec.name}")

        loops_task = asyncio.create_task(loops(), name="accounts")
        stop_task = asyncio.create_task(self.stopping.wait(), name="stopping")
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
            stop_task.cancel()
            if not loops_task.done():
                loops_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loops_task

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop gracefully; SIGUSR1 polls every account now (PRODUCT §4)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        if hasattr(signal, "SIGUSR1"):
            loop.add_signal_handler(signal.SIGUSR1, self.poll_now)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        log.info("received %s", sig.name)
        self.stopping.set()


async def _wait_any(events: Iterable[asyncio.Event], seconds: float) -> None:
    """Wait until any event is set or ``seconds`` pass."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


@contextlib.asynccontextmanager
async def open_service(
    runtime: Runtime, *, observer: CycleObserver | None = None
) -> AsyncIterator[Service]:
    """Lock the state directory, open the ledger, and yield a :class:`Service`."""
    with StateLock(runtime.state_dir):
        ledger = await Ledger.open(runtime.ledger_path)
        try:
            yield Service(runtime, ledger, observer=observer)
        finally:
            await ledger.close()
