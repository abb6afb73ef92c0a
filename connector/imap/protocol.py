"""IMAP4rev1 client protocol core, sans-I/O: the server's bytes in, responses out (RFC 3501).

Theory of operation
===================

This module never touches a socket.  The shell (``client.py``) writes the commands it builds
with :func:`command` and feeds whatever the socket produced to a :class:`ResponseReader`:

* ``reader.receive_data(chunk)``: appends a chunk; ``b""`` means EOF.
* ``reader.next_event()``: the next complete :class:`Response` or :class:`Continuation`, or
  :data:`NEED_DATA` when the buffer does not hold one yet.

Framing (RFC 3501 §2.2, §4.3).  A response is a line ending in CRLF, except that a line ending
in ``{n}`` announces a literal: exactly ``n`` octets follow the CRLF, then the response's line
goes on.  A response is kept as its text segments and its literals, in order
(:attr:`Response.segments`, :attr:`Response.literals`: segment *i* is followed by literal *i*),
so a message body (a literal) is one ``bytes`` object, copied once out of the buffer, never
scanned.  A line is searched for its CRLF once however the data is chunked (a search offset).

Streaming (docs/design.md §5.3).  A literal announced longer than :attr:`stream_above` octets
(when the shell sets it: a UID FETCH of messages above the spool threshold) is not held: it
comes out as :class:`LiteralChunk` events, each what the buffer holds of it, the last one
marked ``end``; its place in the response is then an empty literal, listed in
:attr:`Response.streamed`.  So a message of any size costs a read's worth of memory here.

Caps, because every byte from the server is hostile: a line segment may be :attr:`max_line`
octets, a literal :attr:`max_literal` octets (streamed or not; its length is read from at most
12 digits before it is compared), one response at most :attr:`max_response` octets in all.  The
shell sets ``max_literal`` before each command from what the server itself announced (a
message's ``RFC822.SIZE``, plus the tolerance of :func:`literal_cap`), as the POP3 core bounds a
RETR by LIST.  Exceeding a cap raises :class:`~connector.errors.Pop3ProtocolError` (the mail
source's protocol error; the tree has one for POP3 and IMAP alike); EOF inside a response raises
:class:`~connector.errors.Pop3ConnectionError`.

Parsing.  :func:`tokens` turns a response into atoms, quoted strings, literals and parentheses,
iteratively (no recursion the server controls); :func:`parse_fetch`, :func:`parse_status` and
:func:`parse_number` read the few response kinds a client of ours needs (FETCH, the status
responses with their response codes, EXISTS/EXPUNGE/RECENT).  A nested list deeper than
:data:`MAX_DEPTH` or longer than :data:`MAX_LIST_ITEMS` is a protocol error.

Only the stdlib and ``connector.errors`` are imported here (tests/unit/test_imap_protocol.py
checks it), so the parser is tested with byte tables and no event loop.
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from connector.errors import Pop3ConnectionError, Pop3ProtocolError, printable

MAX_LINE: Final = 1024 * 1024
"""A response line (between literals).  RFC 7162 §4 advises servers to accept command lines of
at least 8192 octets; responses such as SEARCH or CAPABILITY are longer on big folders, and a
megabyte holds a SEARCH of some 100,000 UIDs."""

DEFAULT_LITERAL: Final = 64 * 1024
"""A literal no command of ours asked to be large for (a mailbox name, a quoted header)."""

MAX_DEPTH: Final = 16
"""Parentheses nested deeper than this in one response: none of our commands asks for
BODYSTRUCTURE or ENVELOPE, so a deep nest is a hostile server."""

MAX_LIST_ITEMS: Final = 10_000
"""Items of one parenthesised list (a FLAGS list, say)."""


def literal_cap(size: int) -> int:
    """How long a literal the server announced as ``size`` octets (RFC822.SIZE) may be: a few
    servers count a little short (stored line ends, a trailing CRLF); the same tolerance as
    the POP3 core allows a RETR over LIST."""
    return size + size // 16 + 4096


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


class NeedData:
    """The buffer holds no complete response yet."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Response:
    """One response: untagged (``tag == "*"``) or tagged, its text in segments around literals.

    ``segments[i]`` is followed by ``literals[i]``; the ``{n}`` markers and CRLFs are gone.
    """

    tag: str
    segments: tuple[bytes, ...]
    literals: tuple[bytes, ...] = ()
    streamed: tuple[int, ...] = ()  # indexes of literals streamed (LiteralChunk), left empty

    @property
    def text(self) -> bytes:
        """The response after its tag, literals left out (for status lines and logs)."""
        return b" ".join(s.strip() for s in self.segments)

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.segments) + sum(len(x) for x in self.literals)


