"""Every Prometheus object of docs/design.md §11.1, declared once, on a registry of our own.

Our own :class:`~prometheus_client.CollectorRegistry` (not the library's global default) keeps
the exposition to what §11.1 lists, and lets every test build a fresh set.  Label values are
bounded: ``account`` and ``smtp_target`` (from the config), ``outcome`` and ``result`` (enums),
``code`` (a three-digit SMTP code, or ``none`` when a message was deferred without a reply, e.g.
a timeout), ``version``.  Never a UIDL, an address or a subject: those would make a new series
per message.

Per account or in total (``[metrics] per_account``, docs/design.md §11.1): with it (the default)
the counters, the histogram and the mailbox and backlog gauges carry the ``account`` label, and
each account has its ``account_failing``, ``last_success_timestamp_seconds`` and
``account_info`` (its SMTP target); without it the same families are exported once, without
the label (the totals: ``sum()`` over them reads the same in both modes), and nothing per
account is kept in prometheus_client at all.  The counts of accounts (``accounts``,
``accounts_failing``, ``oldest_last_success_timestamp_seconds``) are there in both modes,
computed when scraped from plain dicts.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import Final, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

from connector import __version__
from connector.cycle import CycleStats, Outcome

__all__ = ["CONTENT_TYPE", "CYCLE_BUCKETS", "NO_CODE", "Metrics", "smtp_code"]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
PREFIX: Final = "pop3_connector_"

# A cycle of an empty mailbox on loopback takes tens of milliseconds; a first cycle over a slow
# link with a mailbox full of attachments can take half an hour.  Roughly 2-2.5x steps between.
CYCLE_BUCKETS: Final = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
)

NO_CODE: Final = "none"
"""The ``code`` label of a message deferred without any SMTP reply (timeout, dropped link)."""

# The observer's response is the server's line ("250 2.0.0 OK"), for dead letters prefixed with
# the stage ("data: 554 5.1.0 Sender denied", "expired: 451 4.3.0 ..."), RFC 5321 §4.2 codes.
_CODE_RE: Final = re.compile(r"^(?:[a-z]+: )?([2-5][0-9][0-9])(?:[ -]|$)")

M = TypeVar("M", bound=MetricWrapperBase)


def smtp_code(response: str) -> str:
    """The SMTP reply code that ended a message's transaction, as a bounded label value."""
    m = _CODE_RE.match(response)
    return m.group(1) if m else NO_CODE


