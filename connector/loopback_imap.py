"""A small loopback IMAP server with IDLE, for ``pop3-connector demo`` and tests.

Pure asyncio and the stdlib, like ``connector.loopback`` (whose plumbing it shares).  It speaks
the part of IMAP4rev1 (RFC 3501) an IMAP account uses: CAPABILITY, STARTTLS, LOGIN,
AUTHENTICATE PLAIN and XOAUTH2 (with or without SASL-IR), LIST for the separator,
SELECT/EXAMINE, UID FETCH (UID, RFC822.SIZE, FLAGS, BODY.PEEK[] and BODY.PEEK[HEADER]), UID
STORE of ``\\Deleted``, EXPUNGE, UID EXPUNGE (UIDPLUS), UID SEARCH DELETED, IDLE (RFC 2177),
NOOP, LOGOUT.  Switches give what a real server (Dovecot) cannot do on demand: no UIDPLUS, no
IDLE, a message flagged ``\\Deleted`` by "another client", a new UIDVALIDITY.

State is in memory and exposed for assertions (``commands``, ``sessions``, ``folder``).  A
message added with :meth:`LoopbackImapServer.add_message` is announced with ``EXISTS`` to every
session idling on its folder at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Final

from connector.loopback import _Input, _LoopbackServer, _send

_MAX_LINE: Final = 64 * 1024
_MAX_LITERAL: Final = 64 * 1024 * 1024


def _split(line: bytes, out: list[bytes]) -> int | None:
    """Append the words of ``line`` to ``out``; the size of a literal announced at its end."""
    pos, n = 0, len(line)
    while pos < n:
        if line[pos] == 0x20:
            pos += 1
        elif line[pos] == 0x22:  # a quoted string, backslash escapes
            word = bytearray()
            pos += 1
            while pos < n and line[pos] != 0x22:
                if line[pos] == 0x5C and pos + 1 < n:
                    pos += 1
                word.append(line[pos])
                pos += 1
            out.append(bytes(word))
            pos += 1
        else:
            end = line.find(b" ", pos)
            end = n if end < 0 else end
            atom = line[pos:end]
            if end == n and atom.startswith(b"{") and atom.endswith(b"}"):
                digits = atom[1:-1].rstrip(b"+")
                if digits.isdigit() and int(digits) <= _MAX_LITERAL:
                    return int(digits)
            out.append(atom)
            pos = end
    return None


@dataclass
class _Message:
    uid: int
    raw: bytes
    flags: set[str] = field(default_factory=set)


@dataclass
class _Folder:
    uidvalidity: int
    next_uid: int = 1
    messages: list[_Message] = field(default_factory=list)


def _crlf(raw: bytes) -> bytes:
    out = re.sub(rb"\r?\n", b"\r\n", raw)
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


class LoopbackImapServer(_LoopbackServer):
    """An in-memory IMAP server; ``users`` maps user name to password (or, with
    ``xoauth2_tokens``, also to accepted tokens)."""

    def __init__(
        self,
        users: dict[str, str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        uidplus: bool = True,
        idle: bool = True,
        sasl_ir: bool = True,
        xoauth2_tokens: dict[str, str] | None = None,
        separator: str = "/",
        understate_sizes: int = 0,
        chatty: bool = False,
    ) -> None:
        super().__init__()
        # Before each message's body, an unsolicited FETCH with its flags (as a server sends
        # when another session changed them, RFC 3501 §7.4.2).
        self.chatty = chatty
        self.understate_sizes = understate_sizes  # RFC822.SIZE this much below the truth
        self.users = dict(users)
        self.ssl_context = ssl_context
        self.uidplus = uidplus
        self.idle = idle
        self.sasl_ir = sasl_ir
        self.xoauth2_tokens = dict(xoauth2_tokens or {})
        self.separator = separator
        self._validity = itertools.count(int(time.time()))
        self._folders: dict[tuple[str, str], _Folder] = {}
        self._idlers: set[_ImapSession] = set()
        self.idles = 0  # IDLE commands received
        self.idling = asyncio.Event()  # set at each IDLE (clear it to wait for the next)
        self.dones = 0  # DONE lines received
        self.logouts = 0

    def folder(self, user: str, name: str = "INBOX") -> _Folder:
        key = (user, "INBOX" if name.upper() == "INBOX" else name)
        if key not in self._folders:
            self._folders[key] = _Folder(next(self._validity))
        return self._folders[key]

    def add_message(self, user: str, raw: bytes, folder: str = "INBOX") -> int:
        """Store a message (CRLF line ends, as a server serves them); announce it to every
        session idling on the folder.  Returns its UID."""
        box = self.folder(user, folder)
        uid = box.next_uid
        box.next_uid += 1
        box.messages.append(_Message(uid, _crlf(raw)))
        for session in list(self._idlers):
            if session.box is box:
                session.announce(len(box.messages))
        return uid

    def flag_deleted(self, user: str, uid: int, folder: str = "INBOX") -> None:
        """As another client would: set ``\\Deleted`` on a message without expunging it."""
        for m in self.folder(user, folder).messages:
            if m.uid == uid:
                m.flags.add("\\Deleted")

    def new_uidvalidity(self, user: str, folder: str = "INBOX") -> None:
        """Renumber the folder (RFC 3501 §2.3.1.1): new UIDVALIDITY, new UIDs, same mail."""
        box = self.folder(user, folder)
        box.uidvalidity = next(self._validity) + 1000
        for i, m in enumerate(box.messages, 1):
            m.uid = i + 100
        box.next_uid = len(box.messages) + 101

    def messages(self, user: str, folder: str = "INBOX") -> list[bytes]:
        return [m.raw for m in self.folder(user, folder).messages]

    async def _serve(self, inp: _Input, writer: asyncio.StreamWriter) -> None:
        session = _ImapSession(self, inp, writer)
        try:
            await session.run()
        finally:
            self._idlers.discard(session)


class _ImapSession:
    def __init__(self, server: LoopbackImapServer, inp: _Input, writer: asyncio.StreamWriter):
        self.srv = server
        self.inp = inp
        self.writer = writer
        self.user: str | None = None
        self.box: _Folder | None = None
        self.read_only = False
        self.tls = False
        self.idle_tag: str | None = None

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+"]
        if self.srv.sasl_ir:
            caps.append("SASL-IR")
        if self.srv.ssl_context is not None and not self.tls:
            caps.append("STARTTLS")
        caps += ["AUTH=PLAIN"]
        if self.srv.xoauth2_tokens:
            caps.append("AUTH=XOAUTH2")
        if self.user is not None:
            if self.srv.idle:
                caps.append("IDLE")
            if self.srv.uidplus:
                caps.append("UIDPLUS")
        return " ".join(caps)

    def announce(self, exists: int) -> None:
        if self.idle_tag is not None:
            self.writer.write(f"* {exists} EXISTS\r\n".encode())

    async def send(self, text: str | bytes) -> None:
        await _send(self.writer, text)

    async def run(self) -> None:
        await self.send(f"* OK [CAPABILITY {self.capabilities()}] loopback IMAP ready")
        while True:
            line = await self.inp.read_until(b"\n", _MAX_LINE)
            if line is None:
                return
            line = line.rstrip(b"\r\n")
            if self.idle_tag is not None:
                if line.upper() == b"DONE":
                    self.srv.dones += 1
                    self.srv._idlers.discard(self)
                    tag, self.idle_tag = self.idle_tag, None
                    await self.send(f"{tag} OK IDLE terminated")
                else:
                    await self.send("* BAD expected DONE")
                continue
            args = await self.words(line)
            if args is None:
                return
            if len(args) < 2:
                await self.send("* BAD no command")
                continue
            tag = args[0].decode("ascii", "replace")
            verb = args[1].decode("ascii", "replace").upper()
            rest = args[2:]
            if verb == "UID" and rest:
                verb = "UID " + rest[0].decode("ascii", "replace").upper()
                rest = rest[1:]
            self.srv.commands.append(verb)
            if not await self.handle(tag, verb, rest):
                return

    async def words(self, line: bytes) -> list[bytes] | None:
        """The command's words: atoms, quoted strings, and literals (RFC 3501 §4.3, read here;
        ``{n}`` gets a continuation, ``{n+}`` (RFC 7888) none).  None at EOF."""
        out: list[bytes] = []
        while True:
            literal = _split(line, out)
            if literal is None:
                return out
            if not line.endswith(b"+}"):
                await self.send("+ go ahead")
            data = await self.read_exactly(literal)
            rest = await self.inp.read_until(b"\n", _MAX_LINE)
            if data is None or rest is None:
                return None
            out.append(data)
            line = rest.rstrip(b"\r\n")

    async def read_exactly(self, n: int) -> bytes | None:
        buf = self.inp.buf
        while len(buf) < n:
            chunk = await self.inp.reader.read(65536)
            if not chunk:
                return None
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    async def handle(self, tag: str, verb: str, args: list[bytes]) -> bool:
        text = [a.decode("utf-8", "replace") for a in args]
        box, user = self.box, self.user
        match verb:
            case "CAPABILITY":
                await self.send(f"* CAPABILITY {self.capabilities()}")
                await self.send(f"{tag} OK CAPABILITY completed")
            case "NOOP":
                await self.send(f"{tag} OK NOOP completed")
            case "LOGOUT":
                self.srv.logouts += 1
                await self.send("* BYE logging out")
                await self.send(f"{tag} OK LOGOUT completed")
                return False
            case "STARTTLS" if self.srv.ssl_context is not None and not self.tls:
                await self.send(f"{tag} OK begin TLS negotiation now")
                await self.writer.start_tls(self.srv.ssl_context)
                self.inp.buf.clear()  # RFC 3501 §6.2.1: nothing sent in clear counts after
                self.tls = True
            case "LOGIN" if len(text) == 2:
                await self.login(tag, text[0], self.srv.users.get(text[0]) == text[1])
            case "AUTHENTICATE" if text:
                await self.authenticate(tag, text[0].upper(), text[1] if len(text) > 1 else None)
            case "LIST":
                await self.send(f'* LIST (\\Noselect) "{self.srv.separator}" ""')
                await self.send(f"{tag} OK LIST completed")
            case "SELECT" | "EXAMINE" if user is not None and text:
                await self.select(tag, verb, user, text[0])
            case "UID FETCH" if box is not None and len(text) >= 2:
                await self.fetch(tag, box, text[0], " ".join(text[1:]).upper())
            case "UID STORE" if box is not None and len(text) >= 3 and not self.read_only:
                for m in _matching(box, text[0]):
                    m.flags.add("\\Deleted")
                await self.send(f"{tag} OK STORE completed")
            case "UID EXPUNGE" if box is not None and self.srv.uidplus and text:
                await self.expunge(tag, box, {m.uid for m in _matching(box, text[0])})
            case "EXPUNGE" if box is not None:
                await self.expunge(tag, box, None)
            case "UID SEARCH" if box is not None:
                found = [str(m.uid) for m in box.messages if "\\Deleted" in m.flags]
                await self.send(("* SEARCH " + " ".join(found)).rstrip())
                await self.send(f"{tag} OK SEARCH completed")
            case "IDLE" if self.srv.idle and self.user is not None:
                self.srv.idles += 1
                self.srv.idling.set()
                self.idle_tag = tag
                self.srv._idlers.add(self)
                await self.send("+ idling")
            case _:
                await self.send(f"{tag} BAD command unknown or not valid now")
        return True

    async def login(self, tag: str, user: str, ok: bool) -> None:
        if ok:
            self.user = user
            await self.send(f"{tag} OK [CAPABILITY {self.capabilities()}] logged in")
        else:
            await self.send(f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed.")

    async def authenticate(self, tag: str, mechanism: str, initial: str | None) -> None:
        if initial is None:
            await self.send("+ ")
            line = await self.inp.read_until(b"\n", _MAX_LINE)
            if line is None:
                return
            initial = line.rstrip(b"\r\n").decode("ascii", "replace")
        try:
            decoded = base64.b64decode(initial, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            await self.send(f"{tag} BAD invalid base64")
            return
        if mechanism == "PLAIN":
            _, _, rest = decoded.partition("\0")
            user, _, password = rest.partition("\0")
            await self.login(tag, user, self.srv.users.get(user) == password)
        elif mechanism == "XOAUTH2" and self.srv.xoauth2_tokens:
            fields = dict(f.split("=", 1) for f in decoded.split("\x01") if "=" in f)
            user = fields.get("user", "")
            if fields.get("auth") == f"Bearer {self.srv.xoauth2_tokens.get(user)}":
                await self.login(tag, user, True)
                return
            challenge = base64.b64encode(b'{"status":"401","schemes":"bearer"}').decode()
            await self.send(f"+ {challenge}")
            await self.inp.read_until(b"\n", _MAX_LINE)  # the client's empty answer
            await self.send(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials")
        else:
            await self.send(f"{tag} NO unsupported mechanism")

    async def select(self, tag: str, verb: str, user: str, name: str) -> None:
        box = self.srv.folder(user, name)
        self.box = box
        self.read_only = verb == "EXAMINE"
        await self.send("* FLAGS (\\Deleted \\Seen)")
        await self.send(f"* {len(box.messages)} EXISTS")
        await self.send(f"* OK [UIDVALIDITY {box.uidvalidity}] UIDs valid")
        await self.send(f"* OK [UIDNEXT {box.next_uid}] next UID")
        mode = "READ-ONLY" if self.read_only else "READ-WRITE"
        await self.send(f"{tag} OK [{mode}] {verb} completed")

    async def fetch(self, tag: str, box: _Folder, uid_set: str, items: str) -> None:
        wanted = _matching(box, uid_set)
        for seq, m in enumerate(box.messages, 1):
            if m not in wanted:
                continue
            if self.srv.chatty and "BODY" in items:
                self.writer.write(f"* {seq} FETCH (FLAGS (\\Seen) UID {m.uid})\r\n".encode())
            parts = [f"UID {m.uid}".encode()]
            if "RFC822.SIZE" in items:
                size = max(len(m.raw) - self.srv.understate_sizes, 0)
                parts.append(f"RFC822.SIZE {size}".encode())
            if "FLAGS" in items:
                parts.append(f"FLAGS ({' '.join(sorted(m.flags))})".encode())
            if "BODY.PEEK[HEADER]" in items:
                end = m.raw.find(b"\r\n\r\n")
                header = m.raw[: end + 4] if end >= 0 else m.raw
                parts.append(b"BODY[HEADER] {%d}\r\n%s" % (len(header), header))
            elif "BODY.PEEK[]" in items:
                parts.append(b"BODY[] {%d}\r\n%s" % (len(m.raw), m.raw))
            self.writer.write(b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts)))
        await self.send(f"{tag} OK FETCH completed")

    async def expunge(self, tag: str, box: _Folder, only: set[int] | None) -> None:
        seq = 1
        for m in list(box.messages):
            if "\\Deleted" in m.flags and (only is None or m.uid in only):
                box.messages.remove(m)
                self.writer.write(f"* {seq} EXPUNGE\r\n".encode())
            else:
                seq += 1
        await self.send(f"{tag} OK EXPUNGE completed")


def _matching(box: _Folder, uid_set: str) -> list[_Message]:
    """The messages a UID set (``1:3,7,9:*``) names."""
    top = max((m.uid for m in box.messages), default=0)
    wanted: set[int] = set()
    for part in uid_set.split(","):
        low, _, high = part.partition(":")
        a = top if low == "*" else int(low)
        b = a if not high else (top if high == "*" else int(high))
        wanted.update(range(min(a, b), max(a, b) + 1))
    return [m for m in box.messages if m.uid in wanted]
