"""connector.schedule: slots spread over the interval, the start ramp, per-host limits and the
pause of a host that asks us to slow down.  A fake clock and a small event simulation: no loop,
no sockets, thousands of accounts in milliseconds (docs/design.md §10.2)."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from connector.errors import (
    Pop3AuthError,
    Pop3ConnectionError,
    Pop3ProtocolError,
    Pop3ResponseError,
    Pop3TimeoutError,
    Pop3TlsError,
)
from connector.schedule import (
    HOST_PAUSE,
    HOST_PAUSE_MAX,
    MIN_GAP,
    START_SPACING,
    Plan,
    Polled,
    first_polls,
    host_key,
    next_slot,
    phase,
    slow_down_reason,
)

T0 = 1_800_000_000.0  # a Unix time: the slots are on Unix time


# --------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "key"),
    [
        ("pop.gmx.net", "pop.gmx.net"),
        ("POP.GMX.net.", "pop.gmx.net"),
        (" pop.gmx.net ", "pop.gmx.net"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("2001:DB8::0001", "2001:db8::1"),
    ],
)
def test_a_host_is_its_configured_name_in_lower_case(configured: str, key: str) -> None:
    assert host_key(configured) == key


def test_phases_are_stable_and_spread_evenly() -> None:
    assert phase("info") == phase("info")
    assert phase("info") != phase("info2")
    tenths = Counter(int(phase(f"kunde{i:05d}") * 10) for i in range(10_000))
    assert sorted(tenths) == list(range(10))
    assert all(850 < n < 1150 for n in tenths.values()), tenths


@pytest.mark.parametrize("after", [T0, T0 + 0.1, T0 + 299.9, T0 + 300.0, T0 + 12_345.6])
def test_next_slot_is_on_the_grid_and_not_before(after: float) -> None:
    offset, interval = 0.25, 300.0
    slot = next_slot(offset, interval, after)
    assert after <= slot < after + interval
    k = slot / interval - offset
    assert abs(k - round(k)) < 1e-6


def test_first_polls_ramp_per_host() -> None:
    many = [Polled(f"gmx{i}", "pop.gmx.net", 300.0) for i in range(500)]
    few = [Polled(f"office{i}", "mail.firma.test", 300.0) for i in range(3)]
    due = first_polls([*few, *many], T0)
    assert [due[f"office{i}"] - T0 for i in range(3)] == [0.0, START_SPACING, 2 * START_SPACING]
    gmx = sorted(due[f"gmx{i}"] - T0 for i in range(500))
    # 500 accounts at one login per second would take longer than the interval: squeezed in.
    assert gmx[0] == 0.0
    assert gmx[-1] < 300.0
    assert max(Counter(int(t) for t in gmx).values()) <= 2


@pytest.mark.parametrize(
    ("exc", "logged_in", "slows"),
    [
        (Pop3AuthError("PASS", "too soon", "LOGIN-DELAY"), False, True),
        (Pop3AuthError("PASS", "locked", "IN-USE"), False, True),
        (Pop3AuthError("PASS", "try later", "SYS/TEMP"), False, True),
        (Pop3ResponseError("greeting", "too many connections from your address"), False, True),
        (Pop3ConnectionError("cannot connect to pop.test:110: Connection refused"), False, True),
        (Pop3ConnectionError("the server closed the connection"), False, True),
        (Pop3TimeoutError("connect to pop.test:110 timed out"), False, True),
        # After the login the host let us in: a broken session is not a "not now".
        (Pop3ConnectionError("connection broke"), True, False),
        (Pop3TimeoutError("no reply in time"), True, False),
        # Our trust, our password: not a question of load.
        (Pop3TlsError("certificate verify failed"), False, False),
        (Pop3AuthError("PASS", "wrong password", "AUTH"), False, False),
        (Pop3AuthError("PASS", "invalid login"), False, False),
        (Pop3ResponseError("UIDL", "not supported"), True, False),
        (Pop3ProtocolError("line too long"), False, False),
        (ValueError("boom"), False, False),
    ],
)
def test_what_asks_a_host_to_slow_down(exc: Exception, logged_in: bool, slows: bool) -> None:
    reason = slow_down_reason(exc, logged_in=logged_in)
    assert (reason is not None) == slows
    if reason is not None:
        assert reason == str(exc)


# --------------------------------------------------------------------------------------------
# A simulation: the plan, a fake clock, servers that answer as told
# --------------------------------------------------------------------------------------------

Answer = Callable[[str, str, float], str | None]  # (account, host, time) -> slow-down or None


def always_ok(account: str, host: str, at: float) -> str | None:
    return None


@dataclass
class World:
    """Runs a Plan as Service._dispatch does: cycles take ``cycle`` seconds; after a good one
    the account's next slot at least half an interval on, after a refusal a fixed retry."""

    plan: Plan
    accounts: list[Polled]
    answer: Answer = always_ok
    cycle: float = 0.05
    now: float = T0
    starts: list[tuple[float, str, str]] = field(default_factory=list)  # (time, account, host)
    peaks: Counter[str] = field(default_factory=Counter)
    peak_running: int = 0
    _running: list[tuple[float, str, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_name = {a.name: a for a in self.accounts}
        self.plan.add(self.accounts, self.now)

    def run_until(self, end: float) -> None:
        active: Counter[str] = Counter()
        while self.now < end:
            for name in self.plan.take(self.now):
                self.peak_running = max(self.peak_running, self.plan.running)
                host = self.by_name[name].host
                self.starts.append((self.now, name, host))
                active[host] += 1
                self.peaks[host] = max(self.peaks[host], active[host])
                verdict = self.answer(name, host, self.now)
                heapq.heappush(self._running, (self.now + self.cycle, name, verdict))
            wake = self.plan.wakeup(self.now)
            ends = self._running[0][0] if self._running else None
            times = [t for t in (wake, ends) if t is not None]
            if not times:
                return
            self.now = max(self.now, min(times))
            while self._running and self._running[0][0] <= self.now:
                _, name, verdict = heapq.heappop(self._running)
                account = self.by_name[name]
                active[account.host] -= 1
                if verdict is None:
                    due = next_slot(
                        phase(name), account.interval, self.now + MIN_GAP * account.interval
                    )
                    self.plan.finish(name, self.now, next_due=due, logged_in=True)
                else:
                    due = self.now + account.interval  # the account's own backoff, simplified
                    self.plan.finish(
                        name, self.now, next_due=due, logged_in=False, slow_down=verdict
                    )

    def starts_on(self, host: str, since: float = T0, until: float = float("inf")) -> list[float]:
        return [t for t, _, h in self.starts if h == host and since <= t < until]


def fleet(n: int, host: str = "pop.gmx.net", interval: float = 300.0) -> list[Polled]:
    return [Polled(f"{host}-{i:05d}", host, interval) for i in range(n)]


def test_a_thousand_accounts_on_one_interval_poll_spread_over_it() -> None:
    world = World(Plan(max_parallel=8, per_host=2), fleet(1000))
    world.run_until(T0 + 5 * 300.0)
    later = world.starts_on("pop.gmx.net", since=T0 + 600.0, until=T0 + 1500.0)
    assert len(later) == 3000  # every account once per interval, rounds 3-5
    tenths = Counter(int((t - T0) % 300.0 // 30.0) for t in later)
    # 300 each on average; a hash spreads like chance does (one tenth holds 100 +- 10 accounts)
    assert all(210 < n < 390 for n in tenths.values()), tenths
    per_second = Counter(int(t) for t in later)
    assert max(per_second.values()) <= 12  # 3.3 a second on average; no wave
    assert world.peaks["pop.gmx.net"] <= 2


def test_the_start_is_a_ramp_not_a_wave() -> None:
    world = World(Plan(max_parallel=8, per_host=2), fleet(500) + fleet(3, "mail.firma.test"))
    world.run_until(T0 + 300.0)
    first = {name: t for t, name, host in reversed(world.starts) if host == "pop.gmx.net"}
    assert len(first) == 500  # every account began within one interval ...
    assert max(Counter(int(t) for t in first.values()).values()) <= 2  # ... 0.6 s apart
    office = {name: t for t, name, host in reversed(world.starts) if host == "mail.firma.test"}
    assert max(office.values()) - T0 <= 2 * START_SPACING + 0.1  # a small office: at once


def test_per_host_limit_and_no_host_waits_for_another() -> None:
    accounts = fleet(200, "pop.gmx.net") + fleet(5, "mail.firma.test")
    world = World(Plan(max_parallel=8, per_host=2), accounts, cycle=2.0)
    world.run_until(T0 + 60.0)
    assert world.peaks["pop.gmx.net"] == 2
    assert world.peaks["mail.firma.test"] == 2
    # The office's accounts start as their host allows, not behind gmx's queue.
    office = world.starts_on("mail.firma.test")
    assert len(office) == 5
    assert office[-1] - T0 <= 6.0


def test_the_parallel_limit_over_all_hosts() -> None:
    accounts = [a for h in range(10) for a in fleet(20, f"pop{h}.test")]
    world = World(Plan(max_parallel=8, per_host=2), accounts, cycle=3.0)
    world.run_until(T0 + 20.0)
    assert world.peak_running == 8


def test_login_delay_pauses_every_account_of_the_host() -> None:
    """The provider answers LOGIN-DELAY for ten minutes; then it lets us in again."""
    trouble_until = T0 + 600.0

    def answer(account: str, host: str, at: float) -> str | None:
        if host == "pop.gmx.net" and at < trouble_until:
            return "-ERR [LOGIN-DELAY] wait (to PASS)"
        return None

    world = World(
        Plan(max_parallel=8, per_host=2, rng=random.Random(1)),
        fleet(300, "pop.gmx.net", interval=120.0) + fleet(20, "mail.firma.test", interval=120.0),
        answer,
    )
    world.run_until(T0 + 3000.0)
    gmx = world.starts_on("pop.gmx.net")
    troubled = [t for t in gmx if t < trouble_until]
    # Without the pause: 300 accounts would try every 120 s (1,500 logins in ten minutes).
    # With it: the first two (the limit), then one probe per pause of 30, 60, 120, 240 s...
    assert len(troubled) <= 8, troubled
    gaps = [b - a for a, b in itertools.pairwise(troubled[1:])]  # the first two: together
    assert all(gap >= HOST_PAUSE for gap in gaps)
    assert gaps == sorted(gaps)  # the pauses grow
    # The other host polls at its pace meanwhile: 20 accounts, one poll per 120 s each.
    office = world.starts_on("mail.firma.test", until=trouble_until)
    assert len(office) >= 20 * 4
    # Once the provider lets us in, every account polls again at its own slot, spread out.
    after = world.starts_on("pop.gmx.net", since=T0 + 2400.0, until=T0 + 2880.0)
    assert len(after) == 4 * 300
    assert max(Counter(int(t) for t in after).values()) <= 10
    assert world.plan.hosts["pop.gmx.net"].strikes == 0


def test_a_host_that_refuses_for_hours_gets_one_attempt_per_long_pause() -> None:
    def answer(account: str, host: str, at: float) -> str | None:
        return "cannot connect to pop.gmx.net:995: Connection refused"

    world = World(
        Plan(max_parallel=8, per_host=2, rng=random.Random(2)), fleet(1000, interval=300.0), answer
    )
    world.run_until(T0 + 4 * 3600.0)
    attempts = world.starts_on("pop.gmx.net")
    # 30, 60, ... 900 s pauses, then one attempt every 15-16.5 minutes: about 20 in 4 hours
    # (1,000 accounts retrying on their own backoff would have made over 10,000).
    assert len(attempts) < 30, len(attempts)
    late = [b - a for a, b in itertools.pairwise(attempts[-5:])]
    assert all(HOST_PAUSE_MAX <= gap <= HOST_PAUSE_MAX * 1.1 + 300.0 for gap in late), late


def test_accounts_due_in_a_pause_resume_spread_not_in_a_wave() -> None:
    trouble = (T0 + 1000.0, T0 + 1000.2)  # one LOGIN-DELAY answer, in round 4

    def answer(account: str, host: str, at: float) -> str | None:
        return "-ERR [IN-USE] (to PASS)" if trouble[0] <= at < trouble[1] else None

    world = World(Plan(max_parallel=8, per_host=2, rng=random.Random(3)), fleet(3000), answer)
    world.run_until(T0 + 1300.0)
    window = world.starts_on("pop.gmx.net", since=trouble[0], until=trouble[0] + HOST_PAUSE)
    assert len(window) <= 2  # those in flight when IN-USE came back; then the host rests
    resumed = world.starts_on("pop.gmx.net", since=trouble[0] + HOST_PAUSE)
    assert max(Counter(int(t) for t in resumed).values()) <= 25  # 10 a second, spread


def test_a_removed_and_re_added_account_waits_for_its_own_cycle() -> None:
    plan = Plan(max_parallel=8, per_host=2)
    a = Polled("info", "pop.test", 60.0)
    plan.add([a], T0)
    assert plan.take(T0) == ["info"]
    plan.remove("info")
    plan.add([a], T0 + 1)
    assert plan.take(T0 + 1) == []  # its old cycle still runs: never two at once
    plan.finish("info", T0 + 2, next_due=T0 + 60, logged_in=True)
    assert plan.take(T0 + 2) == ["info"]


def test_a_queued_account_starts_when_its_host_has_room() -> None:
    plan = Plan(max_parallel=8, per_host=1)
    plan.add([Polled("a", "h", 60.0), Polled("b", "h", 60.0)], T0)
    plan.set_due("b", T0)
    assert plan.take(T0) == ["a"]
    assert plan.wakeup(T0) is None  # "b" waits for "a"'s session to end, not for a time
    plan.finish("a", T0 + 1, next_due=T0 + 60, logged_in=True)
    assert plan.take(T0 + 1) == ["b"]


def test_a_raised_limit_lets_queued_accounts_start() -> None:
    plan = Plan(max_parallel=8, per_host=1)
    plan.add([Polled(n, "h", 60.0) for n in "abc"], T0)
    for n in "abc":
        plan.set_due(n, T0)
    assert plan.take(T0) == ["a"]
    plan.set_limits(max_parallel=8, per_host=3)
    assert sorted(plan.take(T0)) == ["b", "c"]


def test_a_changed_interval_moves_to_the_new_grid_and_the_same_keeps_its_poll() -> None:
    plan = Plan(max_parallel=8, per_host=2)
    plan.add([Polled("a", "h", 300.0), Polled("b", "h", 300.0)], T0)
    plan.set_due("a", T0 + 100)
    plan.set_due("b", T0 + 100)
    plan.update(Polled("a", "h", 600.0), T0)
    plan.update(Polled("b", "h2", 300.0), T0)  # another host, same interval
    assert plan.due("a") == next_slot(phase("a"), 600.0, T0)
    assert plan.due("b") == T0 + 100


def test_accounts_queued_for_a_host_that_pauses_wait_for_their_slot_after_it() -> None:
    plan = Plan(max_parallel=8, per_host=1, rng=random.Random(4))
    plan.add([Polled(n, "h", 60.0) for n in "abc"], T0)
    for n in "abc":
        plan.set_due(n, T0)
    assert plan.take(T0) == ["a"]  # "b" and "c" wait in the host's queue
    pause = plan.finish(
        "a", T0 + 1, next_due=T0 + 60, logged_in=False, slow_down="-ERR [IN-USE] locked"
    )
    assert pause is not None
    until = plan.hosts["h"].paused_until
    # Not at the end of the pause all at once: each at its own slot after it.
    for n in "bc":
        assert plan.due(n) == next_slot(phase(n), 60.0, until)


def test_a_login_begun_beside_the_refused_one_does_not_end_the_slowing_down() -> None:
    # Two sessions start together; the host lets one in and answers LOGIN-DELAY to the other.
    # The one let in ends later: it began before the refusal, so the host still gets one probe
    # at a time after its pause, not both sessions at once.
    plan = Plan(max_parallel=8, per_host=2, rng=random.Random(5))
    plan.add([Polled(n, "h", 60.0) for n in "abcd"], T0)
    for n in "abcd":
        plan.set_due(n, T0)
    assert sorted(plan.take(T0)) == ["a", "b"]
    plan.finish("b", T0 + 0.01, next_due=T0 + 60, logged_in=False, slow_down="-ERR [LOGIN-DELAY]")
    plan.finish("a", T0 + 0.02, next_due=T0 + 60, logged_in=True)
    host = plan.hosts["h"]
    assert host.strikes == 1
    assert host.limit(plan.per_host) == 1
    # A session begun after the refusal that logs in does end it.
    for n in "cd":
        plan.set_due(n, host.paused_until + 1)
    (probe,) = plan.take(host.paused_until + 1)
    plan.finish(probe, host.paused_until + 2, next_due=T0 + 120, logged_in=True)
    assert host.strikes == 0
