"""asyncio streams shell around the sans-I/O POP3 core (``protocol.py``).

The shell writes what ``Connection.send()`` returns and loops on ``next_event()``, reading big
chunks on NEED_DATA (never ``readline``: the StreamReader's 64 KiB line limit breaks on real
mail).  Each phase has its own deadline (docs/design.md §10.2): ``connect`` for TCP and TLS
handshakes, ``command`` for a whole single-line reply, ``idle_read`` for each read of a RETR/TOP
reply, so a big message never hits a total deadline while bytes keep coming.

Replies are matched to commands by a FIFO, so commands can be pipelined (RFC 2449 §6.6):
``retrieve_many`` keeps several RETRs in flight
(bounded by count and by octets, from LIST), and a ``dele()`` called between two of its
messages simply queues behind them; replies read on someone else's behalf are stashed until
claimed.

A message too large to hold in memory is streamed instead (``retrieve_many(...,
spooling=...)``, docs/design.md §5.3): its RETR is sent in the core's streaming mode and each
chunk goes to a sink (a spool file) as it is read, so the session holds a chunk and one read of
it, never the message.  Every RETR of ``retrieve_many`` is first charged to the shared memory
budget (``budget=``, docs/design.md §10.6); one that does not fit waits, or, behind others in
the window, is sent later.

DELE is pipelined too when the server offers PIPELINING: ``dele()`` sends the command and
returns without waiting for the reply, which is checked when it arrives (while reading a later
reply, or in ``quit()``, which reads every outstanding DELE reply before it sends QUIT).  A
``-ERR`` to DELE raises Pop3ResponseError at that point, and afterwards ``quit()`` refuses to
send QUIT: it closes the connection and raises again.  Why: a refused DELE means our numbering
and the server's disagree about something, and without QUIT the server deletes nothing (RFC
1939 §6), so every message of the session stays upstream; the ledger already knows which were
delivered, and the next cycle only DELEs those.  That is safe; a QUIT could not be taken back.

After a timeout, a protocol error, a broken connection or a cancellation in the middle of a
reply, the stream is out of sync: the client aborts the connection, and every later call raises
Pop3ConnectionError (aiosmtplib does the same; poplib's tests show what reuse does).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import contextlib
import enum
import json
import logging
import ssl
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self, assert_never

from connector.budget import MemoryBudget
from connector.errors import (
    Pop3AuthError,
    Pop3ConnectionError,
    Pop3Error,
    Pop3ProtocolError,
    Pop3ResponseError,
    Pop3TimeoutError,
    Pop3TlsError,
)
from connector.pop3.protocol import (
    Capabilities,
    Closed,
    Command,
    Connection,
    Continuation,
    Err,
    Event,
    Greeting,
    Listing,
    LocalProtocolError,
    Message,
    MessageChunk,
    MessageEnd,
    NeedData,
    Ok,
    State,
    Verb,
    apop_digest,
    parse_stat,
    sasl_plain,
)
from connector.spool import Spooled
from connector.tls import TlsMode, tls_reason_hint

log = logging.getLogger(__name__)

_CHUNK: Final = 256 * 1024  # bytes per read(); big reads keep a 20 MiB RETR cheap
RETR_WINDOW: Final = 32  # RETRs in flight at most (retrieve_many's default)
RETR_WINDOW_OCTETS: Final = 4 * 1024 * 1024  # octets of the RETRs in flight, beyond the first
_STREAM_LIMIT: Final = 1024 * 1024  # the transport pauses reading above 2x this
_MAX_AUTH_LINE: Final = 255  # RFC 5034 §4: longer initial responses wait for "+ "


class AuthMethod(enum.StrEnum):
    """The ``auth`` key (docs/design.md §4.1).  ``auto`` chooses by TLS, CAPA and the greeting
    (see ``login``)."""

    AUTO = "auto"
    USER = "user"
    APOP = "apop"
    PLAIN = "plain"
    XOAUTH2 = "xoauth2"  # never chosen by AUTO: it needs an OAuth2 access token, not a password


# Where XOAUTH2 gets its access token: awaited once per login, so that a token refreshed by an
# external helper between two sessions is picked up.  A plain ``str`` is used as it is.
TokenSource = Callable[[], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Pop3Timeouts:
    """Deadlines per phase, in seconds.  ``idle_read`` bounds each read inside a long RETR."""

    connect: float = 30.0
    command: float = 60.0
    idle_read: float = 60.0


@dataclass(frozen=True, slots=True)
class Retrieved:
    """One message from :meth:`Pop3Client.retrieve_many`.

    ``raw``: the message (CRLF line ends, dots unstuffed).  ``wire``: the same message as it
    came off the wire, still dot-stuffed, when that is byte for byte SMTP's DATA content
    (RFC 1939 §3 and RFC 5321 §4.5.2 stuff alike), else None (see ``protocol.Message``).
    ``spooled``: a message streamed to a spool file instead (``raw`` is then empty).
    """

    number: int
    raw: bytes
    wire: bytes | None
    spooled: Spooled | None = None

    @property
    def message(self) -> bytes | Spooled:
        """The message: its bytes, or its spool file."""
        return self.spooled if self.spooled is not None else self.raw


class SpoolSink(Protocol):
    """Where a streamed RETR's chunks go (``connector.spool.SpoolWriter``)."""

    async def write(self, data: bytes) -> None:
        """Append the message's next octets."""
        ...

    async def finish(self, prefix: bytes = b"") -> Spooled:
        """The message is whole (``prefix`` belongs before it: ``protocol.MessageEnd``)."""
        ...

    def discard(self) -> None:
        """Throw away what was written (synchronous: it runs during a cancellation too)."""
        ...


