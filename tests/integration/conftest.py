"""Helpers for end-to-end tests: a config file pointing at the real Dovecot and an aiosmtpd sink."""

from __future__ import annotations

import contextlib
import mailbox
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import DovecotServer, ReceivedMail, SmtpSink


@dataclass
class Setup:
    """One account on Dovecot, the SMTP sink, a state dir and the config file tying them."""

    dovecot: DovecotServer
    user: str
    password: str
    sink: SmtpSink
    state_dir: Path
    config: Path

    @property
    def dead_letter_dir(self) -> Path:
        return self.state_dir / "dead-letters"

    def dead_letters(self) -> list[bytes]:
        md = self.dead_letter_dir
        if not md.exists():
            return []
        return sorted(p.read_bytes() for sub in ("new", "cur") for p in (md / sub).iterdir())

    def upstream(self) -> list[bytes]:
        out: list[bytes] = []
        for p in self.dovecot.maildir_files(self.user):
            # A session of the service running meanwhile may expunge it between the listing
            # and the read: then it is no longer upstream.
            with contextlib.suppress(FileNotFoundError):
                out.append(p.read_bytes())
        return out

    def received(self) -> list[ReceivedMail]:
        return list(self.sink.received)

    def ledger(self) -> sqlite3.Connection:
        return sqlite3.connect(self.state_dir / "ledger.sqlite3")

    def run(self, *args: str) -> int:
        from connector.cli import main

        return main(["--config", str(self.config), *args])

    def age_deferrals(self, seconds: float) -> None:
        """Pretend the deferred messages were first seen ``seconds`` earlier (no sleeping)."""
        with self.ledger() as db:
            db.execute(
                "UPDATE messages SET first_seen = first_seen - ? WHERE state = 'deferred'",
                (seconds,),
            )


def write_config(
    path: Path,
    *,
    dovecot: DovecotServer,
    user: str,
    password: str,
    smtp_port: int,
    state_dir: Path,
    tls: str = "none",
    smtp_tls: str = "none",
    smtp_extra: str = "",
    account_extra: str = "",
    service_extra: str = "",
    dead_letter: str = "",
    protocol: str = "pop3",
) -> Path:
    plain, implicit = (("pop3", "pop3s"), ("imap", "imaps"))[protocol == "imap"]
    port = {"none": dovecot.ports[plain], "starttls": dovecot.ports[plain]}.get(
        tls, dovecot.ports[implicit]
    )
    if protocol != "pop3":
        account_extra = f'protocol = "{protocol}"\n{account_extra}'

    path.write_text(
        f"""
[service]
state_dir = "{state_dir}"
log_level = "info"
{service_extra}

[metrics]
listen = "127.0.0.1:0"  # never the default 9469: tests and a real service may run side by side

[smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "{smtp_tls}"
helo_name = "connector.test"
{smtp_extra}

[[accounts]]
name = "info"
host = "localhost"
port = {port}
tls = "{tls}"
ca_file = "{dovecot.ca_file}"
username = "{user}"
password = "{password}"
deliver_to = ["info@firma.test"]
{account_extra}
{dead_letter}
"""
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def setup_factory(dovecot: DovecotServer, tmp_path: Path) -> Iterator[Callable[..., Setup]]:
    sinks: list[SmtpSink] = []

    def make(*, sink: SmtpSink | None = None, **kwargs: Any) -> Setup:
        user, password = dovecot.add_user()
        if sink is None:
            sink = SmtpSink().start()
            sinks.append(sink)
        state_dir = tmp_path / f"state-{user}"
        config = write_config(
            tmp_path / f"config-{user}.toml",
            dovecot=dovecot,
            user=user,
            password=kwargs.pop("password", password),
            smtp_port=sink.port,
            state_dir=state_dir,
            **kwargs,
        )
        return Setup(dovecot, user, password, sink, state_dir, config)

    yield make
    for s in sinks:
        s.stop()


def strip_trace(data: bytes) -> bytes:
    """Remove the Received: line we add (it is folded over two lines)."""
    assert data.startswith(b"Received: from "), data[:80]
    first = data.index(b"\r\n") + 2
    assert data[first : first + 1] == b"\t"
    second = data.index(b"\r\n", first) + 2
    return data[second:]


def maildir_messages(path: Path) -> list[mailbox.MaildirMessage]:
    return list(mailbox.Maildir(path, create=False))
