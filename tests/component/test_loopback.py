"""The loopback POP3 server and SMTP sink, driven by clients that are not ours.

poplib and smtplib (in a worker thread) and raw asyncio streams check the servers against the
RFCs on their own, so a bug in our POP3 client cannot hide a matching bug in the test server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import poplib
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
import trustme

from connector.loopback import LoopbackPop3Server, LoopbackSmtpSink, SinkMessage, _Input

USERS = {"alice": "alicepw", "bob": "bob pw"}  # bob's password has a space (RFC 1939 §7 PASS)
PLAIN_MSG = b"From: a@example.test\r\nSubject: one\r\n\r\nbody line\r\n"
# Stored with bare LF, dot lines, no final line end: served as CRLF, stuffed, with a final CRLF.
LF_MSG = b"From: b@example.test\nSubject: dots\n\n.leading dot\n..two dots\n.\nend"
LF_WIRE = b"From: b@example.test\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
LF_STUFFED = LF_WIRE.replace(b"\r\n.", b"\r\n..")
GRACE = 5.0  # seconds: only a bound on a hang, never a wait for an event


@pytest.fixture
async def pop3() -> AsyncIterator[LoopbackPop3Server]:
    async with LoopbackPop3Server(USERS, {"alice": [PLAIN_MSG, LF_MSG]}) as server:
        yield server
    assert server.errors == []


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def transcript(port: int, payload: bytes) -> tuple[bytes, bytes]:
    """Send ``payload`` in one write after the greeting; return (greeting, all replies to EOF)."""
    async with connect(port) as (reader, writer), asyncio.timeout(GRACE):
        greeting = await reader.readline()
        writer.write(payload)
        return greeting, await reader.read()


def plain(authzid: str, user: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def pop3_client(port: int) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", port, timeout=GRACE)


# --------------------------------------------------------------------------------------------
# POP3 with poplib
# --------------------------------------------------------------------------------------------


async def test_poplib_reads_sizes_uidls_and_exact_bytes(pop3: LoopbackPop3Server) -> None:
    def session() -> tuple[object, ...]:
        client = pop3_client(pop3.port)
        try:
            client.user("alice")
            client.pass_("alicepw")
            stat = client.stat()
            listing = client.list()[1]
            uidls = client.uidl()[1]
            one, two = (b"".join(x + b"\r\n" for x in client.retr(n)[1]) for n in (1, 2))
            return stat, listing, uidls, one, two
        finally:
            client.quit()

    stat, listing, uidls, one, two = await in_thread(session)
    ids = pop3.uidls("alice")
    assert stat == (2, len(PLAIN_MSG) + len(LF_WIRE))
    assert listing == [b"1 %d" % len(PLAIN_MSG), b"2 %d" % len(LF_WIRE)]  # CRLF sizes
    assert uidls == [f"1 {ids[0]}".encode(), f"2 {ids[1]}".encode()]
    assert (one, two) == (PLAIN_MSG, LF_WIRE)
    assert pop3.commands == ["USER", "PASS", "STAT", "LIST", "UIDL", "RETR", "RETR", "QUIT"]


async def test_pipelined_commands_are_answered_in_order_with_stuffed_crlf_bytes(
    pop3: LoopbackPop3Server,
) -> None:
    uidl = pop3.uidls("alice")[1]
    greeting, replies = await transcript(
        pop3.port,
        b"USER alice\r\nPASS alicepw\r\nLIST 2\r\nUIDL 2\r\nRETR 2\r\nNOOP\r\nQUIT\r\n",
    )
    assert greeting.startswith(b"+OK ")
    assert greeting.endswith(b">\r\n")
    size = len(LF_WIRE)
    assert replies == b"".join(
        [
            b"+OK send PASS\r\n",
            b"+OK logged in, 2 messages\r\n",
            f"+OK 2 {size}\r\n".encode(),
            f"+OK 2 {uidl}\r\n".encode(),
            f"+OK {size} octets\r\n".encode() + LF_STUFFED + b".\r\n",
            b"+OK\r\n",
            b"+OK bye, 0 messages deleted\r\n",
        ]
    )


async def test_top_sends_header_blank_line_and_n_body_lines(pop3: LoopbackPop3Server) -> None:
    _, replies = await transcript(
        pop3.port, b"USER alice\r\nPASS alicepw\r\nTOP 2 2\r\nTOP 1 0\r\nTOP 9 1\r\nQUIT\r\n"
    )
    top2 = b"From: b@example.test\r\nSubject: dots\r\n\r\n..leading dot\r\n...two dots\r\n"
    top1 = b"From: a@example.test\r\nSubject: one\r\n\r\n"
    assert replies.split(b"\r\n", 2)[2].startswith(
        b"+OK\r\n" + top2 + b".\r\n+OK\r\n" + top1 + b".\r\n-ERR no such message\r\n"
    )


async def test_dele_takes_effect_only_at_quit(pop3: LoopbackPop3Server) -> None:
    first, second = pop3.uidls("alice")
    # DELE, then the connection drops without QUIT: RFC 1939 §6 keeps the message.
    async with connect(pop3.port) as (reader, writer):
        writer.write(b"USER alice\r\nPASS alicepw\r\nDELE 1\r\n")
        async with asyncio.timeout(GRACE):
            for _ in range(4):
                await reader.readline()
    _, replies = await transcript(pop3.port, b"USER alice\r\nPASS alicepw\r\nSTAT\r\nQUIT\r\n")
    assert b"+OK 2 " in replies
    assert (pop3.uidls("alice"), pop3.deleted) == ([first, second], [])

    # DELE, RSET, DELE of the other, then QUIT: only the second goes.
    _, replies = await transcript(
        pop3.port,
        b"USER alice\r\nPASS alicepw\r\nDELE 1\r\nRETR 1\r\nLIST 1\r\nRSET\r\nDELE 2\r\n"
        b"STAT\r\nLIST\r\nQUIT\r\n",
    )
    assert b"-ERR no such message\r\n-ERR no such message\r\n+OK 2 messages\r\n" in replies
    assert b"+OK 1 %d\r\n+OK 1 messages\r\n1 %d\r\n.\r\n" % ((len(PLAIN_MSG),) * 2) in replies
    assert replies.endswith(b"+OK bye, 1 messages deleted\r\n")
    assert (pop3.uidls("alice"), pop3.deleted) == ([first], [second])
    assert pop3.mailboxes == {"alice": [PLAIN_MSG], "bob": []}


async def test_uidls_are_stable_and_later_mail_waits_for_the_next_session(
    pop3: LoopbackPop3Server,
) -> None:
    first, second = pop3.uidls("alice")
    async with connect(pop3.port) as (reader, writer), asyncio.timeout(GRACE):
        await reader.readline()
        writer.write(b"USER alice\r\nPASS alicepw\r\n")
        await reader.readline()
        await reader.readline()
        third = pop3.add_message("alice", b"Subject: three\r\n\r\nx\r\n")
        writer.write(b"UIDL\r\nQUIT\r\n")
        replies = await reader.read()
    assert len({first, second, third}) == 3
    assert replies.startswith(f"+OK 2 messages\r\n1 {first}\r\n2 {second}\r\n.\r\n".encode())
    _, replies = await transcript(pop3.port, b"USER alice\r\nPASS alicepw\r\nUIDL 3\r\nQUIT\r\n")
    assert f"+OK 3 {third}\r\n".encode() in replies


async def test_apop_and_password_with_space(pop3: LoopbackPop3Server) -> None:
    def apop(secret: str) -> bytes:
        client = pop3_client(pop3.port)  # poplib takes the stamp from the greeting
        try:
            return client.apop("alice", secret)
        finally:
            client.close()

    assert (await in_thread(lambda: apop("alicepw"))).startswith(b"+OK logged in")
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        await in_thread(lambda: apop("wrong"))
    # An APOP digest computed over another greeting's stamp is refused too.
    stale = hashlib.md5(b"<1.2@localhost>alicepw", usedforsecurity=False).hexdigest()
    _, replies = await transcript(pop3.port, f"APOP alice {stale}\r\nQUIT\r\n".encode())
    assert replies.startswith(b"-ERR [AUTH] ")
    _, replies = await transcript(pop3.port, b"USER bob\r\nPASS bob pw\r\nSTAT\r\nQUIT\r\n")
    assert b"+OK 0 0\r\n" in replies


async def test_auth_plain_initial_response_and_continuation(pop3: LoopbackPop3Server) -> None:
    good = plain("", "alice", "alicepw")
    _, replies = await transcript(pop3.port, f"AUTH PLAIN {good}\r\nSTAT\r\nQUIT\r\n".encode())
    assert replies.startswith(b"+OK logged in, 2 messages\r\n+OK 2 ")
    _, replies = await transcript(
        pop3.port,
        f"AUTH PLAIN\r\n*\r\nAUTH PLAIN\r\n{plain('alice', 'alice', 'alicepw')}\r\n".encode()
        + b"QUIT\r\n",
    )
    assert replies.startswith(b"+ \r\n-ERR authentication cancelled\r\n+ \r\n+OK logged in")
    bad = [plain("bob", "alice", "alicepw"), plain("", "alice", "x"), "!!", "="]
    payload = "".join(f"AUTH PLAIN {b}\r\n" for b in bad) + "AUTH LOGIN\r\nQUIT\r\n"
    _, replies = await transcript(pop3.port, payload.encode())
    assert replies.count(b"-ERR") == 5
    assert pop3.sessions == 3


async def test_capa_and_server_without_uidl() -> None:
    async with LoopbackPop3Server(USERS, {"alice": [PLAIN_MSG]}, uidl=False) as server:
        capa = await in_thread(lambda: _capa(server.port))
        _, replies = await transcript(
            server.port, b"USER alice\r\nPASS alicepw\r\nUIDL\r\nUIDL 1\r\nQUIT\r\n"
        )
    assert "UIDL" not in capa
    assert {"TOP", "USER", "RESP-CODES", "PIPELINING"} <= capa.keys()
    assert capa["SASL"] == ["PLAIN"]
    assert "STLS" not in capa
    assert replies.count(b"-ERR command not supported\r\n") == 2


def _capa(port: int) -> dict[str, list[str]]:
    client = pop3_client(port)
    try:
        return client.capa()
    finally:
        client.quit()


async def test_stls_then_login_over_tls(
    smtp_server_context: ssl.SSLContext, smtp_ca: trustme.CA
) -> None:
    client_ctx = ssl.create_default_context()
    smtp_ca.configure_trust(client_ctx)

    def session(port: int) -> tuple[dict[str, list[str]], dict[str, list[str]], bytes]:
        client = pop3_client(port)
        try:
            before = client.capa()
            client.stls(client_ctx)
            after = client.capa()
            client.user("alice")
            client.pass_("alicepw")
            return before, after, b"".join(x + b"\r\n" for x in client.retr(1)[1])
        finally:
            client.quit()

    async with LoopbackPop3Server(
        USERS, {"alice": [LF_MSG]}, ssl_context=smtp_server_context
    ) as server:
        before, after, message = await in_thread(lambda: session(server.port))
    assert "STLS" in before
    assert "STLS" not in after
    assert message == LF_WIRE
    assert server.errors == []


async def test_stls_discards_commands_sent_in_clear_after_it(
    smtp_server_context: ssl.SSLContext, smtp_ca: trustme.CA
) -> None:
    client_ctx = ssl.create_default_context()
    smtp_ca.configure_trust(client_ctx)
    server = LoopbackPop3Server(USERS, ssl_context=smtp_server_context)
    async with server, connect(server.port) as (reader, writer), asyncio.timeout(GRACE):
        await reader.readline()
        writer.write(b"STLS\r\nUSER injected\r\n")  # the CVE-2011-0411 pattern
        assert await reader.readline() == b"+OK begin TLS negotiation\r\n"
        await writer.start_tls(client_ctx, server_hostname="127.0.0.1")
        writer.write(b"CAPA\r\n")
        assert await reader.readline() == b"+OK capability list follows\r\n"
    assert server.commands == ["STLS", "CAPA"]


async def test_lock_mailbox_refuses_a_second_session_until_the_first_quits() -> None:
    async with LoopbackPop3Server(USERS, {"alice": [PLAIN_MSG]}, lock_mailbox=True) as server:
        async with connect(server.port) as (reader, writer), asyncio.timeout(GRACE):
            await reader.readline()
            writer.write(b"USER alice\r\nPASS alicepw\r\n")
            await reader.readline()
            assert (await reader.readline()).startswith(b"+OK logged in")
            _, replies = await transcript(server.port, b"USER alice\r\nPASS alicepw\r\nQUIT\r\n")
            assert b"-ERR [IN-USE] mailbox locked by another session\r\n" in replies
            _, replies = await transcript(server.port, b"USER bob\r\nPASS bob pw\r\nQUIT\r\n")
            assert b"+OK logged in" in replies  # another user's mailbox is free
            writer.write(b"QUIT\r\n")
            await reader.read()
        _, replies = await transcript(server.port, b"USER alice\r\nPASS alicepw\r\nQUIT\r\n")
        assert b"+OK logged in" in replies
    assert server.errors == []


@pytest.mark.parametrize(
    ("code", "line"),
    [
        ("AUTH", b"-ERR [AUTH] authentication failed\r\n"),
        ("SYS/TEMP", b"-ERR [SYS/TEMP] authentication failed\r\n"),
        (None, b"-ERR authentication failed\r\n"),
    ],
)
async def test_auth_error_code(code: str | None, line: bytes) -> None:
    async with LoopbackPop3Server(USERS, auth_error_code=code) as server:
        _, replies = await transcript(
            server.port, b"USER alice\r\nPASS nope\r\nUSER carol\r\nPASS alicepw\r\nQUIT\r\n"
        )
    assert (
        replies
        == b"+OK send PASS\r\n"
        + line
        + b"+OK send PASS\r\n"
        + line
        + b"+OK bye, 0 messages deleted\r\n"
    )


async def test_commands_outside_their_state_are_refused(pop3: LoopbackPop3Server) -> None:
    _, replies = await transcript(
        pop3.port,
        b"STAT\r\nPASS alicepw\r\nSTLS\r\nXYZZY\r\nUSER alice\r\nPASS alicepw\r\n"
        b"USER alice\r\nRETR x\r\nTOP 1\r\nLIST 0\r\nSTLS\r\nQUIT\r\n",
    )
    lines = replies.split(b"\r\n")
    assert [x[:4] for x in lines[:4]] == [b"-ERR"] * 4
    assert [x[:4] for x in lines[6:11]] == [b"-ERR"] * 5


# --------------------------------------------------------------------------------------------
# POP3 faults
# --------------------------------------------------------------------------------------------


async def test_cut_after_bytes_closes_mid_retr_and_keeps_the_mail() -> None:
    async with LoopbackPop3Server(USERS, {"alice": [LF_MSG]}, cut_after_bytes=30) as server:
        _, replies = await transcript(
            server.port, b"USER alice\r\nPASS alicepw\r\nDELE 1\r\nRSET\r\nRETR 1\r\nQUIT\r\n"
        )
        prefix = b"+OK send PASS\r\n+OK logged in, 1 messages\r\n+OK message 1 deleted\r\n"
        prefix += b"+OK 1 messages\r\n"
        assert replies == prefix + (b"+OK %d octets\r\n" % len(LF_WIRE) + LF_STUFFED)[:30]
        assert server.uidls("alice") != []
        assert server.commands[-1] == "RETR"  # the QUIT was never read
    assert server.errors == []


async def test_stall_after_bytes_hangs_mid_retr_until_the_client_leaves() -> None:
    server = LoopbackPop3Server(USERS, {"alice": [LF_MSG]}, stall_after_bytes=25)
    async with server, connect(server.port) as (reader, writer), asyncio.timeout(GRACE):
        await reader.readline()
        writer.write(b"USER alice\r\nPASS alicepw\r\nRETR 1\r\n")
        await reader.readline()
        await reader.readline()
        await server.stalled.wait()
        got = await reader.readexactly(25)
        assert got == (b"+OK %d octets\r\n" % len(LF_WIRE) + LF_STUFFED)[:25]
        # Nothing more comes, however long we wait (a short bound stands for "ever").
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await reader.read(1)
    assert server.errors == []


async def test_stop_drops_stalled_and_idle_clients() -> None:
    server = await LoopbackPop3Server(USERS, {"alice": [LF_MSG]}, stall_after_bytes=5).start()
    async with connect(server.port) as (stalled, w1), connect(server.port) as (idle, _):
        w1.write(b"USER alice\r\nPASS alicepw\r\nRETR 1\r\n")
        await server.stalled.wait()
        async with asyncio.timeout(GRACE):
            await idle.readline()
            await server.stop()
            # The first 5 bytes of the RETR reply, then EOF.
            assert (await stalled.read()).endswith(b"\r\n+OK %d" % (len(LF_WIRE) // 10))
            assert await idle.read() == b""
    assert server.errors == []
    await server.stop()  # a second stop is harmless


async def test_no_greeting_says_nothing() -> None:
    server = LoopbackPop3Server(USERS, no_greeting=True)
    async with server, connect(server.port) as (reader, writer):
        writer.write(b"CAPA\r\n")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await reader.read(1)
    assert server.errors == []
    assert server.commands == []


async def test_stop_drops_a_client_that_does_not_read_a_big_retr() -> None:
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 16_000  # 16 MB: fills buffers
    server = await LoopbackPop3Server(USERS, {"alice": [big]}).start()
    async with connect(server.port) as (reader, writer), asyncio.timeout(GRACE):
        writer.write(b"USER alice\r\nPASS alicepw\r\nRETR 1\r\n")
        while server.commands != ["USER", "PASS", "RETR"]:
            await reader.readline()  # the replies to USER and PASS, then the first RETR line
        await server.stop()
        received = len(await reader.read())
    assert received < len(big)
    assert server.errors == []


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"USER al",
        b"USER alice\r\nPASS alicepw\r\nRETR 1",
        b"USER alice\r\nPASS alicepw\r\nDELE 1\r\n",
        b"AUTH PLAIN\r\n",
        b"USER alice\r\nPASS alicepw\r\nRETR 1\r\nRETR 1\r\nRETR 1\r\nQUIT\r\n",
        b"X" * 70_000,
    ],
)
async def test_clients_that_vanish_anywhere_leave_the_server_serving(payload: bytes) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n" * 50_000  # more than socket buffers
    async with LoopbackPop3Server(USERS, {"alice": [big]}) as server:
        async with connect(server.port) as (_, writer):
            writer.write(payload)  # and leave without reading a byte
        _, replies = await transcript(server.port, b"USER alice\r\nPASS alicepw\r\nQUIT\r\n")
        assert b"+OK logged in, 1 messages" in replies
    assert server.errors == []
    assert server.uidls("alice") != []


# --------------------------------------------------------------------------------------------
# SMTP sink
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", range(len(b"Hi\r\n..x\r\n.\r\n") + 1))
async def test_input_finds_a_terminator_split_across_reads(split: int) -> None:
    wire = b"Hi\r\n..x\r\n.\r\nQUIT\r\n"
    reader = asyncio.StreamReader()
    inp = _Input(reader)
    reader.feed_data(wire[:split])
    task = asyncio.create_task(inp.read_until(b"\r\n.\r\n", 1000))
    await asyncio.sleep(0)  # a yield, not a wait: the task reads the first part and blocks
    reader.feed_data(wire[split:])
    reader.feed_eof()
    assert await task == b"Hi\r\n..x\r\n.\r\n"
    assert await inp.line() == b"QUIT"
    assert await inp.line() is None


def smtp_send(port: int, data: bytes | str, rcpts: list[str], **kw: list[str]) -> dict[str, object]:
    with smtplib.SMTP("127.0.0.1", port, timeout=GRACE) as client:
        return dict(client.sendmail("from@example.test", rcpts, data, **kw))


async def test_sink_accepts_and_records_unstuffed_crlf_data() -> None:
    async with LoopbackSmtpSink() as sink:
        # smtplib turns a str's bare LFs into CRLF and dot-stuffs; the sink undoes the stuffing.
        refused = await in_thread(
            lambda: smtp_send(
                sink.port, LF_MSG.decode(), ["a@x.test", "b@y.test"], mail_options=["BODY=8BITMIME"]
            )
        )
    assert refused == {}
    assert sink.messages == [SinkMessage("from@example.test", ("a@x.test", "b@y.test"), LF_WIRE)]
    assert sink.commands == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert sink.errors == []


@pytest.mark.parametrize(
    ("stage", "error"),
    [
        ("mail", smtplib.SMTPSenderRefused),
        ("rcpt", smtplib.SMTPRecipientsRefused),
        ("data", smtplib.SMTPDataError),
    ],
)
async def test_sink_refuses_at_the_stage_the_rule_names(
    stage: str, error: type[smtplib.SMTPException]
) -> None:
    seen: list[tuple[str, str, list[str], bytes | None]] = []

    def rule(st: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        first = all(call[0] != st for call in seen)
        seen.append((st, sender, rcpts, data))
        return "554 5.1.0 Sender denied" if st == stage and first else None

    async with LoopbackSmtpSink(rule) as sink:
        with pytest.raises(error) as info:
            await in_thread(lambda: smtp_send(sink.port, PLAIN_MSG, ["a@x.test"]))
        assert "5.1.0 Sender denied" in str(info.value)
        assert sink.messages == []
        # The session is still fine for the next message once the rule lets it through.
        await in_thread(lambda: smtp_send(sink.port, PLAIN_MSG, ["ok@x.test"]))
    sender = "from@example.test"
    calls = [
        ("mail", sender, [], None),
        ("rcpt", sender, ["a@x.test"], None),
        ("data", sender, ["a@x.test"], PLAIN_MSG),
    ]
    stop = ["mail", "rcpt", "data"].index(stage) + 1
    assert seen[:stop] == calls[:stop]
    assert seen[stop][0] == "mail"  # the next transaction starts afresh
    assert [m.recipients for m in sink.messages] == [("ok@x.test",)]


async def test_sink_keeps_the_recipients_the_rule_lets_through() -> None:
    def rule(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        return "550 5.1.1 no such user" if stage == "rcpt" and rcpts[-1] == "gone@x.test" else None

    async with LoopbackSmtpSink(rule) as sink:
        refused = await in_thread(
            lambda: smtp_send(sink.port, PLAIN_MSG, ["a@x.test", "gone@x.test", "b@x.test"])
        )
    assert refused == {"gone@x.test": (550, b"5.1.1 no such user")}
    assert sink.messages == [SinkMessage("from@example.test", ("a@x.test", "b@x.test"), PLAIN_MSG)]


async def test_sink_closes_the_connection_after_a_421() -> None:
    def rule(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        return "421 4.3.2 shutting down" if stage == "rcpt" else None

    async with LoopbackSmtpSink(rule) as sink:
        _, replies = await transcript(
            sink.port, b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nNOOP\r\nQUIT\r\n"
        )
    assert replies.endswith(b"250 2.1.0 sender OK\r\n421 4.3.2 shutting down\r\n")
    assert sink.commands == ["EHLO", "MAIL", "RCPT"]
    assert sink.errors == []


async def test_sink_pipelined_transactions_in_one_write() -> None:
    body = b"Subject: p\r\n\r\n..dot\r\n.\r\n"  # stuffed on the wire: ".dot" and "."
    async with LoopbackSmtpSink(size_limit=1000) as sink:
        greeting, replies = await transcript(
            sink.port,
            b"EHLO client\r\nMAIL FROM:<a@x> SIZE=20 BODY=7BIT\r\nRCPT TO:<b@y>\r\nDATA\r\n"
            + body
            + b"MAIL FROM:<>\r\nRCPT TO:<c@z>\r\nDATA\r\n.\r\nQUIT\r\n",
        )
    assert greeting == b"220 localhost ESMTP loopback sink\r\n"
    assert replies == (
        b"250-localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000\r\n"
        b"250 2.1.0 sender OK\r\n250 2.1.5 recipient OK\r\n"
        b"354 end data with <CR><LF>.<CR><LF>\r\n250 2.0.0 accepted\r\n"
        * 1
        + b"250 2.1.0 sender OK\r\n250 2.1.5 recipient OK\r\n"
        b"354 end data with <CR><LF>.<CR><LF>\r\n250 2.0.0 accepted\r\n221 2.0.0 bye\r\n"
    )
    assert sink.messages == [
        SinkMessage("a@x", ("b@y",), b"Subject: p\r\n\r\n.dot\r\n"),
        SinkMessage("", ("c@z",), b""),
    ]


async def test_sink_sequence_size_and_parameter_errors() -> None:
    async with LoopbackSmtpSink(size_limit=10) as sink:
        _, replies = await transcript(
            sink.port,
            b"MAIL FROM:<a@x>\r\nHELO c\r\nRCPT TO:<b@y>\r\nDATA\r\nMAIL FROM:<a@x> SIZE=11\r\n"
            b"MAIL FROM:<a@x> RET=FULL\r\nMAIL FROM:a@x\r\nMAIL FROM:<a@x>\r\nMAIL FROM:<a@x>\r\n"
            b"DATA\r\nRCPT TO:<b@y> NOTIFY=FAILURE\r\nRCPT TO:<b@y>\r\nDATA\r\n"
            b"0123456789ab\r\n.\r\nRSET\r\nNOOP\r\nVRFY x\r\nQUIT\r\n",
        )
    codes = [line[:3] for line in replies.split(b"\r\n") if line]
    assert codes == [
        b"503", b"250", b"503", b"503", b"552", b"555", b"501", b"250", b"503", b"554", b"555",
        b"250", b"354", b"552", b"250", b"250", b"500", b"221",
    ]  # fmt: skip
    assert sink.messages == []


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nSubject: cut\r\n\r\npart",
        b"EHL",
    ],
)
async def test_sink_survives_clients_that_vanish(payload: bytes) -> None:
    async with LoopbackSmtpSink() as sink:
        async with connect(sink.port) as (_, writer):
            writer.write(payload)
        refused = await in_thread(lambda: smtp_send(sink.port, PLAIN_MSG, ["a@x.test"]))
        assert refused == {}
        async with connect(sink.port) as (reader, _):  # a client still connected at stop()
            await reader.readline()
            await sink.stop()
            assert await reader.read() == b""
    assert [m.data for m in sink.messages] == [PLAIN_MSG]
    assert sink.errors == []
