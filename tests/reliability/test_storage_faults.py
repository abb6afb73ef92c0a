"""When the disk or the ledger fails (issue 18): no repeated duplicates, no twin dead letters.

End to end against the real Dovecot and aiosmtpd, with the state directory on a real file
system that fails at a chosen instant:

* a small tmpfs, filled to its last byte (before a cycle, or inside the SMTP sink just before it
  answers ``250``: between the ``250`` and the ledger's commit);
* a loop-mounted ext4 with ``errors=remount-ro``, forced read-only through ext4's own
  ``trigger_fs_error`` (a file system error, as a failing disk raises one; ``mount -o
  remount,ro`` is refused while the ledger is open for writing);
* a second process holding ``BEGIN EXCLUSIVE`` on the ledger.

These tests need root: they mount file systems (tmpfs, ext4 on a loop device) under the test's
tmp_path.  CI runs as root and runs them; nothing here is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import poplib
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope

from connector import ledger as ledger_module
from connector.deadletter import DeadLetterInfo
from connector.deadletter.maildir import STALE_TMP, MaildirStore
from connector.runloop import run as run_loop
from tests.integration.conftest import Setup, strip_trace
from tests.integration.test_cycle import message
from tests.integration.test_operations import endpoint_url, scrape, status_doc, value
from tests.integration.test_service import running, wait_until

pytestmark = pytest.mark.integration

POLL = 'poll_interval = "0.3s"'  # failing cycles back off to 4x this: several in ~3 s
SPAM = "spam@bad.example"


# -- file systems that fail --------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(target: Path, size: str = "4m") -> Iterator[Filler]:
    """A tmpfs of ``size`` mounted at ``target`` (root), with a :class:`Filler` for it."""
    target.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target)], check=True
    )
    try:
        yield Filler(target)
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


class Filler:
    """Fills a file system to its last byte, and frees it again ("space returns")."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "filler"

    def fill(self) -> None:
        with open(self.path, "ab", buffering=0) as f:
            for chunk in (1 << 16, 4096, 1):  # down to the last byte of the last page
                while True:
                    try:
                        f.write(b"\0" * chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break

    def release(self) -> None:
        self.path.unlink()


@contextlib.contextmanager
def ext4(target: Path) -> Iterator[Callable[[], None]]:
    """A 16 MiB ext4 on a loop device at ``target``, mounted ``errors=remount-ro`` (root).

    Yields a function that raises a file system error in it (``trigger_fs_error``, ext4's
    sysfs knob for this): the kernel remounts it read-only at once, as for a failing disk.
    """
    image = target.with_name(target.name + ".ext4")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    target.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(target)], check=True)
    try:
        source = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(target)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        knob = Path("/sys/fs/ext4") / Path(source).name / "trigger_fs_error"

        def fail() -> None:
            knob.write_text("pop3-connector test: the disk failed\n")

        yield fail
    finally:
        subprocess.run(["umount", str(target)], check=True)
        image.unlink()


