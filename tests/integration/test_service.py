"""The service as an administrator runs it: ``check``, bad configs, the lock, signals."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from aiosmtpd.smtp import Envelope

from connector.service import StateLock
from tests.integration.conftest import Setup, strip_trace
from tests.integration.test_cycle import message

pytestmark = pytest.mark.integration


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a condition (not a sleep-and-hope: it fails loudly if the condition never holds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class StderrWatcher:
    """Reads a child's standard error in a thread so a test can wait for a log line."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._changed:
                self._lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()
        with self._changed:
            self._lines.append("<EOF>")
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 30.0) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: any(text in line for line in self._lines) or "<EOF>" in self._lines,
                timeout,
            ) and any(text in line for line in self._lines)

    def join(self) -> None:
        self._thread.join(timeout=10)

    def text(self) -> str:
        with self._changed:
            return "".join(self._lines)


@contextlib.contextmanager
def running(config: Path) -> Iterator[tuple[subprocess.Popen[bytes], StderrWatcher]]:
    """``pop3-connector run`` as a child process; killed (if still alive) and reaped on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector", "--config", str(config), "run"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    watcher = StderrWatcher(proc)
    try:
        yield proc, watcher
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        watcher.join()
        assert proc.stderr is not None
        proc.stderr.close()


def test_check_prints_the_config_with_secrets_masked(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup_factory(smtp_extra='username = "relay"\npassword = "smtp-s3cret"')
    assert s.run("check") == 0
    out = capsys.readouterr()
    assert "[[accounts]]" in out.out
    assert s.password not in out.out + out.err
    assert "smtp-s3cret" not in out.out + out.err
    assert "********" in out.out


def test_bad_config_exits_78_naming_each_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from connector.cli import main

    config = tmp_path / "bad.toml"
    config.write_text(
        '[smtp]\nhost = "x"\n\n[[accounts]]\nname = "a"\nhost = "h"\nport = 99999\n'
        'username = "u"\npassword = "hunter2-secret"\ndeliver_to = []\ncolour = "blue"\n'
    )
    assert main(["--config", str(config), "once"]) == 78
    err = capsys.readouterr().err
    assert 'accounts[0] (name "a").port' in err
    assert 'accounts[0] (name "a").deliver_to' in err
    assert 'accounts[0] (name "a").colour' in err
    assert "hunter2-secret" not in err
    assert "Traceback" not in err


def test_missing_config_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from connector.cli import main

    assert main(["--config", str(tmp_path / "nope.toml"), "check"]) == 78
    assert "not found" in capsys.readouterr().err


def test_second_instance_on_the_same_state_refuses_to_start(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup_factory()
    s.dovecot.deliver_many(s.user, [message(1)])
    with StateLock(s.state_dir):
        assert s.run("once") == 75
    assert "would deliver every message twice" in capsys.readouterr().err
    assert s.received() == []
    assert s.run("once") == 0  # the lock is gone with its holder
    assert len(s.received()) == 1


def test_sigterm_finishes_the_message_in_flight_then_quits(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory()
    raws = [message(i) for i in range(5)]
    s.dovecot.deliver_many(s.user, raws)
    in_flight = threading.Event()
    release = threading.Event()

    def hold_second(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
        if stage == "data" and data is not None and b"Subject: message 1\r\n" in data:
            in_flight.set()
            release.wait(30)  # Exchange takes its time with message 1
        return None

    s.sink.handler.rule = hold_second
    with running(s.config) as (proc, log):
        try:
            assert in_flight.wait(30), "the connector never reached message 1"
            proc.send_signal(signal.SIGTERM)
            assert log.wait_for("received SIGTERM"), log.text()
        finally:
            release.set()  # Exchange answers 250 only now, after the signal was handled
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.text()
    assert [strip_trace(m.data) for m in s.received()] == raws[:2]
    assert len(s.upstream()) == 3  # the two delivered were deleted: QUIT went out
    assert log.wait_for("stopped"), log.text()


def cycles_recorded(s: Setup) -> int:
    """Accounts with a recorded cycle; 0 while the ledger is not there or not yet migrated."""
    if not (s.state_dir / "ledger.sqlite3").exists():
        return 0
    try:
        with contextlib.closing(s.ledger()) as db:
            count: int = db.execute("SELECT count(*) FROM accounts").fetchone()[0]
            return count
    except sqlite3.OperationalError:  # the file exists, the schema does not yet
        return 0


def test_sigusr1_polls_now(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory(service_extra='poll_interval = "1h"')
    with running(s.config) as (proc, log):
        wait_until(lambda: cycles_recorded(s) == 1, "the first cycle to finish")
        s.dovecot.deliver_many(s.user, [message(7)])
        os.kill(proc.pid, signal.SIGUSR1)
        wait_until(lambda: len(s.received()) == 1, "the message polled by SIGUSR1")
        wait_until(lambda: s.upstream() == [], "the DELE and QUIT")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.text()
    assert strip_trace(s.received()[0].data) == message(7)
