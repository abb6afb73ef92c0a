"""Dead-letter stores: where a message refused permanently goes before it is deleted upstream.

docs/design.md §5.1 (step 4) and §7.1.  A dead letter is the original message bytes with five
header lines added at the top::

    X-POP3-Connector-Account: info
    X-POP3-Connector-UIDL: 00000001650a1b2c
    X-POP3-Connector-Stage: data
    X-POP3-Connector-Response: 554 5.1.0 Sender denied
    X-POP3-Connector-Failed-At: 2026-11-27T15:49:35Z

Prepending lines is the only change docs/design.md §5.2 (invariant 4) allows, so
:func:`strip_dead_letter_headers` gives ``requeue`` the original bytes back exactly.  The header
values come from the POP3 server (UIDL) and the SMTP server (the response text), so they are
untrusted: every value is forced to one line of printable ASCII, which makes a header injection (a
CR/LF in a reply text starting a new header line, or a body) impossible.

A shared mailbox's dead letter has an ``X-POP3-Connector-Recipients`` field before the five
(see :attr:`DeadLetterInfo.recipients`).  ``requeue`` sends to exactly that list, so it is never
cut: a list too long for one line is folded after a comma (RFC 5322 §2.2.3) into lines that
start with a space, and the reader unfolds it.

Two protocols: :class:`DeadLetterStore` is what the cycle needs (``put``, and ``remove`` for a
dead letter whose ledger row failed to commit); :class:`DeadLetterArchive` adds what the
``dead-letters`` commands need.
"""

from __future__ import annotations

