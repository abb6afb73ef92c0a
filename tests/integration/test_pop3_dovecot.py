"""The POP3 client against the real Dovecot (tests/servers.py): TLS modes, login, exact RETR."""

from __future__ import annotations

import ssl

import pytest

from connector.errors import Pop3AuthError, Pop3TlsError
from connector.pop3 import AuthMethod, Pop3Client, Pop3Endpoint, Pop3Timeouts
from connector.tls import TlsMode
from tests.peek import retr_many, rset
from tests.servers import DovecotServer

pytestmark = pytest.mark.integration

TIMEOUTS = Pop3Timeouts(connect=10.0, command=10.0, idle_read=10.0)


def endpoint(
    dovecot: DovecotServer,
    tls: TlsMode,
    *,
    context: ssl.SSLContext | None = None,
    hostname: str = "localhost",
) -> Pop3Endpoint:
    port = dovecot.ports["pop3s" if tls is TlsMode.IMPLICIT else "pop3"]
    if context is None and tls is not TlsMode.NONE:
        context = dovecot.client_context()
    return Pop3Endpoint("127.0.0.1", port, tls, context, hostname)


def sample_messages(n: int) -> list[bytes]:
    """CRLF messages (Dovecot serves CRLF) with the lines dot-stuffing must get right."""
    return [
        b"From: sender%d@example.test\r\nSubject: message %d\r\n\r\n"
        b".leading dot\r\n..two dots\r\n.\r\nlast line %d\r\n" % (i, i, i)
        for i in range(1, n + 1)
    ]


@pytest.mark.parametrize("tls", list(TlsMode))
async def test_login_and_read_byte_exact(
    dovecot: DovecotServer, mailbox: tuple[str, str], tls: TlsMode
) -> None:
    user, password = mailbox
    raws = sample_messages(3)
    dovecot.deliver_many(user, raws)
    async with await Pop3Client.connect(endpoint(dovecot, tls), TIMEOUTS) as pop:
        assert pop.tls_active is (tls is not TlsMode.NONE)
        assert "STLS" not in pop.capabilities or tls is TlsMode.NONE  # RFC 2595: gone after TLS
        assert pop.pipelining
        await pop.login(user, password)
        assert await pop.stat() == (3, sum(map(len, raws)))
        assert await pop.list() == [(i, len(raw)) for i, raw in enumerate(raws, 1)]
        uids = await pop.uidl()
        assert [n for n, _ in uids] == [1, 2, 3]
        assert len({uid for _, uid in uids}) == 3
        for i, raw in enumerate(raws, 1):
            assert await pop.retr(i) == raw
        assert await pop.top(1, 0) == raws[0].split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        await pop.quit()


@pytest.mark.parametrize("method", [AuthMethod.USER, AuthMethod.PLAIN, AuthMethod.AUTO])
async def test_each_login_method(
    dovecot: DovecotServer, mailbox: tuple[str, str], method: AuthMethod
) -> None:
    user, password = mailbox
    async with await Pop3Client.connect(endpoint(dovecot, TlsMode.STARTTLS), TIMEOUTS) as pop:
        await pop.login(user, password, method)
        assert await pop.stat() == (0, 0)
        await pop.quit()


@pytest.mark.parametrize("tls", [TlsMode.NONE, TlsMode.IMPLICIT])
async def test_wrong_password(
    dovecot: DovecotServer, mailbox: tuple[str, str], tls: TlsMode
) -> None:
    user, _ = mailbox
    async with await Pop3Client.connect(endpoint(dovecot, tls), TIMEOUTS) as pop:
        with pytest.raises(Pop3AuthError) as info:
            await pop.login(user, "not-the-password")
    assert info.value.resp_code == "AUTH"
    assert "not-the-password" not in str(info.value)


@pytest.mark.parametrize("tls", [TlsMode.IMPLICIT, TlsMode.STARTTLS])
async def test_untrusted_certificate(dovecot: DovecotServer, tls: TlsMode) -> None:
    ep = endpoint(dovecot, tls, context=ssl.create_default_context())  # the test CA is unknown
    with pytest.raises(Pop3TlsError, match="certificate"):
        await Pop3Client.connect(ep, TIMEOUTS)


@pytest.mark.parametrize("tls", [TlsMode.IMPLICIT, TlsMode.STARTTLS])
async def test_wrong_hostname(dovecot: DovecotServer, tls: TlsMode) -> None:
    ep = endpoint(dovecot, tls, hostname="wrong.example")
    with pytest.raises(Pop3TlsError, match="certificate"):
        await Pop3Client.connect(ep, TIMEOUTS)


async def test_long_line_and_big_message_arrive_intact(
    dovecot: DovecotServer, mailbox: tuple[str, str]
) -> None:
    user, password = mailbox
    long_line = b"Subject: long\r\n\r\n" + b"A" * 200_000 + b"\r\n.after\r\n"
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/0123456789ab\r\n"
    body = (line * (20 * 1024 * 1024 // len(line))).replace(b"\r\n0", b"\r\n.0", 1000)
    big = b"Subject: big\r\n\r\n" + body
    assert len(big) > 20 * 1024 * 1024 - len(line)
    dovecot.deliver_many(user, [long_line, big])
    async with await Pop3Client.connect(endpoint(dovecot, TlsMode.IMPLICIT), TIMEOUTS) as pop:
        await pop.login(user, password)
        assert await pop.retr(1) == long_line
        assert await pop.retr(2) == big
        await pop.quit()


async def test_dele_and_quit_remove(dovecot: DovecotServer, mailbox: tuple[str, str]) -> None:
    user, password = mailbox
    raws = sample_messages(3)
    dovecot.deliver_many(user, raws)
    async with await Pop3Client.connect(endpoint(dovecot, TlsMode.NONE), TIMEOUTS) as pop:
        await pop.login(user, password)
        before = dict(await pop.uidl())
        await pop.dele(2)
        await rset(pop)  # undoes it
        await pop.dele(1)
        await pop.dele(3)
        assert "deleted" in await pop.quit()
    assert len(dovecot.maildir_files(user)) == 1
    async with await Pop3Client.connect(endpoint(dovecot, TlsMode.NONE), TIMEOUTS) as pop:
        await pop.login(user, password)
        assert await pop.uidl() == [(1, before[2])]
        assert await pop.retr(1) == raws[1]
        await pop.close()  # no QUIT: nothing changes


async def test_retr_many_fifty_in_order(dovecot: DovecotServer, mailbox: tuple[str, str]) -> None:
    user, password = mailbox
    raws = sample_messages(50)
    dovecot.deliver_many(user, raws)
    async with await Pop3Client.connect(endpoint(dovecot, TlsMode.STARTTLS), TIMEOUTS) as pop:
        await pop.login(user, password)
        got = [item async for item in retr_many(pop, range(1, 51), window=8)]
        assert got == list(enumerate(raws, 1))
        # Interleaved DELEs, and an early stop with RETRs still in flight.
        async for number, _ in retr_many(pop, range(1, 51), window=8):
            await pop.dele(number)
            if number == 10:
                break
        assert "deleted" in await pop.quit()
    assert len(dovecot.maildir_files(user)) == 40