@dataclass(frozen=True, slots=True)
class Continuation:
    """``+ text``: the server waits for the rest of a command (RFC 3501 §7.5)."""

    text: bytes


@dataclass(frozen=True, slots=True)
class LiteralChunk:
    """Octets of a literal being streamed (longer than ``ResponseReader.stream_above``), in
    order; ``end``: the literal's last.  Its response follows once the rest has come."""

    data: bytes
    end: bool


Event = Response | Continuation | LiteralChunk | NeedData

_LITERAL_MARK: Final = re.compile(rb"\{(\d{1,12})\}\r?$")


class ResponseReader:
    """Bytes in, :class:`Response` and :class:`Continuation` events out (see the module doc)."""

    def __init__(self) -> None:
        self.max_line = MAX_LINE
        self.max_literal = DEFAULT_LITERAL
        self.stream_above: int | None = None  # longer literals come as LiteralChunk events
        self._buf = bytearray()
        self._scan = 0  # where the search for the next line end resumes
        self._eof = False
        self._segments: list[bytes] = []
        self._literals: list[bytes] = []
        self._want: int | None = None  # octets of the literal being read
        self._streaming = False  # ... and it goes out in LiteralChunk events
        self._streamed: list[int] = []
        self._size = 0  # octets of the response so far

    @property
    def max_response(self) -> int:
        return self.max_literal + 2 * self.max_line

    @property
    def buffered(self) -> int:
        """Octets received and not yet returned in an event."""
        return len(self._buf)

    @property
    def in_response(self) -> bool:
        """True in the middle of a response: a read cut here leaves the stream out of step."""
        return bool(self._segments) or self._want is not None or bool(self._buf)

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        self._buf += data

    def next_event(self) -> Event:
        """The next complete event, or :data:`NEED_DATA`; raises on a cap or an EOF inside."""
        while True:
            if self._streaming:
                return self._chunk()
            if self._want is not None:
                if len(self._buf) < self._want:
                    return self._need()
                self._literals.append(bytes(self._buf[: self._want]))
                del self._buf[: self._want]
                self._want = None
                self._scan = 0
            end = self._buf.find(b"\n", self._scan)
            if end < 0:
                if len(self._buf) > self.max_line:
                    raise Pop3ProtocolError(f"IMAP response line over {self.max_line} octets")
                self._scan = len(self._buf)
                return self._need()
            if end > self.max_line:
                raise Pop3ProtocolError(f"IMAP response line over {self.max_line} octets")
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            self._scan = 0
            if line.endswith(b"\r"):
                line = line[:-1]  # RFC 3501 §2.2: CRLF; a bare LF is tolerated
            self._size += len(line)
            m = _LITERAL_MARK.search(line)
            if m is not None:
                n = int(m.group(1))
                if n > self.max_literal:
                    raise Pop3ProtocolError(
                        f"IMAP literal of {n} octets, over the {self.max_literal} expected"
                    )
                self._size += n
                if self._size > self.max_response:
                    raise Pop3ProtocolError(f"IMAP response over {self.max_response} octets")
                self._segments.append(line[: m.start()])
                self._want = n
                self._streaming = self.stream_above is not None and n > self.stream_above
                continue
            if self._size > self.max_response:
                raise Pop3ProtocolError(f"IMAP response over {self.max_response} octets")
            self._segments.append(line)
            return self._finish()

    def _chunk(self) -> LiteralChunk | NeedData:
        """What the buffer holds of the literal being streamed (at most what is left of it)."""
        want = self._want or 0
        if not self._buf:
            return self._need()
        if len(self._buf) <= want:
            data = bytes(self._buf)
            self._buf.clear()
        else:
            data = bytes(self._buf[:want])
            del self._buf[:want]
        want -= len(data)
        if want:
            self._want = want
            return LiteralChunk(data, end=False)
        self._want, self._streaming, self._scan = None, False, 0
        self._streamed.append(len(self._literals))
        self._literals.append(b"")
        return LiteralChunk(data, end=True)

    def _need(self) -> NeedData:
        if self._eof:
            if self.in_response:
                raise Pop3ConnectionError("the IMAP server closed the connection mid-response")
            raise Pop3ConnectionError("the IMAP server closed the connection")
        return NEED_DATA

    def _finish(self) -> Response | Continuation:
        segments, literals, streamed = self._segments, self._literals, self._streamed
        self._segments, self._literals, self._streamed, self._size = [], [], [], 0
        first = segments[0]
        if first.startswith(b"+") and not literals:
            return Continuation(first[1:].lstrip(b" "))
        tag, sep, rest = first.partition(b" ")
        if not sep or not tag or not _TAG.fullmatch(tag):
            raise Pop3ProtocolError(f"IMAP response without a tag: {_show(first)}")
        return Response(
            tag.decode("ascii"), (rest, *segments[1:]), tuple(literals), tuple(streamed)
        )


