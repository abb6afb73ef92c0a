"""The folder as the cycle's session (connector/imap/session.py) against the built-in loopback
IMAP server: listing, fetching, flagging and expunging, with and without UIDPLUS."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from connector.budget import MemoryBudget
from connector.errors import (
    Disposition,
    ImapResponseError,
    Pop3ProtocolError,
    classify,
)
from connector.imap.client import ImapClient
from connector.loopback_imap import LoopbackImapServer
from tests.component.test_imap_client import PASSWORD, TOKEN, USER, mail, session


@pytest.fixture
async def server() -> AsyncIterator[LoopbackImapServer]:
    async with LoopbackImapServer({USER: PASSWORD}, xoauth2_tokens={USER: TOKEN}) as srv:
        yield srv


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


async def test_the_memory_budget_bounds_what_one_fetch_brings(
    server: LoopbackImapServer,
) -> None:
    """Each message is charged its RFC822.SIZE before its FETCH (docs/design.md §15.1): with
    room for one and a half messages, the messages come one FETCH at a time, and the budget
    is whole again at the end (and after a caller that stops early)."""
    size = len(mail(0))
    for i in range(4):
        server.add_message(USER, mail(i))
    budget = MemoryBudget(size + size // 2)
    async with await session(server) as s:
        await s.stat()  # as the cycle does: STAT, then the listing
        listing = [n for n, _ in await s.uidl()]
        got = [r.raw async for r in s.retrieve_many(listing, budget=budget)]
        assert got == [mail(i) for i in range(4)]
        assert server.commands.count("UID FETCH") == 1 + 4  # the listing, then one each
        assert (budget.in_use, budget.peak) == (0, size)
        roomy = MemoryBudget(10 * size)
        stream = s.retrieve_many(listing, budget=roomy)
        first = await anext(stream)
        assert first.raw == mail(0)
        assert roomy.in_use == 4 * size  # one FETCH for all four
        await stream.aclose()  # the caller stops early: its charges are given back
        assert roomy.in_use == 0


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
