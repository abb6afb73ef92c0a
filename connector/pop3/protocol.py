"""POP3 client protocol core, sans-I/O (in the manner of h11): bytes in, events out.

Theory of operation
===================

This module never touches a socket.  The shell (``client.py``) owns the I/O and drives a
:class:`Connection` with three calls:

* ``conn.send(Command(...)) -> bytes``: checks the command against the state table, queues
  what reply it expects, and returns the bytes the shell must write.
* ``conn.receive_data(chunk)``: hands over whatever the socket produced; ``b""`` means EOF.
* ``conn.next_event()``: returns the next complete event, or :data:`NEED_DATA` when the
  buffer does not yet hold one.  The shell reads more and asks again.

Replies carry no tag saying which command they answer, and whether a ``+OK`` reply is followed
by a multi-line body depends only on the command (RFC 1939 §3).  So every sent command goes into
a FIFO, and the head of that FIFO decides how the next bytes are framed: ``+OK`` to RETR, TOP and
CAPA is multi-line; to LIST and UIDL only without an argument; ``-ERR`` is always one line.  The
FIFO is also what makes RFC 2449 PIPELINING free: send several commands, then read the replies
in order.  The greeting is the first entry, queued at construction.

States (RFC 1939 §3) live in one table, :data:`TRANSITIONS`: for each state, the verbs allowed
in it, and for each verb the state after ``+OK`` and after ``-ERR``.  :attr:`Connection.state`
changes when the reply arrives, not when the command is sent, because a refused PASS leaves the
session where it was.  Commands that change the state (PASS, APOP, AUTH, QUIT) or the transport
(STLS) are *exclusive*: nothing may be sent behind them until their reply is in, so a pipelined
command is always judged against the state it will really meet.  A protocol violation by the
server moves the connection to ``ERROR`` for good (h11's rule: a desynchronised stream is never
reused); so does EOF in the middle of a reply.

Framing and speed.  Messages are big (8 KiB-200 KiB typical, tens of MiB possible) and many, so
bodies are never walked line by line in Python.  The buffer is one ``bytearray``; for the
multi-line body in progress we keep a search offset so each byte is scanned once however the
data is chunked.  ``bytes.find(b"\\n.")`` (C speed) jumps from one line that starts with a dot to
the next: almost always that is the terminating ``.`` line.  Dot-stuffing (RFC 1939 §3: a line
starting with ``.`` is sent with one more ``.``) is undone with one ``bytes.replace``, plus the
first line by hand.  Only if the body contains a bare LF (tolerated, as poplib does) do we take
a slower, line-by-line path that also rewrites line ends to CRLF, so :attr:`Message.raw` is
always the exact message with CRLF line ends and without the terminating ``.\\r\\n``.  The
body as received, still stuffed, rides along as :attr:`Message.wire` when it is CRLF-clean and
stuffed as RFC 1939 §3 says: it is already SMTP's DATA content (RFC 5321 §4.5.2), so delivery
forwards it without a rescan.

Streaming.  A RETR sent with ``send(cmd, stream=True)`` is not gathered into one
:class:`Message`: its body comes out as :class:`MessageChunk` events of at most a little more
than :data:`STREAM_CHUNK` octets, in order, unstuffed and CRLF-normalised as ``Message.raw``
would be, then one :class:`MessageEnd`.  The shell writes the chunks where it likes (a spool
file, docs/design.md §5.3); the buffer here never holds more than a chunk and one read, however
large the message or its lines.  A chunk ends at a line end, or, inside a line longer than a
chunk, before a final CR (which may pair with the next read's LF); the state carried from one
chunk to the next is whether the next byte starts a line.  One thing cannot be known until the
end: whether a server that does not dot-stuff a first line starting with ``..`` (Dovecot 2.3,
``_first_line_quirk``) meant one dot more; :attr:`MessageEnd.prefix` then holds the octet that
belongs before the first chunk.

Caps are separate, because one shared cap (poplib's 2048) rejects real mail: a status or
listing line may be :data:`MAX_LINE` octets (RFC 1939 §3 says 512; we allow slack); a message
may be ``max_message_size`` octets, and lines inside it may be any length.  A hostile server
gets no more room than the session's own answers give it: a listing (LIST, UIDL) is capped by
the message count STAT announced (:func:`listing_cap`: RFC 1939 §7 bounds a unique-id to 70
characters), and a RETR by the size LIST announced for that message, plus the tolerance of
:func:`retr_cap` for the servers that count a few octets short.  ``send(cmd, expect=...)``
passes those numbers in.  Exceeding a cap is a :class:`~connector.errors.Pop3ProtocolError`; a
truncated message is never returned.  A listing is parsed line by line in place, so it costs
memory for its entries, not for copies of its lines.

Errors: the server's faults raise :class:`~connector.errors.Pop3ProtocolError` (EOF in the middle
of a reply: :class:`~connector.errors.Pop3ConnectionError`).  Our own misuse (a verb not allowed
in this state, CR/LF in an argument) raises :class:`LocalProtocolError` or ``ValueError``: those
are bugs, and ``classify()`` treats them as such.

Only the stdlib and ``connector.errors`` are imported here; a test keeps it that way.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, assert_never

from connector.errors import Pop3ConnectionError, Pop3ProtocolError, printable

_LineCounts = Callable[[bytes], tuple[int, int, int, int, int]]
_fast_line_counts: _LineCounts | None
try:
    # The C loop of _scan.c: one pass instead of up to five bytes.count() (bench/README.md has
    # the cost of each); built at install when a compiler is there (setup.py), else the counts
    # below.
    from connector.pop3._scan import line_counts as _fast_line_counts
except ImportError:  # pragma: no cover - an install without a C compiler
    _fast_line_counts = None

__all__ = [
    "CAPA_CAP",
    "LISTING_LINE",
    "MAX_LINE",
    "MAX_MESSAGES",
    "NEED_DATA",
    "STREAM_CHUNK",
    "TRANSITIONS",
    "Capabilities",
    "Closed",
    "Command",
    "Connection",
    "Continuation",
    "Err",
    "Event",
    "Greeting",
    "Listing",
    "LocalProtocolError",
    "Message",
    "MessageChunk",
    "MessageEnd",
    "NeedData",
    "Ok",
    "State",
    "Transition",
    "Verb",
    "apop_digest",
    "listing_cap",
    "parse_scan_line",
    "parse_stat",
    "retr_cap",
    "sasl_plain",
]

# RFC 1939 §3: a status line is at most 512 octets including CRLF.  Real servers overrun it
# (long response texts, long capability lines), so we allow eight times that.
MAX_LINE: Final = 4096

# A CAPA reply (RFC 2449 §5) is a few lines; a server may not make it a flood.
CAPA_CAP: Final = 64 * 1024

# One line of a listing: a message number, a space, a unique-id of at most 70 characters
# (RFC 1939 §7) or a size in octets (§5), CRLF: 83 octets with ten-digit numbers.  Servers pad
# with spaces now and then, so a line gets more room than that.
LISTING_LINE: Final = 128


# The most messages a session is taken to hold, whatever STAT claims: a listing costs memory
# per entry (a few hundred octets), and a hostile STAT must not buy a gigabyte of it.
MAX_MESSAGES: Final = 1_000_000


def listing_cap(count: int) -> int:
    """The most octets a UIDL or LIST listing may have in a session whose STAT said ``count``
    messages (RFC 1939 §4: the maildrop is locked, so the count holds for the session)."""
    return (min(count, MAX_MESSAGES) + 1) * LISTING_LINE + MAX_LINE


def retr_cap(listed: int) -> int:
    """The most octets (dots unstuffed, CRLF line ends) a RETR of a message LIST announced as
    ``listed`` octets may bring.

    The tolerance covers what real servers do: Courier and GNU mailutils count a message
    without a final line end two octets short and then send the CRLF; Dovecot 2.3 does the
    same, and leaves a first line that starts with "." unstuffed (``_first_line_quirk``); a
    server that counts stored LF line ends as one octet (the "physical" size of Dovecot's
    ``pop3_fast_size_lookups``) sends one CR more per line; mailutils adds an ``X-UIDL:`` line
    to the messages it serves.  Each is a few octets or a few percent, so the room is 1/16 of
    the size plus 4 KiB.  A server that sends more is not telling the truth about its
    messages, and the session ends there (Pop3ProtocolError), before it costs more memory.
    """
    return listed + listed // 16 + 4096


class LocalProtocolError(RuntimeError):
    """We, not the server, broke the protocol: a verb sent in the wrong state, data after EOF.

    A bug in the caller, so deliberately not a ``ConnectorError``: ``classify()`` says BUG.
    """


class State(enum.Enum):
    """The session states of RFC 1939 §3, plus ERROR (the stream can no longer be trusted)."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"  # QUIT sent from TRANSACTION; the server is removing messages (§6)
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class Verb(enum.Enum):
    """Client commands: RFC 1939 (§4-§7), CAPA (RFC 2449), STLS (RFC 2595), AUTH (RFC 5034),
    UTF8 (RFC 6856)."""

    USER = "USER"
    PASS = "PASS"  # noqa: S105 (a verb, not a password)
    APOP = "APOP"
    AUTH = "AUTH"
    STLS = "STLS"
    UTF8 = "UTF8"
    CAPA = "CAPA"
    STAT = "STAT"
    LIST = "LIST"
    UIDL = "UIDL"
    RETR = "RETR"
    TOP = "TOP"
    DELE = "DELE"
    NOOP = "NOOP"
    RSET = "RSET"
    QUIT = "QUIT"