# RFC 3501 §9: tag = 1*<any ASTRING-CHAR except "+">; "*" for untagged responses.
_TAG: Final = re.compile(rb"\*|[A-Za-z0-9.]{1,32}")


def _show(text: bytes, limit: int = 120) -> str:
    return printable(text[:limit].decode("utf-8", "replace"))


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


class Kind(enum.Enum):
    ATOM = enum.auto()  # includes numbers, NIL and section specs such as BODY[HEADER]<0>
    STRING = enum.auto()  # a quoted string or a literal, as bytes
    OPEN = enum.auto()
    CLOSE = enum.auto()


@dataclass(frozen=True, slots=True)
class Token:
    kind: Kind
    value: bytes = b""
    literal: int | None = None  # a literal's index in its response (Response.streamed)


_OPEN: Final = Token(Kind.OPEN)
_CLOSE: Final = Token(Kind.CLOSE)
# RFC 3501 §9 atom-specials, plus "[" and "]" which we read as part of a section spec.
_ATOM_STOP: Final = frozenset(b' ()"{')


def tokens(response: Response, start: int = 0) -> Iterator[Token]:
    """The tokens of ``response`` from offset ``start`` of its first segment.

    Iterative, linear in the response: an atom runs to a space or parenthesis, except that a
    ``[`` inside it runs to the next ``]`` (``BODY[HEADER.FIELDS (A B)]``); a quoted string
    ends at its unescaped ``"``; a literal is one token of its own.
    """
    for i, segment in enumerate(response.segments):
        yield from _segment_tokens(segment, start if i == 0 else 0)
        if i < len(response.literals):
            yield Token(Kind.STRING, response.literals[i], i)


