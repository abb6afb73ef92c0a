"""A TLS handshake met by a plain-text greeting (``tls = "implicit"`` on a POP3 port 110 or an
SMTP port 25/587) fails with OpenSSL's "wrong version number"; the error says what that most
likely means.  Against Dovecot's plain POP3 port and an aiosmtpd sink without TLS."""

from __future__ import annotations

import pytest

from connector.errors import DeliveryError, Disposition, Pop3TlsError, SmtpStage, classify
from connector.pop3 import Pop3Client, Pop3Endpoint, Pop3Timeouts
from connector.smtp import SmtpDeliverer, SmtpSettings
from connector.tls import TlsMode
from tests.servers import DovecotServer, SmtpSink

TIMEOUTS = Pop3Timeouts(5.0, 5.0, 5.0)
HINT = "the port speaks plain text: implicit TLS against a STARTTLS/plain port?"


@pytest.mark.integration
async def test_pop3_implicit_tls_against_the_plain_port(dovecot: DovecotServer) -> None:
    endpoint = Pop3Endpoint("127.0.0.1", dovecot.ports["pop3"], TlsMode.IMPLICIT)
    with pytest.raises(Pop3TlsError) as info:
        await Pop3Client.connect(endpoint, TIMEOUTS)
    assert "wrong version number" in str(info.value)
    assert HINT in str(info.value)
    assert classify(info.value) is Disposition.PARK_ACCOUNT


@pytest.mark.integration
async def test_pop3_untrusted_certificate_gets_no_such_hint(dovecot: DovecotServer) -> None:
    endpoint = Pop3Endpoint("localhost", dovecot.ports["pop3s"], TlsMode.IMPLICIT)
    with pytest.raises(Pop3TlsError) as info:
        await Pop3Client.connect(endpoint, TIMEOUTS)
    assert "certificate" in str(info.value)
    assert HINT not in str(info.value)


async def test_smtp_implicit_tls_against_a_plain_port() -> None:
    sink = SmtpSink().start()  # plain SMTP, as Exchange's port 25 or 587 before STARTTLS
    try:
        settings = SmtpSettings("127.0.0.1", sink.port, TlsMode.IMPLICIT, None, "c.test", timeout=5)
        async with SmtpDeliverer(settings) as deliverer:
            with pytest.raises(DeliveryError) as info:
                await deliverer.connect()
    finally:
        sink.stop()
    assert info.value.stage is SmtpStage.TLS
    assert str(info.value) == f"TLS handshake failed: WRONG_VERSION_NUMBER ({HINT}) (at tls)"
    assert classify(info.value) is not Disposition.DEAD_LETTER  # the cycle stops, mail waits
