"""The dead-letter store fails: the refused message stays upstream, nothing else is lost.

End to end: real Dovecot, aiosmtpd refusing one message with ``554`` after DATA, ``once`` run
by the real CLI.  The store fails the ways a disk does: a read-only filesystem (a read-only bind
mount: file modes do not stop root), an immutable directory (``chattr +i``), a file where the
Maildir must be, a full filesystem (a 64 KiB tmpfs) and a write over the process's file size
limit (RLIMIT_FSIZE, in a child).  Each time: ``once`` exits 1 and says why, the message that
was to be dead-lettered is still upstream with no ledger row, the one before it was delivered,
and the cycle stopped before the next RETR (docs/design.md §5.1 step 4, §6.1).  Once the store
is repaired, the next cycle dead-letters it.
"""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope

from tests.integration.conftest import Setup, strip_trace
from tests.reliability.rig import mail

pytestmark = pytest.mark.integration

BIG = b"y" * 76 + b"\r\n"
REFUSED = mail(1, sender="spam@bad.example", body=BIG * 2_700)  # ~210 KB


def deny_spammer(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
    if stage == "data" and envelope.mail_from == "spam@bad.example":
        return "554 5.1.0 Sender denied"
    return None


def prepared(setup_factory: Callable[..., Setup]) -> Setup:
    s = setup_factory()
    s.dovecot.deliver_many(s.user, [mail(0), REFUSED, mail(2)])
    s.sink.handler.rule = deny_spammer
    s.state_dir.mkdir(mode=0o700)
    return s


def maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def assert_kept_upstream(s: Setup, out: str, reason: str) -> None:
    assert "FAILED: dead-letter store maildir" in out, out
    assert reason in out, out
    assert [strip_trace(m.data) for m in s.received()] == [mail(0)]
    upstream = s.upstream()
    assert len(upstream) == 2  # the refused one and the one after it: never fetched
    assert any(u.replace(b"\r\n", b"\n") == REFUSED.replace(b"\r\n", b"\n") for u in upstream)
    with s.ledger() as db:
        rows = db.execute("SELECT state FROM messages ORDER BY state").fetchall()
    assert rows == [("delivered",)]  # nothing recorded for the refused message


def assert_recovers(s: Setup) -> None:
    assert s.run("once") == 0
    assert s.upstream() == []
    (dead,) = s.dead_letters()
    assert dead.endswith(REFUSED)
    assert [strip_trace(m.data) for m in s.received()] == [mail(0), mail(2)]


@contextmanager
def mounted(*args: str, target: Path) -> Iterator[None]:
    subprocess.run(["mount", *args, str(target)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def test_dead_letter_dir_on_read_only_filesystem(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = prepared(setup_factory)
    dl = maildir(s.dead_letter_dir)
    with mounted("--bind", str(dl), target=dl):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(dl)], check=True)
        assert s.run("once") == 1
        assert_kept_upstream(s, capsys.readouterr().out, "Read-only file system")
    assert_recovers(s)


def test_dead_letter_dir_immutable(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = prepared(setup_factory)
    tmp = maildir(s.dead_letter_dir) / "tmp"
    subprocess.run(["chattr", "+i", str(tmp)], check=True)
    try:
        assert s.run("once") == 1
        assert_kept_upstream(s, capsys.readouterr().out, "Operation not permitted")
    finally:
        subprocess.run(["chattr", "-i", str(tmp)], check=True)
    assert_recovers(s)


def test_dead_letter_path_is_a_file(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = prepared(setup_factory)
    s.dead_letter_dir.write_bytes(b"not a directory")
    assert s.run("once") == 1
    assert_kept_upstream(s, capsys.readouterr().out, "cannot create the Maildir")
    s.dead_letter_dir.unlink()
    assert_recovers(s)


def test_dead_letter_filesystem_full(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = prepared(setup_factory)
    s.dead_letter_dir.mkdir(mode=0o700)
    with mounted("-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", target=s.dead_letter_dir):
        assert s.run("once") == 1
        assert_kept_upstream(s, capsys.readouterr().out, "No space left on device")
        # The half-written file was removed: no partial dead letter anywhere.
        assert [p for p in s.dead_letter_dir.rglob("*") if p.is_file()] == []
    assert_recovers(s)


def _limit_file_size() -> None:
    # Ignore SIGXFSZ so that the write fails with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_dead_letter_write_over_file_size_limit(setup_factory: Callable[..., Setup]) -> None:
    """A failing write without any mount: RLIMIT_FSIZE in the child makes write() fail."""
    s = prepared(setup_factory)
    proc = subprocess.run(
        [sys.executable, "-m", "connector", "--config", str(s.config), "once"],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert_kept_upstream(s, proc.stdout, "File too large")
    assert "dead-letter store maildir" in proc.stderr  # the log says it too
    assert os.listdir(s.dead_letter_dir / "tmp") == []
    with sqlite3.connect(s.state_dir / "ledger.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (1,)
    assert_recovers(s)