@dataclass(frozen=True, slots=True)
class Spooling:
    """Which messages :meth:`Pop3Client.retrieve_many` streams, and where: every message
    whose LIST size is above ``above`` octets (or unknown) goes to a new ``sink()``."""

    above: int
    sink: Callable[[], SpoolSink]


@dataclass(frozen=True, slots=True)
class _SpooledReply:
    """A streamed RETR's reply once its message is whole in its sink (kept in the stash)."""

    spooled: Spooled


@dataclass(frozen=True, slots=True)
class Pop3Endpoint:
    """Where and how to connect.  Without ``ssl_context`` TLS uses the system's default trust.

    Compared by value, so that a reload can tell a changed account from an unchanged one.  An
    ``SSLContext`` compares by identity and a reload builds a new one, so it is left out of the
    comparison; ``verify_certificate`` and ``ca_file``, what it was built from, stand in for it.
    """

    host: str
    port: int
    tls: TlsMode
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)
    server_hostname: str | None = None  # default: host
    verify_certificate: bool = True  # ssl_context's inputs: compared, never read here
    ca_file: Path | None = None


def sasl_xoauth2(username: str, token: str) -> str:
    """The XOAUTH2 initial client response: base64 of ``user=U^Aauth=Bearer T^A^A``.

    Google's and Microsoft's XOAUTH2 documentation (the format RFC 7628 §3.1 later standardised
    as OAUTHBEARER, without its GS2 header).  ``^A`` is the byte 0x01, which therefore may not
    appear in either value.
    """
    if "\x01" in username + token or any(c in token for c in " \r\n"):
        raise ValueError("invalid character in the XOAUTH2 user name or access token")
    raw = f"user={username}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode()).decode("ascii")


MAX_XOAUTH2_CHALLENGE: Final = 4096
"""Characters of an XOAUTH2 error challenge (base64): Google's and Microsoft's are about a
hundred; a longer one is not decoded."""


def xoauth2_status(challenge: str) -> str:
    """The ``status`` of an XOAUTH2 error challenge (base64 JSON, e.g. ``{"status":"401",...}``).

    Only a short alphanumeric status is returned, so whatever else the server put there can
    never reach a log line; "" for an empty challenge or JSON without a status.  A challenge
    over MAX_XOAUTH2_CHALLENGE, or one that does not decode (not base64, not JSON, or JSON
    nested deep enough to raise RecursionError in ``json.loads``), raises Pop3ProtocolError:
    the server's fault, which costs its session and never the service.
    """
    if not challenge:
        return ""
    if len(challenge) > MAX_XOAUTH2_CHALLENGE:
        raise Pop3ProtocolError(f"an XOAUTH2 challenge over {MAX_XOAUTH2_CHALLENGE} characters")
    try:
        data = json.loads(base64.b64decode(challenge, validate=True))
    except (binascii.Error, ValueError, RecursionError):
        raise Pop3ProtocolError("an XOAUTH2 challenge that is not base64 JSON") from None
    status = data.get("status") if isinstance(data, dict) else None
    if isinstance(status, str | int) and str(status).isalnum() and len(str(status)) <= 16:
        return str(status)
    return ""


def _redact(cmd: Command) -> str:
    """The command as the transcript shows it: no password, digest or SASL data."""
    match cmd.verb:
        case Verb.PASS:
            return "PASS ****"
        case Verb.APOP:
            return f"APOP {cmd.args[0]} ****"
        case Verb.AUTH:
            return f"AUTH {cmd.args[0]}" + (" ****" if len(cmd.args) > 1 else "")
        case _:
            return cmd.to_bytes().decode(errors="replace").rstrip()


def _describe(event: Event) -> str:
    """A reply as the transcript shows it: message bodies summarised, never logged."""
    match event:
        case Greeting(text=text) | Ok(text=text):
            return f"+OK {text}".rstrip()
        case Err(text=text, resp_code=code):
            return f"-ERR {f'[{code}] ' if code else ''}{text}".rstrip()
        case Continuation():
            return "+ ****"
        case Message(raw=raw):
            return f"+OK [message, {len(raw)} octets]"
        case MessageEnd(size=size):
            return f"+OK [message, {size} octets, streamed to the spool]"
        case MessageChunk(data=data):
            return f"[{len(data)} octets of a message]"
        case Listing(entries=entries):
            return f"+OK [listing, {len(entries)} entries]"
        case Capabilities(entries=entries):
            return "+OK [capabilities: " + " ".join(name for name, _ in entries) + "]"
        case Closed():
            return "[connection closed]"


