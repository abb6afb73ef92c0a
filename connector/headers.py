"""A message's header fields, read from its raw bytes within fixed bounds: pure, no I/O.

Every caller that looks into a message's header (the envelope sender, a shared mailbox's
recipients and Message-ID, the duplicate key, the identity digest of docs/design.md §5.1
step 6) goes through here, so the bounds are in one place:

* The header block ends at the first empty line (RFC 5322 §2.1; a bare LF tolerated), looked
  for only in the first :data:`MAX_HEADER_BLOCK` octets: a message without one (or with a
  bigger header) is read as far as that, never scanned to its end.
* A field is its first line ``name:`` (RFC 5322 §2.2: printable ASCII but the colon) and the
  lines after it that start with white space (§2.2.3, unfolded by joining them with one
  space).  Lines that are not fields (no colon) are skipped, as mail readers do.
* A field's value is cut at :data:`MAX_VALUE` octets, and :attr:`Field.cut` says so: whoever
  parses a value parses at most that much, and knows when it did not see all of it.
* At most :data:`MAX_LINES` lines and :data:`MAX_FIELDS` fields are read: a header block of
  tens of thousands of tiny fields costs no more than a real one.

Values stay bytes (:attr:`Field.value`); :attr:`Field.text` decodes them as ASCII with surrogate
escapes, so 8-bit bytes never raise.  Every loop here moves forward through the block once; the
one regular expression (the empty line) has no repetition to backtrack into.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_FIELDS",
    "MAX_HEADER_BLOCK",
    "MAX_LINES",
    "MAX_VALUE",
    "Field",
    "Header",
    "bounds",
    "fields",
    "first",
    "header_block",
    "header_digest",
    "read",
]

MAX_HEADER_BLOCK: Final = 256 * 1024
"""The most octets of a message read as its header block (a hostile 1 MiB header line, or a
message with no empty line, costs no more than this)."""
MAX_VALUE: Final = 16 * 1024
"""The most octets of one (unfolded) field value handed to a parser; a To of some 400
addresses.  What is longer is cut, and marked so."""
MAX_LINES: Final = 20_000
"""The most lines of a header block read (real ones have tens, a long Received chain some
hundreds); fields after them are not seen."""
MAX_FIELDS: Final = 1_000
"""The most fields of a header block read; fields after them are not seen."""

# The empty line that ends the header block: an LF, maybe a CR, an LF.  Found with one forward
# search; the optional CR cannot make it try a position twice.
_BLANK: Final = re.compile(rb"\n\r?\n")
# RFC 5322 §2.2 field-name: printable ASCII except the colon.
_NAME_OCTETS: Final = bytes(range(0x21, 0x3A)) + bytes(range(0x3B, 0x7F))


@dataclass(frozen=True, slots=True)
class Field:
    """One header field: ``name`` lower-cased, ``value`` unfolded (bytes, stripped), ``cut``
    when the value was longer than :data:`MAX_VALUE` and is only its beginning."""

    name: str
    value: bytes
    cut: bool = False

    @property
    def text(self) -> str:
        """The value as text: ASCII, other bytes as surrogate escapes (never raises)."""
        return self.value.decode("ascii", "surrogateescape")


def bounds(raw: bytes) -> tuple[int, int] | None:
    """(end of the header block, start of the body), or None when no empty line ends the
    header block within the first :data:`MAX_HEADER_BLOCK` octets.

    The header block excludes the line end of its last line; the body starts after the empty
    line.  A message that starts with an empty line has an empty header block.
    """
    if raw.startswith(b"\n"):
        return 0, 1
    if raw.startswith(b"\r\n"):
        return 0, 2
    m = _BLANK.search(raw, 0, MAX_HEADER_BLOCK)
    if m is None:
        return None
    end = m.start()
    if end > 0 and raw[end - 1] == 0x0D:
        end -= 1
    return end, m.end()


def header_block(raw: bytes) -> bytes:
    """The header block of ``raw`` (see :func:`bounds`): without an empty line within the
    cap, the first :data:`MAX_HEADER_BLOCK` octets (all of a shorter message)."""
    found = bounds(raw)
    return raw[: found[0] if found is not None else MAX_HEADER_BLOCK]


def _field(name: bytes, parts: list[bytes], dropped: bool) -> Field:
    value = b" ".join(part.strip() for part in parts)
    cut = dropped or len(value) > MAX_VALUE
    return Field(name.decode("ascii").lower(), value[:MAX_VALUE], cut)


def fields(raw: bytes) -> Iterator[Field]:
    """Every field of the header block of ``raw``, in order (see the module docstring)."""
    return iter(_Walk(raw))


@dataclass(frozen=True, slots=True)
class Header:
    """The fields of a header block, and whether all of it was read: ``complete`` is False
    when a cap stopped the reading (no end within :data:`MAX_HEADER_BLOCK`, too many lines or
    fields).  A value cut short says so itself (:attr:`Field.cut`)."""

    fields: tuple[Field, ...]
    complete: bool


def read(raw: bytes) -> Header:
    """All of :func:`fields` at once, with whether the header block was read whole."""
    walk = _Walk(raw)
    found = tuple(walk)
    return Header(found, walk.complete)


class _Walk:
    """One pass over a header block, field by field; ``complete`` once the pass is over."""

    def __init__(self, raw: bytes) -> None:
        self.block = header_block(raw)
        self.complete = bounds(raw) is not None or len(raw) <= MAX_HEADER_BLOCK

    def __iter__(self) -> Iterator[Field]:
        block = self.block
        name: bytes | None = None
        parts: list[bytes] = []
        size = count = 0
        dropped = False  # a part of the current field's value was not kept (over MAX_VALUE)
        start, n = 0, len(block)
        for _ in range(MAX_LINES):
            if start >= n:
                break
            nl = block.find(b"\n", start)
            end = n if nl < 0 else nl
            line = block[start:end]
            start = end + 1
            if line[:1] in (b" ", b"\t"):
                if name is not None:
                    if size <= MAX_VALUE:
                        parts.append(line)
                        size += len(line) + 1
                    else:
                        dropped = True
                continue
            if name is not None:
                yield _field(name, parts, dropped)
                count += 1
                if count >= MAX_FIELDS:
                    self.complete = False
                    return
            colon = line.find(b":")
            head = line[:colon].rstrip(b" \t") if colon > 0 else b""
            if head and not head.translate(None, _NAME_OCTETS):
                name, parts = head, [line[colon + 1 : colon + 1 + MAX_VALUE]]
                size = len(parts[0])
                dropped = len(line) > colon + 1 + MAX_VALUE
            else:
                name, parts = None, []
        else:
            self.complete = start >= n
        if name is not None:
            yield _field(name, parts, dropped)


def first(raw: bytes, name: str) -> Field | None:
    """The first field called ``name`` (any case), or None."""
    wanted = name.lower()
    for field in fields(raw):
        if field.name == wanted:
            return field
    return None


def header_digest(raw: bytes) -> str:
    """A digest of the header block of ``raw`` (:func:`header_block`), the same for a message
    read with RETR and its header read with ``TOP n 0`` (RFC 1939 §7): the identity check of
    docs/design.md §5.1 step 6 compares the two."""
    return hashlib.sha256(header_block(raw)).hexdigest()[:32]
