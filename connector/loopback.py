"""Small loopback servers: a POP3 server and an SMTP sink, for ``pop3-connector demo`` and tests.

Pure asyncio and the stdlib, so the demo runs with nothing beyond the runtime dependencies.  Both
keep their state in memory and expose it for assertions (``sessions``, ``commands``, ``deleted``,
``messages``, ``errors``).  They speak enough of RFC 1939/2449/5034 and RFC 5321 for a real
client, plus switches for the faults a real server (Dovecot) cannot produce on demand: no
greeting, a stall or a cut in the middle of RETR, a locked mailbox, a server without UIDL.

Theory of operation: one task per client connection, started by ``asyncio.start_server``.  Each
reads through :class:`_Input`, a buffer of its own, so that pipelined commands (RFC 2449 §6.6,
RFC 2920) are answered in order and the bytes after an SMTP DATA terminator are not lost.
``stop()`` aborts every client transport, which ends every handler with EOF or a reset, and then
awaits the handlers: nothing is left pending.  (We do not cancel them: on Python 3.11 the done
callback ``asyncio`` attaches calls ``task.exception()``, which raises on a cancelled task.)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import itertools
import logging
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

log = logging.getLogger(__name__)

# Far above RFC 2449 §4 (255 octets per POP3 command) and RFC 5321 §4.5.3.1.4 (512 per SMTP
# command line): we are lenient, but a client that never sends a line end is cut off.
_MAX_LINE: Final = 64 * 1024
_CHUNK: Final = 64 * 1024
_LINE_START_DOT: Final = re.compile(rb"^\.", re.MULTILINE)
_LINE_END: Final = re.compile(rb"\r?\n")


class _Input:
    """Our own read buffer over a StreamReader: lines, or everything up to a separator, in bulk."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()

    async def read_until(self, sep: bytes, limit: int) -> bytes | None:
        """Bytes up to and including ``sep``; None at EOF, or past ``limit`` bytes without it."""
        start = 0
        while (i := self.buf.find(sep, start)) < 0:
            if len(self.buf) > limit:
                return None
            start = max(0, len(self.buf) - len(sep) + 1)  # never rescan what was searched
            chunk = await self.reader.read(_CHUNK)
            if not chunk:
                return None
            self.buf += chunk
        out = bytes(self.buf[: i + len(sep)])
        del self.buf[: i + len(sep)]
        return out

    async def line(self) -> bytes | None:
        """One line without its end (CRLF, or a bare LF, tolerated); None at EOF."""
        raw = await self.read_until(b"\n", _MAX_LINE)
        return None if raw is None else raw.rstrip(b"\r\n")


async def _send(writer: asyncio.StreamWriter, data: bytes | str) -> None:
    writer.write(data.encode() + b"\r\n" if isinstance(data, str) else data)
    await writer.drain()


