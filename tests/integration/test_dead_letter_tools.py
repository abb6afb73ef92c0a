"""``dead-letters list | show | requeue | purge`` end to end: a message refused by the SMTP sink
(aiosmtpd playing Exchange) after a real cycle against Dovecot, inspected, requeued while still
refused, then requeued after the fix; purge by age.  The commands run through ``cli.main``."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from connector.deadletter import DeadLetterInfo, parse_dead_letter_headers
from connector.deadletter.maildir import MaildirStore
from connector.service import StateLock
from tests.integration.conftest import Setup
from tests.integration.test_cycle import deny_spammer, message
from tests.servers import free_port

SPAM = "spam@bad.example"


def dead_letter_ids(s: Setup, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    capsys.readouterr()
    assert s.run("dead-letters", "list", "--json") == 0
    records: list[dict[str, object]] = json.loads(capsys.readouterr().out)["dead_letters"]
    return records


@pytest.mark.integration
def test_refused_fixed_requeued_delivered_byte_for_byte(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup_factory()
    refused = message(1, sender=SPAM)
    s.dovecot.deliver_many(s.user, [refused, message(2)])
    s.sink.handler.rule = deny_spammer
    assert s.run("once") == 0
    (record,) = dead_letter_ids(s, capsys)
    assert record["account"] == "info"
    assert record["stage"] == "data"
    assert record["response"] == "554 5.1.0 Sender denied"
    assert record["size"] == len(refused)
    first_id = str(record["id"])

    assert s.run("dead-letters", "list") == 0
    table = capsys.readouterr().out
    assert first_id in table
    assert "554 5.1.0 Sender denied" in table

    assert s.run("dead-letters", "show", first_id) == 0
    shown = capsys.readouterr().out.encode()
    assert shown.startswith(b"X-POP3-Connector-Account: info\r\n")
    assert shown.endswith(refused)

    # Still refused (the sender filter has a new reason now): it stays, with that reason.
    s.sink.handler.rule = lambda stage, env, data: (
        "550 5.7.1 Still not welcome" if stage == "data" else None
    )
    with StateLock(s.state_dir):  # works beside a running service: no lock taken
        assert s.run("dead-letters", "requeue", first_id) == 1
    err = capsys.readouterr().err
    assert "refused again" in err
    (again,) = dead_letter_ids(s, capsys)
    assert again["id"] != first_id
    assert again["response"] == "550 5.7.1 Still not welcome"
    assert again["stage"] == "data"
    (stored,) = s.dead_letters()
    assert stored.endswith(refused)
    parsed = parse_dead_letter_headers(stored)
    assert parsed is not None
    assert parsed[0].uidl != ""

    # Fixed: the sink accepts now.  Delivered as it came from POP3, without our lines.
    s.sink.handler.rule = None
    before = len(s.received())
    assert s.run("dead-letters", "requeue", str(again["id"])) == 0
    assert "delivered to info@firma.test" in capsys.readouterr().out
    delivered = s.received()[before:]
    assert len(delivered) == 1
    assert delivered[0].data == refused  # byte for byte: no X-POP3-Connector-*, no Received:
    assert delivered[0].mail_from == SPAM  # the message's own Return-Path
    assert delivered[0].rcpt_tos == ("info@firma.test",)
    assert s.dead_letters() == []
    with s.ledger() as db:
        states = db.execute("SELECT state, last_response FROM messages ORDER BY uidl").fetchall()
    assert ("delivered", "250 2.0.0 OK queued") in states
    assert "dead_lettered" not in {state for state, _ in states}

    assert s.run("dead-letters", "requeue", str(again["id"])) == 1  # gone now
    assert "no dead letter" in capsys.readouterr().err


@pytest.mark.integration
def test_requeue_to_another_address_and_smtp_down_leaves_it_unchanged(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup_factory()
    refused = message(3, sender=SPAM)
    s.dovecot.deliver_many(s.user, [refused])
    s.sink.handler.rule = deny_spammer
    assert s.run("once") == 0
    (record,) = dead_letter_ids(s, capsys)
    dl_id = str(record["id"])

    # Nothing listens on the SMTP port: our setup fails, the message was not judged.
    good_config = s.config.read_text()
    s.config.write_text(good_config.replace(f"port = {s.sink.port}", f"port = {free_port()}"))
    assert s.run("dead-letters", "requeue", dl_id) == 1
    assert "unchanged" in capsys.readouterr().err
    assert [r["id"] for r in dead_letter_ids(s, capsys)] == [dl_id]

    # A temporary refusal says nothing final either: the original reason stays on record.
    s.config.write_text(good_config)
    s.sink.handler.rule = lambda stage, env, data: (
        "451 4.3.0 Try later" if stage == "data" else None
    )
    assert s.run("dead-letters", "requeue", dl_id) == 1
    assert "unchanged" in capsys.readouterr().err
    (kept,) = dead_letter_ids(s, capsys)
    assert (kept["id"], kept["response"]) == (dl_id, "554 5.1.0 Sender denied")

    s.sink.handler.rule = None
    assert s.run("dead-letters", "requeue", dl_id, "--to", "postmaster@firma.test") == 0
    (got,) = s.received()
    assert got.rcpt_tos == ("postmaster@firma.test",)
    assert got.data == refused
    assert s.dead_letters() == []


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[service]
state_dir = "{tmp_path / "state"}"

[smtp]
host = "127.0.0.1"
port = 2525
tls = "none"
helo_name = "connector.test"

[[accounts]]
name = "info"
host = "localhost"
tls = "none"
username = "u"
password = "p"
deliver_to = ["info@firma.test"]
"""
    )
    config.chmod(0o600)
    return config


