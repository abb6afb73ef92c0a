"""``pop3-connector run`` on a shared mailbox of hostile messages among good ones (issue 13).

The real service, as systemd runs it, against the real Dovecot: the messages of the security
report (a ``Delivered-To`` of thousands of nested ``(``, the cubic ``Return-Path``, a 1 MiB
header line, a ``To`` of 50,000 addresses, 50,000 header fields, a 100 KB Message-ID, a quoted
and a UTF-8 Return-Path) among ordinary mail.  While it works, ``/healthz`` keeps answering;
at the end every good message was delivered once, and every hostile one was delivered (to the
fallback when it names nobody readable) or dead-lettered: none lost, none left upstream, none
blocking the ones behind it, and the process still running until SIGTERM.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time
from collections.abc import Callable

import pytest

from tests.integration.conftest import Setup, strip_trace
from tests.integration.test_service import running, wait_until
from tests.servers import free_port

pytestmark = pytest.mark.integration


def good(i: int) -> bytes:
    return (
        f"Return-Path: <alice@customer.example>\r\nFrom: alice@customer.example\r\n"
        f"To: bob@firma.example\r\nSubject: good {i}\r\nMessage-ID: <good{i}@customer.example>"
        f"\r\n\r\nBody of good message {i}.\r\n"
    ).encode()


def hostile(name: str, head: bytes) -> bytes:
    return (
        head
        + b"X-Hostile: "
        + name.encode()
        + b"\r\nSubject: "
        + name.encode()
        + (b"\r\n\r\nbody\r\n")
    )


HOSTILE: dict[str, bytes] = {
    "nested-parens": hostile(
        "nested-parens",
        b"Delivered-To: " + b"(" * 5000 + b"\r\nTo: " + b"(" * 500 + b"carol@firma.example\r\n",
    ),
    "cubic-return-path": hostile(
        "cubic-return-path",
        b"Return-Path: <" + b" " * 1400 + b"<" * 1400 + b"\r\nTo: carol@firma.example\r\n",
    ),
    "mib-header-line": hostile(
        "mib-header-line", b"To: dave@firma.example\r\nX-Long: " + b"h" * (1 << 20) + b"\r\n"
    ),
    "huge-to": hostile(
        "huge-to", b"To: " + b"someone@elsewhere.example,\r\n " * 50_000 + b"erin@firma.example\r\n"
    ),
    "many-fields": hostile(
        "many-fields",
        b"".join(b"X-F%d: v\r\n" % i for i in range(50_000)) + b"To: f@firma.example\r\n",
    ),
    "long-message-id": hostile(
        "long-message-id", b"Message-ID: <" + b"m" * 100_000 + b"@x>\r\nTo: gina@firma.example\r\n"
    ),
    "quoted-return-path": hostile(
        "quoted-return-path",
        b'Return-Path: <"john doe"@partner.example>\r\nTo: "hank h"@firma.example\r\n',
    ),
    "utf8-return-path": hostile(
        "utf8-return-path",
        "Return-Path: <jörg@müller.example>\r\nTo: ida@firma.example\r\n".encode(),
    ),
}


class HealthProbe(threading.Thread):
    """GETs /healthz every 50 ms while the service works; records failures and the slowest."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.answers: list[tuple[int | None, float]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            status: int | None = None
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/healthz")
                status = conn.getresponse().status
                conn.close()
            except OSError:
                status = None
            self.answers.append((status, time.monotonic() - start))
            self.stop.wait(0.05)


def cycles_done(port: int) -> float:
    """Every cycle so far (``cycles_total``, both results), from the metrics endpoint."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    prefix = "pop3_connector_cycles_total{"
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefix)
    )


def test_run_on_a_mailbox_of_hostile_messages_keeps_serving_and_loses_nothing(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory(
        service_extra='poll_interval = "1s"',
        account_extra='[accounts.shared]\ndomains = ["firma.example"]',
    )
    port = free_port()
    s.config.write_text(
        s.config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
    )
    goods = [good(i) for i in range(6)]
    raws = []
    for i, bad in enumerate(HOSTILE.values()):
        raws += [goods[i % len(goods)], bad] if i < len(goods) else [bad]
    s.dovecot.deliver_many(s.user, raws)

    with running(s.config) as (proc, log):
        wait_until(lambda: log.wait_for("cycle ok", timeout=0.1), "the first cycle", 60)
        probe = HealthProbe(port)
        probe.start()
        try:
            wait_until(lambda: s.upstream() == [], "an empty mailbox upstream", 60)
            # Three more cycles: nothing comes again, nothing new is dead-lettered.
            settled = (len(s.received()), len(s.dead_letters()))
            cycles = cycles_done(port)  # counted in /metrics: idle cycles log only at debug
            wait_until(lambda: cycles_done(port) >= cycles + 3, "three more cycles")
            assert (len(s.received()), len(s.dead_letters())) == settled
        finally:
            probe.stop.set()
            probe.join(10)
        assert proc.poll() is None, log.text()[-3000:]  # still running: no message stopped it
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.text()[-3000:]

    assert probe.answers, "the probe never ran"
    assert all(status == 200 for status, _ in probe.answers), probe.answers
    assert max(took for _, took in probe.answers) < 2.0

    delivered = [strip_trace(m.data) for m in s.received()]
    assert sorted(d for d in delivered if d in goods) == sorted(goods)  # each good one, once
    dead = {
        d.partition(b"\r\n\r\n")[0].rsplit(b"X-Hostile: ", 1)[-1].split(b"\r\n")[0]
        for d in s.dead_letters()
    }
    for name, raw in HOSTILE.items():
        got = delivered.count(raw)
        buried = name.encode() in dead
        assert got + buried == 1, (name, got, buried)
    by_subject = {
        m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode(): m for m in s.received()
    }
    # Routing that could not read a header fell back to the account's deliver_to, and said so.
    assert by_subject["nested-parens"].rcpt_tos == ("info@firma.test",)
    assert by_subject["huge-to"].rcpt_tos == ("info@firma.test",)
    assert "could not be read whole" in log.text()
    # The Return-Paths of the report: the cubic one is no path (<>); the quoted one is kept.
    assert by_subject["cubic-return-path"].mail_from == "<>"
    assert by_subject["quoted-return-path"].mail_from == '"john doe"@partner.example'
    assert by_subject["quoted-return-path"].rcpt_tos == ('"hank h"@firma.example',)