def _segment_tokens(s: bytes, pos: int) -> Iterator[Token]:
    n = len(s)
    while pos < n:
        c = s[pos]
        if c == 0x20:
            pos += 1
        elif c == 0x28:  # (
            yield _OPEN
            pos += 1
        elif c == 0x29:  # )
            yield _CLOSE
            pos += 1
        elif c == 0x22:  # "
            out = bytearray()
            pos += 1
            while True:
                if pos >= n:
                    raise Pop3ProtocolError("IMAP quoted string without its closing quote")
                c = s[pos]
                if c == 0x5C and pos + 1 < n:  # backslash: quoted-specials (RFC 3501 §9)
                    out.append(s[pos + 1])
                    pos += 2
                elif c == 0x22:
                    pos += 1
                    break
                else:
                    out.append(c)
                    pos += 1
            yield Token(Kind.STRING, bytes(out))
        else:
            begin = pos
            while pos < n and s[pos] not in _ATOM_STOP:
                if s[pos] == 0x5B:  # [
                    close = s.find(b"]", pos)
                    if close < 0:
                        raise Pop3ProtocolError("IMAP section without its closing bracket")
                    pos = close + 1
                else:
                    pos += 1
            if pos == begin:
                raise Pop3ProtocolError(f"IMAP: unexpected {_show(s[pos : pos + 1])}")
            yield Token(Kind.ATOM, s[begin:pos])


# --------------------------------------------------------------------------------------------
# Responses we read
# --------------------------------------------------------------------------------------------


class Status(enum.StrEnum):
    """A status response's word (RFC 3501 §7.1)."""

    OK = "OK"
    NO = "NO"
    BAD = "BAD"
    PREAUTH = "PREAUTH"
    BYE = "BYE"


@dataclass(frozen=True, slots=True)
class StatusResponse:
    """``OK``/``NO``/``BAD``/``PREAUTH``/``BYE`` with its response code (RFC 3501 §7.1).

    ``code`` is upper case (``UIDVALIDITY``, ``AUTHENTICATIONFAILED``); ``args`` what follows
    it inside the brackets; ``text`` the human-readable rest, control characters escaped.
    """

    status: Status
    code: str | None
    args: str
    text: str


_STATUS_RE: Final = re.compile(rb"(OK|NO|BAD|PREAUTH|BYE)(?: |$)", re.IGNORECASE)
_CODE_RE: Final = re.compile(rb"\[([A-Za-z0-9.-]{1,64})(?: ([^\]]{0,4096}))?\] ?")


def parse_status(response: Response) -> StatusResponse | None:
    """The status response in ``response``, or None when it is something else (data)."""
    first = response.segments[0]
    m = _STATUS_RE.match(first)
    if m is None:
        return None
    rest = first[m.end() :]
    code: str | None = None
    args = ""
    c = _CODE_RE.match(rest)
    if c is not None:
        code = c.group(1).decode("ascii").upper()
        args = printable((c.group(2) or b"").decode("utf-8", "replace"))
        rest = rest[c.end() :]
    text = printable(rest.decode("utf-8", "replace")).strip()
    return StatusResponse(Status(m.group(1).decode("ascii").upper()), code, args, text)


_NZ_NUMBER_RE: Final = re.compile(rb"[1-9][0-9]{0,9}")
MAX_NUMBER: Final = 0xFFFF_FFFF
"""RFC 3501 §9: ``number`` and ``nz-number`` are 32-bit unsigned integers."""


def parse_nz_number(text: str) -> int | None:
    """``text`` as an RFC 3501 §9 ``nz-number`` (UIDVALIDITY, UIDNEXT): ASCII digits only, no
    leading zero, at most 4294967295; else None.

    Checked on the bytes, never with ``str.isdigit``: that accepts ``"²"`` and other Unicode
    digits that ``int()`` then refuses with a ValueError.
    """
    raw = text.encode("utf-8", "replace")
    if _NZ_NUMBER_RE.fullmatch(raw) is None:
        return None
    n = int(raw)
    return n if n <= MAX_NUMBER else None


_NUMBER_RE: Final = re.compile(rb"(\d{1,10}) ([A-Za-z]{1,16})(?: |$)")


def parse_number(response: Response) -> tuple[int, str] | None:
    """``* 23 EXISTS`` -> ``(23, "EXISTS")`` (also RECENT, EXPUNGE, FETCH); else None."""
    m = _NUMBER_RE.match(response.segments[0])
    if m is None:
        return None
    return int(m.group(1)), m.group(2).decode("ascii").upper()