@dataclass(frozen=True, slots=True)
class Transition:
    """What a verb does to the state: after ``+OK``, after ``-ERR``, and while it is pending.

    ``exclusive`` verbs change the state or the transport, so nothing may be pipelined behind
    them.  ``pending`` is the state shown while the reply is outstanding (only QUIT from
    TRANSACTION differs: RFC 1939 §6 calls that the UPDATE state).
    """

    ok: State
    err: State
    exclusive: bool = False
    pending: State | None = None


_A, _T = State.AUTHORIZATION, State.TRANSACTION
_STAY_A: Final = Transition(_A, _A)
_STAY_T: Final = Transition(_T, _T)

# The whole state machine.  A verb missing from a state's row is illegal there (send() raises).
TRANSITIONS: Final[dict[State, dict[Verb, Transition]]] = {
    State.AUTHORIZATION: {
        Verb.CAPA: _STAY_A,  # RFC 2449 §5: any state
        Verb.USER: _STAY_A,  # RFC 1939 §7: only PASS completes the login
        # Exclusive, which Courier needs: courierpop3login execs courierpop3d after a good PASS,
        # and whatever a client pipelined behind the PASS is lost with it.
        Verb.PASS: Transition(_T, _A, exclusive=True),
        Verb.APOP: Transition(_T, _A, exclusive=True),
        Verb.AUTH: Transition(_T, _A, exclusive=True),  # RFC 5034 §4
        Verb.STLS: Transition(_A, _A, exclusive=True),  # RFC 2595 §4: TLS follows the +OK
        # RFC 6856 §2: UTF-8 mode, "valid in states: AUTHORIZATION" (not after login).  It
        # changes how later arguments and messages are read, not the state.
        Verb.UTF8: _STAY_A,
        # RFC 1939 §5: QUIT in AUTHORIZATION ends the session without an UPDATE state.
        Verb.QUIT: Transition(State.CLOSED, State.CLOSED, exclusive=True),
    },
    State.TRANSACTION: {
        Verb.CAPA: _STAY_T,
        Verb.STAT: _STAY_T,
        Verb.LIST: _STAY_T,
        Verb.UIDL: _STAY_T,
        Verb.RETR: _STAY_T,
        Verb.TOP: _STAY_T,
        Verb.DELE: _STAY_T,
        Verb.NOOP: _STAY_T,
        Verb.RSET: _STAY_T,
        # RFC 1939 §6: even -ERR to QUIT ends the session (some deletions failed).
        Verb.QUIT: Transition(State.CLOSED, State.CLOSED, exclusive=True, pending=State.UPDATE),
    },
    State.UPDATE: {},
    State.CLOSED: {},
    State.ERROR: {},
}

