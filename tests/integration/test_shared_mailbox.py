"""Shared (catch-all, "multidrop") mailboxes end to end (issue 6): real Dovecot -> ``once`` ->
aiosmtpd playing Exchange, which refuses ``nobody@firma.local`` with ``550 5.1.1`` as Exchange
does for a mailbox that does not exist.

Every message ends where ``connector.recipients``' rules say, seen from the outside: the
sink's envelopes (``rcpt_tos``) and bytes (the original, byte for byte, after our Received:
line), the dead-letter Maildir (its ``X-POP3-Connector-Recipients`` line) and the Dovecot
mailbox (empty afterwards, or not, as docs/design.md §5.2 demands).  The commands run through
``cli.main``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from aiosmtpd.smtp import Envelope

from connector.deadletter import DeadLetterInfo, parse_dead_letter_headers
from connector.deadletter.maildir import MaildirStore
from tests.integration.conftest import Setup, strip_trace
from tests.servers import ReceivedMail

pytestmark = pytest.mark.integration

FALLBACK = "undeliverable@firma.local"
NOBODY = "nobody@firma.local"
UNKNOWN_USER = "550 5.1.1 <nobody@firma.local>: Recipient address rejected: User unknown"

# write_config appends this to the [[accounts]] table; the fallback replaces its deliver_to.
SHARED = """
[accounts.shared]
domains = ["firma.example"]
rewrite_domain = "firma.local"

[[accounts.shared.rules]]
match = "info@firma.example"
deliver_to = ["info@firma.local", "chef@firma.local"]

[[accounts.shared.rules]]
match = "dev-list@lists.example.org"
deliver_to = ["developers@firma.local"]
"""


def shared_setup(setup_factory: Callable[..., Setup], **kwargs: str) -> Setup:
    """One Dovecot mailbox configured as the shared mailbox of firma.example."""
    s = setup_factory(account_extra=SHARED, **kwargs)
    text = s.config.read_text()
    assert 'deliver_to = ["info@firma.test"]' in text
    s.config.write_text(
        text.replace('deliver_to = ["info@firma.test"]', f'deliver_to = ["{FALLBACK}"]')
    )
    return s


def mail(mid: str, headers: str, subject: str = "Hello") -> bytes:
    """A message as a provider's catch-all mailbox holds it; ``headers`` ends with CRLF."""
    return (
        f"Return-Path: <alice@customer.example>\r\n{headers}"
        f"From: Alice <alice@customer.example>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{mid}@customer.example>\r\n"
        f"Date: Mon, 2 Mar 2026 10:00:00 +0100\r\n\r\nBody of {mid}.\r\n"
    ).encode()


