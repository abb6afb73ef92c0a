"""SMTP targets against real servers (docs/design.md §14.1): two customers, each with their own
Exchange (aiosmtpd), their mailboxes on Dovecot.  One target is broken (a wrong SMTP password):
its accounts' cycles fail and their mail waits upstream; the other's accounts deliver."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from connector.cli import main
from tests.servers import DovecotServer, SmtpSink

pytestmark = pytest.mark.integration

RELAY_USER, RELAY_PASSWORD = "relay@kunde-b.test", "right-pw"
WRONG_PASSWORD = "wrong-pw"


def message(tag: str) -> bytes:
    return (
        f"From: sender@outside.example\r\nTo: someone@kunde.test\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@outside.example>\r\n\r\nbody of {tag}\r\n"
    ).encode()


@dataclass
class Provider:
    dovecot: DovecotServer
    default: SmtpSink  # [smtp]: the provider's own Exchange; notices would go there
    kunde_a: SmtpSink
    kunde_b: SmtpSink  # requires AUTH
    users: dict[str, str]  # account -> Dovecot user
    config: Path
    tmp_path: Path

    def write(self, kunde_b_password: str) -> None:
        accounts = {"a-info": "kunde-a", "a-sales": "kunde-a", "b-info": "kunde-b"}
        blocks = "".join(
            f"""
[[accounts]]
name = "{name}"
host = "127.0.0.1"
port = {self.dovecot.ports["pop3"]}
tls = "none"
username = "{self.users[name]}"
password = "secret-pw"
deliver_to = ["{name}@{target}.test"]
smtp = "{target}"
"""
            for name, target in accounts.items()
        )
        self.config.write_text(
            f"""
[service]
state_dir = "{self.tmp_path / "state"}"
[metrics]
listen = ""
[smtp]
host = "127.0.0.1"
port = {self.default.port}
tls = "none"
helo_name = "connector.provider.test"
[smtp_targets.kunde-a]
host = "127.0.0.1"
port = {self.kunde_a.port}
tls = "none"
helo_name = "connector.provider.test"
[smtp_targets.kunde-b]
host = "127.0.0.1"
port = {self.kunde_b.port}
tls = "none"
helo_name = "connector.provider.test"
username = "{RELAY_USER}"
password = "{kunde_b_password}"
{blocks}"""
        )
        self.config.chmod(0o600)

    def run(self, *args: str) -> int:
        return main(["--config", str(self.config), *args])

    def upstream(self, account: str) -> int:
        return len(self.dovecot.maildir_files(self.users[account]))

    def dead_letters(self) -> list[Path]:
        md = self.tmp_path / "state" / "dead-letters"
        return [p for sub in ("new", "cur") for p in (md / sub).glob("*")] if md.exists() else []


def subjects(sink: SmtpSink) -> list[str]:
    return sorted(
        line.split(b": ", 1)[1].decode()
        for m in sink.received
        for line in m.data.split(b"\r\n")
        if line.startswith(b"Subject: ")
    )


@pytest.fixture
def provider(dovecot: DovecotServer, tmp_path: Path) -> Iterator[Provider]:
    default, kunde_a = SmtpSink().start(), SmtpSink().start()
    kunde_b = SmtpSink(auth={RELAY_USER: RELAY_PASSWORD}).start()
    sinks = [default, kunde_a, kunde_b]
    users = {name: dovecot.add_user()[0] for name in ("a-info", "a-sales", "b-info")}
    for name, user in users.items():
        dovecot.deliver_many(user, [message(f"{name}-1"), message(f"{name}-2")])
    p = Provider(dovecot, default, kunde_a, kunde_b, users, tmp_path / "config.toml", tmp_path)
    p.write(WRONG_PASSWORD)
    try:
        yield p
    finally:
        for sink in sinks:
            sink.stop()


def test_a_broken_target_stops_only_its_own_accounts(
    provider: Provider, capsys: pytest.CaptureFixture[str]
) -> None:
    # Customer A's Exchange refuses one message for good: a dead letter, of A's.
    provider.kunde_a.handler.rule = lambda stage, env, data: (
        "554 5.7.1 refused by policy" if stage == "data" and b"a-sales-2" in (data or b"") else None
    )
    assert provider.run("once") == 1  # b-info's cycle failed
    out = capsys.readouterr().out
    assert "a-info: ok; delivered 2" in out
    assert "a-sales: ok; delivered 1, dead-lettered 1" in out
    assert "b-info: FAILED: 535" in out

    assert subjects(provider.kunde_a) == ["a-info-1", "a-info-2", "a-sales-1"]
    assert all(m.rcpt_tos[0].endswith("@kunde-a.test") for m in provider.kunde_a.received)
    assert provider.kunde_b.received == []
    assert provider.default.received == []
    # Our own setup failed for B: its mail waits upstream, nothing dead-lettered for it.
    assert (provider.upstream("a-info"), provider.upstream("b-info")) == (0, 2)
    assert len(provider.dead_letters()) == 1

    assert provider.run("status", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    by_name = {a["name"]: a for a in doc["accounts"]}
    assert {n: a["smtp_target"] for n, a in by_name.items()} == {
        "a-info": "kunde-a",
        "a-sales": "kunde-a",
        "b-info": "kunde-b",
    }
    assert by_name["b-info"]["failing"] is True
    assert by_name["a-info"]["failing"] is False

    # check --connect tests every target, each with its own accounts' recipients.
    assert provider.run("check", "--connect") == 1
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("smtp")]
    assert any(r.startswith("smtp  ") and " ok " in r for r in rows)  # [smtp]
    assert any(r.startswith("smtp kunde-a ") and " ok " in r for r in rows)
    assert any(r.startswith("smtp kunde-b ") and "FAILED" in r and "535" in r for r in rows)
    assert any(r.startswith("smtp kunde-a RCPT TO:<a-sales@kunde-a.test>") for r in rows)
    assert not any("kunde-b.test" in r for r in rows if r.startswith("smtp kunde-a"))

    # Requeue sends A's dead letter to A's Exchange, not to [smtp].
    provider.kunde_a.handler.rule = None
    assert provider.run("dead-letters", "requeue", "--all") == 0
    assert subjects(provider.kunde_a) == ["a-info-1", "a-info-2", "a-sales-1", "a-sales-2"]
    assert provider.default.received == []

    # B's SMTP password fixed: its mail goes to B's Exchange, nowhere else.
    provider.write(RELAY_PASSWORD)
    assert provider.run("once", "--account", "b-info") == 0
    assert subjects(provider.kunde_b) == ["b-info-1", "b-info-2"]
    assert provider.default.received == []
    assert provider.upstream("b-info") == 0
