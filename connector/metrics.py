"""Every Prometheus object of docs/design.md §11.1, declared once, on a registry of our own.

Our own :class:`~prometheus_client.CollectorRegistry` (not the library's global default) keeps
the exposition to what §11.1 lists, and lets every test build a fresh set.  Label values are
bounded: ``account`` and ``smtp_target`` (from the config), ``outcome`` and ``result`` (enums),
``code`` (a three-digit SMTP code, or ``none`` when a message was deferred without a reply, e.g.
a timeout), ``version``.  Never a UIDL, an address or a subject: those would make a new series
per message.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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


def smtp_code(response: str) -> str:
    """The SMTP reply code that ended a message's transaction, as a bounded label value."""
    m = _CODE_RE.match(response)
    return m.group(1) if m else NO_CODE


class Metrics:
    """The metrics of docs/design.md §11.1.  Also a ``CycleObserver``: :meth:`message` counts one
    message."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, version: str = __version__
    ) -> None:
        # The exposition holds the series of docs/design.md §11.1 and nothing else: no
        # *_created gauge beside each counter and histogram.  (A process-wide switch of
        # prometheus-client; we own the process, and nothing else in it exports metrics.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.cycle_duration = Histogram(
            PREFIX + "cycle_duration_seconds",
            "One account's cycle, connect to QUIT.",
            ["account"],
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.cycles = Counter(
            PREFIX + "cycles", "Cycles by result (ok, failed).", ["account", "result"], registry=r
        )
        self.messages = Counter(
            PREFIX + "messages",
            "Messages by outcome (delivered, dead_lettered, deferred, skipped, removed).",
            ["account", "outcome"],
            registry=r,
        )
        self.delivered_bytes = Counter(
            PREFIX + "delivered_bytes",
            "Message bytes accepted by SMTP, with our added header lines.",
            ["account"],
            registry=r,
        )
        self.mailbox_messages = Gauge(
            PREFIX + "mailbox_messages",
            "Messages in the POP3 mailbox (STAT at the start of the last cycle).",
            ["account"],
            registry=r,
        )
        self.mailbox_bytes = Gauge(
            PREFIX + "mailbox_bytes",
            "Octets in the POP3 mailbox (STAT at the start of the last cycle).",
            ["account"],
            registry=r,
        )
        self.deferred_messages = Gauge(
            PREFIX + "deferred_messages",
            "Messages refused temporarily, waiting for a retry.",
            ["account"],
            registry=r,
        )
        self.dead_letters = Gauge(
            PREFIX + "dead_letters",
            "Messages of this account in the dead-letter store.",
            ["account"],
            registry=r,
        )
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
            ["account", "code"],
            registry=r,
        )
        self.smtp_data_timeouts = Counter(
            PREFIX + "smtp_data_timeouts",
            "Messages whose end of data got no reply within [smtp] data_termination_timeout: "
            "deferred, though the server may have taken them (RFC 5321 §4.5.3.2.6).",
            ["account"],
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
        # account moved to another target keeps its series.
        self.account_info = Gauge(
            PREFIX + "account_info",
            "Always 1; the SMTP target the account delivers to (smtp_target).",
            ["account", "smtp_target"],
            registry=r,
        )
        self._accounts: set[str] = set()
        self._targets: dict[str, str] = {}

    # -- accounts ------------------------------------------------------------------------------

    def set_accounts(self, names: Iterable[str]) -> None:
        """Create the series of each account (so they read 0, not absent) and drop the gauges
        of accounts no longer configured.  Counters of a removed account stay until restart:
        Prometheus' ``rate()`` copes, and a re-added account continues them."""
        wanted = set(names)
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
            self.account_failing.labels(account=name)
        for name in self._accounts - wanted:
            for gauge in (
                self.mailbox_messages,
                self.mailbox_bytes,
                self.deferred_messages,
                self.dead_letters,
                self.last_success,
                self.account_failing,
                self.idle_connected,
            ):
                with contextlib.suppress(KeyError):  # never set
                    gauge.remove(name)
        self._accounts = wanted

    def set_targets(self, targets: dict[str, str]) -> None:
        """``account_info``: one series per account, labelled with its SMTP target's name; the
        series of an account removed or moved to another target goes."""
        for name, old in self._targets.items():
            if targets.get(name) != old:
                with contextlib.suppress(KeyError):
                    self.account_info.remove(name, old)
        for name, target in targets.items():
            self.account_info.labels(account=name, smtp_target=target).set(1)
        self._targets = dict(targets)

    # -- the CycleObserver hook ----------------------------------------------------------------

    def message(self, account: str, uidl: str, size: int, outcome: Outcome, response: str) -> None:
        """Count one message (``uidl`` and ``size`` are not labels: unbounded)."""
        self.messages.labels(account=account, outcome=outcome.value).inc()
        if outcome not in (Outcome.SKIPPED, Outcome.REMOVED):
            # Only DELEd this cycle, not handed to SMTP: no reply to count.
            self.smtp_responses.labels(account=account, code=smtp_code(response)).inc()

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
        self.cycle_duration.labels(account=account).observe(duration)
        self.cycles.labels(account=account, result="ok" if ok else "failed").inc()
        if stats.delivered_bytes:
            self.delivered_bytes.labels(account=account).inc(stats.delivered_bytes)
        if stats.mailbox_known:
            self.mailbox_messages.labels(account=account).set(stats.mailbox_messages)
            self.mailbox_bytes.labels(account=account).set(stats.mailbox_bytes)
        if ok:
            self.last_success.labels(account=account).set(finished)
        self.account_failing.labels(account=account).set(1 if failing else 0)

    def idle(self, account: str, connected: bool) -> None:
        """An IMAP account's IDLE connection opened or closed (``imap.IdleWatcher``)."""
        if account in self._accounts:
            self.idle_connected.labels(account=account).set(1 if connected else 0)

    def watch_ledger(self, writable: Callable[[], bool]) -> None:
        """Have ``ledger_writable`` read ``writable()`` at every scrape (``Ledger.writable``)."""
        self.ledger_writable.set_function(lambda: 1.0 if writable() else 0.0)

    def data_timeouts(self, account: str, count: int) -> None:
        """Count messages whose final dot got no reply in time (``SmtpDeliverer.data_timeouts``)."""
        if count:
            self.smtp_data_timeouts.labels(account=account).inc(count)

    def backlog(self, deferred: dict[str, int], dead_letters: dict[str, int]) -> None:
        """Set the ``deferred_messages`` and ``dead_letters`` gauges of every known account."""
        for name in self._accounts:
            self.deferred_messages.labels(account=name).set(deferred.get(name, 0))
            self.dead_letters.labels(account=name).set(dead_letters.get(name, 0))

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)