class LockHolder:
    """A second process that takes ``BEGIN EXCLUSIVE`` on the ledger when told to."""

    SCRIPT = (
        "import sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "for line in sys.stdin:\n"
        "    conn.execute('BEGIN EXCLUSIVE' if line.strip() == 'lock' else 'ROLLBACK')\n"
        "    print('done', flush=True)\n"
    )

    def __init__(self, ledger: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, str(ledger)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _say(self, what: str) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "done\n"

    def lock(self) -> None:
        self._say("lock")

    def unlock(self) -> None:
        self._say("unlock")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def cycles(base: str, result: str) -> float:
    return value(scrape(base), "cycles_total", account="info", result=result) or 0.0


def delivered_ids(s: Setup) -> Counter[bytes]:
    return Counter(strip_trace(m.data) for m in s.received())


def dead_letter_files(s: Setup) -> list[Path]:
    md = s.dead_letter_dir
    return sorted(
        p for sub in ("tmp", "new", "cur") if (md / sub).exists() for p in (md / sub).iterdir()
    )


# -- 1. a ledger that cannot be written delivers nothing twice --------------------------------


def test_run_on_a_full_state_dir_delivers_nothing_until_space_returns(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills between cycles: the proof before the first SMTP transaction fails, so
    nothing is delivered (before: each new message once per cycle), the operator sees why in
    the metric, /status and ``status``, and mail flows again by itself once space returns."""
    s = setup_factory(service_extra=POLL)
    raws = [message(i) for i in range(3)]
    with tmpfs(s.state_dir) as disk, running(s.config) as (_, log):
        base = endpoint_url(log)
        wait_until(lambda: cycles(base, "ok") >= 1, "a first cycle")
        disk.fill()
        s.dovecot.deliver_many(s.user, raws)
        failed = cycles(base, "failed")
        wait_until(lambda: cycles(base, "failed") >= failed + 3, "three failed cycles")
        assert s.received() == []
        assert value(scrape(base), "ledger_writable") == 0
        health = status_doc(base)["ledger"]
        assert health["writable"] is False
        assert "not writable" in health["error"]
        assert "is full: free space there" in health["error"]
        assert log.wait_for("no mail is handed to SMTP until a write to the ledger succeeds")
        capsys.readouterr()
        assert s.run("status") == 0  # its own proof, beside the service
        assert "LEDGER NOT WRITABLE: no mail is delivered." in capsys.readouterr().out

        disk.release()
        wait_until(lambda: len(s.received()) == 3 and not s.upstream(), "the mail, now")
        assert value(scrape(base), "ledger_writable") == 1
        assert status_doc(base)["ledger"]["writable"] is True
        assert log.wait_for("is writable again")
    assert delivered_ids(s) == Counter(raws)  # each exactly once


def test_run_whose_disk_fills_between_the_250_and_the_commit_delivers_it_once_in_all(
    setup_factory: Callable[..., Setup],
) -> None:
    """The disk fills inside Exchange's DATA, just before its ``250``: that message's row
    fails.  It is owed: no later cycle hands it to SMTP again (before: once per cycle), none
    sends anything while the disk is full, and once space returns its row is committed, it
    is DELEd, and the rest is delivered, each once."""
    s = setup_factory(service_extra=POLL)
    raws = [message(i) for i in range(3)]
    s.dovecot.deliver_many(s.user, raws)
    with tmpfs(s.state_dir) as disk:
        filled: list[bool] = []

        def exchange(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
            if stage == "data" and data is not None and not filled:
                filled.append(True)
                disk.fill()
            return None

        s.sink.handler.rule = exchange
        with running(s.config) as (_, log):
            base = endpoint_url(log)
            wait_until(lambda: cycles(base, "failed") >= 4, "four failed cycles")
            assert [strip_trace(m.data) for m in s.received()] == [raws[0]]
            assert len(s.upstream()) == 3
            health = status_doc(base)["ledger"]
            assert (health["writable"], health["unrecorded"]) == (False, 1)
            assert value(scrape(base), "ledger_writable") == 0

            disk.release()
            wait_until(lambda: not s.upstream() and len(s.received()) == 3, "the rest")
            assert log.wait_for("recorded 1 message(s) accepted by SMTP whose commit had failed")
            assert status_doc(base)["ledger"]["unrecorded"] == 0
    assert delivered_ids(s) == Counter(raws)


def test_run_on_a_file_system_gone_read_only_stops_and_names_what_it_owes(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    """ext4 remounts itself read-only after an error, right before a ``250``: that message
    is delivered once, no later cycle delivers anything, the error says what to check, and
    at a stop the one message it could not record is named (the next run delivers it again:
    the window README's "Delivery guarantee" names).  A new start exits 74 with one line."""
    s = setup_factory(service_extra=POLL)
    raws = [message(i) for i in range(2)]
    s.dovecot.deliver_many(s.user, raws)
    with ext4(s.state_dir) as fail:
        failed_fs: list[bool] = []

        def exchange(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
            if stage == "data" and data is not None and not failed_fs:
                failed_fs.append(True)
                fail()
            return None

        s.sink.handler.rule = exchange
        with running(s.config) as (proc, log):
            base = endpoint_url(log)
            wait_until(lambda: cycles(base, "failed") >= 3, "three failed cycles")
            assert [strip_trace(m.data) for m in s.received()] == [raws[0]]
            error = status_doc(base)["ledger"]["error"]
            assert "not writable" in error
            assert "went read-only after an error" in error or "mounted read-write" in error
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert log.wait_for("accepted by SMTP but not recorded")
            assert "it will be delivered again" in log.text()
        capsys.readouterr()
        assert s.run("once") == 74
        err = capsys.readouterr().err
        assert f"{s.state_dir}/lock not writable: cannot open the lock file: Read-only" in err
        assert "mounted read-write" in err
        assert "Traceback" not in err
    assert len(s.received()) == 1


# -- 4. the state directory at start: exit 74 and one line ------------------------------------


def test_once_on_a_full_state_dir_exits_74_at_start_and_1_mid_cycle(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    """Full at start: 74 and one line (before: 70 and a traceback).  Full between a ``250``
    and its commit: the cycle fails (exit 1) with the same kind of line, and so does the next
    ``once`` while the disk stays full, before any SMTP.  The first ``once`` ended with that
    row unrecorded, so once space returns the message is delivered again: the window README's
    "Delivery guarantee" names for a process that exits owing a row."""
    s = setup_factory()
    with tmpfs(s.state_dir) as disk:
        disk.fill()
        assert s.run("once") == 74  # no room for the lock file's pid
        err = capsys.readouterr().err
        assert "lock not writable: cannot write the lock file: No space left on device" in err
        assert f"the file system of {s.state_dir} is full: free space there" in err
        assert "Traceback" not in err
        disk.release()
        assert s.run("once") == 0  # creates the ledger

        s.dovecot.deliver_many(s.user, [message(1)])
        s.sink.handler.rule = lambda stage, env, data: disk.fill() if stage == "data" else None
        capsys.readouterr()
        assert s.run("once") == 1
        captured = capsys.readouterr()
        assert "info: FAILED: ledger" in captured.out
        assert "not writable: record delivered: database or disk is full [SQLITE_FULL]" in (
            captured.out
        )
        assert "is full: free space there" in captured.out
        assert "accepted by SMTP but not recorded" in captured.err
        s.sink.handler.rule = None
        assert s.run("once") == 1  # still full: the proof fails, nothing goes to SMTP
        out = capsys.readouterr().out
        # A few pages may be free (the last run's close gave some back): enough for the
        # heartbeat, not for the rows after it.
        assert "not writable: prove writable:" in out
        assert "bytes left on its file system; the ledger wants 1024 KiB of room" in out
        assert "is full: free space there" in out
        assert len(s.received()) == 1
        disk.release()
        assert s.run("once") == 0
    assert [strip_trace(m.data) for m in s.received()] == [message(1)] * 2


def test_once_with_a_read_only_state_dir_exits_74_with_one_line(
    setup_factory: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup_factory()
    s.state_dir.mkdir(mode=0o700)
    subprocess.run(["mount", "--bind", str(s.state_dir), str(s.state_dir)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(s.state_dir)], check=True)
        assert s.run("once") == 74
    finally:
        subprocess.run(["umount", "-l", str(s.state_dir)], check=True)
    err = capsys.readouterr().err
    assert "cannot open the lock file: Read-only file system; check that" in err
    assert "Traceback" not in err


def test_once_with_the_ledger_locked_by_another_process(
    setup_factory: Callable[..., Setup],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At start: exit 74 and one line after the busy timeout (shortened here).  Mid-cycle,
    when a dead letter is recorded: the cycle fails (exit 1), and the dead letter written
    just before is removed, so that the next cycle's is the only one (3. twin dead letters)."""
    monkeypatch.setattr(ledger_module, "BUSY_TIMEOUT_MS", 300)
    s = setup_factory()
    assert s.run("once") == 0  # creates the ledger
    holder = LockHolder(s.state_dir / "ledger.sqlite3")
    try:
        holder.lock()
        capsys.readouterr()
        assert s.run("once") == 74
        err = capsys.readouterr().err
        assert "not writable: open: database is locked [SQLITE_BUSY]" in err
        assert "another process held the write lock" in err
        assert "Traceback" not in err
        holder.unlock()

        refused = message(2, sender=SPAM)
        s.dovecot.deliver_many(s.user, [refused])

        def exchange(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
            if stage == "data" and envelope.mail_from == SPAM:
                holder.lock()  # held from before the dead letter is written to its commit
                return "554 5.1.0 Sender denied"
            return None

        s.sink.handler.rule = exchange
        assert s.run("once") == 1
        out = capsys.readouterr().out
        assert "not writable: record dead_lettered: database is locked [SQLITE_BUSY]" in out
        assert dead_letter_files(s) == []  # written, fsynced, then removed again
        assert len(s.upstream()) == 1
        holder.unlock()
        s.sink.handler.rule = lambda stage, env, data: (
            "554 5.1.0 Sender denied" if stage == "data" else None
        )
        assert s.run("once") == 0
    finally:
        holder.close()
    (only,) = s.dead_letters()
    assert only.endswith(refused)
    assert s.upstream() == []


# -- 3. a dead letter left by a killed run ------------------------------------------------------


def test_a_dead_letter_left_by_a_killed_run_is_matched_not_stored_twice(
    setup_factory: Callable[..., Setup],
) -> None:
    """A run killed between its dead letter's fsync and its commit leaves the file, and the
    message upstream: the next run's dead letter of it is that file (recorded now).  A dead
    letter of the same account and UIDL with other bytes (a UIDL the server gave again) is
    another message's and stays; partial files in tmp/ older than 36 hours are removed at
    start, younger ones kept."""
    s = setup_factory()
    refused = message(7, sender=SPAM)
    s.dovecot.deliver_many(s.user, [refused])
    s.sink.handler.rule = lambda stage, env, data: (
        "554 5.1.0 Sender denied" if stage == "data" else None
    )
    pop = poplib.POP3("127.0.0.1", s.dovecot.ports["pop3"], timeout=10)
    pop.user(s.user)
    pop.pass_(s.password)
    uidl = pop.uidl(1).split()[2].decode()
    pop.quit()

    store = MaildirStore(s.dead_letter_dir)
    when = datetime(2026, 11, 27, 15, 49, 35, tzinfo=UTC)
    info = DeadLetterInfo("info", uidl, "data", "554 5.1.0 Sender denied", when)
    orphan = run_loop(store.put(refused, info))  # as the killed run left it
    other = run_loop(store.put(message(99, sender=SPAM), info))
    now = time.time()
    stale, fresh = (
        s.dead_letter_dir / "tmp" / "1.M1P1Q1.stale",
        s.dead_letter_dir / "tmp" / "2.fresh",
    )
    for path, age in ((stale, STALE_TMP + 60), (fresh, 60.0)):
        path.write_bytes(b"X-POP3-Connector-Account: info\r\n")
        os.utime(path, (now - age, now - age))

    assert s.run("once") == 0
    assert s.upstream() == []
    names = sorted(p.name for p in (s.dead_letter_dir / "new").iterdir())
    assert names == sorted([orphan, other])  # no third file: the orphan was reused
    with s.ledger() as db:
        assert db.execute("SELECT dead_letter_id FROM messages").fetchall() == [(orphan,)]
    assert sorted(p.name for p in (s.dead_letter_dir / "tmp").iterdir()) == [fresh.name]
