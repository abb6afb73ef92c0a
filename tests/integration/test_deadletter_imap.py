"""The IMAP dead-letter store: mailbox names, real Dovecot (IMAPS and plain), and faults.

Three parts:

* mailbox-name helpers (modified UTF-7, quoting, separators): pure, no server;
* against the session's Dovecot: folders created and named right on disk, the bytes, flags and
  INTERNALDATE, login and certificate failures (the contract every store passes, this one over
  Dovecot too, is tests/test_deadletter_contract.py);
* against a small scripted IMAP server on loopback, for what Dovecot will not do on request:
  close the connection during APPEND, go silent, answer OVERQUOTA, race a CREATE, or lack
  UIDPLUS.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.deadletter import (
    DeadLetterInfo,
    DeadLetterStore,
    strip_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.deadletter.imap import (
    ImapStore,
    encode_mutf7,
    folder_levels,
    make_id,
    parse_id,
    quote_astring,
    server_mailbox_name,
)
from connector.errors import DeadLetterError
from connector.tls import TlsMode
from tests.servers import DovecotServer, free_port

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


def _imap_store(
    dovecot: DovecotServer,
    user: str,
    password: str,
    *,
    tls: TlsMode = TlsMode.IMPLICIT,
    folder: str = DEFAULT_FOLDER,
    ssl_context: ssl.SSLContext | None = None,
) -> ImapStore:
    implicit = tls is TlsMode.IMPLICIT
    return ImapStore(
        "localhost" if implicit else "127.0.0.1",
        dovecot.ports["imaps" if implicit else "imap"],
        tls,
        ssl_context or (dovecot.client_context() if implicit else None),
        user,
        password,
        folder,
        timeout=10,
    )


# ============================================================================================
# Mailbox names (no server)
# ============================================================================================


def _decode_mutf7(text: str) -> str:
    """A reference decoder for RFC 3501 §5.1.3, used only to check the encoder."""

    def shift(m: re.Match[str]) -> str:
        if not m.group(1):
            return "&"
        b64 = m.group(1).replace(",", "/")
        return base64.b64decode(b64 + "=" * (-len(b64) % 4)).decode("utf-16-be")

    return re.sub(r"&([A-Za-z0-9+,]*)-", shift, text)


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("Dead Letters", "Dead Letters"),
        ("Größe", "Gr&APYA3w-e"),
        ("Unzustellbar/Größe", "Unzustellbar/Gr&APYA3w-e"),
        # RFC 3501 §5.1.3's own example.
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("Tom & Jerry", "Tom &- Jerry"),
        ("&", "&-"),
        ("", ""),
        ("é", "&AOk-"),
        ("\U0001f4e8", "&2D3c6A-"),  # outside the BMP: a UTF-16 surrogate pair
        ("a\tb", "a&AAk-b"),  # controls are not printable ASCII: encoded too
    ],
)
def test_mutf7_known_values(name: str, encoded: str) -> None:
    assert encode_mutf7(name) == encoded


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_mutf7_is_printable_ascii_and_decodes_back(name: str) -> None:
    encoded = encode_mutf7(name)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert _decode_mutf7(encoded) == name


def test_quote_astring_escapes_quotes_and_backslashes() -> None:
    assert quote_astring("Dead Letters") == '"Dead Letters"'
    assert quote_astring('a"b\\c') == '"a\\"b\\\\c"'


def test_server_names_use_the_servers_separator() -> None:
    levels = folder_levels("POP3 Connector/Größe")
    assert server_mailbox_name(levels, ".") == '"POP3 Connector.Gr&APYA3w-e"'
    assert server_mailbox_name(levels, "/") == '"POP3 Connector/Gr&APYA3w-e"'
    assert server_mailbox_name(folder_levels("Dead Letters"), None) == '"Dead Letters"'
    with pytest.raises(ValueError, match="no folder hierarchy"):
        server_mailbox_name(levels, None)
    with pytest.raises(ValueError, match="separator"):
        server_mailbox_name(folder_levels("v1.2/x"), ".")


@pytest.mark.parametrize("folder", ["", "/a", "a/", "a//b", "a\r\nb", "a\0"])
def test_bad_folder_names_are_refused_at_construction(folder: str) -> None:
    with pytest.raises(ValueError, match="folder name"):
        ImapStore("h", 993, TlsMode.IMPLICIT, None, "u", "p", folder)


def test_starttls_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="STARTTLS"):
        ImapStore("h", 143, TlsMode.STARTTLS, None, "u", "p", DEFAULT_FOLDER)


def test_ids_round_trip_and_bad_ids_are_unknown() -> None:
    assert parse_id(make_id(1795823030, 17)) == (1795823030, 17)
    for bad in ("", "imap:1:0", "imap:1", "imap:x:1", "1:2", "imap:1:2:3", "imap:unknown"):
        with pytest.raises(KeyError):
            parse_id(bad)


# ============================================================================================
# Against Dovecot
# ============================================================================================


def _flags(path_name: str) -> str:
    return path_name.rsplit(":2,", 1)[1] if ":2," in path_name else ""


@pytest.mark.integration
@pytest.mark.parametrize("tls", [TlsMode.IMPLICIT, TlsMode.NONE])
async def test_put_creates_the_folder_and_stores_the_bytes(
    dovecot: DovecotServer, mailbox: tuple[str, str], tls: TlsMode
) -> None:
    user, password = mailbox
    store = _imap_store(dovecot, user, password, tls=tls)
    assert dovecot.maildir_files(user, "POP3 Connector.Dead Letters") == []

    id = await store.put(MESSAGE, INFO)

    assert re.fullmatch(r"imap:\d+:1", id)
    (path,) = dovecot.maildir_files(user, "POP3 Connector.Dead Letters")
    # Dovecot keeps LF on disk (mail_save_crlf = no) and gives CRLF back over IMAP.
    stored = with_dead_letter_headers(MESSAGE, INFO)
    assert path.read_bytes() == stored.replace(b"\r\n", b"\n")
    assert "S" in _flags(path.name)  # \Seen; the keyword is a letter from dovecot-keywords
    keywords = (path.parent.parent / "dovecot-keywords").read_text()
    assert "$DeadLetter" in keywords
    assert path.stat().st_mtime == WHEN.timestamp()  # Maildir keeps INTERNALDATE as mtime
    assert await store.get(id) == stored
    assert strip_dead_letter_headers(await store.get(id)) == MESSAGE


@pytest.mark.integration
async def test_non_ascii_folder_is_a_mutf7_maildir_folder(
    dovecot: DovecotServer, mailbox: tuple[str, str]
) -> None:
    user, password = mailbox
    store = _imap_store(dovecot, user, password, folder="Unzustellbar/Größe")
    first = await store.put(b"Subject: 1\r\n\r\n", INFO)
    second = await store.put(b"Subject: 2\r\n\r\n", INFO)  # the folder exists now
    assert first != second
    assert len(dovecot.maildir_files(user, "Unzustellbar.Gr&APYA3w-e")) == 2
    subscriptions = (dovecot.root / "mail" / user / "Maildir" / "subscriptions").read_text()
    assert "Unzustellbar\tGr&APYA3w-e\n" in subscriptions  # Dovecot's file: levels by TAB
    assert [r.id for r in await store.list()] == [first, second]


@pytest.mark.integration
async def test_put_of_a_message_imap_cannot_carry_is_stored_with_a_warning(
    dovecot: DovecotServer, mailbox: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # RFC 3501 §4.3: no NUL, lines end in CRLF.  Refusing would leave the message upstream,
    # retried for ever, so it is stored as the server normalises it.
    user, password = mailbox
    store = _imap_store(dovecot, user, password)
    raw = b"Subject: odd\n\nbare LF\nNUL\x00\r\n"
    with caplog.at_level(logging.WARNING, logger="connector.deadletter.imap"):
        id = await store.put(raw, INFO)
    assert "uidl=00000001650a1b2c" in caplog.text
    assert "NUL or bare CR/LF" in caplog.text
    stored = await store.get(id)
    assert stored.endswith(b"Subject: odd\r\n\r\nbare LF\r\nNUL\x80\r\n")
    (record,) = await store.list()
    assert record.uidl == INFO.uidl


@pytest.mark.integration
async def test_list_of_a_missing_folder_is_empty(
    dovecot: DovecotServer, mailbox: tuple[str, str]
) -> None:
    store = _imap_store(dovecot, *mailbox, folder="Never/Created")
    assert await store.list() == []
    assert await store.count_by_account() == {}
    with pytest.raises(KeyError):
        await store.get(make_id(1, 1))


@pytest.mark.integration
async def test_remove_expunges_the_maildir_file(
    dovecot: DovecotServer, mailbox: tuple[str, str]
) -> None:
    user, password = mailbox
    store = _imap_store(dovecot, user, password, tls=TlsMode.NONE)
    gone = await store.put(b"Subject: 1\r\n\r\n", INFO)
    kept = await store.put(b"Subject: 2\r\n\r\n", INFO)
    await store.remove(gone)
    (path,) = dovecot.maildir_files(user, "POP3 Connector.Dead Letters")
    assert b"Subject: 2" in path.read_bytes()
    assert [r.id for r in await store.list()] == [kept]
    # The same UID under another UIDVALIDITY is another message: unknown.
    uidvalidity, uid = parse_id(kept)
    with pytest.raises(KeyError):
        await store.get(make_id(uidvalidity + 1, uid))


@pytest.mark.integration
async def test_wrong_password_is_a_dead_letter_error_without_the_password(
    dovecot: DovecotServer, mailbox: tuple[str, str]
) -> None:
    user, _ = mailbox
    secret = "Wr0ng-Pa55word-\u00e9"
    store = _imap_store(dovecot, user, secret)
    with pytest.raises(DeadLetterError) as caught:
        await store.put(MESSAGE, INFO)
    assert "LOGIN answered NO [AUTHENTICATIONFAILED]" in caught.value.reason
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value.args)


@pytest.mark.integration
async def test_untrusted_certificate_is_a_dead_letter_error(
    dovecot: DovecotServer, mailbox: tuple[str, str]
) -> None:
    store = _imap_store(dovecot, *mailbox, ssl_context=ssl.create_default_context())
    with pytest.raises(DeadLetterError, match="certificate not trusted"):
        await store.put(MESSAGE, INFO)


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