class _LoopbackServer:
    """Start, stop and client bookkeeping shared by both servers."""

    def __init__(self) -> None:
        self.port = 0
        self.sessions = 0
        self.peak_sessions = 0  # the most connections open at once
        self.commands: list[str] = []
        self.errors: list[Exception] = []  # unexpected handler failures (bugs), for assertions
        self._server: asyncio.Server | None = None
        self._stopping = False
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Self:
        """Listen on ``host``:``port`` (0 picks a free port; read it from ``.port``)."""
        self._stopping = False
        self._server = await asyncio.start_server(self._accept, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening, drop every client connection and wait for every handler to end."""
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        await asyncio.sleep(0)  # a connection accepted just now registers its handler first
        for writer in self._clients.values():
            writer.transport.abort()
        await asyncio.gather(*self._clients, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._stopping or task is None:  # refuse a latecomer while stopping
            writer.transport.abort()
            return
        self._clients[task] = writer
        self.sessions += 1
        self.peak_sessions = max(self.peak_sessions, len(self._clients))
        try:
            await self._serve(_Input(reader), writer)
        except OSError:
            pass  # the client went away (ssl.SSLError is an OSError too): routine here
        except Exception as exc:
            log.exception("loopback server handler failed")
            self.errors.append(exc)
        finally:
            del self._clients[task]
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, inp: _Input, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# POP3
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stored:
    uidl: str
    raw: bytes  # as given to add_message
    wire: bytes  # as served: every line ends in CRLF (RFC 1939 §3), as Dovecot does for LF mail


def _to_crlf(raw: bytes) -> bytes:
    out = _LINE_END.sub(b"\r\n", raw)
    # A last line without its end gets one, so RETR sends exactly the size LIST announced.
    return out + b"\r\n" if out and not out.endswith(b"\r\n") else out


class LoopbackPop3Server(_LoopbackServer):
    """An in-memory POP3 server (RFC 1939, CAPA from RFC 2449, AUTH PLAIN from RFC 5034).

    ``users`` maps user name to password; ``mailboxes`` maps user name to raw messages.  The
    keyword switches, all off by default, inject faults: ``uidl=False`` (no UIDL command),
    ``lock_mailbox`` (a second concurrent login gets ``-ERR [IN-USE]``), ``auth_error_code``
    (the RFC 2449 §8 code on a failed login; None sends a bare ``-ERR``), ``stall_after_bytes``
    and ``cut_after_bytes`` (a RETR reply stops after that many bytes and hangs, or the connection
    closes), ``no_greeting``, ``close_at_once`` (every connection is closed before the greeting,
    as a provider turns away an address it throttles), ``login_delay`` (a good login less than
    that many seconds after the last one accepted, of any user, gets ``-ERR [LOGIN-DELAY]``, RFC
    2449 §8.1.1: a provider's limit per client address).  ``ssl_context`` enables STLS (RFC
    2595 §4).  ``logins`` records every login attempt: (``time.monotonic()``, user, the reply).
    """

    def __init__(
        self,
        users: dict[str, str],
        mailboxes: dict[str, list[bytes]] | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        uidl: bool = True,
        lock_mailbox: bool = False,
        auth_error_code: str | None = "AUTH",
        stall_after_bytes: int | None = None,
        cut_after_bytes: int | None = None,
        no_greeting: bool = False,
        hostname: str = "localhost",
        top: bool = True,
        close_at_once: bool = False,
        login_delay: float | None = None,
    ) -> None:
        super().__init__()
        self.users = dict(users)
        self.ssl_context = ssl_context
        self.uidl = uidl
        self.lock_mailbox = lock_mailbox
        self.auth_error_code = auth_error_code
        self.stall_after_bytes = stall_after_bytes
        self.cut_after_bytes = cut_after_bytes
        self.no_greeting = no_greeting
        self.hostname = hostname
        self.top = top
        self.close_at_once = close_at_once
        self.login_delay = login_delay
        self.logins: list[tuple[float, str, str]] = []  # (monotonic time, user, reply)
        self._last_login: float | None = None
        self.deleted: list[str] = []  # UIDLs removed at QUIT, in order
        self.stalled = asyncio.Event()  # set when a RETR reply starts to stall
        self.locked: set[str] = set()
        self._boxes: dict[str, list[_Stored]] = {user: [] for user in users}
        self._counter = itertools.count(1)
        self._epoch = int(time.time())
        for user, messages in (mailboxes or {}).items():
            for raw in messages:
                self.add_message(user, raw)

    def add_message(self, user: str, raw: bytes, uidl: str | None = None) -> str:
        """Append a message to ``user``'s mailbox and return its UIDL (stable for its lifetime).

        ``uidl`` gives it one of the caller's choosing, as a server whose numbering restarted
        does (RFC 1939 §7 promises uniqueness only while a message exists).  Sessions logged in
        already do not see it: RFC 1939 §4 locks the maildrop at login.
        """
        # Dovecot-like shape (counter, then a validity stamp); RFC 1939 §7: 0x21-0x7E, <= 70.
        uidl = uidl or f"{next(self._counter):08x}{self._epoch:08x}"
        self._boxes.setdefault(user, []).append(_Stored(uidl, raw, _to_crlf(raw)))
        return uidl

    @property
    def mailboxes(self) -> dict[str, list[bytes]]:
        """The messages now stored per user, as given (a copy)."""
        return {user: [m.raw for m in box] for user, box in self._boxes.items()}

    def uidls(self, user: str) -> list[str]:
        """The UIDLs now stored for ``user``, oldest first."""
        return [m.uidl for m in self._boxes.get(user, [])]

    async def _serve(self, inp: _Input, writer: asyncio.StreamWriter) -> None:
        await _Pop3Session(self, inp, writer).run()


class _Pop3Session:
    def __init__(self, server: LoopbackPop3Server, inp: _Input, writer: asyncio.StreamWriter):
        self.srv = server
        self.inp = inp
        self.writer = writer
        self.user: str | None = None  # from USER, awaiting PASS
        self.login: str | None = None  # None: AUTHORIZATION state; else TRANSACTION
        self.holds_lock = False
        self.tls = False
        self.drop: list[_Stored] = []  # the listing fixed at login
        self.marked: set[int] = set()  # 0-based indices marked by DELE
        # RFC 1939 §7 (APOP): the greeting carries a unique timestamp in msg-id form.
        self.stamp = f"<{os.getpid()}.{time.monotonic_ns()}@{server.hostname}>"

    async def run(self) -> None:
        if self.srv.close_at_once:
            return  # closed by _accept before a word is said
        if self.srv.no_greeting:
            while await self.inp.reader.read(_CHUNK):
                pass  # say nothing, ever; wait for the client to give up
            return
        await _send(self.writer, f"+OK loopback POP3 ready {self.stamp}")
        try:
            while (line := await self.inp.line()) is not None:
                verb, _, arg = line.decode("utf-8", "replace").partition(" ")
                self.srv.commands.append(verb.upper())
                if not await self.handle(verb.upper(), arg):
                    return
        finally:
            if self.holds_lock and self.login is not None:
                self.srv.locked.discard(self.login)

    async def handle(self, verb: str, arg: str) -> bool:
        """Answer one command; False ends the session."""
        args = arg.split()
        if verb == "CAPA":
            caps = ["USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "SASL PLAIN"]
            caps += ["UIDL"] if self.srv.uidl else []
            caps += ["TOP"] if self.srv.top else []
            # RFC 2595 §4: STLS only before login, and once.
            offer_stls = self.srv.ssl_context and not self.tls and self.login is None
            caps += ["STLS"] if offer_stls else []
            await self.multi("+OK capability list follows", "".join(f"{c}\r\n" for c in caps))
        elif verb == "QUIT":
            await self.quit()
            return False
        elif self.login is None:
            await self.authorization(verb, arg, args)
        else:
            return await self.transaction(verb, args)
        return True

    async def authorization(self, verb: str, arg: str, args: list[str]) -> None:
        match verb:
            case "USER":
                self.user = arg
                # Say +OK for unknown users too, so USER does not reveal who exists.
                await self.ok("send PASS")
            case "PASS" if self.user is not None:
                await self.login_as(self.user, self.srv.users.get(self.user) == arg)
            case "APOP" if len(args) == 2:
                password = self.srv.users.get(args[0])
                digest = hashlib.md5(f"{self.stamp}{password}".encode(), usedforsecurity=False)
                await self.login_as(args[0], password is not None and digest.hexdigest() == args[1])
            case "AUTH" if args and args[0].upper() == "PLAIN":
                await self.auth_plain(args[1] if len(args) > 1 else None)
            case "STLS" if self.srv.ssl_context is not None and not self.tls:
                await self.ok("begin TLS negotiation")
                await self.writer.start_tls(self.srv.ssl_context)
                # Nothing the client sent in clear may count after the handshake (RFC 2595 §4;
                # the STARTTLS command-injection flaw, CVE-2011-0411).
                self.inp.buf.clear()
                self.tls = True
            case _:
                await self.err("command not valid in AUTHORIZATION state")

    async def auth_plain(self, initial: str | None) -> None:
        if initial is None:
            await _send(self.writer, "+ ")  # RFC 5034 §4: an empty challenge
            line = await self.inp.line()
            if line is None:
                return
            initial = line.decode("utf-8", "replace")
        if initial == "*":
            return await self.err("authentication cancelled")  # RFC 5034 §4
        try:
            # RFC 4616 §2: [authzid] NUL authcid NUL passwd; "=" is an empty initial response.
            fields = base64.b64decode("" if initial == "=" else initial, validate=True).split(b"\0")
        except binascii.Error:
            return await self.err("invalid base64")
        if len(fields) != 3:
            return await self.err("malformed PLAIN response")
        authzid, authcid, password = (f.decode("utf-8", "replace") for f in fields)
        valid = authzid in ("", authcid) and self.srv.users.get(authcid) == password
        await self.login_as(authcid, valid)

    async def login_as(self, user: str, valid: bool) -> None:
        now = time.monotonic()
        if not valid:
            code = f"[{self.srv.auth_error_code}] " if self.srv.auth_error_code else ""
            self.srv.logins.append((now, user, "-ERR"))
            return await _send(self.writer, f"-ERR {code}authentication failed")
        last, delay = self.srv._last_login, self.srv.login_delay
        if delay is not None and last is not None and now - last < delay:
            self.srv.logins.append((now, user, "LOGIN-DELAY"))
            return await self.err("[LOGIN-DELAY] you logged in too recently")
        if self.srv.lock_mailbox:
            if user in self.srv.locked:  # RFC 2449 §8.1.2
                self.srv.logins.append((now, user, "IN-USE"))
                return await self.err("[IN-USE] mailbox locked by another session")
            self.srv.locked.add(user)
            self.holds_lock = True
        self.srv.logins.append((now, user, "+OK"))
        self.srv._last_login = now
        self.login = user
        self.drop = list(self.srv._boxes.get(user, []))
        await self.ok(f"logged in, {len(self.drop)} messages")

    def index(self, arg: str) -> int | None:
        """0-based index of a live message from a message-number argument, else None."""
        if not (arg.isascii() and arg.isdigit()):
            return None
        i = int(arg) - 1
        return i if 0 <= i < len(self.drop) and i not in self.marked else None

    async def transaction(self, verb: str, args: list[str]) -> bool:
        live = [(i + 1, m) for i, m in enumerate(self.drop) if i not in self.marked]
        i = self.index(args[0]) if args else None
        if (verb == "UIDL" and not self.srv.uidl) or (verb == "TOP" and not self.srv.top):
            await self.err("command not supported")  # both optional (RFC 1939 §7)
        elif verb in {"RETR", "DELE", "TOP"} or (verb in {"LIST", "UIDL"} and args):
            if i is None:
                await self.err("no such message")
            elif verb == "RETR":
                wire = self.drop[i].wire
                return await self.retr(b"+OK %d octets\r\n" % len(wire) + _stuff(wire) + b".\r\n")
            elif verb == "DELE":
                self.marked.add(i)
                await self.ok(f"message {i + 1} deleted")
            elif verb == "TOP" and len(args) == 2 and args[1].isascii() and args[1].isdigit():
                # RFC 1939 §7: the header, the blank line, then the first n body lines.
                head, sep, body = self.drop[i].wire.partition(b"\r\n\r\n")
                lines = body.split(b"\r\n")[:-1][: int(args[1])]
                await self.multi("+OK", head + sep + b"".join(x + b"\r\n" for x in lines))
            elif verb in {"LIST", "UIDL"}:
                m = self.drop[i]
                await self.ok(f"{i + 1} {len(m.wire) if verb == 'LIST' else m.uidl}")
            else:
                await self.err("bad arguments")
        elif verb in {"LIST", "UIDL"}:
            listing = (f"{n} {len(m.wire) if verb == 'LIST' else m.uidl}\r\n" for n, m in live)
            await self.multi(f"+OK {len(live)} messages", "".join(listing))
        elif verb == "STAT":
            await self.ok(f"{len(live)} {sum(len(m.wire) for _, m in live)}")
        elif verb == "RSET":
            self.marked.clear()
            await self.ok(f"{len(self.drop)} messages")
        elif verb == "NOOP":
            await self.ok("")
        else:
            await self.err("command not valid in TRANSACTION state")
        return True

    async def retr(self, reply: bytes) -> bool:
        """Send a RETR reply, or the fault asked for; False ends the session."""
        cut, stall = self.srv.cut_after_bytes, self.srv.stall_after_bytes
        if cut is not None and len(reply) > cut:
            await _send(self.writer, reply[:cut])
            return False  # the handler closes the connection
        if stall is not None and len(reply) > stall:
            await _send(self.writer, reply[:stall])
            self.srv.stalled.set()
            while await self.inp.reader.read(_CHUNK):
                pass  # hang until the client (or stop()) gives up
            return False
        await _send(self.writer, reply)
        return True

    async def quit(self) -> None:
        # RFC 1939 §6: deletions take effect only now, in the UPDATE state.
        gone = {self.drop[i].uidl for i in self.marked}
        if gone and self.login is not None:
            box = self.srv._boxes[self.login]
            self.srv.deleted += [m.uidl for m in box if m.uidl in gone]
            box[:] = [m for m in box if m.uidl not in gone]
        await self.ok(f"bye, {len(gone)} messages deleted")

    async def ok(self, text: str) -> None:
        await _send(self.writer, f"+OK {text}".rstrip())

    async def err(self, text: str) -> None:
        await _send(self.writer, f"-ERR {text}")

    async def multi(self, first: str, body: str | bytes) -> None:
        data = body.encode() if isinstance(body, str) else body
        await _send(self.writer, first.encode() + b"\r\n" + _stuff(data) + b".\r\n")


def _stuff(body: bytes) -> bytes:
    """RFC 1939 §3: byte-stuff lines that begin with the termination octet."""
    return _LINE_START_DOT.sub(b"..", body)


# --------------------------------------------------------------------------------------------
# SMTP
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SinkMessage:
    """One message the sink accepted: the envelope and the data, dot-unstuffed, CRLF."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


SmtpRule = Callable[[str, str, list[str], bytes | None], str | None]
"""(stage "mail"/"rcpt"/"data", sender, recipients, data) -> a 4xx/5xx reply line, or None.

None accepts.  At "rcpt" the recipient on offer is the last of ``recipients``; ``data`` is
given only at "data".  A 421 reply also closes the connection (RFC 5321 §3.8).
"""

_PATH: Final = re.compile(r"(MAIL FROM|RCPT TO):\s*<([^<>]*)>\s*(.*)", re.IGNORECASE)


class LoopbackSmtpSink(_LoopbackServer):
    """A minimal RFC 5321 server that records what it accepts in ``messages``.

    ``rule`` may refuse at MAIL, RCPT or after DATA (see :data:`SmtpRule`).  EHLO offers
    PIPELINING (RFC 2920), 8BITMIME (RFC 6152) and SIZE (RFC 1870).  No TLS, no AUTH.
    """

    def __init__(
        self,
        rule: SmtpRule | None = None,
        *,
        size_limit: int = 32 * 1024 * 1024,
        hostname: str = "localhost",
    ) -> None:
        super().__init__()
        self.rule = rule
        self.size_limit = size_limit
        self.hostname = hostname
        self.messages: list[SinkMessage] = []

    async def _serve(self, inp: _Input, writer: asyncio.StreamWriter) -> None:
        await _send(writer, f"220 {self.hostname} ESMTP loopback sink")
        session = _SmtpSession(self)
        while (line := await inp.line()) is not None:
            text = line.decode("utf-8", "replace")
            verb = text.split(" ", 1)[0].upper()
            self.commands.append(verb)
            if verb == "QUIT":
                return await _send(writer, "221 2.0.0 bye")
            if verb != "DATA" or not session.rcpts:
                reply = session.command(verb, text)
            else:
                await _send(writer, "354 end data with <CR><LF>.<CR><LF>")
                # Read in bulk up to the terminator.  A CRLF put in front lets an empty
                # message's ".\r\n" match; the terminator's own CRLF ends the last line.
                inp.buf[0:0] = b"\r\n"
                raw = await inp.read_until(b"\r\n.\r\n", 2 * self.size_limit + _MAX_LINE)
                if raw is None:
                    return
                reply = session.data(_LINE_START_DOT.sub(b"", raw[2:-3]))  # RFC 5321 §4.5.2
            await _send(writer, reply)
            if reply.startswith("421"):
                return  # RFC 5321 §3.8: the server closes the channel after a 421


class _SmtpSession:
    def __init__(self, sink: LoopbackSmtpSink) -> None:
        self.sink = sink
        self.greeted = False
        self.sender: str | None = None
        self.rcpts: list[str] = []

    def check(self, stage: str, rcpts: list[str], data: bytes | None = None) -> str | None:
        rule = self.sink.rule
        return None if rule is None else rule(stage, self.sender or "", rcpts, data)

    def command(self, verb: str, text: str) -> str:
        """The reply to one command other than DATA with recipients, and QUIT."""
        path = _PATH.fullmatch(text)
        match verb:
            case "EHLO" | "HELO":
                self.greeted, self.sender, self.rcpts = True, None, []  # RFC 5321 §4.1.4
                host = self.sink.hostname
                if verb == "HELO":
                    return f"250 {host}"
                size = self.sink.size_limit
                return f"250-{host}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE {size}"
            case "MAIL" if not self.greeted or self.sender is not None:
                return "503 5.5.1 bad sequence of commands"
            case "MAIL" if path is not None:
                self.sender = path.group(2)
                refusal = self.mail_params(path.group(3)) or self.check("mail", [])
                if refusal:
                    self.sender = None
                return refusal or "250 2.1.0 sender OK"
            case "RCPT" | "DATA" if self.sender is None:
                return "503 5.5.1 need MAIL first"
            case "RCPT" if path is not None and path.group(3):
                return "555 5.5.4 RCPT TO parameters not recognized or not implemented"
            case "RCPT" if path is not None:
                refusal = self.check("rcpt", [*self.rcpts, path.group(2)])
                self.rcpts += [] if refusal else [path.group(2)]
                return refusal or "250 2.1.5 recipient OK"
            case "DATA":  # RFC 5321 §3.3: every RCPT was refused
                return "554 5.5.1 no valid recipients"
            case "RSET":
                self.sender, self.rcpts = None, []
                return "250 2.0.0 OK"
            case "NOOP":
                return "250 2.0.0 OK"
            case "MAIL" | "RCPT":
                return "501 5.5.4 syntax error in parameters or arguments"
            case _:
                return "500 5.5.2 command not recognized"

    def data(self, data: bytes) -> str:
        """The reply after DATA; records the message if accepted; ends the transaction."""
        reply = "552 5.3.4 message too big" if len(data) > self.sink.size_limit else None
        reply = reply or self.check("data", list(self.rcpts), data)
        if reply is None:
            self.sink.messages.append(SinkMessage(self.sender or "", tuple(self.rcpts), data))
        self.sender, self.rcpts = None, []
        return reply or "250 2.0.0 accepted"

    def mail_params(self, params: str) -> str | None:
        """A refusal for MAIL parameters other than SIZE (RFC 1870) and BODY (RFC 6152)."""
        for param in params.split():
            key, _, value = param.partition("=")
            match key.upper():
                case "SIZE" if value.isascii() and value.isdigit():
                    if int(value) > self.sink.size_limit:  # RFC 1870 §6
                        return "552 5.3.4 message size exceeds fixed maximum message size"
                case "BODY" if value.upper() in {"7BIT", "8BITMIME"}:
                    pass
                case _:
                    return "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
        return None
