"""The reply to the final dot has its own deadline (issue 18; RFC 5321 §4.5.3.2.6: 10 minutes).

An Exchange that scans a large message before it answers the end of data took longer than the
general ``[smtp] timeout``: the message was deferred although accepted, and delivered again on
every cycle.  Here an aiosmtpd sink holds its reply to the final dot (its handler runs before it
answers) with short deadlines injected: no test waits minutes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from prometheus_client.parser import text_string_to_metric_families

from connector.config import load_settings
from connector.errors import DeliveryError, Disposition, SmtpStage, classify
from connector.metrics import Metrics
from connector.runtime import build_runtime
from connector.service import open_service
from connector.smtp import Envelope, SmtpDeliverer, SmtpSettings
from connector.tls import TlsMode
from tests.integration.conftest import Setup, strip_trace
from tests.integration.test_cycle import message
from tests.integration.test_service import wait_until
from tests.peek import smtp_connected
from tests.servers import SmtpSink

pytestmark = pytest.mark.integration

TIMEOUT = 0.2  # [smtp] timeout: every other reply


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink().start()
    try:
        yield s
    finally:
        s.stop()


def settings(port: int, final: float) -> SmtpSettings:
    return SmtpSettings(
        "127.0.0.1",
        port,
        TlsMode.NONE,
        None,
        "connector.test",
        timeout=TIMEOUT,
        data_termination_timeout=final,
    )


def hold_final_reply(seconds: float) -> Callable[[str, SmtpEnvelope, bytes | None], str | None]:
    """A sink rule that answers the end of data only after ``seconds`` (a slow scan)."""

    def rule(stage: str, envelope: SmtpEnvelope, data: bytes | None) -> str | None:
        if stage == "data":
            time.sleep(seconds)  # the server's own delay, the fault under test
        return None

    return rule


ENVELOPE = Envelope("alice@customer.example", ("info@firma.test",), sender_fixed=False)


async def test_a_final_reply_slower_than_timeout_but_within_its_deadline_is_a_delivery(
    sink: SmtpSink,
) -> None:
    sink.handler.rule = hold_final_reply(4 * TIMEOUT)
    async with SmtpDeliverer(settings(sink.port, final=10.0)) as deliverer:
        delivered = await deliverer.deliver(message(1), ENVELOPE)
        assert delivered.response.startswith("250")
        assert deliverer.data_timeouts == 0
        # The other replies keep the general timeout: a second message on the same session.
        sink.handler.rule = None
        await deliverer.deliver(message(2), ENVELOPE)
    assert [m.data for m in sink.received] == [message(1), message(2)]


async def test_no_final_reply_within_its_deadline_is_a_counted_deferral(sink: SmtpSink) -> None:
    release = threading.Event()

    def never(stage: str, envelope: SmtpEnvelope, data: bytes | None) -> str | None:
        if stage == "data":
            release.wait(10)
            return "451 4.3.0 too late"  # keeps it out of sink.received
        return None

    sink.handler.rule = never
    try:
        async with SmtpDeliverer(settings(sink.port, final=0.5)) as deliverer:
            started = time.monotonic()
            with pytest.raises(DeliveryError) as info:
                await deliverer.deliver(message(1), ENVELOPE)
            waited = time.monotonic() - started
            assert not smtp_connected(deliverer)  # out of step: dropped
            assert deliverer.data_timeouts == 1
    finally:
        release.set()
    err = info.value
    assert (err.stage, err.smtp_code) == (SmtpStage.DATA, None)
    assert err.text.startswith("no reply to the end of the message within 0.5s")
    assert classify(err) is Disposition.RETRY  # we cannot know: a deferral
    assert waited >= 0.5  # the deadline of the final reply, not the general 0.2 s


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "pop3_connector_" + name and sample.labels == labels:
                return float(sample.value)
    return None


def test_the_service_counts_a_timeout_at_the_final_dot_and_the_config_key_sets_it(
    setup_factory: Callable[..., Setup],
) -> None:
    """Through the config and the service: ``data_termination_timeout`` is the deadline,
    and ``smtp_data_timeouts_total`` counts the message deferred at it.  The server took it
    meanwhile (it answered after we gave up), so the next cycle delivers it again: the
    duplicate RFC 5321 §4.5.3.2.6 warns of, and why the default is 10 minutes."""
    s = setup_factory(smtp_extra='timeout = "0.2s"\ndata_termination_timeout = "0.6s"')
    s.dovecot.deliver_many(s.user, [message(1)])
    held: list[bool] = []

    def slow_once(stage: str, envelope: SmtpEnvelope, data: bytes | None) -> str | None:
        if stage == "data" and not held:
            held.append(True)
            time.sleep(1.5)
        return None

    s.sink.handler.rule = slow_once
    runtime = build_runtime(load_settings(s.config))
    assert runtime.smtp.data_termination_timeout == 0.6
    metrics = Metrics()

    async def cycles() -> list[Any]:
        async with open_service(runtime, metrics=metrics) as service:
            (first,) = await service.run_once()
            # The held message is taken after we gave up on it.
            await asyncio.to_thread(wait_until, lambda: len(s.received()) == 1, "the server")
            (second,) = await service.run_once()
            return [first, second]

    first, second = asyncio.run(asyncio.wait_for(cycles(), 30))
    assert (first.stats.deferred, second.stats.delivered) == (1, 1)
    assert _sample(metrics, "smtp_data_timeouts_total", account="info") == 1
    assert _sample(metrics, "smtp_responses_total", account="info", code="none") == 1
    assert [strip_trace(m.data) for m in s.received()] == [message(1)] * 2
    assert s.upstream() == []