def parse_words(response: Response, keyword: str) -> list[str] | None:
    """The words after ``keyword`` in ``* KEYWORD w1 w2 ...`` (CAPABILITY, SEARCH, ENABLED),
    or None when the response is not that.  Only the first segment is read."""
    first = response.segments[0]
    head, _, rest = first.partition(b" ")
    if head.upper() != keyword.encode("ascii"):
        return None
    return rest.decode("ascii", "replace").split()


@dataclass(frozen=True, slots=True)
class Listed:
    """A LIST response's hierarchy separator (RFC 3501 §7.2.2); None for ``NIL`` (flat)."""

    separator: str | None


def parse_list(response: Response) -> Listed | None:
    """``* LIST (flags) "/" name`` read for its separator; None for any other response."""
    it = tokens(response)
    first = next(it, None)
    if first is None or first.kind is not Kind.ATOM or first.value.upper() != b"LIST":
        return None
    if next(it, None) != _OPEN:
        raise Pop3ProtocolError("IMAP LIST response without its flags")
    _flat_list(it)
    delim = next(it, None)
    if delim is None or delim.kind is Kind.OPEN or delim.kind is Kind.CLOSE:
        raise Pop3ProtocolError("IMAP LIST response without its separator")
    if delim.kind is Kind.ATOM:
        if delim.value.upper() != b"NIL":
            raise Pop3ProtocolError("IMAP LIST response: a separator that is no string")
        return Listed(None)
    return Listed(delim.value.decode("utf-8", "replace"))


@dataclass(frozen=True, slots=True)
class Fetched:
    """One FETCH response (RFC 3501 §7.4.2): the items we ask for, the rest ignored.

    ``bodies`` maps a section as the server named it (``BODY[]``, ``BODY[HEADER]``, upper case,
    without an ``<origin>``) to its content (None for NIL).  ``streamed`` maps a section whose
    literal was streamed (its ``bodies`` entry is then empty) to the literal's index in the
    response (:attr:`Response.streamed`).
    """

    seq: int
    uid: int | None = None
    size: int | None = None
    flags: tuple[str, ...] | None = None
    bodies: dict[str, bytes | None] = field(default_factory=dict)
    streamed: dict[str, int] = field(default_factory=dict)


def parse_fetch(response: Response) -> Fetched | None:
    """``* n FETCH (...)`` read into :class:`Fetched`; None for any other response."""
    number = parse_number(response)
    if number is None or number[1] != "FETCH":
        return None
    seq = number[0]
    start = response.segments[0].upper().index(b"FETCH") + len(b"FETCH")
    it = tokens(response, start)
    if next(it, None) != _OPEN:
        raise Pop3ProtocolError("IMAP FETCH response without its parenthesised list")
    uid: int | None = None
    size: int | None = None
    flags: tuple[str, ...] | None = None
    bodies: dict[str, bytes | None] = {}
    streamed: dict[str, int] = {}
    while True:
        key = next(it, None)
        if key == _CLOSE:
            break
        if key is None or key.kind is not Kind.ATOM:
            raise Pop3ProtocolError("IMAP FETCH response: a data item name expected")
        name = key.value.upper()
        value = next(it, None)
        if value is None or value == _CLOSE:
            raise Pop3ProtocolError("IMAP FETCH response: a data item without its value")
        if value == _OPEN:
            items = _flat_list(it)
            if name == b"FLAGS":
                flags = tuple(v.decode("ascii", "replace") for v in items)
            continue
        if name == b"UID":
            uid = _nz_number(value)
        elif name == b"RFC822.SIZE":
            size = _number(value)
        elif name.startswith(b"BODY[") or name.startswith(b"BINARY["):
            section = (name.split(b"]", 1)[0] + b"]").decode("ascii", "replace")
            streamed.pop(section, None)  # named twice: the last one counts
            if value.kind is Kind.STRING:
                bodies[section] = value.value
                if value.literal is not None and value.literal in response.streamed:
                    streamed[section] = value.literal
            elif value.value.upper() == b"NIL":
                bodies[section] = None
            else:
                raise Pop3ProtocolError("IMAP FETCH response: a body that is no string")
    return Fetched(seq, uid, size, flags, bodies, streamed)


