"""End to end against SMTP peers that answer like Exchange 2016/2019, Exchange Online and Postfix
(tests/smtp_peers.py): real Dovecot (POP3) -> ``once`` (``cli.main``) -> the peer.

Issue 19: a receive connector set up wrong (``530 5.7.1 Client was not authenticated``,
``550 5.7.60 ... send as this sender``) must not dead-letter the mailbox; issue 12: a sender
refused at RCPT (Postfix's ``smtpd_delay_reject = yes``) must not block the account.
docs/design.md §6.2 tells the two apart by testing (tests/component/test_smtp_evidence.py), with a
circuit breaker against our own misjudgement (connector.cycle.Breaker).  Each test looks at
what an administrator would: the exit status, the dead-letter store, the POP3 mailbox, status.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from connector.cycle import BREAKER_THRESHOLD
from tests.integration.conftest import strip_trace, write_config
from tests.servers import DovecotServer
from tests.smtp_peers import (
    PeerRule,
    SmtpPeer,
    exchange_2019,
    exchange_online,
    postfix,
    sender_access,
)

pytestmark = pytest.mark.integration

DELIVER_TO = "info@firma.test"
DENIED = "spam@bad.example"


def message(i: int, sender: str = "alice@customer.example") -> bytes:
    return (
        f"Return-Path: <{sender}>\r\nFrom: {sender}\r\nTo: info@firma.example\r\n"
        f"Subject: message {i}\r\nMessage-ID: <{i}@customer.example>\r\n\r\n"
        f"Body of message {i}.\r\n"
    ).encode()


@dataclass
class World:
    """One Dovecot mailbox, one SMTP peer, a state dir and the config tying them."""

    dovecot: DovecotServer
    user: str
    peer: SmtpPeer
    state_dir: Path
    config: Path

    def run(self, *args: str) -> int:
        from connector.cli import main

        return main(["--config", str(self.config), *args])

    def upstream(self) -> list[bytes]:
        return [p.read_bytes() for p in self.dovecot.maildir_files(self.user)]

    def dead_letters(self) -> list[tuple[str, bytes]]:
        """(stage, original message) of each dead letter, in the order of their bytes."""
        path = self.state_dir / "dead-letters"
        files = [p for sub in ("new", "cur") for p in (path / sub).glob("*")]
        found = []
        for file in files:
            raw = file.read_bytes()
            stage = raw.split(b"X-POP3-Connector-Stage: ", 1)[1].split(b"\r\n", 1)[0]
            original = raw.split(b"X-POP3-Connector-Failed-At: ", 1)[1].split(b"\r\n", 1)[1]
            found.append((stage.decode(), original))
        return sorted(found, key=lambda item: item[1])

    def delivered(self) -> list[bytes]:
        return [strip_trace(m.data) for m in self.peer.received]

    def status(self, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
        capsys.readouterr()
        assert self.run("status", "--json") == 0
        (account,) = json.loads(capsys.readouterr().out)["accounts"]
        assert isinstance(account, dict)
        return account

    def breaker(self) -> str | None:
        import sqlite3

        with sqlite3.connect(self.state_dir / "ledger.sqlite3") as db:
            row = db.execute("SELECT breaker FROM accounts WHERE name = 'info'").fetchone()
        return None if row is None else row[0]


@pytest.fixture
def world(dovecot: DovecotServer, tmp_path: Path) -> Iterator[Callable[..., World]]:
    peers: list[SmtpPeer] = []

    def make(peer: SmtpPeer, mail: list[bytes], **config: str) -> World:
        peers.append(peer.start())
        user, password = dovecot.add_user()
        state_dir = tmp_path / f"state-{user}"
        path = write_config(
            tmp_path / f"config-{user}.toml",
            dovecot=dovecot,
            user=user,
            password=password,
            smtp_port=peer.port,
            state_dir=state_dir,
            **config,
        )
        dovecot.deliver_many(user, mail)
        return World(dovecot, user, peer, state_dir, path)

    yield make
    for p in peers:
        p.stop()


def refuse_at(stage: str, reply: str, *, only: str | None = None) -> PeerRule:
    """Refuse every command of ``stage`` (the probe's too), or only those of sender ``only``."""

    def rule(at: str, sender: str, recipient: str | None, data: bytes | None) -> str | None:
        if at == stage and (only is None or sender == only):
            return reply
        return None

    return rule


# --------------------------------------------------------------------------------------------
# Issue 19: Exchange's setup refusals at MAIL dead-letter nothing
# --------------------------------------------------------------------------------------------

SETUP_REFUSALS = [
    "530 5.7.1 Client was not authenticated",
    "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
]


@pytest.mark.parametrize("model", [exchange_2019, exchange_online], ids=["2019", "online"])
@pytest.mark.parametrize("reply", SETUP_REFUSALS, ids=["530", "5.7.60"])
def test_exchange_setup_refusal_at_mail_dead_letters_nothing(
    world: Callable[..., World],
    capsys: pytest.CaptureFixture[str],
    model: Callable[..., SmtpPeer],
    reply: str,
) -> None:
    mail = [message(i, f"sender{i}@partner{i}.example") for i in range(6)]
    w = world(model(refuse_at("mail", reply)), mail)
    assert w.run("once") == 1
    assert w.dead_letters() == []
    assert w.upstream() == mail  # nothing deleted
    assert w.peer.received == []
    status = w.status(capsys)
    assert status["result"] == "failed"
    assert reply.split(" ", 2)[2] in str(status["last_error"])
    # Stopped at the first message: one MAIL for it, one probe at most (none for 530).
    assert len(w.peer.decisions("mail")) == (1 if reply.startswith("530") else 2)


def test_one_sender_denied_at_mail_among_accepted_is_dead_lettered(
    world: Callable[..., World],
) -> None:
    # 554 5.1.0 at MAIL for one sender (Exchange's sender filter): the message, not our setup.
    # First in the mailbox (the probe decides) and later (the session decides).
    mail = [message(0, DENIED), message(1), message(2, DENIED), message(3)]
    w = world(exchange_2019(refuse_at("mail", "554 5.1.0 Sender denied", only=DENIED)), mail)
    assert w.run("once") == 0
    assert w.dead_letters() == [("mail", mail[0]), ("mail", mail[2])]
    assert w.delivered() == [mail[1], mail[3]]
    assert w.upstream() == []
    assert w.run("once") == 0  # nothing is fetched again
    assert len(w.peer.decisions("mail")) == 5  # 4 messages and one probe, all in the first


# --------------------------------------------------------------------------------------------
# Issue 12: a sender refused at RCPT (Postfix, smtpd_delay_reject = yes)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-at-a-time"])
def test_postfix_delay_reject_dead_letters_denied_senders(
    world: Callable[..., World], pipelining: bool
) -> None:
    mail = [message(0, DENIED), message(1), message(2, DENIED), message(3), message(4, DENIED)]
    peer = postfix(sender_access([DENIED], mailboxes=[DELIVER_TO]), pipelining=pipelining)
    w = world(peer, mail)
    assert w.run("once") == 0
    assert w.delivered() == [mail[1], mail[3]]
    assert w.dead_letters() == [("rcpt", mail[0]), ("rcpt", mail[2]), ("rcpt", mail[4])]
    assert w.upstream() == []
    # The first denied one was probed; later ones were decided by the session's record.
    assert [d.sender for d in w.peer.decisions("mail")].count("") == 1


def test_postfix_wrong_deliver_to_stops_with_nothing_dead_lettered(
    world: Callable[..., World], capsys: pytest.CaptureFixture[str]
) -> None:
    mail = [message(0, DENIED), message(1), message(2)]
    peer = postfix(sender_access([DENIED], mailboxes=["someone.else@firma.test"]))
    w = world(peer, mail)
    assert w.run("once") == 1
    assert w.dead_letters() == []
    assert w.upstream() == mail
    assert w.peer.received == []
    assert "User unknown" in str(w.status(capsys)["last_error"])


# --------------------------------------------------------------------------------------------
# The circuit breaker
# --------------------------------------------------------------------------------------------


def test_breaker_stops_a_storm_of_identical_refusals(
    world: Callable[..., World], capsys: pytest.CaptureFixture[str]
) -> None:
    # An Exchange connector without Accept-Any-Sender that still takes the null sender: every
    # real sender refused 5.7.60 at MAIL, and every probe MAIL FROM:<> accepted.  The probe's
    # word alone dead-letters the first few; then the breaker holds the rest upstream.
    reply = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
    mail = [message(i, f"sender{i}@partner.example") for i in range(12)]

    def send_as(stage: str, sender: str, recipient: str | None, data: bytes | None) -> str | None:
        return reply if stage == "mail" and sender else None

    w = world(exchange_2019(send_as), mail)
    assert w.run("once") == 1
    kept = BREAKER_THRESHOLD - 1
    assert [stage for stage, _ in w.dead_letters()] == ["mail"] * kept
    assert w.upstream() == mail[kept:]
    error = str(w.status(capsys)["last_error"])
    assert error.startswith("every message refused alike: check the SMTP target"), error
    assert "5.7.60" in error
    assert w.breaker() is not None

    # The next cycle dead-letters no more: the trip is remembered until mail gets through.
    assert w.run("once") == 1
    assert len(w.dead_letters()) == kept
    assert w.upstream() == mail[kept:]

    # The connector is fixed: everything held is delivered, and the breaker forgets.
    w.peer.rule = None
    assert w.run("once") == 0
    assert w.delivered() == mail[kept:]
    assert w.upstream() == []
    assert w.breaker() is None


def test_breaker_says_so_in_the_log_status_and_the_failing_notice(
    world: Callable[..., World], capsys: pytest.CaptureFixture[str]
) -> None:
    reply = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
    mail = [message(i, f"sender{i}@partner.example") for i in range(BREAKER_THRESHOLD + 1)]
    w = world(
        exchange_2019(
            lambda stage, sender, rcpt, data: reply if stage == "mail" and sender else None
        ),
        mail,
    )
    w.config.write_text(w.config.read_text() + '\n[notices]\npostmaster = "pm@firma.test"\n')
    phrase = "every message refused alike: check the SMTP target"
    capsys.readouterr()
    assert w.run("once") == 1
    out = capsys.readouterr()
    assert phrase in out.err  # the log
    assert phrase in out.out  # once's summary line
    assert str(w.status(capsys)["last_error"]).startswith(phrase)  # status and /status
    notices = [m.data for m in w.peer.received if m.rcpt_tos == ("pm@firma.test",)]
    failing = [n for n in notices if b"account failing" in n]
    assert len(failing) == 1
    assert phrase.encode() in failing[0]


def test_a_run_of_refused_senders_before_good_mail_is_all_decided(
    world: Callable[..., World],
) -> None:
    # A real burst of denied senders (more than the breaker's threshold) ahead of good mail:
    # the breaker holds the tail of the burst, the good mail gets through, and the held
    # messages are decided again in the same session, by its own evidence.
    burst = [message(i, f"spam{i}@bad.example") for i in range(BREAKER_THRESHOLD + 3)]
    good = [message(100), message(101)]

    def deny_spam(stage: str, sender: str, recipient: str | None, data: bytes | None) -> str | None:
        if stage == "mail" and sender.endswith("@bad.example"):
            return "554 5.1.0 Sender denied"
        return None

    w = world(exchange_2019(deny_spam), [*burst, *good])
    assert w.run("once") == 0
    assert w.dead_letters() == [("mail", raw) for raw in sorted(burst)]
    assert w.delivered() == good
    assert w.upstream() == []
    assert w.breaker() is None


def test_refusals_after_data_are_dead_lettered_however_many(
    world: Callable[..., World],
) -> None:
    # The case this product exists for: a mailbox of spam, each refused 554 5.1.0 after DATA.
    mail = [message(i, f"spam{i}@bad.example") for i in range(3 * BREAKER_THRESHOLD)]
    w = world(exchange_2019(refuse_at("data", "554 5.1.0 Sender denied")), mail)
    assert w.run("once") == 0
    assert w.dead_letters() == [("data", raw) for raw in sorted(mail)]
    assert w.upstream() == []
    assert w.breaker() is None


def test_a_bounce_refused_first_waits_for_mail_that_shows_why(
    world: Callable[..., World], capsys: pytest.CaptureFixture[str]
) -> None:
    # A bounce (null sender) refused at RCPT before anything else was accepted: no other
    # sender to probe with yet.  It is held, the good mail behind it goes through, and then
    # the bounce is decided with that evidence (a probe from the last sender accepted).
    bounce = message(0, "")
    assert b"Return-Path: <>" in bounce
    mail = [bounce, message(1)]
    w = world(postfix(sender_access([""], mailboxes=[DELIVER_TO])), mail)
    assert w.run("once") == 0
    assert w.delivered() == [mail[1]]
    assert w.dead_letters() == [("rcpt", bounce)]
    assert w.upstream() == []


def test_a_bounce_refused_alone_stays_upstream_and_the_account_says_why(
    world: Callable[..., World], capsys: pytest.CaptureFixture[str]
) -> None:
    bounce = message(0, "")
    w = world(postfix(sender_access([""], mailboxes=[DELIVER_TO])), [bounce])
    assert w.run("once") == 1
    assert w.dead_letters() == []
    assert w.upstream() == [bounce]
    assert "Sender address rejected" in str(w.status(capsys)["last_error"])


# --------------------------------------------------------------------------------------------
# Shared mailboxes: configured recipients follow the rule, the message's keep theirs
# --------------------------------------------------------------------------------------------

SHARED = """
[accounts.shared]
domains = ["firma.example"]
rewrite_domain = "firma.test"

[[accounts.shared.rules]]
match = "sales@firma.example"
deliver_to = ["chef@firma.test"]
"""
FALLBACK = "undeliverable@firma.test"


def shared_world(world: Callable[..., World], peer: SmtpPeer, mail: list[bytes]) -> World:
    w = world(peer, mail, account_extra=SHARED)
    text = w.config.read_text()
    w.config.write_text(
        text.replace(f'deliver_to = ["{DELIVER_TO}"]', f'deliver_to = ["{FALLBACK}"]')
    )
    return w


def shared_message(i: int, sender: str, to: str) -> bytes:
    return message(i, sender).replace(b"To: info@firma.example", f"To: {to}".encode())


def test_shared_mailbox_denied_sender_at_rcpt_to_the_fallback_and_a_rule_target(
    world: Callable[..., World],
) -> None:
    mail = [
        shared_message(0, DENIED, "stranger@elsewhere.example"),  # to the fallback
        shared_message(1, "alice@customer.example", "bob@firma.example"),
        shared_message(2, DENIED, "sales@firma.example"),  # to a rule's target
        shared_message(3, "alice@customer.example", "nobody@firma.example"),  # unknown: theirs
        shared_message(4, "alice@customer.example", "sales@firma.example"),
    ]
    mailboxes = [FALLBACK, "bob@firma.test", "chef@firma.test"]
    w = shared_world(world, postfix(sender_access([DENIED], mailboxes=mailboxes)), mail)
    assert w.run("once") == 0
    assert w.delivered() == [mail[1], mail[4]]
    assert w.dead_letters() == sorted([("rcpt", mail[0]), ("rcpt", mail[2]), ("rcpt", mail[3])])
    assert w.upstream() == []


def test_shared_mailbox_fallback_refused_for_every_sender_stops(
    world: Callable[..., World],
) -> None:
    mail = [
        shared_message(0, "alice@customer.example", "stranger@elsewhere.example"),
        shared_message(1, "alice@customer.example", "bob@firma.example"),
    ]
    peer = postfix(sender_access([], mailboxes=["bob@firma.test"]))
    w = shared_world(world, peer, mail)
    assert w.run("once") == 1
    assert w.dead_letters() == []
    assert w.upstream() == mail


# --------------------------------------------------------------------------------------------
# Exchange as it answers: each real refusal through the fetcher
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    model: Callable[..., SmtpPeer]
    stage: str  # where the peer refuses
    reply: str
    alike: bool  # refused for every sender (the probe's too), else only for the one sender
    outcome: str  # "setup" (exit 1, nothing decided), "deferred", or a dead-letter stage


EXCHANGE_CASES = [
    Case(exchange_2019, "rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient "
         "info@firma.test not found by SMTP address lookup", True, "setup"),
    Case(exchange_2019, "mail", "554 5.1.0 Sender denied", False, "mail"),
    Case(exchange_2019, "data", "554 5.1.0 Sender denied", False, "data"),
    Case(exchange_2019, "mail", "552 5.3.4 Message size exceeds fixed maximum message size",
         False, "size"),
    Case(exchange_2019, "data", "552 5.3.4 Message size exceeds fixed maximum message size",
         False, "data"),
    Case(exchange_2019, "rcpt", "452 4.3.1 Insufficient system resources", False, "deferred"),
    Case(exchange_2019, "data", "421 4.3.2 Service not available, closing transmission channel",
         False, "deferred"),
    Case(exchange_2019, "mail", "451 4.7.0 Temporary server error. Please try again later. "
         "PRX4", False, "deferred"),
    Case(exchange_online, "rcpt", "550 5.7.64 TenantAttribution; Relay Access Denied "
         "[AM0PR01MB0001.eurprd01.prod.outlook.com]", True, "setup"),
    Case(exchange_online, "mail", "451 4.7.500 Server busy. Please try again later from "
         "[192.0.2.1]. (S77719)", False, "deferred"),
    Case(exchange_2019, "mail", "530 5.7.1 Client was not authenticated", True, "setup"),
    Case(exchange_2019, "mail", "550 5.7.60 SMTP; Client does not have permissions to send as "
         "this sender", True, "setup"),
]  # fmt: skip


@pytest.mark.parametrize("case", EXCHANGE_CASES, ids=lambda c: f"{c.stage}-{c.reply[:9]}")
def test_exchange_refusals_through_the_fetcher(
    world: Callable[..., World], capsys: pytest.CaptureFixture[str], case: Case
) -> None:
    target = "target@partner.example"
    mail = [message(0), message(1, target), message(2)]
    w = world(
        case.model(refuse_at(case.stage, case.reply, only=None if case.alike else target)), mail
    )
    code = w.run("once")
    if case.outcome == "setup":
        assert code == 1
        assert w.dead_letters() == []
        assert w.upstream() == mail
        assert case.reply.split(" ", 2)[2][:30] in str(w.status(capsys)["last_error"])
        return
    assert code == 0
    assert w.delivered() == [mail[0], mail[2]]
    if case.outcome == "deferred":
        assert w.dead_letters() == []
        assert w.upstream() == [mail[1]]
        assert w.status(capsys)["deferred"] == 1
    else:
        assert w.dead_letters() == [(case.outcome, mail[1])]
        assert w.upstream() == []
