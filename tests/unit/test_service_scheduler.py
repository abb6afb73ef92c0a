"""The scheduler: backoff, parking, the bare -ERR cap, parallelism and per-account locks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import cast

import pytest

from connector.cycle import AccountSpec, CycleStats, DeliveryPolicy
from connector.errors import Disposition, Pop3AuthError
from connector.imap.idle import IdleWatcher, Wake
from connector.ledger import Ledger
from connector.pop3 import AuthMethod, Pop3Endpoint
from connector.runtime import Runtime
from connector.service import (
    BARE_LOGIN_ERROR_LIMIT,
    PARKED_MIN_DELAY,
    PUSH_GAP,
    AccountState,
    CycleResult,
    Service,
)
from connector.smtp import SenderPolicy, SmtpSettings
from connector.tls import TlsMode


def spec(name: str) -> AccountSpec:
    return AccountSpec(
        name=name,
        endpoint=Pop3Endpoint("127.0.0.1", 1, TlsMode.NONE),
        username="u",
        password="p",
        auth=AuthMethod.AUTO,
        deliver_to=("a@b.example",),
        max_deferral=86400.0,
    )


def runtime(tmp_path: Path, names: list[str], parallel: int = 2) -> Runtime:
    return Runtime(
        accounts=tuple(spec(n) for n in names),
        intervals=dict.fromkeys(names, 600.0),
        smtp=SmtpSettings("127.0.0.1", 1, TlsMode.NONE, None, "me"),
        policy=DeliveryPolicy(SenderPolicy.RETURN_PATH, None, "me"),
        state_dir=tmp_path,
        dead_letter_path=tmp_path / "dead",
        max_parallel=parallel,
        shutdown_grace=1.0,
        transcripts=False,
    )


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    svc = Service(runtime(tmp_path, ["a", "b", "c", "d"]), ledger)
    yield svc
    await ledger.close()


def failed(name: str, disposition: Disposition) -> CycleResult:
    return CycleResult(name, False, CycleStats(), 0.1, "boom", disposition)


def test_ok_waits_one_interval(service: Service) -> None:
    state = service.accounts["a"]
    assert service.delay_after(state, CycleResult("a", True, CycleStats(), 0.1)) == 600.0


def test_failures_back_off_exponentially_up_to_four_intervals(service: Service) -> None:
    state = service.accounts["a"]
    delays = []
    for failures in range(1, 6):
        state.failures = failures
        delays.append(service.delay_after(state, failed("a", Disposition.RETRY)))
    lows = [600.0, 1200.0, 2400.0, 2400.0, 2400.0]
    for delay, low in zip(delays, lows, strict=True):
        assert low <= delay <= low * 1.1  # jitter of at most 10 %


def test_parked_account_is_retried_slowly(service: Service) -> None:
    state = service.accounts["a"]
    state.failures = 1
    delay = service.delay_after(state, failed("a", Disposition.PARK_ACCOUNT))
    assert PARKED_MIN_DELAY <= delay <= PARKED_MIN_DELAY * 1.1


def test_bare_login_errors_park_the_account_after_the_cap(service: Service) -> None:
    state: AccountState = service.accounts["a"]
    bare = Pop3AuthError("PASS", "invalid login")
    seen = [
        service._count_failure(state, bare, Disposition.RETRY)
        for _ in range(BARE_LOGIN_ERROR_LIMIT)
    ]
    assert seen[:-1] == [Disposition.RETRY] * (BARE_LOGIN_ERROR_LIMIT - 1)
    assert seen[-1] is Disposition.PARK_ACCOUNT
    assert state.failing


async def test_parallel_limit_and_one_cycle_per_account(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    running: list[str] = []
    peak = {"all": 0}
    release = asyncio.Event()

    async def fake_cycle(state: AccountState) -> CycleResult:
        name = state.spec.name
        assert name not in running, "two cycles of one account at once"
        running.append(name)
        peak["all"] = max(peak["all"], len(running))
        await release.wait()
        running.remove(name)
        return CycleResult(name, True, CycleStats(), 0.0)

    monkeypatch.setattr(service, "_cycle", fake_cycle)
    task = asyncio.create_task(service.run_once(["a", "a", "b", "c", "d"]))
    for _ in range(50):  # let every task that can start do so
        await asyncio.sleep(0)
    assert len(running) == 2  # max_parallel
    release.set()
    results = await task
    assert [r.account for r in results] == ["a", "a", "b", "c", "d"]
    assert peak["all"] == 2


class Announcing:
    """An IDLE watcher whose server announces new mail ``after[i]`` seconds into the i-th wait
    (on a clock of its own, the service's); past the list it waits out its time."""

    def __init__(self, after: list[float]) -> None:
        self.now = 1000.0
        self.after = after
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    async def wait(self, seconds: float, wake: Sequence[asyncio.Event]) -> Wake:
        self.waits.append(seconds)
        if self.after and self.after[0] < seconds:
            self.now += self.after.pop(0)
            return Wake.MAIL
        self.now += seconds
        return Wake.TIMEOUT


@pytest.mark.parametrize(
    ("after", "waits", "polled_after"),
    [
        # Mail announced 0.1 s after the last cycle ended, and again and again: the next
        # cycle waits for PUSH_GAP, IDLE watching meanwhile (a flood of EXISTS).
        ([0.1, 0.2, 0.3], [600.0, PUSH_GAP - 0.1, PUSH_GAP - 0.3, PUSH_GAP - 0.6], PUSH_GAP),
        # Mail announced after a quiet spell: polled at once, no gap added.
        ([5.0], [600.0], 5.0),
    ],
)
async def test_cycles_that_idle_starts_keep_a_gap(
    service: Service, after: list[float], waits: list[float], polled_after: float
) -> None:
    watcher = Announcing(after)
    service.clock = watcher.clock
    start = watcher.now
    await service._wait(service.accounts["a"], cast(IdleWatcher, watcher), 600.0)
    assert watcher.waits == pytest.approx(waits)
    assert watcher.now - start == pytest.approx(polled_after)
