"""The IMAP client (connector/imap/client.py) against the built-in loopback IMAP server
(connector/loopback_imap.py): logins (LOGIN, AUTHENTICATE PLAIN, XOAUTH2), STARTTLS, the
transcript; and against a scripted server, what a broken or hostile one sends (a bad
greeting, STARTTLS refused or followed by injected bytes, BYE, a changed UIDVALIDITY, an ALERT
with control characters).  The session and the IDLE watcher are in test_imap_session.py and
test_imap_idle.py; the same against Dovecot in tests/integration/test_imap_accounts.py and
test_imap_idle.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trustme

from connector.errors import (
    Disposition,
    ImapAuthError,
    Pop3ConnectionError,
    Pop3ProtocolError,
    Pop3TimeoutError,
    Pop3TlsError,
    classify,
)
from connector.imap import ImapAuth, ImapOptions
from connector.imap.client import MAX_KEPT, ImapClient
from connector.imap.protocol import MAX_LINE
from connector.imap.session import ImapSession
from connector.loopback_imap import LoopbackImapServer
from connector.pop3 import Pop3Endpoint, Pop3Timeouts
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


# --------------------------------------------------------------------------------------------
# A hostile or broken server: answers scripted per command (what the loopback server and
# Dovecot never send)
# --------------------------------------------------------------------------------------------

Reply = Callable[[str, str], bytes]  # (the command's tag, its verb and arguments) -> bytes


def answers(overrides: dict[str, str] | None = None) -> Reply:
    """A server that says OK to everything, with a folder of UIDVALIDITY 7; ``overrides``:
    the bytes (``{tag}`` filled in) to answer a verb with instead."""
    normal = {
        "CAPABILITY": "* CAPABILITY IMAP4rev1 STARTTLS\r\n{tag} OK done\r\n",
        "SELECT": "* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n{tag} OK [READ-WRITE] selected\r\n",
        **(overrides or {}),
    }

    def reply(tag: str, command: str) -> bytes:
        verb = command.split(" ", 1)[0].upper()
        return normal.get(verb, "{tag} OK done\r\n").format(tag=tag).encode()

    return reply


@asynccontextmanager
async def scripted(greeting: bytes, reply: Reply) -> AsyncIterator[int]:
    """A loopback server that sends ``greeting``, then answers each command line with
    ``reply``; yields its port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                tag, _, command = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
                writer.write(reply(tag, command))
                await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


def plain(port: int, tls: TlsMode = TlsMode.NONE) -> Pop3Endpoint:
    return Pop3Endpoint("127.0.0.1", port, tls, ssl_context=ssl.create_default_context())


@pytest.mark.parametrize(
    ("greeting", "tls", "overrides", "error", "text"),
    [
        (b"hello there\r\n", TlsMode.NONE, None, Pop3ProtocolError, "no IMAP greeting"),
        (b"* BYE too busy\r\n", TlsMode.NONE, None, Pop3ConnectionError, "BYE: too busy"),
        (
            b"* OK [CAPABILITY IMAP4rev1] hi\r\n",
            TlsMode.STARTTLS,
            None,
            Pop3TlsError,
            "does not offer STARTTLS",
        ),
        (
            b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n",
            TlsMode.STARTTLS,
            None,
            Pop3TlsError,
            "PREAUTH",
        ),
        (
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n",
            TlsMode.STARTTLS,
            {"STARTTLS": "{tag} NO not now\r\n"},
            Pop3TlsError,
            "refused STARTTLS: not now",
        ),
        (
            # RFC 3501 §11.1 / CVE-2011-0411: bytes sent in clear after the answer must not
            # be read as if they came over TLS.
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n",
            TlsMode.STARTTLS,
            {"STARTTLS": "{tag} OK begin\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] forged\r\n"},
            Pop3ProtocolError,
            "data after the STARTTLS answer",
        ),
    ],
)
async def test_a_broken_greeting_or_starttls_fails_the_connect(
    greeting: bytes,
    tls: TlsMode,
    overrides: dict[str, str] | None,
    error: type[Exception],
    text: str,
) -> None:
    async with scripted(greeting, answers(overrides)) as port:
        with pytest.raises(error, match=re.escape(text)):
            await ImapClient.connect(plain(port, tls))


