"""SmtpDeliverer against a real aiosmtpd (tests/servers.py SmtpSink), STARTTLS, implicit TLS,
AUTH, refusals at each stage, SIZE, DSN, a stalling server and a dropped connection.

No Dovecot here, so no ``integration`` marker.  The only fake is a loopback TCP proxy that cuts
a connection, which aiosmtpd cannot do on request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.errors import DeliveryError, Disposition, Evidence, SmtpStage, classify
from connector.smtp import (
    Delivered,
    Envelope,
    SenderPolicy,
    SmtpDeliverer,
    SmtpSettings,
    envelope_sender,
)
from connector.tls import TlsMode
from tests.peek import smtp_connected
from tests.servers import RecordingHandler, SmtpSink, free_port

TO = ("info@firma.local",)
OWN_SENDER = "owner@example.test"
MESSAGE = b"Return-Path: <owner@example.test>\r\nSubject: hello\r\n\r\nHello.\r\n"


def envelope(sender: str = OWN_SENDER, recipients: tuple[str, ...] = TO, **kw: Any) -> Envelope:
    return Envelope(sender, recipients, sender_fixed=kw.pop("sender_fixed", False), **kw)


def smtp_settings(port: int, **kw: Any) -> SmtpSettings:
    return SmtpSettings(
        host="127.0.0.1",
        port=port,
        tls=kw.pop("tls", TlsMode.NONE),
        ssl_context=kw.pop("ssl_context", None),
        helo_name="connector.test",
        timeout=kw.pop("timeout", 5.0),
        **kw,
    )


def message(n: int) -> bytes:
    return f"Subject: message {n}\r\nMessage-ID: <{n}@x.test>\r\n\r\nBody {n}.\r\n".encode()


def is_connected(deliverer: SmtpDeliverer) -> bool:
    return smtp_connected(deliverer)  # a call, so mypy does not narrow it across awaits


def size_limit(deliverer: SmtpDeliverer) -> int | None:
    return deliverer.max_size


async def refused(deliverer: SmtpDeliverer, raw: bytes, env: Envelope) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        await deliverer.deliver(raw, env)
    return info.value


@pytest.fixture
def client_context(smtp_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    smtp_ca.configure_trust(ctx)
    return ctx


class ObservingHandler(RecordingHandler):
    """RecordingHandler that also notes each EHLO's peer (one per plain connection) and can
    advertise DSN (RFC 3461) for the DSN-capable server below."""

    def __init__(self, *, dsn: bool = False) -> None:
        super().__init__()
        self.ehlo_peers: list[Any] = []
        self.dsn = dsn
        self.dsn_mail: list[str] = []
        self.dsn_rcpt: list[str] = []

    async def handle_EHLO(  # aiosmtpd hook name
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # the default EHLO does this; a hook must do it itself
        self.ehlo_peers.append(session.peer)
        if self.dsn:
            responses.insert(-1, "250-DSN")
        return responses


class DsnSMTP(AiosmtpdSMTP):
    """aiosmtpd 1.4.6 rejects DSN parameters; strip and record them (library-facts §3)."""

    def _strip(self, arg: str | None, prefixes: tuple[str, ...], store: list[str]) -> str:
        parts = (arg or "").split(" ")
        store.extend(p for p in parts if p.upper().startswith(prefixes))
        return " ".join(p for p in parts if not p.upper().startswith(prefixes))

    async def smtp_MAIL(self, arg: str | None) -> None:
        await super().smtp_MAIL(self._strip(arg, ("RET=", "ENVID="), self.event_handler.dsn_mail))

    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(
            self._strip(arg, ("NOTIFY=", "ORCPT="), self.event_handler.dsn_rcpt)
        )


class DsnController(Controller):
    def factory(self) -> DsnSMTP:
        return DsnSMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def observed_sink() -> Iterator[tuple[SmtpSink, ObservingHandler]]:
    """A plain SmtpSink whose handler also counts connections (EHLOs)."""
    sink = SmtpSink()
    handler = ObservingHandler()
    sink.handler = handler
    sink.controller.handler = handler
    sink.start()
    try:
        yield sink, handler
    finally:
        sink.stop()


@contextlib.contextmanager
def running(sink: SmtpSink) -> Iterator[SmtpSink]:
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


# ------------------------------------------------------------------------------------------
# Relay and reuse
# ------------------------------------------------------------------------------------------

TRICKY = (
    b"Return-Path: <owner@example.test>\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"X-Raw: \xc3\xa4\xff\x80\r\n"
    b"\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b".one dot\r\n"
    b" . \r\n"
    b"8-bit: \xe9\xe8\x00\x7f\r\n"
    b"\r\n"
    b"last line\r\n"
)


async def test_byte_exact_relay(smtp_sink: SmtpSink) -> None:
    async with SmtpDeliverer(smtp_settings(smtp_sink.port)) as deliverer:
        result = await deliverer.deliver(TRICKY, envelope())
    assert result == Delivered(response="250 2.0.0 OK queued", refused={})
    [got] = smtp_sink.received
    assert got.data == TRICKY
    assert got.mail_from == OWN_SENDER
    assert got.rcpt_tos == TO
    # RFC 6152: 8-bit bytes are announced; SIZE once (RFC 1870); 8-bit header fields make it
    # an internationalized message (RFC 6531 §3.4).
    assert got.mail_options == (f"SIZE={len(TRICKY)}", "BODY=8BITMIME", "SMTPUTF8")


async def test_ascii_message_gets_no_body_parameter(smtp_sink: SmtpSink) -> None:
    async with SmtpDeliverer(smtp_settings(smtp_sink.port)) as deliverer:
        await deliverer.deliver(MESSAGE, envelope(""))
    [got] = smtp_sink.received
    assert got.data == MESSAGE
    assert got.mail_from == "<>"  # the null sender (aiosmtpd records it bracketed)
    assert got.mail_options == (f"SIZE={len(MESSAGE)}",)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))))
async def test_any_crlf_body_arrives_byte_exact(smtp_sink: SmtpSink, lines: list[bytes]) -> None:
    raw = b"Subject: p\r\n\r\n" + b"".join(line + b"\r\n" for line in lines)
    before = len(smtp_sink.received)
    async with SmtpDeliverer(smtp_settings(smtp_sink.port)) as deliverer:
        await deliverer.deliver(raw, envelope())
    assert smtp_sink.received[before].data == raw


async def test_one_connection_for_twenty_messages(
    observed_sink: tuple[SmtpSink, ObservingHandler],
) -> None:
    sink, handler = observed_sink
    async with SmtpDeliverer(smtp_settings(sink.port)) as deliverer:
        assert not is_connected(deliverer)  # lazy: nothing until the first message
        for n in range(20):
            await deliverer.deliver(message(n), envelope())
        assert is_connected(deliverer)
    assert [m.data for m in sink.received] == [message(n) for n in range(20)]
    assert len(handler.ehlo_peers) == 1


# ------------------------------------------------------------------------------------------
# TLS
# ------------------------------------------------------------------------------------------


async def test_starttls_with_verification(
    smtp_server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.transcript")
    with running(SmtpSink(tls_context=smtp_server_context)) as sink:
        s = smtp_settings(sink.port, tls=TlsMode.STARTTLS, ssl_context=client_context)
        async with SmtpDeliverer(s, transcript=logging.getLogger("test.transcript")) as d:
            await d.deliver(TRICKY, envelope())
            # The extensions were re-read over TLS before the transaction was planned.
            assert size_limit(d) == 64 * 1024 * 1024
        [got] = sink.received
        assert got.data == TRICKY
        assert "BODY=8BITMIME" in got.mail_options
    lines = [r.getMessage() for r in caplog.records]
    starttls = lines.index("C: STARTTLS")
    assert lines[starttls + 1].startswith("S: 220")
    # RFC 3207 §4.2: EHLO again after TLS, then the transaction.
    assert lines[starttls + 2] == "C: EHLO connector.test"
    assert any(line.startswith("C: MAIL FROM:<owner@example.test>") for line in lines)


async def test_starttls_untrusted_certificate(smtp_server_context: ssl.SSLContext) -> None:
    with running(SmtpSink(tls_context=smtp_server_context)) as sink:
        untrusting = ssl.create_default_context()  # the system store; not the test CA
        s = smtp_settings(sink.port, tls=TlsMode.STARTTLS, ssl_context=untrusting)
        async with SmtpDeliverer(s) as deliverer:
            err = await refused(deliverer, MESSAGE, envelope())
            assert not is_connected(deliverer)
        assert sink.received == []
    assert err.stage is SmtpStage.TLS
    assert err.security
    assert classify(err) is Disposition.PARK_ACCOUNT


async def test_starttls_required_but_not_offered(
    smtp_sink: SmtpSink, client_context: ssl.SSLContext
) -> None:
    s = smtp_settings(smtp_sink.port, tls=TlsMode.STARTTLS, ssl_context=client_context)
    async with SmtpDeliverer(s) as deliverer:
        err = await refused(deliverer, MESSAGE, envelope())
    assert err.stage is SmtpStage.TLS
    assert "STARTTLS" in err.text
    assert classify(err) is not Disposition.DEAD_LETTER
    assert smtp_sink.received == []  # never a silent downgrade
    assert smtp_sink.handler.transactions == 0


async def test_implicit_tls(
    smtp_server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    with running(SmtpSink(tls_context=smtp_server_context, implicit=True)) as sink:
        s = smtp_settings(sink.port, tls=TlsMode.IMPLICIT, ssl_context=client_context)
        async with SmtpDeliverer(s) as deliverer:
            await deliverer.deliver(TRICKY, envelope())
        assert [m.data for m in sink.received] == [TRICKY]

        s = smtp_settings(sink.port, tls=TlsMode.IMPLICIT, ssl_context=ssl.create_default_context())
        async with SmtpDeliverer(s) as deliverer:
            err = await refused(deliverer, MESSAGE, envelope())
    assert (err.stage, err.security) == (SmtpStage.TLS, True)
    assert classify(err) is Disposition.PARK_ACCOUNT


# ------------------------------------------------------------------------------------------
# AUTH
# ------------------------------------------------------------------------------------------


async def test_auth_ok_and_transcript_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.transcript")
    with running(SmtpSink(auth={"user": "pw-s3cret"})) as sink:
        s = smtp_settings(sink.port, username="user", password="pw-s3cret")
        async with SmtpDeliverer(s, transcript=logging.getLogger("test.transcript")) as d:
            await d.deliver(MESSAGE, envelope())
        assert [m.data for m in sink.received] == [MESSAGE]
    lines = [r.getMessage() for r in caplog.records]
    assert "C: AUTH PLAIN ****" in lines
    assert any(line.startswith("S: 235") for line in lines)
    assert f"C: <{len(MESSAGE)} octets>" in lines
    everything = "\n".join(lines)
    secrets = ["pw-s3cret", base64.b64encode(b"\0user\0pw-s3cret").decode()]
    assert not any(secret in everything for secret in secrets)
    assert "Hello." not in everything  # never the body


async def test_auth_wrong_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with running(SmtpSink(auth={"user": "pw-right"})) as sink:
        s = smtp_settings(sink.port, username="user", password="pw-wrong")
        async with SmtpDeliverer(s, transcript=logging.getLogger("test.transcript")) as d:
            err = await refused(d, MESSAGE, envelope())
        assert sink.received == []
    assert err.stage is SmtpStage.AUTH
    assert err.smtp_code == 535
    assert classify(err) is Disposition.PARK_ACCOUNT
    everything = "\n".join(r.getMessage() for r in caplog.records) + str(err) + repr(err)
    # aiosmtplib tried PLAIN, then LOGIN: the password stays out of both.
    assert "C: AUTH LOGIN ****" in everything
    assert "pw-wrong" not in everything
    assert base64.b64encode(b"pw-wrong").decode() not in everything


# ------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------


async def test_554_after_data_dead_letters_and_connection_stays(
    observed_sink: tuple[SmtpSink, ObservingHandler],
) -> None:
    sink, handler = observed_sink
    # The seed case: many different messages, each refused after DATA.
    sink.handler.rule = lambda stage, env, data: (
        "554 5.1.0 Sender denied" if stage == "data" and b"denied" in (data or b"") else None
    )
    async with SmtpDeliverer(smtp_settings(sink.port)) as deliverer:
        for n in range(5):
            err = await refused(deliverer, message(n) + b"denied\r\n", envelope(sender_fixed=True))
            assert (err.stage, err.smtp_code, err.enhanced_code) == (SmtpStage.DATA, 554, "5.1.0")
            assert err.response == "554 5.1.0 Sender denied"
            assert classify(err) is Disposition.DEAD_LETTER
        await deliverer.deliver(message(99), envelope())
    assert [m.data for m in sink.received] == [message(99)]
    assert len(handler.ehlo_peers) == 1  # aiosmtplib RSETs; the session goes on


async def test_451_at_mail_retries_and_next_message_goes_through(smtp_sink: SmtpSink) -> None:
    smtp_sink.handler.rule = lambda stage, env, data: (
        "451 4.7.1 Greylisted, try later" if env.mail_from == "grey@x.test" else None
    )
    async with SmtpDeliverer(smtp_settings(smtp_sink.port)) as deliverer:
        err = await refused(deliverer, message(1), envelope("grey@x.test"))
        assert (err.stage, err.smtp_code, err.enhanced_code) == (SmtpStage.MAIL, 451, "4.7.1")
        assert classify(err) is Disposition.RETRY
        await deliverer.deliver(message(2), envelope())
    assert [m.data for m in smtp_sink.received] == [message(2)]


@pytest.mark.parametrize(
    ("policy", "disposition"),
    [
        (SenderPolicy.FIXED, Disposition.PARK_ACCOUNT),
        (SenderPolicy.NULL, Disposition.PARK_ACCOUNT),
        (SenderPolicy.RETURN_PATH, Disposition.DEAD_LETTER),
    ],
)
async def test_5xx_at_mail_depends_on_whose_sender(
    smtp_sink: SmtpSink, policy: SenderPolicy, disposition: Disposition
) -> None:
    # Every sender refused but the null sender, which is what the deliverer probes with
    # (unless the null sender is the one refused: then there is nothing to probe with).
    smtp_sink.handler.rule = lambda stage, env, data: (
        "550 5.7.1 Sender rejected by policy"
        if stage == "mail" and (env.mail_from != "<>" or policy is SenderPolicy.NULL)
        else None
    )
    sender, fixed = envelope_sender(MESSAGE, policy, "relay@firma.local")
    env = Envelope(sender, TO, sender_fixed=fixed)
    async with SmtpDeliverer(smtp_settings(smtp_sink.port)) as deliverer:
        err = await refused(deliverer, MESSAGE, env)
    assert (err.stage, err.smtp_code, err.enhanced_code) == (SmtpStage.MAIL, 550, "5.7.1")
    assert err.per_message is (policy is SenderPolicy.RETURN_PATH)
    # The message's own sender: the probe with the null sender (this rule refuses every
    # sender but <>) shows it depends on the message.  A fixed sender is never probed.
    assert err.evidence is (
        Evidence.PROBE_ACCEPTED if policy is SenderPolicy.RETURN_PATH else Evidence.NONE
    )
    assert classify(err) is disposition


async def test_550_at_rcpt_of_fixed_recipient_parks(smtp_sink: SmtpSink) -> None:
    smtp_sink.handler.rule = lambda stage, env, data: (
        "550 5.1.1 User unknown" if stage == "rcpt" else None
    )
    async with SmtpDeliverer(smtp_settings(smtp_sink.port)) as deliverer:
        err = await refused(deliverer, MESSAGE, envelope())
    assert (err.stage, err.smtp_code, err.per_message) == (SmtpStage.RCPT, 550, False)
    assert classify(err) is Disposition.PARK_ACCOUNT
    assert smtp_sink.handler.transactions == 0


async def test_partial_recipients_delivered_once(smtp_sink: SmtpSink) -> None:
    smtp_sink.handler.rule = lambda stage, env, data: (
        "550 5.1.1 User unknown" if stage == "rcpt" and env.rcpt_tos[-1] == "gone@x.test" else None
    )
    async with SmtpDeliverer(smtp_settings(smtp_sink.port)) as deliverer:
        # Recipients read from the message (a shared mailbox): a configured one refused
        # permanently would abort the transaction instead (test_smtp_deliverer_recipients.py).
        result = await deliverer.deliver(
            MESSAGE, envelope(recipients=("info@x.test", "gone@x.test"), recipients_fixed=False)
        )
    assert result.response == "250 2.0.0 OK queued"
    assert dict(result.refused) == {"gone@x.test": "550 5.1.1 User unknown"}
    [got] = smtp_sink.received
    assert got.rcpt_tos == ("info@x.test",)
    assert smtp_sink.handler.transactions == 1  # never re-sent


async def test_invalid_addresses_refused_locally(smtp_sink: SmtpSink) -> None:
    async with SmtpDeliverer(smtp_settings(smtp_sink.port)) as deliverer:
        own = await refused(deliverer, MESSAGE, envelope("bad\r\nRCPT TO:<x@y.test>"))
        fixed = await refused(deliverer, MESSAGE, envelope("a b@x.test", sender_fixed=True))
        rcpt = await refused(deliverer, MESSAGE, envelope(recipients=("<info@x.test>",)))
    assert (own.stage, classify(own)) == (SmtpStage.MAIL, Disposition.DEAD_LETTER)
    assert (fixed.stage, classify(fixed)) == (SmtpStage.MAIL, Disposition.PARK_ACCOUNT)
    assert (rcpt.stage, classify(rcpt)) == (SmtpStage.RCPT, Disposition.PARK_ACCOUNT)
    assert smtp_sink.handler.transactions == 0


# ------------------------------------------------------------------------------------------
# SIZE and DSN
# ------------------------------------------------------------------------------------------


async def test_size_exceeded_sends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.transcript")
    seen: list[str] = []

    def rule(stage: str, env: Any, data: bytes | None) -> None:
        seen.append(stage)

    with running(SmtpSink(data_size_limit=1000)) as sink:
        sink.handler.rule = rule
        transcript = logging.getLogger("test.transcript")
        async with SmtpDeliverer(smtp_settings(sink.port), transcript=transcript) as deliverer:
            big = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 20
            err = await refused(deliverer, big, envelope(sender_fixed=True))
            assert size_limit(deliverer) == 1000
            await deliverer.deliver(MESSAGE, envelope())
        assert [m.data for m in sink.received] == [MESSAGE]
    assert (err.stage, err.smtp_code, err.enhanced_code) == (SmtpStage.SIZE, 552, "5.3.4")
    assert err.per_message
    assert classify(err) is Disposition.DEAD_LETTER
    assert seen == ["mail", "rcpt", "data"]  # only the second message's transaction
    mails = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C: MAIL")]
    assert mails == [f"C: MAIL FROM:<{OWN_SENDER}> size={len(MESSAGE)}"]  # no MAIL for `big`


@pytest.mark.parametrize("dsn_setting", [True, False])
async def test_dsn_parameters_when_advertised(dsn_setting: bool) -> None:
    handler = ObservingHandler(dsn=True)
    controller = DsnController(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        s = smtp_settings(controller.port, dsn=dsn_setting)
        async with SmtpDeliverer(s) as deliverer:
            await deliverer.deliver(MESSAGE, envelope())
    finally:
        controller.stop()
    assert [m.data for m in handler.received] == [MESSAGE]
    if dsn_setting:
        assert (handler.dsn_mail, handler.dsn_rcpt) == (["RET=FULL"], ["NOTIFY=FAILURE"])
    else:
        assert (handler.dsn_mail, handler.dsn_rcpt) == ([], [])


async def test_no_dsn_parameters_when_not_advertised(smtp_sink: SmtpSink) -> None:
    # aiosmtpd would answer 555 to RET=/NOTIFY= (library-facts §3); it must never see them.
    async with SmtpDeliverer(smtp_settings(smtp_sink.port, dsn=True)) as deliverer:
        await deliverer.deliver(MESSAGE, envelope())
    [got] = smtp_sink.received
    assert got.mail_options == (f"SIZE={len(MESSAGE)}",)
    assert got.rcpt_options == ()


# ------------------------------------------------------------------------------------------
# Stalls, drops, reconnects
# ------------------------------------------------------------------------------------------


async def test_stall_after_data_retries_then_reconnects(
    observed_sink: tuple[SmtpSink, ObservingHandler],
) -> None:
    sink, handler = observed_sink
    release = threading.Event()

    def rule(stage: str, env: Any, data: bytes | None) -> str | None:
        if stage == "data" and data is not None and b"stall" in data:
            release.wait(10)  # blocks the server's loop: it answers nothing
            return "451 4.3.0 too late"  # keeps the stalled message out of .received
        return None

    sink.handler.rule = rule
    try:
        settings = smtp_settings(sink.port, timeout=0.5, data_termination_timeout=0.5)
        async with SmtpDeliverer(settings) as deliverer:
            err = await refused(deliverer, message(1) + b"stall\r\n", envelope())
            assert err.stage is SmtpStage.DATA
            assert err.smtp_code is None
            assert "no reply to the end of the message within 0.5s" in err.text
            assert deliverer.data_timeouts == 1
            assert classify(err) is Disposition.RETRY
            assert not is_connected(deliverer)
            release.set()
            await deliverer.deliver(message(2), envelope())
    finally:
        release.set()
    assert [m.data for m in sink.received] == [message(2)]
    assert len(handler.ehlo_peers) == 2


async def test_cancelled_delivery_drops_the_connection(
    observed_sink: tuple[SmtpSink, ObservingHandler],
) -> None:
    # Shutdown grace ran out mid-DATA (docs/design.md §10.2, §10.4): the stream is out of step
    # and must not be reused; the CancelledError must propagate.
    sink, handler = observed_sink
    entered, release = threading.Event(), threading.Event()

    def rule(stage: str, env: Any, data: bytes | None) -> str | None:
        if stage == "data" and data is not None and b"stall" in data:
            entered.set()
            release.wait(10)
            return "250 2.0.0 late"  # what a desynced client would misread later
        return None

    sink.handler.rule = rule
    try:
        async with SmtpDeliverer(smtp_settings(sink.port)) as deliverer:
            task = asyncio.create_task(deliverer.deliver(message(1) + b"stall\r\n", envelope()))
            await asyncio.to_thread(entered.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not is_connected(deliverer)
            release.set()
            result = await deliverer.deliver(message(2), envelope())
            assert result.response == "250 2.0.0 OK queued"
    finally:
        release.set()
    assert len(handler.ehlo_peers) == 2


async def test_421_closes_and_next_message_reconnects(
    observed_sink: tuple[SmtpSink, ObservingHandler],
) -> None:
    sink, handler = observed_sink
    sink.handler.rule = lambda stage, env, data: (
        "421 4.3.2 Service shutting down" if env.mail_from == "first@x.test" else None
    )
    async with SmtpDeliverer(smtp_settings(sink.port)) as deliverer:
        err = await refused(deliverer, message(1), envelope("first@x.test"))
        assert (err.stage, err.smtp_code) == (SmtpStage.MAIL, 421)
        assert classify(err) is Disposition.RETRY
        assert not is_connected(deliverer)  # RFC 5321 §3.8: 421 ends the session
        await deliverer.deliver(message(2), envelope())
    assert [m.data for m in sink.received] == [message(2)]
    assert len(handler.ehlo_peers) == 2


class CuttingProxy:
    """Loopback TCP proxy to the sink that drops the connection once, when the client sends
    ``cut_at``.  aiosmtpd cannot drop a connection on request, so this stands in for the
    network."""

    def __init__(self, target_port: int, cut_at: bytes) -> None:
        self.target_port = target_port
        self.cut_at: bytes | None = cut_at
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, watch: bool) -> None:
            try:
                while data := await r.read(65536):
                    if watch and self.cut_at is not None and self.cut_at in data:
                        self.cut_at = None
                        break
                    w.write(data)
                    await w.drain()
            except ConnectionError:
                pass
            finally:
                client_w.close()
                server_w.close()

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(pump(client_r, server_w, watch=True))
                tg.create_task(pump(server_r, client_w, watch=False))
        finally:
            self._tasks.discard(task)


async def test_dropped_connection_retries_then_reconnects(smtp_sink: SmtpSink) -> None:
    async with CuttingProxy(smtp_sink.port, cut_at=b"DATA\r\n") as proxy:
        async with SmtpDeliverer(smtp_settings(proxy.port)) as deliverer:
            err = await refused(deliverer, message(1), envelope())
            assert err.stage is SmtpStage.DATA
            assert err.smtp_code is None
            assert classify(err) is Disposition.RETRY
            assert not is_connected(deliverer)
            await deliverer.deliver(message(2), envelope())
            await deliverer.deliver(message(3), envelope())
        assert proxy.connections == 2
    assert [m.data for m in smtp_sink.received] == [message(2), message(3)]


async def test_nothing_listening_is_connect_retry() -> None:
    async with SmtpDeliverer(smtp_settings(free_port(), timeout=2)) as deliverer:
        err = await refused(deliverer, MESSAGE, envelope())
    assert err.stage is SmtpStage.CONNECT
    assert classify(err) is Disposition.RETRY


async def test_connect_is_idempotent_and_close_is_safe(
    observed_sink: tuple[SmtpSink, ObservingHandler],
) -> None:
    sink, handler = observed_sink
    deliverer = SmtpDeliverer(smtp_settings(sink.port))
    assert size_limit(deliverer) is None
    await deliverer.close()  # never connected: nothing to do
    await deliverer.connect()
    await deliverer.connect()
    assert size_limit(deliverer) == 64 * 1024 * 1024
    await deliverer.deliver(MESSAGE, envelope())
    await deliverer.close()
    await deliverer.close()
    assert not is_connected(deliverer)
    assert len(handler.ehlo_peers) == 1


# ------------------------------------------------------------------------------------------
# The DATA path on the wire: our own content writer, RFC 2920 pipelining
# ------------------------------------------------------------------------------------------


class RawServer:
    """A small honest SMTP server on loopback that records the exact bytes it receives.

    aiosmtpd un-stuffs DATA and cannot show the wire; this one keeps the content between the
    354 and the end of data as sent.  With ``pipelining`` it advertises PIPELINING and reads
    MAIL, every RCPT and DATA before it answers any of them (a client that waits for each
    reply deadlocks and times out); ``split`` sends those replies in separate writes.
    ``after_354`` may replace the content phase (to drop the connection or stop reading).
    """

    def __init__(
        self,
        *,
        pipelining: bool = True,
        split: bool = False,
        rcpt_reply: bytes = b"250 2.1.5 ok",
        data_reply: bytes = b"354 go ahead",
        smtputf8: bool = False,
        after_354: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
        | None = None,
    ) -> None:
        self.pipelining, self.split, self.smtputf8 = pipelining, split, smtputf8
        self.rcpt_reply, self.data_reply, self.after_354 = rcpt_reply, data_reply, after_354
        self.commands: list[bytes] = []
        self.contents: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        # A big stream limit: readuntil() keeps a whole message's content.
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=2**26)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _reply(self, w: asyncio.StreamWriter, replies: list[bytes]) -> None:
        if self.split:
            for reply in replies:
                w.write(reply + b"\r\n")
                await w.drain()
        else:
            w.write(b"".join(reply + b"\r\n" for reply in replies))
            await w.drain()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            w.write(b"220 raw ready\r\n")
            extensions = [b"SIZE 100000000", b"8BITMIME"] + ([b"SMTPUTF8"] * self.smtputf8)
            extensions += [b"PIPELINING"] * self.pipelining
            group: list[bytes] = []
            while line := await r.readline():
                self.commands.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    lines = [b"250-raw", *(b"250-" + e for e in extensions[:-1])]
                    w.write(b"\r\n".join([*lines, b"250 " + extensions[-1], b""]))
                elif verb == b"QUIT":
                    w.write(b"221 bye\r\n")
                    break
                elif verb == b"RSET":
                    w.write(b"250 reset\r\n")
                elif verb in (b"MAIL", b"RCPT", b"DATA"):
                    reply = {b"MAIL": b"250 2.1.0 ok", b"RCPT": self.rcpt_reply}.get(verb)
                    group.append(reply or self.data_reply)
                    if verb == b"DATA" or not self.pipelining:
                        await self._reply(w, group)
                        group = []
                    if verb == b"DATA" and group == [] and self.data_reply.startswith(b"354"):
                        if self.after_354 is not None:
                            await self.after_354(r, w)
                            return
                        content = await r.readuntil(b"\r\n.\r\n")
                        self.contents.append(content)
                        ok = self.rcpt_reply.startswith(b"25")
                        w.write(b"250 2.0.0 queued\r\n" if ok else b"554 5.5.1 no recipients\r\n")
                else:
                    w.write(b"502 5.5.2 what\r\n")
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


def aiosmtplib_wire(message: bytes) -> bytes:
    """The DATA content aiosmtplib 5.1's sendmail() would have written for ``message``."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


