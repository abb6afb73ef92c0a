"""The IMAP client (connector/imap/client.py) against the built-in loopback IMAP server
(connector/loopback_imap.py): logins (LOGIN, AUTHENTICATE PLAIN, XOAUTH2), STARTTLS, the
transcript.  The session and the IDLE watcher are in test_imap_session.py and
test_imap_idle.py; the same against Dovecot in tests/integration/test_imap_accounts.py and
test_imap_idle.py."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

from connector.errors import (
    Disposition,
    ImapAuthError,
    Pop3TlsError,
    classify,
)
from connector.imap import ImapAuth, ImapOptions
from connector.imap.client import ImapClient
from connector.imap.session import ImapSession
from connector.loopback_imap import LoopbackImapServer
from connector.pop3 import Pop3Endpoint
from connector.tls import TlsMode

USER, PASSWORD = "info@firma.example", 'pä"ss wört'
TOKEN = "ya29.token-value"


def mail(i: int) -> bytes:
    return f"Subject: message {i}\r\nMessage-ID: <{i}@x>\r\n\r\nbody {i}\r\n".encode()


@pytest.fixture
async def server() -> AsyncIterator[LoopbackImapServer]:
    async with LoopbackImapServer({USER: PASSWORD}, xoauth2_tokens={USER: TOKEN}) as srv:
        yield srv


def endpoint(srv: LoopbackImapServer, tls: TlsMode = TlsMode.NONE, **kw: object) -> Pop3Endpoint:
    return Pop3Endpoint("127.0.0.1", srv.port, tls, **kw)  # type: ignore[arg-type]


async def session(
    srv: LoopbackImapServer, *, auth: ImapAuth = ImapAuth.AUTO, keep: bool = False
) -> ImapSession:
    s = await ImapSession.connect(endpoint(srv), options=ImapOptions(auth=auth), keep=keep)
    try:
        await s.login(USER, PASSWORD)
    except BaseException:
        await s.close()
        raise
    return s


@pytest.mark.parametrize("auth", [ImapAuth.AUTO, ImapAuth.LOGIN, ImapAuth.PLAIN])
async def test_logins_with_an_8bit_password(server: LoopbackImapServer, auth: ImapAuth) -> None:
    async with await session(server, auth=auth) as s:
        assert await s.stat() == (0, 0)
    expected = {ImapAuth.AUTO: "AUTHENTICATE", ImapAuth.PLAIN: "AUTHENTICATE"}
    assert expected.get(auth, "LOGIN") in server.commands


async def test_authenticate_plain_without_sasl_ir(server: LoopbackImapServer) -> None:
    server.sasl_ir = False
    async with await session(server, auth=ImapAuth.PLAIN) as s:
        assert s.uidvalidity > 0


async def test_a_wrong_password_is_an_auth_error_that_parks(server: LoopbackImapServer) -> None:
    client = await ImapClient.connect(endpoint(server))
    async with client:
        with pytest.raises(ImapAuthError) as err:
            await client.login(USER, "wrong", ImapAuth.LOGIN)
    assert err.value.resp_code == "AUTHENTICATIONFAILED"
    assert classify(err.value) is Disposition.PARK_ACCOUNT
    assert "wrong" not in str(err.value)


@pytest.mark.parametrize("sasl_ir", [True, False])
async def test_xoauth2_with_a_token_source(server: LoopbackImapServer, sasl_ir: bool) -> None:
    server.sasl_ir = sasl_ir

    async def token() -> str:
        return TOKEN

    client = await ImapClient.connect(endpoint(server))
    async with client:
        await client.login(USER, token, ImapAuth.XOAUTH2)
        await client.select("INBOX")


async def test_a_refused_xoauth2_token_is_named_but_never_shown(
    server: LoopbackImapServer,
) -> None:
    client = await ImapClient.connect(endpoint(server))
    async with client:
        with pytest.raises(ImapAuthError) as err:
            await client.login(USER, "expired-token-value", ImapAuth.XOAUTH2)
    assert "status 401" in str(err.value)
    assert "expired-token-value" not in str(err.value)


async def test_starttls_and_its_requirement(tmp_path: object) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with LoopbackImapServer({USER: PASSWORD}, ssl_context=server_ctx) as srv:
        client = await ImapClient.connect(endpoint(srv, TlsMode.STARTTLS, ssl_context=client_ctx))
        async with client:
            assert client.tls_active
            assert "STARTTLS" not in client.capabilities  # asked again after the handshake
            await client.login(USER, PASSWORD)
        # An untrusted certificate is a TLS error: it parks the account.
        with pytest.raises(Pop3TlsError) as err:
            await ImapClient.connect(endpoint(srv, TlsMode.STARTTLS))
        assert classify(err.value) is Disposition.PARK_ACCOUNT
    async with LoopbackImapServer({USER: PASSWORD}) as plain:
        with pytest.raises(Pop3TlsError, match="does not offer STARTTLS"):
            await ImapClient.connect(endpoint(plain, TlsMode.STARTTLS, ssl_context=client_ctx))


async def test_the_transcript_hides_the_password(
    server: LoopbackImapServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "t")
    for auth in (ImapAuth.LOGIN, ImapAuth.PLAIN):
        client = await ImapClient.connect(endpoint(server), transcript=logging.getLogger("t"))
        async with client:
            await client.login(USER, PASSWORD, auth)
    assert "LOGIN ****" in caplog.text
    assert "AUTHENTICATE PLAIN ****" in caplog.text
    assert "wört" not in caplog.text
    assert "cMOk" not in caplog.text  # nor its base64
