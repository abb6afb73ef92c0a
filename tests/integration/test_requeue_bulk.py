"""``dead-letters requeue`` in bulk (issue 19 item 4): select by account, stage and age, a dry
run that sends nothing, one SMTP session for the batch, and a stop at the first failure of our
own setup.  Against aiosmtpd playing Exchange, with the Maildir store and the IMAP store (a
Dovecot folder); the commands run through ``cli.main``."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope

from connector.config import load_settings
from connector.deadletter import DeadLetterArchive, DeadLetterInfo
from connector.runtime import build_runtime, open_store
from tests.integration.test_cycle import message
from tests.servers import DovecotServer, SmtpSink

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)
NOT_AUTHENTICATED = "530 5.7.1 Client was not authenticated"


@dataclass
class Bench:
    config: Path
    sink: SmtpSink
    store: DeadLetterArchive

    def run(self, *args: str) -> int:
        from connector.cli import main

        return main(["--config", str(self.config), *args])

    def put(self, uidl: str, account: str, stage: str, age: dt.timedelta) -> str:
        info = DeadLetterInfo(account, uidl, stage, "554 5.1.0 Sender denied", NOW - age)
        return asyncio.run(self.store.put(raw(uidl), info))

    def stored(self) -> dict[str, tuple[str, str]]:
        """uidl -> (id, response) of every dead letter in the store."""
        return {r.uidl: (r.id, r.response) for r in asyncio.run(self.store.list())}


def raw(uidl: str) -> bytes:
    # message() ends the body with its own number; the UIDL goes into the Subject.
    return message(0, sender=f"{uidl}@customer.example").replace(
        b"Subject: message 0", f"Subject: {uidl}".encode()
    )


@pytest.fixture(params=["maildir", "imap"])
def bench(
    request: pytest.FixtureRequest, tmp_path: Path, dovecot: DovecotServer
) -> Iterator[Bench]:
    dead_letter = ""
    if request.param == "imap":
        user, password = dovecot.add_user()
        dead_letter = f"""
[dead_letter]
store = "imap"
host = "localhost"
port = {dovecot.ports["imaps"]}
tls = "implicit"
ca_file = "{dovecot.ca_file}"
username = "{user}"
password = "{password}"
folder = "Dead Letters"
"""
    sink = SmtpSink().start()
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[service]
state_dir = "{tmp_path / "state"}"

[smtp]
host = "127.0.0.1"
port = {sink.port}
tls = "none"
helo_name = "connector.test"
{dead_letter}
[[accounts]]
name = "info"
host = "localhost"
tls = "none"
username = "u"
password = "p"
deliver_to = ["info@firma.test"]

[[accounts]]
name = "sales"
host = "localhost"
tls = "none"
username = "u"
password = "p"
deliver_to = ["sales@firma.test"]
"""
    )
    config.chmod(0o600)
    store = open_store(build_runtime(load_settings(config)))
    try:
        yield Bench(config, sink, store)
    finally:
        sink.stop()


