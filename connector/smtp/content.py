"""DATA's content (RFC 5321 §4.5.2): the message as SMTP wants it, without copying it.

Why ours: aiosmtplib's ``sendmail()`` runs two regular-expression passes over every message
(line endings, dot-stuffing), the largest CPU cost of a delivery (bench/README.md).  Here the
content is cut into pieces that the connection writes (:mod:`connector.smtp.connection`):

* Bytes pass unchanged (docs/design.md §5.2, invariant 4).  A message that is CRLF throughout,
  which is what POP3 hands us, is only dot-stuffed (RFC 5321 §4.5.2): a ``.`` is written before
  each line that starts with one, found with ``bytes.find``; the message itself is never
  copied.  Detecting that costs three ``bytes.count`` scans.  A message with a bare CR or LF is
  normalised exactly as aiosmtplib does (``normalize_message_line_endings``), so it arrives as
  ``sendmail()`` would send it.
* The ``Received:`` trace line and the message are separate pieces, never concatenated; big
  pieces go out as ``memoryview`` slices of at most 1 MiB (the transport buffers what the
  socket does not take, so a 25 MiB message costs no second copy), small pieces (< 64 KiB) are
  gathered into one write to save system calls (:func:`write_coalesced`).
* The content ends with CRLF ``.`` CRLF (a CRLF is added first if the message lacks one).
* The fast path: POP3 received the message dot-stuffed exactly as SMTP wants it (RFC 1939 §3,
  RFC 5321 §4.5.2), and its parser already knows whether it is CRLF-clean.  When the cycle
  passes that form (``deliver(..., wire=...)``, see :func:`prepare_wire`), it is written as it
  is: no CRLF counts and no dot scan over the message, only over our small trace line.

* A message in a spool file (docs/design.md §5.3) is read in chunks and stuffed (and, if it
  has a lone CR or LF, normalised) chunk by chunk, carrying from one chunk to the next only
  whether a line starts there and a final CR (:class:`StreamedContent`): the same octets on
  the wire as the pieces above would give, at the cost of a chunk in memory.

The size for MAIL's ``SIZE=`` (RFC 1870) is counted here too: the octets as transmitted before
dot-stuffing, as aiosmtplib counts them.
"""

from __future__ import annotations

import re
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from typing import Final

from aiosmtplib.protocol import normalize_message_line_endings

__all__ = [
    "Content",
    "StreamedContent",
    "content_of",
    "content_pieces",
    "prepare_content",
    "prepare_wire",
    "streamed_content",
    "stuffed_pieces",
    "write_coalesced",
    "write_coalesced_async",
]

SLICE: Final = 1024 * 1024  # the most of a message handed to the transport in one write
# What aiosmtplib's normalize_message_line_endings replaces (a CRLF, or a lone LF or CR), by
# CRLF; without its final CRLF, which a chunk in the middle of a message must not get.
_LINE_END: Final = re.compile(rb"\r\n|\n|\r(?!\n)")
COALESCE: Final = 64 * 1024  # pieces smaller than this are gathered into one write


def _is_crlf(part: bytes) -> bool:
    """True when every CR and every LF in ``part`` belongs to a CRLF pair (three C scans)."""
    pairs = part.count(b"\r\n")
    return part.count(b"\n") == pairs and part.count(b"\r") == pairs


def prepare_content(parts: Sequence[bytes]) -> tuple[tuple[bytes, ...], int]:
    """The parts of a message ready for :func:`content_pieces`, and its size on the wire.

    Parts that are CRLF throughout come back unchanged (no copy).  Otherwise the parts are
    joined and normalised exactly as aiosmtplib's ``sendmail()`` does (a lone CR or LF becomes
    CRLF): the rare case, so its copies do not matter.  The size is what RFC 1870 asks for in
    ``SIZE=``: the octets as transmitted before dot-stuffing, including the final CRLF, which
    is the number aiosmtplib sends.
    """
    if not all(map(_is_crlf, parts)):
        parts = (normalize_message_line_endings(b"".join(parts)),)
    parts = tuple(part for part in parts if part)
    size = sum(map(len, parts))
    if not parts or not parts[-1].endswith(b"\r\n"):
        size += 2  # the CRLF that content_pieces() adds before the final dot
    return parts, size


