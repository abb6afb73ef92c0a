"""The cycle (docs/design.md §5) against the loopback servers, a real ledger and real Maildir.

Dovecot plays the POP3 server in tests/integration; here the loopback server does, because it can
also lack UIDL, lock the mailbox or refuse logins in the ways a test needs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from connector.cycle import (
    BREAKER_THRESHOLD,
    SETTLE_EVERY,
    AccountSpec,
    Cycle,
    DeliveryPolicy,
    Outcome,
    Oversize,
    stand_in_uidl,
)
from connector.deadletter import parse_dead_letter_headers
from connector.deadletter.maildir import MaildirStore
from connector.errors import (
    DeadLetterError,
    DeliveryError,
    Disposition,
    LedgerError,
    Pop3AuthError,
    Pop3ConnectionError,
    Pop3ResponseError,
    classify,
)
from connector.ledger import Ledger, MessageState
from connector.loopback import LoopbackPop3Server, LoopbackSmtpSink, SmtpRule
from connector.pop3 import AuthMethod, Pop3Endpoint
from connector.recipients import Rule, SharedMailbox
from connector.smtp import Envelope, SenderPolicy, SmtpDeliverer, SmtpSettings
from connector.tls import TlsMode
from tests.fakes import InMemoryDeadLetterStore
from tests.peek import smtp_connected, total_changes

USER, PASSWORD = "info@firma.example", "pop-secret"


def mail(i: int, sender: str = "a@customer.example") -> bytes:
    return f"Return-Path: <{sender}>\r\nSubject: m{i}\r\n\r\nbody {i}\r\n".encode()


@dataclass
class Recorder:
    events: list[tuple[str, Outcome, str]] = field(default_factory=list)

    def message(self, account: str, uidl: str, size: int, outcome: Outcome, response: str) -> None:
        self.events.append((uidl, outcome, response))

    def outcomes(self) -> list[Outcome]:
        return [o for _, o, _ in self.events]


@dataclass
class Rig:
    pop: LoopbackPop3Server
    sink: LoopbackSmtpSink
    ledger: Ledger
    store: MaildirStore | InMemoryDeadLetterStore
    now: float = 1_800_000_000.0

    def spec(self, **kw: object) -> AccountSpec:
        args: dict[str, object] = {
            "name": "info",
            "endpoint": Pop3Endpoint("127.0.0.1", self.pop.port, TlsMode.NONE),
            "username": USER,
            "password": PASSWORD,
            "auth": AuthMethod.AUTO,
            "deliver_to": ("info@firma.local",),
            "max_deferral": 5 * 86400.0,
        }
        args.update(kw)
        return AccountSpec(**args)  # type: ignore[arg-type]

    async def cycle(self, recorder: Recorder | None = None, **kw: object) -> Cycle:
        deliverer = SmtpDeliverer(
            SmtpSettings("127.0.0.1", self.sink.port, TlsMode.NONE, None, "connector.test")
        )
        c = Cycle(
            self.spec(**kw),
            ledger=self.ledger,
            store=self.store,
            deliverer=deliverer,
            policy=DeliveryPolicy(SenderPolicy.RETURN_PATH, None, "connector.test"),
            observer=recorder or Recorder(),
            clock=lambda: self.now,
        )
        return c


async def make_rig(
    tmp_path: Path, rule: SmtpRule | None = None, **pop_options: object
) -> AsyncIterator[Rig]:
    pop = LoopbackPop3Server({USER: PASSWORD}, **pop_options)  # type: ignore[arg-type]
    sink = LoopbackSmtpSink(rule)
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    async with pop, sink:
        try:
            yield Rig(pop, sink, ledger, MaildirStore(tmp_path / "dead"))
        finally:
            await ledger.close()
    assert pop.errors == []
    assert sink.errors == []


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async for r in make_rig(tmp_path):
        yield r


def deny(sender_domain: str, reply: str = "554 5.1.0 Sender denied") -> SmtpRule:
    def rule(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        return reply if stage == "data" and sender.endswith(sender_domain) else None

    return rule


async def test_delivers_records_and_deletes(rig: Rig) -> None:
    for i in range(3):
        rig.pop.add_message(USER, mail(i))
    rec = Recorder()
    stats = await (await rig.cycle(rec)).run()
    assert (stats.mailbox_messages, stats.delivered) == (3, 3)
    assert [m.data.split(b"\r\n", 2)[2] for m in rig.sink.messages] == [mail(i) for i in range(3)]
    assert rig.pop.mailboxes[USER] == []
    assert rec.outcomes() == [Outcome.DELIVERED] * 3
    entry = await rig.ledger.entry("info", rig.pop.deleted[0])
    assert entry is not None
    assert entry.state is MessageState.DELIVERED


async def test_left_upstream_is_what_the_quit_did_not_delete(tmp_path: Path) -> None:
    """What ``status`` shows as waiting upstream: STAT minus what this cycle's QUIT deleted
    (the only message delivered: 0, not STAT's 1)."""
    async for rig in make_rig(tmp_path, deny("@grey.example", "451 4.7.1 later")):
        rig.pop.add_message(USER, mail(1))
        stats = await (await rig.cycle()).run()
        assert (stats.mailbox_messages, stats.left_upstream) == (1, (0, 0))
        rig.pop.add_message(USER, mail(2))
        grey = mail(3, "x@grey.example")
        rig.pop.add_message(USER, grey)
        stats = await (await rig.cycle()).run()
        assert stats.mailbox_messages == 2
        assert stats.left_upstream == (1, len(grey))  # the deferred one, LIST's octets


async def test_known_uidl_is_only_deleted_never_sent_again(rig: Rig) -> None:
    uid = rig.pop.add_message(USER, mail(1))
    await rig.ledger.sync_listing("info", [uid])
    await rig.ledger.record_delivered("info", uid, 10, "250 ok", rig.now)
    rec = Recorder()
    stats = await (await rig.cycle(rec)).run()
    assert stats.skipped == 1
    assert rig.sink.messages == []
    assert rig.pop.mailboxes[USER] == []
    assert "RETR" not in rig.pop.commands


async def test_refused_mail_costs_nothing_on_the_next_cycle(tmp_path: Path) -> None:
    async for rig in make_rig(tmp_path, deny("@bad.example")):
        for i in range(10):
            rig.pop.add_message(USER, mail(i, "x@bad.example"))
        stats = await (await rig.cycle()).run()
        assert stats.dead_lettered == 10
        assert len(await rig.store.list()) == 10
        rig.pop.add_message(USER, mail(99))
        rig.pop.commands.clear()
        stats = await (await rig.cycle()).run()
        assert (stats.delivered, stats.dead_lettered, stats.skipped) == (1, 0, 0)
        assert rig.pop.commands.count("RETR") == 1


async def test_server_without_uidl_falls_back_to_digests(tmp_path: Path) -> None:
    async for rig in make_rig(tmp_path, uidl=False):
        rig.pop.add_message(USER, mail(1))
        rig.pop.add_message(USER, mail(1))  # byte-identical copies: numbered
        rig.pop.add_message(USER, mail(2))
        rec = Recorder()
        await (await rig.cycle(rec)).run()
        uids = [u for u, _, _ in rec.events]
        assert uids[0] == stand_in_uidl(mail(1))
        assert uids[1] == uids[0] + "#2"
        headers = mail(2).split(b"\r\n\r\n")[0] + b"\r\n\r\n"  # what TOP n 0 returns
        assert uids[2] == stand_in_uidl(headers, len(mail(2)))
        assert len(rig.sink.messages) == 3


async def test_without_uidl_an_identity_never_depends_on_the_other_messages(
    tmp_path: Path,
) -> None:
    """Same headers, different bodies: one delivered, one deferred.  Alone in the mailbox next
    cycle, the deferred one must not be taken for the delivered one (and deleted unseen)."""

    def defer_b(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        return "451 4.7.1 later" if stage == "data" and data and b"BBBB" in data else None

    async for rig in make_rig(tmp_path, defer_b, uidl=False):
        head = b"Return-Path: <a@customer.example>\r\nSubject: same\r\n\r\n"
        rig.pop.add_message(USER, head + b"AAAA\r\n")
        rig.pop.add_message(USER, head + b"BBBB\r\n")
        stats = await (await rig.cycle()).run()
        assert (stats.delivered, stats.deferred) == (1, 1)
        stats = await (await rig.cycle()).run()
        assert stats.skipped == 0
        assert stats.deferred == 1
        assert rig.pop.mailboxes[USER] == [head + b"BBBB\r\n"]


async def test_a_temporary_uidl_error_is_not_taken_for_a_missing_uidl(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.pop.add_message(USER, mail(1))

    async def busy(self: object) -> list[tuple[int, str]]:
        raise Pop3ResponseError("UIDL", "try later", "SYS/TEMP")

    monkeypatch.setattr("connector.pop3.client.Pop3Client.uidl", busy)
    with pytest.raises(Pop3ResponseError):
        await (await rig.cycle()).run()
    assert rig.sink.messages == []


async def test_a_message_over_the_size_limit_is_dead_lettered_unsent_by_default(
    rig: Rig,
) -> None:
    big = mail(2, "a@customer.example") + b"x" * 5000 + b"\r\n"
    rig.pop.add_message(USER, mail(1))
    rig.pop.add_message(USER, big)
    rig.pop.add_message(USER, mail(3))
    stats = await (await rig.cycle(max_message_size=1000)).run()
    assert (stats.delivered, stats.dead_lettered, stats.oversize_left) == (2, 1, [])
    assert rig.pop.mailboxes[USER] == []
    assert len(rig.sink.messages) == 2  # the big one never went to SMTP
    (record,) = await rig.store.list()
    assert record.stage == "size"
    assert record.response.startswith("552 5.3.4 message of")
    assert "max_message_size of 1000" in record.response
    assert await rig.store.get(record.id) == await rig.store.get(record.id)
    assert (await rig.store.get(record.id)).endswith(big)


async def test_a_message_over_the_size_limit_is_left_upstream_with_oversize_leave(
    rig: Rig,
) -> None:
    rig.pop.add_message(USER, mail(1))
    rig.pop.add_message(USER, mail(2, "a@customer.example") + b"x" * 5000 + b"\r\n")
    rig.pop.add_message(USER, mail(3))
    stats = await (await rig.cycle(max_message_size=1000, oversize=Oversize.LEAVE)).run()
    assert stats.delivered == 2
    assert len(rig.pop.mailboxes[USER]) == 1
    assert [size for _, size in stats.oversize_left] == [len(rig.pop.mailboxes[USER][0])]
    assert rig.pop.commands.count("RETR") == 2  # the big one is never fetched
    assert await rig.store.list() == []
    # Next cycle: the same, and nothing else happens to it.
    stats = await (await rig.cycle(max_message_size=1000, oversize=Oversize.LEAVE)).run()
    assert (stats.delivered, len(stats.oversize_left)) == (0, 1)


async def test_in_use_mailbox_fails_the_cycle_for_retry(tmp_path: Path) -> None:
    async for rig in make_rig(tmp_path, lock_mailbox=True):
        rig.pop.add_message(USER, mail(1))
        rig.pop.locked.add(USER)
        with pytest.raises(Pop3ResponseError) as info:
            await (await rig.cycle()).run()
        assert info.value.resp_code == "IN-USE"
        assert classify(info.value) is Disposition.RETRY
        assert rig.sink.messages == []


async def test_wrong_password_parks_the_account(rig: Rig) -> None:
    with pytest.raises(Pop3AuthError) as info:
        await (await rig.cycle(password="wrong")).run()
    assert classify(info.value) is Disposition.PARK_ACCOUNT
    assert "wrong" not in str(info.value)


async def test_dead_letter_store_failure_deletes_nothing(tmp_path: Path) -> None:
    async for rig in make_rig(tmp_path, deny("@bad.example")):
        rig.store = InMemoryDeadLetterStore()
        rig.store.fail_put = True
        rig.pop.add_message(USER, mail(1))
        rig.pop.add_message(USER, mail(2, "x@bad.example"))
        rig.pop.add_message(USER, mail(3))
        with pytest.raises(DeadLetterError):
            await (await rig.cycle()).run()
        # The first was delivered and deleted (QUIT went out); the refused one stays upstream,
        # and the cycle stopped before fetching the third.
        assert [m.split(b"\r\n")[1] for m in rig.pop.mailboxes[USER]] == [
            b"Subject: m2",
            b"Subject: m3",
        ]
        assert len(rig.sink.messages) == 1
        entry = await rig.ledger.entry("info", rig.pop.uidls(USER)[0])
        assert entry is None


async def test_deferral_then_expiry(tmp_path: Path) -> None:
    def greylist(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        return "451 4.7.1 Try later" if stage == "rcpt" else None

    async for rig in make_rig(tmp_path, greylist):
        uid = rig.pop.add_message(USER, mail(1))
        stats = await (await rig.cycle()).run()
        assert stats.deferred == 1
        rig.now += 86400
        stats = await (await rig.cycle()).run()
        assert stats.deferred == 1
        entry = await rig.ledger.entry("info", uid)
        assert entry is not None
        assert (entry.state, entry.attempts) == (MessageState.DEFERRED, 2)
        rig.now += 4 * 86400
        rec = Recorder()
        stats = await (await rig.cycle(rec)).run()
        assert stats.dead_lettered == 1
        assert rec.events[0][2] == "expired: 451 4.7.1 Try later"
        (record,) = await rig.store.list()
        assert (record.stage, record.response) == ("expired", "451 4.7.1 Try later")
        assert rig.pop.mailboxes[USER] == []


async def test_smtp_down_stops_before_any_retr_and_deletes_nothing(rig: Rig) -> None:
    rig.pop.add_message(USER, mail(1))
    await rig.sink.stop()
    with pytest.raises(DeliveryError) as info:
        await (await rig.cycle()).run()
    assert info.value.stage.is_setup
    assert classify(info.value) is Disposition.RETRY
    assert len(rig.pop.mailboxes[USER]) == 1
    assert await rig.store.list() == []


async def test_stop_between_messages_still_quits(tmp_path: Path) -> None:
    stopping = asyncio.Event()

    def sigterm_during_first(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> None:
        if stage == "data":
            stopping.set()  # as if SIGTERM came while this message was in flight

    async for rig in make_rig(tmp_path, sigterm_during_first):
        for i in range(5):
            rig.pop.add_message(USER, mail(i))
        cycle = await rig.cycle()
        cycle.stopping = stopping
        stats = await cycle.run()
        assert stats.stopped_early
        assert stats.delivered == 1  # the one in flight was finished
        assert len(rig.pop.mailboxes[USER]) == 4  # and its DELE took effect: QUIT was sent


# -- leave_on_server / delete_after ---------------------------------------------------------------

DAY = 86400.0


async def test_leave_on_server_over_cycles_then_delete_after_expires(rig: Rig) -> None:
    keep_for = 7 * DAY
    t0 = rig.now
    old = [rig.pop.add_message(USER, mail(i)) for i in range(3)]
    stats = await (await rig.cycle(leave_on_server=True, delete_after=keep_for)).run()
    assert (stats.delivered, stats.kept, stats.skipped) == (3, 0, 0)
    assert "DELE" not in rig.pop.commands
    assert rig.pop.uidls(USER) == old

    rig.now = t0 + DAY
    new = [rig.pop.add_message(USER, mail(i)) for i in range(3, 5)]
    rig.pop.commands.clear()
    stats = await (await rig.cycle(leave_on_server=True, delete_after=keep_for)).run()
    assert (stats.delivered, stats.kept, stats.skipped) == (2, 3, 0)
    assert rig.pop.commands.count("RETR") == 2  # only the new ones
    assert "DELE" not in rig.pop.commands

    rig.now = t0 + 7 * DAY - 1  # not yet
    rec = Recorder()
    stats = await (await rig.cycle(rec, leave_on_server=True, delete_after=keep_for)).run()
    assert (stats.delivered, stats.kept, stats.skipped) == (0, 5, 0)
    assert rec.events == []
    assert rig.pop.uidls(USER) == old + new

    rig.now = t0 + 7 * DAY  # the first three were delivered exactly delete_after ago
    stats = await (await rig.cycle(rec, leave_on_server=True, delete_after=keep_for)).run()
    # Removed, not "skipped" (the word for what a crash left behind, and for duplicates).
    assert (stats.delivered, stats.kept, stats.removed, stats.skipped) == (0, 2, 3, 0)
    assert [(u, o) for u, o, _ in rec.events] == [(u, Outcome.REMOVED) for u in old]
    assert rig.pop.deleted == old
    assert rig.pop.uidls(USER) == new

    rig.now = t0 + 8 * DAY
    stats = await (await rig.cycle(leave_on_server=True, delete_after=keep_for)).run()
    assert (stats.delivered, stats.kept, stats.removed) == (0, 0, 2)
    assert rig.pop.deleted == old + new
    # Nothing was ever delivered twice.
    bodies = [m.data.split(b"\r\n", 2)[2] for m in rig.sink.messages]
    assert bodies == [mail(i) for i in range(5)]


async def test_kept_messages_cost_one_listing_and_no_per_message_commands(rig: Rig) -> None:
    """Kept messages: a cycle sends the same few commands as for an empty mailbox, writes
    nothing to the ledger and reports nothing per message (2,000 here to stay fast; nothing in
    the path depends on the count)."""
    uids = [rig.pop.add_message(USER, mail(i)) for i in range(2_000)]
    await rig.ledger.sync_listing("info", uids)
    for uid in uids[:-1]:  # as if delivered by earlier cycles
        await rig.ledger.record_delivered("info", uid, 50, "250 ok", rig.now)
    stats = await (await rig.cycle(leave_on_server=True)).run()
    assert (stats.delivered, stats.kept) == (1, 1_999)

    rig.pop.commands.clear()
    changes = await total_changes(rig.ledger)
    rec = Recorder()
    rig.now += 30 * DAY
    stats = await (await rig.cycle(rec, leave_on_server=True)).run()
    assert (stats.delivered, stats.skipped, stats.kept) == (0, 0, 2_000)
    assert rig.pop.commands.count("UIDL") == 1
    assert not {"RETR", "TOP", "DELE"} & set(rig.pop.commands)
    assert len(rig.pop.commands) < 10  # greeting-to-QUIT overhead only
    assert await total_changes(rig.ledger) == changes
    assert rec.events == []
    assert len(rig.sink.messages) == 1
    assert len(rig.pop.uidls(USER)) == 2_000


async def test_leave_on_server_keeps_dead_letters_and_retries_deferrals(tmp_path: Path) -> None:
    def rule(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        if stage == "data" and sender.endswith("@bad.example"):
            return "554 5.1.0 Sender denied"
        if stage == "data" and sender.endswith("@grey.example"):
            return "451 4.7.1 Try later"
        return None

    async for rig in make_rig(tmp_path, rule):
        keep_for = 2 * DAY
        t0 = rig.now
        bad = rig.pop.add_message(USER, mail(1, "x@bad.example"))
        grey = rig.pop.add_message(USER, mail(2, "x@grey.example"))
        stats = await (await rig.cycle(leave_on_server=True, delete_after=keep_for)).run()
        assert (stats.dead_lettered, stats.deferred) == (1, 1)
        rig.now = t0 + DAY
        rig.pop.commands.clear()
        stats = await (await rig.cycle(leave_on_server=True, delete_after=keep_for)).run()
        # The dead letter stays upstream, is not stored again; the deferral is retried.
        assert (stats.dead_lettered, stats.deferred, stats.kept) == (0, 1, 1)
        assert rig.pop.commands.count("RETR") == 1
        assert len(await rig.store.list()) == 1
        assert rig.pop.uidls(USER) == [bad, grey]
        rig.now = t0 + 2 * DAY  # delete_after counts from the dead-lettering
        stats = await (await rig.cycle(leave_on_server=True, delete_after=keep_for)).run()
        assert (stats.removed, stats.deferred) == (1, 1)
        assert rig.pop.uidls(USER) == [grey]
        entry = await rig.ledger.entry("info", grey)
        assert entry is not None
        assert (entry.state, entry.attempts) == (MessageState.DEFERRED, 3)


async def test_leave_on_server_without_delete_after_never_deletes(rig: Rig) -> None:
    uid = rig.pop.add_message(USER, mail(1))
    await (await rig.cycle(leave_on_server=True)).run()
    rig.now += 3650 * DAY
    stats = await (await rig.cycle(leave_on_server=True)).run()
    assert (stats.kept, stats.skipped) == (1, 0)
    assert rig.pop.uidls(USER) == [uid]
    # Turned off again: the kept message is DELEd on the next cycle, not delivered again.
    stats = await (await rig.cycle()).run()
    assert (stats.skipped, stats.delivered) == (1, 0)
    assert rig.pop.deleted == [uid]
    assert len(rig.sink.messages) == 1


async def test_a_finished_message_over_the_size_limit_is_still_deleted(rig: Rig) -> None:
    """The size limit is about fetching; a message done before is never fetched again."""
    uid = rig.pop.add_message(USER, mail(1) + b"x" * 5000 + b"\r\n")
    await (await rig.cycle()).run()  # delivered and deleted...
    assert rig.pop.deleted == [uid]
    uid = rig.pop.add_message(USER, mail(2) + b"x" * 5000 + b"\r\n")
    await (await rig.cycle(leave_on_server=True)).run()  # ...this one kept
    stats = await (await rig.cycle(max_message_size=1000)).run()  # then the limit lowered
    assert (stats.skipped, stats.delivered) == (1, 0)
    assert rig.pop.deleted[-1] == uid


# -- several recipients: a shared mailbox's copies, partial deliveries ---------------------------

SHARED = SharedMailbox(
    domains=frozenset({"firma.example"}),
    rules=(Rule("info@firma.example", ("info@firma.local", "chef@firma.local")),),
    rewrite_domain="firma.local",
)


def copy_for(delivered_to: str, body: str, mx: str = "mx1") -> bytes:
    """A provider's copy of one message (always the same Message-ID) for one recipient: its
    trace fields at the top name that recipient and the provider's host."""
    return (
        f"Delivered-To: {delivered_to}\r\n"
        f"Received: from {mx}.provider.example; Mon, 2 Mar 2026 10:00:0{len(mx)} +0100\r\n"
        "Return-Path: <a@customer.example>\r\n"
        "Message-ID: <m1@customer.example>\r\n"
        f"Subject: invoice\r\n\r\n{body}\r\n"
    ).encode()


async def test_the_same_message_id_with_another_body_is_delivered_not_dropped(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken mailer or a forger reuses a Message-ID: the second message is not a copy of
    the first, and dropping it (then DELEing it) would lose it."""
    first = copy_for("bob@firma.example", "The invoice.")
    second = copy_for("bob@firma.example", "Another message, the same Message-ID.")
    rig.pop.add_message(USER, first)
    uid = rig.pop.add_message(USER, second)
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="connector.cycle"):
        stats = await (await rig.cycle(rec, shared=SHARED)).run()
    assert (stats.delivered, stats.skipped) == (2, 0)
    assert rec.outcomes() == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert [(m.recipients, m.data.split(b"\r\n", 2)[2]) for m in rig.sink.messages] == [
        (("bob@firma.local",), first),
        (("bob@firma.local",), second),
    ]
    assert rig.pop.mailboxes[USER] == []
    (line,) = [r for r in caplog.records if "different body" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert line.getMessage() == (
        f"account=info uidl={uid} Message-ID <m1@customer.example> came before with a "
        "different body: not a copy, delivered as a message of its own"
    )


async def test_copies_that_differ_only_in_trace_fields_are_still_suppressed(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Sent to info@ (info and chef) and to chef@: the provider stores one copy for each, with
    its own Delivered-To and Received.  chef gets it once."""
    to_info = copy_for("info@firma.example", "The invoice.")
    to_chef = copy_for("chef@firma.example", "The invoice.", mx="mx22")
    rig.pop.add_message(USER, to_info)
    rig.pop.add_message(USER, to_chef)
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="connector.cycle"):
        stats = await (await rig.cycle(rec, shared=SHARED)).run()
    assert (stats.delivered, stats.skipped) == (1, 1)
    (got,) = rig.sink.messages
    assert got.recipients == ("info@firma.local", "chef@firma.local")
    assert rec.events[1][1:] == (
        Outcome.SKIPPED,
        "duplicate: already delivered to chef@firma.local",
    )
    assert rig.pop.mailboxes[USER] == []
    assert not [r for r in caplog.records if "different body" in r.getMessage()]


async def test_expired_after_some_recipients_got_it_the_dead_letter_names_the_others(
    tmp_path: Path,
) -> None:
    """deliver_to a and b; b defers until max_deferral is past.  The dead letter must name b
    only: ``dead-letters requeue`` sends it to the recipients it names, else to all of
    deliver_to, and a would get it twice."""

    def b_busy(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        busy = stage == "rcpt" and rcpts[-1] == "b@firma.local"
        return "451 4.2.1 Mailbox busy" if busy else None

    async for rig in make_rig(tmp_path, b_busy):
        both = ("a@firma.local", "b@firma.local")
        uid = rig.pop.add_message(USER, mail(1))
        stats = await (await rig.cycle(deliver_to=both)).run()
        assert stats.deferred == 1
        rig.now += 86400
        stats = await (await rig.cycle(deliver_to=both)).run()  # retried for b only
        assert stats.deferred == 1
        rig.now += 5 * 86400
        stats = await (await rig.cycle(deliver_to=both)).run()
        assert stats.dead_lettered == 1
        assert [m.recipients for m in rig.sink.messages] == [("a@firma.local",)]
        assert rig.pop.mailboxes[USER] == []
        (record,) = await rig.store.list()
        assert (record.uidl, record.stage) == (uid, "expired")
        parsed = parse_dead_letter_headers(await rig.store.get(record.id))
        assert parsed is not None
        assert parsed[0].recipients == ("b@firma.local",)


async def test_expired_for_every_recipient_the_dead_letter_names_nobody(tmp_path: Path) -> None:
    """Nobody got it: requeue goes to the account's deliver_to, as for one recipient."""

    def busy(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        return "451 4.2.1 Mailbox busy" if stage == "rcpt" else None

    async for rig in make_rig(tmp_path, busy):
        both = ("a@firma.local", "b@firma.local")
        rig.pop.add_message(USER, mail(1))
        assert (await (await rig.cycle(deliver_to=both)).run()).deferred == 1
        rig.now += 6 * 86400
        assert (await (await rig.cycle(deliver_to=both)).run()).dead_lettered == 1
        (record,) = await rig.store.list()
        parsed = parse_dead_letter_headers(await rig.store.get(record.id))
        assert parsed is not None
        assert parsed[0].recipients == ()


async def test_who_got_a_deferred_message_is_remembered_however_long_the_pause(
    tmp_path: Path,
) -> None:
    """The connector is down (or the account parked) for longer than max_deferral plus a day:
    the retry still knows that a has the message, and sends it to b only."""

    def b_busy(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        busy = stage == "rcpt" and rcpts[-1] == "b@firma.local"
        return "451 4.2.1 Mailbox busy" if busy else None

    async for rig in make_rig(tmp_path, b_busy):
        both = ("a@firma.local", "b@firma.local")
        rig.pop.add_message(USER, mail(1))
        assert (await (await rig.cycle(deliver_to=both)).run()).deferred == 1
        rig.now += 30 * 86400
        rig.sink.rule = None  # b is back
        stats = await (await rig.cycle(deliver_to=both)).run()
        assert stats.delivered == 1
        assert [m.recipients for m in rig.sink.messages] == [
            ("a@firma.local",),
            ("b@firma.local",),
        ]


async def test_a_failed_ledger_commit_keeps_its_message_upstream_and_stops_the_cycle(
    rig: Rig,
) -> None:
    # The delivered rows are group-committed while the cycle goes on (Ledger.record_delivered
    # _soon); their DELEs wait for the commit.  A commit that fails (a real SQLite abort, from a
    # trigger) must leave its message upstream and stop the cycle before much more is sent.
    uids = [rig.pop.add_message(USER, mail(i)) for i in range(6)]
    await rig.ledger._submit(
        "trigger",
        lambda conn: conn.execute(
            "CREATE TEMP TRIGGER fail_one BEFORE INSERT ON main.messages"
            f" WHEN NEW.uidl = '{uids[1]}' BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        ),
    )
    with pytest.raises(LedgerError, match="disk says no"):
        await (await rig.cycle()).run()
    upstream = rig.pop.uidls(USER)
    # m0 committed and deleted; m1's commit failed: kept; m2's content waited for that commit
    # and was never sent.
    assert upstream == uids[1:]
    assert [m.data.rsplit(b"\r\n", 2)[-2] for m in rig.sink.messages] == [b"body 0", b"body 1"]
    for uid in uids:
        entry = await rig.ledger.entry("info", uid)
        # Invariant 1: deleted only with a committed row.
        assert (uid in upstream) == (entry is None), uid


async def test_deles_wait_for_the_group_commit_of_their_rows(rig: Rig) -> None:
    # More messages than one settle batch: every DELE follows its committed row.
    uids = [rig.pop.add_message(USER, mail(i)) for i in range(2 * SETTLE_EVERY + 3)]
    stats = await (await rig.cycle()).run()
    assert stats.delivered == len(uids)
    assert rig.pop.mailboxes[USER] == []
    assert rig.pop.deleted == uids
    for uid in uids:
        entry = await rig.ledger.entry("info", uid)
        assert entry is not None
        assert entry.state is MessageState.DELIVERED


async def test_a_commit_that_fails_slowly_still_stops_the_cycle_before_the_next_message(
    rig: Rig,
) -> None:
    # Another process holds the ledger's write lock (SQLite waits out its busy timeout), so the
    # first row's commit fails late: the next message's content waits for it, so nothing more
    # is delivered (each would be delivered again next cycle).
    for i in range(6):
        rig.pop.add_message(USER, mail(i))
    await rig.ledger._submit(
        "trigger",
        lambda conn: conn.execute(
            "CREATE TEMP TRIGGER fail_all BEFORE INSERT ON main.messages"
            " BEGIN SELECT RAISE(ABORT, 'database is locked'); END"
        ),
    )
    gate = threading.Event()
    queue = rig.ledger.record_delivered_soon
    first = True

    def busy_then_queue(*args: Any, **kwargs: Any) -> int:
        nonlocal first
        if first:  # the ledger thread is busy when the first row is queued
            first = False
            rig.ledger._executor.submit(gate.wait, 10)
            asyncio.get_running_loop().call_later(0.2, gate.set)
        return queue(*args, **kwargs)

    rig.ledger.record_delivered_soon = busy_then_queue  # type: ignore[method-assign]
    with pytest.raises(LedgerError, match="database is locked"):
        await (await rig.cycle()).run()
    assert len(rig.sink.messages) == 1
    assert len(rig.pop.uidls(USER)) == 6


async def test_before_content_can_still_stop_a_message(rig: Rig) -> None:
    # The hook runs after the 354; what it raises leaves the message unsent, the connection
    # closed (the server must not take half a message), and the next message reconnects.
    class Stop(Exception):
        pass

    async def refuse() -> None:
        raise Stop

    deliverer = SmtpDeliverer(
        SmtpSettings("127.0.0.1", rig.sink.port, TlsMode.NONE, None, "connector.test")
    )
    envelope = Envelope("a@customer.example", ("info@firma.local",), sender_fixed=False)
    async with deliverer:
        with pytest.raises(Stop):
            await deliverer.deliver(mail(1), envelope, before_content=refuse)
        assert not smtp_connected(deliverer)
        called: list[bool] = []

        async def allow() -> None:
            called.append(True)

        delivered = await deliverer.deliver(mail(2), envelope, before_content=allow)
    assert called == [True]
    assert delivered.response.startswith("250")
    assert [m.data for m in rig.sink.messages] == [mail(2)]


async def test_a_pop3_error_in_before_content_is_not_taken_for_an_smtp_failure(rig: Rig) -> None:
    # The hook sends DELEs; a POP3 drop there is an OSError, like an SMTP drop.  It must come
    # out as itself (the cycle's POP3 failure), not as a DeliveryError at DATA, which would
    # defer or even dead-letter a message Exchange never refused, and the session must not
    # be left in the middle of DATA.
    deliverer = SmtpDeliverer(
        SmtpSettings("127.0.0.1", rig.sink.port, TlsMode.NONE, None, "connector.test")
    )
    envelope = Envelope("a@customer.example", ("info@firma.local",), sender_fixed=False)

    async def pop3_dropped() -> None:
        raise Pop3ConnectionError("the server closed the connection")

    async with deliverer:
        with pytest.raises(Pop3ConnectionError):
            await deliverer.deliver(mail(1), envelope, before_content=pop3_dropped)
        assert not smtp_connected(deliverer)
        delivered = await deliverer.deliver(mail(2), envelope)
    assert delivered.response.startswith("250")
    assert [m.data for m in rig.sink.messages] == [mail(2)]


# --------------------------------------------------------------------------------------------
# The circuit breaker of docs/design.md §6.2 (more end to end in tests/integration/test_exchange.py)
# --------------------------------------------------------------------------------------------


async def test_held_mail_waits_quietly_when_a_shutdown_comes_before_it_is_decided_again(
    tmp_path: Path,
) -> None:
    # The breaker trips at the fifth refused sender and holds it; a good message then gets
    # through, but SIGTERM comes before the held one is fetched again: it stays upstream
    # untouched (no ledger row), and the cycle ends without blaming the SMTP target.
    stopping = asyncio.Event()

    def rule(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        if stage == "mail" and sender.endswith("@bad.example"):
            return "554 5.1.0 Sender denied"
        if stage == "data":
            stopping.set()  # the good message is being delivered: stop after it
        return None

    async for rig in make_rig(tmp_path, rule):
        spam = [mail(i, f"s{i}@bad.example") for i in range(BREAKER_THRESHOLD)]
        for raw in [*spam, mail(99), mail(100)]:
            rig.pop.add_message(USER, raw)
        held_uidl = rig.pop.uidls(USER)[BREAKER_THRESHOLD - 1]
        cycle = await rig.cycle()
        cycle.stopping = stopping
        stats = await cycle.run()
        assert (stats.dead_lettered, stats.delivered, stats.stopped_early) == (
            BREAKER_THRESHOLD - 1,
            1,
            True,
        )
        assert rig.pop.mailboxes[USER] == [spam[-1], mail(100)]
        assert await rig.ledger.entry("info", held_uidl) is None
        assert await rig.ledger.breaker("info") is None  # the good message reset it