def test_selection_dry_run_sends_nothing_and_the_batch_delivers_oldest_first(
    bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    old = bench.put("old", "info", "data", dt.timedelta(days=10))
    mail = bench.put("mail", "info", "mail", dt.timedelta(days=2))
    sales = bench.put("sales", "sales", "data", dt.timedelta(days=1))
    recent = bench.put("recent", "info", "data", dt.timedelta(hours=1))
    orphan = bench.put("orphan", "removed", "data", dt.timedelta(hours=2))
    before = bench.stored()
    capsys.readouterr()

    # Flags combine with AND; a dry run lists id, account, stage, recipients and size.
    assert (
        bench.run("dead-letters", "requeue", "--account", "info", "--stage", "data", "--dry-run")
        == 0
    )
    listing = capsys.readouterr().out
    assert [line.split()[0] for line in listing.splitlines()[1:-1]] == [old, recent]
    assert re.search(
        rf"{re.escape(recent)}\s+info\s+data\s+info@firma.test\s+{len(raw('recent'))}\n", listing
    )
    assert "nothing sent" in listing
    # An account no longer configured has no recipient: the dry run says so, and exits 1.
    assert bench.run("dead-letters", "requeue", "--since", "3d", "--dry-run") == 1
    listing = capsys.readouterr().out
    assert [line.split()[0] for line in listing.splitlines()[1:-1]] == [mail, sales, orphan, recent]
    assert "'removed' is not configured" in listing
    assert bench.sink.received == []
    assert bench.sink.handler.transactions == 0
    assert bench.stored() == before

    # A real run: oldest first, one SMTP session for the batch; a message refused again stays
    # with its new reason and the batch goes on.
    peers: list[object] = []

    def rule(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
        if stage == "data":
            peers.append(bench.sink.handler.peer)
            if envelope.mail_from == "mail@customer.example":
                return "550 5.7.1 Still not welcome"
        return None

    bench.sink.handler.rule = rule
    assert bench.run("dead-letters", "requeue", "--account", "info", "--since", "3d") == 1
    report = capsys.readouterr().out
    assert f"{mail}: refused again (550 5.7.1 Still not welcome (at data))" in report
    assert f"{recent}: delivered to info@firma.test: 250 2.0.0 OK queued" in report
    assert "requeue: 1 delivered, 1 refused again" in report
    assert [m.data for m in bench.sink.received] == [raw("recent")]
    assert len(peers) == 2
    assert peers[0] == peers[1]
    left = bench.stored()
    assert set(left) == {"old", "mail", "sales", "orphan"}
    assert left["mail"][0] != mail
    assert left["mail"][1] == "550 5.7.1 Still not welcome"

    # --all: the rest; the orphan is not attempted (no recipient) and the exit status says so.
    bench.sink.handler.rule = None
    assert bench.run("dead-letters", "requeue", "--all") == 1
    report = capsys.readouterr().out
    assert f"{orphan}: not attempted: account 'removed' is not configured" in report
    assert "requeue: 3 delivered, 1 not attempted" in report
    # "mail" failed again just now: it is the newest dead letter.
    assert [m.data for m in bench.sink.received[1:]] == [raw("old"), raw("sales"), raw("mail")]
    assert bench.sink.received[2].rcpt_tos == ("sales@firma.test",)
    assert set(bench.stored()) == {"orphan"}
    assert bench.run("dead-letters", "requeue", "--all", "--to", "postmaster@firma.test") == 0
    assert bench.sink.received[4].rcpt_tos == ("postmaster@firma.test",)
    assert bench.stored() == {}
    capsys.readouterr()
    assert bench.run("dead-letters", "requeue", "--all") == 0
    assert "no dead letters selected" in capsys.readouterr().out


def test_a_setup_refusal_stops_the_batch_at_the_first_message(
    bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exchange's receive connector without anonymous permission answers 530 to MAIL for every
    sender: the first dead letter is not judged by it, and nothing after it is tried."""
    ids = [bench.put(f"m{i}", "info", "data", dt.timedelta(hours=5 - i)) for i in range(4)]
    before = bench.stored()
    bench.sink.handler.rule = lambda stage, env, data: (
        NOT_AUTHENTICATED if stage == "mail" else None
    )
    capsys.readouterr()

    assert bench.run("dead-letters", "requeue", "--all") == 1
    captured = capsys.readouterr()
    assert bench.sink.handler.refused == [("mail", NOT_AUTHENTICATED)]  # one attempt only
    assert bench.sink.received == []
    assert bench.stored() == before  # every one kept, with its old reason
    assert f"{ids[0]}: not delivered, unchanged: {NOT_AUTHENTICATED} (at mail)" in captured.out
    for other in ids[1:]:
        assert f"{other}: not attempted" in captured.out
    assert "requeue: 1 not delivered, 3 not attempted" in captured.out
    assert f"stopped at {ids[0]}: the SMTP setup failed" in captured.err

    # The receive connector fixed: the same command delivers them all.
    bench.sink.handler.rule = None
    assert bench.run("dead-letters", "requeue", "--all") == 0
    assert [m.data for m in bench.sink.received] == [raw(f"m{i}") for i in range(4)]
    assert bench.stored() == {}


def test_requeue_needs_an_id_or_a_selection_not_both(
    bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in ([], ["some-id", "--all"], ["some-id", "--account", "info"], ["--since", "soon"]):
        with pytest.raises(SystemExit) as exc:
            bench.run("dead-letters", "requeue", *args)
        assert exc.value.code == 2
    assert "either an ID or" in capsys.readouterr().err


def test_show_writes_an_eml_file_for_outlook(
    bench: Bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dead-letters show ID --eml FILE``: the stored bytes (our header lines on top, then the
    original message), owner-only, written by us rather than by a shell redirection (Windows
    PowerShell 5.1's ``>`` writes UTF-16)."""
    dl_id = bench.put("x", "info", "data", dt.timedelta(hours=1))
    capsys.readouterr()
    assert bench.run("dead-letters", "show", dl_id) == 0
    stored = capsys.readouterr().out.encode()
    eml = tmp_path / "refused.eml"
    eml.write_bytes(b"an older export, replaced")
    assert bench.run("dead-letters", "show", dl_id, "--eml", str(eml)) == 0
    assert f"written to {eml}" in capsys.readouterr().err
    data = eml.read_bytes()
    assert data == stored
    assert data.startswith(b"X-POP3-Connector-Account: info\r\n")
    assert data.endswith(raw("x"))
    fresh = tmp_path / "fresh.eml"
    assert bench.run("dead-letters", "show", dl_id, "--eml", str(fresh)) == 0
    assert fresh.stat().st_mode & 0o077 == 0  # a new file is owner-only
    missing = tmp_path / "missing.eml"
    assert bench.run("dead-letters", "show", "no-such-id", "--eml", str(missing)) == 1
    assert not missing.exists()
