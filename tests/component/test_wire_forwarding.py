"""Forwarding POP3's dot-stuffed body to SMTP's DATA as it is (issue 5, cut 1).

POP3 (RFC 1939 §3) and SMTP (RFC 5321 §4.5.2) stuff dots alike, so a CRLF-clean RETR body is
already DATA's content.  The pieces: the parser's ``Message.wire``, ``prepare_wire`` and
``stuffed_pieces`` in smtp/content.py (tests/unit/test_wire_forwarding.py), and here
``SmtpDeliverer.deliver(..., wire=...)`` against aiosmtpd on loopback.
"""

from __future__ import annotations

from connector.smtp import (
    Envelope,
    SmtpDeliverer,
    SmtpSettings,
)
from connector.tls import TlsMode
from tests.servers import SmtpSink
from tests.unit.test_wire_forwarding import BIG_LINE, CLEAN, TRACE, retr, stuff

# ------------------------------------------------------------------------------------------
# SmtpDeliverer.deliver(..., wire=...) against aiosmtpd
# ------------------------------------------------------------------------------------------


def deliverer(port: int) -> SmtpDeliverer:
    return SmtpDeliverer(
        SmtpSettings(
            host="127.0.0.1",
            port=port,
            tls=TlsMode.NONE,
            ssl_context=None,
            helo_name="connector.test",
            timeout=10.0,
        )
    )


ENVELOPE = Envelope("owner@example.test", ("info@firma.test",), sender_fixed=False)


async def test_the_sink_gets_trace_and_raw_byte_for_byte(smtp_sink: SmtpSink) -> None:
    raws = [m if m.endswith(b"\r\n") else m + b"\r\n" for m in CLEAN]
    raws.append(b"Subject: 20 MiB\r\n\r\n" + (BIG_LINE * 4096 + b".\r\n..x\r\n") * 80)
    async with deliverer(smtp_sink.port) as d:
        for raw in raws:
            await d.deliver(raw, ENVELOPE, trace=TRACE, wire=stuff(raw))
    got = smtp_sink.received
    assert [m.data for m in got] == [TRACE + raw for raw in raws]
    for raw, mail in zip(raws, got, strict=True):
        assert f"SIZE={len(TRACE) + len(raw)}" in mail.mail_options
        assert ("BODY=8BITMIME" in mail.mail_options) is not raw.isascii()


async def test_a_dot_line_the_server_did_not_stuff_arrives_as_raw(smtp_sink: SmtpSink) -> None:
    # ".x" should have come as "..x" (RFC 1939 §3); raw keeps it as sent.  Forwarding the body
    # as DATA would let the SMTP server strip that dot (RFC 5321 §4.5.2), so what Exchange got
    # would differ from what the ledger and a dead letter hold.
    body = b"Subject: sloppy\r\n\r\n..\r\n.x\r\nend\r\n"
    got = retr(body, announced=len(body) - 1)
    assert got.raw == b"Subject: sloppy\r\n\r\n.\r\n.x\r\nend\r\n"
    async with deliverer(smtp_sink.port) as d:
        await d.deliver(got.raw, ENVELOPE, trace=TRACE, wire=got.wire)
    assert [m.data for m in smtp_sink.received] == [TRACE + got.raw]


async def test_the_wire_form_is_what_goes_out(smtp_sink: SmtpSink) -> None:
    # Proof that the fast path writes ``wire`` and does not stuff ``raw`` again: a wire form
    # that differs from raw arrives instead of it (a caller bug, made visible on purpose).
    raw = b"Subject: raw\r\n\r\n.line\r\n"
    async with deliverer(smtp_sink.port) as d:
        await d.deliver(raw, ENVELOPE, trace=TRACE, wire=b"Subject: wire\r\n\r\n..line\r\n")
        # A trace that is not CRLF-clean: the old path, from raw.
        await d.deliver(raw, ENVELOPE, trace=b"Received: x\n", wire=b"Subject: no\r\n")
    assert [m.data for m in smtp_sink.received] == [
        TRACE + b"Subject: wire\r\n\r\n.line\r\n",
        b"Received: x\r\n" + raw,
    ]
