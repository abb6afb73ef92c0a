"""connector.deadletter.imap against a small scripted IMAP server on loopback, for what Dovecot
will not do on request: refuse the connection, close it during APPEND, go silent, answer
OVERQUOTA, race a CREATE, or lack UIDPLUS (Dovecot itself: tests/integration/
test_deadletter_imap.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import pytest

from connector.deadletter import (
    DeadLetterInfo,
    DeadLetterStore,
    with_dead_letter_headers,
)
from connector.deadletter.imap import (
    ImapStore,
)
from connector.errors import DeadLetterError
from connector.tls import TlsMode
from tests.servers import free_port

WHEN = dt.datetime(2026, 11, 27, 15, 49, 35, tzinfo=dt.UTC)
INFO = DeadLetterInfo("info", "00000001650a1b2c", "data", "554 5.1.0 Sender denied", WHEN)
DEFAULT_FOLDER = "POP3 Connector/Dead Letters"
# What IMAP can carry verbatim (RFC 3501 §4.3): CRLF lines, no NUL.  Every other octet value,
# a line of 200,000 characters and a body of ~1 MB.
SAFE_OCTETS = bytes(b for b in range(1, 256) if b not in (0x0A, 0x0D))
MESSAGE = (
    b"From: a@example.org\r\nSubject: hi\r\n\r\nbody line\r\n.\r\n..dots\r\n"
    + SAFE_OCTETS
    + b"\r\n"
    + b"y" * 200_000
    + b"\r\n"
    + b"x\r\n" * 300_000
)


async def test_connection_refused_is_a_dead_letter_error() -> None:
    store = ImapStore("127.0.0.1", free_port(), TlsMode.NONE, None, "u", "p", DEFAULT_FOLDER)
    with pytest.raises(DeadLetterError, match=r"connect: connection refused$"):
        await store.put(MESSAGE, INFO)


# ============================================================================================
# A scripted IMAP server, for faults Dovecot will not produce on request
# ============================================================================================

Action = Literal["answer", "close", "silent"]


@dataclass
class Reply:
    """What the fake answers to one command: untagged lines, then ``<tag> <tagged>``."""

    tagged: bytes = b"OK done"
    untagged: tuple[bytes, ...] = ()
    action: Action = "answer"  # for APPEND: "close" or "silent" after the "+" continuation


@dataclass
class FakeImap:
    """Speaks just enough IMAP4rev1 for the store; ``replies[VERB]`` is consumed in order."""

    replies: dict[str, list[Reply]] = field(default_factory=dict)
    commands: list[bytes] = field(default_factory=list)
    appended: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    appending: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    DEFAULTS = {  # noqa: RUF012 - read only
        "CAPABILITY": Reply(untagged=(b"CAPABILITY IMAP4rev1 UIDPLUS",)),
        "LOGIN": Reply(b"OK Logged in"),
        "LIST": Reply(untagged=(b'LIST (\\Noselect) "." ""',)),
        "APPEND": Reply(b"OK [APPENDUID 7 9] Append completed"),
        "LOGOUT": Reply(b"OK Logout completed", (b"BYE Logging out",)),
    }

    def reply(self, verb: str) -> Reply:
        queue = self.replies.get(verb)
        if queue:
            return queue.pop(0)
        return self.DEFAULTS.get(verb, Reply())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"* OK fake IMAP ready\r\n")
            while line := await reader.readline():
                self.commands.append(line)
                tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
                words = rest.split(b" ")
                verb = words[0].decode().upper()
                if verb == "UID":
                    verb += " " + words[1].decode().upper()
                reply = self.reply(verb)
                literal = re.search(rb"\{(\d+)\}\r\n$", line)
                if literal is not None:
                    writer.write(b"+ go ahead\r\n")
                    self.appending.set()
                    if reply.action == "close":
                        await reader.readexactly(min(10, int(literal.group(1))))
                        return
                    if reply.action == "silent":
                        await reader.read()  # until the client gives up and closes
                        return
                    self.appended.append((await reader.readexactly(int(literal[1]) + 2))[:-2])
                for untagged in reply.untagged:
                    writer.write(b"* " + untagged + b"\r\n")
                writer.write(tag + b" " + reply.tagged + b"\r\n")
                await writer.drain()
        finally:
            writer.close()
            self.closed.set()

    def sent(self, verb: str) -> list[bytes]:
        return [c for c in self.commands if c.split(b" ")[1:2] == [verb.encode()]]


@pytest.fixture
async def fake_imap() -> AsyncIterator[FakeImap]:
    fake = FakeImap()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    async with server:
        yield fake


def _fake_store(fake: FakeImap, timeout: float = 30.0) -> ImapStore:
    return ImapStore(
        "127.0.0.1", fake.port, TlsMode.NONE, None, "user", "pw", DEFAULT_FOLDER, timeout=timeout
    )


async def test_fake_append_sends_quoted_names_flags_and_date(fake_imap: FakeImap) -> None:
    store: DeadLetterStore = _fake_store(fake_imap)
    assert await store.put(b"Subject: x\r\n\r\n", INFO) == "imap:7:9"
    (append,) = fake_imap.sent("APPEND")
    size = len(with_dead_letter_headers(b"Subject: x\r\n\r\n", INFO))
    assert append.split(b" ", 1)[1] == (
        b'APPEND "POP3 Connector.Dead Letters" (\\Seen $DeadLetter) '
        b'"27-Nov-2026 15:49:35 +0000" {%d}\r\n' % size
    )
    assert fake_imap.appended == [with_dead_letter_headers(b"Subject: x\r\n\r\n", INFO)]
    assert fake_imap.sent("LOGIN")[0].endswith(b' LOGIN "user" "pw"\r\n')
    await asyncio.wait_for(fake_imap.closed.wait(), 5)
    assert fake_imap.commands[-1].split(b" ")[1] == b"LOGOUT\r\n"


async def test_fake_closing_during_append_fails_at_once(fake_imap: FakeImap) -> None:
    fake_imap.replies["APPEND"] = [Reply(action="close")]
    store = _fake_store(fake_imap, timeout=30)
    # aioimaplib alone would wait for the full 30 s (library-facts.md §4).
    async with asyncio.timeout(5):
        with pytest.raises(DeadLetterError, match="APPEND: the server closed the connection"):
            await store.put(MESSAGE, INFO)


async def test_fake_silent_during_append_times_out(fake_imap: FakeImap) -> None:
    fake_imap.replies["APPEND"] = [Reply(action="silent")]
    store = _fake_store(fake_imap, timeout=0.3)
    with pytest.raises(DeadLetterError, match=r"APPEND: no answer within 0\.3s"):
        await store.put(b"Subject: x\r\n\r\n", INFO)
    await asyncio.wait_for(fake_imap.closed.wait(), 5)  # the socket was closed


async def test_fake_silent_greeting_times_out() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        store = ImapStore(
            "127.0.0.1", port, TlsMode.NONE, None, "u", "p", DEFAULT_FOLDER, timeout=0.3
        )
        with pytest.raises(DeadLetterError, match=r"connect: no answer within 0\.3s"):
            await store.put(b"x", INFO)


async def test_fake_cancellation_closes_the_connection(fake_imap: FakeImap) -> None:
    fake_imap.replies["APPEND"] = [Reply(action="silent")]
    task = asyncio.create_task(_fake_store(fake_imap).put(b"Subject: x\r\n\r\n", INFO))
    await asyncio.wait_for(fake_imap.appending.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake_imap.closed.wait(), 5)
    assert not fake_imap.sent("LOGOUT")


async def test_fake_overquota_is_named(fake_imap: FakeImap) -> None:
    fake_imap.replies["APPEND"] = [Reply(b"NO [OVERQUOTA] Quota exceeded (mailbox is full)")]
    with pytest.raises(DeadLetterError) as caught:
        await _fake_store(fake_imap).put(b"x", INFO)
    assert caught.value.reason == (
        "over quota: APPEND answered NO [OVERQUOTA] Quota exceeded (mailbox is full)"
    )
    await asyncio.wait_for(fake_imap.closed.wait(), 5)


@pytest.mark.parametrize(
    ("verb", "reply", "reason"),
    [
        ("APPEND", b"BAD Error in IMAP command", "APPEND answered BAD Error in IMAP command"),
        ("APPEND", b"NO [SERVERBUG]\r x", "APPEND answered NO [SERVERBUG] x"),
        ("LIST", b"NO [UNAVAILABLE] try later", "LIST answered NO [UNAVAILABLE] try later"),
        ("LOGIN", b"NO you said pw, we saw", "LOGIN answered NO you said ****, we saw"),
    ],
)
async def test_fake_refusals_are_dead_letter_errors(
    fake_imap: FakeImap, verb: str, reply: bytes, reason: str
) -> None:
    fake_imap.replies[verb] = [Reply(reply)]
    with pytest.raises(DeadLetterError) as caught:
        await _fake_store(fake_imap).put(b"x", INFO)
    assert caught.value.reason == reason
    assert caught.value.store == f"imap://user@127.0.0.1:{fake_imap.port}/{DEFAULT_FOLDER}"


async def test_fake_trycreate_then_alreadyexists_retries_once(fake_imap: FakeImap) -> None:
    # Another connector created the folder between our APPEND and our CREATE (RFC 5530 §3).
    fake_imap.replies["APPEND"] = [Reply(b"NO [TRYCREATE] Mailbox doesn't exist")]
    fake_imap.replies["CREATE"] = [Reply(b"NO [ALREADYEXISTS] Mailbox already exists")]
    assert await _fake_store(fake_imap).put(b"x", INFO) == "imap:7:9"
    assert len(fake_imap.sent("APPEND")) == 2
    assert fake_imap.sent("CREATE")[0].endswith(b' CREATE "POP3 Connector.Dead Letters"\r\n')


async def test_fake_trycreate_twice_is_an_error(fake_imap: FakeImap) -> None:
    fake_imap.replies["APPEND"] = [Reply(b"NO [TRYCREATE] no"), Reply(b"NO [TRYCREATE] still no")]
    with pytest.raises(DeadLetterError, match=r"APPEND answered NO \[TRYCREATE\] still no"):
        await _fake_store(fake_imap).put(b"x", INFO)
    assert len(fake_imap.sent("APPEND")) == 2


async def test_fake_create_refused_is_an_error(fake_imap: FakeImap) -> None:
    fake_imap.replies["APPEND"] = [Reply(b"NO [TRYCREATE] no")]
    fake_imap.replies["CREATE"] = [Reply(b"NO [NOPERM] Permission denied")]
    with pytest.raises(DeadLetterError, match=r"CREATE answered NO \[NOPERM\]"):
        await _fake_store(fake_imap).put(b"x", INFO)


async def test_fake_without_uidplus_finds_the_uid_by_search(fake_imap: FakeImap) -> None:
    fake_imap.replies["APPEND"] = [Reply(b"OK Append completed")]
    fake_imap.replies["SELECT"] = [Reply(b"OK [READ-WRITE] done", (b"OK [UIDVALIDITY 42] ok",))]
    fake_imap.replies["UID SEARCH"] = [Reply(untagged=(b"SEARCH 3 7",))]
    assert await _fake_store(fake_imap).put(b"x", INFO) == "imap:42:7"
    (search,) = fake_imap.sent("UID")
    assert search.split(b" ", 1)[1] == (
        b'UID SEARCH HEADER X-POP3-Connector-Account "info" '
        b'HEADER X-POP3-Connector-UIDL "00000001650a1b2c" '
        b'HEADER X-POP3-Connector-Failed-At "2026-11-27T15:49:35Z"\r\n'
    )


async def test_fake_flat_server_refuses_a_nested_folder(fake_imap: FakeImap) -> None:
    fake_imap.replies["LIST"] = [Reply(untagged=(b'LIST (\\Noselect) NIL ""',))]
    with pytest.raises(DeadLetterError, match="no folder hierarchy"):
        await _fake_store(fake_imap).put(b"x", INFO)
    assert not fake_imap.sent("APPEND")
