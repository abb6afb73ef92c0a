"""When each account polls, and how hard we press one POP3 host (docs/design.md §10.2).

Pure: no asyncio and no clock of its own.  ``Service.serve`` asks a :class:`Plan` which accounts
to start now and when to ask again, and tells it when a cycle ends; tests/unit/test_schedule.py
drives the same object with a fake clock through thousands of accounts.

Theory of operation
-------------------

* **Slots.**  Each account polls on a grid of its own: slot k falls at ``(k + phase) *
  interval`` seconds of Unix time, with ``phase`` in [0, 1) taken from a SHA-256 of the
  account's name (:func:`phase`; not Python's ``hash``, which differs in every process).
  Accounts with the same interval are spread evenly over it, and the grid depends on nothing
  but the name and the interval: a restart or a reload leaves every unchanged account where it
  was.  After a good cycle the next poll is the first slot at least half an interval after the
  cycle's end (:func:`next_slot`): a cycle that started late (queued behind the limits below)
  does not drag the next one with it, and two polls are never closer than half an interval.  A
  failing account backs off instead (docs/design.md §6.3); SIGUSR1 and ``POST /poll`` make an
  account due at once.
* **Start.**  The first poll of each account (at start, or when a reload adds it) comes from a
  ramp, not from its slot: a host's new accounts begin one after another, ``min(START_SPACING,
  interval / count)`` apart in config order (:func:`first_polls`).  An installation with a few
  accounts polls them within seconds of starting; 500 accounts on one provider begin at no more
  than one login per second, and never take longer than one interval to begin.  From their
  second poll on they are on their slots.
* **Hosts.**  At most ``per_host`` sessions run at once on one POP3 host (:func:`host_key`: the
  configured name in lower case, the port ignored), and at most ``max_parallel`` in all.  An
  account due while its host is full waits in the host's queue (``HostState.parked``) and
  starts when a session of that host ends, in the order they fell due.
* **Slowing down.**  A provider that says "not now" (``-ERR [LOGIN-DELAY]``, RFC 2449 §8.1.1;
  ``[IN-USE]``, §8.1.2; ``[SYS/TEMP]``, RFC 3206 §4; a ``-ERR`` greeting; a connection refused,
  reset, cut or timed out before the login: :func:`slow_down_reason`) pauses the whole host: no
  session starts there for ``HOST_PAUSE`` seconds, doubled for every further such answer before
  a login succeeds, up to ``HOST_PAUSE_MAX``, with up to 10 % jitter.  An account that falls
  due during a pause moves to its first slot after it (no wave of logins when it ends), and
  after a pause one session at a time probes the host until one logs in again; then the full
  ``per_host`` applies.  The answer also counts as a failure of the account that got it (its
  own backoff, docs/design.md §6.3).
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import math
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from connector.errors import (
    Pop3ConnectionError,
    Pop3ResponseError,
    Pop3TimeoutError,
    Pop3TlsError,
)

__all__ = [
    "HOST_PAUSE",
    "HOST_PAUSE_MAX",
    "MIN_GAP",
    "START_SPACING",
    "HostState",
    "Plan",
    "Polled",
    "first_polls",
    "host_key",
    "next_slot",
    "phase",
    "slow_down_reason",
]

MIN_GAP: Final = 0.5
"""After a good cycle, the next slot is at least this many intervals after the cycle's end."""

START_SPACING: Final = 1.0
"""Seconds between the first polls of one host's accounts, at most (see "Start" above)."""

HOST_PAUSE: Final = 30.0
"""Seconds a host rests after it asked us to slow down; doubled per further such answer."""

HOST_PAUSE_MAX: Final = 900.0
"""The longest pause of a host that keeps refusing (15 minutes)."""

# RFC 2449 §8.1.1 LOGIN-DELAY (logged in too recently), §8.1.2 IN-USE (the maildrop is locked),
# RFC 3206 §4 SYS/TEMP (a transient failure of the server): each one says "later".
_SLOW_DOWN_CODES: Final = frozenset({"LOGIN-DELAY", "IN-USE", "SYS/TEMP"})


def host_key(host: str) -> str:
    """The host a per-host limit counts sessions on: the configured name, in lower case and
    without a final dot (``POP.GMX.NET.`` and ``pop.gmx.net`` are one host), or an IP address
    in its canonical form.  Names are not resolved: a provider's limits are per client address
    over all its servers, so resolving could only split one provider into several hosts (round
    robin DNS, several addresses per name), and it would cost a lookup per poll."""
    name = host.strip().strip("[]").rstrip(".").lower()
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        return name