TRACE = b"Received: from pop.test by connector.test with POP3 (pop3-connector); now\r\n"
WIRE_CASES = [
    TRICKY,
    b".first line is a dot\r\n..\r\n.\r\nno final CRLF",
    b"Subject: bare LF\n\n.dot\nline\n",
    b"Subject: bare CR\r\n\r\nx\ry\r\n",
    b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n.\r\n") * 3000,  # 3 MB, dots throughout
]


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("split", [True, False])
async def test_exact_bytes_on_the_wire(pipelining: bool, split: bool) -> None:
    async with (
        RawServer(pipelining=pipelining, split=split) as server,
        SmtpDeliverer(smtp_settings(server.port)) as deliverer,
    ):
        for raw in WIRE_CASES:
            result = await deliverer.deliver(raw, envelope(), trace=TRACE)
            assert result.response == "250 2.0.0 queued"
    # Dot-stuffed (RFC 5321 §4.5.2), CRLF (bare CR/LF normalised as aiosmtplib does), CRLF.CRLF.
    assert server.contents == [aiosmtplib_wire(TRACE + raw) for raw in WIRE_CASES]
    mails = [c for c in server.commands if c.startswith(b"MAIL")]
    sizes = [len(normalize_message_line_endings(TRACE + raw)) for raw in WIRE_CASES]
    assert mails[0] == b"MAIL FROM:<%s> size=%d BODY=8BITMIME\r\n" % (OWN_SENDER.encode(), sizes[0])
    assert mails[1:] == [
        b"MAIL FROM:<%s> size=%d\r\n" % (OWN_SENDER.encode(), n) for n in sizes[1:]
    ]
    assert server.commands.count(b"RCPT TO:<info@firma.local>\r\n") == len(WIRE_CASES)


