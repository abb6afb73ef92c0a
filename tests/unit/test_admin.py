"""The operator commands of ``connector/admin.py`` on a Maildir store and a ledger, without
SMTP: ``dead-letters show``, the dry run of ``requeue`` and ``status``."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import stat
from pathlib import Path

import pytest

from connector import admin
from connector.config import load_settings
from connector.deadletter import DeadLetterInfo
from connector.deadletter.maildir import MaildirStore
from connector.ledger import CycleRecord, Ledger
from connector.runtime import Runtime, build_runtime

NOW = dt.datetime(2026, 11, 27, 15, 49, 35, tzinfo=dt.UTC)
MESSAGE = b"From: a@b.example\r\nSubject: hello\r\n\r\nbody\r\n"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("POP3_CONNECTOR_"):
            monkeypatch.delenv(name)


def runtime(tmp_path: Path, accounts: str = "") -> Runtime:
    accounts = accounts or (
        '[[accounts]]\nname = "info"\nhost = "127.0.0.1"\nport = 1\ntls = "none"\n'
        'username = "info"\npassword = "pw"\ndeliver_to = ["info@firma.local"]\n'
    )
    path = tmp_path / "config.toml"
    path.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n[metrics]\nlisten = ""\n'
        f'[smtp]\nhost = "127.0.0.1"\ntls = "none"\nhelo_name = "c.test"\n{accounts}'
    )
    return build_runtime(load_settings(path))


def put(rt: Runtime, raw: bytes = MESSAGE, account: str = "info", stage: str = "data") -> str:
    assert rt.dead_letter_path is not None
    info = DeadLetterInfo(account, "u1", stage, "554 5.1.0 Sender denied", NOW)
    return asyncio.run(MaildirStore(rt.dead_letter_path).put(raw, info))


def show(
    rt: Runtime, dl_id: str, eml: Path | None = None, *, terminal: bool = False
) -> tuple[int, bytes, str]:
    out, err = io.BytesIO(), io.StringIO()
    code = asyncio.run(
        admin.dead_letters_show(rt, dl_id, out=out, err=err, eml=eml, terminal=terminal)
    )
    return code, out.getvalue(), err.getvalue()


def test_show_eml_makes_an_existing_file_owner_only(tmp_path: Path) -> None:
    """An export over an older one (mode 0644, as an editor or a copy left it) is replaced by
    an owner-only file, as a new one is: mail is private."""
    rt = runtime(tmp_path)
    dl_id = put(rt)
    eml = tmp_path / "refused.eml"
    eml.write_bytes(b"an older export, longer than the new one" * 10)
    eml.chmod(0o644)
    code, _, err = show(rt, dl_id, eml)
    assert (code, f"written to {eml}" in err) == (0, True)
    assert stat.S_IMODE(eml.stat().st_mode) == 0o600
    assert eml.read_bytes().endswith(MESSAGE)
    assert eml.read_bytes().startswith(b"X-POP3-Connector-Account: info\r\n")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_show_eml_to_a_directory_says_so(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    dl_id = put(rt)
    code, _, err = show(rt, dl_id, tmp_path)
    assert code == admin.EX_FAILED
    assert f"cannot write {tmp_path}: it is a directory" in err


def dry_run(
    rt: Runtime, dl_id: str | None = None, to: list[str] | None = None
) -> tuple[int, str, str]:
    """``requeue --dry-run``: ``dl_id``, else every dead letter (``--all``)."""
    out, err = io.StringIO(), io.StringIO()
    code = asyncio.run(
        admin.dead_letters_requeue(
            rt, dl_id, to=to, out=out, err=err, selection=admin.Selection(), dry_run=True
        )
    )
    return code, out.getvalue(), err.getvalue()


def plant(rt: Runtime, dl_id: str, old: bytes, new: bytes) -> None:
    """Change a stored dead letter's bytes, as anyone with access to the store can."""
    assert rt.dead_letter_path is not None
    (path,) = (rt.dead_letter_path / "new").glob(f"{dl_id}*")
    path.write_bytes(path.read_bytes().replace(old, new, 1))


