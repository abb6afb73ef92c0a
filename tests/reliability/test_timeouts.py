"""A stalled server at every phase: the cycle never hangs, the error says RETRY, nothing is lost.

A :class:`~tests.faults.FaultProxy` in front of real Dovecot (POP3) or the aiosmtpd sink (SMTP)
goes silent at one phase; every deadline is 0.5 s (``Pop3Timeouts``, ``SmtpSettings.timeout``).
After the fault, a clean cycle must deliver every message exactly once (docs/design.md §5.2).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connector.cycle import Outcome
from connector.errors import DeliveryError, Disposition, Pop3TimeoutError, SmtpStage, classify
from connector.pop3 import AuthMethod
from connector.tls import TlsMode
from tests.faults import Action, Direction, Fault, FaultProxy
from tests.reliability.rig import SHORT, Recorder, Rig, mail, make_rig
from tests.servers import DovecotServer

pytestmark = pytest.mark.integration

MARK = b"STALL-HERE"


@pytest.fixture
async def rig(dovecot: DovecotServer, tmp_path: Path) -> AsyncIterator[Rig]:
    async with make_rig(dovecot, tmp_path) as r:
        yield r


def stall_on_command(command: bytes) -> Fault:
    """Swallow the client's ``command`` line: the server never answers it."""
    return Fault(
        Action.STALL,
        trigger=Direction.UP,
        after_pattern=command,
        line_start=True,
        forward_trigger=False,
    )


def assert_each_delivered_once(rig: Rig, count: int) -> None:
    ids = rig.received_ids()
    assert Counter(ids) == Counter(f"{i}@rig.test" for i in range(count)), ids
    assert rig.upstream() == []


POP3_STALLS = {
    "tls_handshake": Fault(Action.STALL, after_bytes=0),
    "greeting": Fault(Action.STALL, after_bytes=0),
    "capa": stall_on_command(b"CAPA"),
    "login": stall_on_command(b"AUTH"),
    "stat": stall_on_command(b"STAT"),
    "uidl": stall_on_command(b"UIDL"),
    "retr_mid_message": Fault(Action.STALL, after_pattern=MARK, forward_trigger=False),
    "quit": stall_on_command(b"QUIT"),
}


@pytest.mark.parametrize("phase", list(POP3_STALLS))
async def test_pop3_server_stalls_at_phase(rig: Rig, phase: str) -> None:
    raws = [mail(0), mail(1, body=b"x" * 100_000 + b"\r\n" + MARK + b"\r\n"), mail(2)]
    rig.dovecot.deliver_many(rig.user, raws)
    tls = TlsMode.IMPLICIT if phase == "tls_handshake" else TlsMode.NONE
    upstream = rig.dovecot.ports["pop3s" if tls is TlsMode.IMPLICIT else "pop3"]
    with FaultProxy(("127.0.0.1", upstream), POP3_STALLS[phase]) as proxy:
        spec = rig.spec(
            port=proxy.port,
            tls=tls,
            auth=AuthMethod.PLAIN,
            context=rig.dovecot.client_context(),
            server_hostname="localhost",
        )
        with pytest.raises(Pop3TimeoutError) as info:
            await rig.run(rig.cycle(spec))
        assert proxy.triggered.is_set()
    assert classify(info.value) is Disposition.RETRY
    # No QUIT got through, so no DELE took effect: everything is still upstream.
    assert len(rig.upstream()) == 3
    delivered_before = len(rig.sink.received)
    assert delivered_before == {"retr_mid_message": 1, "quit": 3}.get(phase, 0)
    await rig.finish()
    assert_each_delivered_once(rig, 3)


async def test_pop3_server_slow_but_steady_is_not_a_timeout(rig: Rig) -> None:
    """DELAY: 0.1 s before every chunk of a 1.5 MiB RETR (several times the 0.5 s command
    deadline in all): the per-read deadline (idle_read) lets a slow, live server finish."""
    big = mail(0, body=(b"y" * 76 + b"\r\n") * 20_000)
    rig.dovecot.deliver_many(rig.user, [big])
    slow = Fault(Action.DELAY, after_pattern=b"Message-ID", delay=0.1)
    with FaultProxy(("127.0.0.1", rig.dovecot.ports["pop3"]), slow) as proxy:
        stats = await rig.run(rig.cycle(rig.spec(port=proxy.port)))
        assert proxy.triggered.is_set()
    assert stats.delivered == 1
    assert_each_delivered_once(rig, 1)


SMTP_SETUP_STALLS = {
    "greeting": Fault(Action.STALL, after_bytes=0),
    "ehlo": stall_on_command(b"EHLO"),
}


@pytest.mark.parametrize("phase", list(SMTP_SETUP_STALLS))
async def test_smtp_server_stalls_at_session_setup(rig: Rig, phase: str) -> None:
    rig.dovecot.deliver_many(rig.user, [mail(0), mail(1)])
    with (
        FaultProxy(("127.0.0.1", rig.sink.port), SMTP_SETUP_STALLS[phase]) as proxy,
        pytest.raises(DeliveryError) as info,
    ):
        await rig.run(rig.cycle(smtp_port=proxy.port))
    assert info.value.stage.is_setup
    assert classify(info.value) is Disposition.RETRY  # never a dead letter, never parked
    assert len(rig.upstream()) == 2
    assert await rig.store.list() == []
    await rig.finish()
    assert_each_delivered_once(rig, 2)


SMTP_TRANSACTION_STALLS = {
    "mail": (stall_on_command(b"MAIL FROM"), SmtpStage.MAIL),
    "rcpt": (stall_on_command(b"RCPT TO"), SmtpStage.RCPT),
    "data": (stall_on_command(b"DATA"), SmtpStage.DATA),
    # The message is sent, its final dot too, but the server never answers.
    "after_data": (
        Fault(
            Action.STALL, trigger=Direction.UP, after_pattern=b"\r\n.\r\n", forward_trigger=False
        ),
        SmtpStage.DATA,
    ),
}


@pytest.mark.parametrize("phase", list(SMTP_TRANSACTION_STALLS))
async def test_smtp_server_stalls_in_transaction(rig: Rig, phase: str) -> None:
    """A timeout inside a transaction defers the message (4xx-like, docs/design.md §6.1); the next
    message gets a fresh connection (which stalls too, here); nothing is dead-lettered."""
    fault, stage = SMTP_TRANSACTION_STALLS[phase]
    rig.dovecot.deliver_many(rig.user, [mail(0), mail(1)])
    rec = Recorder()
    with FaultProxy(("127.0.0.1", rig.sink.port), fault) as proxy:
        stats = await rig.run(rig.cycle(smtp_port=proxy.port, recorder=rec))
        assert proxy.connections == 2  # reconnected for the second message
    assert (stats.deferred, stats.delivered, stats.dead_lettered) == (2, 0, 0)
    assert [o for _, o, _ in rec.events] == [Outcome.DEFERRED] * 2
    assert len(rig.upstream()) == 2
    assert rig.sink.received == []
    expected = (
        f"no reply to the end of the message within {SHORT:g}s; the server may have taken it "
        "(RFC 5321 §4.5.3.2.6)"
        if phase == "after_data"
        else "timed out waiting for the server"
    )
    assert [r for _, _, r in rec.events] == [expected] * 2
    # The deferral is the RETRY disposition of that error at that stage (docs/design.md §6.1).
    assert classify(DeliveryError(stage, rec.events[0][2])) is Disposition.RETRY
    await rig.finish()
    assert_each_delivered_once(rig, 2)
