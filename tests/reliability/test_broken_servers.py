"""Servers that break the protocol or the connection: nothing is lost, the error says RETRY.

Fake POP3 servers (:class:`~tests.faults.FakePop3Server`) only for what Dovecot will not do; cuts
and resets with a :class:`~tests.faults.FaultProxy` in front of real Dovecot and aiosmtpd; a 421
from the loopback sink's rule.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connector.cycle import AccountSpec, Cycle, CycleStats, DeliveryPolicy, Outcome
from connector.deadletter.maildir import MaildirStore
from connector.errors import (
    Disposition,
    Pop3AuthError,
    Pop3ConnectionError,
    Pop3Error,
    Pop3ProtocolError,
    Pop3ResponseError,
    Pop3TimeoutError,
    classify,
)
from connector.ledger import Ledger, MessageState
from connector.loopback import LoopbackSmtpSink
from connector.pop3 import AuthMethod, Pop3Client, Pop3Endpoint, Pop3Timeouts
from connector.smtp import SenderPolicy, SmtpDeliverer, SmtpSettings
from connector.tls import TlsMode
from tests.faults import Action, Direction, FakePop3Server, Fault, FaultProxy, Pop3Misbehaviour
from tests.reliability.rig import SHORT, Recorder, Rig, mail, make_rig, message_id
from tests.servers import DovecotServer

MESSAGES = [mail(i) for i in range(3)]


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        yield ledger
    finally:
        await ledger.close()


async def fake_cycle(
    fake: FakePop3Server, sink: LoopbackSmtpSink, ledger: Ledger, tmp_path: Path
) -> CycleStats:
    spec = AccountSpec(
        name="info",
        endpoint=Pop3Endpoint("127.0.0.1", fake.port, TlsMode.NONE),
        username=fake.user,
        password=fake.password,
        auth=AuthMethod.USER,
        deliver_to=("info@firma.test",),
        max_deferral=86400.0,
        timeouts=Pop3Timeouts(SHORT, SHORT, SHORT),
    )
    cycle = Cycle(
        spec,
        ledger=ledger,
        store=MaildirStore(tmp_path / "dead"),
        deliverer=SmtpDeliverer(
            SmtpSettings("127.0.0.1", sink.port, TlsMode.NONE, None, "c.test", timeout=SHORT)
        ),
        policy=DeliveryPolicy(SenderPolicy.RETURN_PATH, None, "c.test"),
        observer=Recorder(),
    )
    async with asyncio.timeout(10):  # never a hang
        return await cycle.run()


FAILING: dict[Pop3Misbehaviour, type[Pop3Error]] = {
    Pop3Misbehaviour.IN_USE_AT_ONCE: Pop3AuthError,
    Pop3Misbehaviour.LINE_WITHOUT_END: Pop3ProtocolError,
    Pop3Misbehaviour.DUPLICATE_UIDLS: Pop3ProtocolError,
    Pop3Misbehaviour.NO_GREETING: Pop3TimeoutError,
    Pop3Misbehaviour.GARBAGE_AFTER_OK: Pop3ProtocolError,
    Pop3Misbehaviour.EOF_IN_MESSAGE: Pop3ConnectionError,
}


@pytest.mark.parametrize("fault", list(FAILING), ids=lambda f: f.value)
async def test_fake_pop3_server_misbehaves(
    fault: Pop3Misbehaviour, ledger: Ledger, tmp_path: Path
) -> None:
    async with FakePop3Server(MESSAGES, fault) as fake, LoopbackSmtpSink() as sink:
        with pytest.raises(Pop3Error) as info:
            await fake_cycle(fake, sink, ledger, tmp_path)
    assert type(info.value) is FAILING[fault]
    assert classify(info.value) is Disposition.RETRY
    assert fake.deleted == []  # no QUIT after a DELE went through: nothing removed upstream
    if isinstance(info.value, Pop3ResponseError):
        assert info.value.resp_code == "IN-USE"
    assert sink.messages == []
    assert sink.errors == []


async def test_fake_pop3_server_wrong_octet_count_still_delivers_intact(
    ledger: Ledger, tmp_path: Path
) -> None:
    """'+OK 7 octets' to RETR: the count is informational; the dot line ends the message
    (RFC 1939 §3, §7), so each message arrives whole and is then deleted."""
    async with (
        FakePop3Server(MESSAGES, Pop3Misbehaviour.WRONG_OCTET_COUNT) as fake,
        LoopbackSmtpSink() as sink,
    ):
        stats = await fake_cycle(fake, sink, ledger, tmp_path)
    assert stats.delivered == 3
    assert [m.data.split(b"\r\n", 2)[2] for m in sink.messages] == MESSAGES
    assert fake.deleted == [1, 2, 3]


async def test_smtp_421_mid_session_defers_and_reconnects(ledger: Ledger, tmp_path: Path) -> None:
    """421 (RFC 5321 §3.8) to the second message's RCPT, once: that message is deferred, the
    sink closes the channel, the third message goes over a new connection."""
    said_421: list[bool] = []

    def rule(stage: str, sender: str, rcpts: list[str], data: bytes | None) -> str | None:
        if stage == "rcpt" and not said_421 and len(sink.messages) == 1:
            said_421.append(True)
            return "421 4.3.2 Service shutting down"
        return None

    async with FakePop3Server(MESSAGES) as fake, LoopbackSmtpSink(rule) as sink:
        stats = await fake_cycle(fake, sink, ledger, tmp_path)
        assert (stats.delivered, stats.deferred) == (2, 1)
        assert sink.sessions == 2
        assert fake.deleted == [1, 3]
        # The next cycle offers the deferred one again.  (The fake keeps no state at QUIT.)
        fake.messages = [MESSAGES[1]]
        fake.deleted.clear()
        stats = await fake_cycle(fake, sink, ledger, tmp_path)
    assert stats.delivered == 1
    assert [message_id(m.data) for m in sink.messages] == ["0@rig.test", "2@rig.test", "1@rig.test"]


# --------------------------------------------------------------------------------------------
# Connections cut or reset under real servers
# --------------------------------------------------------------------------------------------


@pytest.fixture
async def rig(dovecot: DovecotServer, tmp_path: Path) -> AsyncIterator[Rig]:
    async with make_rig(dovecot, tmp_path) as r:
        yield r


@pytest.mark.integration
@pytest.mark.parametrize("action", [Action.CUT, Action.RESET], ids=lambda a: a.value)
async def test_dovecot_connection_cut_mid_retr(rig: Rig, action: Action) -> None:
    marker = b"CUT-HERE"
    rig.dovecot.deliver_many(rig.user, [mail(0), mail(1, body=b"z" * 50_000 + marker), mail(2)])
    fault = Fault(action, after_pattern=marker, forward_trigger=False)
    with (
        FaultProxy(("127.0.0.1", rig.dovecot.ports["pop3"]), fault) as proxy,
        pytest.raises(Pop3ConnectionError) as info,
    ):
        await rig.run(rig.cycle(rig.spec(port=proxy.port)))
    assert classify(info.value) is Disposition.RETRY
    assert len(rig.upstream()) == 3  # the first one's DELE never got its QUIT
    # A reset discards what the kernel had received but we had not read yet (RFC 793 §3.4),
    # so the first message may not have been delivered either.
    assert rig.received_ids() in ([], ["0@rig.test"])
    await rig.finish()
    assert Counter(rig.received_ids()) == Counter(f"{i}@rig.test" for i in range(3))
    assert rig.upstream() == []


@pytest.mark.integration
async def test_smtp_connection_reset_before_end_of_data(rig: Rig) -> None:
    """The connection resets while the message is sent (before its final dot): the server has
    nothing; the message is deferred, and delivered once on the next cycle."""
    rig.dovecot.deliver_many(rig.user, [mail(0)])
    fault = Fault(
        Action.RESET, trigger=Direction.UP, after_pattern=b"\r\n.\r\n", forward_trigger=False
    )
    rec = Recorder()
    with FaultProxy(("127.0.0.1", rig.sink.port), fault) as proxy:
        stats = await rig.run(rig.cycle(smtp_port=proxy.port, recorder=rec))
    assert stats.deferred == 1
    assert rec.events[0][1] is Outcome.DEFERRED
    assert rig.sink.received == []
    assert len(rig.upstream()) == 1
    await rig.finish()
    assert rig.received_ids() == ["0@rig.test"]


@pytest.mark.integration
async def test_smtp_connection_reset_before_final_reply(rig: Rig) -> None:
    """The server took the whole message and answered 250, but the connection reset before the
    reply reached us.  We cannot know it was accepted, so the message is deferred and delivered
    again on the next cycle: the duplicate SMTP itself cannot avoid (RFC 1047), and the same
    window as the main one of docs/design.md §9 (the server has it, our ledger does not)."""
    rig.dovecot.deliver_many(rig.user, [mail(0)])
    fault = Fault(
        Action.RESET, trigger=Direction.DOWN, after_pattern=b"250 2.0.0", forward_trigger=False
    )
    with FaultProxy(("127.0.0.1", rig.sink.port), fault) as proxy:
        stats = await rig.run(rig.cycle(smtp_port=proxy.port))
        assert proxy.triggered.is_set()
    assert stats.deferred == 1
    assert rig.received_ids() == ["0@rig.test"]  # the server has it ...
    assert len(rig.upstream()) == 1  # ... and so does the mailbox: nothing lost
    (uid,) = await _uidls(rig)
    entry = await rig.ledger.entry("info", uid)
    assert entry is not None
    assert entry.state is MessageState.DEFERRED
    await rig.finish()
    assert rig.received_ids() == ["0@rig.test", "0@rig.test"]
    assert rig.upstream() == []


async def _uidls(rig: Rig) -> list[str]:
    async with await Pop3Client.connect(
        Pop3Endpoint("127.0.0.1", rig.dovecot.ports["pop3"], TlsMode.NONE)
    ) as pop:
        await pop.login(rig.user, rig.password)
        uids = [u for _, u in await pop.uidl()]
        await pop.quit()
    return uids
