"""The IMAP dead-letter store (docs/design.md §7.2, ``[dead_letter] store = "imap"``): APPEND.

A dead letter is the message with our header lines (:func:`with_dead_letter_headers`), appended
with the flags ``\\Seen`` and ``$DeadLetter`` and INTERNALDATE = the time it failed, so a mail
client sorts the folder by when things went wrong.  Durable means the server answered the APPEND
``OK`` (docs/design.md §7.2; RFC 3501 §6.3.11: the message is then in the mailbox).

Connections: one fresh connection per call (``put``, ``list``, ``get``, ``remove``), logged out
and closed afterwards, on errors and on cancellation too (then closed without LOGOUT).  Dead
letters are rare, and a fresh connection never inherits a half-finished command: aioimaplib
2.0.3 does not fail pending commands when the connection drops (library-facts.md §4), so a
reused connection could hang on a dead socket.

What aioimaplib leaves to us (library-facts.md §4), and what this module does about it:

* ``NO``/``BAD`` answers are returned, not raised: every answer is checked, and anything but
  ``OK`` becomes :class:`~connector.errors.DeadLetterError` with the server's text (one line,
  any password removed).  ``[TRYCREATE]`` on APPEND creates the folder and retries once
  (RFC 3501 §6.3.11); ``[ALREADYEXISTS]`` on CREATE is fine (RFC 5530 §3), since another
  connector may have created it meanwhile; ``[OVERQUOTA]`` is named in the reason.
* Mailbox names are sent as given: the configured folder uses ``/`` between levels, which is
  mapped to the server's hierarchy separator (``LIST "" ""``, RFC 3501 §6.3.8), each level is
  encoded as modified UTF-7 (RFC 3501 §5.1.3) and the whole name is sent as a quoted string
  (RFC 3501 §9, ``astring``), so spaces survive.
* Timeouts: most aioimaplib methods raise the builtin ``TimeoutError`` but APPEND raises
  ``aioimaplib.CommandTimeout``; each command here also runs under our own deadline, and all
  three become DeadLetterError.
* A lost connection: ``conn_lost_cb`` resolves a future that every command waits on beside
  the command itself, so a server closing the connection during APPEND is an error at once,
  not a hang until the timeout.
* No STARTTLS: ``tls`` is implicit TLS (IMAPS, RFC 8314) or none.

A spooled message (docs/design.md §5.3) is appended without reading it into memory: aioimaplib
is given a stand-in of the literal's length (:class:`_Literal`), and when the server asks for
the literal (the ``+`` continuation, RFC 3501 §7.5) our header lines and then the spool file go
out a chunk at a time, waiting whenever the transport's buffer is above its high-water mark
(:meth:`_Session.streaming`).  That costs one chunk (``spool.READ_CHUNK``) and the transport's
buffer, whatever the message's size; the in-memory path costs the message and its copy with our
header lines.  It relies on aioimaplib's ``_continuation``, ``literal_data`` and
``pending_sync_command`` (tests/unit/test_deadletter_imap.py names them), under the pin in
``pyproject.toml``.  The APPEND's deadline grows with the literal: a second per megabyte over
the store's ``timeout``, since the server says nothing while it reads a literal.

IMAP carries messages as CRLF lines without NUL (RFC 3501 §4.3), so a server may normalise a
message that has bare CR or LF or a NUL octet (Dovecot turns a bare LF into CRLF and NUL into
0x80).  Such a message is still stored, with a warning: refusing it would leave it upstream,
retried forever, which is the very thing the dead-letter store exists to prevent.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import enum
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Final, assert_never

import aioimaplib

from connector.deadletter import (
    HEADER_BLOCK_MAX,
    HEADER_PREFIX,
    DeadLetterInfo,
    DeadLetterRecord,
    dead_letter_head,
    format_failed_at,
    header_block_continues,
    parse_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.errors import DeadLetterError, StateError
from connector.imap.protocol import folder_levels, quote_astring, server_mailbox_name
from connector.spool import READ_CHUNK, Spooled
from connector.tls import TlsMode

log = logging.getLogger(__name__)

DEAD_LETTER_FLAGS: Final = r"\Seen $DeadLetter"
"""APPEND flags: read (nobody needs to be alerted by the folder's unread count) and a keyword
that marks it as ours for filters and searches (RFC 3501 §2.3.2 keywords)."""

_ID_RE: Final = re.compile(r"imap:(\d{1,10}):(\d{1,10})")
_APPENDUID_RE: Final = re.compile(rb"\[APPENDUID (\d+) (\d+)\]", re.IGNORECASE)
_UIDVALIDITY_RE: Final = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_RESP_CODE_RE: Final = re.compile(rb"^\[([A-Z0-9-]+)", re.IGNORECASE)
# RFC 3501 §7.2.2: mailbox-list = "(" flags ")" SP (DQUOTE QUOTED-CHAR DQUOTE / nil) SP mailbox
_LIST_DELIM_RE: Final = re.compile(rb'^\([^)]*\) (?:"(\\.|[^"\\])"|NIL)', re.IGNORECASE)
_FETCH_START_RE: Final = re.compile(rb"^\d+ FETCH \(", re.IGNORECASE)
_FETCH_UID_RE: Final = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_FETCH_SIZE_RE: Final = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)
# RFC 3501 §4.3: a literal is CRLF lines without NUL; these may not survive the round trip.
_NOT_IMAP_SAFE_RE: Final = re.compile(rb"\x00|\r(?!\n)|(?<!\r)\n")
_MAX_TEXT: Final = 200
# A literal's share of the APPEND deadline: the server answers only once it has read it all.
_LITERAL_RATE: Final = 1_000_000  # octets per second, at least


class _Literal:
    """What aioimaplib's ``append()`` is given for a spooled message: the literal's length
    (its ``{n}``), nothing more; the octets go out from :meth:`_Session.streaming`."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


class ResponseStatus(enum.StrEnum):
    """The status of a tagged IMAP answer (RFC 3501 §7.1); ``KO`` is aioimaplib's own timeout."""

    OK = "OK"
    NO = "NO"
    BAD = "BAD"
    KO = "KO"


# --------------------------------------------------------------------------------------------
# Mailbox names
# --------------------------------------------------------------------------------------------


def _parse_separator(lines: Sequence[bytes | bytearray]) -> str | None:
    for line in lines:
        m = _LIST_DELIM_RE.match(bytes(line))
        if m is not None:
            if m.group(1) is None:
                return None
            char = m.group(1).decode("ascii", "replace")
            return char[1:] if char.startswith("\\") else char
    raise _ProtocolMismatch("LIST did not report a hierarchy separator")


class _ProtocolMismatch(Exception):
    """An answer we cannot read; becomes a DeadLetterError in the session."""


# --------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------


def _search_uids(line: bytes) -> builtins.list[int]:
    """The numbers of a SEARCH answer line, or [] when it is not one.

    aioimaplib strips "* SEARCH " from "* SEARCH 3 7" (RFC 3501 §7.2.5), leaving b"3 7"; some
    versions leave "SEARCH".  Split, not a regular expression: the natural pattern,
    ``((?: ?\\d+)*)``, backtracks exponentially over a long run of digits that does not end
    the line as expected (a hostile server's answer).
    """
    words = line.split()
    if words and words[0].upper() == b"SEARCH":
        words = words[1:]
    if not all(w.isdigit() and len(w) <= 10 for w in words):  # RFC 3501 §2.3.1.1: nz-number
        return []
    return [int(w) for w in words]


def make_id(uidvalidity: int, uid: int) -> str:
    """A dead letter's id: ``imap:<uidvalidity>:<uid>`` (RFC 3501 §2.3.1.1: the pair is unique
    for the folder; a new UIDVALIDITY makes old ids unknown, which is correct)."""
    return f"imap:{uidvalidity}:{uid}"


def parse_id(id: str) -> tuple[int, int]:
    """``(uidvalidity, uid)`` from an id; ``KeyError`` for anything not made by :func:`make_id`."""
    m = _ID_RE.fullmatch(id)
    if m is None or int(m.group(2)) == 0:
        raise KeyError(id)
    return int(m.group(1)), int(m.group(2))


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    """An aioimaplib ``Response``, typed: the status and the lines (the tagged text last)."""

    status: ResponseStatus | None  # None: a status word we do not know
    status_word: str
    lines: tuple[bytes | bytearray, ...]

    @classmethod
    def of(cls, response: Any) -> _Answer:
        word = str(response.result)
        try:
            status: ResponseStatus | None = ResponseStatus(word.upper())
        except ValueError:
            status = None
        return cls(status, word, tuple(response.lines))

    @property
    def ok(self) -> bool:
        return self.status is ResponseStatus.OK

    @property
    def text(self) -> bytes:
        """The tagged answer's text, such as ``[TRYCREATE] Mailbox doesn't exist: X``."""
        return bytes(self.lines[-1]) if self.lines else b""

    @property
    def code(self) -> str | None:
        """The response code in upper case (RFC 3501 §7.1, RFC 5530), or None."""
        m = _RESP_CODE_RE.match(self.text)
        return m.group(1).decode("ascii").upper() if m else None


@dataclass(frozen=True, slots=True)
class _Fetched:
    uid: int
    size: int | None
    literal: bytes | None


def _parse_fetch(lines: Sequence[bytes | bytearray]) -> builtins.list[_Fetched]:
    """The FETCH responses in an answer: UID, RFC822.SIZE and the (one) literal of each.

    aioimaplib gives ``b"1 FETCH (UID 1 RFC822.SIZE 305 BODY[]<0> {305}"``, the literal as a
    ``bytearray``, then ``b")"``; items may come in any order (RFC 3501 §7.4.2).
    """
    out: builtins.list[_Fetched] = []
    parts: builtins.list[bytes] = []  # one response's lines, joined once (not copied per line)
    literal: bytes | None = None
    started = False

    def finish() -> None:
        text = b" ".join(parts)
        uid = _FETCH_UID_RE.search(text)
        size = _FETCH_SIZE_RE.search(text)
        if uid is not None:
            out.append(_Fetched(int(uid.group(1)), int(size.group(1)) if size else None, literal))

    for line in lines:
        if isinstance(line, bytearray):
            literal = bytes(line)
            continue
        if _FETCH_START_RE.match(line):
            if started:
                finish()
            started, parts, literal = True, [bytes(line)], None
        elif started:
            parts.append(bytes(line))
    if started:
        finish()
    return out


# --------------------------------------------------------------------------------------------
# One connection
# --------------------------------------------------------------------------------------------


class _Session:
    """One logged-in IMAP connection.  Every method raises only DeadLetterError (or
    CancelledError); after any error the connection is poisoned and only closed."""

    def __init__(self, store: ImapStore) -> None:
        self._store = store
        self._client: Any = None
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.separator: str | None = None
        self.capabilities: frozenset[str] = frozenset()

    def _error(self, reason: str) -> DeadLetterError:
        return DeadLetterError(self._store.store_name, reason)

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)

    async def call(self, what: str, awaitable: Awaitable[Any], *, extra: float = 0.0) -> Any:
        """Await one aioimaplib call under our deadline (``timeout`` plus ``extra`` seconds),
        racing it against connection loss."""
        task = asyncio.ensure_future(awaitable)
        limit = self._store.timeout + extra
        shown = f"{round(limit, 1) if extra >= 0.05 else self._store.timeout:g}"
        try:
            async with asyncio.timeout(limit):
                await asyncio.wait({task, self._lost}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise self._error(f"{what}: no answer within {shown}s") from None
        finally:
            if not task.done():
                task.cancel()
                # Collect the cancelled task's outcome, so nothing is logged as "never retrieved".
                task.add_done_callback(_consume)
        if not task.done():
            raise self._error(f"{what}: the server closed the connection")
        try:
            return task.result()
        except (TimeoutError, aioimaplib.CommandTimeout):
            raise self._error(f"{what}: no answer within {shown}s") from None
        except ssl.SSLCertVerificationError as exc:
            raise self._error(f"{what}: certificate not trusted: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise self._error(f"{what}: TLS failed: {exc.reason or type(exc).__name__}") from None
        except ConnectionRefusedError:
            raise self._error(f"{what}: connection refused") from None
        except OSError as exc:
            # asyncio's "Connect call failed ('host', port)" has no strerror; no secrets either.
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise self._error(f"{what}: {reason}") from None
        except aioimaplib.AioImapException as exc:
            raise self._error(f"{what}: {self._clean(str(exc))}") from None

    async def command(self, what: str, awaitable: Awaitable[Any], *, extra: float = 0.0) -> _Answer:
        """Like :meth:`call`, for calls that return an aioimaplib ``Response``."""
        return _Answer.of(await self.call(what, awaitable, extra=extra))

    @contextlib.asynccontextmanager
    async def streaming(self, head: bytes, spooled: Spooled) -> AsyncIterator[_Literal]:
        """While active, the continuation of an APPEND given the :class:`_Literal` yielded
        here is answered with ``head`` and the spool file, a chunk at a time, with flow
        control; any other continuation goes to aioimaplib as always.  A failure to read the
        file drops the connection (the APPEND then fails) and is raised on exit."""
        imap = self._protocol
        literal = _Literal(len(head) + spooled.size)
        writable = asyncio.Event()
        writable.set()
        sender: asyncio.Task[None] | None = None
        failed: list[BaseException] = []

        async def send() -> None:
            transport = imap.transport
            try:
                if head:
                    transport.write(head)
                async for data in spooled.chunks():
                    transport.write(data)
                    await writable.wait()  # cleared while the transport is above high water
                transport.write(b"\r\n")
            except Exception as exc:  # noqa: BLE001 - raised by streaming() on exit
                failed.append(exc)
                transport.abort()

        def on_continuation(line: bytes) -> None:
            nonlocal sender
            command = imap.pending_sync_command
            ours = imap.literal_data is literal
            if command is not None and command.name == "APPEND" and ours:
                imap.literal_data = None
                sender = asyncio.get_running_loop().create_task(send())
                return
            type(imap)._continuation(imap, line)

        vars(imap).update(
            _continuation=on_continuation,
            pause_writing=writable.clear,
            resume_writing=writable.set,
        )
        try:
            yield literal
        except DeadLetterError:
            if failed:  # the APPEND failed because the literal could not be sent: say why
                raise self._unsent(failed[0]) from None
            raise
        finally:
            for name in ("_continuation", "pause_writing", "resume_writing"):
                vars(imap).pop(name, None)
            if sender is not None:
                if not sender.done():
                    sender.cancel()
                sender.add_done_callback(_consume)
        if failed:
            raise self._unsent(failed[0])

    def _unsent(self, why: BaseException) -> DeadLetterError:
        if isinstance(why, StateError):
            return self._error(f"cannot read the spool file: {why}")
        return self._error(f"sending the message failed ({type(why).__name__})")

    def refused(self, what: str, answer: _Answer) -> DeadLetterError:
        """The DeadLetterError for a NO/BAD answer, with the server's text."""
        text = self._clean(answer.text.decode("utf-8", "replace"))
        prefix = "over quota: " if answer.code == "OVERQUOTA" else ""
        return self._error(f"{prefix}{what} answered {answer.status_word} {text}".rstrip())

    def _clean(self, text: str) -> str:
        # One short line, and never the password, whatever a server chooses to echo.
        password = self._store.password
        if password:
            text = text.replace(password, "****")
        text = " ".join(text.split())
        return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."

    async def open(self) -> None:
        store = self._store
        ctx: ssl.SSLContext | None
        match store.tls:
            case TlsMode.IMPLICIT:
                ctx = store.ssl_context or ssl.create_default_context()
            case TlsMode.NONE:
                ctx = None
            case TlsMode.STARTTLS:
                raise self._error("STARTTLS is not supported")  # refused in ImapStore.__init__
            case _ as unreachable:
                assert_never(unreachable)
        # IMAP4 (not IMAP4_SSL, which drops conn_lost_cb) with an SSL context is implicit TLS.
        self._client = aioimaplib.IMAP4(
            store.host,
            store.port,
            timeout=store.timeout,
            conn_lost_cb=self._connection_lost,
            ssl_context=ctx,
        )
        await self.call("connect", self._client.wait_hello_from_server())
        # aioimaplib sends the user name unquoted; quote it (RFC 3501 §6.2.3, astring).
        answer = await self.command(
            "LOGIN", self._client.login(quote_astring(store.username), store.password)
        )
        if not answer.ok:
            raise self.refused("LOGIN", answer)
        self.capabilities = frozenset(c.upper() for c in self._client.protocol.capabilities)
        # RFC 3501 §6.3.8: LIST with an empty mailbox name returns the hierarchy delimiter.
        answer = await self.command("LIST", self._protocol.simple_command("LIST", '""', '""'))
        if not answer.ok:
            raise self.refused("LIST", answer)
        try:
            self.separator = _parse_separator(answer.lines[:-1])
        except _ProtocolMismatch as exc:
            raise self._error(str(exc)) from None

    @property
    def _protocol(self) -> Any:
        return self._client.protocol

    def mailbox(self) -> str:
        """The configured folder as this server names it (see :func:`server_mailbox_name`)."""
        try:
            return server_mailbox_name(self._store.folder_levels, self.separator)
        except ValueError as exc:
            raise self._error(f"folder {self._store.folder!r}: {exc}") from None

    async def close(self, *, polite: bool) -> None:
        """LOGOUT (when ``polite`` and still connected), then drop the connection regardless."""
        client = self._client
        if client is None:
            return
        try:
            if polite and not self._lost.done():
                with contextlib.suppress(DeadLetterError):
                    await self.call("LOGOUT", self._protocol.logout())
        finally:
            transport = client.protocol.transport
            if transport is not None:
                transport.abort()
            connecting = client._client_task  # aioimaplib's connect task
            for task in (connecting, *client.protocol.tasks):
                if task.done():
                    _consume(task)
                else:
                    task.cancel()
                    task.add_done_callback(_consume)

    async def select(self) -> tuple[_Answer, int] | None:
        """SELECT the folder: the answer and its UIDVALIDITY (RFC 3501 §6.3.1).

        ``None`` when the folder does not exist.  Servers say so differently (RFC 5530
        ``[NONEXISTENT]``, or a plain ``NO`` as Dovecot does), so a ``NO`` without that code
        is checked with ``LIST`` before it counts as a failure.
        """
        mailbox = self.mailbox()
        answer = await self.command("SELECT", self._protocol.select(mailbox))
        if not answer.ok:
            if answer.code in ("NONEXISTENT", "TRYCREATE") or not await self._listed(mailbox):
                return None
            raise self.refused("SELECT", answer)
        for line in answer.lines:
            m = _UIDVALIDITY_RE.search(bytes(line))
            if m is not None:
                return answer, int(m.group(1))
        raise self._error("SELECT did not report UIDVALIDITY")

    async def _listed(self, mailbox: str) -> bool:
        answer = await self.command("LIST", self._protocol.simple_command("LIST", '""', mailbox))
        if not answer.ok:
            raise self.refused("LIST", answer)
        return len(answer.lines) > 1

    async def uid_fetch(self, uids: str, items: str) -> builtins.list[_Fetched]:
        answer = await self.command(
            "UID FETCH", self._protocol.fetch(uids, items, by_uid=True, timeout=None)
        )
        if not answer.ok:
            raise self.refused("UID FETCH", answer)
        return _parse_fetch(answer.lines[:-1])


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class ImapStore:
    """Dead letters in a folder on an IMAP server: a :class:`DeadLetterArchive`.

    ``folder`` uses ``/`` between levels (``"POP3 Connector/Dead Letters"``), whatever the
    server's own separator.  ``timeout`` bounds the connect-and-greeting and each command.
    ``tls`` is :attr:`TlsMode.IMPLICIT` (IMAPS; ``ssl_context`` or the system's trust) or
    :attr:`TlsMode.NONE`; aioimaplib has no STARTTLS, so :attr:`TlsMode.STARTTLS` raises
    ``ValueError``, as does a folder with an empty level.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tls: TlsMode,
        ssl_context: ssl.SSLContext | None,
        username: str,
        password: str,
        folder: str,
        *,
        timeout: float = 30.0,
    ) -> None:
        if tls is TlsMode.STARTTLS:
            raise ValueError('the IMAP store supports tls = "implicit" or "none", not STARTTLS')
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.host = host
        self.port = port
        self.tls = tls
        self.ssl_context = ssl_context
        self.username = username
        self.password = password
        self.folder = folder
        self.folder_levels = folder_levels(folder)
        self.timeout = timeout
        self.store_name = f"imap://{username}@{host}:{port}/{folder}"

    def __repr__(self) -> str:
        return f"ImapStore({self.store_name!r})"

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[_Session]:
        session = _Session(self)
        try:
            await session.open()
            yield session
        except KeyError:
            # An unknown id is an answer, not a failure: the connection is fine.
            await session.close(polite=True)
            raise
        except BaseException:
            # An error or a cancellation: drop the socket, no LOGOUT (it could hang as well).
            await session.close(polite=False)
            raise
        await session.close(polite=True)

    # -- the DeadLetterStore protocol ----------------------------------------------------------

    async def put(self, raw: bytes | Spooled, info: DeadLetterInfo) -> str:
        """APPEND ``raw`` with our header lines; return its id once the server said OK.

        Creates the folder when the server answers ``[TRYCREATE]``, then tries once more.
        Raises DeadLetterError for any refusal, timeout or connection failure.  A spooled
        message is streamed from its file (see the module docstring).
        """
        data: bytes | Spooled
        if isinstance(raw, bytes):
            data = with_dead_letter_headers(raw, info)
            unsafe = _NOT_IMAP_SAFE_RE.search(data) is not None
        else:
            data, unsafe = raw, raw.lone > 0  # NUL is not counted: warned of in memory only
        if unsafe:
            log.warning(
                "account=%s uidl=%s: the message has NUL or bare CR/LF octets, which IMAP may "
                "normalise (RFC 3501 §4.3); storing it anyway",
                info.account,
                info.uidl,
            )
        async with self._session() as session:
            answer = await self._append(session, data, info)
            if not answer.ok and answer.code == "TRYCREATE":
                await self._create(session)
                answer = await self._append(session, data, info)
            if not answer.ok:
                raise session.refused("APPEND", answer)
            m = _APPENDUID_RE.search(answer.text)
            if m is not None:
                id = make_id(int(m.group(1)), int(m.group(2)))
            else:
                id = await self._find_appended(session, info)
        log.info(
            "account=%s uidl=%s dead letter stored in %s as %s",
            info.account,
            info.uidl,
            self.store_name,
            id,
        )
        return id

    async def _append(
        self, session: _Session, data: bytes | Spooled, info: DeadLetterInfo
    ) -> _Answer:
        if isinstance(data, bytes):
            return await self._append_literal(session, data, info)
        async with session.streaming(dead_letter_head(data, info), data) as literal:
            return await self._append_literal(session, literal, info)

    async def _append_literal(
        self, session: _Session, data: bytes | _Literal, info: DeadLetterInfo
    ) -> _Answer:
        # The date is the failure time, so INTERNALDATE (RFC 3501 §2.3.3) sorts by it.  The
        # server answers once it has read the literal: its deadline grows with it.
        extra = len(data) / _LITERAL_RATE
        return await session.command(
            "APPEND",
            session._protocol.append(
                data,
                session.mailbox(),
                DEAD_LETTER_FLAGS,
                info.failed_at,
                timeout=self.timeout + extra,
            ),
            extra=extra,
        )

    async def chunks(self, id: str, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The stored bytes (our header lines, then the original) ``size`` at a time, by
        partial FETCHes (RFC 3501 §6.4.5, ``BODY.PEEK[]<start.size>``) on one connection,
        never all at once.  Unknown id: KeyError."""
        uidvalidity, uid = parse_id(id)
        async with self._session() as session:
            await self._select_for(session, id, uidvalidity)
            start = 0
            while True:
                items = await session.uid_fetch(str(uid), f"(UID BODY.PEEK[]<{start}.{size}>)")
                found = [i.literal for i in items if i.uid == uid]
                if not found:
                    if start == 0:
                        raise KeyError(id)
                    return
                data = found[0] or b""
                if data:
                    yield data
                if len(data) < size:
                    return
                start += len(data)

    async def _create(self, session: _Session) -> None:
        mailbox = session.mailbox()
        answer = await session.command(
            "CREATE", session._protocol.simple_command("CREATE", mailbox)
        )
        # RFC 5530 §3: ALREADYEXISTS means someone else created it first: what we wanted.
        if not answer.ok and answer.code != "ALREADYEXISTS":
            raise session.refused("CREATE", answer)
        log.info("created the dead-letter folder %s", self.store_name)
        # Subscribed, so that mail clients that show subscribed folders only show it too.
        await session.command("SUBSCRIBE", session._protocol.simple_command("SUBSCRIBE", mailbox))

    async def _find_appended(self, session: _Session, info: DeadLetterInfo) -> str:
        """Without UIDPLUS (RFC 4315) the APPEND answer has no UID: search our header lines."""
        selected = await session.select()
        if selected is None:
            raise session._error("the folder vanished right after the APPEND")
        uidvalidity = selected[1]
        # Search for the values as written: sanitised by dead_letter_headers().
        parsed = parse_dead_letter_headers(with_dead_letter_headers(b"", info))
        clean = parsed[0] if parsed is not None else info
        criteria = [
            f"HEADER {HEADER_PREFIX}Account {quote_astring(clean.account)}",
            f"HEADER {HEADER_PREFIX}UIDL {quote_astring(clean.uidl)}",
            f"HEADER {HEADER_PREFIX}Failed-At {quote_astring(format_failed_at(info.failed_at))}",
        ]
        found = await session.command(
            "UID SEARCH", session._protocol.search(*criteria, charset=None, by_uid=True)
        )
        if not found.ok:
            raise session.refused("UID SEARCH", found)
        uids = [n for line in found.lines[:-1] for n in _search_uids(bytes(line))]
        if not uids:
            # The APPEND was answered OK, so the message is stored: only its id is unknown.
            log.warning(
                "account=%s uidl=%s: stored, but the server did not say under which UID",
                info.account,
                info.uidl,
            )
            return "imap:unknown"
        return make_id(uidvalidity, max(uids))

    # -- the DeadLetterArchive protocol --------------------------------------------------------

    async def list(self) -> builtins.list[DeadLetterRecord]:
        """Every dead letter in the folder, oldest first; fetches only the first octets of each.

        Messages without our five header lines (put there by hand) are skipped.  A folder
        that does not exist yet holds no dead letters.
        """
        async with self._session() as session:
            selected = await session.select()
            if selected is None:
                return []
            answer, uidvalidity = selected
            if _exists(answer) == 0:
                return []
            fetched = await session.uid_fetch(
                "1:*", f"(UID RFC822.SIZE BODY.PEEK[]<0.{HEADER_BLOCK_MAX}>)"
            )
            # A long Recipients field can go on past those octets: fetch those few whole.
            longer = [i.uid for i in fetched if i.literal and header_block_continues(i.literal)]
            whole = {
                i.uid: i.literal
                for i in (
                    await session.uid_fetch(",".join(map(str, longer)), "(UID BODY.PEEK[])")
                    if longer
                    else []
                )
            }
        records: builtins.list[tuple[DeadLetterRecord, int]] = []
        for item in fetched:
            literal = whole.get(item.uid) or item.literal
            parsed = parse_dead_letter_headers(literal) if literal else None
            if parsed is None or item.size is None:
                log.warning("%s: UID %d is not a dead letter of ours, skipped", self, item.uid)
                continue
            info, header_len = parsed
            record = DeadLetterRecord(
                id=make_id(uidvalidity, item.uid),
                account=info.account,
                uidl=info.uidl,
                stage=info.stage,
                response=info.response,
                failed_at=info.failed_at,
                size=item.size - header_len,
            )
            records.append((record, item.uid))
        records.sort(key=lambda pair: (pair[0].failed_at, pair[1]))
        return [record for record, _ in records]

    async def get(self, id: str) -> bytes:
        """The stored bytes (our header lines, then the message).  Unknown id: KeyError."""
        uidvalidity, uid = parse_id(id)
        async with self._session() as session:
            await self._select_for(session, id, uidvalidity)
            for item in await session.uid_fetch(str(uid), "(UID BODY.PEEK[])"):
                if item.uid == uid and item.literal is not None:
                    return item.literal
        raise KeyError(id)

    async def remove(self, id: str) -> None:
        """Delete one dead letter: UID STORE ``\\Deleted``, then UID EXPUNGE (RFC 4315 §2.1).

        Without UIDPLUS a plain EXPUNGE also removes any other message someone marked
        ``\\Deleted`` in this folder (RFC 3501 §6.4.3).  Unknown id: KeyError.
        """
        uidvalidity, uid = parse_id(id)
        async with self._session() as session:
            await self._select_for(session, id, uidvalidity)
            if not any(item.uid == uid for item in await session.uid_fetch(str(uid), "(UID)")):
                raise KeyError(id)
            proto = session._protocol
            answer = await session.command(
                "UID STORE", proto.store(str(uid), "+FLAGS.SILENT", r"(\Deleted)", by_uid=True)
            )
            if not answer.ok:
                raise session.refused("UID STORE", answer)
            if "UIDPLUS" in session.capabilities:
                answer = await session.command("UID EXPUNGE", proto.expunge(str(uid), by_uid=True))
            else:
                answer = await session.command("EXPUNGE", proto.expunge())
            if not answer.ok:
                raise session.refused("EXPUNGE", answer)
        log.info("%s: dead letter %s removed", self, id)

    async def count_by_account(self) -> dict[str, int]:
        """Number of dead letters per account."""
        return dict(collections.Counter(r.account for r in await self.list()))

    async def _select_for(self, session: _Session, id: str, uidvalidity: int) -> None:
        selected = await session.select()
        if selected is None or selected[1] != uidvalidity:
            raise KeyError(id)  # RFC 3501 §2.3.1.1: the folder was recreated; old UIDs are void


def _exists(answer: _Answer) -> int | None:
    for line in answer.lines:
        m = re.match(rb"^(\d+) EXISTS$", bytes(line), re.IGNORECASE)
        if m is not None:
            return int(m.group(1))
    return None


__all__ = [
    "DEAD_LETTER_FLAGS",
    "ImapStore",
    "ResponseStatus",
    "make_id",
    "parse_id",
]
