"""What one account's cycle costs beside its POP3 session (bench/README.md, "fleet"): the
backlog gauges of that account only (not a recount of every account after every cycle), the
dead letters it stored added to the count (not a recount of the store), one log line at info only
when mail moved or the cycle failed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from connector.config import load_settings
from connector.deadletter import DeadLetterArchive
from connector.loopback import LoopbackPop3Server, LoopbackSmtpSink
from connector.metrics import Metrics
from connector.runtime import Runtime, build_runtime
from connector.service import open_service

MESSAGE = b"From: a@customer.test\r\nTo: info@firma.test\r\nSubject: hi\r\n\r\nHello.\r\n"


def _runtime(tmp_path: Path, pop3: int, smtp: int, users: list[str]) -> Runtime:
    blocks = "".join(
        f"""
[[accounts]]
name = "{user}"
host = "127.0.0.1"
port = {pop3}
tls = "none"
username = "{user}"
password = "pw"
deliver_to = ["{user}@firma.test"]
"""
        for user in users
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp}\ntls = "none"\nhelo_name = "c.test"\n'
        f"{blocks}"
    )
    config.chmod(0o600)
    return build_runtime(load_settings(config))


class CountingStore:
    """Wraps the service's store; counts whole-store counts."""

    def __init__(self, store: DeadLetterArchive) -> None:
        self.store = store
        self.counts = 0

    async def count_by_account(self) -> dict[str, int]:
        self.counts += 1
        return await self.store.count_by_account()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture
async def sink() -> AsyncIterator[LoopbackSmtpSink]:
    def refuse(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        return "554 5.7.1 refused" if stage == "data" else None

    async with LoopbackSmtpSink(refuse) as server:
        yield server


async def test_a_cycle_sets_its_own_gauges_and_counts_what_it_stored(
    tmp_path: Path, sink: LoopbackSmtpSink
) -> None:
    users = ["info", "sales"]
    async with LoopbackPop3Server(dict.fromkeys(users, "pw"), {"info": [MESSAGE]}) as pop:
        runtime = _runtime(tmp_path, pop.port, sink.port, users)
        metrics = Metrics()
        async with open_service(runtime, metrics=metrics) as service:
            store = CountingStore(service.store)
            service.store = store
            await service.refresh_backlog()  # as `run` does at start
            assert store.counts == 1
            get = metrics.registry.get_sample_value
            # Stand-ins the cycle of "info" must not touch: set as if from long ago.
            metrics.account_backlog("sales", 7, 9)

            result = await service.run_cycle("info")
            assert result.ok
            assert result.stats.dead_lettered == 1
            assert get("pop3_connector_dead_letters", {"account": "info"}) == 1
            assert get("pop3_connector_deferred_messages", {"account": "info"}) == 0
            assert service.dead_letter_counts == {"info": 1}
            assert store.counts == 1  # counted as stored: the store was not counted again
            assert get("pop3_connector_dead_letters", {"account": "sales"}) == 9
            assert get("pop3_connector_deferred_messages", {"account": "sales"}) == 7

            await service.refresh_backlog()  # the timer's (or a SIGHUP's) recount
            assert get("pop3_connector_dead_letters", {"account": "sales"}) == 0
            assert get("pop3_connector_dead_letters", {"account": "info"}) == 1


async def test_an_idle_cycle_logs_at_debug_a_busy_one_at_info(
    tmp_path: Path, sink: LoopbackSmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    async with LoopbackPop3Server({"info": "pw"}, {"info": [MESSAGE]}) as pop:
        runtime = _runtime(tmp_path, pop.port, sink.port, ["info"])
        async with open_service(runtime) as service:
            caplog.set_level(logging.DEBUG, logger="connector.service")
            await service.run_cycle("info")  # one message, dead-lettered
            await service.run_cycle("info")  # nothing new
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    lines = [(level, text) for level, text in lines if " cycle ok " in text]
    assert [level for level, _ in lines] == [logging.INFO, logging.DEBUG], lines
    assert "dead_lettered=1" in lines[0][1]
    assert "mailbox=0" in lines[1][1]