def test_dry_run_escapes_control_characters(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    dl_id = put(rt, stage="data")
    plant(rt, dl_id, b"Stage: data", b"Stage: da\x1b[2Jta")
    code, out, _ = dry_run(rt, to=["x@firma.local"])
    assert code == 0
    assert "\x1b" not in out
    assert "da\\x1b[2Jta" in out


def test_dry_run_counts_only_what_would_be_sent(tmp_path: Path) -> None:
    """Dead letters of an account no longer configured have no recipient: listed, but not
    counted as "would be requeued"."""
    rt = runtime(tmp_path)
    put(rt)
    for _ in range(3):
        put(rt, account="gone")
    code, out, _ = dry_run(rt)
    assert code == admin.EX_FAILED
    assert out.count("is not configured") == 3
    assert out.splitlines()[-1] == (
        "dry run: 1 dead letter(s) would be requeued, 3 would not (no recipient: see above); "
        "nothing sent"
    )


DISABLED = """[[accounts]]
name = "info"
host = "127.0.0.1"
port = 1
tls = "none"
username = "info"
password = "pw"
deliver_to = ["info@firma.local"]

[[accounts]]
name = "old"
host = "127.0.0.1"
port = 1
tls = "none"
username = "old"
password = "pw"
deliver_to = ["old@firma.local"]
enabled = false
"""


def test_requeue_of_a_disabled_account_goes_to_its_deliver_to(tmp_path: Path) -> None:
    """Disabled is configured, only not polled: its deliver_to holds, no --to needed."""
    rt = runtime(tmp_path, DISABLED)
    put(rt, account="old")
    code, out, _ = dry_run(rt)
    assert code == 0
    assert "old@firma.local" in out
    assert "dry run: 1 dead letter(s) would be requeued; nothing sent" in out


def test_status_shows_a_disabled_account_as_disabled_not_its_next_poll(tmp_path: Path) -> None:
    """A disabled account's last cycle (from before it was disabled) stays in the table, but
    it has no next poll."""
    rt = runtime(tmp_path, DISABLED)
    rt.state_dir.mkdir()

    async def seed() -> None:
        ledger = await Ledger.open(rt.ledger_path)
        try:
            record = CycleRecord(1.0, 2.0, "ok", None, 0, 0, next_poll=NOW.timestamp())
            await ledger.record_cycle("old", record)
        finally:
            await ledger.close()

    asyncio.run(seed())
    out = io.StringIO()
    assert asyncio.run(admin.status_command(rt, as_json=False, out=out)) == 0
    (row,) = [line for line in out.getvalue().splitlines() if line.startswith("old ")]
    assert "disabled" in row
    assert "2026-11-27" not in row
    out = io.StringIO()
    assert asyncio.run(admin.status_command(rt, as_json=True, out=out)) == 0
    (old,) = [a for a in json.loads(out.getvalue())["accounts"] if a["name"] == "old"]
    assert old["next_poll"] is None


HOSTILE = (
    b"From: a@b.example\r\nSubject: \x1b[2Jgone\x9b\r\n\tfolded \xe2\x80\xae\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe\x07\r\n"
)


def test_show_on_a_terminal_escapes_control_characters(tmp_path: Path) -> None:
    """A Subject with ESC[2J must not clear the administrator's screen; line ends, TAB and
    UTF-8 text stay; a pipe and --eml get the bytes unchanged."""
    rt = runtime(tmp_path)
    dl_id = put(rt, HOSTILE)
    code, shown, _ = show(rt, dl_id, terminal=True)
    assert code == 0
    assert shown.endswith(
        b"Subject: \\x1b[2Jgone\\x9b\r\n\tfolded \\u202e\r\n\r\nGr\xc3\xbc\xc3\x9fe\\x07\r\n"
    )
    assert show(rt, dl_id)[1].endswith(HOSTILE)


def test_list_labels_the_size_as_the_original_messages(tmp_path: Path) -> None:
    """The size column counts the message as fetched, without our header lines (a `size`
    refusal counts it with the Received: line, so its number is larger): labelled so."""
    rt = runtime(tmp_path)
    put(rt)
    out = io.StringIO()
    assert asyncio.run(admin.dead_letters_list(rt, as_json=False, out=out)) == 0
    header, row = out.getvalue().splitlines()
    assert header.endswith("STAGE  ORIGINAL SIZE  RESPONSE")
    assert f" {len(MESSAGE)} " in row
