"""connector.deadletter.imap against the session's Dovecot, IMAPS and plain: folders created and
named right on disk, the bytes, flags and INTERNALDATE, login and certificate failures.

The contract every store passes, this one over Dovecot too: tests/test_deadletter_contract.py;
mailbox names without a server: tests/unit/test_deadletter_imap.py; faults Dovecot will not
produce on request, against a scripted server: tests/component/test_deadletter_imap.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import ssl
from pathlib import Path

import pytest

from connector.deadletter import (
    DeadLetterInfo,
    dead_letter_head,
    strip_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.deadletter.imap import (
    ImapStore,
    make_id,
    parse_id,
)
from connector.errors import DeadLetterError
from connector.tls import TlsMode
from tests.servers import DovecotServer
from tests.unit.test_spool import spooled

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


# -- a spooled message (docs/design.md §5.3): the APPEND literal streamed from its file -------

# Lines starting with ".", a 200,000-character line, ~5 MiB of base64: IMAP carries CRLF lines
# verbatim (a bare LF or CR has no place in an IMAP literal of a message).
SPOOLED_IMAP = (
    b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n...\r\n"
    + b"A" * 200_000
    + b"\r\n.after\r\n"
    + (b"QUJD" * 19 + b"\r\n") * (5 * 1024 * 1024 // 78)
)


@pytest.mark.integration
async def test_the_imap_store_appends_a_spooled_message_byte_for_byte(
    dovecot: DovecotServer, mailbox: tuple[str, str], tmp_path: Path
) -> None:
    user, password = mailbox
    for tls in (TlsMode.IMPLICIT, TlsMode.NONE):
        store = ImapStore(
            "localhost" if tls is TlsMode.IMPLICIT else "127.0.0.1",
            dovecot.ports["imaps" if tls is TlsMode.IMPLICIT else "imap"],
            tls,
            dovecot.client_context() if tls is TlsMode.IMPLICIT else None,
            user,
            password,
            "Spool/Dead Letters",
            timeout=10,
        )
        message = await spooled(tmp_path / tls.value, SPOOLED_IMAP)
        id = await store.put(message, INFO)
        stored = await store.get(id)
        assert stored == dead_letter_head(message, INFO) + SPOOLED_IMAP
        assert b"".join([c async for c in store.chunks(id)]) == stored  # partial FETCHes
        (record,) = [r for r in await store.list() if r.id == id]
        assert record.size == len(SPOOLED_IMAP)
