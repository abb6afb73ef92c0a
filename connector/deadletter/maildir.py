"""The Maildir dead-letter store (docs/design.md §7.2, the default): one file per dead letter.

Delivery follows the Maildir specification (https://cr.yp.to/proto/maildir.html): write the
file under ``tmp/`` with a unique name, fsync it, hard-link it into ``new/`` (a link, unlike a
rename, never replaces an existing file), remove the ``tmp/`` name.  Then one step both
``mailbox.Maildir.add`` and getmail6 skip: fsync the ``new/`` directory.  Without it a power
loss can lose the directory entry although the file's data is on disk, and the message has
been deleted upstream by then (docs/design.md §5.1 step 4 demands "file and directory
fsynced").  A reader therefore only ever sees complete files, and only in ``new/`` (or
``cur/``, once a mail client has seen them).

All filesystem work runs in a worker thread (``asyncio.to_thread``, docs/design.md §10.1).  Every
``OSError`` becomes :class:`~connector.errors.DeadLetterError`, whose text names the store and
the errno, never the message.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import errno
import io
import itertools
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from connector.deadletter import (
    HEADER_BLOCK_MAX,
    DeadLetterInfo,
    DeadLetterRecord,
    dead_letter_head,
    header_block_continues,
    parse_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.errors import DeadLetterError
from connector.spool import READ_CHUNK, Spooled

log = logging.getLogger(__name__)

_SUBDIRS: Final = ("tmp", "new", "cur")
STALE_TMP: Final = 36 * 3600.0
"""A file in ``tmp/`` untouched this long is a write that died (a kill, a power cut) and is
removed at start: the age the Maildir documents give (qmail's maildir(5): not accessed in 36
hours; Courier's: "at least 36 hours old").  No write of ours takes that long."""
# The Maildir spec's per-process delivery counter (the "Q" part of a unique name).
_counter: Final = itertools.count(1)
# link() fails this way on filesystems without hard links; the spec allows rename() there.
_NO_HARD_LINKS: Final = frozenset({errno.EPERM, errno.EOPNOTSUPP})


def _hostname() -> str:
    # Maildir spec: "/" and ":" in the host name are written as \057 and \072.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")


def unique_name() -> str:
    """A Maildir unique name: ``<sec>.M<usec>P<pid>Q<counter>R<random>.<host>``.

    Time, pid and a per-process counter make it unique on this host (the spec's modern form);
    the random part also covers a pid reused within the same microsecond after a restart.
    """
    now = time.time_ns() // 1000
    sec, usec = divmod(now, 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(4)}.{_hostname()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_file(spooled: Spooled, fd: int) -> None:
    """Append a spool file to ``fd``, a chunk at a time; its size must not have changed (it
    is ours, so a difference is a bug or a tampered state directory: refuse to store it)."""
    copied = 0
    with open(spooled.path, "rb", buffering=0) as src:
        while data := src.read(READ_CHUNK):
            _write_all(fd, data)
            copied += len(data)
    if copied != spooled.size:
        raise OSError(errno.EIO, f"spool file holds {copied} octets, not {spooled.size}")


class MaildirStore:
    """Dead letters as files in a Maildir at ``path``, readable by any mail client.

    The Maildir (``tmp``, ``new``, ``cur``, mode 0700) is created on the first ``put``; files
    are mode 0600, since they hold other people's mail.  The id of a dead letter is its unique
    file name without the ``:2,...`` info suffix a mail client may add in ``cur/``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store_name = f"maildir:{path}"
        self._ready = False

    def __repr__(self) -> str:
        return f"MaildirStore({str(self.path)!r})"

    # -- the DeadLetterStore protocol ----------------------------------------------------------

    async def put(self, raw: bytes | Spooled, info: DeadLetterInfo) -> str:
        """Store ``raw`` with our header lines durably; return its id.  Raises DeadLetterError.
        A spooled message is copied from its file, a chunk at a time."""
        return await asyncio.to_thread(self._put, raw, info)

    async def chunks(self, id: str, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The stored bytes (our header lines, then the original) ``size`` at a time, never
        all at once.  Unknown id: KeyError."""
        f = await asyncio.to_thread(self._open, id)
        try:
            while True:
                try:
                    data = await asyncio.to_thread(f.read, size)
                except OSError as exc:
                    raise self._error(f"cannot read {id}", exc) from exc
                if not data:
                    return
                yield data
        finally:
            f.close()

    async def list(self) -> builtins.list[DeadLetterRecord]:
        """Every dead letter in ``new/`` and ``cur/``, oldest first; reads only header lines.

        Files without our five header lines (something else put them there) are skipped.
        """
        return await asyncio.to_thread(self._list)

    async def get(self, id: str) -> bytes:
        """The stored bytes (our header lines, then the original).  Unknown id: KeyError."""
        return await asyncio.to_thread(self._get, id)

    async def remove(self, id: str) -> None:
        """Delete the dead letter ``id``.  Unknown id: KeyError."""
        await asyncio.to_thread(self._remove, id)

    async def count_by_account(self) -> dict[str, int]:
        """Number of dead letters per account."""
        records = await self.list()
        return dict(collections.Counter(r.account for r in records))

    async def remove_stale_tmp(self, *, older_than: float = STALE_TMP) -> int:
        """Remove the files in ``tmp/`` neither read nor written for ``older_than`` seconds
        (see :data:`STALE_TMP`); return how many.  A missing Maildir has none."""
        return await asyncio.to_thread(self._remove_stale_tmp, older_than)

    # -- worker-thread side --------------------------------------------------------------------

    def _error(self, what: str, exc: OSError) -> DeadLetterError:
        # Errno text only: an OSError's str() could carry a path, never message bytes, but we
        # keep the reason short and uniform.
        code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else ""
        reason = f"{what}: {exc.strerror or type(exc).__name__}"
        return DeadLetterError(self.store_name, f"{reason} [{code}]" if code else reason)

    def _ensure_maildir(self) -> None:
        if self._ready:
            return
        created = False
        for sub in ("", *_SUBDIRS):
            directory = self.path / sub
            try:
                directory.mkdir(mode=0o700, parents=not sub)
            except FileExistsError:
                continue
            created = True
        if created:
            # Make the new directories' entries durable too, or a crash could lose new/ itself.
            _fsync_dir(self.path)
            _fsync_dir(self.path.parent)
        self._ready = True

    def _put(self, raw: bytes | Spooled, info: DeadLetterInfo) -> str:
        data = with_dead_letter_headers(raw, info) if isinstance(raw, bytes) else None
        try:
            self._ensure_maildir()
        except OSError as exc:
            raise self._error("cannot create the Maildir", exc) from exc
        name = unique_name()
        tmp = self.path / "tmp" / name
        new = self.path / "new" / name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._ready = False  # maybe the Maildir was removed under us: re-create next time
            raise self._error("cannot create a file in tmp/", exc) from exc
        stage = "cannot write the file"
        try:
            try:
                if data is not None:
                    _write_all(fd, data)
                else:
                    assert isinstance(raw, Spooled)  # noqa: S101 - data is None only then
                    _write_all(fd, dead_letter_head(raw, info))
                    stage = "cannot copy the spool file"
                    _copy_file(raw, fd)
                    stage = "cannot write the file"
                os.fsync(fd)
            finally:
                os.close(fd)
            stage = "cannot move the file into new/"
            try:
                os.link(tmp, new)
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                os.rename(tmp, new)
            else:
                try:
                    os.unlink(tmp)
                except OSError as exc:
                    # Harmless: the message is in new/; readers clean stale tmp/ files.
                    log.warning("dead letter %s: cannot remove tmp/ copy: %s", name, exc.strerror)
            stage = "cannot sync new/"
            _fsync_dir(self.path / "new")
        except OSError as exc:
            # Not durable, so not stored: leave no trace, the message stays upstream and the
            # next cycle tries again (a duplicate at worst, never a loss).
            for leftover in (tmp, new) if stage == "cannot sync new/" else (tmp,):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            raise self._error(stage, exc) from exc
        log.debug("dead letter %s stored in %s", name, self.path)
        return name

    def _remove_stale_tmp(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        removed = 0
        try:
            with os.scandir(self.path / "tmp") as it:
                entries = list(it)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise self._error("cannot read tmp/", exc) from exc
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                touched = max(st.st_atime, st.st_mtime)
                if not entry.is_file(follow_symlinks=False) or touched > cutoff:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning(
                    "%s: cannot remove tmp/%s: %s", self.store_name, entry.name, exc.strerror
                )
                continue
            removed += 1
            log.info("%s: removed tmp/%s, a write that never finished", self.store_name, entry.name)
        return removed

    def _locate(self, id: str) -> Path:
        # An id comes from the command line: refuse anything that is not a plain file name.
        if not id or id.startswith(".") or any(c in id for c in "/:\0"):
            raise KeyError(id)
        candidate = self.path / "new" / id
        if candidate.is_file():
            return candidate
        try:
            with os.scandir(self.path / "cur") as entries:
                for entry in entries:
                    if entry.name == id or entry.name.startswith(id + ":"):
                        return Path(entry.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error("cannot read cur/", exc) from exc
        raise KeyError(id)

    def _open(self, id: str) -> io.BufferedReader:
        for _ in range(2):  # as _get: a mail client may move the file meanwhile
            path = self._locate(id)
            try:
                return open(path, "rb")
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._error(f"cannot read {id}", exc) from exc
        raise KeyError(id)

    def _get(self, id: str) -> bytes:
        # Two tries: a mail client may move the file from new/ to cur/ between look-up and open.
        for _ in range(2):
            path = self._locate(id)
            try:
                return path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._error(f"cannot read {id}", exc) from exc
        raise KeyError(id)

    def _remove(self, id: str) -> None:
        for _ in range(2):
            path = self._locate(id)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._error(f"cannot remove {id}", exc) from exc
            return
        raise KeyError(id)

    def _list(self) -> builtins.list[DeadLetterRecord]:
        records: builtins.list[DeadLetterRecord] = []
        # new/ before cur/: a file a client moves meanwhile is then seen in one of them.
        for sub in ("new", "cur"):
            try:
                with os.scandir(self.path / sub) as it:
                    entries = [e for e in it if not e.name.startswith(".")]
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._error(f"cannot read {sub}/", exc) from exc
            for entry in entries:
                record = self._read_record(entry)
                if record is not None:
                    records.append(record)
        # Failed-At has whole seconds; within one, the time in the file's name (ours, from
        # unique_name: seconds, microseconds, then a counter) keeps the order they were stored.
        records.sort(key=lambda r: (r.failed_at, _name_order(r.id), r.id))
        return records

    def _read_record(self, entry: os.DirEntry[str]) -> DeadLetterRecord | None:
        try:
            with open(entry.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(HEADER_BLOCK_MAX)
                if header_block_continues(head):
                    head += f.read()  # a long Recipients field: our lines go on past the head
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as exc:
            raise self._error(f"cannot read {entry.name}", exc) from exc
        parsed = parse_dead_letter_headers(head)
        if parsed is None:
            log.warning("%s: %s is not a dead letter of ours, skipped", self.store_name, entry.name)
            return None
        info, header_len = parsed
        return DeadLetterRecord(
            id=entry.name.split(":", 1)[0],
            account=info.account,
            uidl=info.uidl,
            stage=info.stage,
            response=info.response,
            failed_at=info.failed_at,
            size=size - header_len,
        )


# The time and counter at the start of a name from unique_name: "<sec>.M<usec>P<pid>Q<n>...".
_NAME_ORDER: Final = re.compile(r"(\d{1,20})\.M(\d{1,6})P\d{1,10}Q(\d{1,20})")


def _name_order(name: str) -> tuple[int, int, int]:
    """When a file named by :func:`unique_name` was stored, as numbers (a plain string sort
    puts ``M123456`` before ``M99``); (0, 0, 0) for a name of another form."""
    m = _NAME_ORDER.match(name)
    return (int(m[1]), int(m[2]), int(m[3])) if m else (0, 0, 0)


__all__ = ["STALE_TMP", "MaildirStore", "unique_name"]