def phase(name: str) -> float:
    """Where in its interval an account polls, in [0, 1): the same in every process."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def next_slot(offset: float, interval: float, after: float) -> float:
    """The first slot ``(k + offset) * interval`` (Unix time) at or after ``after``."""
    if interval <= 0:
        return after
    k = math.ceil(after / interval - offset)
    return (k + offset) * interval


def slow_down_reason(exc: BaseException, *, logged_in: bool) -> str | None:
    """Why a failed cycle asks us to press its host less (see "Slowing down" above), or None.

    ``logged_in``: the cycle got past the login (STAT answered).  A TLS failure is about trust
    (a certificate, a protocol version), not load: it never pauses a host.
    """
    match exc:
        case Pop3ResponseError(resp_code=code) if code in _SLOW_DOWN_CODES:
            return str(exc)
        case Pop3ResponseError(command="greeting"):
            return str(exc)
        case Pop3TlsError():
            return None
        case Pop3ConnectionError() | Pop3TimeoutError() if not logged_in:
            return str(exc)
        case _:
            return None


class Polled(NamedTuple):
    """An account as the plan needs it: its name, its host's key and its interval."""

    name: str
    host: str
    interval: float


def first_polls(accounts: Iterable[Polled], now: float) -> dict[str, float]:
    """The first poll of each account: per host, one after another from ``now``, spaced
    ``min(START_SPACING, interval / count)`` apart (the shortest interval of the host's accounts),
    in the order given."""
    by_host: dict[str, list[Polled]] = {}
    for account in accounts:
        by_host.setdefault(account.host, []).append(account)
    due: dict[str, float] = {}
    for group in by_host.values():
        shortest = min(a.interval for a in group)
        spacing = min(START_SPACING, shortest / len(group)) if shortest > 0 else 0.0
        for i, account in enumerate(group):
            due[account.name] = now + i * spacing
    return due


@dataclass(slots=True)
class HostState:
    """One POP3 host: its sessions now, and whether it asked us to slow down."""

    key: str
    active: int = 0
    strikes: int = 0  # slow-down answers in a row, without a login between
    paused_until: float = 0.0
    reason: str | None = None  # the last slow-down answer, while strikes > 0
    slowed_at: float = float("-inf")  # when the last slow-down answer came
    # Accounts due while the host was full, in the order they fell due: (name, generation).
    parked: deque[tuple[str, int]] = field(default_factory=deque)

    def limit(self, per_host: int) -> int:
        """Sessions allowed at once: one probe while the host is slowed down."""
        return 1 if self.strikes else per_host


@dataclass(slots=True)
class _Entry:
    name: str
    host: str
    interval: float
    offset: float  # phase(name)
    due: float | None = None  # None while running or not scheduled
    gen: int = 0  # bumped at every reschedule: older heap and queue entries are stale
    running: bool = False