async def test_pipelined_refusals_keep_their_stage() -> None:
    # RCPT refused (fixed recipient), but the server answered the pipelined DATA with 354
    # (RFC 2920 §3.1): the client aborts by closing, never sends content (not even "."), and
    # the next message reconnects.  A fixed sender: nothing to probe (this server answers
    # only whole pipelined groups, so a probe would wait for its timeout).
    async with (
        RawServer(rcpt_reply=b"550 5.1.1 no such user") as server,
        SmtpDeliverer(smtp_settings(server.port)) as deliverer,
    ):
        err = await refused(deliverer, MESSAGE, envelope(sender_fixed=True))
        assert (err.stage, err.smtp_code, err.enhanced_code) == (SmtpStage.RCPT, 550, "5.1.1")
        assert classify(err) is Disposition.PARK_ACCOUNT
        assert not is_connected(deliverer)
        server.rcpt_reply = b"250 ok"
        await deliverer.deliver(MESSAGE, envelope())
    assert server.contents == [aiosmtplib_wire(MESSAGE)]
    assert server.commands.count(b"EHLO connector.test\r\n") == 2
    # DATA itself refused.
    async with (
        RawServer(data_reply=b"554 5.3.0 not now") as server,
        SmtpDeliverer(smtp_settings(server.port)) as deliverer,
    ):
        err = await refused(deliverer, MESSAGE, envelope())
    assert (err.stage, err.smtp_code) == (SmtpStage.DATA, 554)
    assert server.contents == []