def _flat_list(it: Iterator[Token]) -> list[bytes]:
    """The atoms and strings of a parenthesised list whose "(" was just read, nested lists
    flattened; bounded by MAX_DEPTH and MAX_LIST_ITEMS."""
    depth = 1
    items: list[bytes] = []
    for token in it:
        if token == _OPEN:
            depth += 1
            if depth > MAX_DEPTH:
                raise Pop3ProtocolError(f"IMAP lists nested deeper than {MAX_DEPTH}")
        elif token == _CLOSE:
            depth -= 1
            if depth == 0:
                return items
        else:
            items.append(token.value)
            if len(items) > MAX_LIST_ITEMS:
                raise Pop3ProtocolError(f"an IMAP list of more than {MAX_LIST_ITEMS} items")
    raise Pop3ProtocolError("IMAP list without its closing parenthesis")


def _number(token: Token) -> int:
    # RFC 3501 §9: number = 1*DIGIT, a 32-bit unsigned integer.
    if token.kind is not Kind.ATOM or not token.value.isdigit() or len(token.value) > 10:
        raise Pop3ProtocolError(f"IMAP: a number expected, got {_show(token.value)}")
    return int(token.value)


def _nz_number(token: Token) -> int:
    value = _number(token)
    if value == 0:
        raise Pop3ProtocolError("IMAP: a UID of 0")
    return value


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiteralArg:
    """An argument sent as a literal (RFC 3501 §4.3): text a quoted string cannot carry."""

    data: bytes


Arg = str | LiteralArg


def astring(value: str) -> Arg:
    """``value`` as an astring (RFC 3501 §9): a quoted string, or a literal when it holds
    characters a quoted string cannot (8-bit; RFC 3501 §4.3).  CR, LF and NUL raise
    ``ValueError``: no IMAP string can carry them (the config refuses them in a password)."""
    if any(c in value for c in "\r\n\0"):
        raise ValueError("an IMAP string cannot carry CR, LF or NUL")
    if value.isascii():
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return LiteralArg(value.encode("utf-8"))


def command(tag: str, verb: str, *args: Arg) -> list[bytes | LiteralArg]:
    """The pieces of one command line: text, and literals that each end a piece.

    The shell writes the first piece, and for each literal sends ``{n}`` (or ``{n+}`` with
    LITERAL+, RFC 7888), waits for the continuation, then the literal and the next piece.
    Text arguments are checked for CR, LF and NUL (an injected command line otherwise).
    """
    pieces: list[bytes | LiteralArg] = []
    line = f"{tag} {verb}"
    for arg in args:
        if isinstance(arg, LiteralArg):
            pieces.append((line + " ").encode("ascii"))
            pieces.append(arg)
            line = ""
            continue
        if any(c in arg for c in "\r\n\0"):
            raise ValueError("CR, LF or NUL in an IMAP command argument")
        line += " " + arg
    pieces.append(line.encode("utf-8") + b"\r\n")
    return pieces


def uid_set(uids: Sequence[int]) -> str:
    """UIDs as an IMAP sequence set with ranges (RFC 3501 §9): ``1:3,7,9:10``."""
    out: list[str] = []
    ordered = sorted(set(uids))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}")
        i = j + 1
    return ",".join(out)


