"""The scheduler: backoff, parking, the bare -ERR cap, parallelism and per-account locks, slots
and reloads (with an injected clock)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from connector.cycle import AccountSpec, CycleStats, DeliveryPolicy
from connector.errors import Disposition, Pop3AuthError
from connector.ledger import Ledger
from connector.pop3 import AuthMethod, Pop3Endpoint
from connector.runtime import Runtime
from connector.schedule import START_SPACING, next_slot, phase
from connector.service import (
    BARE_LOGIN_ERROR_LIMIT,
    PARKED_MIN_DELAY,
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


# --------------------------------------------------------------------------------------------
# Slots, reloads, and what one cycle costs the others (docs/design.md §10.2, issue 15)
# --------------------------------------------------------------------------------------------

T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_reload_keeps_every_unchanged_account_where_it_was(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    names = [f"a{i:02d}" for i in range(40)]
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        service = Service(runtime(tmp_path, names), ledger, clock=clock)
        service.schedule_all()
        before = {n: service.plan.due(n) or 0.0 for n in names}
        assert sorted(before.values()) == [T0 + i * START_SPACING for i in range(40)]  # ramped

        clock.now = T0 + 500.0
        old = service.runtime
        specs = {s.name: s for s in old.accounts}
        accounts = [specs[n] for n in names[1:]] + [spec(f"b{i}") for i in range(5)]
        accounts[1] = replace(accounts[1], deliver_to=("x@b.example",))  # a02 changes
        intervals = {a.name: 600.0 for a in accounts} | {"a01": 1200.0}
        service.apply_runtime(replace(old, accounts=tuple(accounts), intervals=intervals))

        assert all(service.plan.due(n) == before[n] for n in names[2:])  # a02 too
        assert service.plan.due("a01") == next_slot(phase("a01"), 1200.0, T0 + 500.0)
        assert service.plan.due("a00") is None
        added = [service.plan.due(f"b{i}") for i in range(5)]
        assert added == [T0 + 500.0 + i * START_SPACING for i in range(5)]  # a ramp, no wave
    finally:
        await ledger.close()


async def test_after_a_good_cycle_the_next_poll_is_the_accounts_slot(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 10.0)
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        service = Service(runtime(tmp_path, ["a", "b"]), ledger, clock=clock)
        ok = CycleResult("a", True, CycleStats(), 0.1)
        for name in ("a", "b"):
            state = service.accounts[name]
            slot = service._next_poll(state, ok)
            assert slot == next_slot(phase(name), 600.0, T0 + 10.0 + 300.0)
            assert T0 + 310.0 <= slot < T0 + 910.0
        # A failure is not put on the grid: the backoff (test above) with its jitter.
        state = service.accounts["a"]
        state.failures = 1
        delay = service._next_poll(state, failed("a", Disposition.RETRY)) - clock()
        assert 600.0 <= delay <= 660.0
    finally:
        await ledger.close()


async def test_a_reload_of_the_same_file_keeps_one_set_of_specs(tmp_path: Path) -> None:
    """The runtime holds the specs the accounts poll with, not a second, equal set (with TLS
    each spec holds an SSL context: a reload must not double the memory)."""
    from tests.unit.test_service_reload import runtime as config_runtime

    first = config_runtime(tmp_path, {"info": "a.test", "sales": "b.test"})
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        service = Service(first, ledger)
        service.apply_runtime(config_runtime(tmp_path, {"info": "a.test", "sales": "b.test"}))
        assert all(a is b for a, b in zip(service.runtime.accounts, first.accounts, strict=True))
        service.apply_runtime(config_runtime(tmp_path, {"info": "a.test", "sales": "c.test"}))
        assert service.runtime.accounts[0] is first.accounts[0]
        assert service.runtime.accounts[1] is service.accounts["sales"].spec
        assert service.runtime.accounts[1].endpoint.host == "c.test"
    finally:
        await ledger.close()
