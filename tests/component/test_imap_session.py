"""The folder as the cycle's session (connector/imap/session.py) against the built-in loopback
IMAP server: listing, fetching, flagging and expunging, with and without UIDPLUS; messages
above the spool threshold streamed into the spool (docs/design.md §5.3, §15.1), also through a
whole cycle whose connection is cut in the middle of one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connector.budget import MemoryBudget
from connector.cycle import AccountSpec, Cycle, DeliveryPolicy
from connector.deadletter.maildir import MaildirStore
from connector.errors import (
    Disposition,
    ImapResponseError,
    Pop3ConnectionError,
    Pop3ProtocolError,
    classify,
)
from connector.imap import ImapOptions
from connector.imap.client import ImapClient
from connector.ledger import Ledger, MessageState
from connector.loopback import LoopbackSmtpSink
from connector.loopback_imap import LoopbackImapServer
from connector.pop3 import AuthMethod
from connector.pop3.client import Spooling
from connector.smtp import SenderPolicy, SmtpDeliverer, SmtpSettings
from connector.spool import Spool, SpoolWriter
from connector.tls import TlsMode
from tests.component.test_imap_client import PASSWORD, TOKEN, USER, endpoint, mail, session


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


# --------------------------------------------------------------------------------------------
# Messages above the spool threshold (docs/design.md §5.3, §15.1)
# --------------------------------------------------------------------------------------------

ABOVE = 10_000  # the spool threshold of these tests


def big(n: int, size: int) -> bytes:
    """A message of about ``size`` octets, with lines that start with "." and one of up to
    200,000 characters, and no final line end (the loopback server adds one, as Dovecot
    does not: tests/integration/test_spool.py has Dovecot's)."""
    head = f"Subject: big {n}\r\nMessage-ID: <big.{n}@x>\r\n\r\n.dot first\r\n".encode()
    long = b"L" * min(200_000, size // 2) + b"\r\n"
    body = head + long + b"..two dots\r\n"
    return body + (b"y" * 70 + b"\r\n") * ((size - len(body)) // 72) + b"no final newline"


class WatchedSpool(Spool):
    """A spool that counts the octets its writers took (to show a message was streamed)."""

    written = 0

    def writer(self, *, digest_body: bool = False) -> SpoolWriter:
        spool = self

        class Counting(SpoolWriter):
            async def write(self, data: bytes) -> None:
                await super().write(data)
                spool.written += len(data)

        return Counting(self.directory, digest_body=digest_body)


def spool_in(tmp_path: Path) -> WatchedSpool:
    spool = WatchedSpool(tmp_path / "spool")
    spool.clean()
    return spool


async def test_large_messages_come_as_spool_files_small_ones_in_memory_in_order(
    server: LoopbackImapServer, tmp_path: Path
) -> None:
    raws = [mail(1), big(2, 300_000), mail(3), big(4, 50_000), mail(5)]
    uids = [server.add_message(USER, raw) for raw in raws]
    spool = spool_in(tmp_path)
    budget = MemoryBudget(4 * ABOVE)
    got: list[tuple[bytes, bool]] = []
    async with await session(server) as s:
        await s.stat()
        async for item in s.retrieve_many(
            uids, spooling=Spooling(ABOVE, spool.writer), budget=budget
        ):
            if item.spooled is not None:
                assert item.raw == b""
                assert item.spooled.size == item.spooled.path.stat().st_size
                got.append((item.spooled.path.read_bytes(), True))
                item.spooled.remove()
            else:
                got.append((item.raw, False))
    assert got == [(raw, len(raw) > ABOVE) for raw in server.messages(USER)]
    assert spool.written == sum(len(m) for m in server.messages(USER) if len(m) > ABOVE)
    assert list(spool.directory.iterdir()) == []
    # Charged as a streamed POP3 RETR is: the threshold at most, never a message's size.
    assert 0 < budget.peak <= 4 * ABOVE
    assert budget.in_use == 0


async def test_an_early_stop_or_a_cut_leaves_no_spool_file(
    server: LoopbackImapServer, tmp_path: Path
) -> None:
    uids = [server.add_message(USER, big(n, 100_000)) for n in range(4)]
    spool = spool_in(tmp_path)
    async with await session(server) as s:
        await s.stat()
        stream = s.retrieve_many(uids, spooling=Spooling(ABOVE, spool.writer))
        first = await anext(stream)
        assert first.spooled is not None
        first.spooled.remove()
        await stream.aclose()  # the rest of the FETCH is read and dropped by the next command
        await s.dele(uids[0])
        await s.quit()
    assert len(server.messages(USER)) == 3
    assert list(spool.directory.iterdir()) == []

    server.cut_fetch_after = 150_000  # inside the second message's literal
    written = spool.written
    async with await session(server) as s:
        await s.stat()

        async def consume() -> None:
            async for item in s.retrieve_many(uids[1:], spooling=Spooling(ABOVE, spool.writer)):
                assert item.spooled is not None
                item.spooled.remove()  # the caller's, as the cycle does once it is handled

        with pytest.raises(Pop3ConnectionError):
            await consume()
    assert spool.written - written > 100_000  # the first one whole, the second in part
    assert list(spool.directory.iterdir()) == []


async def test_a_connection_cut_inside_a_spooled_message_costs_a_cycle_not_the_message(
    server: LoopbackImapServer, tmp_path: Path
) -> None:
    """The cut in the middle of the literal: the spool file goes, the message stays upstream
    and undelivered; the next cycle delivers it once, byte for byte, and the one after sends
    nothing."""
    raw = big(1, 400_000)
    uid = server.add_message(USER, raw)
    server.cut_fetch_after = 250_000
    spool = spool_in(tmp_path)
    budget = MemoryBudget(2 * ABOVE)
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    spec = AccountSpec(
        name="info",
        endpoint=endpoint(server),
        username=USER,
        password=PASSWORD,
        auth=AuthMethod.AUTO,
        deliver_to=("info@firma.local",),
        max_deferral=5 * 86400.0,
        imap=ImapOptions(),
    )
    async with LoopbackSmtpSink() as sink:
        try:

            def cycle() -> Cycle:
                deliverer = SmtpDeliverer(
                    SmtpSettings("127.0.0.1", sink.port, TlsMode.NONE, None, "connector.test")
                )
                return Cycle(
                    spec,
                    ledger=ledger,
                    store=MaildirStore(tmp_path / "dead"),
                    deliverer=deliverer,
                    policy=DeliveryPolicy(SenderPolicy.RETURN_PATH, None, "connector.test"),
                    spool=spool,
                    spool_threshold=ABOVE,
                    budget=budget,
                )

            with pytest.raises(Pop3ConnectionError):
                await cycle().run()
            assert spool.written > 200_000  # it was being streamed into a spool file
            assert list(spool.directory.iterdir()) == []
            assert server.messages(USER) == [raw + b"\r\n"]
            assert sink.messages == []
            assert budget.in_use == 0

            server.cut_fetch_after = None
            stats = await cycle().run()
            assert stats.delivered == 1
            (got,) = sink.messages
            assert got.data.split(b"\r\n", 2)[2] == raw + b"\r\n"  # after our Received: line
            assert server.messages(USER) == []
            assert list(spool.directory.iterdir()) == []
            entry = await ledger.entry("info", f"imap:{server.folder(USER).uidvalidity}:{uid}")
            assert entry is not None
            assert entry.state is MessageState.DELIVERED

            stats = await cycle().run()
            assert (stats.mailbox_messages, stats.delivered) == (0, 0)
            assert len(sink.messages) == 1
        finally:
            await ledger.close()
