"""Does a 5xx at MAIL or RCPT depend on the message?  The deliverer finds out by testing
(docs/design.md §6.2), against peers that answer like Exchange and Postfix (tests/smtp_peers.py).

One mechanism for both stages: the session's record of what it accepted for real messages
(another sender accepted at MAIL; the same fixed recipient accepted for another sender at RCPT),
else a probe on the same connection after the refusal's RSET (``MAIL FROM:<>``, and ``RCPT TO``
the refused recipient, then RSET).  Each case runs against a server that pipelines (RFC 2920:
MAIL, RCPT and DATA go out in one write) and one that does not.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator

import aiosmtplib
import pytest

from connector.errors import DeliveryError, Disposition, Evidence, SmtpStage, classify
from connector.smtp import Delivered, Envelope, SmtpDeliverer, SmtpSettings
from connector.tls import TlsMode
from tests.faults import Action, Direction, Fault, FaultProxy
from tests.smtp_peers import (
    PeerRule,
    SmtpPeer,
    exchange_2019,
    exchange_online,
    postfix,
    sender_access,
)

DELIVER_TO = "info@firma.local"
GOOD = "alice@partner.example"
OTHER_GOOD = "bob@partner.example"
DENIED = "spam@bad.example"
MESSAGE = b"Subject: hello\r\n\r\nHello.\r\n"


@pytest.fixture(params=["pipelining", "one-at-a-time"])
def peer(request: pytest.FixtureRequest) -> Iterator[SmtpPeer]:
    with postfix(pipelining=request.param == "pipelining") as p:
        yield p


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


def env(sender: str, *recipients: str, sender_fixed: bool = False) -> Envelope:
    return Envelope(sender, recipients or (DELIVER_TO,), sender_fixed=sender_fixed)


async def refusal(d: SmtpDeliverer, envelope: Envelope) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        await d.deliver(MESSAGE, envelope)
    return info.value


def probes(peer: SmtpPeer) -> list[str]:
    """The senders of the MAIL commands that were probes (no DATA followed them), in order;
    our real messages here never have the null sender, so a null sender is a probe."""
    return [d.sender for d in peer.decisions("mail") if d.sender == ""]


# --------------------------------------------------------------------------------------------
# MAIL: the message's own Return-Path
# --------------------------------------------------------------------------------------------


def refuse_mail_from(*senders: str, reply: str = "554 5.1.0 Sender denied") -> PeerRule:
    refused = set(senders)
    return lambda stage, sender, rcpt, data: (
        reply if stage == "mail" and sender in refused else None
    )


async def test_a_sender_refused_at_mail_depends_on_the_message(peer: SmtpPeer) -> None:
    peer.rule = refuse_mail_from(DENIED)
    async with deliverer(peer.port) as d:
        # First in the session: nothing accepted yet; the probe MAIL FROM:<> is accepted.
        first = await refusal(d, env(DENIED))
        assert (first.stage, first.evidence) == (SmtpStage.MAIL, Evidence.PROBE_ACCEPTED)
        assert classify(first) is Disposition.DEAD_LETTER
        assert probes(peer) == [""]
        await d.deliver(MESSAGE, env(GOOD))
        # Another sender accepted at MAIL in this session: no probe needed.
        again = await refusal(d, env(DENIED))
        assert (again.evidence, classify(again)) == (Evidence.SESSION, Disposition.DEAD_LETTER)
        assert probes(peer) == [""]
    assert [m.mail_from for m in peer.received] == [GOOD]


@pytest.mark.parametrize(
    "reply",
    [
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        "550 5.7.1 Client does not have permissions to send as this sender",
    ],
)
async def test_every_sender_refused_at_mail_is_our_setup(reply: str) -> None:
    with exchange_2019(lambda stage, sender, rcpt, data: reply if stage == "mail" else None) as ex:
        async with deliverer(ex.port) as d:
            err = await refusal(d, env(GOOD))
    assert (err.stage, err.evidence) == (SmtpStage.MAIL, Evidence.PROBE_REFUSED)
    assert classify(err) is Disposition.PARK_ACCOUNT
    assert [m.sender for m in ex.decisions("mail")] == [GOOD, ""]  # the message, the probe
    assert ex.received == []


async def test_530_is_our_setup_and_never_probed() -> None:
    # RFC 4954 §6: authentication required.  Even a server that would take the null sender
    # (the probe would be accepted) does not turn it into a dead letter: it is not asked.
    def rule(stage: str, sender: str, rcpt: str | None, data: bytes | None) -> str | None:
        if stage == "mail" and sender:
            return "530 5.7.1 Client was not authenticated"
        return None

    with exchange_2019(rule) as ex:
        async with deliverer(ex.port) as d:
            err = await refusal(d, env(GOOD))
    assert (err.smtp_code, err.evidence) == (530, Evidence.NONE)
    assert classify(err) is Disposition.PARK_ACCOUNT
    assert [m.sender for m in ex.decisions("mail")] == [GOOD]


async def test_fixed_envelope_sender_is_never_probed(peer: SmtpPeer) -> None:
    peer.rule = refuse_mail_from("relay@firma.local")
    async with deliverer(peer.port) as d:
        err = await refusal(d, env("relay@firma.local", sender_fixed=True))
    assert (err.evidence, classify(err)) == (Evidence.NONE, Disposition.PARK_ACCOUNT)
    assert probes(peer) == []


async def test_null_sender_refused_with_nothing_to_probe_with(peer: SmtpPeer) -> None:
    # A bounce (<>) refused at MAIL before any other sender was accepted: another sender to
    # test with is not known yet.  Undecided (the fetcher holds it); once one is accepted,
    # the session shows it.
    peer.rule = refuse_mail_from("")
    async with deliverer(peer.port) as d:
        first = await refusal(d, env(""))
        assert (first.evidence, classify(first)) == (Evidence.NO_PROBE, Disposition.PARK_ACCOUNT)
        await d.deliver(MESSAGE, env(GOOD))
        again = await refusal(d, env(""))
        assert (again.evidence, classify(again)) == (Evidence.SESSION, Disposition.DEAD_LETTER)
    assert [m.sender for m in peer.decisions("mail")] == ["", GOOD, ""]


async def test_a_probe_that_cannot_be_made_defers_the_message(peer: SmtpPeer) -> None:
    # The connection drops when the probe's MAIL goes out: no verdict, so the message is
    # deferred (RETRY), neither dead-lettered nor taken for our setup.
    peer.rule = refuse_mail_from(DENIED)
    fault = Fault(Action.CUT, Direction.UP, after_pattern=b"MAIL FROM:<>", line_start=True)
    with FaultProxy(("127.0.0.1", peer.port), fault) as proxy:
        async with deliverer(proxy.port) as d:
            err = await refusal(d, env(DENIED))
    assert (err.evidence, classify(err)) == (Evidence.PROBE_FAILED, Disposition.RETRY)
    assert proxy.triggered.is_set()


# --------------------------------------------------------------------------------------------
# RCPT: a recipient fixed in the config (Postfix's smtpd_delay_reject = yes)
# --------------------------------------------------------------------------------------------


async def test_sender_refused_at_rcpt_depends_on_the_message(peer: SmtpPeer) -> None:
    peer.rule = sender_access([DENIED], delay_reject=True)
    async with deliverer(peer.port) as d:
        first = await refusal(d, env(DENIED))
        assert (first.stage, first.smtp_code, first.enhanced_code) == (
            SmtpStage.RCPT,
            554,
            "5.1.0",
        )
        assert first.evidence is Evidence.PROBE_ACCEPTED
        assert classify(first) is Disposition.DEAD_LETTER
        await d.deliver(MESSAGE, env(GOOD))
        # The same recipient accepted for another sender in this session: no probe.
        again = await refusal(d, env(DENIED))
        assert (again.evidence, classify(again)) == (Evidence.SESSION, Disposition.DEAD_LETTER)
        await d.deliver(MESSAGE, env(OTHER_GOOD))
    assert probes(peer) == [""]
    probe_rcpts = [x for x in peer.decisions("rcpt") if x.sender == ""]
    assert [(x.recipient, x.reply[:3]) for x in probe_rcpts] == [(DELIVER_TO, "250")]
    assert [m.mail_from for m in peer.received] == [GOOD, OTHER_GOOD]


async def test_fixed_recipient_refused_for_every_sender_is_our_setup(peer: SmtpPeer) -> None:
    peer.rule = sender_access([], mailboxes=["someone.else@firma.local"])
    async with deliverer(peer.port) as d:
        err = await refusal(d, env(GOOD))
        assert (err.stage, err.smtp_code, err.enhanced_code) == (SmtpStage.RCPT, 550, "5.1.1")
        assert (err.evidence, classify(err)) == (Evidence.PROBE_REFUSED, Disposition.PARK_ACCOUNT)
        # Later in the session, a recipient accepted for nobody still gets no evidence.
        again = await refusal(d, env(OTHER_GOOD))
        assert again.evidence is Evidence.PROBE_REFUSED
    assert peer.received == []
    assert peer.decisions("data") == []


async def test_null_sender_refused_at_rcpt_is_probed_with_the_last_sender(peer: SmtpPeer) -> None:
    peer.rule = sender_access([""], delay_reject=True)
    async with deliverer(peer.port) as d:
        first = await refusal(d, env(""))
        assert first.evidence is Evidence.NO_PROBE  # no other sender known yet
        await d.deliver(MESSAGE, env(GOOD, "other@firma.local"))  # another recipient
        again = await refusal(d, env(""))
        # The probe goes out with the last sender accepted at MAIL, GOOD.
        assert (again.evidence, classify(again)) == (
            Evidence.PROBE_ACCEPTED,
            Disposition.DEAD_LETTER,
        )
    assert [(x.sender, x.recipient) for x in peer.decisions("rcpt")][-1] == (GOOD, DELIVER_TO)


async def test_several_fixed_recipients_the_weakest_evidence_decides(peer: SmtpPeer) -> None:
    # deliver_to = [info, gone]: the sender restriction refuses both; the probe takes info but
    # refuses gone (no such mailbox).  One recipient our setup refuses stops the cycle.
    peer.rule = sender_access([DENIED], mailboxes=[DELIVER_TO])
    async with deliverer(peer.port) as d:
        err = await refusal(d, env(DENIED, DELIVER_TO, "gone@firma.local"))
    assert err.refused.keys() == {DELIVER_TO, "gone@firma.local"}
    assert (err.smtp_code, err.enhanced_code, err.evidence) == (
        550,
        "5.1.1",
        Evidence.PROBE_REFUSED,
    )
    # The probe's reply is the one reported: what the server says to every sender.
    assert "User unknown" in err.text
    assert err.text.endswith("(probe from <>)")
    assert classify(err) is Disposition.PARK_ACCOUNT


async def test_a_fixed_recipient_refused_by_the_session_evidence_gets_a_partial_delivery(
    peer: SmtpPeer,
) -> None:
    # deliver_to = [info, chef]: chef's mailbox refuses DENIED only, and took GOOD before.
    # The session shows that chef's refusal depends on the message, so info gets it and chef's
    # refusal is reported as permanent (the fetcher dead-letters a copy for chef).
    chef = "chef@firma.local"

    def rule(stage: str, sender: str, rcpt: str | None, data: bytes | None) -> str | None:
        if stage == "rcpt" and rcpt == chef and sender == DENIED:
            return "550 5.7.1 <chef@firma.local>: sender not accepted by this mailbox"
        return None

    peer.rule = rule
    async with deliverer(peer.port) as d:
        await d.deliver(MESSAGE, env(GOOD, DELIVER_TO, chef))
        result = await d.deliver(MESSAGE, env(DENIED, DELIVER_TO, chef))
    assert isinstance(result, Delivered)
    assert result.permanent == {chef}
    assert [m.rcpt_tos for m in peer.received] == [(DELIVER_TO, chef), (DELIVER_TO,)]
    assert probes(peer) == []


@pytest.mark.parametrize(
    ("stage", "evidence", "disposition"),
    [
        # RFC 5321 §4.5.3.1.10: a 552 to RCPT was "too many recipients": counts as 452, so the
        # probe says nothing.  To MAIL it is a permanent refusal of the probe's sender too.
        ("rcpt", Evidence.PROBE_FAILED, Disposition.RETRY),
        ("mail", Evidence.PROBE_REFUSED, Disposition.PARK_ACCOUNT),
    ],
)
async def test_a_probe_reply_is_read_as_a_reply_to_its_own_command(
    peer: SmtpPeer, stage: str, evidence: Evidence, disposition: Disposition
) -> None:
    def rule(at: str, sender: str, rcpt: str | None, data: bytes | None) -> str | None:
        if at == stage and sender == DENIED:
            return "554 5.7.1 Sender denied"
        if at == stage and sender == "":
            return "552 Requested action aborted"
        return None

    peer.rule = rule
    async with deliverer(peer.port) as d:
        err = await refusal(d, env(DENIED))
    assert (err.evidence, classify(err)) == (evidence, disposition)


# --------------------------------------------------------------------------------------------
# Shared mailboxes: recipients read from the message vs configured ones
# --------------------------------------------------------------------------------------------


def shared_env(sender: str, *recipients: str, configured: frozenset[str]) -> Envelope:
    return Envelope(
        sender, recipients, sender_fixed=False, recipients_fixed=False, configured=configured
    )


async def test_shared_configured_fallback_follows_the_tested_rule(peer: SmtpPeer) -> None:
    fallback = "undeliverable@firma.local"
    peer.rule = sender_access([DENIED], delay_reject=True)
    async with deliverer(peer.port) as d:
        err = await refusal(d, shared_env(DENIED, fallback, configured=frozenset({fallback})))
    assert (err.stage, err.per_message, err.evidence) == (
        SmtpStage.RCPT,
        False,
        Evidence.PROBE_ACCEPTED,
    )
    assert classify(err) is Disposition.DEAD_LETTER
    assert probes(peer) == [""]


async def test_shared_recipient_read_from_the_message_is_never_probed(peer: SmtpPeer) -> None:
    # A recipient read from the message refused permanently is about the message, as before:
    # the others get it, and nobody is probed.
    peer.rule = sender_access([], mailboxes=["bob@firma.local", "info@firma.local"])
    async with deliverer(peer.port) as d:
        result = await d.deliver(
            MESSAGE,
            shared_env(GOOD, "bob@firma.local", "nobody@firma.local", configured=frozenset()),
        )
        err = await refusal(
            d, shared_env(GOOD, "nobody@firma.local", configured=frozenset({DELIVER_TO}))
        )
    assert result.permanent == {"nobody@firma.local"}
    assert (err.per_message, err.evidence, classify(err)) == (
        True,
        Evidence.NONE,
        Disposition.DEAD_LETTER,
    )
    assert probes(peer) == []


# --------------------------------------------------------------------------------------------
# The peers themselves: they greet like their models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            exchange_2019,
            {"x-anonymoustls", "x-exps", "chunking", "binarymime", "8bitmime", "smtputf8", "size",
             "pipelining", "dsn", "enhancedstatuscodes", "starttls", "xrdst"},
        ),
        (
            exchange_online,
            {"chunking", "binarymime", "8bitmime", "smtputf8", "size", "pipelining", "dsn",
             "enhancedstatuscodes", "starttls"},
        ),
    ],
    ids=["2019", "online"],
)  # fmt: skip
async def test_peers_greet_like_their_models(
    model: Callable[..., SmtpPeer], expected: set[str], smtp_server_context: ssl.SSLContext
) -> None:
    with model(tls_context=smtp_server_context) as ex:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=ex.port, start_tls=False) as smtp:
            response = await smtp.ehlo()
            assert set(smtp.esmtp_extensions) == expected
            assert "Hello [127.0.0.1]" in response.message
        # And a delivery through them works, DSN parameters and all.
        async with deliverer(ex.port) as d:
            await d.deliver(MESSAGE, env(GOOD))
    (got,) = ex.received
    assert got.data == MESSAGE
    assert "RET=FULL" not in got.mail_options  # taken and dropped, as Exchange takes them