def tls_failure(exc: BaseException, *, implicit: bool = False) -> Pop3TlsError:
    """A handshake failure as the administrator reads it (POP3 and IMAP accounts alike)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Pop3TlsError(f"certificate not accepted: {exc.verify_message}")
    hint = tls_reason_hint(getattr(exc, "reason", None)) if implicit else ""
    return Pop3TlsError(f"TLS handshake failed: {exc}{hint}")


async def open_stream(
    endpoint: Pop3Endpoint, timeouts: Pop3Timeouts
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ssl.SSLContext | None, str]:
    """The connection to an account's server, TLS already up when it is implicit; with the
    context and the name to check for a later STLS/STARTTLS.  Used by the POP3 and the IMAP
    client, whose accounts share ``Pop3Endpoint`` and the failure classes."""
    ctx = endpoint.ssl_context
    if ctx is None and endpoint.tls is not TlsMode.NONE:
        ctx = ssl.create_default_context()
    hostname = endpoint.server_hostname or endpoint.host
    implicit = endpoint.tls is TlsMode.IMPLICIT
    try:
        async with asyncio.timeout(timeouts.connect):
            reader, writer = await asyncio.open_connection(
                endpoint.host,
                endpoint.port,
                ssl=ctx if implicit else None,
                server_hostname=hostname if implicit else None,
                limit=_STREAM_LIMIT,
            )
    except ssl.SSLError as exc:
        raise tls_failure(exc, implicit=implicit) from None
    except TimeoutError:
        raise Pop3TimeoutError(f"connect to {endpoint.host}:{endpoint.port} timed out") from None
    except OSError as exc:
        raise Pop3ConnectionError(
            f"cannot connect to {endpoint.host}:{endpoint.port}: {exc.strerror or exc}"
        ) from None
    return reader, writer, ctx, hostname


async def start_tls(
    writer: asyncio.StreamWriter, ctx: ssl.SSLContext, hostname: str, timeouts: Pop3Timeouts
) -> None:
    """The handshake after STLS (RFC 2595 §4) or STARTTLS (RFC 3501 §6.2.1) was accepted, its
    failures as our error classes; the caller drops the connection on any of them."""
    try:
        async with asyncio.timeout(timeouts.connect):
            await writer.start_tls(ctx, server_hostname=hostname)
    except ssl.SSLError as exc:
        raise tls_failure(exc) from None
    except TimeoutError:
        raise Pop3TimeoutError("TLS handshake timed out") from None
    except OSError as exc:
        raise Pop3ConnectionError(f"TLS handshake failed: {exc}") from None


class Pop3Client:
    """One POP3 session.  Use ``async with await Pop3Client.connect(...) as c``.

    Every method raises only ``connector.errors.Pop3Error`` subclasses. After a timeout or a
    protocol error the connection is closed and every further call raises Pop3ConnectionError.
    One task at a time: the methods are not safe to call concurrently.
    """

    greeting_text: str
    apop_stamp: str | None
    capabilities: dict[str, list[str]]  # upper-case capability name -> arguments ({} if no CAPA)
    tls_active: bool  # implicit TLS, or STLS completed
    utf8_mode: bool  # the server accepted RFC 6856 UTF8 (see login)

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        endpoint: Pop3Endpoint,
        timeouts: Pop3Timeouts,
        *,
        max_message_size: int,
        transcript: logging.Logger | None,
    ) -> None:
        """Wrap an open stream; use :meth:`connect` instead."""
        self._reader, self._writer = reader, writer
        self._endpoint, self._timeouts = endpoint, timeouts
        self._conn = Connection(max_message_size=max_message_size)
        self._log = transcript
        self._seq = 0
        self._inflight: deque[tuple[int, Verb | None]] = deque([(0, None)])  # greeting
        self._stash: dict[int, Event | _SpooledReply] = {}  # replies read ahead of their claimant
        # Streamed RETRs awaiting their reply: seq -> the sink factory (None: abandoned, the
        # chunks are read and dropped).
        self._streams: dict[int, Callable[[], SpoolSink] | None] = {}
        self._abandoned: set[int] = set()  # replies nobody will claim (retrieve_many stopped)
        self._deles: dict[int, int] = {}  # pipelined DELEs awaiting their reply: seq -> number
        self._outbox: list[bytes] = []  # commands not written yet (see _submit)
        self._outbox_from = 0  # the sequence number of the first of them
        self._dele_failed: Pop3ResponseError | None = None  # a -ERR to DELE: no QUIT then
        self._broken: str | None = None  # why the connection is unusable
        self._count: int | None = None  # STAT's message count: bounds the listings
        self._uidl_ahead: int | None = None  # a UIDL sent with LIST, its reply not yet read
        self._listed: dict[int, int] = {}  # LIST's sizes: bound each RETR
        self.greeting_text, self.apop_stamp, self.capabilities = "", None, {}
        self.tls_active = endpoint.tls is TlsMode.IMPLICIT
        self.utf8_mode = False

    @property
    def pipelining(self) -> bool:
        """True when the server advertised RFC 2449 PIPELINING."""
        return "PIPELINING" in self.capabilities

    # -- connecting ----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        endpoint: Pop3Endpoint,
        timeouts: Pop3Timeouts = Pop3Timeouts(),
        *,
        max_message_size: int = 256 * 1024 * 1024,
        transcript: logging.Logger | None = None,
    ) -> Self:
        """Connect, read the greeting, CAPA, and STLS (then CAPA again) when tls is STARTTLS.

        Raises Pop3TlsError (certificate or handshake failure, STLS not offered or refused),
        Pop3TimeoutError, Pop3ConnectionError, or Pop3ResponseError for a ``-ERR`` greeting.
        """
        reader, writer, ctx, hostname = await open_stream(endpoint, timeouts)
        client = cls(
            reader,
            writer,
            endpoint,
            timeouts,
            max_message_size=max_message_size,
            transcript=transcript,
        )
        try:
            await client._open(ctx, hostname)
        except BaseException:
            await client.close()
            raise
        return client

    async def _open(self, ctx: ssl.SSLContext | None, hostname: str) -> None:
        match await self._reply(0, long=False):
            case Greeting(text=text, apop_stamp=stamp):
                self.greeting_text, self.apop_stamp = text, stamp
            case Err(text=text, resp_code=code):
                raise Pop3ResponseError("greeting", text, code)
            case other:  # pragma: no cover (the core only yields the two above here)
                raise Pop3ProtocolError(f"unexpected greeting event {type(other).__name__}")
        await self._capa()
        if self._endpoint.tls is not TlsMode.STARTTLS:
            return
        # RFC 2595 §4: STLS only if offered; required TLS is never silently skipped.
        if "STLS" not in self.capabilities:
            raise Pop3TlsError("TLS required, but the server does not offer STLS")
        if isinstance(ev := await self._request(Command(Verb.STLS)), Err):
            raise Pop3TlsError(f"the server refused STLS: {ev.text}")
        if ctx is None:  # pragma: no cover (connect() makes one for every TLS mode)
            raise AssertionError("STARTTLS without an SSL context")
        try:
            await start_tls(self._writer, ctx, hostname, self._timeouts)
        except Pop3Error as exc:
            raise self._poison(exc) from None
        self.tls_active = True
        await self._capa()  # RFC 2595 §4: forget what was learnt in clear; ask again

    async def _capa(self) -> None:
        ev = await self._request(Command(Verb.CAPA))
        self.capabilities = ev.as_dict() if isinstance(ev, Capabilities) else {}

    # -- plumbing ------------------------------------------------------------------------------

    def _poison(self, exc: Pop3Error) -> Pop3Error:
        """Mark the stream unusable and drop it; return ``exc`` for the caller to raise."""
        if self._broken is None:
            self._broken = str(exc)
            self._writer.transport.abort()
        return exc

    def _submit(
        self,
        cmd: Command,
        *,
        defer: bool = False,
        expect: int | None = None,
        stream: Callable[[], SpoolSink] | None = None,
    ) -> int:
        """Queue ``cmd`` in the core and the write buffer; return its sequence number.

        ``defer``: hold the bytes back until the next command or flush (pipelined DELEs go out
        together with the next RETRs: one system call, and one wake-up of the server, for many).
        A reply is never awaited for a command still held back (``_read_next``).  ``expect``:
        what bounds the reply (``Connection.send``).  ``stream`` (RETR): stream the message
        into a sink this makes (``_spool``).
        """
        if self._broken is not None:
            raise Pop3ConnectionError(f"connection unusable ({self._broken})")
        data = self._conn.send(cmd, expect=expect, stream=stream is not None)
        if defer:
            if not self._outbox:
                self._outbox_from = self._seq + 1
            self._outbox.append(data)
        elif self._outbox:
            self._outbox.append(data)
            self._write_outbox()
        else:
            self._writer.write(data)
        self._seq += 1
        self._inflight.append((self._seq, cmd.verb))
        if stream is not None:
            self._streams[self._seq] = stream
        if self._log is not None:
            self._log.debug("C: %s", _redact(cmd))
        return self._seq

    def _write_outbox(self) -> None:
        self._writer.write(b"".join(self._outbox))
        self._outbox.clear()

    async def _flush(self) -> None:
        if self._outbox:
            self._write_outbox()
        transport = self._writer.transport
        if transport.get_write_buffer_size() == 0 and not transport.is_closing():
            # Written out already (a command fits the socket buffer): drain() would return at
            # once, and its deadline cost a timer per command.  A broken connection shows at
            # the reply's read.
            return
        try:
            async with asyncio.timeout(self._timeouts.command):
                await self._writer.drain()
        except TimeoutError:
            raise self._poison(Pop3TimeoutError("timed out sending a command")) from None
        except OSError as exc:
            raise self._poison(Pop3ConnectionError(f"connection broke: {exc}")) from None

    async def _read_event(self, long: bool) -> Event:
        """One event for the head of the FIFO.  ``long``: a RETR/TOP, deadline per read."""
        conn, reader = self._conn, self._reader
        try:
            if long:
                while isinstance(ev := conn.next_event(), NeedData):
                    async with asyncio.timeout(self._timeouts.idle_read):
                        data = await reader.read(_CHUNK)
                    conn.receive_data(data)
            else:
                async with asyncio.timeout(self._timeouts.command):
                    while isinstance(ev := conn.next_event(), NeedData):
                        conn.receive_data(await reader.read(_CHUNK))
        except TimeoutError:
            what = "the server stalled in a message" if long else "no reply in time"
            raise self._poison(Pop3TimeoutError(what)) from None
        except Pop3Error as exc:
            raise self._poison(exc) from None
        except OSError as exc:  # ssl.SSLError included
            raise self._poison(Pop3ConnectionError(f"connection broke: {exc}")) from None
        except LocalProtocolError:
            self._poison(Pop3ConnectionError("client misuse"))
            raise  # our own bug, not the server's: classify() says BUG
        except Exception as exc:
            # The parser failed on what the server sent in a way nobody foresaw: that costs
            # this server its session (a cycle), never the service.
            raise self._poison(
                Pop3ProtocolError(f"unreadable reply ({type(exc).__name__})")
            ) from exc
        except BaseException:
            # Cancelled in the middle of a reply: whoever comes next would read our bytes.
            self._poison(Pop3ConnectionError("cancelled in the middle of a reply"))
            raise
        if isinstance(ev, Closed):
            raise self._poison(Pop3ConnectionError("the server closed the connection"))
        if self._log is not None and not isinstance(ev, MessageChunk):
            self._log.debug("S: %s", _describe(ev))
        return ev

    async def _spool(self, head: int, ev: MessageChunk | MessageEnd) -> _SpooledReply | None:
        """Read a streamed RETR's reply to its end, each chunk into the sink registered for
        ``head`` (none, when the RETR was abandoned: the chunks are dropped).  A failure on
        the way (the sink's StateError, the server's error, a cancellation) throws the sink's
        file away and leaves the stream unusable: it stopped in the middle of a reply."""
        factory = self._streams.pop(head, None)
        sink = factory() if factory is not None else None
        try:
            event: Event = ev
            while isinstance(event, MessageChunk):
                if sink is not None:
                    await sink.write(event.data)
                event = await self._read_event(True)
            if not isinstance(event, MessageEnd):  # pragma: no cover (the core ends so)
                raise self._poison(Pop3ProtocolError(f"{type(event).__name__} in a message"))
            if sink is None:
                return None
            return _SpooledReply(await sink.finish(event.prefix))
        except BaseException as exc:
            if sink is not None:
                sink.discard()
            if not isinstance(exc, Pop3Error):  # the sink's own failure, or a cancellation
                self._poison(Pop3ConnectionError("stopped in the middle of a message"))
            raise

    async def _reply(self, seq: int, *, long: bool) -> Event:
        """Read replies in order until the one for ``seq`` is in; stash the others."""
        ev = await self._claim(seq, long=long)
        if isinstance(ev, _SpooledReply):  # pragma: no cover (only retrieve_many streams)
            raise AssertionError("a streamed reply claimed as an event")
        return ev

    async def _claim(self, seq: int, *, long: bool) -> Event | _SpooledReply:
        while seq not in self._stash:
            if not await self._read_next(long):
                break
        return self._stash.pop(seq)

    async def _read_next(self, long: bool = False) -> bool:
        """Read the reply for the head of the FIFO and file it: stashed for its claimant,
        dropped if abandoned, checked if it answers a pipelined DELE.  False for a SASL
        continuation (stashed; AUTH stays in flight until its +OK/-ERR)."""
        if self._broken is not None:
            raise Pop3ConnectionError(f"connection unusable ({self._broken})")
        head, verb = self._inflight[0]
        if self._outbox and head >= self._outbox_from:
            await self._flush()  # never wait for a reply to a command not yet written
        ev: Event | _SpooledReply | None = await self._read_event(
            long or verb in (Verb.RETR, Verb.TOP)
        )
        if isinstance(ev, Continuation):
            self._stash[head] = ev
            return False
        if isinstance(ev, MessageChunk | MessageEnd):
            ev = await self._spool(head, ev)
        else:
            self._streams.pop(head, None)  # an -ERR to a streamed RETR: no sink was made
        self._inflight.popleft()
        if not self._inflight and self._conn.buffered and self._conn.state is not State.CLOSED:
            # Every reply due is in, and more came with the last: nobody asked for it, and
            # taken for the next reply it would shift every reply after it by one (a
            # message's contents included).  The core keeps such bytes; the session ends here.
            raise self._poison(Pop3ProtocolError("the server sent data no command asked for"))
        number = self._deles.pop(head, None)
        if number is not None:
            match ev:
                case Ok():
                    pass
                case Err(text=text, resp_code=code):
                    self._dele_failed = Pop3ResponseError(f"DELE {number}", text, code)
                    raise self._dele_failed
                case _:  # pragma: no cover (single-line commands only get Ok or Err)
                    raise self._poison(Pop3ProtocolError(f"unexpected {type(ev).__name__}"))
        elif head in self._abandoned:
            self._abandoned.discard(head)
            if isinstance(ev, _SpooledReply):  # abandoned while it was being streamed
                ev.spooled.remove()
        elif ev is not None:
            self._stash[head] = ev
        return True

    async def _request(self, cmd: Command, *, expect: int | None = None) -> Event:
        seq = self._submit(cmd, expect=expect)
        await self._flush()
        return await self._reply(seq, long=cmd.verb in (Verb.RETR, Verb.TOP))

    async def _ok(self, cmd: Command) -> str:
        """Send ``cmd``; return the +OK text or raise Pop3ResponseError."""
        match ev := await self._request(cmd):
            case Ok(text=text):
                return text
            case Err(text=text, resp_code=code):
                raise Pop3ResponseError(cmd.verb.value, text, code)
            case _:  # pragma: no cover (single-line commands only get Ok or Err)
                raise self._poison(Pop3ProtocolError(f"unexpected {type(ev).__name__}"))

    @staticmethod
    def _message(ev: Event, verb: str) -> bytes:
        return Pop3Client._message_event(ev, verb).raw

    @staticmethod
    def _message_event(ev: Event, verb: str) -> Message:
        match ev:
            case Message():
                return ev
            case Err(text=text, resp_code=code):
                raise Pop3ResponseError(verb, text, code)
            case _:  # pragma: no cover
                raise Pop3ProtocolError(f"unexpected {type(ev).__name__} to {verb}")

    # -- login ---------------------------------------------------------------------------------

    def _choose(self) -> AuthMethod:
        """AUTO: on TLS, SASL PLAIN, else USER/PASS, else APOP; in clear, APOP (the password
        is not sent), else PLAIN, else USER."""
        plain = "PLAIN" in (m.upper() for m in self.capabilities.get("SASL", []))
        # No CAPA (popa3d answers it -ERR): an RFC 1939 server, USER/PASS.  GNU mailutils
        # pop3d puts an APOP stamp in its greeting even without an APOP database: in clear,
        # APOP is tried and refused (configure auth = "user"); over TLS, USER is chosen.
        user = "USER" in self.capabilities or not self.capabilities
        if self.tls_active:
            if plain:
                return AuthMethod.PLAIN
            return AuthMethod.APOP if self.apop_stamp and not user else AuthMethod.USER
        if self.apop_stamp:
            return AuthMethod.APOP
        return AuthMethod.PLAIN if plain else AuthMethod.USER

    async def login(
        self, username: str, password: str | TokenSource, method: AuthMethod = AuthMethod.AUTO
    ) -> None:
        """Authenticate; raises Pop3AuthError (with the RFC 2449 resp_code) on -ERR.

        For XOAUTH2 ``password`` is the access token, or a :data:`TokenSource` awaited now
        (whatever it raises propagates); every other method needs a ``str``.

        First, when CAPA offers it, UTF-8 mode (:meth:`utf8`).
        """
        await self.utf8()
        if method is AuthMethod.AUTO:
            method = self._choose()
        if method is AuthMethod.XOAUTH2:
            token = password if isinstance(password, str) else await password()
            await self._auth_xoauth2(username, token)
            return
        if not isinstance(password, str):
            raise TypeError(f"auth {method.value} needs a password, not a token source")
        match method:
            case AuthMethod.USER:
                seq = self._submit(Command(Verb.USER, (username,)))
                if self.pipelining:  # RFC 2449 §6.6: USER and PASS in one round trip
                    pass_seq = self._submit(Command(Verb.PASS, (password,)))
                    await self._flush()
                    self._auth_ok(await self._reply(seq, long=False), "USER")
                    self._auth_ok(await self._reply(pass_seq, long=False), "PASS")
                    return
                await self._flush()
                self._auth_ok(await self._reply(seq, long=False), "USER")
                self._auth_ok(await self._request(Command(Verb.PASS, (password,))), "PASS")
            case AuthMethod.APOP:
                if self.apop_stamp is None:
                    raise Pop3AuthError("APOP", "the server offers no APOP timestamp")
                digest = apop_digest(self.apop_stamp, password)
                self._auth_ok(await self._request(Command(Verb.APOP, (username, digest))), "APOP")
            case AuthMethod.PLAIN:
                await self._auth_plain(username, password)
            case AuthMethod.AUTO | AuthMethod.XOAUTH2:  # pragma: no cover (handled above)
                raise AssertionError(f"{method.value} was handled above")
            case _:
                assert_never(method)

    async def utf8(self) -> bool:
        """Ask for RFC 6856 UTF-8 mode when CAPA offers ``UTF8``; True when the server agreed.

        Without it a server may withhold a message whose header fields are raw UTF-8 (RFC 6532)
        from an "ASCII" client: Courier, which offers UTF8, serves in its place a "Cannot
        display Unicode content" message from ``<postmaster>`` wrapping it, and that would be
        delivered and the original deleted.  We pass bytes through and never need ASCII.
        RFC 6856 §2 registers the command as valid in the AUTHORIZATION state, so it goes
        before the login (after STLS).  A refusal leaves the session as it was (RFC 1939
        ASCII mode): the cycle goes on.
        """
        if self.utf8_mode or "UTF8" not in self.capabilities:
            return self.utf8_mode
        match await self._request(Command(Verb.UTF8)):
            case Ok():
                self.utf8_mode = True
            case Err(text=text):
                # %r: the server's text, control characters escaped.
                log.info("the server refused UTF8 (RFC 6856): %r", text)
            case ev:  # pragma: no cover (single-line commands only get Ok or Err)
                raise self._poison(Pop3ProtocolError(f"unexpected {type(ev).__name__} to UTF8"))
        return self.utf8_mode

    async def _auth_plain(self, username: str, password: str) -> None:
        response = sasl_plain(username, password)
        with_ir = len("AUTH PLAIN ") + len(response) <= _MAX_AUTH_LINE
        ev = await self._request(Command(Verb.AUTH, ("PLAIN", response) if with_ir else ("PLAIN",)))
        if isinstance(ev, Continuation):
            # RFC 5034 §4: the server wants the response now (or more than PLAIN has): "*" ends it.
            self._writer.write(self._conn.send_sasl_response("*" if with_ir else response))
            if self._log is not None:
                self._log.debug("C: ****")
            await self._flush()
            ev = await self._reply(self._inflight[0][0], long=False)
        self._auth_ok(ev, "AUTH")

    async def _sasl_answer(self, response: str) -> Event:
        """Answer the pending SASL challenge (RFC 5034 §4); return the server's next reply."""
        self._writer.write(self._conn.send_sasl_response(response))
        if self._log is not None:
            self._log.debug("C: %s", "****" if response else "[empty line]")
        await self._flush()
        return await self._reply(self._inflight[0][0], long=False)

    async def _auth_xoauth2(self, username: str, token: str) -> None:
        """SASL XOAUTH2 in the two-step form Microsoft 365 requires (no initial response).

        ``AUTH XOAUTH2``, ``+ ``, the base64 payload, ``+OK``.  A refused token is answered with
        a ``+ <base64 JSON>`` error challenge instead; the client must send an empty line, and
        the server then says ``-ERR`` (Google's XOAUTH2 protocol; RFC 7628 §3.2.3 for
        OAUTHBEARER).  The token never appears in the transcript or in an exception.
        """
        response = sasl_xoauth2(username, token)
        ev = await self._request(Command(Verb.AUTH, ("XOAUTH2",)))
        if isinstance(ev, Err):
            raise Pop3AuthError("AUTH XOAUTH2", ev.text, ev.resp_code)
        if not isinstance(ev, Continuation):
            raise self._poison(Pop3ProtocolError(f"unexpected {type(ev).__name__} to AUTH"))
        ev = await self._sasl_answer(response)
        status = ""
        if isinstance(ev, Continuation):
            try:
                status = xoauth2_status(ev.text)
            except Pop3ProtocolError as exc:
                raise self._poison(exc) from None
            ev = await self._sasl_answer("")
        match ev:
            case Ok():
                return
            case Err(text=text, resp_code=code):
                why = f"status {status}, " if status else ""
                raise Pop3AuthError(
                    "AUTH XOAUTH2",
                    f"the OAuth2 access token was refused or has expired ({why}server said: "
                    f"{text or 'nothing'}); refresh it with the token helper",
                    code,
                )
            case _:
                raise self._poison(Pop3ProtocolError(f"unexpected {type(ev).__name__} to AUTH"))

    def _auth_ok(self, ev: Event, verb: str) -> None:
        match ev:
            case Ok():
                return
            case Err(text=text, resp_code=code):
                raise Pop3AuthError(verb, text, code)
            case _:
                raise self._poison(Pop3ProtocolError(f"unexpected {type(ev).__name__} to {verb}"))

    # -- transaction ---------------------------------------------------------------------------

    async def stat(self) -> tuple[int, int]:
        """(message count, mailbox octets).  The count bounds the listings that follow."""
        count, octets = parse_stat(await self._ok(Command(Verb.STAT)))
        self._count = count
        return count, octets

    async def uidl(self) -> builtins.list[tuple[int, str]]:
        """[(msg number, uid)] for every message; Pop3ResponseError if the server lacks UIDL.
        After :meth:`stat`, a listing longer than its count allows is a Pop3ProtocolError.
        The reply of a UIDL that :meth:`list` sent along is read, not asked for again."""
        seq, self._uidl_ahead = self._uidl_ahead, None
        if seq is not None:
            return builtins.list(self._listed_entries(await self._reply(seq, long=False), "UIDL"))
        return builtins.list(await self._listing(Verb.UIDL))

    async def list(self) -> builtins.list[tuple[int, int]]:
        """[(msg number, octets)], bounded like :meth:`uidl`.  The sizes bound each RETR of
        the session: a message longer than LIST said (beyond ``protocol.retr_cap``'s
        tolerance) is a Pop3ProtocolError.

        After STAT, on a server that offers PIPELINING and UIDL, the UIDL the cycle asks for
        next goes out with LIST, in one write (RFC 2449 §6.6: one round trip for both, each
        reply still bounded by STAT's count); :meth:`uidl` reads its reply.
        """
        if (
            self.pipelining
            and "UIDL" in self.capabilities
            and self._count is not None
            and self._uidl_ahead is None
        ):
            seq = self._submit(Command(Verb.LIST), expect=self._count)
            self._uidl_ahead = self._submit(Command(Verb.UIDL), expect=self._count)
            await self._flush()
            entries = self._listed_entries(await self._reply(seq, long=False), "LIST")
        else:
            entries = await self._listing(Verb.LIST)
        listed = [(n, int(size)) for n, size in entries]
        self._listed = dict(listed)
        return listed

    async def _listing(self, verb: Verb) -> tuple[tuple[int, str], ...]:
        ev = await self._request(Command(verb), expect=self._count)
        return self._listed_entries(ev, verb.value)

    def _listed_entries(self, ev: Event, verb: str) -> tuple[tuple[int, str], ...]:
        match ev:
            case Listing(entries=entries):
                return entries
            case Err(text=text, resp_code=code):
                raise Pop3ResponseError(verb, text, code)
            case _:  # pragma: no cover
                raise self._poison(Pop3ProtocolError(f"unexpected {type(ev).__name__}"))

    async def retr(self, number: int) -> bytes:
        """The message exactly as sent: CRLF line ends, dots unstuffed, no final dot line."""
        ev = await self._request(Command(Verb.RETR, (number,)), expect=self._listed.get(number))
        return self._message(ev, "RETR")

    async def top(self, number: int, lines: int) -> bytes:
        """Headers, the blank line, and ``lines`` body lines (RFC 1939 §7)."""
        ev = await self._request(
            Command(Verb.TOP, (number, lines)), expect=self._listed.get(number)
        )
        return self._message(ev, "TOP")

    async def retrieve_many(
        self,
        numbers: Sequence[int],
        window: int = RETR_WINDOW,
        window_octets: int = RETR_WINDOW_OCTETS,
        sizes: Mapping[int, int] | None = None,
        *,
        spooling: Spooling | None = None,
        budget: MemoryBudget | None = None,
    ) -> AsyncGenerator[Retrieved, None]:
        """Yield a :class:`Retrieved` for each message in order.  When the server offers
        PIPELINING, up to ``window`` RETRs are in flight, and beyond the first no more than
        ``window_octets`` octets of messages (``sizes``, from LIST: given by the caller, else
        asked for here; if LIST is refused, count only); else one at a time.  The window is
        topped up when half of it is free, so that one write carries several RETRs (and the
        DELEs queued meanwhile).

        ``spooling``: messages above its size (or of unknown size) are streamed into its
        sinks and yielded as ``Retrieved.spooled``.  ``budget``: each RETR is first charged
        what its message may cost in memory (its LIST size; ``spooling.above`` at most,
        which a streamed one costs in buffers at most), given back when the caller asks for
        the next message; the first RETR of an empty window waits for room, a pipelined one
        behind it is sent only if it fits now (``connector.budget``).

        Other commands (``dele``) may be called between messages; they queue behind the RETRs
        in flight.  If the caller stops early, the replies still in flight are read and dropped
        by the next command, so the session stays usable (QUIT still works).
        """
        if sizes is None:
            sizes = {}
            if self.pipelining and len(numbers) > 1:
                # RFC 1939 §5: sizes in octets.  LIST refused: the window is bounded by count.
                with contextlib.suppress(Pop3ResponseError):
                    sizes = dict(await self.list())
        window = max(1, window) if self.pipelining else 1
        # (message number, sequence, octets, budget charge)
        sent: deque[tuple[int, int, int, int]] = deque()
        octets = 0
        todo = 0
        held = 0  # the charge of the message the caller has in hand
        try:
            while True:
                if held and budget is not None:
                    budget.release(held)  # the caller is done with the last message
                held = 0
                submitted = False
                half_free = len(sent) <= window // 2 and octets <= window_octets // 2
                while half_free and todo < len(numbers) and len(sent) < window:
                    number = numbers[todo]
                    size = sizes.get(number, 0 if not sizes else window_octets)
                    if sent and octets + size > window_octets:
                        break
                    listed = sizes.get(number, self._listed.get(number))
                    streamed = spooling is not None and (listed is None or listed > spooling.above)
                    charge = 0
                    if budget is not None:
                        if streamed and spooling is not None:
                            cost = spooling.above  # a spooled message costs buffers
                        else:  # in memory; of unknown size, the whole budget (runs alone)
                            cost = listed if listed is not None else budget.total
                        if not sent:
                            charge = await budget.acquire(cost)  # holding nothing: may wait
                        elif (taken := budget.try_acquire(cost)) is None:
                            break  # no room now: sent once the window drains
                        else:
                            charge = taken
                    try:
                        seq = self._submit(
                            Command(Verb.RETR, (number,)),
                            defer=True,
                            expect=listed,
                            stream=spooling.sink if streamed and spooling else None,
                        )
                    except BaseException:
                        if budget is not None:
                            budget.release(charge)  # never sent: the budget outlives the cycle
                        raise
                    sent.append((number, seq, size, charge))
                    octets += size
                    todo += 1
                    submitted = True
                if not sent:
                    return
                if submitted:
                    await self._flush()
                number, seq, size, charge = sent[0]
                reply = await self._claim(seq, long=True)
                sent.popleft()
                held = charge
                octets -= size
                if isinstance(reply, _SpooledReply):
                    yield Retrieved(number, b"", None, reply.spooled)
                else:
                    message = self._message_event(reply, "RETR")
                    yield Retrieved(number, message.raw, message.wire)
        finally:
            if budget is not None:
                budget.release(held + sum(charge for *_, charge in sent))
            for _, seq, _, _ in sent:
                stashed = self._stash.pop(seq, None)
                if isinstance(stashed, _SpooledReply):
                    stashed.spooled.remove()
                elif stashed is None:
                    self._abandoned.add(seq)
                    if seq in self._streams:
                        self._streams[seq] = None  # its chunks are read and dropped

    async def dele(self, number: int) -> None:
        """Mark a message deleted; the server removes it at QUIT (RFC 1939 §6).

        With PIPELINING the reply is not awaited: a ``-ERR`` raises Pop3ResponseError from a
        later call (at the latest ``quit()``, which then sends no QUIT; see the module
        docstring).  Without it, the reply is awaited here.
        """
        if not self.pipelining:
            await self._ok(Command(Verb.DELE, (number,)))
            return
        # RFC 2449 §6.6: the server answers in order; _read_next() checks the reply.
        self._deles[self._submit(Command(Verb.DELE, (number,)), defer=True)] = number

    async def quit(self) -> str:
        """QUIT (RFC 1939 §6: the server deletes the marked messages now); returns the +OK text.
        Closes the connection.

        Every pipelined DELE's reply is read first.  If any was ``-ERR`` (now or earlier), no
        QUIT is sent, nothing is deleted, and Pop3ResponseError is raised.
        """
        try:
            if self._deles:
                await self._flush()
                while self._deles and self._dele_failed is None:
                    await self._read_next()
            if self._dele_failed is not None:
                raise self._dele_failed
            return await self._ok(Command(Verb.QUIT))
        finally:
            await self.close()

    async def close(self) -> None:
        """Drop the connection without QUIT (nothing is deleted).  Idempotent.

        Messages streamed to the spool that nobody claimed (read ahead for a caller that
        stopped early) are removed: nothing can claim them now."""
        for seq, ev in builtins.list(self._stash.items()):
            if isinstance(ev, _SpooledReply):
                ev.spooled.remove()
                del self._stash[seq]
        self._streams = dict.fromkeys(self._streams)  # replies still due: chunks dropped
        if self._broken is None:
            self._broken = "closed"
            self._writer.close()
        try:
            async with asyncio.timeout(min(self._timeouts.command, 5.0)):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            pass  # already gone; nothing more to do for a socket we are dropping

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
