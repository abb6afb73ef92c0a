"""Politeness towards providers, end to end on loopback POP3 servers (docs/design.md §10.2).

Two hosts: ``127.0.0.1`` (the provider under test) and ``127.0.0.2`` (another one, which must
not suffer for the first).  The servers record every login attempt with its time, and the most
sessions they had open at once; the tests count logins per second per host.  The pauses are
shortened (``HOST_PAUSE``) and the start ramp flattened (``START_SPACING``) so that a test
takes seconds; connector.schedule's own tests (tests/unit/test_schedule.py) cover the real
durations.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from connector import schedule
from connector.config import load_settings
from connector.loopback import LoopbackPop3Server
from connector.runtime import Runtime, build_runtime
from connector.service import Service, open_service

PAUSE = 0.4  # HOST_PAUSE in these tests


@pytest.fixture(autouse=True)
def _short_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedule, "HOST_PAUSE", PAUSE)
    monkeypatch.setattr(schedule, "START_SPACING", 0.0)  # every account due at once


def _runtime(tmp_path: Path, hosts: dict[tuple[str, int], list[str]], *, per_host: int = 2,
             interval: str = "1s") -> Runtime:  # fmt: skip
    blocks = "".join(
        f"""
[[accounts]]
name = "{user}"
host = "{host}"
port = {port}
tls = "none"
username = "{user}"
password = "pw"
deliver_to = ["{user}@firma.test"]
"""
        for (host, port), users in hosts.items()
        for user in users
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\npoll_interval = "{interval}"\n'
        f"max_parallel_accounts = 8\nmax_sessions_per_host = {per_host}\n"
        f'[smtp]\nhost = "127.0.0.1"\nport = 1\ntls = "none"\nhelo_name = "c.test"\n{blocks}'
    )
    config.chmod(0o600)
    return build_runtime(load_settings(config))


@pytest.fixture
async def provider() -> AsyncIterator[LoopbackPop3Server]:
    users = {f"gmx{i:02d}": "pw" for i in range(20)}
    async with LoopbackPop3Server(users) as server:
        yield server


@pytest.fixture
async def other() -> AsyncIterator[LoopbackPop3Server]:
    server = LoopbackPop3Server({f"office{i}": "pw" for i in range(2)})
    await server.start("127.0.0.2", 0)
    try:
        yield server
    finally:
        await server.stop()


def _hosts(provider: LoopbackPop3Server, other: LoopbackPop3Server, n: int = 20) -> dict[
    tuple[str, int], list[str]
]:  # fmt: skip
    return {
        ("127.0.0.1", provider.port): [f"gmx{i:02d}" for i in range(n)],
        ("127.0.0.2", other.port): ["office0", "office1"],
    }


async def _until(condition: Callable[[], bool], what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _serve_until(service: Service, condition: Callable[[], bool], what: str) -> None:
    serving = asyncio.create_task(service.serve())
    try:
        await _until(condition, what)
    finally:
        service.stopping.set()
        await asyncio.wait_for(serving, 20)


def _per_second(logins: list[tuple[float, str, str]]) -> int:
    return max(Counter(int(t) for t, _, _ in logins).values(), default=0)


async def test_once_keeps_to_the_sessions_allowed_per_host(
    tmp_path: Path, provider: LoopbackPop3Server, other: LoopbackPop3Server
) -> None:
    async with open_service(_runtime(tmp_path, _hosts(provider, other, 8))) as service:
        results = await service.run_once()
    assert all(r.ok for r in results), [r.error for r in results]
    assert provider.sessions == 8
    assert provider.peak_sessions == 2  # eight due at once, two at a time
    assert other.peak_sessions == 2  # the other host had its own two meanwhile


async def test_run_keeps_to_the_sessions_allowed_per_host(
    tmp_path: Path, provider: LoopbackPop3Server, other: LoopbackPop3Server
) -> None:
    runtime = _runtime(tmp_path, _hosts(provider, other), per_host=3, interval="1h")
    async with open_service(runtime) as service:
        await _serve_until(service, lambda: provider.sessions >= 20, "every account's poll")
    assert provider.peak_sessions == 3
    assert other.sessions == 2


async def test_login_delay_pauses_the_host_and_spares_the_other(
    tmp_path: Path, provider: LoopbackPop3Server, other: LoopbackPop3Server
) -> None:
    """The provider lets one login in, then answers LOGIN-DELAY to every other (RFC 2449
    §8.1.1).  Twenty accounts on it poll every second: without the pause that is twenty
    logins a second, each refused; with it, a probe per pause, the pauses doubling."""
    provider.login_delay = 3600.0
    async with open_service(_runtime(tmp_path, _hosts(provider, other))) as service:
        await _serve_until(
            service, lambda: len(other.logins) >= 8, "four polls of the other host's accounts"
        )
        paused = service.plan.paused(time.time())
    refused = [t for t, _, reply in provider.logins if reply == "LOGIN-DELAY"]
    assert refused, provider.logins
    # In ~4 s: the first two (the limit), then one probe at 0.4, 1.2, 2.8 s (pauses of 0.4,
    # 0.8, 1.6 s): a handful, where twenty accounts on their own backoff would try 40 times.
    assert len(provider.logins) <= 7, provider.logins
    after_first = [t for t, _, _ in provider.logins if t > refused[0] + 0.05]
    assert all(t >= refused[0] + PAUSE for t in after_first), (refused[0], after_first)
    assert _per_second(provider.logins) <= 3
    assert "127.0.0.1" in paused
    assert "LOGIN-DELAY" in (paused["127.0.0.1"][1] or "")
    # The other provider's accounts polled every second all along.
    assert all(reply == "+OK" for _, _, reply in other.logins)


async def test_refused_connections_pause_the_host(
    tmp_path: Path, provider: LoopbackPop3Server, other: LoopbackPop3Server
) -> None:
    """Every connection to the provider is closed before the greeting (a provider turning
    away an address it throttles): the host rests, and the attempts thin out."""
    provider.close_at_once = True
    async with open_service(_runtime(tmp_path, _hosts(provider, other))) as service:
        await _serve_until(
            service, lambda: len(other.logins) >= 8, "four polls of the other host's accounts"
        )
    assert provider.logins == []  # never got as far as a login
    assert 2 <= provider.sessions <= 7, provider.sessions
    assert all(reply == "+OK" for _, _, reply in other.logins)


async def test_once_leaves_a_host_alone_after_it_asked_to_slow_down(
    tmp_path: Path, provider: LoopbackPop3Server, other: LoopbackPop3Server
) -> None:
    provider.login_delay = 3600.0
    async with open_service(_runtime(tmp_path, _hosts(provider, other, 8))) as service:
        results = {r.account: r for r in await service.run_once()}
    # One logged in, one or two got LOGIN-DELAY (those in flight then): the rest of the
    # provider's accounts were not started in this run.
    assert 2 <= len(provider.logins) <= 3, provider.logins
    gmx = [results[f"gmx{i:02d}"] for i in range(8)]
    not_started = [r for r in gmx if r.error and r.error.startswith("not started: 127.0.0.1")]
    assert len(not_started) == 8 - len(provider.logins)
    assert all("LOGIN-DELAY" in (r.error or "") for r in not_started)
    assert results["office0"].ok
    assert results["office1"].ok
