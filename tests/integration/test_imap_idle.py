"""An IMAP account waiting in IDLE (RFC 2177) against the real Dovecot: new mail is delivered
while the service waits, IDLE is renewed, a connection dropped during IDLE is reopened, and
SIGTERM ends IDLE with DONE and LOGOUT (docs/design.md §15.3).

The service runs in-process (``Service.serve``), except for the SIGTERM test, which needs a real
process to signal.  Traffic to Dovecot goes through a :class:`~tests.faults.FaultProxy`, which
counts the watcher's commands and drops its connection on cue.  Every wait has a deadline far
below the poll interval (10 minutes), so mail that arrives in time came by push, not by poll.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from connector.config import load_settings
from connector.metrics import Metrics
from connector.runtime import build_runtime
from connector.service import Service, open_service
from tests.faults import Action, Direction, Fault, FaultProxy
from tests.integration.conftest import Setup, strip_trace
from tests.integration.test_cycle import message
from tests.servers import DovecotServer

pytestmark = pytest.mark.integration

DEADLINE = 20.0  # seconds: generous for a loaded machine, far below the 10-minute poll


class Wire:
    """What the client sent through the proxy, as a growing byte string, and a condition."""

    def __init__(self) -> None:
        self.up = bytearray()
        self.down = bytearray()
        self.changed = threading.Condition()

    def __call__(self, direction: Direction, data: bytes) -> None:
        with self.changed:
            (self.up if direction is Direction.UP else self.down).extend(data)
            self.changed.notify_all()

    def count(self, needle: bytes, *, down: bool = False) -> int:
        with self.changed:
            return bytes(self.down if down else self.up).count(needle)

    def wait_for(self, needle: bytes, n: int = 1, *, down: bool = False) -> None:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: bytes(self.down if down else self.up).count(needle) >= n, DEADLINE
            )
        assert ok, f"{needle!r} x{n} not seen within {DEADLINE} s"


def proxied_setup(factory: Callable[..., Setup], proxy: FaultProxy, extra: str = "") -> Setup:
    s = factory(
        protocol="imap",
        service_extra='poll_interval = "10m"',
        account_extra=extra,
    )
    s.config.write_text(
        s.config.read_text().replace(f"port = {s.dovecot.ports['imap']}", f"port = {proxy.port}")
    )
    return s


@asynccontextmanager
async def serving(s: Setup) -> AsyncIterator[Service]:
    runtime = build_runtime(load_settings(s.config))
    async with open_service(runtime, metrics=Metrics()) as service:
        task = asyncio.create_task(service.serve())
        try:
            yield service
        finally:
            service.stopping.set()
            await asyncio.wait_for(task, DEADLINE)


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` within DEADLINE.  Polled: the sink and the metrics are set from
    other threads and tasks that signal nothing we could wait on."""
    async with asyncio.timeout(DEADLINE):
        while not condition():  # noqa: ASYNC110 (see the docstring)
            await asyncio.sleep(0.02)


async def received(s: Setup, n: int) -> None:
    """Wait for the sink to hold n messages (a deadline far below the poll interval)."""
    await until(lambda: len(s.received()) >= n)


async def deliver(s: Setup, raw: bytes) -> None:
    await asyncio.to_thread(s.dovecot.deliver, s.user, raw)


def idle_gauge(service: Service) -> float | None:
    assert service.metrics is not None
    return service.metrics.registry.get_sample_value(
        "pop3_connector_idle_connected", {"account": "info"}
    )