class Metrics:
    """The metrics of docs/design.md §11.1.  Also a ``CycleObserver``: :meth:`message` counts one
    message.  ``per_account``: the ``account`` label and the per-account gauges (see the module
    docstring)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str = __version__,
        per_account: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The exposition holds the series of docs/design.md §11.1 and nothing else: no
        # *_created gauge beside each counter and histogram.  (A process-wide switch of
        # prometheus-client; we own the process, and nothing else in it exports metrics.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        self.per_account = per_account
        r = self.registry
        acct = ["account"] if per_account else []
        self.cycle_duration = Histogram(
            PREFIX + "cycle_duration_seconds",
            "One account's cycle, connect to QUIT.",
            acct,
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.cycles = Counter(
            PREFIX + "cycles", "Cycles by result (ok, failed).", [*acct, "result"], registry=r
        )
        self.messages = Counter(
            PREFIX + "messages",
            "Messages by outcome (delivered, dead_lettered, deferred, skipped, removed).",
            [*acct, "outcome"],
            registry=r,
        )
        self.delivered_bytes = Counter(
            PREFIX + "delivered_bytes",
            "Message bytes accepted by SMTP, with our added header lines.",
            acct,
            registry=r,
        )
        self.mailbox_messages = Gauge(
            PREFIX + "mailbox_messages",
            "Messages in the POP3 mailbox (STAT at the start of the last cycle).",
            acct,
            registry=r,
        )
        self.mailbox_bytes = Gauge(
            PREFIX + "mailbox_bytes",
            "Octets in the POP3 mailbox (STAT at the start of the last cycle).",
            acct,
            registry=r,
        )
        self.deferred_messages = Gauge(
            PREFIX + "deferred_messages",
            "Messages refused temporarily, waiting for a retry.",
            acct,
            registry=r,
        )
        self.dead_letters = Gauge(
            PREFIX + "dead_letters",
            "Messages of this account in the dead-letter store.",
            acct,
            registry=r,
        )
        # Per account only, like account_failing: /status says which accounts wait in IDLE.
        self.idle_connected: Gauge | None = None
        if per_account:
            self.idle_connected = Gauge(
                PREFIX + "idle_connected",
                "1 while an IMAP account holds a connection in IDLE, waiting for new mail "
                "(RFC 2177); 0 while it only polls (no IDLE offered, push off, reconnecting).",
                ["account"],
                registry=r,
            )
        self.smtp_responses = Counter(
            PREFIX + "smtp_responses",
            "The final SMTP reply per message: 250 after DATA, or the code that refused or "
            'deferred it ("none": no reply, e.g. a timeout).',
            [*acct, "code"],
            registry=r,
        )
        self.smtp_data_timeouts = Counter(
            PREFIX + "smtp_data_timeouts",
            "Messages whose end of data got no reply within [smtp] data_termination_timeout: "
            "deferred, though the server may have taken them (RFC 5321 §4.5.3.2.6).",
            acct,
            registry=r,
        )
        # Per account only: neither sums to anything.  The counts below stand for them.
        self.last_success: Gauge | None = None
        self.account_failing: Gauge | None = None
        if per_account:
            self.last_success = Gauge(
                PREFIX + "last_success_timestamp_seconds",
                "End of the last completed cycle (unix time).",
                ["account"],
                registry=r,
            )
            self.account_failing = Gauge(
                PREFIX + "account_failing",
                "1 while the account's cycles fail.",
                ["account"],
                registry=r,
            )
        self.accounts = Gauge(PREFIX + "accounts", "Accounts configured and enabled.", registry=r)
        self.accounts_failing = Gauge(
            PREFIX + "accounts_failing", "Accounts whose cycles fail.", registry=r
        )
        self.oldest_last_success = Gauge(
            PREFIX + "oldest_last_success_timestamp_seconds",
            "The oldest of the accounts' last completed cycles (unix time); an account without "
            "one yet counts from the start of the process.",
            registry=r,
        )
        self.host_pauses = Counter(
            PREFIX + "host_pauses",
            "Times a POP3 host asked us to slow down (LOGIN-DELAY, IN-USE, SYS/TEMP, a refused "
            "connection) and got a pause.",
            registry=r,
        )
        self.ledger_writable = Gauge(
            PREFIX + "ledger_writable",
            "0 after a write to the ledger failed (a full or read-only disk, a lock held by "
            "another process), until one succeeds: no mail is handed to SMTP meanwhile.",
            registry=r,
        )
        self.ledger_writable.set(1)
        self.build_info = Gauge(
            PREFIX + "build_info", "Always 1; the version label.", ["version"], registry=r
        )
        self.build_info.labels(version=version).set(1)
        # One series per account naming its SMTP target (docs/design.md §11.1, §14.1), not a
        # label on every per-account series: a query joins it where it is wanted, and an
        # account moved to another target keeps its series.  Per account like the others:
        # only with per_account (/status names every account's target in both modes).
        self.account_info: Gauge | None = None
        if per_account:
            self.account_info = Gauge(
                PREFIX + "account_info",
                "Always 1; the SMTP target the account delivers to (smtp_target).",
                ["account", "smtp_target"],
                registry=r,
            )
        # What each account's gauges read, kept here in both modes: the counts above are
        # computed from it at scrape time, and without per_account so are the totals.
        self._accounts: set[str] = set()
        self._targets: dict[str, str] = {}
        self._failing: set[str] = set()
        self._last_success: dict[str, float] = {}
        self._mailbox: dict[str, tuple[int, int]] = {}
        self._deferred: dict[str, int] = {}
        self._dead: dict[str, int] = {}
        self._started = clock()
        self.accounts.set_function(lambda: float(len(self._accounts)))
        self.accounts_failing.set_function(lambda: float(len(self._failing)))
        self.oldest_last_success.set_function(self._oldest_success)
        if not per_account:
            # The totals read 0 from the start, as each account's series do with per_account.
            for result in ("ok", "failed"):
                self.cycles.labels(result=result)
            for outcome in Outcome:
                self.messages.labels(outcome=outcome.value)
            self.mailbox_messages.set_function(
                lambda: float(sum(m for m, _ in self._mailbox.values()))
            )
            self.mailbox_bytes.set_function(
                lambda: float(sum(b for _, b in self._mailbox.values()))
            )
            self.deferred_messages.set_function(lambda: float(sum(self._deferred.values())))
            self.dead_letters.set_function(lambda: float(sum(self._dead.values())))

    def _of(self, metric: M, account: str, **labels: str) -> M:
        """``metric``'s series for ``account``: labelled with it, or the total."""
        if self.per_account:
            return metric.labels(account=account, **labels)
        return metric.labels(**labels) if labels else metric

    def _oldest_success(self) -> float:
        if not self._accounts:
            return math.nan  # nothing to poll, nothing overdue
        started = self._started
        return min(self._last_success.get(name, started) for name in self._accounts)

    # -- accounts ------------------------------------------------------------------------------

    def set_accounts(self, names: Iterable[str]) -> None:
        """Create the series of each account (so they read 0, not absent) and drop the gauges
        of accounts no longer configured.  Counters of a removed account stay until restart:
        Prometheus' ``rate()`` copes, and a re-added account continues them."""
        wanted = set(names)
        removed = self._accounts - wanted
        if self.per_account:
            for name in wanted - self._accounts:
                self.cycle_duration.labels(account=name)
                for result in ("ok", "failed"):
                    self.cycles.labels(account=name, result=result)
                for outcome in Outcome:
                    self.messages.labels(account=name, outcome=outcome.value)
                self.delivered_bytes.labels(account=name)
                self.smtp_data_timeouts.labels(account=name)
                self.deferred_messages.labels(account=name)
                self.dead_letters.labels(account=name)
                if self.account_failing is not None:
                    self.account_failing.labels(account=name)
            gauges = [
                self.mailbox_messages,
                self.mailbox_bytes,
                self.deferred_messages,
                self.dead_letters,
                *(
                    g
                    for g in (self.last_success, self.account_failing, self.idle_connected)
                    if g is not None
                ),
            ]
            for name in removed:
                for gauge in gauges:
                    with contextlib.suppress(KeyError):  # never set
                        gauge.remove(name)
        for name in removed:
            self._failing.discard(name)
            for values in (self._last_success, self._mailbox, self._deferred, self._dead):
                values.pop(name, None)
        self._accounts = wanted

    def set_targets(self, targets: dict[str, str]) -> None:
        """``account_info``: one series per account, labelled with its SMTP target's name; the
        series of an account removed or moved to another target goes.  Nothing without
        ``per_account``."""
        info = self.account_info
        if info is None:
            return
        for name, old in self._targets.items():
            if targets.get(name) != old:
                with contextlib.suppress(KeyError):
                    info.remove(name, old)
        for name, target in targets.items():
            info.labels(account=name, smtp_target=target).set(1)
        self._targets = dict(targets)

    # -- the CycleObserver hook ----------------------------------------------------------------

    def message(self, account: str, uidl: str, size: int, outcome: Outcome, response: str) -> None:
        """Count one message (``uidl`` and ``size`` are not labels: unbounded)."""
        self._of(self.messages, account, outcome=outcome.value).inc()
        if outcome not in (Outcome.SKIPPED, Outcome.REMOVED):
            # Only DELEd this cycle, not handed to SMTP: no reply to count.
            self._of(self.smtp_responses, account, code=smtp_code(response)).inc()

    # -- per cycle -----------------------------------------------------------------------------

    def cycle(
        self,
        account: str,
        *,
        ok: bool,
        duration: float,
        stats: CycleStats,
        finished: float,
        failing: bool,
    ) -> None:
        """Record one finished cycle (``finished`` is unix time)."""
        self._of(self.cycle_duration, account).observe(duration)
        self._of(self.cycles, account, result="ok" if ok else "failed").inc()
        if stats.delivered_bytes:
            self._of(self.delivered_bytes, account).inc(stats.delivered_bytes)
        if stats.mailbox_known:
            self._mailbox[account] = (stats.mailbox_messages, stats.mailbox_bytes)
            if self.per_account:
                self.mailbox_messages.labels(account=account).set(stats.mailbox_messages)
                self.mailbox_bytes.labels(account=account).set(stats.mailbox_bytes)
        if ok:
            self._last_success[account] = finished
            if self.last_success is not None:
                self.last_success.labels(account=account).set(finished)
        if failing:
            self._failing.add(account)
        else:
            self._failing.discard(account)
        if self.account_failing is not None:
            self.account_failing.labels(account=account).set(1 if failing else 0)

    def idle(self, account: str, connected: bool) -> None:
        """An IMAP account's IDLE connection opened or closed (``imap.IdleWatcher``)."""
        if self.idle_connected is not None and account in self._accounts:
            self.idle_connected.labels(account=account).set(1 if connected else 0)

    def watch_ledger(self, writable: Callable[[], bool]) -> None:
        """Have ``ledger_writable`` read ``writable()`` at every scrape (``Ledger.writable``)."""
        self.ledger_writable.set_function(lambda: 1.0 if writable() else 0.0)

    def data_timeouts(self, account: str, count: int) -> None:
        """Count messages whose final dot got no reply in time (``SmtpDeliverer.data_timeouts``)."""
        if count:
            self._of(self.smtp_data_timeouts, account).inc(count)

    def host_paused(self) -> None:
        """Count a pause of a POP3 host that asked us to slow down (``schedule.Plan``)."""
        self.host_pauses.inc()

    def account_backlog(self, account: str, deferred: int, dead_letters: int | None) -> None:
        """Set the ``deferred_messages`` and ``dead_letters`` gauges of one account
        (``dead_letters`` None: not counted yet, left as it is)."""
        self._deferred[account] = deferred
        if self.per_account:
            self.deferred_messages.labels(account=account).set(deferred)
        if dead_letters is not None:
            self._dead[account] = dead_letters
            if self.per_account:
                self.dead_letters.labels(account=account).set(dead_letters)

    def backlog(self, deferred: dict[str, int], dead_letters: dict[str, int]) -> None:
        """Set the ``deferred_messages`` and ``dead_letters`` gauges of every known account."""
        for name in self._accounts:
            self.account_backlog(name, deferred.get(name, 0), dead_letters.get(name, 0))

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)
