"""Session-wide real servers: one Dovecot for the whole run, aiosmtpd sinks per test."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator

import pytest
import trustme

from tests.servers import DovecotServer, SmtpSink, start_dovecot, stop_dovecot

# aiosmtpd logs every connection at INFO; keep test output about our code.
logging.getLogger("mail.log").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotServer]:
    server = start_dovecot()
    try:
        yield server
    finally:
        stop_dovecot(server)


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