class Plan:
    """The schedule of every account (see the module docstring).

    ``take(now)`` returns the accounts to start now and counts them as running; ``finish``
    ends one; ``wakeup()`` says when ``take`` may next have something to start.
    """

    def __init__(
        self,
        *,
        max_parallel: int,
        per_host: int,
        rng: random.Random | None = None,
    ) -> None:
        self.max_parallel = max_parallel
        self.per_host = per_host
        self.hosts: dict[str, HostState] = {}
        self.running = 0
        self._rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        # name -> the host key its session counts on, and when it started
        self._running: dict[str, tuple[str, float]] = {}
        self._after_own: set[str] = set()  # due while a cycle of the same name still runs

    # -- accounts ------------------------------------------------------------------------------

    def add(self, accounts: Sequence[Polled], now: float) -> None:
        """Schedule new accounts, their first polls ramped (:func:`first_polls`)."""
        accounts = [a for a in accounts if a.name not in self._entries]
        due = first_polls(accounts, now)
        for account in accounts:
            entry = _Entry(account.name, account.host, account.interval, phase(account.name))
            self._entries[account.name] = entry
            self.hosts.setdefault(account.host, HostState(account.host))
            self._push(entry, due[account.name])

    def update(self, account: Polled, now: float) -> None:
        """A reload changed the account's host or interval: a new interval takes effect at the
        new grid's next slot; the same interval keeps the poll where it is."""
        entry = self._entries.get(account.name)
        if entry is None:
            return  # not scheduled (not serving): add() takes it as it is
        self.hosts.setdefault(account.host, HostState(account.host))
        old_interval, entry.host, entry.interval = entry.interval, account.host, account.interval
        if entry.due is not None and account.interval != old_interval:
            self._push(entry, next_slot(entry.offset, entry.interval, now))

    def remove(self, name: str) -> None:
        """Forget the account (a cycle of it still running ends as it will)."""
        self._entries.pop(name, None)
        self._after_own.discard(name)

    def set_due(self, name: str, when: float) -> None:
        """Poll ``name`` at ``when`` (``POST /poll``, SIGUSR1, a changed failing account);
        an account in a cycle is rescheduled by ``finish`` instead."""
        entry = self._entries.get(name)
        if entry is not None and not entry.running:
            self._push(entry, when)

    def due(self, name: str) -> float | None:
        """When ``name`` polls next (None while it runs, or if unknown)."""
        entry = self._entries.get(name)
        return None if entry is None else entry.due

    def set_limits(self, *, max_parallel: int, per_host: int) -> None:
        """A reload changed a limit: raised limits let waiting accounts start."""
        self.max_parallel, self.per_host = max_parallel, per_host
        for host in self.hosts.values():
            self._release(host)

    # -- starting and ending cycles ------------------------------------------------------------

    def take(self, now: float) -> list[str]:
        """The accounts to start now, each counted as running until :meth:`finish`."""
        started: list[str] = []
        heap = self._heap
        while self.running < self.max_parallel and heap and heap[0][0] <= now:
            due, gen, name = heapq.heappop(heap)
            entry = self._entries.get(name)
            if entry is None or entry.gen != gen or entry.running or entry.due != due:
                continue  # stale: rescheduled, started, parked or removed since
            host = self.hosts[entry.host]
            if host.paused_until > now:
                # Not now, and not in a wave when the pause ends: at its next slot after it.
                self._push(entry, next_slot(entry.offset, entry.interval, host.paused_until))
                continue
            if name in self._running:
                # Removed and added back while its old cycle runs: one cycle per account.
                entry.due = None
                self._after_own.add(name)
                continue
            if host.active >= host.limit(self.per_host):
                host.parked.append((name, gen))
                continue
            entry.due, entry.running = None, True
            host.active += 1
            self.running += 1
            self._running[name] = (entry.host, now)
            started.append(name)
        return started

    def finish(
        self,
        name: str,
        now: float,
        *,
        next_due: float | None,
        logged_in: bool,
        slow_down: str | None = None,
    ) -> float | None:
        """A cycle of ``name`` ended.  ``next_due``: its next poll (None: not again, e.g. the
        account was removed or the service stops).  ``logged_in``: the cycle got past the
        login, which ends a host's slowing down; ``slow_down``: the host asked us to slow
        down (:func:`slow_down_reason`).  Returns the pause the host got, if any."""
        running = self._running.pop(name, None)
        if running is None:
            return None
        key, started = running
        pause: float | None = None
        host = self.hosts[key]
        host.active -= 1
        self.running -= 1
        if logged_in:
            # Only a session begun after the last slow-down answer shows the host is ready
            # again: one that began beside the refused one says nothing newer.
            if started > host.slowed_at:
                host.strikes, host.reason = 0, None
        elif slow_down is not None:
            host.strikes += 1
            host.reason = slow_down
            host.slowed_at = now
            pause = min(HOST_PAUSE * 2 ** (host.strikes - 1), HOST_PAUSE_MAX)
            pause *= self._rng.uniform(1.0, 1.1)  # hosts paused together do not resume together
            host.paused_until = max(host.paused_until, now + pause)
            self._defer_parked(host)
        self._release(host)
        entry = self._entries.get(name)
        if entry is not None and entry.running:
            entry.running = False
            if next_due is not None:
                self._push(entry, next_due)
        if name in self._after_own and entry is not None:
            self._after_own.discard(name)
            self._push(entry, now)
        return pause

    def wakeup(self, now: float) -> float | None:
        """When :meth:`take` may next start something; None when only the end of a running
        cycle (or a new request) can change that."""
        heap = self._heap
        while heap:
            due, gen, name = heap[0]
            entry = self._entries.get(name)
            if entry is not None and entry.gen == gen and not entry.running and entry.due == due:
                break
            heapq.heappop(heap)
        if not heap:
            return None
        due = heap[0][0]
        if due <= now:
            return None if self.running >= self.max_parallel else now
        return due

    def paused(self, now: float) -> dict[str, tuple[float, str | None]]:
        """The hosts resting now: key -> (until when, the answer that paused it)."""
        return {
            key: (host.paused_until, host.reason)
            for key, host in self.hosts.items()
            if host.paused_until > now
        }

    # -- plumbing ------------------------------------------------------------------------------

    def _push(self, entry: _Entry, when: float) -> None:
        entry.gen += 1
        entry.due = when
        heapq.heappush(self._heap, (when, entry.gen, entry.name))

    def _release(self, host: HostState) -> None:
        """Start queue-waiting accounts of ``host`` as its sessions allow (they go back on the
        heap, already due, ahead of later ones)."""
        room = host.limit(self.per_host) - host.active
        while room > 0 and host.parked:
            name, gen = host.parked.popleft()
            entry = self._entries.get(name)
            if entry is None or entry.gen != gen or entry.running or entry.due is None:
                continue
            heapq.heappush(self._heap, (entry.due, gen, name))
            room -= 1

    def _defer_parked(self, host: HostState) -> None:
        """The host paused: what waited in its queue moves to its first slot after the pause."""
        while host.parked:
            name, gen = host.parked.popleft()
            entry = self._entries.get(name)
            if entry is None or entry.gen != gen or entry.running:
                continue
            self._push(entry, next_slot(entry.offset, entry.interval, host.paused_until))