# (min, max) number of arguments per verb; RFC 1939 §5-§7, RFC 2449 §5, RFC 5034 §4.
_ARITY: Final[dict[Verb, tuple[int, int]]] = {
    Verb.USER: (1, 1),
    Verb.PASS: (1, 1),
    Verb.APOP: (2, 2),
    Verb.AUTH: (1, 2),
    Verb.STLS: (0, 0),
    Verb.UTF8: (0, 0),
    Verb.CAPA: (0, 0),
    Verb.STAT: (0, 0),
    Verb.LIST: (0, 1),
    Verb.UIDL: (0, 1),
    Verb.RETR: (1, 1),
    Verb.TOP: (2, 2),
    Verb.DELE: (1, 1),
    Verb.NOOP: (0, 0),
    Verb.RSET: (0, 0),
    Verb.QUIT: (0, 0),
}
# Verbs whose arguments are all message numbers (or TOP's line count): decimal digits only.
_NUMERIC: Final = frozenset({Verb.LIST, Verb.UIDL, Verb.RETR, Verb.TOP, Verb.DELE})
_FORBIDDEN_IN_ARGS: Final = re.compile(r"[\r\n\x00]")


@dataclass(frozen=True, slots=True)
class Command:
    """One client command: a verb and its arguments (strings, or ints for message numbers).

    Arguments are checked here, so no caller can smuggle a second command in: CR, LF and NUL
    are refused everywhere (aiosmtplib's guard), spaces everywhere except in PASS, whose single
    argument RFC 1939 §7 allows to contain spaces.
    """

    verb: Verb
    args: tuple[str | int, ...] = ()

    def __post_init__(self) -> None:
        low, high = _ARITY[self.verb]
        if not low <= len(self.args) <= high:
            raise ValueError(
                f"{self.verb.value} takes {low}..{high} arguments, not {len(self.args)}"
            )
        for arg in self.args:
            text = str(arg)
            if not text:
                raise ValueError(f"{self.verb.value}: empty argument")
            if _FORBIDDEN_IN_ARGS.search(text):
                raise ValueError(f"{self.verb.value}: CR, LF or NUL in an argument")
            if " " in text and self.verb is not Verb.PASS:
                raise ValueError(f"{self.verb.value}: space in an argument")
            if self.verb in _NUMERIC and not (text.isascii() and text.isdigit()):
                raise ValueError(f"{self.verb.value}: argument must be a number")

    def to_bytes(self) -> bytes:
        """The command line as sent: ``VERB arg ...`` and CRLF (RFC 1939 §3), UTF-8 encoded."""
        return " ".join([self.verb.value, *map(str, self.args)]).encode() + b"\r\n"


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA` (an Enum, so ``match`` and mypy narrow it)."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's ``+OK`` greeting; ``apop_stamp`` is its ``<...>`` timestamp (RFC 1939 §7)."""

    text: str
    apop_stamp: str | None


@dataclass(frozen=True, slots=True)
class Ok:
    """A single-line ``+OK``; ``text`` is what follows the indicator."""

    text: str


@dataclass(frozen=True, slots=True)
class Err:
    """``-ERR``, always one line.  ``resp_code`` is the RFC 2449 §8 code, upper case, or None."""

    text: str
    resp_code: str | None


@dataclass(frozen=True, slots=True)
class Continuation:
    """A SASL challenge, ``+ <base64>`` (RFC 5034 §4); answer with ``send_sasl_response``."""

    text: str


@dataclass(frozen=True, slots=True)
class Listing:
    """The multi-line reply to UIDL or LIST without an argument.

    ``entries`` are ``(message number, value)``: the unique-id for UIDL (RFC 1939 §7), the size
    in octets as a decimal string for LIST (already checked to be digits).
    """

    text: str
    entries: tuple[tuple[int, str], ...]


WIRE_COPY_LIMIT: Final = 1024 * 1024
"""The largest stuffed body kept as :attr:`Message.wire` next to its unstuffed copy."""


@dataclass(frozen=True, slots=True)
class Message:
    """The multi-line reply to RETR or TOP: the message, CRLF line ends, dots unstuffed.

    ``wire`` is the body as it came off the wire, still dot-stuffed, when it is byte for byte
    the SMTP DATA content of ``raw`` without the final ``.`` line: POP3 and SMTP stuff dots
    alike (RFC 1939 §3, RFC 5321 §4.5.2), so it can be forwarded without another scan.  That
    holds when every CR and LF is in a CRLF pair, the body is not empty, every line after the
    first that starts with a dot came stuffed (a ``.x`` sent unstuffed stays ``.x`` in ``raw``,
    and SMTP would strip its dot), ``raw`` does not start with a dot (Dovecot 2.3 leaves the
    first line unstuffed: see ``_first_line_quirk``), and, if unstuffing made a copy, the body
    is at most :data:`WIRE_COPY_LIMIT` octets.
    Otherwise ``wire`` is None.  It is derived from ``raw``, so equality ignores it.
    """

    raw: bytes
    wire: bytes | None = field(default=None, compare=False, repr=False)


STREAM_CHUNK: Final = 128 * 1024
"""A streamed RETR's body is handed out once this many octets are buffered (see the module
docstring): a chunk is about this size plus what one read added."""


@dataclass(frozen=True, slots=True)
class MessageChunk:
    """A piece of a streamed RETR (``send(..., stream=True)``): the message's next octets, CRLF
    line ends, dots unstuffed, as :attr:`Message.raw` would hold them; never the terminator."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The end of a streamed RETR.  ``size``: the message's octets, ``prefix`` included.
    ``prefix``: octets that belong *before* the first chunk, usually none; a ``"."`` when the
    server did not dot-stuff a first line starting with ``..`` (``_first_line_quirk``), which
    only the octet count at the end reveals."""

    size: int
    prefix: bytes = b""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The reply to CAPA (RFC 2449 §5): ``(NAME, (arg, ...))`` pairs, names in upper case."""

    entries: tuple[tuple[str, tuple[str, ...]], ...]

    def as_dict(self) -> dict[str, list[str]]:
        """Name to arguments; a capability listed twice keeps its last line."""
        return {name: list(args) for name, args in self.entries}


@dataclass(frozen=True, slots=True)
class Closed:
    """The server closed the connection when no reply was due (after QUIT, or idle)."""


Event = (
    Greeting
    | Ok
    | Err
    | Continuation
    | Listing
    | Message
    | MessageChunk
    | MessageEnd
    | Capabilities
    | Closed
)


# ---------------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------------


class _Frame(enum.Enum):
    """How the reply to a queued command is framed (RFC 1939 §3)."""

    GREETING = "greeting"
    SINGLE = "single"
    MESSAGE = "message"  # RETR, TOP
    UIDL = "uidl"  # UIDL without argument
    LIST = "list"  # LIST without argument
    CAPA = "capa"
    SASL = "sasl"  # AUTH: +OK, -ERR or a "+ " continuation


@dataclass(frozen=True, slots=True)
class _Pending:
    verb: Verb | None  # None for the greeting
    frame: _Frame
    transition: Transition | None
    cap: int | None = None  # this reply's own cap in octets (a listing, a RETR), see send()
    listed: int | None = None  # RETR: the size LIST announced, for the error message
    count: int | None = None  # LIST, UIDL: the message count STAT announced
    stream: bool = False  # RETR: MessageChunk events and a MessageEnd instead of a Message


def _frame_for(cmd: Command) -> _Frame:
    match cmd.verb:
        case Verb.RETR | Verb.TOP:
            return _Frame.MESSAGE
        case Verb.CAPA:
            return _Frame.CAPA
        case Verb.UIDL:
            return _Frame.SINGLE if cmd.args else _Frame.UIDL
        case Verb.LIST:
            return _Frame.SINGLE if cmd.args else _Frame.LIST
        case Verb.AUTH:
            return _Frame.SASL
        case (
            Verb.USER | Verb.PASS | Verb.APOP | Verb.STLS | Verb.UTF8 | Verb.STAT
            | Verb.DELE | Verb.NOOP | Verb.RSET | Verb.QUIT
        ):  # fmt: skip
            return _Frame.SINGLE
        case _:
            assert_never(cmd.verb)


# RFC 2449 §8: resp-code = "[" resp-level *("/" resp-level) "]", right after the indicator.
_RESP_CODE: Final = re.compile(rb"\[([^\s\[\]/]+(?:/[^\s\[\]/]+)*)\]\s*")
# RFC 1939 §7: the APOP timestamp is a msg-id, "<" ... ">", somewhere in the greeting.
# RFC 1939 §7 / RFC 822 msg-id: printable ASCII only, so a hostile greeting cannot make the
# stamp undecodable.
_APOP_STAMP: Final = re.compile(rb"<[\x21-\x3b\x3d\x3f-\x7e]+>")
# RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
_UID: Final = re.compile(rb"[\x21-\x7e]{1,70}")


def _text(data: bytes | bytearray) -> str:
    """Status text for humans and logs: decoded leniently, never raising, and with its control
    characters escaped (:func:`connector.errors.printable`): the server chose these bytes."""
    return printable(bytes(data).decode("utf-8", errors="replace").strip())


def _unstuff_slow(body: bytes) -> bytes:
    """Dot-unstuffing for bodies with bare LF line ends, rewritten to CRLF.

    ``body`` ends with the LF before the terminating dot line.  Every line end (LF, with one CR
    before it taken as part of it) becomes CRLF, and a line starting with ".." loses a dot.
    Done with ``bytes.replace`` over the whole body, not a list of its lines: a message of a
    hundred million empty lines would otherwise cost gigabytes of line objects.
    """
    text = body.replace(b"\r\n", b"\n").replace(b"\n..", b"\n.")
    if text.startswith(b".."):
        text = text[1:]
    return text.replace(b"\n", b"\r\n")


def _unstuff(body: bytes, stuffed: bool) -> tuple[bytes, bool]:
    """Undo RFC 1939 §3 dot-stuffing of a body that ends in a line end, without a Python loop.

    Returns the message and whether ``body`` can go to SMTP as it is, apart from its first
    line: it is CRLF-clean (every CR and LF in a CRLF pair) and every later line that starts
    with a dot came stuffed.  ``stuffed`` says whether the terminator scan met any line
    starting with a dot; if not, the body is returned as it is (no copy).

    The counts come from one C pass (``_scan.line_counts``) or, without it, from ``bytes.count``
    (up to four passes over the body).
    """
    if _fast_line_counts is not None:
        lf, cr, pairs, dot, dotdot = _fast_line_counts(body)
    else:
        lf, pairs = body.count(b"\n"), body.count(b"\r\n")
        cr = body.count(b"\r") if lf == pairs else -1
        dot = dotdot = -1  # counted below, only if needed
    if lf != pairs:
        # Bare LF somewhere: tolerated, rewritten (poplib does too).  Not the wire form.
        return _unstuff_slow(body), False
    # A lone CR is kept in the message, but SMTP must not see it (RFC 5321 §2.3.8).
    crlf = cr == lf
    if not stuffed:
        return body, crlf
    if dotdot < 0:
        raw = body.replace(b"\r\n..", b"\r\n.")
        dotdot = len(body) - len(raw)  # one octet shorter per "\r\n.."
    else:
        raw = body.replace(b"\r\n..", b"\r\n.") if dotdot else body
    if crlf:
        # A line ".x" the server did not stuff stays ".x" in raw (poplib's reading; RFC 1939
        # §3 would drop the dot, but an unstuffed ".x" most likely was ".x"), and SMTP would
        # strip the dot from the body (RFC 5321 §4.5.2): then the body is not the wire form.
        # Neither "\r\n." nor "\r\n.." overlaps itself, so the counts see every occurrence,
        # and each "\r\n.." is one "\r\n.": the numbers are equal exactly when every
        # "\r\n." is followed by another dot.
        crlf = (dot if dot >= 0 else body.count(b"\r\n.")) == dotdot
    # The first line has no CRLF in front of it.
    return (raw[1:] if raw.startswith(b"..") else raw), crlf


def _unstuff_piece(piece: bytes, line_start: bool) -> bytes:
    """:func:`_unstuff` for a piece of a streamed body: whole lines (ending in LF) or, from a
    line too long to wait for, part of one (never ending in CR).  ``line_start``: the piece
    starts a line, so a leading ``..`` loses a dot; else it continues one, and its first octet
    is content whatever it is (a stand-in octet in front keeps ``_unstuff`` from reading it as
    a line start)."""
    if line_start:
        return _unstuff(piece, True)[0]
    return _unstuff(b"x" + piece, True)[0][1:]


def _lines(body: bytes) -> list[bytes]:
    """The lines of a small multi-line reply (listings, CAPA), unstuffed, line ends removed."""
    out = []
    for line in body.split(b"\n")[:-1]:
        line = line.removesuffix(b"\r")
        if len(line) > MAX_LINE:
            raise Pop3ProtocolError(f"listing line longer than {MAX_LINE} octets")
        out.append(line[1:] if line.startswith(b"..") else line)
    return out


class Connection:
    """The client side of one POP3 session, without I/O.  See the module docstring.

    ``max_message_size`` bounds a multi-line reply (a message, or a listing) in octets as they
    arrive; a bigger one raises Pop3ProtocolError rather than growing the buffer without end.
    """

    def __init__(self, *, max_message_size: int = 256 * 1024 * 1024) -> None:
        if max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        self.max_message_size = max_message_size
        self._state = State.AUTHORIZATION
        self._buf = bytearray()
        self._eof = False
        # The greeting is the first reply due (RFC 1939 §4).
        self._pending: deque[_Pending] = deque([_Pending(None, _Frame.GREETING, None)])
        # Inside a multi-line body: the status line has been consumed, but its LF is kept at
        # _buf[0] so that the first body line, like every other, follows an LF.
        self._in_body = False
        self._scan = 0  # where the next search for "\n." starts (h11's search offset)
        self._stuffed = False  # the scan met a line starting with "." that was not the end
        self._status_text = ""  # the +OK text of the multi-line reply in progress
        self._announced: int | None = None  # RETR's "+OK <octets>", when the server says it
        self._sasl_challenged = False  # a Continuation was delivered; AUTH waits for an answer
        # A streamed RETR (send(..., stream=True)) in progress: whether _buf[0] is content in
        # the middle of a line (else it is the LF before the next line, as above); the octets
        # of the body taken off the buffer and handed out (before and after unstuffing); the
        # body's first octets as sent (for _lead_dot); the MessageEnd due after the last chunk.
        self._mid_line = False
        self._taken = 0
        self._streamed = 0
        self._lead = b""
        self._end: MessageEnd | None = None

    # -- properties ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current RFC 1939 state (UPDATE while QUIT from TRANSACTION awaits its reply)."""
        # Only an exclusive command can show a pending state, and it is always the last entry.
        last = self._pending[-1].transition if self._pending else None
        if last is not None and last.pending is not None:
            return last.pending
        return self._state

    @property
    def pending(self) -> tuple[Verb | None, ...]:
        """Verbs whose replies are still due, oldest first (None stands for the greeting)."""
        return tuple(p.verb for p in self._pending)

    @property
    def buffered(self) -> int:
        """How many received octets are not yet part of an event."""
        return len(self._buf)

    # -- sending ---------------------------------------------------------------------------

    def send(self, cmd: Command, *, expect: int | None = None, stream: bool = False) -> bytes:
        """Queue ``cmd`` and return the bytes to write.

        ``expect`` bounds the reply by what the session was told before: for LIST and UIDL
        without an argument the message count STAT gave (:func:`listing_cap`), for RETR and
        TOP the size LIST gave for that message (:func:`retr_cap`).  Without it a multi-line
        reply is bounded by ``max_message_size`` only; a CAPA reply always by
        :data:`CAPA_CAP`.  ``stream`` (RETR only): the message comes as
        :class:`MessageChunk` events and a :class:`MessageEnd` (see the module docstring).

        Raises LocalProtocolError when the verb is not allowed in the current state, or when an
        exclusive command (PASS, APOP, AUTH, STLS, QUIT) still awaits its reply.
        """
        if self._state in (State.ERROR, State.CLOSED):
            raise LocalProtocolError(
                f"cannot send {cmd.verb.value}: connection is {self._state.value}"
            )
        # Nothing is queued behind an exclusive command, so checking the last entry suffices
        # (and keeps send() O(1) with a long pipeline).
        last = self._pending[-1] if self._pending else None
        if last is not None and last.transition is not None and last.transition.exclusive:
            raise LocalProtocolError(
                f"cannot send {cmd.verb.value} before the reply to {last.verb}"
            )
        transition = TRANSITIONS[self._state].get(cmd.verb)
        if transition is None:
            raise LocalProtocolError(f"{cmd.verb.value} is not allowed in {self._state.value}")
        if stream and cmd.verb is not Verb.RETR:
            raise ValueError(f"only RETR can be streamed, not {cmd.verb.value}")
        frame = _frame_for(cmd)
        cap = listed = count = None
        if frame is _Frame.CAPA:
            cap = CAPA_CAP
        elif expect is not None and expect >= 0:
            if frame in (_Frame.LIST, _Frame.UIDL):
                cap, count = listing_cap(expect), expect
            elif frame is _Frame.MESSAGE:
                cap, listed = retr_cap(expect), expect
        self._pending.append(_Pending(cmd.verb, frame, transition, cap, listed, count, stream))
        return cmd.to_bytes()

    def send_sasl_response(self, response: str) -> bytes:
        """Answer a :class:`Continuation` with a base64 line, or ``*`` to cancel (RFC 5034 §4)."""
        if not self._sasl_challenged:
            raise LocalProtocolError("no SASL challenge to answer")
        if _FORBIDDEN_IN_ARGS.search(response):
            raise ValueError("CR, LF or NUL in a SASL response")
        self._sasl_challenged = False
        return response.encode("ascii") + b"\r\n"

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the server; ``b""`` means the server closed the connection."""
        if self._eof:
            if data:
                raise LocalProtocolError("data received after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """Return the next complete event, or NEED_DATA.  Raises Pop3ProtocolError on bad input.

        Any exception leaves the connection in the ERROR state; later calls raise again.
        """
        if self._state is State.ERROR:
            raise Pop3ProtocolError("the connection is in the ERROR state")
        try:
            return self._next_event()
        except (Pop3ProtocolError, Pop3ConnectionError):
            self._state = State.ERROR
            raise

    def _next_event(self) -> Event | NeedData:
        if self._end is not None:  # a streamed RETR's last chunk went out just before
            ended, self._end = self._end, None
            return ended
        if not self._pending:
            if self._buf:
                raise Pop3ProtocolError("the server sent data no command asked for")
            if self._eof:
                self._state = State.CLOSED
                return Closed()
            return NEED_DATA
        if self._sasl_challenged:
            return NEED_DATA  # the server waits for our SASL answer; nothing can arrive
        head = self._pending[0]
        if self._in_body:
            return self._body(head)
        # A status line: "+OK ...", "-ERR ...", or for AUTH a "+ ..." challenge.
        end = self._buf.find(b"\n", 0, MAX_LINE + 1)
        if end < 0:
            if len(self._buf) > MAX_LINE:
                raise Pop3ProtocolError(f"status line longer than {MAX_LINE} octets")
            return self._need_data()
        line = bytes(self._buf[:end]).removesuffix(b"\r")
        if line.startswith(b"-ERR") and (len(line) == 4 or line[4:5] in b" \t"):
            del self._buf[: end + 1]
            return self._err(head, line[4:].lstrip())
        if line.startswith(b"+OK") and (len(line) == 3 or line[3:4] in b" \t"):
            return self._ok(head, line[3:].strip(), end)
        if head.frame is _Frame.SASL and (line == b"+" or line.startswith(b"+ ")):
            del self._buf[: end + 1]
            self._sasl_challenged = True
            return Continuation(_text(line[1:]))
        raise Pop3ProtocolError("reply does not start with +OK or -ERR")

    def _need_data(self) -> NeedData:
        if self._eof:
            # EOF while a reply is due: the connection broke under us (httpcore's rule).
            raise Pop3ConnectionError("the server closed the connection in the middle of a reply")
        return NEED_DATA

    def _complete(self, ok: bool) -> _Pending:
        """Pop the head of the FIFO and apply its transition."""
        head = self._pending.popleft()
        if head.transition is not None:
            self._state = head.transition.ok if ok else head.transition.err
        return head

    def _err(self, head: _Pending, rest: bytes) -> Err:
        m = _RESP_CODE.match(rest)
        code = printable(m.group(1).decode("ascii", errors="replace").upper()) if m else None
        text = _text(rest[m.end() :] if m else rest)
        self._complete(ok=False)
        if head.frame is _Frame.GREETING:
            self._state = State.CLOSED  # a refusal instead of a greeting; the server hangs up
        return Err(text, code)

    def _ok(self, head: _Pending, rest: bytes, end: int) -> Event | NeedData:
        match head.frame:
            case _Frame.GREETING:
                del self._buf[: end + 1]
                self._complete(ok=True)
                stamp = _APOP_STAMP.search(rest)
                return Greeting(_text(rest), stamp.group().decode("ascii") if stamp else None)
            case _Frame.SINGLE | _Frame.SASL:
                del self._buf[: end + 1]
                self._complete(ok=True)
                if head.verb is Verb.STLS and self._buf:
                    # RFC 2595 §4 / CVE-2011-0411: plaintext sent behind the STLS reply would
                    # be read as if it came over TLS.  A real server sends nothing there.
                    raise Pop3ProtocolError("data after the STLS reply, before TLS")
                return Ok(_text(rest))
            case _Frame.MESSAGE | _Frame.UIDL | _Frame.LIST | _Frame.CAPA:
                # Keep the status line's LF as _buf[0]: the body then starts after an LF.
                self._status_text = _text(rest)
                # RFC 1939 §5 only suggests the octet count; GNU mailutils pop3d and popa3d send
                # a bare "+OK" to RETR, and Courier "+OK n octets follow.": None, or the count.
                size = rest.split(None, 1)[0] if rest else b""
                self._announced = int(size) if head.verb is Verb.RETR and size.isdigit() else None
                del self._buf[:end]
                self._in_body = True
                self._scan = 0
                self._stuffed = False
                self._mid_line = False
                self._taken = self._streamed = 0
                self._lead = b""
                return self._body(head)
            case _:
                assert_never(head.frame)

    def _body(self, head: _Pending) -> Event | NeedData:
        """Find the terminating ``.`` line of a multi-line reply; build its event."""
        if head.stream:
            return self._stream_body(head)
        buf = self._buf
        i = buf.find(b"\n.", self._scan)
        while i >= 0:
            # The dot opens a line.  Terminator if the line is just "." (CRLF or bare LF).
            after = bytes(buf[i + 2 : i + 4])
            if (after == b"\r\n" or after[:1] == b"\n") and not (i == 0 and self._announced):
                return self._finish_body(head, i, i + 2 + (2 if after == b"\r\n" else 1))
            # A "." first line of a RETR that announced octets is content: Dovecot 2.3 does not
            # dot-stuff a message's first line (seen on the wire), so ".\r\n.\r\n" is "." +
            # the terminator.  _finish_body checks the octet count afterwards.
            if after in (b"", b"\r"):
                break  # cannot tell yet: wait for more bytes, resume the search here
            self._stuffed = True  # a stuffed line ("..x"): unstuff later; keep looking
            i = buf.find(b"\n.", i + 2)
        else:
            # No "\n." at all: the last byte may be an LF whose dot is still in flight.
            i = max(len(buf) - 1, 0)
        self._scan = i
        if len(buf) - 1 > self._wire_cap(head):
            raise Pop3ProtocolError(self._too_long(head))
        return self._need_data()

    def _stream_body(self, head: _Pending) -> Event | NeedData:
        """:meth:`_body` for a streamed RETR: the same search for the terminator, but the
        body is handed out in chunks as it comes (:meth:`_cut`) instead of gathered."""
        buf = self._buf
        base = 0 if self._mid_line else 1  # where the body's octets start in _buf
        i = buf.find(b"\n.", self._scan)
        while i >= 0:
            after = bytes(buf[i + 2 : i + 4])
            first = i == 0 and base == 1 and not self._taken  # the message's first line
            if (after == b"\r\n" or after[:1] == b"\n") and not (first and self._announced):
                return self._end_stream(head, base, i, i + 2 + (2 if after == b"\r\n" else 1))
            if after in (b"", b"\r"):
                break
            i = buf.find(b"\n.", i + 2)
        else:
            i = max(len(buf) - 1, 0)
        self._scan = i
        if self._taken + len(buf) - base > self._wire_cap(head):
            raise Pop3ProtocolError(self._too_long(head))
        if len(buf) - base >= STREAM_CHUNK:
            return MessageChunk(self._cut(head, base))
        return self._need_data()

    def _cut(self, head: _Pending, base: int) -> bytes:
        """Take the body's decided octets off the buffer: up to the last line end the search
        has passed, keeping that LF as ``_buf[0]`` (what follows it is judged by the next
        search); or, with no line end there (one long line), all but a final CR."""
        buf = self._buf
        if not self._taken:
            self._lead = bytes(buf[base : base + 3])
        line_start = base == 1
        cut = buf.rfind(b"\n", base, self._scan + 1)
        if cut >= base:
            piece = bytes(buf[base : cut + 1])
            del buf[:cut]
            self._scan -= cut
            self._mid_line = False
        else:
            stop = len(buf) - (1 if buf.endswith(b"\r") else 0)
            piece = bytes(buf[base:stop])
            del buf[:stop]
            self._scan = 0
            self._mid_line = True
        return self._hand_out(head, piece, line_start)

    def _hand_out(self, head: _Pending, piece: bytes, line_start: bool) -> bytes:
        self._taken += len(piece)
        data = _unstuff_piece(piece, line_start)
        self._streamed += len(data)
        if head.cap is not None and self._streamed > head.cap:
            raise Pop3ProtocolError(self._too_long(head))
        return data

    def _end_stream(self, head: _Pending, base: int, dot_lf: int, end: int) -> Event:
        """The terminator of a streamed RETR is at ``dot_lf``: the last chunk (if any octets
        are left), then the :class:`MessageEnd`."""
        piece = bytes(self._buf[base : dot_lf + 1]) if dot_lf + 1 > base else b""
        if not self._taken:
            self._lead = piece[:3]
        del self._buf[:end]
        self._in_body = self._mid_line = False
        self._scan = 0
        data = self._hand_out(head, piece, base == 1) if piece else b""
        self._complete(ok=True)
        prefix = _lead_dot(self._lead, self._streamed, self._announced)
        if head.cap is not None and self._streamed + len(prefix) > head.cap:
            raise Pop3ProtocolError(self._too_long(head))
        end_event = MessageEnd(self._streamed + len(prefix), prefix)
        if not data:
            return end_event
        self._end = end_event
        return MessageChunk(data)

    def _wire_cap(self, head: _Pending) -> int:
        """The most octets the reply in progress may take on the wire.  A RETR's cap counts
        the message unstuffed: dot-stuffing adds at most one octet per three (a "." line)."""
        if head.cap is None:
            return self.max_message_size
        wire = head.cap + head.cap // 3 + 3 if head.frame is _Frame.MESSAGE else head.cap
        return min(wire, self.max_message_size)

    def _too_long(self, head: _Pending) -> str:
        if head.listed is not None:
            return f"RETR sends more than the {head.listed} octets LIST announced for the message"
        if head.cap is not None:
            return (
                f"{head.verb.value if head.verb else 'reply'} listing exceeds {head.cap} octets, "
                "more than the message count STAT announced allows"
            )
        return f"multi-line reply exceeds {self.max_message_size} octets; refusing to truncate"

    def _finish_body(self, head: _Pending, dot_lf: int, end: int) -> Event:
        # Body: from after the status line's LF up to and including the LF before the dot.
        with memoryview(self._buf) as view:  # one copy; the export ends before the del
            body = bytes(view[1 : dot_lf + 1])
        del self._buf[:end]
        self._in_body = False
        self._scan = 0
        if len(body) > self._wire_cap(head):
            raise Pop3ProtocolError(self._too_long(head))
        self._complete(ok=True)
        match head.frame:
            case _Frame.MESSAGE:
                raw, as_is = _unstuff(body, self._stuffed)
                raw = _first_line_quirk(body, raw, self._announced)
                if head.cap is not None and len(raw) > head.cap:
                    raise Pop3ProtocolError(self._too_long(head))
                # A first line starting with "." may have come unstuffed (Dovecot 2.3): then
                # the body is not the SMTP form; the rare old path re-stuffs ``raw``.  A large
                # stuffed body is not kept beside ``raw`` either: two copies of a 25 MiB
                # message per account in flight cost more memory than the scan saves CPU.
                forward = as_is and body and not raw.startswith(b".")
                if body is not raw and len(body) > WIRE_COPY_LIMIT:
                    forward = False
                wire = body if forward else None
                return Message(raw, wire)
            case _Frame.UIDL:
                return Listing(self._status_text, _parse_listing(body, True, head.count))
            case _Frame.LIST:
                return Listing(self._status_text, _parse_listing(body, False, head.count))
            case _Frame.CAPA:
                return Capabilities(_parse_capa(body))
            case _Frame.GREETING | _Frame.SINGLE | _Frame.SASL:
                raise AssertionError("single-line frame in a body")  # pragma: no cover
            case _:
                assert_never(head.frame)


def _first_line_quirk(body: bytes, raw: bytes, announced: int | None) -> bytes:
    """Undo the damage of a server that did not dot-stuff the first line (RFC 1939 §3).

    Dovecot 2.3 sends a message whose first line is ``..x`` as ``..x`` and one that is ``.`` as
    ``.``.  Unstuffing then drops a dot that was content, or ends the message before it began.
    RETR's ``+OK <octets>`` tells the two readings apart: if the usual one is one octet short
    and the first line starts with ``..``, the server did not stuff it.  A "." first line that
    was taken as content (see ``_body``) must add up, or the reply is not trusted.
    """
    if announced is None or not body.startswith(b"."):
        return raw
    # Dovecot 2.3 counts the message with CRLF line ends (RFC 1939 §5: exact octets; it adds
    # the CR of a bare LF itself and counts it), but one stored without a final line end goes
    # out with the CRLF every line needs (RFC 1939 §3): its count is then two octets short
    # (pop3-commands.c, fetch_callback).  Nothing else it sends changes the length.  Courier
    # (RETR's count) and GNU mailutils pop3d (LIST's) count such a message two octets short too.
    # The two readings below differ by one octet and the two counts by two, so no message fits
    # both: with counts made that way the choice is exact, and with Dovecot, which never
    # stuffs line 1, the unstuffed reading is the true one whenever a count fits it.  Only a
    # count one octet off could mislead: a server that does stuff line 1 but counts a stored
    # LF as one octet (the "physical" size many servers give, per Dovecot's
    # pop3_fast_size_lookups) sends the one-line message ".x" LF as "+OK 3", "..x" CRLF, the
    # very bytes of Dovecot's "..x" stored without a line end, and it becomes "..x".  No real
    # mail is one line (RFC 5322 §3.6 requires From: and Date:), so the tolerance stays.
    return b"." + raw if _lead_dot(body[:3], len(raw), announced) else raw


def _lead_dot(lead: bytes, size: int, announced: int | None) -> bytes:
    """The decision of :func:`_first_line_quirk` from the body's first three octets as sent
    (``lead``) and the message's size read the usual way: ``b"."`` when the server did not
    stuff a first line starting with ``..`` (the dot belongs before the message), else ``b""``;
    raises when a ``.`` first line taken as content does not add up."""
    if announced is None or not lead.startswith(b"."):
        return b""
    counts = (announced, announced + 2)
    if lead.startswith(b"..") and size + 1 in counts:
        return b"."
    if lead.startswith((b".\r\n", b".\n")) and size not in counts:
        raise Pop3ProtocolError(
            f"message of {size} octets after a '.' first line, but {announced} announced"
        )
    return b""


def _parse_listing(
    body: bytes, uidl: bool, count: int | None = None
) -> tuple[tuple[int, str], ...]:
    """Parse ``n value`` lines (RFC 1939 §5 LIST scan listings, §7 UIDL unique-id listings).

    One line at a time, in place: what stays is the entries (the set of unique-ids holds the
    same strings), not a list of the lines or of their words; message numbers are checked for
    repeats by their order, and only a server that lists them out of order costs a set.
    ``count``: STAT's message count, which the listing may not exceed (RFC 1939 §4: the
    maildrop is locked for the session; a few more are let pass).
    """
    entries: list[tuple[int, str]] = []
    numbers: set[int] | None = None  # only once the numbers come out of order
    last = 0
    values: set[str] = set()
    most = None if count is None else count + count // 100 + 16
    pos, end = 0, len(body)
    while pos < end:
        nl = body.find(b"\n", pos)
        stop = end if nl < 0 else nl
        if stop - pos > MAX_LINE + 1:
            raise Pop3ProtocolError(f"listing line longer than {MAX_LINE} octets")
        line = body[pos:stop].removesuffix(b"\r")
        pos = stop + 1
        if line.startswith(b".."):
            line = line[1:]
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].isdigit():
            raise Pop3ProtocolError("malformed listing line")
        number, raw_value = int(parts[0]), parts[1]
        if number > last:
            last = number
            if numbers is not None:
                numbers.add(number)
        else:
            if numbers is None:
                numbers = {n for n, _ in entries}
            if number < 1 or number in numbers:
                raise Pop3ProtocolError(f"message number {number} invalid or listed twice")
            numbers.add(number)
        if uidl:
            if not _UID.fullmatch(raw_value):
                raise Pop3ProtocolError("unique-id is not 1-70 characters 0x21-0x7E")
            value = raw_value.decode("ascii")
            # RFC 1939 §7: unique within the maildrop, and so the ledger's key (see
            # docs/design.md §8.2); a repeat would make us skip or delete the wrong message
            # (getmail6 agrees).  popa3d's unique-id is a digest of a few header fields
            # (Received, Date, Message-ID...), so two messages lacking all of them repeat one:
            # the cycle then fails until one of them is gone.
            if value in values:
                raise Pop3ProtocolError("the same unique-id is listed twice")
            values.add(value)
        elif not raw_value.isdigit():
            raise Pop3ProtocolError("message size is not a number")
        else:
            value = raw_value.decode("ascii")
        entries.append((number, value))
        if most is not None and len(entries) > most:
            raise Pop3ProtocolError(f"more messages listed than the {count} STAT announced")
    return tuple(entries)


def _parse_capa(body: bytes) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """RFC 2449 §5: one capability per line, a name and space-separated arguments."""
    caps = []
    for line in _lines(body):
        # Split before escaping: the words are separated by white space, which _text escapes.
        words = [printable(w) for w in bytes(line).decode("utf-8", errors="replace").split()]
        if words:
            caps.append((words[0].upper(), tuple(words[1:])))
    return tuple(caps)


# ---------------------------------------------------------------------------------------------
# Helpers for the shell: parsing single-line replies, building credentials
# ---------------------------------------------------------------------------------------------


def parse_stat(text: str) -> tuple[int, int]:
    """``+OK nn mm`` to STAT (RFC 1939 §5, drop listing): (message count, size in octets)."""
    parts = text.split(None, 2)  # the rest, if any, is not looked at
    if len(parts) < 2 or not all(p.isascii() and p.isdigit() for p in parts[:2]):
        raise Pop3ProtocolError("malformed STAT reply")
    return int(parts[0]), int(parts[1])


def parse_scan_line(text: str) -> tuple[int, str]:
    """``+OK n value`` to LIST n or UIDL n (RFC 1939 §5, §7): (message number, value)."""
    parts = text.split(None, 2)
    if len(parts) < 2 or not (parts[0].isascii() and parts[0].isdigit()):
        raise Pop3ProtocolError("malformed scan listing")
    return int(parts[0]), parts[1]


def apop_digest(stamp: str, password: str) -> str:
    """RFC 1939 §7: MD5 of the greeting's timestamp followed by the secret, in lower-case hex."""
    return hashlib.md5((stamp + password).encode(), usedforsecurity=False).hexdigest()


def sasl_plain(username: str, password: str, authzid: str = "") -> str:
    """RFC 4616 §2: base64 of ``authzid NUL authcid NUL passwd`` (UTF-8)."""
    if "\0" in username + password + authzid:
        raise ValueError("NUL in SASL PLAIN credentials")
    return base64.b64encode(f"{authzid}\0{username}\0{password}".encode()).decode("ascii")