async def test_new_mail_arrives_while_the_service_waits_in_idle(
    setup_factory: Callable[..., Setup], dovecot: DovecotServer
) -> None:
    wire = Wire()
    with FaultProxy(("127.0.0.1", dovecot.ports["imap"]), observer=wire) as proxy:
        s = proxied_setup(setup_factory, proxy)
        s.dovecot.deliver(s.user, message(0))
        async with serving(s) as service:
            await received(s, 1)  # the first cycle
            await until(lambda: idle_gauge(service) == 1.0)
            for i in (1, 2, 3):
                await deliver(s, message(i))
                await received(s, i + 1)
        assert [strip_trace(m.data) for m in s.received()] == [message(i) for i in range(4)]
        assert s.upstream() == []
        # Two logins: the first cycle's, and the watcher's, on whose connection every later
        # cycle ran (DONE, the cycle, IDLE again): one per message at least (the watcher's
        # look after connecting may be the first of them when message 1 is announced within
        # PUSH_GAP of it, docs/design.md §15.3); at the stop DONE if it was idling, LOGOUT.
        assert wire.count(b" AUTHENTICATE PLAIN ") == 2
        assert wire.count(b" SELECT ") == 2
        assert wire.count(b" LOGOUT\r\n") == 2
        assert wire.count(b"DONE\r\n") >= 3
        assert idle_gauge(service) == 0.0


async def test_idle_is_renewed(setup_factory: Callable[..., Setup], dovecot: DovecotServer) -> None:
    wire = Wire()
    with FaultProxy(("127.0.0.1", dovecot.ports["imap"]), observer=wire) as proxy:
        s = proxied_setup(setup_factory, proxy, 'idle_renewal = "1s"')
        async with serving(s):
            await asyncio.to_thread(wire.wait_for, b"+ idling", 4, down=True)
            renewals = wire.count(b"DONE\r\n")
            assert renewals >= 3
            assert wire.count(b" SELECT ") == 2  # the first cycle's, the watcher's: renewed on it
            await deliver(s, message(1))
            await received(s, 1)


async def test_a_connection_dropped_during_idle_is_reopened(
    setup_factory: Callable[..., Setup],
    dovecot: DovecotServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dovecot's "+ idling" reaches the watcher, then the connection is cut.  The watcher
    reconnects (here at once: the backoff after a short-lived connection is the unit tests'
    subject), looks for mail it may have missed, and waits in IDLE again."""
    monkeypatch.setattr("connector.imap.idle.HEALTHY_AFTER", 0.0)
    wire = Wire()
    # Connection 0 is the first cycle's, 1 the watcher's first: cut that one.
    cut = Fault(Action.CUT, Direction.DOWN, after_pattern=b"+ idling\r\n", connection=1)
    with FaultProxy(("127.0.0.1", dovecot.ports["imap"]), cut, observer=wire) as proxy:
        s = proxied_setup(setup_factory, proxy)
        async with serving(s):
            await asyncio.to_thread(proxy.triggered.wait, DEADLINE)
            assert proxy.triggered.is_set()
            await asyncio.to_thread(wire.wait_for, b"+ idling", 2, down=True)
            await deliver(s, message(1))
            await received(s, 1)
        assert proxy.connections >= 3  # the first cycle's, the watcher's cut one, its new one


def test_sigterm_ends_idle_with_done_and_logout(
    setup_factory: Callable[..., Setup], dovecot: DovecotServer, tmp_path: Path
) -> None:
    wire = Wire()
    with FaultProxy(("127.0.0.1", dovecot.ports["imap"]), observer=wire) as proxy:
        s = proxied_setup(setup_factory, proxy)
        log = tmp_path / "run.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "connector", "--config", str(s.config), "run"],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            try:
                wire.wait_for(b"+ idling", 1, down=True)
                logouts = wire.count(b" LOGOUT\r\n")  # the cycles' so far
                started = time.monotonic()
                os.kill(proc.pid, signal.SIGTERM)
                assert proc.wait(timeout=DEADLINE) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert time.monotonic() - started < DEADLINE
        up = bytes(wire.up)
        # After the watcher's IDLE: DONE, then LOGOUT, each answered (the process exits 0).
        idle_at = up.rindex(b" IDLE\r\n")
        assert up.index(b"DONE\r\n", idle_at) < up.index(b" LOGOUT\r\n", idle_at)
        assert wire.count(b" LOGOUT\r\n") == logouts + 1
        assert b"Logout completed" in bytes(wire.down)[-300:]
        assert "Traceback" not in log.read_text()
