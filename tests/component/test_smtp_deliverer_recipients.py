"""SmtpDeliverer with a shared mailbox's envelope: recipients read from the message, some from
the config, refused one by one at RCPT.

docs/design.md §6.1: a permanent refusal of a recipient read from the message is about the
message (the others get it, a copy naming the refused one is dead-lettered); a permanent refusal
of a recipient from the config (the fallback, a rule's target) is our setup's fault: the
transaction is abandoned before any content goes out, and the account is parked.

Every case runs against two real servers: aiosmtpd (tests/servers.py SmtpSink, which offers no
PIPELINING, so commands go one at a time) and connector.loopback's sink (which offers RFC 2920
PIPELINING, so MAIL, the RCPTs and DATA go out in one write and DATA is answered 354 before we
know the RCPT replies).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiosmtplib
import pytest

from connector.errors import DeliveryError, Disposition, SmtpStage, classify
from connector.loopback import LoopbackSmtpSink
from connector.smtp import Delivered, Envelope, SmtpDeliverer, SmtpSettings
from connector.tls import TlsMode
from tests.servers import SmtpSink

SENDER = "owner@example.test"
FALLBACK = "undeliverable@firma.local"
BOB = "bob@firma.local"
ALICE = "alice@firma.local"
MESSAGE = b"Return-Path: <owner@example.test>\r\nTo: bob@firma.example\r\n\r\nHello.\r\n"
NO_SUCH_USER = "550 5.1.1 User unknown"

# (stage "mail"/"rcpt"/"data", the recipient on offer at "rcpt") -> a refusal line, or None.
Refuse = Callable[[str, str | None], str | None]


@dataclass
class Server:
    """One of the two sinks behind a common face."""

    kind: str
    port: int
    set_rule: Callable[[Refuse], None]
    received: Callable[[], list[tuple[tuple[str, ...], bytes]]]
    data_transactions: Callable[[], int]  # content received and answered, accepted or not


async def offers_pipelining(port: int) -> bool:
    """Whether the server's EHLO offers PIPELINING (RFC 2920), which decides our code path."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        await smtp.ehlo()
        return smtp.supports_extension("pipelining")


