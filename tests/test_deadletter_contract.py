"""The contract of the dead-letter stores (docs/design.md §7.2), one suite over every store.

Every :class:`~connector.deadletter.DeadLetterStore` and every
:class:`~connector.deadletter.DeadLetterArchive` passes the same tests (trio's
``check_two_way_stream``):

* ``maildir``: the durable Maildir store (connector/deadletter/maildir.py);
* ``memory``: the in-memory fake the cycle's tests run on (tests/fakes.py);
* ``reconciling``: :class:`~connector.deadletter.reconcile.ReconcilingStore` over a Maildir
  store, as the service configures it;
* ``recording``: :class:`~connector.notices.RecordingStore`, which only puts and removes; the
  tests read what it stored from the store it wraps;
* ``imaps`` and ``imap``: the IMAP store against the session's Dovecot (marked integration).

A test that stores bytes IMAP cannot carry verbatim (NUL, bare CR or LF; RFC 3501 §4.3) runs
on the others only; tests/integration/test_deadletter_imap.py checks the IMAP form of it.
What one store alone does (Maildir's fsyncs and modes, IMAP's folders and faults) is in the
test file of its module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import pytest

from connector.deadletter import (
    HEADER_BLOCK_MAX,
    DeadLetterArchive,
    DeadLetterInfo,
    DeadLetterStore,
    parse_dead_letter_headers,
    strip_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.deadletter.imap import ImapStore
from connector.deadletter.maildir import MaildirStore
from connector.deadletter.reconcile import ReconcilingStore
from connector.notices import RecordingStore
from connector.tls import TlsMode
from tests.fakes import InMemoryDeadLetterStore
from tests.servers import DovecotServer
from tests.unit.test_deadletter import addresses, recipients_info

WHEN = dt.datetime(2026, 11, 27, 15, 49, 35, tzinfo=dt.UTC)
INFO = DeadLetterInfo("info", "00000001650a1b2c", "data", "554 5.1.0 Sender denied", WHEN)
MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody line\r\n.\r\n..dots\r\n"
EXPECTED_HEADERS = (
    b"X-POP3-Connector-Account: info\r\n"
    b"X-POP3-Connector-UIDL: 00000001650a1b2c\r\n"
    b"X-POP3-Connector-Stage: data\r\n"
    b"X-POP3-Connector-Response: 554 5.1.0 Sender denied\r\n"
    b"X-POP3-Connector-Failed-At: 2026-11-27T15:49:35Z\r\n"
)


def info(account: str = "info", uidl: str = "u1", minute: int = 0) -> DeadLetterInfo:
    return DeadLetterInfo(
        account, uidl, "data", "554 5.1.0 Sender denied", WHEN.replace(minute=minute)
    )


@dataclass
class Stores:
    """The store under test, and the archive that shows what it stored (the same object for
    every store but ``recording``)."""

    store: DeadLetterStore
    archive: DeadLetterArchive


async def _none_recorded() -> Collection[str]:
    return ()


def _maildir(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    store = MaildirStore(tmp_path / "dead-letters")
    return Stores(store, store)


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    store = InMemoryDeadLetterStore()
    return Stores(store, store)


def _reconciling(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    store = ReconcilingStore(MaildirStore(tmp_path / "dead-letters"), _none_recorded)
    return Stores(store, store)


def _recording(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    inner = InMemoryDeadLetterStore()
    return Stores(RecordingStore(inner), inner)


def _imap(tls: TlsMode) -> Callable[[pytest.FixtureRequest, Path], Stores]:
    def make(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
        dovecot: DovecotServer = request.getfixturevalue("dovecot")
        user, password = dovecot.add_user()
        implicit = tls is TlsMode.IMPLICIT
        store = ImapStore(
            "localhost" if implicit else "127.0.0.1",
            dovecot.ports["imaps" if implicit else "imap"],
            tls,
            dovecot.client_context() if implicit else None,
            user,
            password,
            "POP3 Connector/Dead Letters",
            timeout=10,
        )
        return Stores(store, store)

    return make


_VERBATIM = [
    pytest.param(_maildir, id="maildir"),
    pytest.param(_memory, id="memory"),
    pytest.param(_reconciling, id="reconciling"),
    pytest.param(_recording, id="recording"),
]
_IMAP = [
    pytest.param(_imap(TlsMode.IMPLICIT), id="imaps", marks=pytest.mark.integration),
    pytest.param(_imap(TlsMode.NONE), id="imap", marks=pytest.mark.integration),
]


@pytest.fixture(params=_VERBATIM + _IMAP)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    """Every store."""
    make: Callable[[pytest.FixtureRequest, Path], Stores] = request.param
    return make(request, tmp_path)


@pytest.fixture(params=_VERBATIM)
def verbatim(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    """Every store that keeps any bytes as they are (all but IMAP)."""
    make: Callable[[pytest.FixtureRequest, Path], Stores] = request.param
    return make(request, tmp_path)


async def test_put_get_keeps_the_bytes_after_our_headers(verbatim: Stores) -> None:
    raw = MESSAGE + bytes(range(256)) + b"\rlone CR\nlone LF\r\n" + b"x" * 100_000
    id = await verbatim.store.put(raw, INFO)
    stored = await verbatim.archive.get(id)
    assert stored == EXPECTED_HEADERS + raw
    assert strip_dead_letter_headers(stored) == raw


async def test_list_and_count(stores: Stores) -> None:
    store, archive = stores.store, stores.archive
    assert await archive.list() == []
    assert await archive.count_by_account() == {}
    later = await store.put(b"Subject: 2\r\n\r\n", info("info", "u2", minute=50))
    earlier = await store.put(MESSAGE, info("info", "u1", minute=10))
    other = await store.put(b"", info("sales", "s1", minute=30))
    assert len({later, earlier, other}) == 3

    records = await archive.list()
    assert [(r.id, r.account, r.uidl) for r in records] == [
        (earlier, "info", "u1"),
        (other, "sales", "s1"),
        (later, "info", "u2"),
    ]
    first = records[0]
    assert (first.stage, first.response) == ("data", "554 5.1.0 Sender denied")
    assert first.failed_at == WHEN.replace(minute=10)
    assert first.size == len(MESSAGE)
    assert records[1].size == 0
    assert await archive.count_by_account() == {"info": 2, "sales": 1}


async def test_remove_and_unknown_ids(stores: Stores) -> None:
    store, archive = stores.store, stores.archive
    id = await store.put(MESSAGE, INFO)
    keep = await store.put(MESSAGE, info(uidl="u2"))
    await store.remove(id)
    assert [r.id for r in await archive.list()] == [keep]
    with pytest.raises(KeyError):
        await archive.get(id)
    with pytest.raises(KeyError):
        await store.remove(id)
    with pytest.raises(KeyError):
        await archive.get("no-such-id")


async def test_sanitised_values_are_listed_as_written(stores: Stores) -> None:
    await stores.store.put(
        MESSAGE, DeadLetterInfo("info", "u1", "data", "550\r\n  spam\tdetected", WHEN)
    )
    (record,) = await stores.archive.list()
    assert record.response == "550 spam detected"


async def test_a_folded_recipients_field_is_kept(stores: Stores) -> None:
    dl = recipients_info(addresses(40))
    id = await stores.store.put(MESSAGE, dl)
    (record,) = await stores.archive.list()
    assert (record.id, record.size) == (id, len(MESSAGE))
    stored = await stores.archive.get(id)
    assert parse_dead_letter_headers(stored) == (dl, len(stored) - len(MESSAGE))
    assert strip_dead_letter_headers(stored) == MESSAGE


async def test_a_recipients_field_longer_than_the_head_is_listed(stores: Stores) -> None:
    dl = recipients_info(addresses(300))
    assert len(with_dead_letter_headers(MESSAGE, dl)) > HEADER_BLOCK_MAX
    short = await stores.store.put(MESSAGE, DeadLetterInfo("info", "u2", "data", "554", WHEN))
    id = await stores.store.put(MESSAGE, dl)
    records = {r.id: r for r in await stores.archive.list()}
    assert set(records) == {id, short}
    assert (records[id].account, records[id].size) == ("catchall", len(MESSAGE))
    assert records[short].size == len(MESSAGE)
    assert await stores.archive.count_by_account() == {"catchall": 1, "info": 1}
