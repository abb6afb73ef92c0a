"""The service behind the HTTP endpoint: what a request may cost (docs/design.md §11.2).

POST /poll never shortens the backoff of a failing account: a provider locks a mailbox, or an
IP address, after a few wrong passwords, and a request per second must not become a login per
second.  SIGUSR1 (root or the service's user only) still polls at once.  GET /status does not
count the dead letters anew: with the IMAP store that is a login per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from connector import service as service_module
from connector.config import load_settings
from connector.cycle import CycleStats
from connector.deadletter import DeadLetterArchive
from connector.errors import Disposition
from connector.http import HttpEndpoint
from connector.loopback import LoopbackPop3Server
from connector.metrics import Metrics
from connector.runtime import Runtime, build_runtime
from connector.service import AccountState, CycleResult, open_service


def _runtime(tmp_path: Path, port: int, password: str = "wrong") -> Runtime:  # noqa: S107
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[service]
state_dir = "{tmp_path / "state"}"
[smtp]
host = "127.0.0.1"
port = 1
tls = "none"
helo_name = "connector.test"
[[accounts]]
name = "info"
host = "127.0.0.1"
port = {port}
tls = "none"
username = "u"
password = "{password}"
deliver_to = ["info@firma.test"]
"""
    )
    config.chmod(0o600)
    return build_runtime(load_settings(config))


async def _until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class CountingStore:
    """Wraps the service's store; counts what /status could cost."""

    def __init__(self, store: DeadLetterArchive) -> None:
        self.store = store
        self.counts = 0

    async def count_by_account(self) -> dict[str, int]:
        self.counts += 1
        return await self.store.count_by_account()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def _get(endpoint: HttpEndpoint, target: str) -> bytes:
    host, port = endpoint.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


async def _post(endpoint: HttpEndpoint, target: str) -> tuple[int, dict[str, Any]]:
    host, port = endpoint.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


async def test_posts_to_poll_do_not_log_in_again_with_a_wrong_password(tmp_path: Path) -> None:
    async with LoopbackPop3Server({"u": "right"}, auth_error_code="AUTH") as pop:
        runtime = _runtime(tmp_path, pop.port)
        async with open_service(runtime) as service, HttpEndpoint(service) as endpoint:
            await endpoint.start("127.0.0.1", 0)
            serving = asyncio.create_task(service.serve())
            state = service.accounts["info"]
            await _until(lambda: state.last is not None, "the first cycle")
            assert state.failing  # -ERR [AUTH]: parked, next try in an hour or more
            assert pop.sessions == 1
            first = state.last

            for target in ["/poll"] * 19 + ["/poll?account=info"]:
                status, doc = await _post(endpoint, target)
                assert status == 202
                assert doc["polling"] == []
                (held,) = doc["held_back"]
                assert held["account"] == "info"
                assert held["until"] == service_module.rfc3339(state.next_poll)

            # SIGUSR1 is the administrator's own "try now": it still polls at once.
            assert service.poll_now(force=True) == (["info"], {})
            await _until(lambda: state.last is not first, "the forced cycle")
            service.stopping.set()
            await asyncio.wait_for(serving, 10)
        assert pop.sessions == 2  # the first cycle and the forced one; none for the 20 POSTs


async def test_a_poll_asked_for_during_a_failing_cycle_waits_for_the_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = _runtime(tmp_path, 1)
    async with open_service(runtime) as service:
        cycles: list[float] = []
        started, release = asyncio.Event(), asyncio.Event()

        async def failing_cycle(state: AccountState) -> CycleResult:
            cycles.append(service.clock())
            started.set()
            await release.wait()
            state.failures += 1
            result = CycleResult("info", False, CycleStats(), 0.0, "-ERR", Disposition.RETRY)
            state.next_poll = service.clock() + service.delay_after(state, result)
            return result

        waiting = asyncio.Event()
        wait_any = service_module._wait_any

        async def spy(events: list[asyncio.Event], seconds: float) -> None:
            waiting.set()  # the loop has finished its cycle(s) and sleeps until the next poll
            await wait_any(events, seconds)

        monkeypatch.setattr(service, "_cycle", failing_cycle)
        monkeypatch.setattr(service_module, "_wait_any", spy)
        serving = asyncio.create_task(service.serve())
        await asyncio.wait_for(started.wait(), 10)
        # Not failing yet while its first cycle runs: woken, to poll again after it ...
        assert service.poll_now() == (["info"], {})
        release.set()
        await asyncio.wait_for(waiting.wait(), 10)
        # ... but that cycle failed, so the backoff stands.
        assert len(cycles) == 1
        state = service.accounts["info"]
        assert not state.poll_now.is_set()
        assert state.next_poll is not None
        assert service.poll_now() == ([], {"info": state.next_poll})
        service.stopping.set()
        await asyncio.wait_for(serving, 10)


async def test_status_requests_do_not_count_the_dead_letters_anew(tmp_path: Path) -> None:
    async with LoopbackPop3Server({"u": "right"}) as pop:
        runtime = _runtime(tmp_path, pop.port, password="right")
        async with open_service(runtime, metrics=Metrics()) as service:
            store = CountingStore(service.store)
            service.store = store
            async with HttpEndpoint(service) as endpoint:
                await endpoint.start("127.0.0.1", 0)
                await service.refresh_backlog()  # as `run` does at start
                for _ in range(10):
                    assert (await _get(endpoint, "/status")).startswith(b"HTTP/1.1 200 ")
                assert store.counts == 1
                # A cycle adds what it stores itself: no count of the whole store per cycle.
                await service.run_cycle("info")
                assert store.counts == 1
                data = await _get(endpoint, "/status")
                (account,) = json.loads(data.partition(b"\r\n\r\n")[2])["accounts"]
                assert account["result"] == "ok"
                assert store.counts == 1
