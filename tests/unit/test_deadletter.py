"""Dead-letter stores: one contract every store passes, Maildir specifics, the header helpers."""

from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.policy
import mailbox
import os
import resource
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.deadletter import (
    DeadLetterArchive,
    DeadLetterInfo,
    dead_letter_headers,
    parse_dead_letter_headers,
    strip_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.deadletter.maildir import MaildirStore, unique_name
from connector.errors import DeadLetterError
from tests.fakes import InMemoryDeadLetterStore

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


# ============================================================================================
# The contract: every DeadLetterArchive
# ============================================================================================


@pytest.fixture(params=["maildir", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> DeadLetterArchive:
    if request.param == "maildir":
        return MaildirStore(tmp_path / "dead-letters")
    return InMemoryDeadLetterStore()


async def test_put_get_keeps_the_bytes_after_our_headers(store: DeadLetterArchive) -> None:
    raw = MESSAGE + bytes(range(256)) + b"\rlone CR\nlone LF\r\n" + b"x" * 100_000
    id = await store.put(raw, INFO)
    stored = await store.get(id)
    assert stored == EXPECTED_HEADERS + raw
    assert strip_dead_letter_headers(stored) == raw


async def test_list_and_count(store: DeadLetterArchive) -> None:
    assert await store.list() == []
    assert await store.count_by_account() == {}
    later = await store.put(b"Subject: 2\r\n\r\n", info("info", "u2", minute=50))
    earlier = await store.put(MESSAGE, info("info", "u1", minute=10))
    other = await store.put(b"", info("sales", "s1", minute=30))
    assert len({later, earlier, other}) == 3

    records = await store.list()
    assert [(r.id, r.account, r.uidl) for r in records] == [
        (earlier, "info", "u1"),
        (other, "sales", "s1"),
        (later, "info", "u2"),
    ]
    first = records[0]
    assert (first.stage, first.response) == ("data", "554 5.1.0 Sender denied")
    assert first.failed_at == WHEN.replace(minute=10)
    assert first.size == len(MESSAGE)
    assert records[1].size == 0
    assert await store.count_by_account() == {"info": 2, "sales": 1}


async def test_remove_and_unknown_ids(store: DeadLetterArchive) -> None:
    id = await store.put(MESSAGE, INFO)
    keep = await store.put(MESSAGE, info(uidl="u2"))
    await store.remove(id)
    assert [r.id for r in await store.list()] == [keep]
    with pytest.raises(KeyError):
        await store.get(id)
    with pytest.raises(KeyError):
        await store.remove(id)
    with pytest.raises(KeyError):
        await store.get("no-such-id")


async def test_sanitised_values_are_listed_as_written(store: DeadLetterArchive) -> None:
    await store.put(MESSAGE, DeadLetterInfo("info", "u1", "data", "550\r\n  spam\tdetected", WHEN))
    (record,) = await store.list()
    assert record.response == "550 spam detected"


# ============================================================================================
# Maildir specifics
# ============================================================================================


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


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


async def test_fake_put_failure_switch() -> None:
    store = InMemoryDeadLetterStore()
    store.fail_put = True
    with pytest.raises(DeadLetterError):
        await store.put(MESSAGE, INFO)
    assert store.put_calls == 1
    assert await store.list() == []


# ============================================================================================
# Header helpers
# ============================================================================================


def test_headers_for_a_crlf_message() -> None:
    assert with_dead_letter_headers(MESSAGE, INFO) == EXPECTED_HEADERS + MESSAGE


def test_headers_for_an_lf_message() -> None:
    raw = MESSAGE.replace(b"\r\n", b"\n")
    assert with_dead_letter_headers(raw, INFO) == EXPECTED_HEADERS.replace(b"\r\n", b"\n") + raw


@pytest.mark.parametrize("raw", [b".", b"", b"\r\n", b"\n\nbody"])
def test_headers_for_degenerate_messages(raw: bytes) -> None:
    wrapped = with_dead_letter_headers(raw, INFO)
    eol = b"\r\n" if raw.startswith(b"\r\n") else b"\n"
    assert wrapped == EXPECTED_HEADERS.replace(b"\r\n", eol) + raw
    assert strip_dead_letter_headers(wrapped) == raw


def test_header_injection_is_impossible() -> None:
    evil = DeadLetterInfo(
        account="info\r\nBcc: victim@example.org",
        uidl="u1\nX-Injected: 1",
        stage="data\r",
        response="554 denied\r\n\r\nfake body\r\n.\r\nMAIL FROM:<x>",
        failed_at=WHEN,
    )
    wrapped = with_dead_letter_headers(MESSAGE, evil)
    block = wrapped[: -len(MESSAGE)]
    assert block.count(b"\n") == 5
    assert block.count(b"\r") == 5
    parsed = email.message_from_bytes(wrapped, policy=email.policy.default)
    assert parsed["Bcc"] is None
    assert parsed["X-Injected"] is None
    assert parsed["X-POP3-Connector-Account"] == "info Bcc: victim@example.org"
    assert parsed["X-POP3-Connector-Response"] == "554 denied fake body . MAIL FROM:<x>"
    assert parsed["Subject"] == "hi"
    assert strip_dead_letter_headers(wrapped) == MESSAGE


def test_values_become_printable_ascii() -> None:
    odd = DeadLetterInfo("café\x00\x7f", "u\u2028v", "data", "550 \U0001f4a9\t too   big ", WHEN)
    block = dead_letter_headers(odd, b"\n")
    assert block.splitlines()[0] == b"X-POP3-Connector-Account: caf\\xe9\\x00\\x7f"
    assert block.splitlines()[1] == b"X-POP3-Connector-UIDL: u v"
    assert block.splitlines()[3] == b"X-POP3-Connector-Response: 550 \\U0001f4a9 too big"


def test_long_values_are_cut_to_the_line_limit() -> None:
    block = dead_letter_headers(DeadLetterInfo("a", "u", "data", "5" * 5000, WHEN), b"\r\n")
    assert max(len(line) for line in block.split(b"\r\n")) <= 998  # RFC 5322 §2.1.1
    assert block.split(b"\r\n")[3].endswith(b"...")


def test_failed_at_is_utc_and_must_be_aware() -> None:
    plus_one = dt.timezone(dt.timedelta(hours=1))
    local = DeadLetterInfo(
        "a", "u", "data", "554", dt.datetime(2026, 11, 27, 16, 49, 35, tzinfo=plus_one)
    )
    assert dead_letter_headers(local, b"\n").endswith(b"Failed-At: 2026-11-27T15:49:35Z\n")
    naive = DeadLetterInfo("a", "u", "data", "554", dt.datetime(2026, 11, 27, 15, 49, 35))
    with pytest.raises(ValueError, match="timezone-aware"):
        dead_letter_headers(naive, b"\n")


def test_strip_leaves_other_messages_alone() -> None:
    assert strip_dead_letter_headers(MESSAGE) == MESSAGE
    # Only the five lines in our order are ours: a message starting with one of them keeps it.
    own = b"X-POP3-Connector-Account: someone\r\n" + MESSAGE
    assert strip_dead_letter_headers(own) == own
    # Dead-lettered twice (requeued, refused again): one strip undoes one wrap.
    twice = with_dead_letter_headers(with_dead_letter_headers(MESSAGE, INFO), info("x"))
    assert strip_dead_letter_headers(twice) == with_dead_letter_headers(MESSAGE, INFO)


def test_parse_needs_all_five_lines() -> None:
    wrapped = with_dead_letter_headers(MESSAGE, INFO)
    assert parse_dead_letter_headers(wrapped) == (INFO, len(EXPECTED_HEADERS))
    assert parse_dead_letter_headers(MESSAGE) is None
    assert parse_dead_letter_headers(wrapped.replace(b"2026-11-27T", b"2026-13-27T")) is None
    assert parse_dead_letter_headers(EXPECTED_HEADERS[:-60]) is None


@given(
    raw=st.binary(max_size=2000),
    values=st.tuples(st.text(), st.text(), st.text(), st.text()),
    when=st.datetimes(min_value=dt.datetime(1970, 1, 1), timezones=st.just(dt.UTC)),
)
def test_strip_undoes_with_for_any_bytes(
    raw: bytes, values: tuple[str, str, str, str], when: dt.datetime
) -> None:
    dl_info = DeadLetterInfo(*values, failed_at=when)
    wrapped = with_dead_letter_headers(raw, dl_info)
    assert wrapped.endswith(raw)
    assert strip_dead_letter_headers(wrapped) == raw
    head = wrapped[: len(wrapped) - len(raw)]
    lines = head.splitlines()
    assert len(lines) == 5
    assert all(all(0x20 <= b < 0x7F for b in line) for line in lines)
    parsed = parse_dead_letter_headers(wrapped)
    assert parsed is not None
    assert parsed[1] == len(head)
    assert parsed[0].failed_at == when.replace(microsecond=0)
