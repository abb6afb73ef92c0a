"""A host that says "not now" for real: Dovecot's ``-ERR [IN-USE]`` (RFC 2449 §8.1.2) and a
refused TCP connection pause the host (docs/design.md §10.2).

The IN-USE answer comes from a private Dovecot with ``pop3_lock_session = yes``: while one
session of a user is logged in, Dovecot answers the next login of that user ``-ERR [IN-USE]
Mailbox is locked by another POP3 session.`` (after waiting about ten seconds for the lock, a
wait of its own that no setting shortens).  The same Dovecot also listens on 127.0.0.2, which
is another host for the per-host limit: the one that must not suffer for the first.  The
loopback tests (tests/component/test_service_politeness.py) cover LOGIN-DELAY and the pauses over
time; connector.schedule's own tests (tests/unit/test_schedule.py) the real pause durations.
"""

from __future__ import annotations

import asyncio
import poplib
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector import schedule
from connector.config import load_settings
from connector.runtime import Runtime, build_runtime
from connector.service import Service, open_service
from tests.servers import DovecotServer, start_dovecot, stop_dovecot

pytestmark = pytest.mark.integration

PAUSE = 0.4  # HOST_PAUSE in the test that serves


@pytest.fixture(scope="module")
def locking_dovecot() -> Iterator[DovecotServer]:
    server = start_dovecot("\npop3_lock_session = yes\n")
    try:
        yield server
    finally:
        stop_dovecot(server)


def _runtime(tmp_path: Path, accounts: list[tuple[str, int, str, str]], *, per_host: int,
             interval: str = "1h") -> Runtime:  # fmt: skip
    """``accounts``: (host, port, user, password); each account is named after its user."""
    blocks = "".join(
        f"""
[[accounts]]
name = "{user}"
host = "{host}"
port = {port}
tls = "none"
username = "{user}"
password = "{password}"
deliver_to = ["{user}@firma.test"]
"""
        for host, port, user, password in accounts
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\npoll_interval = "{interval}"\n'
        f"max_parallel_accounts = 8\nmax_sessions_per_host = {per_host}\n"
        f'[smtp]\nhost = "127.0.0.1"\nport = 1\ntls = "none"\nhelo_name = "c.test"\n{blocks}'
    )
    config.chmod(0o600)
    return build_runtime(load_settings(config))


def _logins(dovecot: DovecotServer) -> list[str]:
    """The users Dovecot logged in, in order, from its log."""
    log = (dovecot.root / "dovecot.log").read_text(errors="replace")
    return re.findall(r"pop3-login: Info: Login: user=<([^>]*)>", log)


async def test_in_use_from_dovecot_leaves_the_host_alone_in_this_run(
    tmp_path: Path, locking_dovecot: DovecotServer
) -> None:
    """``once``, one session at a time on 127.0.0.1: the first account's mailbox is locked by
    another client, Dovecot answers IN-USE, and the host's other accounts are left for the
    next run instead of being logged in one after another.  127.0.0.2's accounts poll."""
    d = locking_dovecot
    port = d.ports["pop3"]
    (locked, pw), *rest = [d.add_user() for _ in range(6)]
    others = [u for u, _ in rest[:3]]
    elsewhere = [u for u, _ in rest[3:]]
    accounts = [("127.0.0.1", port, u, pw) for u in [locked, *others]]
    accounts += [("127.0.0.2", port, u, pw) for u in elsewhere]
    runtime = _runtime(tmp_path, accounts, per_host=1)
    holder = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        holder.user(locked)
        holder.pass_(pw)  # holds the lock (pop3_lock_session)
        before = len(_logins(d))
        async with open_service(runtime) as service:
            results = {r.account: r for r in await service.run_once()}
    finally:
        holder.quit()
    assert not results[locked].ok
    assert "[IN-USE]" in (results[locked].error or ""), results[locked].error
    for u in others:
        error = results[u].error or ""
        assert error.startswith("not started: 127.0.0.1 asked us to slow down"), error
        assert "IN-USE" in error
    for u in elsewhere:
        assert results[u].ok, results[u].error
    # Dovecot logged the locked user in (the password was right; the lock failed after it)
    # and the other host's accounts; not one of the accounts left alone.
    logged_in = _logins(d)[before:]
    assert not set(others) & set(logged_in), logged_in
    assert set(elsewhere) <= set(logged_in), logged_in


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 bound but not listening: every connection is refused (RST)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


async def test_refused_connections_pause_the_host_and_spare_the_other(
    tmp_path: Path,
    locking_dovecot: DovecotServer,
    refusing_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten accounts on a host that refuses every connection, two on Dovecot at 127.0.0.2,
    each polling every second: the refusing host gets a few attempts (the pauses doubling
    from 0.4 s), not ten a second, while the other host's accounts poll all along."""
    monkeypatch.setattr(schedule, "HOST_PAUSE", PAUSE)
    monkeypatch.setattr(schedule, "START_SPACING", 0.0)  # every account due at once
    d = locking_dovecot
    users = [d.add_user() for _ in range(2)]
    accounts = [("127.0.0.1", refusing_port, f"down{i}", "pw") for i in range(10)]
    accounts += [("127.0.0.2", d.ports["pop3"], u, pw) for u, pw in users]
    runtime = _runtime(tmp_path, accounts, per_host=2, interval="1s")
    starts: list[tuple[float, str]] = []
    async with open_service(runtime) as service:
        take = service.plan.take

        def counting_take(now: float) -> list[str]:
            names = take(now)
            starts.extend((time.monotonic(), n) for n in names)
            return names

        monkeypatch.setattr(service.plan, "take", counting_take)

        def polled(prefix: str) -> list[float]:
            return [t for t, n in starts if n.startswith(prefix)]

        await _serve_until(service, lambda: len(polled("user")) >= 8, "four rounds on Dovecot")
        paused = service.plan.paused(time.time())
    down = polled("down")
    # In ~4 s: the first two (the limit), then one probe after each pause (0.4, 0.8, 1.6 s):
    # a handful, where ten accounts on their own backoff would have tried twenty times or more.
    assert 2 <= len(down) <= 7, down
    assert all(t >= down[1] + PAUSE for t in down[2:]), down
    assert "127.0.0.1" in paused
    # asyncio words ECONNREFUSED "Connect call failed (host, port)".
    assert "cannot connect to 127.0.0.1" in (paused["127.0.0.1"][1] or ""), paused


async def _serve_until(service: Service, condition: Callable[[], bool], what: str) -> None:
    serving = asyncio.create_task(service.serve())
    try:
        end = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            assert not serving.done(), serving
            await asyncio.sleep(0.01)
    finally:
        service.stopping.set()
        await asyncio.wait_for(serving, 30)
