"""End to end: real Dovecot (POP3) -> pop3-connector -> aiosmtpd playing Exchange.

These run the command's own entry point (``connector.cli.main``) in-process, except the crash test,
which needs a real process to kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope

from tests.integration.conftest import Setup, strip_trace
from tests.proxy import HoldingProxy
from tests.servers import SmtpSink

pytestmark = pytest.mark.integration


def message(i: int, sender: str = "alice@customer.example", body: bytes = b"") -> bytes:
    return (
        f"Return-Path: <{sender}>\r\n"
        f"From: {sender}\r\n"
        f"To: info@firma.example\r\n"
        f"Subject: message {i}\r\n"
        f"Message-ID: <{i}@customer.example>\r\n"
        "\r\n"
        f"Body of message {i}.\r\n".encode()
        + body
    )


def deny_spammer(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
    if stage == "data" and envelope.mail_from == "spam@bad.example":
        return "554 5.1.0 Sender denied"
    return None


@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
def test_thirty_messages_five_refused_permanently(
    setup_factory: Callable[..., Setup], tls: str
) -> None:
    s = setup_factory(tls=tls)
    raws = [
        message(i, sender="spam@bad.example" if i % 6 == 5 else "alice@customer.example")
        for i in range(30)
    ]
    s.dovecot.deliver_many(s.user, raws)
    s.sink.handler.rule = deny_spammer

    assert s.run("once") == 0

    good = [r for i, r in enumerate(raws) if i % 6 != 5]
    bad = [r for i, r in enumerate(raws) if i % 6 == 5]
    received = s.received()
    assert [strip_trace(m.data) for m in received] == good  # in order, byte for byte
    assert all(m.rcpt_tos == ("info@firma.test",) for m in received)
    assert {m.mail_from for m in received} == {"alice@customer.example"}
    assert received[0].data.startswith(b"Received: from localhost by connector.test with POP3")

    dead = s.dead_letters()
    assert len(dead) == 5
    for d in dead:
        head, _, original = d.partition(b"X-POP3-Connector-Failed-At: ")
        original = original.split(b"\r\n", 1)[1]
        assert original in bad
        assert b"X-POP3-Connector-Account: info\r\n" in head
        assert b"X-POP3-Connector-Stage: data\r\n" in head
        assert b"X-POP3-Connector-Response: 554 5.1.0 Sender denied\r\n" in head
        assert b"X-POP3-Connector-UIDL: " in head
    assert s.upstream() == []

    transactions = s.sink.handler.transactions
    assert s.run("once") == 0
    assert s.sink.handler.transactions == transactions  # nothing handed to SMTP again
    assert len(s.dead_letters()) == 5


def test_second_cycle_does_not_refetch_refused_mail(setup_factory: Callable[..., Setup]) -> None:
    """The SBS flaw: refused mail stays upstream and is refused again forever.  Here it doesn't."""
    s = setup_factory()
    s.dovecot.deliver_many(s.user, [message(i, sender="spam@bad.example") for i in range(5)])
    s.sink.handler.rule = deny_spammer
    assert s.run("once") == 0
    assert len(s.dead_letters()) == 5
    s.dovecot.deliver_many(s.user, [message(100)])
    before = s.sink.handler.transactions
    assert s.run("once") == 0
    assert s.sink.handler.transactions == before + 1


