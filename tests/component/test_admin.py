"""connector/admin.py against a loopback port nothing listens on: ``requeue`` when the SMTP
setup fails."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
from pathlib import Path

import pytest

from connector import admin
from connector.config import load_settings
from connector.deadletter import DeadLetterInfo
from connector.deadletter.maildir import MaildirStore
from connector.runtime import build_runtime
from tests.servers import free_port

MESSAGE = b"From: a@b.example\r\nSubject: hello\r\n\r\nbody\r\n"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("POP3_CONNECTOR_"):
            monkeypatch.delenv(name)


def test_a_single_requeue_that_stops_counts_no_others(tmp_path: Path) -> None:
    """One ID, SMTP unreachable: the stop is reported without "0 dead letter(s) not
    attempted" (there were no others)."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n[metrics]\nlisten = ""\n'
        f'[smtp]\nhost = "127.0.0.1"\nport = {free_port()}\ntls = "none"\nhelo_name = "c.test"\n'
        '[[accounts]]\nname = "info"\nhost = "127.0.0.1"\nport = 1\ntls = "none"\n'
        'username = "info"\npassword = "pw"\ndeliver_to = ["info@firma.local"]\n'
    )
    rt = build_runtime(load_settings(path))
    assert rt.dead_letter_path is not None
    info = DeadLetterInfo("info", "u1", "data", "554 5.1.0 Sender denied", dt.datetime.now(dt.UTC))
    dl_id = asyncio.run(MaildirStore(rt.dead_letter_path).put(MESSAGE, info))
    out, err = io.StringIO(), io.StringIO()
    code = asyncio.run(admin.dead_letters_requeue(rt, dl_id, to=None, out=out, err=err))
    assert code == admin.EX_FAILED
    text = err.getvalue()
    assert f"pop3-connector: stopped at {dl_id}: the SMTP setup failed, not the message." in text
    assert "not attempted" not in text
