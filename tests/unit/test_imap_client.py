"""The IMAP shell (connector/imap/client.py, session.py, idle.py) against the built-in
loopback IMAP server (connector/loopback_imap.py): logins, STARTTLS, the folder as a session,
what is expunged with and without UIDPLUS, the IDLE watcher.  The same against Dovecot is in
tests/integration/test_imap_accounts.py and test_imap_idle.py."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator

import pytest
import trustme

from connector.errors import (
    Disposition,
    ImapAuthError,
    ImapResponseError,
    Pop3ProtocolError,
    Pop3TlsError,
    classify,
)
from connector.imap import ImapAuth, ImapOptions
from connector.imap.client import ImapClient
from connector.imap.idle import IdleWatcher, Wake
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


async def test_the_folder_as_a_session(server: LoopbackImapServer) -> None:
    uids = [server.add_message(USER, mail(i)) for i in range(40)]
    server.add_message(USER, b"Subject: big\r\n\r\n" + b"x" * 5_000_000)
    async with await session(server) as s:
        count, octets = await s.stat()
        assert count == 41
        assert octets == sum(len(m) for m in server.messages(USER))
        listing = await s.uidl()
        assert [n for n, _ in listing] == [*uids, uids[-1] + 1]
        assert listing[0][1] == f"imap:{s.uidvalidity}:{uids[0]}"
        got = [r async for r in s.retrieve_many([n for n, _ in listing])]
        assert [r.raw for r in got] == server.messages(USER)
        assert await s.top(uids[0], 0) == b"Subject: message 0\r\nMessage-ID: <0@x>\r\n\r\n"
        # Batches: 32 messages or 4 MiB at most per UID FETCH.
        assert server.commands.count("UID FETCH") >= 3
        for uid in uids[:5]:
            await s.dele(uid)
        await s.quit()
    assert len(server.messages(USER)) == 36
    assert server.commands[-3:] == ["UID STORE", "UID EXPUNGE", "LOGOUT"]


async def test_unsolicited_flag_updates_are_not_taken_for_messages(
    server: LoopbackImapServer,
) -> None:
    server.chatty = True
    uids = [server.add_message(USER, mail(i)) for i in range(3)]
    async with await session(server) as s:
        await s.stat()
        got = [r async for r in s.retrieve_many(uids)]
        assert [r.raw for r in got] == [mail(i) for i in range(3)]
        assert await s.top(uids[1], 0) == b"Subject: message 1\r\nMessage-ID: <1@x>\r\n\r\n"


async def test_a_fetch_left_early_is_read_to_its_end(server: LoopbackImapServer) -> None:
    uids = [server.add_message(USER, mail(i)) for i in range(10)]
    async with await session(server) as s:
        await s.stat()
        async for _ in s.retrieve_many(uids):
            break  # the rest of the FETCH is still coming
        await s.dele(uids[0])
        await s.quit()  # STORE and EXPUNGE after the open FETCH's answers are read
    assert len(server.messages(USER)) == 9


async def test_without_uidplus_another_clients_deleted_mail_is_never_expunged(
    server: LoopbackImapServer,
) -> None:
    server.uidplus = False
    uids = [server.add_message(USER, mail(i)) for i in range(3)]
    server.flag_deleted(USER, uids[2])  # a user's mail program, not yet expunged
    async with await session(server) as s:
        await s.stat()
        await s.dele(uids[0])
        await s.quit()
        assert not s.expunged
    assert "EXPUNGE" not in server.commands
    assert len(server.messages(USER)) == 3  # ours stays flagged; theirs is untouched

    server.folder(USER).messages[2].flags.clear()  # the user changed their mind
    async with await session(server) as s:
        await s.stat()
        await s.dele(uids[0])
        await s.quit()
        assert s.expunged
    assert server.messages(USER) == [mail(1), mail(2)]


async def test_a_body_longer_than_its_size_is_refused(server: LoopbackImapServer) -> None:
    """The server's own RFC822.SIZE bounds what it may send (the POP3 client's RETR rule)."""
    server.understate_sizes = 10_000
    uid = server.add_message(USER, b"Subject: long\r\n\r\n" + b"x" * 20_000)
    async with await session(server) as s:
        await s.stat()
        with pytest.raises(Pop3ProtocolError, match="literal of"):
            [r async for r in s.retrieve_many([uid])]


async def test_a_read_only_folder_is_refused_unless_mail_is_kept(
    server: LoopbackImapServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ImapClient.select

    async def read_only(self: ImapClient, folder: str, *, read_only: bool = False) -> object:
        return await real(self, folder, read_only=True)

    monkeypatch.setattr(ImapClient, "select", read_only)
    with pytest.raises(ImapResponseError) as err:
        await session(server)
    assert err.value.resp_code == "NOPERM"
    assert classify(err.value) is Disposition.PARK_ACCOUNT
    async with await session(server, keep=True) as s:
        assert await s.stat() == (0, 0)


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
# The IDLE watcher
# --------------------------------------------------------------------------------------------


class Spec:
    """An IMAP account as the watcher sees it (connector.cycle.AccountSpec's fields)."""

    def __init__(self, srv: LoopbackImapServer, **options: object) -> None:
        self.name = "info"
        self.endpoint = endpoint(srv)
        self.username = USER
        self.password = PASSWORD
        self.timeouts = Pop3Timeouts(connect=5, command=5, idle_read=5)
        self.imap = ImapOptions(**options)  # type: ignore[arg-type]


async def test_exists_wakes_the_watcher_and_close_says_done_and_logout(
    server: LoopbackImapServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "connector.imap")
    watcher = IdleWatcher(Spec(server), interval=600)
    stop = asyncio.Event()
    assert await watcher.wait(600, [stop]) is Wake.MAIL  # a fresh connection: look once
    assert watcher.connections == 1
    waiting = asyncio.create_task(watcher.wait(600, [stop]))
    server.add_message(USER, mail(1))
    assert await asyncio.wait_for(waiting, 10) is Wake.MAIL
    assert server.commands.count("SELECT") == 1
    waiting = asyncio.create_task(watcher.wait(600, [stop]))
    await asyncio.sleep(0.05)  # back in IDLE, its read of the server's next response pending
    stop.set()  # as SIGTERM does
    assert await asyncio.wait_for(waiting, 10) is Wake.EVENT
    await watcher.close()
    assert (server.dones, server.logouts) == (1, 1)
    assert not watcher.active
    assert "failed" not in caplog.text  # DONE answered, then LOGOUT answered: a clean end


async def test_idle_is_renewed(server: LoopbackImapServer) -> None:
    watcher = IdleWatcher(Spec(server, idle_renewal=0.05), interval=600)
    stop = asyncio.Event()
    assert await watcher.wait(600, [stop]) is Wake.MAIL
    assert await watcher.wait(0.5, [stop]) is Wake.TIMEOUT
    assert watcher.renewals >= 3
    assert server.idles == watcher.renewals + 1
    assert server.dones == watcher.renewals
    server.add_message(USER, mail(1))  # still watching after the renewals
    assert await watcher.wait(10, [stop]) is Wake.MAIL
    await watcher.close()


async def test_a_server_without_idle_is_polled(server: LoopbackImapServer) -> None:
    server.idle = False
    watcher = IdleWatcher(Spec(server), interval=600)
    assert await watcher.wait(0.1, [asyncio.Event()]) is Wake.TIMEOUT
    assert watcher.supported is False
    assert server.commands.count("IDLE") == 0
    server.add_message(USER, mail(1))
    assert await watcher.wait(0.1, [asyncio.Event()]) is Wake.TIMEOUT  # no push: the poll
    await watcher.close()


async def test_a_failing_connection_backs_off_like_a_failing_cycle(
    server: LoopbackImapServer,
) -> None:
    """Reconnecting after failures waits the poll interval, doubled up to four times, with
    up to 10 % jitter (service.Service.delay_after's pace); no attempt in between."""
    offset = [0.0]

    def clock() -> float:
        return time.monotonic() + offset[0]

    spec = Spec(server)
    spec.password = "wrong"
    watcher = IdleWatcher(spec, interval=60, clock=clock)
    never = asyncio.Event()
    first = server.sessions
    for attempt, factor in enumerate((1, 2, 4, 4), 1):
        assert await watcher.wait(0.05, [never]) is Wake.TIMEOUT  # one attempt, refused
        assert server.sessions == first + attempt
        delay = watcher.next_attempt - clock()
        assert 60 * factor - 1 <= delay <= 60 * factor * 1.1
        assert await watcher.wait(0.05, [never]) is Wake.TIMEOUT
        assert server.sessions == first + attempt  # none before the retry time
        offset[0] += delay
    await watcher.close()
