"""``check --connect`` tests what a delivery needs (issue 19 item 3, issue 12 item 4).

Against real Dovecot and SMTP peers that answer like Exchange and Postfix (tests/smtp_peers.py):
after EHLO/TLS/AUTH, ``MAIL FROM`` with a foreign sender (as real mail has) and ``RCPT TO`` each
recipient fixed in the config, then RSET; each setup refusal is a failure with a hint at the
Exchange setting behind it, and the disabled accounts' POP3 logins are tested too, marked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector.check import CHECK_SENDER
from tests.integration.conftest import write_config
from tests.servers import DovecotServer
from tests.smtp_peers import SmtpPeer, exchange_2019, exchange_online, postfix, sender_access

pytestmark = pytest.mark.integration

# A disabled account (its cut-over is still ahead) and a shared mailbox with a rule target.
MORE_ACCOUNTS = """
[[accounts]]
name = "old"
host = "localhost"
port = {port}
tls = "none"
username = "{user}"
password = "{password}"
deliver_to = ["old@firma.test"]
enabled = false

[[accounts]]
name = "catchall"
host = "localhost"
port = {port}
tls = "none"
username = "{user}"
password = "{password}"
deliver_to = ["undeliverable@firma.test"]

[accounts.shared]
domains = ["firma.example"]

[[accounts.shared.rules]]
match = "info@firma.example"
deliver_to = ["chef@firma.test", "INFO@firma.test"]
"""
FIXED = ["info@firma.test", "old@firma.test", "undeliverable@firma.test", "chef@firma.test"]


Check = Callable[..., tuple[int, dict[str, str]]]


@pytest.fixture
def check(
    dovecot: DovecotServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[Check]:
    """Run ``check --connect`` against ``peer``; the exit status and each row's line by target."""
    peers: list[SmtpPeer] = []

    def run(
        peer: SmtpPeer, *, old_password: str | None = None, smtp_extra: str = ""
    ) -> tuple[int, dict[str, str]]:
        peers.append(peer.start())
        user, password = dovecot.add_user()
        path = write_config(
            tmp_path / f"config-{user}.toml",
            dovecot=dovecot,
            user=user,
            password=password,
            smtp_port=peer.port,
            state_dir=tmp_path / f"state-{user}",
            smtp_extra=smtp_extra,
        )
        more = MORE_ACCOUNTS.format(
            port=dovecot.ports["pop3"], user=user, password=old_password or password
        )
        path.write_text(path.read_text() + more)
        from connector.cli import main

        capsys.readouterr()
        code = main(["--config", str(path), "check", "--connect"])
        out = capsys.readouterr().out
        table = out[out.index("TARGET") :].splitlines()[1:]
        rows = {line.split("  ", 1)[0]: line for line in table}
        return code, rows

    yield run
    for p in peers:
        p.stop()


def test_all_good_tests_every_fixed_recipient_and_the_disabled_login(check: Check) -> None:
    code, rows = check(exchange_2019())
    assert code == 0
    assert " ok " in rows["pop3 info"]
    assert " ok " in rows["pop3 old (disabled)"]
    assert " ok " in rows["smtp"]
    assert " ok " in rows[f"smtp MAIL FROM:<{CHECK_SENDER}>"]
    for recipient in FIXED:  # INFO@firma.test is info@firma.test: tested once
        assert " ok " in rows[f"smtp RCPT TO:<{recipient}>"], recipient
    assert len([t for t in rows if t.startswith("smtp RCPT")]) == len(FIXED)
    assert not any("FAILED" in line for line in rows.values())


def test_disabled_account_login_failure_is_reported_marked(check: Check) -> None:
    code, rows = check(exchange_2019(), old_password="wrong-password")
    assert code == 1
    assert "FAILED" in rows["pop3 old (disabled)"]
    assert " ok " in rows["pop3 info"]
    assert "wrong-password" not in "".join(rows.values())


@pytest.mark.parametrize(
    ("peer", "target", "reply", "hint"),
    [
        (
            exchange_2019,
            "mail",
            "530 5.7.1 Client was not authenticated",
            '"Anonymous users"',
        ),
        (
            exchange_2019,
            "mail",
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
            "ms-Exch-SMTP-Accept-Any-Sender",
        ),
        (
            exchange_online,
            "rcpt",
            "550 5.7.64 TenantAttribution; Relay Access Denied",
            "inbound connector",
        ),
        (
            exchange_2019,
            "rcpt",
            "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
            "ms-Exch-SMTP-Accept-Any-Recipient",
        ),
        (
            postfix,
            "rcpt",
            "554 5.7.1 <x>: Relay access denied",
            "ms-Exch-SMTP-Accept-Any-Recipient",
        ),
        (
            exchange_2019,
            "rcpt",
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            "does not exist in Exchange",
        ),
        (
            postfix,
            "rcpt",
            "550 5.1.1 <x>: Recipient address rejected: User unknown in virtual mailbox table",
            "does not exist in Exchange",
        ),
    ],
    ids=["530", "5.7.60", "5.7.64", "5.7.54", "554-relay", "5.1.10", "5.1.1"],
)
def test_each_setup_refusal_is_flagged_with_a_hint(
    check: Check, peer: Callable[..., SmtpPeer], target: str, reply: str, hint: str
) -> None:
    refused = "old@firma.test"

    def rule(stage: str, sender: str, recipient: str | None, data: bytes | None) -> str | None:
        if stage == target and (stage == "mail" or recipient == refused):
            return reply
        return None

    code, rows = check(peer(rule))
    assert code == 1
    row = rows[
        f"smtp MAIL FROM:<{CHECK_SENDER}>" if target == "mail" else f"smtp RCPT TO:<{refused}>"
    ]
    assert "FAILED" in row
    assert reply.split(" ", 2)[2][:20] in row
    assert hint in row
    if target == "rcpt":
        # The others are fine, and say so.
        assert " ok " in rows["smtp RCPT TO:<info@firma.test>"]
        assert " ok " in rows[f"smtp MAIL FROM:<{CHECK_SENDER}>"]


def test_recipients_are_still_tested_when_the_foreign_sender_is_refused(check: Check) -> None:
    # A sender restriction at MAIL (smtpd_delay_reject = no) that refuses the check's sender:
    # the recipients are tested with the null sender, as the delivery's probe would.
    code, rows = check(postfix(sender_access([CHECK_SENDER], delay_reject=False)))
    assert code == 1
    assert "FAILED" in rows[f"smtp MAIL FROM:<{CHECK_SENDER}>"]
    for recipient in FIXED:
        assert " ok " in rows[f"smtp RCPT TO:<{recipient}>"]


def test_a_temporary_refusal_is_reported_but_not_a_failure(check: Check) -> None:
    # Postfix's reject_unknown_sender_domain answers 450 by default: not our setup.
    code, rows = check(
        postfix(
            lambda stage, sender, rcpt, data: (
                "450 4.1.8 <check@pop3-connector.invalid>: Sender address rejected: Domain not "
                "found"
                if stage == "rcpt" and sender == CHECK_SENDER
                else None
            )
        )
    )
    assert code == 0
    assert "temporary" in rows["smtp RCPT TO:<info@firma.test>"]


def test_fixed_envelope_sender_is_the_one_tested(check: Check) -> None:
    code, rows = check(exchange_2019(), smtp_extra='envelope_sender = "null"')
    assert code == 0
    assert " ok " in rows["smtp MAIL FROM:<>"]
