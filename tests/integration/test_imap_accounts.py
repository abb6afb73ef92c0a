"""End to end: real Dovecot (IMAP) -> pop3-connector -> aiosmtpd playing Exchange.

An IMAP account (``protocol = "imap"``) keeps the promises of a POP3 one (docs/design.md §5,
§15): the same cases as tests/integration/test_cycle.py, through the command's own entry point,
plus what only IMAP has (a UIDVALIDITY that changes, a folder other than INBOX).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from collections.abc import Callable

import pytest
from aiosmtpd.smtp import Envelope

from tests.integration.conftest import Setup, strip_trace
from tests.integration.test_cycle import deny_spammer, message
from tests.integration.test_notices import NOTICES, notices, text
from tests.integration.test_operations import (
    account_status,
    cycles_ok,
    endpoint_url,
    scrape,
    value,
)
from tests.integration.test_service import running, wait_until

pytestmark = pytest.mark.integration


def imap_setup(factory: Callable[..., Setup], **kwargs: object) -> Setup:
    return factory(protocol="imap", **kwargs)


def uidls(s: Setup) -> list[str]:
    with s.ledger() as db:
        return [u for (u,) in db.execute("SELECT uidl FROM messages ORDER BY uidl")]


def doveadm(s: Setup, command: str, *args: str) -> str:
    """``doveadm mailbox <command> -u <user> args...`` on the test Dovecot; its output."""
    argv = ["doveadm", "-c", str(s.dovecot.conf), "mailbox", command, "-u", s.user, *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def uidvalidity(s: Setup) -> int:
    return int(doveadm(s, "status", "uidvalidity", "INBOX").split("=")[1])


def set_uidvalidity(s: Setup, value: int) -> None:
    doveadm(s, "update", "--uid-validity", str(value), "INBOX")


@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
def test_thirty_messages_five_refused_permanently(
    setup_factory: Callable[..., Setup], tls: str
) -> None:
    s = imap_setup(setup_factory, tls=tls)
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
    assert received[0].data.startswith(b"Received: from localhost by connector.test with IMAP")
    validity = uidvalidity(s)
    assert f" id imap.{validity}.".encode() in received[0].data

    dead = s.dead_letters()
    assert len(dead) == 5
    for d in dead:
        head, _, original = d.partition(b"X-POP3-Connector-Failed-At: ")
        original = original.split(b"\r\n", 1)[1]
        assert original in bad
        assert b"X-POP3-Connector-Stage: data\r\n" in head
        assert b"X-POP3-Connector-Response: 554 5.1.0 Sender denied\r\n" in head
        assert f"X-POP3-Connector-UIDL: imap:{validity}:".encode() in head
    assert s.upstream() == []  # flagged \Deleted and expunged

    transactions = s.sink.handler.transactions
    assert s.run("once") == 0
    assert s.sink.handler.transactions == transactions  # nothing handed to SMTP again
    assert len(s.dead_letters()) == 5


def test_temporary_refusal_is_retried_and_expires(setup_factory: Callable[..., Setup]) -> None:
    s = imap_setup(setup_factory, account_extra='max_deferral = "5d"')
    s.dovecot.deliver_many(s.user, [message(1), message(2)])

    def greylist(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
        if stage == "data" and data is not None and b"message 1\r\n" in data:
            return "451 4.7.1 Greylisted, try again later"
        return None

    s.sink.handler.rule = greylist
    assert s.run("once") == 0  # a deferral is a completed cycle
    assert [strip_trace(m.data) for m in s.received()] == [message(2)]
    assert len(s.upstream()) == 1
    with s.ledger() as db:
        assert db.execute(
            "SELECT state, attempts FROM messages WHERE state = 'deferred'"
        ).fetchall() == [("deferred", 1)]
    s.age_deferrals(4 * 86400)
    assert s.run("once") == 0
    assert len(s.upstream()) == 1  # four days: still waiting
    assert s.dead_letters() == []
    s.age_deferrals(2 * 86400)
    assert s.run("once") == 0
    assert s.upstream() == []
    (dead,) = s.dead_letters()
    assert b"X-POP3-Connector-Stage: expired\r\n" in dead
    assert b"X-POP3-Connector-Response: 451 4.7.1 Greylisted, try again later\r\n" in dead
    assert dead.endswith(message(1))
    assert [strip_trace(m.data) for m in s.received()] == [message(2)]


def test_leave_on_server_keeps_mail_and_never_delivers_it_twice(
    setup_factory: Callable[..., Setup],
) -> None:
    s = imap_setup(setup_factory, account_extra="leave_on_server = true")
    raws = [message(i) for i in range(4)]
    s.dovecot.deliver_many(s.user, raws)
    assert s.run("once") == 0
    assert [strip_trace(m.data) for m in s.received()] == raws
    assert len(s.upstream()) == 4  # kept
    assert len(uidls(s)) == 4  # and remembered by UID

    s.dovecot.deliver(s.user, message(9))
    assert s.run("once") == 0
    assert [strip_trace(m.data) for m in s.received()] == [*raws, message(9)]
    assert len(s.upstream()) == 5

    with s.ledger() as db:  # as if delivered long ago: delete_after is due for all of them
        db.execute("UPDATE messages SET last_attempt = last_attempt - 86400 * 10")
    s.config.write_text(
        s.config.read_text().replace(
            "leave_on_server = true", 'leave_on_server = true\ndelete_after = "7d"'
        )
    )
    assert s.run("once") == 0
    assert s.upstream() == []
    assert len(s.received()) == 5


def test_changed_uidvalidity_delivers_nothing_twice_and_loses_nothing(
    setup_factory: Callable[..., Setup],
) -> None:
    """A server that rebuilds the folder's index gives every message a new UID under a new
    UIDVALIDITY (RFC 3501 §2.3.1.1).  The ledger's rows follow the messages by identity: the
    kept ones stay kept, the deferred one keeps its clock, a new one is delivered."""
    s = imap_setup(setup_factory, account_extra="leave_on_server = true")
    raws = [message(i) for i in range(3)]
    deferred = message(7, sender="later@customer.example")
    s.dovecot.deliver_many(s.user, [*raws, deferred])
    s.sink.handler.rule = lambda stage, env, data: (
        "451 4.3.0 Try later"
        if stage == "data" and env.mail_from == "later@customer.example"
        else None
    )
    assert s.run("once") == 0
    assert [strip_trace(m.data) for m in s.received()] == raws
    before = uidvalidity(s)
    with s.ledger() as db:
        first_seen = db.execute(
            "SELECT first_seen FROM messages WHERE state = 'deferred'"
        ).fetchone()[0]

    set_uidvalidity(s, before + 1000)
    s.dovecot.deliver(s.user, message(9))
    assert s.run("once") == 0

    assert [strip_trace(m.data) for m in s.received()] == [*raws, message(9)]
    keys = uidls(s)
    assert len(keys) == 5
    assert all(k.startswith(f"imap:{before + 1000}:") for k in keys), keys
    with s.ledger() as db:
        row = db.execute(
            "SELECT first_seen, attempts FROM messages WHERE state = 'deferred'"
        ).fetchone()
    assert row == (first_seen, 2)  # the same deferral, tried once more, its clock kept
    assert len(s.upstream()) == 5


def test_changed_uidvalidity_then_expunged_only_once_delivered(
    setup_factory: Callable[..., Setup],
) -> None:
    """Without leave_on_server: messages finished before the change (a run killed before its
    expunge left them) are expunged as known ones after it, not delivered again."""
    s = imap_setup(setup_factory)
    raws = [message(i) for i in range(3)]
    s.dovecot.deliver_many(s.user, raws)
    s.config.write_text(s.config.read_text() + "leave_on_server = true\n")
    assert s.run("once") == 0  # delivered, left upstream: as after a kill before the expunge
    s.config.write_text(s.config.read_text().replace("leave_on_server = true\n", ""))
    set_uidvalidity(s, uidvalidity(s) + 7)
    assert s.run("once") == 0
    assert [strip_trace(m.data) for m in s.received()] == raws
    assert s.upstream() == []


def test_another_folder(setup_factory: Callable[..., Setup]) -> None:
    s = imap_setup(setup_factory, account_extra='folder = "Eingang/Firma Größe"')
    s.dovecot.deliver(s.user, message(0))  # INBOX: not this account's folder
    doveadm(s, "create", "Eingang.Firma Größe")
    s.dovecot.deliver(s.user, message(1), folder="Eingang.Firma Größe")
    assert s.run("once") == 0
    assert [strip_trace(m.data) for m in s.received()] == [message(1)]
    assert len(s.upstream()) == 1  # INBOX untouched
    assert s.dovecot.maildir_files(s.user, "Eingang.Firma Gr&APY-&AN8-e") == []


def test_wrong_password_parks_the_account(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = imap_setup(setup_factory, password="wrong-one")
    s.dovecot.deliver_many(s.user, [message(1)])
    assert s.run("once") == 1
    out = capsys.readouterr()
    assert "AUTHENTICATIONFAILED" in out.out + out.err
    assert "wrong-one" not in out.out + out.err
    assert len(s.upstream()) == 1
    with sqlite3.connect(s.state_dir / "ledger.sqlite3") as db:
        assert db.execute("SELECT failing FROM accounts").fetchone() == (1,)


def test_check_connect_logs_in_and_examines_the_folder(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = imap_setup(setup_factory, tls="starttls")
    s.dovecot.deliver_many(s.user, [message(1), message(2)])
    assert s.run("check", "--connect") == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("imap info"))
    assert " ok " in line
    assert "2 message(s)" in line
    assert "IDLE offered (push)" in line
    assert len(s.upstream()) == 2  # nothing fetched, nothing flagged

    s.config.write_text(s.config.read_text() + 'folder = "Nowhere"\n')
    assert s.run("check", "--connect") == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("imap info"))
    assert "FAILED" in line
    assert "NONEXISTENT" in line


def test_the_operators_view_of_an_imap_account(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` with an IMAP account: metrics (idle_connected among them), /status, `status`, the
    dead-letter notice, and a message pushed while the account waits (the poll is an hour off)."""
    s = imap_setup(setup_factory, service_extra='poll_interval = "1h"', dead_letter=NOTICES)
    s.dovecot.deliver_many(s.user, [message(0), message(1, sender="spam@bad.example")])
    s.sink.handler.rule = deny_spammer
    with running(s.config) as (proc, log):
        base = endpoint_url(log)
        # The first cycle, then the one the watcher starts when it has connected (mail may
        # have come between the two; README, "A (re)connected IDLE watcher polls once").
        wait_until(lambda: cycles_ok(base) == 2, "the first cycles")
        wait_until(
            lambda: value(scrape(base), "idle_connected", account="info") == 1, "IDLE entered"
        )
        after = scrape(base)
        assert value(after, "messages_total", account="info", outcome="delivered") == 1
        assert value(after, "messages_total", account="info", outcome="dead_lettered") == 1
        assert value(after, "smtp_responses_total", account="info", code="554") == 1
        assert value(after, "mailbox_messages", account="info") == 0  # at the last SELECT
        assert value(after, "dead_letters", account="info") == 1
        assert value(after, "account_failing", account="info") == 0
        info = account_status(base, "info")
        assert info is not None
        assert (info["result"], info["failing"], info["last_error"]) == ("ok", False, None)
        assert (info["mailbox_messages"], info["dead_letters"]) == (0, 1)

        capsys.readouterr()
        assert s.run("status") == 0
        row = capsys.readouterr().out.splitlines()[1].split()
        assert row[0] == "info"
        assert row[3:7] == ["ok", "0", "0", "1"]  # result, upstream, deferred, dead letters
        assert s.run("status", "--json") == 0
        (from_cli,) = json.loads(capsys.readouterr().out)["accounts"]
        assert (from_cli["result"], from_cli["dead_letters"]) == ("ok", 1)

        s.dovecot.deliver(s.user, message(2))  # pushed: the next poll is an hour away
        wait_until(lambda: cycles_ok(base) == 3, "the cycle the push started")
        pushed = scrape(base)
        assert value(pushed, "messages_total", account="info", outcome="delivered") == 2
        assert value(pushed, "idle_connected", account="info") == 1  # waiting again

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.text()
    assert [strip_trace(m.data) for m in s.received() if m.rcpt_tos == ("info@firma.test",)] == [
        message(0),
        message(2),
    ]
    (digest,) = notices(s)
    msg, body = text(digest)
    assert msg["Subject"] == "[pop3-connector] info: 1 message dead-lettered"
    assert "They were deleted from the provider's mailbox" in body  # not "POP3 mailbox"
    assert f"X-POP3-Connector-UIDL: imap:{uidvalidity(s)}:".encode() in s.dead_letters()[0]


def test_a_failing_imap_account_is_announced_and_its_mail_waits(
    setup_factory: Callable[..., Setup],
) -> None:
    s = imap_setup(setup_factory, dead_letter=NOTICES, password="wrong-password")
    s.dovecot.deliver(s.user, message(1))
    assert s.run("once") == 1
    (failing,) = notices(s)
    msg, body = text(failing)
    assert msg["Subject"] == "[pop3-connector] info: account failing"
    assert "AUTHENTICATIONFAILED" in body
    assert "Its mail waits in the provider's mailbox" in body
    assert "wrong-password" not in body
    assert len(s.upstream()) == 1
