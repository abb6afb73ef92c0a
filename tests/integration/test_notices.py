"""Admin notices end to end: real Dovecot -> pop3-connector -> aiosmtpd, which also gets the
notices to the postmaster."""

from __future__ import annotations

from collections.abc import Callable
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default

import pytest
from aiosmtpd.smtp import Envelope

from tests.integration.conftest import Setup
from tests.servers import ReceivedMail

pytestmark = pytest.mark.integration

POSTMASTER = "postmaster@firma.test"
# write_config appends this after [[accounts]]: a new table, as TOML allows.
NOTICES = f'[notices]\npostmaster = "{POSTMASTER}"\nmin_interval = "1h"'


def message(i: int, sender: str, subject: str) -> bytes:
    return (
        f"Return-Path: <{sender}>\r\nFrom: {sender}\r\nTo: info@firma.example\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{i}@customer.example>\r\n\r\nBody {i}.\r\n"
    ).encode()


def deny_spammer(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
    if stage == "data" and envelope.mail_from == "spam@bad.example":
        return "554 5.1.0 Sender denied"
    return None


def notices(s: Setup) -> list[ReceivedMail]:
    return [m for m in s.received() if m.rcpt_tos == (POSTMASTER,)]


def text(mail: ReceivedMail) -> tuple[EmailMessage, str]:
    msg = message_from_bytes(mail.data, policy=default)
    assert isinstance(msg, EmailMessage)
    part = msg.get_body(("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return msg, content


def test_one_digest_per_cycle_then_rate_limited(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory(dead_letter=NOTICES)
    s.dovecot.deliver_many(
        s.user,
        [
            message(1, "spam@bad.example", "Cheap watches"),
            message(2, "alice@customer.example", "Invoice"),
            message(3, "spam@bad.example", "=?utf-8?q?Gr=C3=BC=C3=9Fe?="),
        ],
    )
    s.sink.handler.rule = deny_spammer
    assert s.run("once") == 0

    (digest,) = notices(s)
    assert digest.mail_from == "<>"  # the null sender: a bounce of it cannot loop
    msg, body = text(digest)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Subject"] == "[pop3-connector] info: 2 messages dead-lettered"
    assert body.count("Account: info") == 2
    assert body.count("From:    spam@bad.example") == 2
    assert "Subject: Cheap watches" in body
    assert "Subject: Grüße" in body
    assert body.count("Reason:  554 5.1.0 Sender denied") == 2
    assert body.count("Stage:   data") == 2
    assert s.password not in body
    with s.ledger() as db:
        ids = [r[0] for r in db.execute("SELECT dead_letter_id FROM messages").fetchall() if r[0]]
    assert len(ids) == 2
    for dl_id in ids:
        assert f"pop3-connector dead-letters show {dl_id}" in body
        assert f"pop3-connector dead-letters requeue {dl_id}" in body

    # A second cycle within min_interval refuses more mail: no notice, only the count kept.
    s.dovecot.deliver_many(s.user, [message(4, "spam@bad.example", "Again")])
    assert s.run("once") == 0
    assert len(s.dead_letters()) == 3
    assert len(notices(s)) == 1


def test_failing_account_and_recovery(setup_factory: Callable[..., Setup]) -> None:
    s = setup_factory(dead_letter=NOTICES, password="wrong-password")
    assert s.run("once") == 1
    assert s.run("once") == 1  # still failing: announced once
    (failing,) = notices(s)
    msg, body = text(failing)
    assert msg["Subject"] == "[pop3-connector] info: account failing"
    assert "wrong-password" not in body
    assert failing.mail_from == "<>"

    config = s.config.read_text().replace("wrong-password", s.password)
    s.config.write_text(config)
    assert s.run("once") == 0
    assert s.run("once") == 0
    subjects = [text(m)[0]["Subject"] for m in notices(s)]
    assert subjects == [
        "[pop3-connector] info: account failing",
        "[pop3-connector] info: account recovered",
    ]
