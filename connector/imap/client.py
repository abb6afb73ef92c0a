"""asyncio streams shell around the IMAP core (``protocol.py``): one IMAP4rev1 session.

Why our own client and not aioimaplib (a dependency, used by the IMAP dead-letter store): its
response parser recurses once per line of a chunk (``IMAP4ClientProtocol._handle_responses``),
so the ``UID FETCH 1:* (UID RFC822.SIZE)`` listing of a 3,000-message folder ended in
``RecursionError`` inside ``data_received`` and the command then hung until its timeout
(measured against Dovecot 2.3.19 with aioimaplib 2.0.3; 500 messages still worked).  A mailbox
kept with ``leave_on_server`` holds that many within months.  It also has no STARTTLS, reads a
literal of any announced size into memory, and does not fail a pending command when the
connection drops (library-facts.md §4).  This shell needs a few hundred lines, on the same
pattern as ``pop3.client``: streams, one deadline per phase, a core that knows nothing of I/O.

A message above the spool threshold (``uid_fetch_spooled``, docs/design.md §5.3, §15.1) is
streamed: the reader hands its literal over in chunks, each written to a spool file as it is
read, as the POP3 client streams a RETR; the session holds a read's worth of it, never the
message.

Deadlines (docs/design.md §10.2): ``connect`` for TCP and TLS; ``command`` for the whole of a
short command, every response up to its tagged answer (IDLE's continuation, a SASL exchange),
so a server that drips untagged responses cannot hold it; ``idle_read`` for each read of a
FETCH that carries messages, so a big message never hits a total deadline while bytes flow.
Waiting in IDLE has no deadline of its own: the IDLE watcher (``idle.py``) decides how long
it waits.

After a timeout, a protocol error, a broken connection or a cancellation while reading, the
stream is out of step: the client aborts the connection and every later call raises
``Pop3ConnectionError`` (the mail source's errors, docs/design.md §3).  ``NO``/``BAD`` answers
raise :class:`~connector.errors.ImapResponseError` with the RFC 5530 response code.

Untagged responses that arrive with any command are noted (:meth:`ImapClient._note`):
``EXISTS``/``EXPUNGE`` keep :attr:`ImapClient.exists` current and mark new mail
(:attr:`ImapClient.new_mail`); a ``BYE`` outside LOGOUT ends the session; a ``UIDVALIDITY``
that changes while a folder is selected makes every UID of the session meaningless (RFC 3501
§2.3.1.1), so the session ends before any is used.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from connector.errors import (
    ImapAuthError,
    ImapResponseError,
    Pop3ConnectionError,
    Pop3Error,
    Pop3ProtocolError,
    Pop3TimeoutError,
    Pop3TlsError,
)
from connector.imap import ImapAuth
from connector.imap.protocol import (
    DEFAULT_LITERAL,
    Arg,
    Continuation,
    Fetched,
    LiteralArg,
    LiteralChunk,
    NeedData,
    Response,
    ResponseReader,
    Status,
    StatusResponse,
    astring,
    command,
    folder_levels,
    parse_fetch,
    parse_list,
    parse_number,
    parse_nz_number,
    parse_status,
    parse_words,
    sasl_plain,
    server_mailbox_name,
)
from connector.pop3.client import (
    Pop3Endpoint,
    Pop3Timeouts,
    Spooling,
    SpoolSink,
    open_stream,
    sasl_xoauth2,
    start_tls,
    xoauth2_status,
)
from connector.spool import Spooled
from connector.tls import TlsMode

log = logging.getLogger(__name__)

TokenSource = Callable[[], Awaitable[str]]

_CHUNK: Final = 256 * 1024  # bytes per read(); big reads keep a 20 MiB FETCH cheap
_DEFAULT_TIMEOUTS: Final = Pop3Timeouts()
MAX_LISTING: Final = 1_000_000
"""Messages one folder listing may hold (the POP3 client's bound on a UIDL listing)."""
MAX_UNTAGGED: Final = 100_000
"""Untagged responses one ordinary command may collect (SELECT, SEARCH, STORE, EXPUNGE)."""
MAX_KEPT: Final = 16 * 1024 * 1024
"""Octets of untagged responses one command keeps (``keep``: SELECT, LIST, UID SEARCH).  The
count alone let 100,000 responses of up to MAX_LINE each be held at once; a SEARCH of a
million UIDs is some 8 MiB, a SELECT or LIST a few hundred octets."""


@dataclass(frozen=True, slots=True)
class Selected:
    """What SELECT (or EXAMINE) reported about the folder (RFC 3501 §6.3.1)."""

    exists: int
    uidvalidity: int
    uidnext: int | None
    read_only: bool


def _describe(ev: Response | Continuation) -> str:
    """A response as the transcript shows it: literals summarised, never logged."""
    if isinstance(ev, Continuation):
        return "+ ****" if ev.text else "+"
    parts = [ev.segments[0][:200].decode("utf-8", "replace")]
    for i, (literal, segment) in enumerate(zip(ev.literals, ev.segments[1:], strict=True)):
        parts.append("[streamed to the spool]" if i in ev.streamed else f"[{len(literal)} octets]")
        parts.append(segment[:80].decode("utf-8", "replace"))
    return f"{ev.tag} " + " ".join(p for p in parts if p)


class ImapClient:
    """One IMAP session.  Use ``async with await ImapClient.connect(...) as c``.

    Every method raises only ``connector.errors.Pop3Error`` subclasses (the mail source's
    errors).  One task at a time: the methods are not safe to call concurrently.
    """

    capabilities: frozenset[str]
    tls_active: bool

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        endpoint: Pop3Endpoint,
        timeouts: Pop3Timeouts,
        *,
        transcript: logging.Logger | None,
    ) -> None:
        """Wrap an open stream; use :meth:`connect` instead."""
        self._reader, self._writer = reader, writer
        self._endpoint, self._timeouts = endpoint, timeouts
        self._rr = ResponseReader()
        self._log = transcript
        self._tags = 0
        self._broken: str | None = None
        self._logging_out = False
        # The UID FETCH whose responses are being read (its tag, literal cap and the length
        # above which a literal is streamed): a caller that stops iterating leaves it open,
        # and the next command reads it to its end.
        self._open_fetch: tuple[str, int, int | None] | None = None
        self._idle_tag: str | None = None
        self.capabilities = frozenset()
        self.tls_active = endpoint.tls is TlsMode.IMPLICIT
        self.preauth = False
        self._caps_fresh = False  # the login's OK carried the capabilities
        self.selected: Selected | None = None
        self.exists = 0
        self.new_mail = False  # an EXISTS raised the count (cleared by whoever acts on it)
        self.greeting = ""

    # -- connecting ----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        endpoint: Pop3Endpoint,
        timeouts: Pop3Timeouts = _DEFAULT_TIMEOUTS,
        *,
        transcript: logging.Logger | None = None,
    ) -> Self:
        """Connect, read the greeting, learn the capabilities; STARTTLS when tls says so.

        Raises Pop3TlsError (certificate or handshake failure, STARTTLS not offered or
        refused), Pop3TimeoutError, Pop3ConnectionError (also for a ``BYE`` greeting).
        """
        reader, writer, ctx, hostname = await open_stream(endpoint, timeouts)
        client = cls(reader, writer, endpoint, timeouts, transcript=transcript)
        try:
            await client._open(ctx, hostname)
        except BaseException:
            await client.close()
            raise
        return client

    async def _open(self, ctx: ssl.SSLContext | None, hostname: str) -> None:
        ev = await self._read()
        greeting = parse_status(ev) if isinstance(ev, Response) and ev.tag == "*" else None
        if greeting is None or greeting.status not in (Status.OK, Status.PREAUTH, Status.BYE):
            raise self._poison(Pop3ProtocolError("no IMAP greeting (RFC 3501 §7.1)"))
        if greeting.status is Status.BYE:
            raise self._poison(Pop3ConnectionError(f"the server said BYE: {greeting.text}"))
        self.greeting = greeting.text
        self.preauth = greeting.status is Status.PREAUTH
        if greeting.code == "CAPABILITY":
            self.capabilities = frozenset(greeting.args.upper().split())
        else:
            await self.capability()
        if self._endpoint.tls is not TlsMode.STARTTLS:
            return
        # RFC 3501 §6.2.1 / RFC 2595: STARTTLS only when offered; required TLS is never
        # silently skipped (docs/design.md §12).
        if "STARTTLS" not in self.capabilities:
            raise Pop3TlsError("TLS required, but the server does not offer STARTTLS")
        if self.preauth:
            raise Pop3TlsError("the server authenticated us in clear text (PREAUTH); no STARTTLS")
        status, _ = await self._command("STARTTLS")
        if status.status is not Status.OK:
            raise Pop3TlsError(f"the server refused STARTTLS: {status.text}")
        if self._rr.buffered:
            # Bytes after the OK arrived in clear text; taken as if they came over TLS they
            # would be a man in the middle's injection (CVE-2011-0411 and its IMAP kin).
            raise self._poison(Pop3ProtocolError("data after the STARTTLS answer, in clear"))
        if ctx is None:  # pragma: no cover (connect() makes one for every TLS mode)
            raise AssertionError("STARTTLS without an SSL context")
        try:
            await start_tls(self._writer, ctx, hostname, self._timeouts)
        except Pop3Error as exc:
            raise self._poison(exc) from None
        self.tls_active = True
        await self.capability()  # RFC 3501 §6.2.1: forget what was learnt in clear; ask again

    async def capability(self) -> frozenset[str]:
        status, _ = await self._command("CAPABILITY")
        self._check(status, "CAPABILITY")
        return self.capabilities

    # -- plumbing ------------------------------------------------------------------------------

    def _poison(self, exc: Pop3Error) -> Pop3Error:
        """Mark the stream unusable and drop it; return ``exc`` for the caller to raise."""
        if self._broken is None:
            self._broken = str(exc)
            self._writer.transport.abort()
        return exc

    def _usable(self) -> None:
        if self._broken is not None:
            raise Pop3ConnectionError(f"connection unusable ({self._broken})")

    def _until(self) -> float:
        """The event loop's time by which a command begun now must be answered in full: one
        total deadline per command, so a server that keeps sending untagged responses and
        never the tagged one (or IDLE's continuation) cannot hold it (docs/design.md §10.2)."""
        return asyncio.get_running_loop().time() + self._timeouts.command

    async def _read(
        self, *, long: bool = False, deadline: bool = True, until: float | None = None
    ) -> Response | Continuation:
        """The next response.  ``long``: a FETCH of messages, deadline per read; without
        ``deadline`` (waiting in IDLE) no deadline at all; ``until``: the command's total
        deadline (:meth:`_until`), else ``command`` for this response alone."""
        ev = await self._read_event(long=long, deadline=deadline, until=until)
        if isinstance(ev, LiteralChunk):  # pragma: no cover (streams only in _read_spooled)
            raise self._poison(Pop3ProtocolError("a literal streamed outside a FETCH"))
        return ev

    async def _read_spooled(
        self, sink: Callable[[], SpoolSink] | None
    ) -> tuple[Response | Continuation, builtins.list[Spooled]]:
        """The next response of a UID FETCH, and the spool files of its streamed literals, in
        order (each into a new ``sink()``; without ``sink`` their chunks are dropped).  A
        failure on the way (the sink's StateError, the server's error, a cancellation) removes
        what this response spooled and leaves the stream unusable: it stopped in the middle
        of a response (the POP3 client's ``_spool`` does the same)."""
        files: builtins.list[Spooled] = []
        current: SpoolSink | None = None
        try:
            while True:
                ev = await self._read_event(long=True, deadline=True)
                if not isinstance(ev, LiteralChunk):
                    return ev, files
                if sink is None:
                    continue
                if current is None:
                    current = sink()
                await current.write(ev.data)
                if ev.end:
                    files.append(await current.finish())
                    current = None
        except BaseException as exc:
            if current is not None:
                current.discard()
            for spooled in files:
                spooled.remove()
            if not isinstance(exc, Pop3Error):  # the sink's own failure, or a cancellation
                self._poison(Pop3ConnectionError("stopped in the middle of a message"))
            raise

    async def _read_event(
        self, *, long: bool, deadline: bool, until: float | None = None
    ) -> Response | Continuation | LiteralChunk:
        self._usable()
        rr, reader = self._rr, self._reader
        try:
            if long or not deadline:
                while isinstance(ev := rr.next_event(), NeedData):
                    if deadline:
                        async with asyncio.timeout(self._timeouts.idle_read):
                            data = await reader.read(_CHUNK)
                    else:
                        data = await reader.read(_CHUNK)
                    rr.receive_data(data)
            else:
                async with asyncio.timeout_at(self._until() if until is None else until):
                    while isinstance(ev := rr.next_event(), NeedData):
                        rr.receive_data(await reader.read(_CHUNK))
        except TimeoutError:
            what = "the server stalled in a message" if long else "no answer in time"
            raise self._poison(Pop3TimeoutError(f"IMAP: {what}")) from None
        except Pop3Error as exc:
            raise self._poison(exc) from None
        except OSError as exc:  # ssl.SSLError included
            raise self._poison(Pop3ConnectionError(f"connection broke: {exc}")) from None
        except Exception as exc:
            # The parser failed in a way nobody foresaw: that costs this server its session.
            raise self._poison(
                Pop3ProtocolError(f"unreadable IMAP response ({type(exc).__name__})")
            ) from exc
        except BaseException:
            # Cancelled while reading: whoever came next would read the rest of a response.
            self._poison(Pop3ConnectionError("cancelled while reading a response"))
            raise
        if self._log is not None and not isinstance(ev, LiteralChunk):
            self._log.debug("S: %s", _describe(ev))
        return ev

    def _next_tag(self) -> str:
        self._tags += 1
        return f"C{self._tags}"

    async def _write(self, data: bytes) -> None:
        self._writer.write(data)
        try:
            async with asyncio.timeout(self._timeouts.command):
                await self._writer.drain()
        except TimeoutError:
            raise self._poison(Pop3TimeoutError("timed out sending a command")) from None
        except OSError as exc:
            raise self._poison(Pop3ConnectionError(f"connection broke: {exc}")) from None

    async def _send(self, verb: str, *args: Arg, secret: bool = False) -> str:
        """Write one command (its literals too); return its tag.  ``secret``: the transcript
        shows the verb and ``****`` (LOGIN, AUTHENTICATE)."""
        self._usable()
        await self._drain_abandoned()
        tag = self._next_tag()
        pieces = command(tag, verb, *args)
        if self._log is not None:
            if secret:
                shown = f" {args[0]} ****" if verb == "AUTHENTICATE" and args else " ****"
            else:
                shown = "".join(
                    f" {{{len(a.data)}}}" if isinstance(a, LiteralArg) else f" {a}" for a in args
                )
            self._log.debug("C: %s %s%s", tag, verb, shown)
        plus = "LITERAL+" in self.capabilities
        for piece in pieces:
            if not isinstance(piece, LiteralArg):
                await self._write(piece)
                continue
            marker = f"{{{len(piece.data)}{'+' if plus else ''}}}\r\n".encode("ascii")
            await self._write(marker)
            if not plus:
                # RFC 3501 §7.5: a synchronising literal waits for the continuation.
                until = self._until()
                while True:
                    ev = await self._read(until=until)
                    if isinstance(ev, Continuation):
                        break
                    if ev.tag == tag:
                        status = parse_status(ev)
                        raise self._refusal(verb, status)
                    self._untagged(ev, verb)
            self._writer.write(piece.data)
        return tag

    async def _drain_abandoned(self) -> None:
        """Read to its end a UID FETCH whose responses a caller stopped reading."""
        if self._open_fetch is not None:
            tag, cap, above = self._open_fetch
            self._open_fetch = None
            self._rr.max_literal = cap
            self._rr.stream_above = above  # a large message's chunks are dropped as they come
            while True:
                ev, _ = await self._read_spooled(None)
                if isinstance(ev, Continuation):
                    raise self._poison(Pop3ProtocolError("an unexpected IMAP continuation"))
                if ev.tag == tag:
                    break
                self._untagged(ev, "UID FETCH")
        self._rr.max_literal = DEFAULT_LITERAL
        self._rr.stream_above = None

    def _untagged(self, ev: Response, verb: str) -> None:
        if ev.tag != "*":
            raise self._poison(
                Pop3ProtocolError(f"an IMAP answer with an unknown tag to {verb}: {ev.tag}")
            )
        self._note(ev)

    def _note(self, ev: Response) -> None:
        """Keep track of what untagged responses tell about the session (module doc)."""
        number = parse_number(ev)
        if number is not None:
            n, kind = number
            if kind == "EXISTS":
                if n > self.exists:
                    self.new_mail = True
                self.exists = n
            elif kind == "EXPUNGE":
                self.exists = max(self.exists - 1, 0)
            return
        status = parse_status(ev)
        if status is not None:
            if status.status is Status.BYE and not self._logging_out:
                raise self._poison(Pop3ConnectionError(f"the server said BYE: {status.text}"))
            if status.code == "CAPABILITY":
                self.capabilities = frozenset(status.args.upper().split())
            elif status.code == "ALERT":
                # RFC 3501 §7.1: text the server wants a human to read.
                log.warning("IMAP server %s says: %s", self._endpoint.host, status.text)
            elif (
                status.code == "UIDVALIDITY"
                and self.selected is not None
                and parse_nz_number(status.args) != self.selected.uidvalidity
            ):
                raise self._poison(
                    Pop3ProtocolError("the folder's UIDVALIDITY changed during the session")
                )
            return
        words = parse_words(ev, "CAPABILITY")
        if words is not None:
            self.capabilities = frozenset(w.upper() for w in words)

    async def _command(
        self, verb: str, *args: Arg, secret: bool = False, keep: bool = False
    ) -> tuple[StatusResponse, list[Response]]:
        """Send a command and read to its tagged answer; the untagged responses are noted
        (and returned with ``keep``, at most MAX_UNTAGGED and MAX_KEPT octets)."""
        tag = await self._send(verb, *args, secret=secret)
        return await self._finish(tag, verb, keep=keep)

    async def _finish(
        self, tag: str, verb: str, *, keep: bool = False
    ) -> tuple[StatusResponse, list[Response]]:
        kept: list[Response] = []
        kept_octets = 0
        until = self._until()
        while True:
            ev = await self._read(until=until)
            if isinstance(ev, Continuation):
                raise self._poison(Pop3ProtocolError(f"an unexpected IMAP continuation to {verb}"))
            if ev.tag != tag:
                self._untagged(ev, verb)
                if keep:
                    kept.append(ev)
                    kept_octets += ev.size
                    if len(kept) > MAX_UNTAGGED:
                        raise self._poison(Pop3ProtocolError(f"too many responses to {verb}"))
                    if kept_octets > MAX_KEPT:
                        raise self._poison(
                            Pop3ProtocolError(f"responses to {verb} over {MAX_KEPT} octets")
                        )
                continue
            status = parse_status(ev)
            if status is None or status.status not in (Status.OK, Status.NO, Status.BAD):
                raise self._poison(Pop3ProtocolError(f"an unreadable tagged answer to {verb}"))
            if status.code == "CAPABILITY":
                self.capabilities = frozenset(status.args.upper().split())
            return status, kept

    def _refusal(self, verb: str, status: StatusResponse | None) -> ImapResponseError:
        if status is None:
            return ImapResponseError(verb, "an unreadable answer", None, status="BAD")
        return ImapResponseError(verb, status.text, status.code, status=status.status.value)

    def _check(self, status: StatusResponse, verb: str) -> None:
        if status.status is not Status.OK:
            raise self._refusal(verb, status)

    # -- login ---------------------------------------------------------------------------------

    async def login(
        self, username: str, password: str | TokenSource, method: ImapAuth = ImapAuth.AUTO
    ) -> None:
        """Authenticate; raises ImapAuthError (with the RFC 5530 code) on NO.

        ``auto``: AUTHENTICATE PLAIN when offered, else LOGIN.  For XOAUTH2 ``password`` is the
        access token or a token source awaited now (whatever it raises propagates).
        """
        if self.preauth:
            return
        self._caps_fresh = False
        if method is ImapAuth.AUTO:
            method = ImapAuth.PLAIN if "AUTH=PLAIN" in self.capabilities else ImapAuth.LOGIN
        if method is ImapAuth.XOAUTH2:
            token = password if isinstance(password, str) else await password()
            await self._authenticate("XOAUTH2", sasl_xoauth2(username, token), xoauth2=True)
        elif not isinstance(password, str):
            raise TypeError(f"auth {method.value} needs a password, not a token source")
        elif method is ImapAuth.PLAIN:
            await self._authenticate("PLAIN", sasl_plain(username, password))
        else:
            if "LOGINDISABLED" in self.capabilities:
                # RFC 3501 §6.2.3: LOGIN is refused over this connection (no TLS).
                raise ImapAuthError(
                    "LOGIN",
                    "the server disables LOGIN on this connection; use TLS",
                    "PRIVACYREQUIRED",
                )
            status, _ = await self._command(
                "LOGIN", astring(username), astring(password), secret=True
            )
            self._auth_ok(status, "LOGIN")
        if not self._caps_fresh:
            # RFC 3501 §7.2.1: capabilities may change after login; most servers send them
            # in the OK (Dovecot does), the others are asked.
            await self.capability()

    async def _authenticate(self, mechanism: str, response: str, *, xoauth2: bool = False) -> None:
        what = f"AUTHENTICATE {mechanism}"
        if f"AUTH={mechanism}" not in self.capabilities and not xoauth2:
            raise ImapAuthError(
                what, f"the server does not offer {mechanism}", "AUTHENTICATIONFAILED"
            )
        # One deadline for the whole exchange: a server that keeps sending challenges
        # cannot hold the login.
        until = self._until()
        if "SASL-IR" in self.capabilities:  # RFC 4959: the response with the command
            tag = await self._send("AUTHENTICATE", mechanism, response, secret=True)
        else:
            tag = await self._send("AUTHENTICATE", mechanism, secret=True)
            ev = await self._read(until=until)
            if isinstance(ev, Response):
                if ev.tag == tag:
                    self._auth_ok(parse_status(ev), what)
                    raise self._poison(Pop3ProtocolError(f"{what} ended before any exchange"))
                raise self._poison(Pop3ProtocolError(f"an unexpected answer to {what}"))
            await self._write(response.encode("ascii") + b"\r\n")
            if self._log is not None:
                self._log.debug("C: ****")
        status = ""
        while True:
            ev = await self._read(until=until)
            if isinstance(ev, Continuation):
                # XOAUTH2's error challenge (base64 JSON): answer it with an empty line, and
                # the server says NO (Google's and Microsoft's XOAUTH2 protocol).
                try:
                    status = xoauth2_status(ev.text.decode("ascii", "replace")) or status
                except Pop3ProtocolError as exc:
                    raise self._poison(exc) from None
                await self._write(b"\r\n")
                continue
            if ev.tag != tag:
                self._untagged(ev, what)
                continue
            result = parse_status(ev)
            if xoauth2 and result is not None and result.status is not Status.OK:
                why = f"status {status}, " if status else ""
                raise ImapAuthError(
                    what,
                    f"the OAuth2 access token was refused or has expired ({why}server said: "
                    f"{result.text or 'nothing'}); refresh it with the token helper",
                    result.code,
                    status=result.status.value,
                )
            self._auth_ok(result, what)
            return

    def _auth_ok(self, status: StatusResponse | None, what: str) -> None:
        if status is None:
            raise self._poison(Pop3ProtocolError(f"an unreadable answer to {what}"))
        if status.code == "CAPABILITY":
            self.capabilities = frozenset(status.args.upper().split())
            self._caps_fresh = True
        if status.status is not Status.OK:
            raise ImapAuthError(what, status.text, status.code, status=status.status.value)

    # -- the folder ----------------------------------------------------------------------------

    async def mailbox_name(self, folder: str) -> str:
        """The configured folder as this server names it: ``/`` between levels becomes the
        server's separator (``LIST "" ""``, RFC 3501 §6.3.8), each level modified UTF-7.
        ``INBOX`` is case-insensitive (RFC 3501 §5.1) and sent as it is."""
        try:
            levels = folder_levels(folder)
        except ValueError as exc:
            raise ImapResponseError("SELECT", str(exc), "NONEXISTENT") from None
        separator: str | None = "/"
        if len(levels) > 1:
            separator = await self._separator()
        try:
            return server_mailbox_name(levels, separator)
        except ValueError as exc:
            raise ImapResponseError("SELECT", f"folder {folder!r}: {exc}", "NONEXISTENT") from None

    async def _separator(self) -> str | None:
        status, kept = await self._command("LIST", '""', '""', keep=True)
        self._check(status, "LIST")
        for ev in kept:
            listed = parse_list(ev)
            if listed is not None:
                return listed.separator
        raise self._poison(Pop3ProtocolError("LIST did not report a hierarchy separator"))

    async def _listed(self, name: str) -> bool:
        status, kept = await self._command("LIST", '""', name, keep=True)
        self._check(status, "LIST")
        return any(parse_list(ev) is not None for ev in kept)

    async def select(self, folder: str, *, read_only: bool = False) -> Selected:
        """SELECT (or EXAMINE) ``folder``; ImapResponseError when it cannot be opened."""
        verb = "EXAMINE" if read_only else "SELECT"
        name = await self.mailbox_name(folder)
        self.selected = None
        self.exists = 0
        status, kept = await self._command(verb, name, keep=True)
        if status.status is not Status.OK:
            if status.code in (None, "TRYCREATE") and not await self._listed(name):
                # Servers say "no such folder" differently (RFC 5530 NONEXISTENT, or a plain
                # NO as Dovecot does); asked with LIST, it is a setting to fix, not a retry.
                raise ImapResponseError(
                    verb, f"the folder {folder!r} does not exist ({status.text})", "NONEXISTENT"
                )
            raise self._refusal(verb, status)
        uidvalidity: int | None = None
        uidnext: int | None = None
        for ev in kept:
            s = parse_status(ev)
            if s is None or s.status is not Status.OK:
                continue
            if s.code in ("UIDVALIDITY", "UIDNEXT"):
                n = parse_nz_number(s.args)
                if n is None:
                    # RFC 3501 §7.1: both are nz-number; anything else is this server's fault.
                    raise self._poison(
                        Pop3ProtocolError(f"{verb} reported an invalid {s.code}: {s.args[:40]}")
                    )
                if s.code == "UIDVALIDITY":
                    uidvalidity = n
                else:
                    uidnext = n
        if uidvalidity is None:
            # RFC 3501 §6.3.1: REQUIRED.  Without it no UID can be trusted across sessions.
            raise self._poison(Pop3ProtocolError(f"{verb} did not report UIDVALIDITY"))
        self.selected = Selected(
            self.exists, uidvalidity, uidnext, read_only or status.code == "READ-ONLY"
        )
        self.new_mail = False
        return self.selected

    # -- messages ------------------------------------------------------------------------------

    async def listing(self) -> builtins.list[tuple[int, int]]:
        """(UID, RFC822.SIZE) of every message in the selected folder, by UID."""
        if self.exists == 0:
            return []
        out: dict[int, int] = {}
        async for item in self.uid_fetch("1:*", "(UID RFC822.SIZE)", max_literal=DEFAULT_LITERAL):
            if item.uid is None or item.size is None:
                continue  # an unsolicited FETCH (flags another client changed)
            if item.uid in out:
                raise self._poison(Pop3ProtocolError(f"UID {item.uid} listed twice"))
            out[item.uid] = item.size
            if len(out) > MAX_LISTING:
                raise self._poison(Pop3ProtocolError(f"a listing of over {MAX_LISTING} messages"))
        return sorted(out.items())

    async def uid_fetch(
        self, uids: str, items: str, *, max_literal: int
    ) -> AsyncGenerator[Fetched, None]:
        """Yield each FETCH response of ``UID FETCH uids items`` as it arrives (RFC 3501 §6.4.8).

        ``max_literal`` caps every literal (a message body) of the responses.  A caller that
        stops early leaves the rest to be read (and dropped) by the next command.
        """
        async for fetched, _ in self.uid_fetch_spooled(
            uids, items, max_literal=max_literal, spooling=None
        ):
            yield fetched

    async def uid_fetch_spooled(
        self, uids: str, items: str, *, max_literal: int, spooling: Spooling | None
    ) -> AsyncGenerator[tuple[Fetched, dict[str, Spooled]], None]:
        """:meth:`uid_fetch`, with each literal longer than ``spooling.above`` streamed into a
        new ``spooling.sink()`` (docs/design.md §5.3): yields each FETCH response with the
        spool files of its sections that were streamed (``Fetched.bodies`` holds an empty
        value for them).  The caller owns the files yielded (and removes them); every other
        file (a FETCH without a UID, a literal that is no body) is removed here.
        """
        tag = await self._send("UID FETCH", uids, items)
        above = spooling.above if spooling is not None else None
        sink = spooling.sink if spooling is not None else None
        self._open_fetch = (tag, max_literal, above)
        # Not a try/finally: a caller that breaks out of its loop leaves this generator
        # suspended (closed later by the event loop), and _open_fetch tells the next command.
        while self._fetching(tag):
            self._rr.max_literal = max_literal
            self._rr.stream_above = above
            ev, files = await self._read_spooled(sink)
            if isinstance(ev, Continuation) or ev.tag == tag:
                for spooled in files:
                    spooled.remove()  # a literal in a status response: not a message
            if isinstance(ev, Continuation):
                raise self._poison(Pop3ProtocolError("an unexpected IMAP continuation"))
            if ev.tag == tag:
                self._open_fetch = None
                self._rr.max_literal = DEFAULT_LITERAL
                self._rr.stream_above = None
                status = parse_status(ev)
                if status is None or status.status is not Status.OK:
                    raise self._refusal("UID FETCH", status)
                return
            try:
                self._untagged(ev, "UID FETCH")
                fetched = parse_fetch(ev)
            except BaseException:
                for spooled in files:
                    spooled.remove()
                raise
            by_literal = dict(zip(ev.streamed, files, strict=True))
            found: dict[str, Spooled] = {}
            if fetched is not None and fetched.uid is not None:
                found = {s: by_literal.pop(i) for s, i in fetched.streamed.items()}
            for spooled in by_literal.values():
                spooled.remove()
            if fetched is not None and fetched.uid is not None:
                yield fetched, found

    def _fetching(self, tag: str) -> bool:
        """Whether the UID FETCH ``tag`` is still open (not read to its end by someone)."""
        return self._open_fetch is not None and self._open_fetch[0] == tag

    async def store_deleted(self, uids: str) -> None:
        """``UID STORE uids +FLAGS.SILENT (\\Deleted)`` (RFC 3501 §6.4.6)."""
        status, _ = await self._command("UID STORE", uids, "+FLAGS.SILENT", r"(\Deleted)")
        self._check(status, "UID STORE")

    async def uid_expunge(self, uids: str) -> None:
        """``UID EXPUNGE uids`` (RFC 4315 §2.1): only these, if ``\\Deleted``."""
        status, _ = await self._command("UID EXPUNGE", uids)
        self._check(status, "UID EXPUNGE")

    async def expunge(self) -> None:
        """``EXPUNGE``: every ``\\Deleted`` message of the folder (RFC 3501 §6.4.3)."""
        status, _ = await self._command("EXPUNGE")
        self._check(status, "EXPUNGE")

    async def uid_search(self, *criteria: str) -> builtins.list[int]:
        status, kept = await self._command("UID SEARCH", *criteria, keep=True)
        self._check(status, "UID SEARCH")
        found: list[int] = []
        for ev in kept:
            words = parse_words(ev, "SEARCH")
            if words is None:
                continue
            for w in words:
                if not (w.isascii() and w.isdigit()) or len(w) > 10:
                    raise self._poison(Pop3ProtocolError("a SEARCH answer that is not UIDs"))
                found.append(int(w))
        return found

    async def noop(self) -> None:
        status, _ = await self._command("NOOP")
        self._check(status, "NOOP")

    # -- IDLE (RFC 2177) -----------------------------------------------------------------------

    @property
    def idling(self) -> bool:
        return self._idle_tag is not None

    async def idle(self) -> None:
        """Start IDLE; returns once the server's continuation says it is idling (within one
        ``command`` deadline, untagged responses before it included)."""
        tag = await self._send("IDLE")
        until = self._until()
        while True:
            ev = await self._read(until=until)
            if isinstance(ev, Continuation):
                self._idle_tag = tag
                return
            if ev.tag == tag:
                raise self._refusal("IDLE", parse_status(ev))
            self._untagged(ev, "IDLE")

    async def idle_response(self) -> Response:
        """The next response while idling, without a deadline (the caller bounds the wait).
        Untagged ones are noted (``new_mail``); the tagged end of IDLE clears ``idling``."""
        ev = await self._read(deadline=False)
        if isinstance(ev, Continuation):
            raise self._poison(Pop3ProtocolError("an unexpected IMAP continuation in IDLE"))
        if ev.tag == self._idle_tag:
            self._idle_tag = None
            status = parse_status(ev)
            if status is None or status.status is not Status.OK:
                raise self._refusal("IDLE", status)
            return ev
        self._untagged(ev, "IDLE")
        return ev

    def send_done(self) -> None:
        """Write ``DONE`` (RFC 2177 §3); the tagged end of IDLE follows, read by
        :meth:`idle_response` or :meth:`idle_done`."""
        self._usable()
        if self._log is not None:
            self._log.debug("C: DONE")
        self._writer.write(b"DONE\r\n")

    async def idle_done(self) -> None:
        """End IDLE: DONE, then read to its tagged answer (within the command deadline)."""
        if self._idle_tag is None:
            return
        self.send_done()
        await self._write(b"")
        until = self._until()
        while self._idle_tag is not None:
            ev = await self._read(until=until)
            if isinstance(ev, Continuation):
                raise self._poison(Pop3ProtocolError("an unexpected IMAP continuation"))
            if ev.tag == self._idle_tag:
                self._idle_tag = None
                self._check(parse_status(ev) or self._bad(), "IDLE")
                return
            self._untagged(ev, "IDLE")

    def _bad(self) -> StatusResponse:
        return StatusResponse(Status.BAD, None, "", "an unreadable answer")

    # -- the end -------------------------------------------------------------------------------

    async def logout(self) -> str:
        """LOGOUT (RFC 3501 §6.1.3) and close.  A failure here is only logged: nothing depends
        on it (expunged messages are gone already).  Returns the server's text."""
        text = ""
        try:
            if self._broken is None:
                if self._idle_tag is not None:
                    await self.idle_done()
                self._logging_out = True
                status, _ = await self._command("LOGOUT")
                text = status.text
        except Pop3Error as exc:
            log.debug("IMAP LOGOUT to %s failed: %s", self._endpoint.host, exc)
        finally:
            await self.close()
        return text

    async def close(self) -> None:
        """Drop the connection without LOGOUT.  Idempotent."""
        if self._broken is None:
            self._broken = "closed"
            self._writer.close()
        try:
            async with asyncio.timeout(min(self._timeouts.command, 5.0)):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            pass  # already gone; nothing more to do for a socket we are dropping

    @property
    def closed(self) -> bool:
        return self._broken is not None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
