"""Large messages in files under ``<state_dir>/spool/`` instead of memory (docs/design.md §5.3).

A message whose ``LIST`` size is above ``[service] spool_threshold`` is streamed by RETR into a
spool file (:class:`SpoolWriter`, fed by the POP3 client chunk by chunk) and handled from there:
DATA reads it back in chunks, the dead-letter stores copy it.  What the cycle needs to know
about the message without reading it again is gathered while it is written, in one pass over
each chunk (:class:`Spooled`): the header block's first octets (everything ``connector.headers``
ever reads), the digest of the body a shared mailbox's duplicate key needs (when asked for),
whether it is all ASCII (``BODY=8BITMIME``), how many CR and LF octets are not in a CRLF pair
(SMTP's normalised size and form), its last octet and its first line's line end.

No fsync: a spool file is never the only copy of anything.  The message is still upstream until
the ledger records it delivered or dead-lettered, and a dead letter is a fsynced copy in the
store, not the spool file.  Files are created owner-only (``mkstemp``: 0600) in a directory
that is 0700, since they hold other people's mail.  Each file is removed once its message is
handled (or abandoned); a file left by a kill is removed at the next start (:meth:`Spool.clean`,
before any cycle runs: one instance per state directory holds the lock, so nothing else writes
there).

File work runs in worker threads (``asyncio.to_thread``, docs/design.md §10.1); an ``OSError``
becomes :class:`~connector.errors.StateError` naming the spool directory and the errno, never
the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from connector import headers
from connector.errors import StateError

__all__ = ["HEAD", "READ_CHUNK", "Spool", "SpoolWriter", "Spooled", "head_of", "size_of"]

log = logging.getLogger(__name__)

HEAD: Final = headers.MAX_HEADER_BLOCK + 1
"""Octets of a spooled message kept in memory: the most any header reader looks at, plus one
octet so that a reader can tell a longer message from one that ends there
(``headers.read``'s ``complete``)."""

READ_CHUNK: Final = 256 * 1024
"""Octets read from a spool file at a time (DATA, the dead-letter copies)."""


def _state_error(directory: Path, what: str, exc: OSError) -> StateError:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else ""
    reason = f"{exc.strerror or type(exc).__name__}" + (f" [{code}]" if code else "")
    return StateError(f"spool {directory}: {what}: {reason}; check the state directory's disk")


@dataclass(frozen=True, slots=True)
class Spooled:
    """A message in a spool file, and what was learnt about it while it was written.

    ``head``: its first :data:`HEAD` octets (all of a shorter message), which every reader of
    header fields takes in place of the message (``connector.headers`` never reads further).
    ``body_digest``: SHA-256 (hex) of the octets after the header block
    (``identity.duplicate_key``), when the writer was asked for it, else None.  ``ascii``:
    every octet is 7-bit.  ``lone``: CR and LF octets not in a CRLF pair (each becomes a CRLF
    on the SMTP wire, RFC 5321 §2.3.8).  ``last``: the last octet (``b""`` when empty).
    ``eol``: the first line's line end, CRLF or LF (``deadletter.message_eol``).
    """

    path: Path
    size: int
    head: bytes
    body_digest: str | None
    ascii: bool
    lone: int
    last: bytes
    eol: bytes

    async def chunks(self, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The message's octets in order, ``size`` at a time (each read in a worker thread).

        Raises StateError when the file cannot be read (it is ours: a failure is the state
        directory's, never the message's or a server's)."""
        try:
            f = await asyncio.to_thread(open, self.path, "rb", buffering=0)
        except OSError as exc:
            raise _state_error(self.path.parent, "cannot open a spool file", exc) from None
        try:
            while True:
                try:
                    data = await asyncio.to_thread(f.read, size)
                except OSError as exc:
                    raise _state_error(self.path.parent, "cannot read a spool file", exc) from None
                if not data:
                    return
                yield data
        finally:
            f.close()

    def remove(self) -> None:
        """Remove the file (a quick unlink, done in place); a missing file is fine."""
        _unlink(self.path)


def head_of(message: bytes | Spooled) -> bytes:
    """What the header readers take for ``message``: the bytes, or a spooled one's head."""
    return message if isinstance(message, bytes) else message.head


def size_of(message: bytes | Spooled) -> int:
    """The message's size in octets."""
    return len(message) if isinstance(message, bytes) else message.size


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        # Left behind: removed at the next start (Spool.clean); it costs disk, not mail.
        log.warning("cannot remove spool file %s: %s", path.name, exc.strerror)


class _Stats:
    """What :class:`Spooled` records, gathered chunk by chunk (see the module docstring)."""

    def __init__(self, digest_body: bool) -> None:
        self.size = 0
        self.head = bytearray()
        self.digest = hashlib.sha256() if digest_body else None
        self.hashing = False  # the body's start is known and the digest is being fed
        self.ascii = True
        self.cr = self.lf = self.pairs = 0
        self.last = b""
        self.eol: bytes | None = None

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self.eol is None:
            nl = data.find(b"\n")
            if nl >= 0:
                before = data[nl - 1 : nl] if nl else self.last
                self.eol = b"\r\n" if before == b"\r" and self.size + nl > 0 else b"\n"
        self.ascii = self.ascii and data.isascii()
        self.cr += data.count(b"\r")
        self.lf += data.count(b"\n")
        self.pairs += data.count(b"\r\n") + (self.last == b"\r" and data[:1] == b"\n")
        self.last = data[-1:]
        self.size += len(data)
        if len(self.head) < HEAD:
            room = HEAD - len(self.head)
            self.head += data[:room]
            data = data[room:]
            if len(self.head) == HEAD:
                self._start_digest()
        if self.hashing and self.digest is not None and data:
            self.digest.update(data)

    def _start_digest(self) -> None:
        """The header block's end is known once the head is whole (or the message ended):
        the digest starts with the head's body octets (``identity.duplicate_key``)."""
        if self.digest is None or self.hashing:
            return
        found = headers.bounds(bytes(self.head))
        self.digest.update(memoryview(self.head)[found[1] if found is not None else 0 :])
        self.hashing = True

    def spooled(self, path: Path) -> Spooled:
        self._start_digest()
        return Spooled(
            path=path,
            size=self.size,
            head=bytes(self.head),
            body_digest=self.digest.hexdigest() if self.digest is not None else None,
            ascii=self.ascii,
            lone=self.cr + self.lf - 2 * self.pairs,
            last=self.last,
            eol=self.eol or b"\n",
        )


_T = TypeVar("_T")


class SpoolWriter:
    """One message being written to the spool (the POP3 client's sink for a streamed RETR).

    ``write`` each chunk in order, then ``finish`` (the file stays, described by the
    :class:`Spooled` returned) or ``discard`` (the file goes).  Raises StateError.

    A cancellation does not stop the worker thread of a ``write`` or ``finish`` in flight: it
    may still be creating the file (``_fd`` and ``_path`` not set yet) or writing to its
    descriptor.  So ``discard`` never touches the file while a thread works on it (closing a
    descriptor in use could close one the process has reused meanwhile, the ledger's say): it
    marks the writer discarded, and the thread removes the file when it is done (``_run``).
    """

    def __init__(self, directory: Path, *, digest_body: bool) -> None:
        self._directory = directory
        self._digest_body = digest_body
        self._fd: int | None = None
        self._path: Path | None = None
        self._stats = _Stats(digest_body)
        self._lock = threading.Lock()  # guards _busy and _discarded
        self._busy = False  # a worker thread is in write() or finish()
        self._discarded = False

    async def write(self, data: bytes) -> None:
        """Append ``data`` to the file (created on the first write)."""
        await asyncio.to_thread(self._run, self._write, data)

    async def finish(self, prefix: bytes = b"") -> Spooled:
        """Close the file and describe it.  ``prefix``: octets that belong before everything
        written (``protocol.MessageEnd.prefix``, rare): the file is written once more with
        them in front."""
        return await asyncio.to_thread(self._run, self._finish, prefix)

    def discard(self) -> None:
        """Close and remove the file (quick system calls, done in place; safe during a
        cancellation, and more than once).  While a worker thread is in flight, that thread
        removes it once it is done."""
        with self._lock:
            self._discarded = True
            if not self._busy:
                self._remove()

    def _run(self, work: Callable[[bytes], _T], data: bytes) -> _T:
        """``work(data)`` in the worker thread, then the removal a ``discard`` meanwhile left
        to it (see the class docstring)."""
        with self._lock:
            self._enter()
        try:
            return work(data)
        finally:
            with self._lock:
                self._busy = False
                if self._discarded:
                    self._remove()

    def _enter(self) -> None:
        if self._discarded:  # the caller was cancelled and discarded before this thread ran
            raise StateError(f"spool {self._directory}: the file was discarded")
        self._busy = True

    def _remove(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._path is not None:
            _unlink(self._path)
            self._path = None

    def _open(self) -> int:
        if self._fd is None:
            try:
                fd, name = tempfile.mkstemp(prefix="msg-", suffix=".eml", dir=self._directory)
            except OSError as exc:
                raise _state_error(self._directory, "cannot create a spool file", exc) from None
            self._fd, self._path = fd, Path(name)
        return self._fd

    def _write(self, data: bytes) -> None:
        fd = self._open()
        try:
            _write_all(fd, data)
        except OSError as exc:
            raise _state_error(self._directory, "cannot write a spool file", exc) from None
        self._stats.feed(data)

    def _finish(self, prefix: bytes) -> Spooled:
        self._open()  # an empty message still gets its (empty) file
        fd, path = self._fd, self._path
        if fd is None or path is None:  # pragma: no cover (set by _open)
            raise AssertionError("spool file not open")
        try:
            os.close(fd)
        except OSError as exc:
            raise _state_error(self._directory, "cannot write a spool file", exc) from None
        finally:
            self._fd = None
        if not prefix:
            return self._stats.spooled(path)
        # Rare (a server that did not dot-stuff a first line starting with ".."): write the
        # prefix, then the file again, into a new file, gathering the description anew.
        old, self._path = path, None
        self._stats = _Stats(self._digest_body)
        try:
            self._write(prefix)
            with open(old, "rb", buffering=0) as f:
                while data := f.read(READ_CHUNK):
                    self._write(data)
        except OSError as exc:
            raise _state_error(self._directory, "cannot rewrite a spool file", exc) from None
        finally:
            _unlink(old)
        return self._finish(b"")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Spool:
    """The spool directory, ``<state_dir>/spool`` (0700): :meth:`clean` at start, then one
    :meth:`writer` per streamed message."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def writer(self, *, digest_body: bool = False) -> SpoolWriter:
        """A writer for one message; ``digest_body``: gather ``Spooled.body_digest``."""
        return SpoolWriter(self.directory, digest_body=digest_body)

    def clean(self) -> int:
        """Create the directory (0700) if missing and remove every file in it: what a process
        killed while it handled a large message left behind.  Returns how many were removed.
        Call it once at start, before any cycle (blocking: run it in a thread)."""
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
            with os.scandir(self.directory) as it:
                entries = [e for e in it if e.is_file(follow_symlinks=False)]
        except OSError as exc:
            raise _state_error(self.directory, "cannot prepare the spool directory", exc) from None
        removed = 0
        for entry in entries:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _state_error(self.directory, f"cannot remove {entry.name}", exc) from None
            removed += 1
        if removed:
            log.info("spool %s: removed %d file(s) a previous run left", self.directory, removed)
        return removed
