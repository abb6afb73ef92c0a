"""`pop3-connector demo`: the first thing a new user runs; the real code on loopback servers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from connector import demo
from connector.cli import main


def test_demo_tells_the_story_and_leaves_the_dead_letters(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "connector", "demo", "--state-dir", str(tmp_path / "demo")],
        capture_output=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()
    assert "Exchange received 4 messages; 3 are in the dead-letter store; 0 left" in out
    assert out.count("dead-lettered  ") == 3
    assert "Cycle 2" in out
    # The IMAP account waited with IDLE; a new message came without a poll.
    assert 'Push: the IMAP account "office"' in out
    assert "The stop ended IDLE with DONE, then LOGOUT." in out
    # The dead letters are where the demo says, as files a mail client can open.
    new = list((tmp_path / "demo" / "dead-letters" / "new").iterdir())
    assert len(new) == 3
    assert all(p.read_bytes().startswith(b"X-POP3-Connector-Account: ") for p in new)


def test_demo_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    """`demo | head -1`: the reader goes away; no traceback, no "unexpected error"."""
    with subprocess.Popen(
        [sys.executable, "-m", "connector", "demo", "--state-dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # like head after its line
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 1
    assert first == b"pop3-connector demo\n"
    assert "Traceback" not in err
    assert "unexpected error" not in err


def test_demo_refuses_a_state_dir_in_use(tmp_path: Path) -> None:
    """A real state directory (or anything not empty) is never written into: a usage error,
    and nothing in it changes."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "ledger.sqlite3").write_bytes(b"real rows")
    proc = subprocess.run(
        [sys.executable, "-m", "connector", "demo", "--state-dir", str(state)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert f"demo: --state-dir {state} exists and is not an empty directory" in proc.stderr.decode()
    assert [p.name for p in state.iterdir()] == ["ledger.sqlite3"]
    assert (state / "ledger.sqlite3").read_bytes() == b"real rows"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["demo", "--state-dir", str(empty)]) == 0


def test_demo_exits_1_when_it_ends_otherwise_than_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One more message than the README shows: the counts differ, and the demo says so."""
    mail = demo.sample_mail()
    monkeypatch.setattr(demo, "sample_mail", lambda: [*mail, mail[0].replace(b"1142", b"1143")])
    assert asyncio.run(demo.run_demo(tmp_path / "demo")) == 1
    assert "The demo did not end as expected" in capsys.readouterr().out