def test_temporary_refusal_is_retried_next_cycle(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory()
    s.dovecot.deliver_many(s.user, [message(1), message(2)])
    refusals = {"count": 0}

    def greylist(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
        if (
            stage == "data"
            and data is not None
            and b"message 1\r\n" in data
            and not refusals["count"]
        ):
            refusals["count"] += 1
            return "451 4.7.1 Greylisted, try again later"
        return None

    s.sink.handler.rule = greylist
    assert s.run("once") == 0  # a deferral is a completed cycle
    assert [strip_trace(m.data) for m in s.received()] == [message(2)]
    assert len(s.upstream()) == 1
    with s.ledger() as db:
        assert db.execute(
            "SELECT state, attempts FROM messages WHERE state='deferred'"
        ).fetchall() == [("deferred", 1)]
    assert s.run("once") == 0
    assert [strip_trace(m.data) for m in s.received()] == [message(2), message(1)]
    assert s.upstream() == []
    assert s.dead_letters() == []


def test_deferral_past_max_deferral_is_dead_lettered(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory(account_extra='max_deferral = "5d"')
    s.dovecot.deliver_many(s.user, [message(1)])
    s.sink.handler.rule = lambda stage, env, data: (
        "451 4.3.0 Try later" if stage == "rcpt" else None
    )
    assert s.run("once") == 0
    assert len(s.upstream()) == 1
    assert s.dead_letters() == []
    s.age_deferrals(4 * 86400)
    assert s.run("once") == 0
    assert len(s.upstream()) == 1  # four days: still waiting
    assert s.dead_letters() == []
    s.age_deferrals(2 * 86400)
    assert s.run("once") == 0
    assert s.upstream() == []
    (dead,) = s.dead_letters()
    assert b"X-POP3-Connector-Stage: expired\r\n" in dead
    assert b"X-POP3-Connector-Response: 451 4.3.0 Try later\r\n" in dead
    assert dead.endswith(message(1))
    assert s.received() == []


def test_smtp_auth_failure_stops_the_cycle_and_keeps_everything(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    sink = SmtpSink(auth={"connector": "right-password"}).start()
    try:
        s = setup_factory(
            sink=sink, smtp_extra='username = "connector"\npassword = "wrong-password"'
        )
        s.dovecot.deliver_many(s.user, [message(1), message(2)])
        assert s.run("once") == 1
        assert len(s.upstream()) == 2
        assert s.dead_letters() == []
        assert sink.received == []
        out = capsys.readouterr()
        assert "FAILED" in out.out
        assert "wrong-password" not in out.out + out.err
    finally:
        sink.stop()


def test_fixed_recipient_refused_stops_the_cycle(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory()
    s.dovecot.deliver_many(s.user, [message(1), message(2), message(3)])
    s.sink.handler.rule = lambda stage, env, data: (
        "550 5.1.1 User unknown" if stage == "rcpt" else None
    )
    assert s.run("once") == 1
    assert len(s.upstream()) == 3
    assert s.dead_letters() == []
    # Stopped at the first message, after one probe (MAIL FROM:<> and RCPT TO the same
    # recipient, refused too): the same answer would have hit every one of them.
    assert [r[0] for r in s.sink.handler.refused] == ["rcpt", "rcpt"]


def test_killed_after_delivery_before_quit_delivers_nothing_twice(
    setup_factory: Callable[..., Setup], tmp_path: Path
) -> None:
    s = setup_factory()
    raws = [message(i) for i in range(5)]
    s.dovecot.deliver_many(s.user, raws)
    proxy = HoldingProxy(("127.0.0.1", s.dovecot.ports["pop3"]), hold_command=b"QUIT").start()
    try:
        killed_config = tmp_path / "via-proxy.toml"
        killed_config.write_text(
            s.config.read_text().replace(
                f"port = {s.dovecot.ports['pop3']}", f"port = {proxy.port}"
            )
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "connector", "--config", str(killed_config), "once"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            assert proxy.held.wait(timeout=30), "the connector never sent QUIT"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
    finally:
        proxy.close()

    # All five were accepted by SMTP; no QUIT reached Dovecot, so all five are still upstream.
    assert [strip_trace(m.data) for m in s.received()] == raws
    assert len(s.upstream()) == 5

    assert s.run("once") == 0
    assert len(s.received()) == 5  # nothing delivered twice
    assert s.upstream() == []


def test_awkward_messages_arrive_intact(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory()
    long_line = b"x" * 200_000
    attachment = (b"QUJD" * 19 + b"\r\n") * (20 * 1024 * 1024 // 78)  # ~20 MiB of base64
    raws = [
        b"Subject: bare LF\n\nline one\nline two\n",
        b"Subject: long line\r\n\r\n" + long_line + b"\r\n" + long_line + b"\r\n",
        b"Subject: dots\r\n\r\n.\r\n..\r\n.starts with a dot\r\n...\r\n",
        "Subject: Grüße aus Köln\r\nFrom: Jörg <j@x.example>\r\n\r\n8-bit body: äöü\r\n".encode(),
        b"Subject: no trailing newline\r\n\r\nlast line without end",
        b"Subject: big\r\nContent-Type: application/octet-stream\r\n\r\n" + attachment,
    ]
    s.dovecot.deliver_many(s.user, raws)
    assert s.run("once") == 0
    got = [strip_trace(m.data) for m in s.received()]
    expected = [
        raws[0].replace(b"\n", b"\r\n"),
        raws[1],
        raws[2],
        raws[3],
        raws[4] + b"\r\n",  # POP3 ends every message with a line end (RFC 1939 §3)
        raws[5],
    ]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g == e, (len(g), len(e), g[:60])
    assert s.upstream() == []