import builtins
import datetime as dt
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from connector.spool import Spooled


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """Why a message was dead-lettered.  ``failed_at`` must be timezone-aware."""

    account: str
    uidl: str
    stage: str  # mail | rcpt | data | size | expired
    response: str  # "554 5.1.0 Sender denied"
    failed_at: dt.datetime  # aware, UTC
    # Whom it was for, when that is not simply the account's deliver_to: a shared mailbox's
    # recipients, or the ones refused while others got the message.  ``requeue`` sends it to
    # them.  Written as an ``X-POP3-Connector-Recipients`` field before the five only when not
    # empty, so the usual dead letter keeps exactly the five lines of docs/design.md §7.1.
    # Never cut; folded over several lines when long (see _recipients_field).
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One stored dead letter, as parsed from our header lines (never from the body).

    ``size`` is the original message's size in octets, without our header lines: what
    ``requeue`` would deliver.
    """

    id: str
    account: str
    uidl: str
    stage: str
    response: str
    failed_at: dt.datetime
    size: int


class DeadLetterStore(Protocol):
    """The seam the cycle uses (docs/design.md §5.1 step 4)."""

    async def put(self, raw: bytes | Spooled, info: DeadLetterInfo) -> str:
        """Store durably; return the dead letter's id.  Raises DeadLetterError.

        A spooled message (docs/design.md §5.3) is copied from its file in chunks (our
        header lines first), never read whole into memory."""
        ...

    async def remove(self, id: str) -> None:
        """Delete one dead letter (the cycle's own, when its ledger row failed to commit).

        Unknown id: KeyError; a failing store: DeadLetterError.
        """
        ...


class DeadLetterArchive(DeadLetterStore, Protocol):
    """A store that can also be inspected and cleaned (``dead-letters list/show/requeue/purge``).

    Unknown ids raise ``KeyError``; a failing store raises ``DeadLetterError``.
    """

    async def list(self) -> builtins.list[DeadLetterRecord]:
        """Every dead letter in the store, oldest first."""
        ...

    async def get(self, id: str) -> bytes:
        """The stored bytes: our header lines followed by the original message."""
        ...

    def chunks(self, id: str) -> AsyncIterator[bytes]:
        """The stored bytes in order, a bounded chunk at a time (a dead letter of a spooled
        message is never read whole: docs/design.md §5.3)."""
        ...

    async def count_by_account(self) -> dict[str, int]:
        """Number of dead letters per account (for the ``dead_letters`` gauge and ``status``)."""
        ...


# --------------------------------------------------------------------------------------------
# Header lines
# --------------------------------------------------------------------------------------------

HEADER_PREFIX: Final = "X-POP3-Connector-"
# The order is part of the format: strip_dead_letter_headers() removes exactly these, in order.
_FIELDS: Final = ("Account", "UIDL", "Stage", "Response", "Failed-At")
_NAMES: Final = tuple(f"{HEADER_PREFIX}{f}: ".encode("ascii") for f in _FIELDS)
# The optional sixth field, before the five (see DeadLetterInfo.recipients).
_RECIPIENTS: Final = f"{HEADER_PREFIX}Recipients: ".encode("ascii")
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"

# RFC 5322 §2.1.1: a line is at most 998 characters.  The longest of the five names plus ": "
# is 28, so a value of 900 leaves room, and the five lines together stay far below
# HEADER_BLOCK_MAX.
_MAX_VALUE: Final = 900
_MAX_LINE: Final = 998
# RFC 5322 §2.1.1: lines SHOULD be at most 78 characters; a folded Recipients field keeps to it.
_FOLD_WIDTH: Final = 78
# RFC 5322 §2.2.3: a line starting with white space continues the field above it.
_WSP: Final = b" \t"
HEADER_BLOCK_MAX: Final = 8192
"""Reading this many bytes from the start of a dead letter covers our header lines, unless a
Recipients field is longer (about 240 addresses of 30 characters): then
:func:`header_block_continues` is true and the whole dead letter must be read."""

_WHITESPACE_RE: Final = re.compile(r"\s+")


def _one_line(value: str, cut: bool = True) -> str:
    """``value`` as one line of printable ASCII: no header injection, whatever the server sent.

    Runs of whitespace (CR, LF, tab, Unicode spaces) become one space, so a reply text spread
    over lines stays readable.  Other control characters and non-ASCII are backslash-escaped,
    as Python's ``backslashreplace`` does, so nothing is lost silently.  Over-long values are
    cut (RFC 5322 §2.1.1) unless ``cut`` is false.
    """
    if cut:
        # Every character gives at least one of the output, so what lies past this could
        # only be cut off: it is not looked at (a megabyte of reply text costs nothing).
        value = value[: _MAX_VALUE * 4]
    out: list[str] = []
    for ch in _WHITESPACE_RE.sub(" ", value).strip():
        code = ord(ch)
        if 0x20 <= code < 0x7F:
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    text = "".join(out)
    if cut and len(text) > _MAX_VALUE:
        text = text[: _MAX_VALUE - 3] + "..."
    return text


def _recipients_field(recipients: tuple[str, ...], eol: bytes) -> bytes:
    """The ``X-POP3-Connector-Recipients`` field: every address, whole, ", "-separated.

    One line when it fits in 998 characters (RFC 5322 §2.1.1), as this field always was, so
    that a short list reads the same to an older reader.  Longer lists are folded after a
    comma (RFC 5322 §2.2.3: the line end goes before a space) into lines of at most 78
    characters, but for an address longer than that, which gets a line of its own; unfolding
    gives back the one-line form.  An address that can go on an SMTP envelope is at most 254
    octets of ASCII (RFC 5321 §4.5.3.1.3, ``smtp.address_problem``), so every line stays
    within 998.
    Each address is sanitised on its own and never cut: ``requeue`` sends to what is here.
    """
    values = [_one_line(r, cut=False).encode("ascii") for r in recipients]
    line = _RECIPIENTS + b", ".join(values)
    if len(line) <= _MAX_LINE:
        return line + eol
    lines = [_RECIPIENTS + values[0]]
    for i, value in enumerate(values[1:], 2):
        lines[-1] += b","
        comma = 1 if i < len(values) else 0
        if len(lines[-1]) + 1 + len(value) + comma <= _FOLD_WIDTH:
            lines[-1] += b" " + value
        else:
            lines.append(b" " + value)
    return b"".join(line + eol for line in lines)


def format_failed_at(when: dt.datetime) -> str:
    """``when`` in UTC as ``2026-11-27T15:49:35Z`` (RFC 3339, seconds).  Rejects naive times."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("failed_at must be timezone-aware")
    return when.astimezone(dt.UTC).strftime(_TIME_FORMAT)


def dead_letter_headers(info: DeadLetterInfo, eol: bytes) -> bytes:
    """The five ``X-POP3-Connector-*`` lines of docs/design.md §7.1, each ended by ``eol``,
    after the Recipients field when there are recipients.

    Every value is sanitised to printable ASCII (see module docstring); each of the five is
    one line.
    """
    if eol not in (b"\r\n", b"\n"):
        raise ValueError("eol must be CRLF or LF")
    values = (info.account, info.uidl, info.stage, info.response)
    lines = [
        name + _one_line(v).encode("ascii") for name, v in zip(_NAMES[:4], values, strict=True)
    ]
    lines.append(_NAMES[4] + format_failed_at(info.failed_at).encode("ascii"))
    five = b"".join(line + eol for line in lines)
    if info.recipients:
        # First, not last: after the five it could not be told from a message's own first
        # line of that name, and requeue would send the mail where its sender chose.  Its
        # continuation lines are followed by Account, so none can be the message's own line.
        return _recipients_field(info.recipients, eol) + five
    return five


def message_eol(raw: bytes) -> bytes:
    """The message's own line ending: CRLF if its first line ends in CRLF, else LF.

    POP3 delivers CRLF (RFC 1939 §3); a message that was stored with LF keeps LF, so a mail
    client never sees mixed line endings in the header block.
    """
    first_nl = raw.find(b"\n")
    if first_nl > 0 and raw[first_nl - 1 : first_nl] == b"\r":
        return b"\r\n"
    return b"\n"


def with_dead_letter_headers(raw: bytes, info: DeadLetterInfo) -> bytes:
    """``raw`` with our header lines in front; the original bytes follow unchanged."""
    return dead_letter_headers(info, message_eol(raw)) + raw


def dead_letter_head(message: bytes | Spooled, info: DeadLetterInfo) -> bytes:
    """Our header lines for ``message``, in its own line ending: what goes before a spooled
    message's file (``Spooled.eol`` was read as :func:`message_eol` reads it)."""
    eol = message_eol(message) if isinstance(message, bytes) else message.eol
    return dead_letter_headers(info, eol)


def _our_lines(raw: bytes) -> tuple[list[bytes], bytes | None, int]:
    """The values of our leading header lines, in order, the optional Recipients field's value
    (unfolded), and the offset just past them.

    An optional Recipients field, then the names of docs/design.md §7.1 in their fixed order; stops
    at the first line that is not the next one.  Callers accept the block only when the five are
    there, so a message that itself starts with one such line keeps it.  Only the Recipients field
    is unfolded: each of the five is one line, so a message whose own first line starts with white
    space keeps it.
    """

    def line(name: bytes, pos: int) -> tuple[bytes, int] | None:
        if not raw.startswith(name, pos):
            return None
        nl = raw.find(b"\n", pos)
        if nl < 0:
            return None
        return raw[pos + len(name) : nl].rstrip(b"\r"), nl + 1

    recipients: bytes | None = None
    pos = 0
    first = line(_RECIPIENTS, 0)
    if first is not None:
        folded, pos = [first[0]], first[1]
        # RFC 5322 §2.2.3: unfolding removes the line end before the white space.  The
        # pieces are joined once at the end: a long field is not copied once per line.
        while pos < len(raw) and raw[pos] in _WSP:
            nl = raw.find(b"\n", pos)
            if nl < 0:
                break  # cut off (a head of HEADER_BLOCK_MAX bytes): not a complete block
            folded.append(raw[pos:nl].rstrip(b"\r"))
            pos = nl + 1
        recipients = b"".join(folded)
    values: list[bytes] = []
    for name in _NAMES:
        found = line(name, pos)
        if found is None:
            break
        values.append(found[0])
        pos = found[1]
    if len(values) < len(_NAMES):
        return values, None, 0 if recipients is not None else pos
    return values, recipients, pos


def header_block_continues(head: bytes) -> bool:
    """Whether ``head``, the first bytes of a dead letter, may end inside our header lines.

    True when it starts with a Recipients field and holds no complete block: a long folded
    field can pass :data:`HEADER_BLOCK_MAX`, and the caller must parse the whole dead letter
    before taking it for a file that is not ours.
    """
    values, _, _ = _our_lines(head)
    return head.startswith(_RECIPIENTS) and len(values) < len(_NAMES)


def strip_dead_letter_headers(raw: bytes) -> bytes:
    """``raw`` without our leading ``X-POP3-Connector-*`` lines (the five, after a
    ``Recipients`` field if there is one): the original again.

    Anything else (fewer lines, another order) is not our block and is left alone.

    The exact inverse of :func:`with_dead_letter_headers` for any bytes, which ``requeue``
    relies on (tested with hypothesis).
    """
    values, _, end = _our_lines(raw)
    return raw[end:] if len(values) == len(_NAMES) else raw


def parse_dead_letter_headers(raw: bytes) -> tuple[DeadLetterInfo, int] | None:
    """Our header values from the start of a dead letter, and the length of our header lines.

    Only the header lines are read, so the first :data:`HEADER_BLOCK_MAX` bytes of a file are
    enough.  Returns ``None`` when the five lines are not all there (not one of ours).
    """
    values, listed, end = _our_lines(raw)
    if len(values) < len(_NAMES):
        return None
    account, uidl, stage, response, failed_at = (v.decode("ascii", "replace") for v in values)
    try:
        when = dt.datetime.strptime(failed_at, _TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    text = listed.decode("ascii", "replace") if listed is not None else ""
    recipients = tuple(r.strip() for r in text.split(",") if r.strip())
    return DeadLetterInfo(account, uidl, stage, response, when, recipients), end


__all__ = [
    "HEADER_BLOCK_MAX",
    "HEADER_PREFIX",
    "DeadLetterArchive",
    "DeadLetterInfo",
    "DeadLetterRecord",
    "DeadLetterStore",
    "dead_letter_head",
    "dead_letter_headers",
    "format_failed_at",
    "header_block_continues",
    "message_eol",
    "parse_dead_letter_headers",
    "strip_dead_letter_headers",
    "with_dead_letter_headers",
]
