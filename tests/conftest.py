"""Session-wide real servers: one Dovecot (and, when a test asks, one Postfix, Courier, mailutils
pop3d and popa3d) for the whole run; aiosmtpd sinks per test."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator

import pytest
import trustme

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

# aiosmtpd logs every connection at INFO; keep test output about our code.
logging.getLogger("mail.log").setLevel(logging.WARNING)


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