def test_purge_removes_only_older_dead_letters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from connector.cli import main

    config = _config(tmp_path)
    store = MaildirStore(tmp_path / "state" / "dead-letters")
    now = dt.datetime.now(dt.UTC)
    ages = {"old": 40, "older": 400, "recent": 29, "today": 0}
    ids = {}
    for name, days in ages.items():
        info = DeadLetterInfo("info", name, "data", "554 5.1.0 no", now - dt.timedelta(days=days))
        ids[name] = asyncio.run(store.put(f"Subject: {name}\r\n\r\nbody\r\n".encode(), info))

    assert main(["--config", str(config), "dead-letters", "purge", "--older-than", "30d"]) == 0
    assert "purged 2 dead letter(s)" in capsys.readouterr().out
    assert sorted(r.uidl for r in asyncio.run(store.list())) == ["recent", "today"]
    assert main(["--config", str(config), "dead-letters", "purge", "--older-than", "30d"]) == 0
    assert "purged 0 dead letter(s)" in capsys.readouterr().out

    with pytest.raises(SystemExit) as bad:
        main(["--config", str(config), "dead-letters", "purge", "--older-than", "soon"])
    assert bad.value.code == 2
    assert len(asyncio.run(store.list())) == 2


def test_status_without_a_ledger_and_unknown_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from connector.cli import main

    config = _config(tmp_path)
    assert main(["--config", str(config), "status", "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)["accounts"]
    assert info == {
        "name": "info",
        "last_cycle_started": None,
        "last_cycle_finished": None,
        "result": None,
        "last_error": None,
        "mailbox_messages": None,
        "failing": False,
        "deferred": 0,
        "dead_letters": 0,
        "next_poll": None,
        "smtp_target": "default",
    }
    assert not (tmp_path / "state" / "ledger.sqlite3").exists()  # a reader creates nothing
    assert main(["--config", str(config), "status"]) == 0
    assert "never" in capsys.readouterr().out
    assert main(["--config", str(config), "dead-letters", "list"]) == 0
    assert "no dead letters" in capsys.readouterr().out
    for action in ("show", "requeue"):
        assert main(["--config", str(config), "dead-letters", action, "nope"]) == 1
        assert "no dead letter 'nope'" in capsys.readouterr().err
    assert main(["--config", str(config), "dead-letters", "show", "../etc"]) == 1


def test_ledger_is_readable_while_written(tmp_path: Path) -> None:
    """The premise of `status` beside `run`: WAL lets a reader in during a write transaction."""
    path = tmp_path / "db.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    reader = sqlite3.connect(path, timeout=0.1)
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (0,)
    writer.execute("COMMIT")
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (1,)
    reader.close()
    writer.close()