@pytest.fixture(params=["aiosmtpd", "loopback-pipelining"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    if request.param == "aiosmtpd":
        sink: SmtpSink = request.getfixturevalue("smtp_sink")

        assert not await offers_pipelining(sink.port)  # commands one at a time

        def set_rule_aiosmtpd(refuse: Refuse) -> None:
            sink.handler.rule = lambda stage, env, data: refuse(
                stage, env.rcpt_tos[-1] if stage == "rcpt" else None
            )

        yield Server(
            "aiosmtpd",
            sink.port,
            set_rule_aiosmtpd,
            lambda: [(m.rcpt_tos, m.data) for m in sink.received],
            lambda: sink.handler.transactions,
        )
        return
    async with LoopbackSmtpSink() as loop_sink:
        assert await offers_pipelining(loop_sink.port)  # MAIL, RCPTs, DATA in one write
        data_seen: list[bytes] = []

        def set_rule_loopback(refuse: Refuse) -> None:
            def rule(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
                if data is not None:
                    data_seen.append(data)
                return refuse(stage, rcpts[-1] if stage == "rcpt" else None)

            loop_sink.rule = rule

        set_rule_loopback(lambda stage, rcpt: None)
        yield Server(
            "loopback-pipelining",
            loop_sink.port,
            set_rule_loopback,
            lambda: [(m.recipients, m.data) for m in loop_sink.messages],
            lambda: len(data_seen),
        )
        assert loop_sink.errors == []


def refuse_rcpt(replies: dict[str, str]) -> Refuse:
    """Refuse RCPT TO the addresses in ``replies`` with their reply line; accept the rest."""
    return lambda stage, rcpt: replies.get(rcpt or "") if stage == "rcpt" else None


def deliverer(port: int) -> SmtpDeliverer:
    return SmtpDeliverer(
        SmtpSettings(
            host="127.0.0.1",
            port=port,
            tls=TlsMode.NONE,
            ssl_context=None,
            helo_name="connector.test",
            timeout=5.0,
        )
    )


def shared_envelope(*recipients: str, configured: frozenset[str] = frozenset()) -> Envelope:
    return Envelope(
        SENDER,
        recipients,
        sender_fixed=False,
        recipients_fixed=False,
        configured=configured | {FALLBACK},
    )


async def deliver(server: Server, env: Envelope) -> Delivered:
    async with deliverer(server.port) as d:
        return await d.deliver(MESSAGE, env)


async def refused(server: Server, env: Envelope) -> DeliveryError:
    async with deliverer(server.port) as d:
        with pytest.raises(DeliveryError) as info:
            await d.deliver(MESSAGE, env)
        # The deliverer is still usable: the next message (nobody refused) goes through.
        server.set_rule(lambda stage, rcpt: None)
        await d.deliver(b"Subject: next\r\n\r\nnext\r\n", Envelope(SENDER, (ALICE,), False))
    return info.value


# --------------------------------------------------------------------------------------------
# (a) a recipient read from the message refused permanently, another accepted
# --------------------------------------------------------------------------------------------


async def test_message_recipient_refused_permanently_others_get_it(server: Server) -> None:
    server.set_rule(refuse_rcpt({BOB: NO_SUCH_USER}))
    delivered = await deliver(server, shared_envelope(BOB, ALICE))
    assert delivered.response.startswith("250 ")
    assert delivered.refused == {BOB: NO_SUCH_USER}
    assert delivered.permanent == frozenset({BOB})
    assert server.received() == [((ALICE,), MESSAGE)]


async def test_refused_recipient_keeps_its_spelling_in_refused(server: Server) -> None:
    bob = "Bob@Firma.Local"
    server.set_rule(refuse_rcpt({bob: NO_SUCH_USER}))
    delivered = await deliver(server, shared_envelope(bob, ALICE))
    assert (dict(delivered.refused), delivered.permanent) == ({bob: NO_SUCH_USER}, frozenset({bob}))


async def test_permanent_is_read_as_the_refusal_text_is_classified(server: Server) -> None:
    # The enhanced code is followed by a tab, not a space: the recorded refusal (one printable
    # line, "450 5.1.1\x09...") has no enhanced code, so it is a 450, temporary: Bob's copy is
    # deferred, not dead-lettered (the same reading as every RCPT refusal, refused_permanently).
    server.set_rule(refuse_rcpt({BOB: "450 5.1.1\tover quota", ALICE: "550 4.2.2\tfull"}))
    delivered = await deliver(server, shared_envelope(BOB, ALICE, "carol@firma.local"))
    assert delivered.refused == {
        BOB: "450 5.1.1\\x09over quota",
        ALICE: "550 4.2.2\\x09full",
    }
    assert delivered.permanent == frozenset({ALICE})


# --------------------------------------------------------------------------------------------
# (b) a recipient from the config refused permanently: abort before the content, park
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipients", "configured", "refused_one"),
    [
        pytest.param((BOB, FALLBACK), frozenset(), FALLBACK, id="fallback-last"),
        pytest.param((FALLBACK, BOB), frozenset(), FALLBACK, id="fallback-first"),
        pytest.param(
            (BOB, "Info@Firma.Local"),
            frozenset({"info@firma.local"}),
            "Info@Firma.Local",
            id="rule-target-case-insensitive",
        ),
    ],
)
async def test_configured_recipient_refused_permanently_aborts_the_transaction(
    server: Server, recipients: tuple[str, ...], configured: frozenset[str], refused_one: str
) -> None:
    server.set_rule(refuse_rcpt({refused_one: "550 5.1.1 No such mailbox"}))
    err = await refused(server, shared_envelope(*recipients, configured=configured))
    assert err.stage is SmtpStage.RCPT
    assert (err.smtp_code, err.enhanced_code) == (550, "5.1.1")
    assert err.per_message is False
    assert classify(err) is Disposition.PARK_ACCOUNT
    assert dict(err.refused) == {refused_one: "550 5.1.1 No such mailbox"}
    # Nobody got this message: not bob, whose RCPT was accepted (only the next one arrived).
    assert server.received() == [((ALICE,), b"Subject: next\r\n\r\nnext\r\n")]
    assert server.data_transactions() == 1


async def test_configured_and_message_recipient_both_refused_permanently_parks(
    server: Server,
) -> None:
    server.set_rule(refuse_rcpt({BOB: NO_SUCH_USER, FALLBACK: "550 5.7.1 Relay denied"}))
    err = await refused(server, shared_envelope(BOB, FALLBACK, ALICE))
    assert (err.per_message, classify(err)) == (False, Disposition.PARK_ACCOUNT)
    assert err.smtp_code == 550
    assert err.enhanced_code == "5.7.1"
    assert server.data_transactions() == 1  # only the next message


async def test_configured_recipient_refused_temporarily_does_not_abort(server: Server) -> None:
    server.set_rule(refuse_rcpt({FALLBACK: "451 4.3.0 Try later"}))
    delivered = await deliver(server, shared_envelope(BOB, FALLBACK))
    assert delivered.refused == {FALLBACK: "451 4.3.0 Try later"}
    assert delivered.permanent == frozenset()
    assert server.received() == [((BOB,), MESSAGE)]


# --------------------------------------------------------------------------------------------
# (c) every recipient read from the message refused permanently: the message's fault
# --------------------------------------------------------------------------------------------


async def test_all_message_recipients_refused_permanently_is_about_the_message(
    server: Server,
) -> None:
    server.set_rule(refuse_rcpt({BOB: NO_SUCH_USER, ALICE: "550 5.2.1 Mailbox disabled"}))
    err = await refused(server, shared_envelope(BOB, ALICE))
    assert err.stage is SmtpStage.RCPT
    assert err.per_message is True
    assert classify(err) is Disposition.DEAD_LETTER
    assert dict(err.refused) == {BOB: NO_SUCH_USER, ALICE: "550 5.2.1 Mailbox disabled"}
    assert server.data_transactions() == 1  # only the next message


async def test_all_refused_one_of_them_temporarily_is_a_retry(server: Server) -> None:
    server.set_rule(refuse_rcpt({BOB: NO_SUCH_USER, ALICE: "450 4.2.1 Mailbox busy"}))
    err = await refused(server, shared_envelope(BOB, ALICE))
    assert classify(err) is Disposition.RETRY
    assert (err.smtp_code, err.enhanced_code) == (450, "4.2.1")
    assert dict(err.refused) == {BOB: NO_SUCH_USER, ALICE: "450 4.2.1 Mailbox busy"}


# --------------------------------------------------------------------------------------------
# (d), (e) refused temporarily, another accepted: delivered, nothing permanent
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "452 4.2.2 Mailbox full",
        "450 Mailbox unavailable",
        # RFC 5321 §4.5.3.1.10: a 552 to RCPT ("too many recipients") is to be taken as 452.
        "552 Too many recipients",
    ],
)
async def test_recipient_refused_temporarily_another_accepted(server: Server, reply: str) -> None:
    server.set_rule(refuse_rcpt({BOB: reply}))
    delivered = await deliver(server, shared_envelope(BOB, ALICE))
    assert delivered.refused == {BOB: reply}
    assert delivered.permanent == frozenset()
    assert server.received() == [((ALICE,), MESSAGE)]


async def test_552_to_every_rcpt_is_a_retry(server: Server) -> None:
    server.set_rule(refuse_rcpt({BOB: "552 Too many recipients", FALLBACK: "552 Too many"}))
    err = await refused(server, shared_envelope(BOB, FALLBACK))
    # A 552 to a configured recipient is not "permanent": no park, no dead letter.
    assert classify(err) is Disposition.RETRY
    assert err.smtp_code == 552