def refuse_nobody(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
    """Exchange without a mailbox nobody@: 550 5.1.1 to its RCPT (RFC 3463 X.1.1)."""
    if stage == "rcpt" and envelope.rcpt_tos[-1].lower() == NOBODY:
        return UNKNOWN_USER
    return None


def summary(out: str) -> str:
    """``once``'s counts line for the account (``delivered 1, dead-lettered 0, ...``)."""
    (line,) = [ln for ln in out.splitlines() if ln.startswith("info: ")]
    return line.split("; ", 1)[1].rsplit(" (", 1)[0]


@dataclass(frozen=True)
class Stored:
    id: str
    info: DeadLetterInfo
    original: bytes


def dead_letters(s: Setup, capsys: pytest.CaptureFixture[str]) -> list[Stored]:
    """Each dead letter via ``dead-letters list --json``, with its parsed header lines."""
    capsys.readouterr()
    assert s.run("dead-letters", "list", "--json") == 0
    records = json.loads(capsys.readouterr().out)["dead_letters"]
    store = MaildirStore(s.dead_letter_dir)
    out: list[Stored] = []
    for record in records:
        raw = asyncio.run(store.get(str(record["id"])))
        parsed = parse_dead_letter_headers(raw)
        assert parsed is not None
        info, offset = parsed
        assert (record["stage"], record["response"]) == (info.stage, info.response)
        out.append(Stored(str(record["id"]), info, raw[offset:]))
    return out


def arrived(got: ReceivedMail, raw: bytes, *rcpts: str, offered: int | None = None) -> None:
    """One transaction to exactly ``rcpts``, carrying ``raw`` unchanged after our Received:.

    ``offered``: how many recipients the envelope had (more when some were refused at RCPT);
    the Received: line names the recipient only when there was one (RFC 5321 §4.4 "for").
    """
    assert got.rcpt_tos == rcpts
    assert got.mail_from == "alice@customer.example"  # the message's own Return-Path
    assert strip_trace(got.data) == raw
    for_clause = f"\tfor <{rcpts[0]}>; ".encode()
    single = (len(rcpts) if offered is None else offered) == 1
    assert got.data.split(b"\r\n", 2)[1].startswith(for_clause) is single


def test_each_message_ends_where_the_rules_say(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = shared_setup(setup_factory)
    to_bob = mail("m1", "To: Bob <bob@firma.example>\r\n")
    to_bob_cc_carol = mail("m2", "To: bob@firma.example\r\nCc: Carol <carol@firma.example>\r\n")
    # Bcc'd: To names somebody else; the provider's MTA wrote the envelope recipient.
    bcc_dave = mail("m3", "Delivered-To: dave@firma.example\r\nTo: someone@else.example\r\n")
    mailing_list = mail(
        "m4", "To: Developers <dev-list@lists.example.org>\r\nList-Id: <dev.lists.example.org>\r\n"
    )
    unknown = mail("m5", "To: nobody@firma.example\r\n")
    partly_unknown = mail("m6", "To: bob@firma.example, nobody@firma.example\r\n")
    nobody_of_ours = mail("m7", "To: a@b.example\r\n")
    to_info = mail("m8", "To: info@firma.example\r\n")
    # The provider stores one copy per recipient: two identical copies for bob and carol (the
    # envelope headers are gone), and one whose Delivered-To names erin (Bcc'd).
    copy = mail("m9", "To: bob@firma.example\r\nCc: carol@firma.example\r\n")
    copy_erin = mail(
        "m9",
        "Delivered-To: erin@firma.example\r\nTo: bob@firma.example\r\nCc: carol@firma.example\r\n",
    )
    s.dovecot.deliver_many(
        s.user,
        [
            to_bob,
            to_bob_cc_carol,
            bcc_dave,
            mailing_list,
            unknown,
            partly_unknown,
            nobody_of_ours,
            to_info,
            copy,
            copy,
            copy_erin,
        ],
    )
    s.sink.handler.rule = refuse_nobody

    capsys.readouterr()
    assert s.run("once") == 0
    assert summary(capsys.readouterr().out) == (
        "delivered 9, dead-lettered 2, deferred 0, skipped 1"
    )
    got = s.received()
    assert len(got) == 9
    arrived(got[0], to_bob, "bob@firma.local")
    arrived(got[1], to_bob_cc_carol, "bob@firma.local", "carol@firma.local")
    arrived(got[2], bcc_dave, "dave@firma.local")
    arrived(got[3], mailing_list, "developers@firma.local")
    # (unknown: refused at RCPT, no transaction reached DATA)
    arrived(got[4], partly_unknown, "bob@firma.local", offered=2)
    arrived(got[5], nobody_of_ours, FALLBACK)
    arrived(got[6], to_info, "info@firma.local", "chef@firma.local")
    arrived(got[7], copy, "bob@firma.local", "carol@firma.local")
    arrived(got[8], copy_erin, "erin@firma.local")
    assert s.upstream() == []
    with s.ledger() as db:
        responses = [r[0] for r in db.execute("SELECT last_response FROM messages")]
    assert "duplicate: already delivered to bob@firma.local, carol@firma.local" in responses

    stored = dead_letters(s, capsys)
    assert len(stored) == 2
    by_original = {d.original: d for d in stored}
    whole = by_original[unknown]
    assert whole.info.stage == "rcpt"
    assert whole.info.recipients == (NOBODY,)
    assert whole.info.response == f"<{NOBODY}> {UNKNOWN_USER}"
    part = by_original[partly_unknown]
    assert part.info.stage == "rcpt"
    assert part.info.recipients == (NOBODY,)  # not bob: he has it
    assert part.info.response == f"<{NOBODY}> {UNKNOWN_USER}"
    for d in stored:
        raw = asyncio.run(MaildirStore(s.dead_letter_dir).get(d.id))
        assert b"X-POP3-Connector-Recipients: nobody@firma.local\r\n" in raw

    # Everything is finished: a second cycle sends nothing at all.
    transactions = s.sink.handler.transactions
    refusals = len(s.sink.handler.refused)
    assert s.run("once") == 0
    assert summary(capsys.readouterr().out) == (
        "delivered 0, dead-lettered 0, deferred 0, skipped 0"
    )
    assert (s.sink.handler.transactions, len(s.sink.handler.refused)) == (transactions, refusals)
    assert len(s.received()) == 9

    # Requeue (5) to an address the operator chose; nobody@ is still refused.
    assert s.run("dead-letters", "requeue", whole.id, "--to", "someone@firma.local") == 0
    (requeued,) = s.received()[9:]
    assert requeued.rcpt_tos == ("someone@firma.local",)
    assert requeued.data == unknown  # as it came from POP3: no Received:, no X-POP3-Connector-*

    # nobody@ exists now: requeue (6) without --to goes to the refused recipient only.
    s.sink.handler.rule = None
    assert s.run("dead-letters", "requeue", part.id) == 0
    (requeued,) = s.received()[10:]
    assert requeued.rcpt_tos == (NOBODY,)
    assert requeued.data == partly_unknown
    assert dead_letters(s, capsys) == []


def test_fallback_refused_stops_the_cycle_and_keeps_the_message(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    """A 550 to the configured fallback is our setup's fault (docs/design.md §6.1), not the
    message's: the cycle stops before the next RETR, nothing is dead-lettered, the message stays
    (docs/design.md §5.2, invariant 6)."""
    s = shared_setup(setup_factory)
    first = mail("f1", "To: bob@firma.example\r\n")
    stray = mail("f2", "To: a@b.example\r\n")
    after = mail("f3", "To: carol@firma.example\r\n")
    s.dovecot.deliver_many(s.user, [first, stray, after])

    def refuse_fallback(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
        if stage == "rcpt" and envelope.rcpt_tos[-1] == FALLBACK:
            return "550 5.1.1 <undeliverable@firma.local>: User unknown"
        return None

    s.sink.handler.rule = refuse_fallback
    assert s.run("once") == 1
    (got,) = s.received()
    arrived(got, first, "bob@firma.local")
    assert s.upstream() == [stray, after]  # first DELEd (its QUIT went out), the rest kept
    assert not s.dead_letter_dir.exists() or dead_letters(s, capsys) == []
    with s.ledger() as db:
        states = [r[0] for r in db.execute("SELECT state FROM messages")]
    assert states == ["delivered"]

    # Fixed: the next cycle delivers both.
    s.sink.handler.rule = None
    assert s.run("once") == 0
    arrived(s.received()[1], stray, FALLBACK)
    arrived(s.received()[2], after, "carol@firma.local")
    assert s.upstream() == []


def test_recipient_deferred_gets_it_next_cycle_and_nobody_twice(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = shared_setup(setup_factory)
    raw = mail("t1", "To: bob@firma.example, carol@firma.example\r\n")
    s.dovecot.deliver_many(s.user, [raw])
    answered: list[str] = []

    def busy_once(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
        # RFC 3463 4.2.1: the mailbox is busy for now; only the first time.
        if stage == "rcpt" and envelope.rcpt_tos[-1] == "carol@firma.local" and not answered:
            answered.append("451")
            return "451 4.2.1 Mailbox busy, try again later"
        return None

    s.sink.handler.rule = busy_once
    capsys.readouterr()
    assert s.run("once") == 0
    assert summary(capsys.readouterr().out) == (
        "delivered 0, dead-lettered 0, deferred 1, skipped 0"
    )
    (got,) = s.received()
    arrived(got, raw, "bob@firma.local", offered=2)
    assert s.upstream() == [raw]
    with s.ledger() as db:
        assert [r[0] for r in db.execute("SELECT state FROM messages")] == ["deferred"]

    assert s.run("once") == 0
    assert summary(capsys.readouterr().out) == (
        "delivered 1, dead-lettered 0, deferred 0, skipped 0"
    )
    arrived(s.received()[1], raw, "carol@firma.local")
    assert len(s.received()) == 2
    assert s.upstream() == []
    assert not s.dead_letter_dir.exists() or dead_letters(s, capsys) == []


def test_requeue_refused_for_one_recipient_keeps_a_dead_letter_for_it(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    """A dead letter for two recipients, requeued while one of them is busy (451): the other
    gets it, and the busy one must keep a dead letter (docs/design.md §9: no message is lost)."""
    s = shared_setup(setup_factory)
    raw = mail("r1", "To: nobody@firma.example, ghost@firma.example\r\n")
    s.dovecot.deliver_many(s.user, [raw])
    s.sink.handler.rule = lambda stage, env, data: (
        "550 5.1.1 User unknown" if stage == "rcpt" else None
    )
    assert s.run("once") == 0
    (stored,) = dead_letters(s, capsys)
    assert stored.info.recipients == (NOBODY, "ghost@firma.local")
    assert s.received() == []

    # nobody@ exists now; ghost@'s mailbox is busy for the moment.
    s.sink.handler.rule = lambda stage, env, data: (
        "451 4.2.1 Mailbox busy"
        if stage == "rcpt" and env.rcpt_tos[-1] == "ghost@firma.local"
        else None
    )
    s.run("dead-letters", "requeue", stored.id)
    (got,) = s.received()
    assert got.rcpt_tos == (NOBODY,)
    assert got.data == raw
    (left,) = dead_letters(s, capsys)  # fails today: the dead letter is removed
    assert left.info.recipients == ("ghost@firma.local",)
    assert left.original == raw


def test_a_reused_message_id_with_another_body_is_delivered_but_copies_are_not(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    """Duplicate suppression goes by Message-ID and body.  Sent to info@ (info and chef) and
    to chef@, the provider stores one copy for each, differing only in trace fields: chef gets
    it once.  A later message reusing the Message-ID with another body (a broken mailer, a
    forgery) is no copy: it reaches chef too, and is not DELEd unseen."""
    s = shared_setup(setup_factory)
    to_info = mail("d1", "Delivered-To: info@firma.example\r\n", subject="Invoice")
    to_chef = mail(
        "d1",
        "Delivered-To: chef@firma.example\r\n"
        "Received: from mx2.provider.example; Mon, 2 Mar 2026 10:00:02 +0100\r\n",
        subject="Invoice",
    )
    reused = to_chef.replace(b"Body of d1.", b"Please pay to another account.")
    assert reused != to_chef
    s.dovecot.deliver_many(s.user, [to_info, to_chef, reused])

    capsys.readouterr()
    assert s.run("once") == 0
    assert summary(capsys.readouterr().out) == (
        "delivered 2, dead-lettered 0, deferred 0, skipped 1"
    )
    got = s.received()
    assert len(got) == 2
    arrived(got[0], to_info, "info@firma.local", "chef@firma.local")
    arrived(got[1], reused, "chef@firma.local")
    assert s.upstream() == []
    with s.ledger() as db:
        responses = [r[0] for r in db.execute("SELECT last_response FROM messages")]
    assert "duplicate: already delivered to chef@firma.local" in responses

    # Nothing left: a second cycle sends nothing.
    assert s.run("once") == 0
    assert len(s.received()) == 2


def test_expired_after_some_of_several_deliver_to_got_it_requeue_goes_to_the_others(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    """An ordinary account with two deliver_to addresses; b's mailbox stays busy (451) past
    max_deferral after a got the message.  The dead letter names b, so that requeue sends it
    to b alone: a must not get it twice."""
    s = setup_factory()
    text = s.config.read_text()
    a, b = "a@firma.local", "b@firma.local"
    s.config.write_text(
        text.replace('deliver_to = ["info@firma.test"]', f'deliver_to = ["{a}", "{b}"]')
    )
    raw = mail("x1", "To: info@firma.example\r\n")
    s.dovecot.deliver_many(s.user, [raw])
    s.sink.handler.rule = lambda stage, env, data: (
        "451 4.2.1 Mailbox busy" if stage == "rcpt" and env.rcpt_tos[-1] == b else None
    )

    capsys.readouterr()
    assert s.run("once") == 0
    assert summary(capsys.readouterr().out) == (
        "delivered 0, dead-lettered 0, deferred 1, skipped 0"
    )
    (got,) = s.received()
    arrived(got, raw, a, offered=2)
    assert s.upstream() == [raw]

    s.age_deferrals(6 * 86400)  # past max_deferral (5 days by default)
    assert s.run("once") == 0
    assert summary(capsys.readouterr().out) == (
        "delivered 0, dead-lettered 1, deferred 0, skipped 0"
    )
    assert len(s.received()) == 1  # the retry offered it to b only; b refused again
    assert s.upstream() == []
    (stored,) = dead_letters(s, capsys)
    assert (stored.info.stage, stored.info.recipients) == ("expired", (b,))
    assert stored.original == raw

    s.sink.handler.rule = None  # b is back
    assert s.run("dead-letters", "requeue", stored.id) == 0
    (requeued,) = s.received()[1:]
    assert requeued.rcpt_tos == (b,)
    assert requeued.data == raw
    assert dead_letters(s, capsys) == []