async def test_drop_in_the_middle_of_the_content() -> None:
    async def drop(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(100_000)
        w.transport.abort()

    raw = b"Subject: cut\r\n\r\n" + (b"z" * 998 + b"\r\n") * 2000  # 2 MB
    async with (
        RawServer(after_354=drop) as server,
        SmtpDeliverer(smtp_settings(server.port)) as deliverer,
    ):
        err = await refused(deliverer, raw, envelope())
        assert (err.stage, err.smtp_code) == (SmtpStage.DATA, None)
        assert err.response == "connection lost"
        assert classify(err) is Disposition.RETRY
        assert not is_connected(deliverer)


async def test_server_that_stops_reading_times_out_at_data() -> None:
    stop = asyncio.Event()

    async def stall(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await stop.wait()  # reads nothing: the socket buffers fill, the client must give up

    raw = b"Subject: huge\r\n\r\n" + (b"h" * 1022 + b"\r\n") * (48 * 1024)  # 48 MiB
    async with (
        RawServer(after_354=stall) as server,
        SmtpDeliverer(
            smtp_settings(server.port, timeout=0.5, data_termination_timeout=0.5)
        ) as deliverer,
    ):
        err = await refused(deliverer, raw, envelope())
        stop.set()
        assert (err.stage, err.smtp_code) == (SmtpStage.DATA, None)
        # A stalled write; or, where the loopback's buffers take all 48 MiB, no final reply.
        assert "timed out" in err.response or "no reply to the end" in err.response
        assert not is_connected(deliverer)


class PipeliningHandler(ObservingHandler):
    """aiosmtpd reads commands line by line, so it copes with pipelining; it only does not
    advertise it (RFC 2920).  This handler adds the keyword."""

    async def handle_EHLO(  # aiosmtpd hook name
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        responses.insert(-1, "250-PIPELINING")
        return responses


async def test_pipelined_transactions_against_aiosmtpd() -> None:
    handler = PipeliningHandler()
    sink = SmtpSink()
    sink.handler = handler
    sink.controller.handler = handler

    def rule(stage: str, env: Any, data: bytes | None) -> str | None:
        if stage == "mail" and env.mail_from == "grey@x.test":
            return "451 4.7.1 Greylisted"
        if stage == "rcpt" and env.rcpt_tos[-1] == "gone@x.test":
            return "550 5.1.1 User unknown"
        if stage == "data" and b"denied" in (data or b""):
            return "554 5.1.0 Sender denied"
        return None

    handler.rule = rule
    with running(sink):
        async with SmtpDeliverer(smtp_settings(sink.port)) as deliverer:
            grey = await refused(deliverer, message(1), envelope("grey@x.test"))
            denied = await refused(deliverer, message(2) + b"denied\r\n", envelope())
            partial = await deliverer.deliver(
                message(3),
                envelope(recipients=("info@x.test", "gone@x.test"), recipients_fixed=False),
            )
            await deliverer.deliver(message(4), envelope(), trace=TRACE)
    assert (grey.stage, grey.smtp_code, classify(grey)) == (SmtpStage.MAIL, 451, Disposition.RETRY)
    assert (denied.stage, denied.smtp_code) == (SmtpStage.DATA, 554)
    assert classify(denied) is Disposition.DEAD_LETTER
    assert dict(partial.refused) == {"gone@x.test": "550 5.1.1 User unknown"}
    # The test handler records MAIL's sender before it refuses it, so it then accepts RCPT and
    # DATA: the client drops that session rather than send anything (no empty message).
    assert [m.data for m in sink.received] == [message(3), TRACE + message(4)]
    assert len(handler.ehlo_peers) == 2


# ------------------------------------------------------------------------------------------
# SMTPUTF8 (RFC 6531): an internationalized message
# ------------------------------------------------------------------------------------------

UTF8_HEADERS = "Subject: Grüße aus Köln\r\nFrom: Jürgen <j@x.test>\r\n\r\nHallo.\r\n".encode()
UTF8_SENDER = "jürgen@bücher.example"


@pytest.mark.parametrize("pipelining", [True, False])
async def test_smtputf8_on_the_wire_for_a_utf8_sender_and_headers(pipelining: bool) -> None:
    async with (
        RawServer(pipelining=pipelining, smtputf8=True) as server,
        SmtpDeliverer(smtp_settings(server.port)) as deliverer,
    ):
        await deliverer.deliver(UTF8_HEADERS, envelope(UTF8_SENDER))  # both reasons
        await deliverer.deliver(UTF8_HEADERS, envelope())  # the header fields alone
        await deliverer.deliver(MESSAGE, envelope(UTF8_SENDER))  # the address alone
        await deliverer.deliver(b"Subject: x\r\n\r\nK\xc3\xb6ln\r\n", envelope())  # body only
    mails = [c for c in server.commands if c.startswith(b"MAIL")]
    n, m, b = len(UTF8_HEADERS), len(MESSAGE), len(b"Subject: x\r\n\r\nK\xc3\xb6ln\r\n")
    assert mails == [
        b"MAIL FROM:<j\xc3\xbcrgen@b\xc3\xbccher.example> size=%d BODY=8BITMIME SMTPUTF8\r\n" % n,
        b"MAIL FROM:<owner@example.test> size=%d BODY=8BITMIME SMTPUTF8\r\n" % n,
        b"MAIL FROM:<j\xc3\xbcrgen@b\xc3\xbccher.example> size=%d SMTPUTF8\r\n" % m,
        b"MAIL FROM:<owner@example.test> size=%d BODY=8BITMIME\r\n" % b,
    ]
    assert server.contents[0] == aiosmtplib_wire(UTF8_HEADERS)  # the bytes, unchanged


async def test_smtputf8_against_aiosmtpd(smtp_sink: SmtpSink) -> None:
    recipients = ("info@firma.local", "zoë@firma.local")
    async with SmtpDeliverer(smtp_settings(smtp_sink.port)) as deliverer:
        await deliverer.deliver(UTF8_HEADERS, envelope(UTF8_SENDER, recipients))
    [got] = smtp_sink.received
    assert (got.mail_from, got.rcpt_tos, got.data) == (UTF8_SENDER, recipients, UTF8_HEADERS)
    assert "SMTPUTF8" in got.mail_options


async def test_utf8_address_without_smtputf8_is_refused_locally_per_message() -> None:
    """RFC 6531 §3.7.1: a server without SMTPUTF8 cannot take a UTF-8 address; the refusal is
    ours (553 5.6.7), about this message unless the address is the same for every message."""
    async with (
        RawServer() as server,
        SmtpDeliverer(smtp_settings(server.port)) as deliverer,
    ):
        own = await refused(deliverer, MESSAGE, envelope(UTF8_SENDER))
        fixed = await refused(deliverer, MESSAGE, envelope(UTF8_SENDER, sender_fixed=True))
        read = await refused(
            deliverer, MESSAGE, envelope(recipients=("zoë@firma.local",), recipients_fixed=False)
        )
        configured = await refused(deliverer, MESSAGE, envelope(recipients=("zoë@firma.local",)))
        # Header fields in UTF-8 still go out, unchanged and without the parameter.
        await deliverer.deliver(UTF8_HEADERS, envelope())
    for err in (own, fixed, read, configured):
        assert (err.smtp_code, err.enhanced_code) == (553, "5.6.7"), err
        assert "SMTPUTF8" in err.response
    assert (own.stage, classify(own)) == (SmtpStage.MAIL, Disposition.DEAD_LETTER)
    assert (fixed.stage, classify(fixed)) == (SmtpStage.MAIL, Disposition.PARK_ACCOUNT)
    assert (read.stage, classify(read)) == (SmtpStage.RCPT, Disposition.DEAD_LETTER)
    assert (configured.stage, classify(configured)) == (SmtpStage.RCPT, Disposition.PARK_ACCOUNT)
    mails = [c for c in server.commands if c.startswith(b"MAIL")]
    assert mails == [
        b"MAIL FROM:<owner@example.test> size=%d BODY=8BITMIME\r\n" % len(UTF8_HEADERS)
    ]
    assert server.contents == [aiosmtplib_wire(UTF8_HEADERS)]
