"""connector.sdnotify and ``run`` under Type=notify: real unix datagram sockets as NOTIFY_SOCKET
(what reads no socket is tests/unit/test_sdnotify.py).

What systemd would receive: READY=1 once ``run`` polls, WATCHDOG=1 from the event loop while
the scheduler lives (and none while the loop is frozen, or once the scheduler is dead), and
STOPPING=1 when a stop begins.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.sdnotify import SystemdNotifier


class Listener:
    """A bound AF_UNIX datagram socket, read by a thread; each datagram with its arrival time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._changed:
                self.received.append((time.monotonic(), data.decode()))
                self._changed.notify_all()

    def wait_for(self, text: str, count: int = 1, timeout: float = 30.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count(text) >= count, timeout)

    def count(self, text: str) -> int:
        return sum(text in message.split("\n") for _, message in self.received)

    def times(self, text: str) -> list[float]:
        with self._changed:
            return [t for t, message in self.received if text in message.split("\n")]

    def close(self) -> None:
        self._open = False
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    sock = Listener(str(tmp_path / "notify.sock"))
    try:
        yield sock
    finally:
        sock.close()


def test_a_notification_is_one_datagram(listener: Listener) -> None:
    notifier = SystemdNotifier(listener.address)
    assert notifier.notify("READY=1", "STATUS=polling 2 account(s)")
    assert listener.wait_for("READY=1")
    assert listener.received[0][1] == "READY=1\nSTATUS=polling 2 account(s)"


def test_the_abstract_namespace_is_spoken_too() -> None:
    name = f"@pop3-connector-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract = Listener(name)
    try:
        assert SystemdNotifier(name).notify("READY=1")
        assert abstract.wait_for("READY=1")
    finally:
        abstract.close()


def test_a_missing_socket_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens"))
    assert not notifier.notify("WATCHDOG=1")
    assert not notifier.notify("WATCHDOG=1")
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1


async def test_watchdog_pings_only_while_the_scheduler_lives_and_the_loop_runs(
    listener: Listener,
) -> None:
    notifier = SystemdNotifier(listener.address, watchdog=0.1)  # a ping every 0.05 s
    sent: list[tuple[str, ...]] = []
    pinged, asked = asyncio.Event(), asyncio.Event()
    notify = notifier.notify

    def recording(*assignments: str) -> bool:
        sent.append(assignments)
        pinged.set()
        return notify(*assignments)

    notifier.notify = recording  # type: ignore[method-assign]
    alive = {"now": True}

    def is_alive() -> bool:
        asked.set()
        return alive["now"]

    pinging = asyncio.create_task(notifier.keep_alive(is_alive))
    try:
        await asyncio.to_thread(listener.wait_for, "WATCHDOG=1", 3)
        # A frozen loop sends nothing: systemd sees the silence and restarts the process.
        time.sleep(0.5)  # noqa: ASYNC251 (the point: block the event loop)
        await asyncio.to_thread(listener.wait_for, "WATCHDOG=1", 4)
        times = listener.times("WATCHDOG=1")
        assert max(b - a for a, b in itertools.pairwise(times)) >= 0.45
        # A dead scheduler in a live loop: asked, and no ping.
        alive["now"] = False
        pings = len(sent)
        for _ in range(3):
            asked.clear()
            await asyncio.wait_for(asked.wait(), 5)
        assert len(sent) == pings
        alive["now"] = True
        pinged.clear()
        await asyncio.wait_for(pinged.wait(), 5)
        assert sent[-1] == ("WATCHDOG=1",)
    finally:
        pinging.cancel()


def test_run_tells_systemd_ready_alive_and_stopping(tmp_path: Path, listener: Listener) -> None:
    closed = socket.socket()  # an address nobody listens on: the account's cycles fail, fine
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[service]
state_dir = "{tmp_path / "state"}"
[metrics]
listen = ""
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
password = "p"
deliver_to = ["info@firma.test"]
"""
    )
    config.chmod(0o600)
    env = {**os.environ, "NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector", "--config", str(config), "run"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert listener.wait_for("READY=1"), listener.received
        assert listener.wait_for("WATCHDOG=1", 3), listener.received
        ready = listener.times("READY=1")[0]
        assert all(t >= ready for t in listener.times("WATCHDOG=1"))
        assert listener.count("STOPPING=1") == 0
        proc.send_signal(signal.SIGTERM)
        assert listener.wait_for("STOPPING=1"), listener.received
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")