def _stuff_small(part: bytes) -> bytes:
    """RFC 5321 §4.5.2 dot-stuffing of a small CRLF-clean part (our trace line): one copy."""
    stuffed = part.replace(b"\n.", b"\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def prepare_wire(trace: bytes, raw: bytes, wire: bytes) -> tuple[tuple[bytes, ...], int] | None:
    """DATA content from the form POP3 received, or None when the fast path does not apply.

    ``wire`` must be ``raw`` dot-stuffed, CRLF-clean and ending with CRLF, as POP3 sent it
    (``protocol.Message.wire``); it is not scanned again.  ``trace`` is ours and small: it is
    checked and stuffed here, and must be empty or CRLF-clean and end with CRLF, else None
    (the caller takes :func:`prepare_content`).  Returns the parts for
    :func:`stuffed_pieces` and the RFC 1870 size: the octets before dot-stuffing, which is
    ``len(trace) + len(raw)`` since both end with CRLF, as :func:`prepare_content` counts.
    """
    if not wire.endswith(b"\r\n"):
        return None
    if trace and not (trace.endswith(b"\r\n") and _is_crlf(trace)):
        return None
    parts = (_stuff_small(trace), wire) if trace else (wire,)
    return parts, len(trace) + len(raw)


def stuffed_pieces(parts: Sequence[bytes]) -> Iterator[bytes | memoryview]:
    """The DATA content of already dot-stuffed ``parts`` (see :func:`prepare_wire`).

    The parts go out as they are, big ones as slices; then the final ``.`` CRLF
    (RFC 5321 §4.1.1.4: the last part ends with CRLF already).
    """
    for part in parts:
        yield from _slices(memoryview(part), 0, len(part))
    yield b".\r\n"


@dataclass(frozen=True, slots=True)
class Content:
    """What DATA writes: ``parts`` and the RFC 1870 ``size``; ``stuffed``: the parts are
    already dot-stuffed (from :func:`prepare_wire`), else from :func:`prepare_content`."""

    parts: tuple[bytes, ...]
    size: int
    stuffed: bool

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The content in pieces for the writer, ending with the final dot line."""
        if self.stuffed:
            return stuffed_pieces(self.parts)
        return content_pieces(self.parts)

    @property
    def ascii(self) -> bool:
        """Every octet is 7-bit (else ``BODY=8BITMIME``); dots added by stuffing are ASCII,
        so either form tells.  One fast C pass per part."""
        return all(part.isascii() for part in self.parts)


@dataclass(frozen=True, slots=True)
class StreamedContent:
    """DATA's content of a message read in chunks (a spool file, docs/design.md §5.3), after
    ``trace``: built by :func:`streamed_content`.  ``chunks()`` gives the message's octets in
    order; ``size`` is the RFC 1870 size; ``ascii``: every octet is 7-bit; ``crlf``: every CR
    and LF is in a CRLF pair (else each lone one is normalised to CRLF, as aiosmtplib does)."""

    trace: bytes
    chunks: Callable[[], AsyncIterator[bytes]]
    size: int
    ascii: bool
    crlf: bool

    async def pieces(self) -> AsyncIterator[bytes | memoryview]:
        """The content in pieces for the writer, ending with the final dot line: the same
        octets :func:`content_pieces` would give for the whole message (a property test holds
        them equal)."""
        at_line_start = True
        ends_with_crlf = False
        if self.trace:
            for piece in _stuffed(self.trace, at_line_start):
                yield piece
            at_line_start = ends_with_crlf = self.trace.endswith(b"\n")
        carry = b""  # a final CR held back: it may pair with the next chunk's LF
        async for chunk in self.chunks():
            if not self.crlf:
                chunk = carry + chunk
                carry = b"\r" if chunk.endswith(b"\r") else b""
                chunk = _LINE_END.sub(b"\r\n", chunk[: len(chunk) - len(carry)])
            if not chunk:
                continue
            for piece in _stuffed(chunk, at_line_start):
                yield piece
            at_line_start = ends_with_crlf = chunk.endswith(b"\n")
        if carry:  # the message ends with a lone CR: CRLF, as normalising the whole would
            yield b"\r\n"
            ends_with_crlf = True
        yield b".\r\n" if ends_with_crlf else b"\r\n.\r\n"


def streamed_content(
    trace: bytes,
    chunks: Callable[[], AsyncIterator[bytes]],
    *,
    size: int,
    ascii: bool,
    lone: int,
    last: bytes,
) -> StreamedContent:
    """The content of ``trace`` (ours: CRLF-clean, ending with CRLF, or empty) then a message
    of ``size`` octets read by ``chunks()``, with ``lone`` CR or LF octets outside a CRLF pair
    and ``last`` its last octet (``connector.spool.Spooled`` records them).  The RFC 1870 size
    is counted as :func:`prepare_content` counts it: each lone line end becomes two octets, and
    a message that does not end with a line end gets the CRLF before the final dot."""
    # Normalised, a final CR or LF becomes a final CRLF.
    ends = last in (b"\r", b"\n") if size else trace.endswith(b"\r\n")
    octets = len(trace) + size + lone + (0 if ends else 2)
    return StreamedContent(trace, chunks, octets, ascii and trace.isascii(), lone == 0)


def content_of(trace: bytes, raw: bytes, wire: bytes | None) -> Content:
    """The content of ``trace`` then ``raw``: from ``wire`` (POP3's dot-stuffed form) when
    :func:`prepare_wire` takes it, else stuffed as the pieces go out."""
    if wire is not None:
        fast = prepare_wire(trace, raw, wire)
        if fast is not None:
            return Content(*fast, stuffed=True)
    parts, size = prepare_content((trace, raw))
    return Content(parts, size, stuffed=False)


def _slices(view: memoryview, start: int, end: int) -> Iterator[memoryview]:
    for i in range(start, end, SLICE):
        yield view[i : min(i + SLICE, end)]


def content_pieces(parts: Sequence[bytes]) -> Iterator[bytes | memoryview]:
    """The DATA content of CRLF-clean ``parts`` (see :func:`prepare_content`), in pieces.

    RFC 5321 §4.5.2: a line that starts with ``.`` gets one more; the pieces are slices of
    the parts with a ``b"."`` between them where a line starts with a dot, so nothing is
    copied.  The content ends with CRLF ``.`` CRLF (RFC 5321 §4.1.1.4).
    """
    at_line_start = True
    ends_with_crlf = False  # an empty message still gets its CRLF, as aiosmtplib sends it
    for part in parts:
        yield from _stuffed(part, at_line_start)
        at_line_start = ends_with_crlf = part.endswith(b"\n")
    yield b".\r\n" if ends_with_crlf else b"\r\n.\r\n"


def _stuffed(part: bytes, at_line_start: bool) -> Iterator[bytes | memoryview]:
    """``part`` dot-stuffed (RFC 5321 §4.5.2) as slices with a ``b"."`` between them where a
    line starts with a dot; ``at_line_start``: the octet before ``part`` ended a line."""
    view = memoryview(part)
    if at_line_start and part.startswith(b"."):
        yield b"."
    start = 0
    i = part.find(b"\n.")
    while i >= 0:
        yield from _slices(view, start, i + 1)
        yield b"."
        start = i + 1
        i = part.find(b"\n.", start)
    yield from _slices(view, start, len(part))


async def write_coalesced(
    pieces: Iterable[bytes | memoryview], write: Callable[[bytes | memoryview], Awaitable[None]]
) -> None:
    """Hand ``pieces`` to ``write``: big ones as they are, small ones gathered into one."""
    batch: list[bytes | memoryview] = []
    batched = 0
    for piece in pieces:
        if len(piece) >= COALESCE:
            if batch:
                await write(b"".join(batch))
                batch, batched = [], 0
            await write(piece)
            continue
        batch.append(piece)
        batched += len(piece)
        if batched >= COALESCE:
            await write(b"".join(batch))
            batch, batched = [], 0
    if batch:
        await write(b"".join(batch))


async def write_coalesced_async(
    pieces: AsyncIterable[bytes | memoryview],
    write: Callable[[bytes | memoryview], Awaitable[None]],
) -> None:
    """:func:`write_coalesced` for pieces from an async iterator (:class:`StreamedContent`)."""
    batch: list[bytes | memoryview] = []
    batched = 0
    async for piece in pieces:
        if len(piece) >= COALESCE:
            if batch:
                await write(b"".join(batch))
                batch, batched = [], 0
            await write(piece)
            continue
        batch.append(piece)
        batched += len(piece)
        if batched >= COALESCE:
            await write(b"".join(batch))
            batch, batched = [], 0
    if batch:
        await write(b"".join(batch))