def uid_sets(uids: Sequence[int], limit: int = 4000) -> list[str]:
    """:func:`uid_set` split so that no set is longer than ``limit`` characters, keeping each
    command line within the 8192 octets RFC 7162 §4 advises servers to accept."""
    sets: list[str] = []
    current: list[str] = []
    length = 0
    for part in uid_set(uids).split(","):
        if current and length + len(part) + 1 > limit:
            sets.append(",".join(current))
            current, length = [], 0
        if not part:
            continue
        current.append(part)
        length += len(part) + 1
    if current:
        sets.append(",".join(current))
    return sets


def sasl_plain(username: str, password: str) -> str:
    """SASL PLAIN's response (RFC 4616): base64 of NUL user NUL password, no authzid."""
    return base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")


# --------------------------------------------------------------------------------------------
# Mailbox names
# --------------------------------------------------------------------------------------------


def _modified_base64(text: str) -> str:
    # RFC 3501 §5.1.3: UTF-16BE in base64 (RFC 2152) with "," for "/" and no "=" padding.
    data = text.encode("utf-16-be")
    return base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",")


def encode_mutf7(name: str) -> str:
    """``name`` in IMAP's modified UTF-7 (RFC 3501 §5.1.3).

    Printable US-ASCII except ``&`` stands for itself; ``&`` becomes ``&-``; every run of other
    characters becomes ``&`` + modified base64 of its UTF-16BE form + ``-``.

    >>> encode_mutf7("Unzustellbar/Größe")
    'Unzustellbar/Gr&APYA3w-e'
    """
    out: list[str] = []
    run: list[str] = []
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            if run:
                out.append(f"&{_modified_base64(''.join(run))}-")
                run.clear()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    if run:
        out.append(f"&{_modified_base64(''.join(run))}-")
    return "".join(out)


def quote_astring(value: str) -> str:
    """``value`` as an IMAP quoted string (RFC 3501 §9): ``"`` and ``\\`` backslash-escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def folder_levels(folder: str) -> tuple[str, ...]:
    """The levels of a configured folder name, which uses ``/`` between levels.

    Raises ``ValueError`` for an empty level (``"a//b"``, a leading or trailing ``/``) or a
    CR, LF or NUL (which no IMAP string can carry, RFC 3501 §9).
    """
    if any(c in folder for c in "\r\n\0"):
        raise ValueError("the folder name must not contain CR, LF or NUL")
    levels = tuple(folder.split("/"))
    if not all(levels):
        raise ValueError(f"the folder name {folder!r} has an empty level")
    return levels


def server_mailbox_name(levels: Sequence[str], separator: str | None) -> str:
    """The mailbox name to send: levels joined by the server's separator, mUTF-7, quoted.

    ``separator`` is what ``LIST "" ""`` reported (``None``: a flat server, RFC 3501 §6.3.8
    ``NIL``).  A level that itself contains the separator would silently become two levels
    on the server, so it is refused with ``ValueError``, as is a nested name on a flat server.
    """
    if separator is None:
        if len(levels) > 1:
            raise ValueError("the server has no folder hierarchy; use a name without '/'")
    else:
        for level in levels:
            if separator in level:
                raise ValueError(
                    f"the folder level {level!r} contains the server's separator {separator!r}"
                )
    joined = (separator or "").join(encode_mutf7(level) for level in levels)
    return quote_astring(joined)


__all__ = [
    "DEFAULT_LITERAL",
    "MAX_DEPTH",
    "MAX_LINE",
    "MAX_LIST_ITEMS",
    "NEED_DATA",
    "Arg",
    "Continuation",
    "Event",
    "Fetched",
    "Kind",
    "Listed",
    "LiteralArg",
    "LiteralChunk",
    "NeedData",
    "Response",
    "ResponseReader",
    "Status",
    "StatusResponse",
    "Token",
    "astring",
    "command",
    "encode_mutf7",
    "folder_levels",
    "literal_cap",
    "parse_fetch",
    "parse_list",
    "parse_number",
    "parse_status",
    "parse_words",
    "quote_astring",
    "sasl_plain",
    "server_mailbox_name",
    "tokens",
    "uid_set",
    "uid_sets",
]
