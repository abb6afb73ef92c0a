"""connector.deadletter.maildir: what the Maildir store does beyond the contract every store
passes (tests/test_deadletter_contract.py): order, modes, fsyncs, short writes, read-only
directories, other Maildir readers, foreign files."""

from __future__ import annotations

import contextlib
import datetime as dt
import mailbox
import os
import resource
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connector.deadletter import (
    DeadLetterInfo,
    dead_letter_head,
    strip_dead_letter_headers,
)
from connector.deadletter.maildir import STALE_TMP, MaildirStore, unique_name
from connector.errors import DeadLetterError
from tests.component.test_cycle_lifecycle import mail
from tests.unit.test_spool import spooled

WHEN = dt.datetime(2026, 11, 27, 15, 49, 35, tzinfo=dt.UTC)
INFO = DeadLetterInfo("info", "00000001650a1b2c", "data", "554 5.1.0 Sender denied", WHEN)
MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody line\r\n.\r\n..dots\r\n"
EXPECTED_HEADERS = (
    b"X-POP3-Connector-Account: info\r\n"
    b"X-POP3-Connector-UIDL: 00000001650a1b2c\r\n"
    b"X-POP3-Connector-Stage: data\r\n"
    b"X-POP3-Connector-Response: 554 5.1.0 Sender denied\r\n"
    b"X-POP3-Connector-Failed-At: 2026-11-27T15:49:35Z\r\n"
)


def info(account: str = "info", uidl: str = "u1", minute: int = 0) -> DeadLetterInfo:
    return DeadLetterInfo(
        account, uidl, "data", "554 5.1.0 Sender denied", WHEN.replace(minute=minute)
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_maildir_lists_oldest_first_within_one_second(tmp_path: Path) -> None:
    """Failed-At has whole seconds; the names' microseconds and counter order the rest, as
    numbers (as strings, ``M123456`` sorts before ``M99`` and ``Q10`` before ``Q2``)."""
    store = MaildirStore(tmp_path / "dead-letters")
    names = [  # in the order they were stored, all in one second
        "1796643000.M99P7Q1R0a0a0a0a.host",
        "1796643000.M123456P7Q2R0a0a0a0a.host",
        "1796643000.M123456P7Q10R0a0a0a0a.host",
    ]
    for n, name in enumerate(names):
        stored = await store.put(MESSAGE, info(uidl=f"u{n}"))
        (store.path / "new" / stored).rename(store.path / "new" / name)
    assert [r.uidl for r in await store.list()] == ["u0", "u1", "u2"]
    assert sorted(names) == names[::-1]  # what a sort by the name alone gave


async def test_maildir_files_appear_only_in_new(tmp_path: Path) -> None:
    root = tmp_path / "dead-letters"
    id = await MaildirStore(root).put(MESSAGE, INFO)
    assert sorted(p.name for p in root.iterdir()) == ["cur", "new", "tmp"]
    assert [p.name for p in (root / "new").iterdir()] == [id]
    assert list((root / "tmp").iterdir()) == []
    assert list((root / "cur").iterdir()) == []
    assert {_mode(root / d) for d in ("", "tmp", "new", "cur")} == {0o700}
    assert _mode(root / "new" / id) == 0o600


async def test_maildir_fsyncs_the_file_before_and_new_after_the_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "dead-letters"
    store = MaildirStore(root)
    await store.put(b"first", INFO)  # creates the Maildir; the next put is the steady case
    events: list[tuple[str, str]] = []
    real_fsync, real_link, real_rename = os.fsync, os.link, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(src: str | Path, dst: str | Path) -> None:
        events.append(("link", str(dst)))
        real_link(src, dst)

    def rename(src: str | Path, dst: str | Path) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)
    id = await store.put(MESSAGE, INFO)

    new_dir = str((root / "new").resolve())
    assert events == [
        ("fsync", str((root / "tmp" / id).resolve())),
        ("link", str(root / "new" / id)),
        ("fsync", new_dir),
    ]