async def test_a_closed_port_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens once it is closed
    with pytest.raises(Pop3ConnectionError, match=r"cannot connect to 127\.0\.0\.1"):
        await ImapClient.connect(plain(port))


@pytest.mark.parametrize(
    ("noop", "error", "text"),
    [
        ("* BYE shutting down\r\n", Pop3ConnectionError, "BYE: shutting down"),
        (
            "* OK [UIDVALIDITY 8] renumbered\r\n{tag} OK done\r\n",
            Pop3ProtocolError,
            "UIDVALIDITY changed during the session",
        ),
        ("+ go on\r\n", Pop3ProtocolError, "unexpected IMAP continuation to NOOP"),
        ("{tag} MAYBE later\r\n", Pop3ProtocolError, "unreadable tagged answer to NOOP"),
    ],
)
async def test_a_broken_answer_in_a_session_ends_it(
    noop: str, error: type[Exception], text: str
) -> None:
    greeting = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"
    async with scripted(greeting, answers({"NOOP": noop})) as port:
        client = await ImapClient.connect(plain(port))
        try:
            await client.login(USER, "secret", ImapAuth.LOGIN)  # quoted: no literal
            await client.select("INBOX")
            with pytest.raises(error, match=re.escape(text)):
                await client.noop()
            assert client.closed  # poisoned: nothing else is read from this server
        finally:
            await client.close()


@pytest.mark.parametrize(
    "code",
    [
        "UIDVALIDITY \u00b2",  # str.isdigit() says yes, int() says ValueError
        "UIDVALIDITY \u0663",  # ARABIC-INDIC DIGIT THREE: int() would even accept it
        "UIDVALIDITY 0",
        "UIDVALIDITY 4294967296",
        "UIDVALIDITY 99999999999999999999",
        "UIDVALIDITY 7x",
        "UIDNEXT \u00b2",
    ],
)
async def test_a_select_with_a_number_that_is_no_nz_number_is_a_protocol_error(
    code: str,
) -> None:
    # RFC 3501 §9: UIDVALIDITY and UIDNEXT are nz-number (ASCII digits, 32 bits).  Anything
    # else costs this server its session, as a Pop3ProtocolError; never a ValueError, which
    # the service takes for a bug of ours and ends on.
    greeting = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"
    select = (
        "* 1 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n"
        f"* OK [{code}] ok\r\n{{tag}} OK [READ-WRITE] selected\r\n"
    )
    async with scripted(greeting, answers({"SELECT": select})) as port:
        client = await ImapClient.connect(plain(port))
        try:
            await client.login(USER, "secret", ImapAuth.LOGIN)
            with pytest.raises(Pop3ProtocolError, match=f"invalid {code.split()[0]}"):
                await client.select("INBOX")
            assert client.closed
        finally:
            await client.close()


@pytest.mark.parametrize(
    ("challenge", "text"),
    [
        (base64.b64encode(b"[" * 100_000), "XOAUTH2 challenge over 4096 characters"),
        (base64.b64encode(b"[" * 2500), "XOAUTH2 challenge that is not base64 JSON"),
        (b"not base64 at all", "XOAUTH2 challenge that is not base64 JSON"),
    ],
    ids=["long", "nested", "not-base64"],
)
async def test_an_undecodable_xoauth2_challenge_is_a_protocol_error(
    challenge: bytes, text: str
) -> None:
    # json.loads on deeply nested JSON raises RecursionError: once it escaped the client and
    # the service ended on it.  Now it is this server's protocol error.
    greeting = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n"
    auth = "+ " + challenge.decode("ascii") + "\r\n"
    async with scripted(greeting, answers({"AUTHENTICATE": auth})) as port:
        client = await ImapClient.connect(plain(port))
        try:
            with pytest.raises(Pop3ProtocolError, match=re.escape(text)):
                await client.login(USER, TOKEN, ImapAuth.XOAUTH2)
            assert client.closed
        finally:
            await client.close()


