"""The spool (connector/spool.py): what a writer records must be what the whole message says,
its files are owner-only and go when asked, a start removes what a killed run left
(docs/design.md §5.3).  DATA's content read from a spool file: tests/unit/test_smtp_content.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import connector.spool
from connector import headers
from connector.cycle.identity import duplicate_key
from connector.deadletter import message_eol
from connector.errors import StateError
from connector.spool import HEAD, Spool, Spooled

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


async def spool_bytes(
    spool: Spool, data: bytes, cuts: list[int], *, prefix: bytes = b"", digest: bool = True
) -> Spooled:
    writer = spool.writer(digest_body=digest)
    pos = 0
    for cut in [*cuts, len(data)]:
        if pos < len(data):
            await writer.write(data[pos : pos + max(cut, 1)])
            pos += max(cut, 1)
    return await writer.finish(prefix)


async def spooled(directory: Path, raw: bytes) -> Spooled:
    """``raw`` in a spool file under ``directory`` (created), written 100,000 octets at a time:
    a message as the POP3 client leaves it for the cycle and the dead-letter stores."""
    os.makedirs(directory, exist_ok=True)
    spool = Spool(directory / "spool")
    spool.clean()
    writer = spool.writer()
    for i in range(0, len(raw), 100_000):
        await writer.write(raw[i : i + 100_000])
    return await writer.finish()


def lone_line_ends(raw: bytes) -> int:
    return raw.count(b"\r") + raw.count(b"\n") - 2 * raw.count(b"\r\n")


def check_description(spooled: Spooled, raw: bytes) -> None:
    assert spooled.path.read_bytes() == raw
    assert spooled.size == len(raw)
    assert spooled.head == raw[:HEAD]
    assert headers.header_digest(spooled.head) == headers.header_digest(raw)
    assert duplicate_key("<m@x>", spooled) == duplicate_key("<m@x>", raw)
    assert spooled.ascii == raw.isascii()
    assert spooled.lone == lone_line_ends(raw)
    assert spooled.last == raw[-1:]
    assert spooled.eol == message_eol(raw)


messages_st = st.lists(
    st.sampled_from(
        [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n", b"To: x", b"\xe4", b".", b"body", b"\0"]
    ),
    max_size=40,
).map(b"".join)


@settings(PROFILE, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=messages_st, cuts=st.lists(st.integers(1, 7), max_size=20), prefix=st.booleans())
async def test_a_writer_records_what_the_whole_message_says(
    tmp_path: Path, raw: bytes, cuts: list[int], prefix: bool
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.clean()
    spooled = await spool_bytes(spool, raw, cuts, prefix=b"." if prefix else b"")
    check_description(spooled, b"." + raw if prefix else raw)
    spooled.remove()
    assert list(spool.directory.iterdir()) == []


async def test_the_body_digest_starts_after_a_header_block_longer_than_a_chunk(
    tmp_path: Path,
) -> None:
    # The header block ends past the first writes, and the head (MAX_HEADER_BLOCK + 1)
    # is complete in the middle of one: the digest must still be of the body alone.
    for header_len in (100, HEAD - 10, HEAD - 2, HEAD + 50):
        raw = b"X: " + b"h" * header_len + b"\r\n\r\n" + os.urandom(3 * HEAD)
        spool = Spool(tmp_path / f"s{header_len}")
        spool.clean()
        spooled = await spool_bytes(spool, raw, [1000] * 50 + [HEAD])
        check_description(spooled, raw)
        found = headers.bounds(raw)
        body = raw[found[1] :] if found is not None else raw
        assert spooled.body_digest == hashlib.sha256(body).hexdigest()


async def test_no_digest_unless_asked_and_files_are_owner_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.clean()
    spooled = await spool_bytes(spool, b"To: x\r\n\r\nbody\r\n", [], digest=False)
    assert spooled.body_digest is None
    with pytest.raises(ValueError, match="digest"):
        duplicate_key("<m@x>", spooled)
    assert stat.S_IMODE(spooled.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    assert [chunk async for chunk in spooled.chunks(4)] == [b"To: ", b"x\r\n\r", b"\nbod", b"y\r\n"]


async def test_a_start_removes_what_a_killed_run_left_and_a_discard_leaves_nothing(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.clean()
    left = spool.writer()
    await left.write(b"half a message")  # killed here: never finished nor discarded
    (spool.directory / "stray").write_bytes(b"x")
    gone = spool.writer()
    await gone.write(b"abandoned")
    gone.discard()
    gone.discard()  # twice is fine (a cancellation after an error)
    assert len(list(spool.directory.iterdir())) == 2
    assert Spool(spool.directory).clean() == 2
    assert list(spool.directory.iterdir()) == []


@contextlib.contextmanager
def worker_threads() -> Iterator[ThreadPoolExecutor]:
    """The loop's default executor (asyncio.to_thread's), whose threads' end a test can wait
    for (``shutdown``): two, one held by the spool writer, one for the test's own waits."""
    executor = ThreadPoolExecutor(2)
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True)


def fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


async def test_a_discard_while_the_thread_creates_the_file_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancelled while write()'s thread is inside mkstemp: discard() ran before the thread
    # set _fd and _path, and the file it then created stayed until the next start.
    entered, proceed = threading.Event(), threading.Event()
    made: list[tuple[int, str]] = []
    real = tempfile.mkstemp

    def slow_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        entered.set()
        assert proceed.wait(10)
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkstemp", slow_mkstemp)  # connector.spool's too
    spool = Spool(tmp_path)
    with worker_threads() as executor:
        writer = spool.writer()
        task = asyncio.create_task(writer.write(b"message bytes"))
        assert await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        writer.discard()  # what ImapClient._read_spooled and Pop3Client._spool do
        proceed.set()
        executor.shutdown(wait=True)  # the thread has finished
    ((fd, name),) = made
    assert os.listdir(tmp_path) == []
    assert fd_path(fd) != name  # closed (the number may be someone else's by now)


async def test_a_discard_never_closes_a_descriptor_the_thread_still_writes_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closing it under the thread's feet would let the thread write into whatever file the
    # process opens next under the same number (the ledger's, say).
    entered, proceed = threading.Event(), threading.Event()
    real = connector.spool._write_all

    def slow_write_all(fd: int, data: bytes) -> None:
        entered.set()
        assert proceed.wait(10)
        real(fd, data)

    spool = Spool(tmp_path)
    with worker_threads() as executor:
        writer = spool.writer()
        await writer.write(b"first chunk")  # the file exists
        (name,) = os.listdir(tmp_path)
        path = tmp_path / name
        monkeypatch.setattr(connector.spool, "_write_all", slow_write_all)
        task = asyncio.create_task(writer.write(b"second chunk"))
        assert await asyncio.to_thread(entered.wait, 10)
        fd = writer._fd
        assert fd is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        writer.discard()
        assert fd_path(fd) == str(path)  # still the thread's
        with pytest.raises(StateError, match="discarded"):
            await writer.write(b"more")  # nothing more is written to a discarded writer
        proceed.set()
        executor.shutdown(wait=True)
    assert os.listdir(tmp_path) == []
    assert fd_path(fd) != str(path)


async def test_a_spool_that_cannot_be_written_is_a_state_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "missing" / "spool")  # no parent: mkdir fails
    with pytest.raises(StateError, match="spool"):
        spool.clean()
    with pytest.raises(StateError, match="cannot create a spool file"):
        await spool.writer().write(b"x")
