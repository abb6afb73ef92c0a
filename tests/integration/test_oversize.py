"""``max_message_size`` and ``oversize`` end to end (issue 6): real Dovecot -> ``once`` ->
aiosmtpd.  A message over the limit is dead-lettered (stage ``size``) without an SMTP attempt,
or, with ``oversize = "leave"``, left upstream and named in exactly one notice."""

from __future__ import annotations

import json
from collections.abc import Callable
from email import message_from_bytes
from email.policy import default

import pytest

from connector.deadletter import parse_dead_letter_headers
from tests.integration.conftest import Setup, strip_trace
from tests.integration.test_shared_mailbox import FALLBACK, SHARED
from tests.servers import ReceivedMail

pytestmark = pytest.mark.integration

POSTMASTER = "postmaster@firma.test"
LIMIT = 'max_message_size = "10KB"'


def message(i: int, body_octets: int) -> bytes:
    """A message of about ``body_octets`` octets of body (76-character lines)."""
    line = b"x" * 74 + b"\r\n"
    body = line * (body_octets // len(line))
    head = (
        f"Return-Path: <alice@customer.example>\r\nFrom: alice@customer.example\r\n"
        f"To: info@firma.example\r\nSubject: Message {i}\r\n"
        f"Message-ID: <{i}@customer.example>\r\n\r\n"
    ).encode()
    return head + body


BIG = message(1, 50 * 1024)
SMALL = message(2, 1024)


def mail_to_info(s: Setup) -> list[ReceivedMail]:
    return [m for m in s.received() if m.rcpt_tos == ("info@firma.test",)]


def test_oversized_is_dead_lettered_without_smtp(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup_factory(account_extra=LIMIT)
    s.dovecot.deliver_many(s.user, [BIG, SMALL])
    assert s.run("once") == 0

    # Only the small one reached the sink, and the big one was never offered (no MAIL FROM).
    (got,) = s.received()
    assert strip_trace(got.data) == SMALL
    assert s.sink.handler.transactions == 1
    assert s.upstream() == []

    capsys.readouterr()
    assert s.run("dead-letters", "list", "--json") == 0
    (record,) = json.loads(capsys.readouterr().out)["dead_letters"]
    assert record["stage"] == "size"
    assert record["size"] == len(BIG)
    assert str(record["response"]).startswith("552 5.3.4 ")
    (stored,) = s.dead_letters()
    parsed = parse_dead_letter_headers(stored)
    assert parsed is not None
    assert stored[parsed[1] :] == BIG  # the original, byte for byte, under our lines

    # Finished: a second cycle fetches and sends nothing.
    assert s.run("once") == 0
    assert s.sink.handler.transactions == 1
    assert len(s.dead_letters()) == 1


def test_oversized_left_upstream_with_one_notice(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory(
        account_extra=f'{LIMIT}\noversize = "leave"',
        dead_letter=f'[notices]\npostmaster = "{POSTMASTER}"\nmin_interval = "1h"',
    )
    s.dovecot.deliver_many(s.user, [BIG, SMALL])
    assert s.run("once") == 0
    assert s.run("once") == 0

    (got,) = mail_to_info(s)
    assert strip_trace(got.data) == SMALL
    assert s.upstream() == [BIG]  # untouched across both cycles
    assert s.dead_letters() == []
    notices = [m for m in s.received() if m.rcpt_tos == (POSTMASTER,)]
    assert len(notices) == 1, [m.data[:300] for m in notices]
    (notice,) = notices
    msg = message_from_bytes(notice.data, policy=default)
    assert "too large" in str(msg["Subject"])
    assert str(len(BIG)) in notice.data.decode()  # names the message by its size
    assert len(s.received()) == 2


def test_shared_mailbox_oversize_dead_letter_names_its_recipients(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    """A shared mailbox's dead letter names whom the message was for, so that ``requeue``
    sends it to them (fetcher._dead_letter); one dead-lettered for its size is no different."""
    s = setup_factory(account_extra=f"{LIMIT}\n{SHARED}")
    s.config.write_text(s.config.read_text().replace('["info@firma.test"]', f'["{FALLBACK}"]'))
    big = BIG.replace(b"To: info@firma.example", b"To: bob@firma.example")
    s.dovecot.deliver_many(s.user, [big])
    assert s.run("once") == 0
    assert s.received() == []
    capsys.readouterr()
    assert s.run("dead-letters", "list", "--json") == 0
    (record,) = json.loads(capsys.readouterr().out)["dead_letters"]
    assert record["stage"] == "size"

    assert s.run("dead-letters", "requeue", str(record["id"])) == 0
    (got,) = s.received()
    assert got.data == big
    assert got.rcpt_tos == ("bob@firma.local",)  # fails today: goes to the fallback