async def test_maildir_never_leaves_a_half_written_file(tmp_path: Path) -> None:
    # A real short write: the kernel refuses to grow any file past RLIMIT_FSIZE (EFBIG), as a
    # full disk would (ENOSPC), even for root.
    root = tmp_path / "dead-letters"
    store = MaildirStore(root)
    await store.put(b"small", INFO)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(DeadLetterError) as caught:
            await store.put(b"x" * 1_000_000, INFO)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert caught.value.store == f"maildir:{root}"
    assert caught.value.reason == "cannot write the file: File too large [EFBIG]"
    assert len(list((root / "new").iterdir())) == 1  # only the first message
    assert list((root / "tmp").iterdir()) == []  # the partial file was removed


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory outside pytest's private tmp tree, so that "nobody" can reach into it."""
    base = Path(tempfile.mkdtemp(prefix="deadletter-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for path in (base, *base.rglob("*")):
            if path.is_dir():
                path.chmod(0o700)
        shutil.rmtree(base)


@contextlib.contextmanager
def without_privileges() -> Iterator[None]:
    """Run the block unable to bypass file modes: as root, with effective uid "nobody".

    The real uid stays 0, which is what allows switching back.
    """
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


async def test_maildir_in_a_read_only_directory_is_a_dead_letter_error(shared_dir: Path) -> None:
    read_only = shared_dir / "ro"
    read_only.mkdir(mode=0o555)
    read_only.chmod(0o555)
    store = MaildirStore(read_only / "dead-letters")
    with without_privileges(), pytest.raises(DeadLetterError) as caught:
        await store.put(MESSAGE, INFO)
    assert caught.value.store == f"maildir:{read_only / 'dead-letters'}"
    assert caught.value.reason == "cannot create the Maildir: Permission denied [EACCES]"
    assert not (read_only / "dead-letters").exists()


async def test_maildir_with_a_read_only_new_is_a_dead_letter_error(shared_dir: Path) -> None:
    root = shared_dir / "dead-letters"
    for sub, mode in (("", 0o777), ("tmp", 0o777), ("cur", 0o777), ("new", 0o555)):
        (root / sub).mkdir()
        (root / sub).chmod(mode)
    with without_privileges(), pytest.raises(DeadLetterError) as caught:
        await MaildirStore(root).put(MESSAGE, INFO)
    assert caught.value.reason == "cannot move the file into new/: Permission denied [EACCES]"
    assert list((root / "tmp").iterdir()) == []  # the tmp/ file was cleaned up
    assert list((root / "new").iterdir()) == []


async def test_maildir_is_readable_by_pythons_mailbox_and_a_client_moving_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "dead-letters"
    store = MaildirStore(root)
    id = await store.put(MESSAGE, INFO)

    md = mailbox.Maildir(root, factory=None, create=False)
    assert md.keys() == [id]
    assert md.get_bytes(id) == EXPECTED_HEADERS + MESSAGE
    message = md[id]
    assert message["X-POP3-Connector-Response"] == "554 5.1.0 Sender denied"
    assert message["Subject"] == "hi"

    # A mail client marks it seen: new/<id> -> cur/<id>:2,S.  It is still the same dead letter.
    (root / "new" / id).rename(root / "cur" / f"{id}:2,S")
    assert [r.id for r in await store.list()] == [id]
    assert strip_dead_letter_headers(await store.get(id)) == MESSAGE
    await store.remove(id)
    assert list((root / "cur").iterdir()) == []


async def test_maildir_skips_foreign_files_and_refuses_path_ids(tmp_path: Path) -> None:
    root = tmp_path / "dead-letters"
    store = MaildirStore(root)
    id = await store.put(MESSAGE, INFO)
    (root / "new" / "1.foreign.host").write_bytes(b"Subject: not ours\r\n\r\n")
    assert [r.id for r in await store.list()] == [id]
    for bad in ("", "../new/" + id, "." + id, f"{id}:2,S", "a\0b"):
        with pytest.raises(KeyError):
            await store.get(bad)


def test_unique_names_differ() -> None:
    names = {unique_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all(":" not in n and "/" not in n for n in names)


# -- the Maildir's tmp/ -------------------------------------------------------------------------


def _info(uidl: str, recipients: tuple[str, ...] = (), account: str = "info") -> DeadLetterInfo:
    return DeadLetterInfo(
        account, uidl, "data", "554 5.1.0 Sender denied", datetime(2026, 1, 2, tzinfo=UTC),
        recipients,
    )  # fmt: skip


async def test_partial_files_in_tmp_older_than_36_hours_are_removed(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "dead")
    assert await store.remove_stale_tmp() == 0  # no Maildir yet
    await store.put(mail(1), _info("u1"))
    tmp = store.path / "tmp"
    now = time.time()
    old, young = tmp / "1.M1P1Q1.host", tmp / "2.M2P2Q2.host"
    for path, age in ((old, STALE_TMP + 60), (young, STALE_TMP - 3600)):
        path.write_bytes(b"X-POP3-Connector-Account: info\r\n")  # a write that died
        os.utime(path, (now - age, now - age))
    assert await store.remove_stale_tmp() == 1
    assert sorted(p.name for p in tmp.iterdir()) == [young.name]
    assert len(await store.list()) == 1  # what is in new/ is untouched


# -- a spooled message (docs/design.md §5.3) ------------------------------------------------

# Lines starting with ".", a bare LF, a lone CR, a NUL, a 200,000-character line and no final
# line end: the copy is the spool file's octets after our header lines.
LONG_LINE = b"Subject: long line\r\n\r\n" + b"A" * 200_000 + b"\r\n.after\r\n" + b"A" * 200_000
SPOOLED_RAW = (
    b"Subject: awkward\r\n\r\n.\r\n..\r\n.x\r\nbare LF\n.dot\n"
    + LONG_LINE
    + b"\rlone CR\0NUL\r\nno final newline"
)


async def test_the_maildir_store_copies_a_spooled_message_byte_for_byte(tmp_path: Path) -> None:
    message = await spooled(tmp_path, SPOOLED_RAW)
    store = MaildirStore(tmp_path / "dead-letters")
    id = await store.put(message, INFO)
    stored = await store.get(id)
    assert stored == dead_letter_head(message, INFO) + SPOOLED_RAW
    assert b"".join([c async for c in store.chunks(id)]) == stored
    assert message.path.read_bytes() == SPOOLED_RAW  # copied, not moved: the cycle removes it