async def test_what_a_command_keeps_is_capped_in_octets() -> None:
    # SELECT keeps its untagged responses: counted alone (MAX_UNTAGGED), 1 MiB lines could
    # hold some 98 GiB.  Past MAX_KEPT octets the server's answer is a protocol error.
    greeting = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"
    line = "* OK " + "x" * (MAX_LINE - 16) + "\r\n"
    lines = MAX_KEPT // len(line) + 2
    select = line * lines + "* OK [UIDVALIDITY 7] ok\r\n{tag} OK [READ-WRITE] selected\r\n"
    async with scripted(greeting, answers({"SELECT": select})) as port:
        client = await ImapClient.connect(plain(port))
        try:
            await client.login(USER, "secret", ImapAuth.LOGIN)
            with pytest.raises(Pop3ProtocolError, match=f"responses to SELECT over {MAX_KEPT}"):
                await client.select("INBOX")
            assert client.closed
        finally:
            await client.close()


@asynccontextmanager
async def dripping(verb: str, drip: bytes) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A server that says OK to every command but ``verb``, which it answers with ``drip``
    every 50 ms and never anything else; yields its port and an event set once ``verb``
    arrived."""
    arrived = asyncio.Event()
    caps = "IMAP4rev1 IDLE SASL-IR AUTH=XOAUTH2"
    normal = answers({"CAPABILITY": f"* CAPABILITY {caps}\r\n{{tag}} OK done\r\n"})
    tasks: set[asyncio.Task[object]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writer.write(f"* OK [CAPABILITY {caps}] hi\r\n".encode())
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while line := await reader.readline():
                tag, _, command = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
                if command.split(" ", 1)[0].upper() != verb:
                    writer.write(normal(tag, command))
                    await writer.drain()
                    continue
                arrived.set()
                while True:
                    writer.write(drip)
                    await writer.drain()
                    await asyncio.sleep(0.05)
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], arrived
    finally:
        srv.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await srv.wait_closed()


@pytest.mark.parametrize(
    ("verb", "drip"),
    [
        ("NOOP", b"* OK still thinking\r\n"),
        ("IDLE", b"* OK still thinking\r\n"),
        ("AUTHENTICATE", b"+ e30=\r\n"),  # an XOAUTH2 challenge, again and again
    ],
)
async def test_a_command_has_one_total_deadline(verb: str, drip: bytes) -> None:
    # Each response comes well within `command`, but the command never ends: its total
    # deadline does (docs/design.md §10.2), and the session is dropped.
    fast = Pop3Timeouts(connect=2.0, command=0.5, idle_read=2.0)
    async with dripping(verb, drip) as (port, _):
        client = await ImapClient.connect(plain(port), fast)
        try:
            calls = {
                "AUTHENTICATE": lambda: client.login(USER, TOKEN, ImapAuth.XOAUTH2),
                "IDLE": client.idle,
                "NOOP": client.noop,
            }
            async with asyncio.timeout(10):  # only a bound for the test: 0.5 s expected
                with pytest.raises(Pop3TimeoutError, match="no answer in time"):
                    await calls[verb]()
            assert client.closed
        finally:
            await client.close()


async def test_an_alert_is_logged_with_its_control_characters_escaped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    greeting = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"
    alert = "* OK [ALERT] Mailbox \x1b[2Jover quota\r\n{tag} OK done\r\n"
    async with scripted(greeting, answers({"NOOP": alert})) as port:
        client = await ImapClient.connect(plain(port))
        try:
            await client.noop()
        finally:
            await client.close()
    (record,) = [r for r in caplog.records if "says" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "over quota" in record.getMessage()
    assert "\x1b" not in record.getMessage()
