"""Session-wide real servers: one Dovecot (and, when a test asks, one Postfix, Courier, mailutils
pop3d and popa3d) for the whole run; aiosmtpd sinks per test.  And the check that keeps the
layout honest: a test that uses one of those servers is marked ``integration``, and no test under
tests/unit/ or tests/component/ is (README, Development).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
import trustme
from hypothesis import settings

from tests.mailservers import (
    CourierServer,
    MailutilsServer,
    Popa3dServer,
    PostfixServer,
    start_courier,
    start_mailutils,
    start_popa3d,
    start_postfix,
    stop_courier,
    stop_mailutils,
    stop_popa3d,
    stop_postfix,
)
from tests.servers import DovecotServer, SmtpSink, start_dovecot, stop_dovecot

# No per-example deadline for any property test: the suite shares 2 cores with Dovecot, Postfix and
# the sinks, so one example may wait 300 ms for a CPU; timing goals live in bench/ (README,
# Development).  Explicit @settings inherit this.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")

# aiosmtpd logs every connection at INFO; keep test output about our code.
logging.getLogger("mail.log").setLevel(logging.WARNING)

# The fixtures below that start a server in its own process: a test using one of them (directly
# or through another fixture) needs the Debian packages scripts/test installs.
REAL_SERVERS: Final = frozenset({"dovecot", "postfix", "courier", "mailutils", "popa3d"})
_TESTS: Final = Path(__file__).resolve().parent
_WITHOUT_REAL_SERVERS: Final = (_TESTS / "unit", _TESTS / "component")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``-m "not integration"`` must select exactly the tests that need no real server."""
    wrong: list[str] = []
    for item in items:
        marked = item.get_closest_marker("integration") is not None
        uses = sorted(REAL_SERVERS.intersection(getattr(item, "fixturenames", ())))
        if uses and not marked:
            wrong.append(f"{item.nodeid} uses {', '.join(uses)}: mark it integration")
        if marked and any(item.path.is_relative_to(d) for d in _WITHOUT_REAL_SERVERS):
            wrong.append(f"{item.nodeid} is marked integration: it belongs in tests/integration")
    if wrong:
        raise pytest.UsageError("tests in the wrong place or unmarked:\n  " + "\n  ".join(wrong))


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotServer]:
    server = start_dovecot()
    try:
        yield server
    finally:
        stop_dovecot(server)


@pytest.fixture(scope="session")
def postfix(dovecot: DovecotServer) -> Iterator[PostfixServer]:
    """Postfix as the MTA in front of Exchange (its SASL AUTH asks ``dovecot``)."""
    server = start_postfix(dovecot)
    try:
        yield server
    finally:
        stop_postfix(server)


@pytest.fixture(scope="session")
def courier() -> Iterator[CourierServer]:
    server = start_courier()
    try:
        yield server
    finally:
        stop_courier(server)


@pytest.fixture(scope="session")
def mailutils() -> Iterator[MailutilsServer]:
    server = start_mailutils()
    try:
        yield server
    finally:
        stop_mailutils(server)


@pytest.fixture(scope="session")
def popa3d() -> Iterator[Popa3dServer]:
    server = start_popa3d()
    try:
        yield server
    finally:
        stop_popa3d(server)


@pytest.fixture
def mailbox(dovecot: DovecotServer) -> tuple[str, str]:
    """A fresh, empty Dovecot mailbox: (user, password)."""
    return dovecot.add_user()


@pytest.fixture(scope="session")
def smtp_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def smtp_server_context(smtp_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    smtp_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """Plain SMTP sink (no TLS, no AUTH) recording what it accepts."""
    sink = SmtpSink().start()
    try:
        yield sink
    finally:
        sink.stop()
