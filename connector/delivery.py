"""SMTP delivery to Exchange through aiosmtplib: ``deliver(raw, envelope) -> Delivered``.

Theory of operation
-------------------

One :class:`SmtpDeliverer` serves one account's cycle.  It holds one aiosmtplib connection,
opened lazily by the first :meth:`SmtpDeliverer.deliver` and reused for every message after it
(RFC 5321 §3.3 allows any number of transactions per session; aiosmtplib sends RSET itself
after a refused transaction).  A failure that closed the connection (a timeout, a 421, a drop)
leaves ``is_connected`` false, and the next message reconnects first.

Session setup is done step by step, not by aiosmtplib's ``connect()`` options, so that every
failure is pinned to its stage (CONNECT, TLS, EHLO, AUTH) and so that STARTTLS can never be
skipped silently: with ``tls = "starttls"`` a server that does not offer it is an error.

Every failure leaves this module as a :class:`~connector.errors.DeliveryError` carrying the stage,
the server's code, enhanced code and text, and ``per_message`` (PRODUCT §6: does the refused
thing depend on this message?).  :func:`~connector.errors.classify` decides from those fields;
this module only reports facts.  No aiosmtplib, ``ssl`` or ``OSError`` exception escapes.

The session (connect, EHLO, STARTTLS, AUTH) is aiosmtplib's.  The mail transaction is ours,
on aiosmtplib's connection: MAIL and RCPT go through ``execute_command`` (aiosmtplib's
``mail()``/``rcpt()`` re-parse every address with ``email.utils``; we check addresses once, see
:func:`address_problem`, and cache the answer), and DATA's content is written by us on the same
transport, because aiosmtplib's ``sendmail()`` runs two regex passes over every message (line
endings, dot-stuffing: ~30 ms per MB, the bulk of our CPU in the benchmark).  What we write:

* Bytes pass unchanged (PRODUCT §5).  A message that is CRLF throughout, which is what POP3
  hands us, is only dot-stuffed (RFC 5321 §4.5.2): a ``.`` is written before each line that
  starts with one, found with ``bytes.find``; the message itself is never copied.  Detecting
  that costs three ``bytes.count`` scans.  A message with a bare CR or LF is normalised exactly
  as aiosmtplib does (``normalize_message_line_endings``), so it arrives as it did before.
* The ``Received:`` trace line and the message are separate writes, never concatenated; big
  pieces go out as ``memoryview`` slices of at most 1 MiB with flow control (the transport
  buffers what the socket does not take, so a 25 MiB message costs no second copy), small
  pieces (< 64 KiB) are gathered into one write to save system calls.
* The content ends with CRLF ``.`` CRLF (a CRLF is added first if the message lacks one).
* The fast path: POP3 received the message dot-stuffed exactly as SMTP wants it (RFC 1939 §3,
  RFC 5321 §4.5.2), and its parser already knows whether it is CRLF-clean.  When the fetcher
  passes that form (``deliver(..., wire=...)``, see :func:`prepare_wire`), it is written as it
  is: no CRLF counts and no dot scan over the message, only over our small trace line.
* MAIL carries ``size=`` (RFC 1870, the octets as transmitted, as aiosmtplib computed it),
  ``BODY=8BITMIME`` (RFC 6152) and the DSN parameters (RFC 3461) as before, and ``SMTPUTF8``
  (RFC 6531 §3.4) for a message with a UTF-8 envelope address or raw UTF-8 in its header
  fields, when the server offers it (see ``SmtpDeliverer._smtputf8``).

A refused transaction is reset with RSET, as ``sendmail()`` did.  After a timeout or a drop in
the middle of DATA the connection is closed (the stream is out of step).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, assert_never, cast

import aiosmtplib
from aiosmtplib.protocol import (
    MAX_RESPONSE_LENGTH,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.typing import Default

from connector import headers
from connector.addresses import mailbox_problem, reverse_path
from connector.errors import (
    AUTH_REQUIRED,
    DeliveryError,
    Evidence,
    SmtpStage,
    printable,
    smtp_class,
    split_enhanced_code,
)
from connector.tls import TlsMode, tls_reason_hint

__all__ = [
    "Delivered",
    "Envelope",
    "ProbeResult",
    "Reply",
    "SenderPolicy",
    "SmtpDeliverer",
    "SmtpSettings",
    "address_problem",
    "content_pieces",
    "delivery_error",
    "envelope_sender",
    "needs_smtputf8",
    "prepare_content",
    "prepare_wire",
    "stuffed_pieces",
]

log = logging.getLogger(__name__)


class SenderPolicy(enum.StrEnum):
    """Where the envelope sender (MAIL FROM) comes from (PRODUCT §3 ``envelope_sender``)."""

    RETURN_PATH = "return-path"
    NULL = "null"
    FIXED = "fixed"


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """Everything the deliverer needs; built by the composition root from ``[smtp]``.

    ``ssl_context`` carries the verification policy (CA file, ``verify_certificate``); when it
    is None and TLS is used, a default verifying context is built.  ``timeout`` bounds the
    connect and every wait for a server reply (aiosmtplib's per-reply timeout), but the reply
    to the end of the message (the final dot): that one waits ``data_termination_timeout``,
    10 minutes as RFC 5321 §4.5.3.2.6 recommends, since a server may scan a large message
    before it answers, and a timeout there is what delivers a message twice (a deferral,
    though the server may have taken it).
    """

    host: str
    port: int
    tls: TlsMode
    ssl_context: ssl.SSLContext | None  # required unless tls is NONE
    helo_name: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    dsn: bool = True
    timeout: float = 60.0
    data_termination_timeout: float = 600.0


@dataclass(frozen=True, slots=True)
class Envelope:
    """``sender`` "" is the null sender <>.  ``sender_fixed``: same for every message.

    ``recipients_fixed``: the recipients come from the config (``deliver_to``), the same for
    every message.  A shared mailbox reads them from the message instead (False); then
    ``configured`` names those of them (lower case) that still come from the config (the
    fallback, a routing rule's targets).  A permanent refusal of a configured recipient is our
    setup's fault (PRODUCT §6), whatever the message.
    """

    sender: str
    recipients: tuple[str, ...]
    sender_fixed: bool
    recipients_fixed: bool = True
    configured: frozenset[str] = frozenset()

    def is_configured(self, recipient: str) -> bool:
        """Whether ``recipient`` comes from the config rather than from the message."""
        return self.recipients_fixed or recipient.lower() in self.configured


@dataclass(frozen=True, slots=True)
class Delivered:
    """Accepted: ``response`` like ``250 2.0.0 Ok: queued as X``.  ``refused``: recipients
    refused while others were accepted, recipient -> response line; ``permanent``: those of
    them refused permanently (5xx; a 552 counts as 452, RFC 5321 §4.5.3.1.10)."""

    response: str
    refused: Mapping[str, str] = field(default_factory=dict)
    permanent: frozenset[str] = frozenset()


# --------------------------------------------------------------------------------------------
# Envelope sender and address checks
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # the same few addresses, every message
def address_problem(address: str, *, utf8: bool = False) -> str | None:
    """Why ``address`` can't be sent as an SMTP mailbox as it is, or None when it can.

    The grammar is RFC 5321 §4.1.2 Mailbox, checked by
    :func:`connector.addresses.mailbox_problem` in one pass: a Dot-string or a Quoted-string
    local part (sent quoted, as RFC 5321 §4.1.2 requires), a domain or an address literal, at
    most 64 octets before the ``@`` and 254 in all.  No white space, brackets or control
    characters outside a quoted local part, so nothing can be smuggled onto the command line.
    Only ASCII, unless ``utf8``: RFC 6531 §3.3 lets UTF-8 into the local part and the domain,
    and such an address needs the SMTPUTF8 parameter
    (:func:`connector.addresses.address_needs_smtputf8`).  We write MAIL and RCPT ourselves
    (``_transaction``), so what passes goes out exactly as given; aiosmtplib's
    ``parse_address`` (``email.utils.parseaddr`` and its injection check) would leave every such
    address unchanged too, quoted local parts included.  The empty string (the null sender) is
    not checked here.
    """
    if not utf8 and not address.isascii():
        return "not ASCII"
    return mailbox_problem(address)


def needs_smtputf8(raw: bytes, envelope: Envelope) -> bool:
    """Whether the message is an internationalized one (RFC 6530 §4.2 and RFC 6531 §3.4): an
    envelope address that is not ASCII, or a header field with raw UTF-8 (RFC 6532).

    Only the header block is looked at (:func:`connector.headers.header_block`: up to the first
    empty line, within its cap): one C scan, however big the message.
    """
    if not envelope.sender.isascii() or not all(r.isascii() for r in envelope.recipients):
        return True
    return not headers.header_block(raw).isascii()


def envelope_sender(
    raw: bytes, policy: SenderPolicy, fixed_address: str | None = None
) -> tuple[str, bool]:
    """The envelope sender for ``raw`` and whether it is the same for every message.

    Returns ``(sender, sender_fixed)``; ``sender`` "" is the null sender ``<>``.

    * ``RETURN_PATH``: the message's own ``Return-Path`` (the first one: RFC 5321 §4.4 has the
      final delivery MTA put it on top), read as an RFC 5321 Reverse-path by
      :func:`connector.addresses.reverse_path` (a quoted local part and UTF-8 are addresses
      like any other; the source route is dropped; the least quoting is used).  ``<>``, a
      missing header, and a header we cannot parse or that holds an address we would not
      send (see :func:`address_problem`) all give the null sender "" (an unparseable
      Return-Path is treated as no Return-Path).  ``sender_fixed`` is False.
    * ``NULL``: ``("", True)``, as the SBS connector did.
    * ``FIXED``: ``(fixed_address, True)``; ``fixed_address`` must be given.

    Only the header block is looked at, within the bounds of :mod:`connector.headers`.
    """
    match policy:
        case SenderPolicy.NULL:
            return "", True
        case SenderPolicy.FIXED:
            if fixed_address is None:
                raise ValueError("SenderPolicy.FIXED needs fixed_address")
            return fixed_address, True
        case SenderPolicy.RETURN_PATH:
            return _return_path(raw), False
        case _:
            assert_never(policy)


def _return_path(raw: bytes) -> str:
    field = headers.first(raw, "return-path")
    if field is None or field.cut:
        return ""  # none, or far longer than any path (RFC 5321 §4.5.3.1.3)
    try:
        # RFC 6531 §3.3: a path may hold UTF-8; bytes that are not UTF-8 are no address.
        value = field.value.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    address = reverse_path(value)
    if not address or address_problem(address, utf8=True) is not None:
        return ""
    return address


# --------------------------------------------------------------------------------------------
# Mapping aiosmtplib's exceptions to DeliveryError
# --------------------------------------------------------------------------------------------

_STAGE_OF_VERB: Final[Mapping[bytes, SmtpStage]] = {
    b"EHLO": SmtpStage.EHLO,
    b"HELO": SmtpStage.EHLO,
    b"AUTH": SmtpStage.AUTH,
    b"MAIL": SmtpStage.MAIL,
    b"RCPT": SmtpStage.RCPT,
}


def _one_line(text: str) -> str:
    # aiosmtplib joins multi-line replies with "\n"; keep log lines and headers single-line,
    # and the server's control characters escaped (it chose them: errors.printable).
    return printable(" ".join(part.strip() for part in text.splitlines() if part.strip()))


def _in_chain(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _per_message(stage: SmtpStage, envelope: Envelope | None, recipient: str | None) -> bool:
    """PRODUCT §6: is a refusal at ``stage`` about this message, or about every message?"""
    match stage:
        case SmtpStage.CONNECT | SmtpStage.TLS | SmtpStage.EHLO | SmtpStage.AUTH:
            return False
        case SmtpStage.MAIL:
            return envelope is not None and not envelope.sender_fixed
        case SmtpStage.RCPT:
            if envelope is None or envelope.recipients_fixed:
                return False
            return recipient is None or not envelope.is_configured(recipient)
        case SmtpStage.DATA | SmtpStage.SIZE:
            return True
        case _:
            assert_never(stage)


def _from_reply(
    stage: SmtpStage,
    code: int,
    message: str,
    envelope: Envelope | None,
    recipient: str | None = None,
    refused: Mapping[str, str] | None = None,
) -> DeliveryError:
    enhanced, text = split_enhanced_code(_one_line(message))
    if stage is SmtpStage.MAIL and (code == 552 or enhanced == "5.3.4"):
        # RFC 1870 §6.1: 552 to MAIL FROM (with the SIZE= that aiosmtplib sends) means the
        # message is over the server's limit.  That is about this message, even when the
        # envelope sender is fixed.
        stage = SmtpStage.SIZE
    return DeliveryError(
        stage,
        text,
        smtp_code=code,
        enhanced_code=enhanced,
        per_message=_per_message(stage, envelope, recipient),
        refused=refused,
    )


def _recipient_refusals(exc: BaseException) -> list[aiosmtplib.SMTPRecipientRefused]:
    """The recipients refused in ``exc`` (or in the refusal a failed RSET replaced)."""
    found = _in_chain(exc, aiosmtplib.SMTPRecipientsRefused)
    if isinstance(found, aiosmtplib.SMTPRecipientsRefused):
        return list(found.recipients)
    return []


def _permanent(refusal: aiosmtplib.SMTPRecipientRefused) -> bool:
    enhanced, _ = split_enhanced_code(_one_line(refusal.message))
    return smtp_class(refusal.code, enhanced, SmtpStage.RCPT) == 5


def _pick_recipient_refusal(
    refusals: Sequence[aiosmtplib.SMTPRecipientRefused],
) -> aiosmtplib.SMTPRecipientRefused | None:
    # Every recipient was refused.  If any refusal is temporary the message may yet be
    # delivered to that recipient, so report the temporary one (it defers the message);
    # otherwise the first permanent one.
    for refusal in refusals:
        enhanced, _ = split_enhanced_code(refusal.message)
        if smtp_class(refusal.code, enhanced, SmtpStage.RCPT) != 5:
            return refusal
    return refusals[0] if refusals else None


def delivery_error(
    exc: aiosmtplib.SMTPException | OSError,
    stage: SmtpStage,
    envelope: Envelope | None = None,
) -> DeliveryError:
    """Translate an aiosmtplib, ``ssl`` or socket exception into a :class:`DeliveryError`.

    ``stage`` is the step that was in progress; exceptions that name their own step
    (``SMTPSenderRefused`` is MAIL, ``SMTPDataError`` is DATA, ...) override it.  ``envelope``
    decides ``per_message`` at MAIL and RCPT (PRODUCT §6); without one those count as fixed.
    The text never holds a password or message bytes: it is the server's reply text or a
    short description of the local failure.

    ``sendmail()`` sends RSET after a refusal; if that RSET times out or the link drops, the
    RSET's exception replaces the refusal, which survives as ``__context__``.  The refusal is
    the server's word on this message, so it decides (the connection is reopened anyway).
    """
    context = exc.__context__
    if isinstance(exc, TimeoutError | ConnectionError) and isinstance(
        context, aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused
    ):
        return delivery_error(context, stage, envelope)
    cert = _in_chain(exc, ssl.SSLCertVerificationError)
    if isinstance(cert, ssl.SSLCertVerificationError):
        # verify_message/reason are set by the ssl module, not by a bare constructor.
        reason = getattr(cert, "verify_message", None) or "verification failed"
        return DeliveryError(SmtpStage.TLS, f"certificate not trusted: {reason}", security=True)
    tls_failure = _in_chain(exc, ssl.SSLError)
    if isinstance(tls_failure, ssl.SSLError):
        reason = getattr(tls_failure, "reason", None) or type(tls_failure).__name__
        if stage.is_setup:  # a handshake (implicit TLS or STARTTLS) that failed
            # The implicit handshake happens while connecting (_session's CONNECT stage).
            hint = tls_reason_hint(reason) if stage is SmtpStage.CONNECT else ""
            return DeliveryError(SmtpStage.TLS, f"TLS handshake failed: {reason}{hint}")
        return DeliveryError(stage, f"connection lost (TLS: {reason})")

    match exc:
        case aiosmtplib.SMTPRecipientsRefused(recipients=refusals):
            chosen = _pick_recipient_refusal(refusals)
            if chosen is None:
                return DeliveryError(SmtpStage.RCPT, "all recipients refused")
            return _from_reply(
                SmtpStage.RCPT,
                chosen.code,
                chosen.message,
                envelope,
                chosen.recipient,
                {r.recipient: f"{r.code} {_one_line(r.message)}" for r in refusals},
            )
        case aiosmtplib.SMTPSenderRefused(code=code, message=message):
            return _from_reply(SmtpStage.MAIL, code, message, envelope)
        case aiosmtplib.SMTPRecipientRefused(code=code, message=message, recipient=rcpt):
            return _from_reply(SmtpStage.RCPT, code, message, envelope, rcpt)
        case aiosmtplib.SMTPDataError(code=code, message=message):
            return _from_reply(SmtpStage.DATA, code, message, envelope)
        case aiosmtplib.SMTPAuthenticationError(code=code, message=message):
            return _from_reply(SmtpStage.AUTH, code, message, envelope)
        case aiosmtplib.SMTPHeloError(code=code, message=message):
            return _from_reply(SmtpStage.EHLO, code, message, envelope)
        case aiosmtplib.SMTPConnectResponseError(code=code, message=message):
            return _from_reply(SmtpStage.CONNECT, code, message, envelope)
        case aiosmtplib.SMTPResponseException(code=code, message=message):
            return _from_reply(stage, code, message, envelope)
        case aiosmtplib.SMTPConnectTimeoutError():
            return DeliveryError(SmtpStage.CONNECT, "timed out connecting")
        case aiosmtplib.SMTPConnectError():
            return DeliveryError(SmtpStage.CONNECT, _one_line(str(exc)))
        case EndOfDataTimeout(seconds=seconds):
            return DeliveryError(
                SmtpStage.DATA,
                f"no reply to the end of the message within {seconds:g}s; the server may "
                "have taken it (RFC 5321 §4.5.3.2.6)",
            )
        case TimeoutError():  # SMTPTimeoutError, SMTPReadTimeoutError, the builtin
            if stage is SmtpStage.TLS:
                return DeliveryError(stage, "timed out during the TLS handshake")
            return DeliveryError(stage, "timed out waiting for the server")
        case aiosmtplib.SMTPServerDisconnected() | ConnectionError():
            return DeliveryError(stage, "connection lost")
        case aiosmtplib.SMTPException() | OSError():
            # SMTPNotSupported, "AUTH not supported", and other local refusals; OSError
            # strings carry no secrets (errno text and an address at most).
            return DeliveryError(stage, _one_line(str(exc)) or type(exc).__name__)
        case _:
            assert_never(exc)


# --------------------------------------------------------------------------------------------
# DATA content (RFC 5321 §4.5.2), written without copying the message
# --------------------------------------------------------------------------------------------

_SLICE: Final = 1024 * 1024  # the most of a message handed to the transport in one write
_COALESCE: Final = 64 * 1024  # pieces smaller than this are gathered into one write


def _is_crlf(part: bytes) -> bool:
    """True when every CR and every LF in ``part`` belongs to a CRLF pair (three C scans)."""
    pairs = part.count(b"\r\n")
    return part.count(b"\n") == pairs and part.count(b"\r") == pairs


def prepare_content(parts: Sequence[bytes]) -> tuple[tuple[bytes, ...], int]:
    """The parts of a message ready for :func:`content_pieces`, and its size on the wire.

    Parts that are CRLF throughout come back unchanged (no copy).  Otherwise the parts are
    joined and normalised exactly as aiosmtplib's ``sendmail()`` did (a lone CR or LF becomes
    CRLF): the rare case, so its copies do not matter.  The size is what RFC 1870 asks for in
    ``SIZE=``: the octets as transmitted before dot-stuffing, including the final CRLF, which
    is the number aiosmtplib sent.
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
class _Content:
    """What DATA writes: ``parts`` and the RFC 1870 ``size``; ``stuffed``: the parts are
    already dot-stuffed (from :func:`prepare_wire`), else from :func:`prepare_content`."""

    parts: tuple[bytes, ...]
    size: int
    stuffed: bool

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The content in pieces for ``_write_content``, ending with the final dot line."""
        if self.stuffed:
            return stuffed_pieces(self.parts)
        return content_pieces(self.parts)


def _content(trace: bytes, raw: bytes, wire: bytes | None) -> _Content:
    if wire is not None:
        fast = prepare_wire(trace, raw, wire)
        if fast is not None:
            return _Content(*fast, stuffed=True)
    parts, size = prepare_content((trace, raw))
    return _Content(parts, size, stuffed=False)


def _slices(view: memoryview, start: int, end: int) -> Iterator[memoryview]:
    for i in range(start, end, _SLICE):
        yield view[i : min(i + _SLICE, end)]


def content_pieces(parts: Sequence[bytes]) -> Iterator[bytes | memoryview]:
    """The DATA content of CRLF-clean ``parts`` (see :func:`prepare_content`), in pieces.

    RFC 5321 §4.5.2: a line that starts with ``.`` gets one more; the pieces are slices of
    the parts with a ``b"."`` between them where a line starts with a dot, so nothing is
    copied.  The content ends with CRLF ``.`` CRLF (RFC 5321 §4.1.1.4).
    """
    at_line_start = True
    ends_with_crlf = False  # an empty message still gets its CRLF, as aiosmtplib sends it
    for part in parts:
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
        at_line_start = ends_with_crlf = part.endswith(b"\n")
    yield b".\r\n" if ends_with_crlf else b"\r\n.\r\n"


async def _write_content(
    protocol: SMTPProtocol, pieces: Iterator[bytes | memoryview], stall: float | None
) -> None:
    """Write ``pieces`` with flow control: big ones as they are, small ones gathered."""
    batch: list[bytes | memoryview] = []
    batched = 0

    async def write(data: bytes | memoryview) -> None:
        # Not isinstance(asyncio.WriteTransport): uvloop's transports do not derive from
        # asyncio's classes, though they offer the same methods.
        transport = cast(asyncio.WriteTransport | None, protocol.transport)
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        transport.write(data)
        if transport.get_write_buffer_size():
            # The transport keeps what the socket did not take; wait below its high-water
            # mark (FlowControlMixin, as StreamWriter.drain() does): at most a slice is held.
            async with asyncio.timeout(stall):  # the server stopped reading
                await protocol._drain_helper()

    for piece in pieces:
        if len(piece) >= _COALESCE:
            if batch:
                await write(b"".join(batch))
                batch, batched = [], 0
            await write(piece)
            continue
        batch.append(piece)
        batched += len(piece)
        if batched >= _COALESCE:
            await write(b"".join(batch))
            batch, batched = [], 0
    if batch:
        await write(b"".join(batch))


def _rebind(protocol: SMTPProtocol) -> None:
    """Have the transport take ``protocol``'s methods afresh (uvloop caches them)."""
    transport = protocol.transport
    if transport is not None and not transport.is_closing():
        transport.set_protocol(protocol)


class _Replies:
    """Reads the replies to a pipelined group of commands (RFC 2920) off aiosmtplib's protocol.

    aiosmtplib reads one reply per command it sent, and drops bytes that arrive while no reply
    is awaited or while the last one waits to be picked up (``SMTPProtocol.data_received``), so
    it cannot read a pipelined group.  While this context is active, what the server sends is
    appended to the protocol's own buffer (nothing is dropped) and parsed with the protocol's
    own parser, one reply at a time; EOF and a lost connection wake the reader too.  On exit
    the protocol's methods are restored; its reply waiter was never touched, so the next
    ``execute_command`` works as before.
    """

    def __init__(self, protocol: SMTPProtocol) -> None:
        self._protocol = protocol
        self._wake = asyncio.Event()
        self._closed = False

    def __enter__(self) -> _Replies:
        protocol = self._protocol
        eof_received, connection_lost = protocol.eof_received, protocol.connection_lost

        def on_eof() -> bool:
            self._closed = True
            self._wake.set()
            return eof_received()

        def on_lost(exc: Exception | None) -> None:
            self._closed = True
            self._wake.set()
            connection_lost(exc)

        # Instance attributes shadow the methods.  asyncio's transports look them up on each
        # call; uvloop's keep the bound ``data_received`` they took when the protocol was set,
        # so set it again: both then call ours (and, in __exit__, the protocol's own again).
        vars(protocol).update(
            data_received=self._data, eof_received=on_eof, connection_lost=on_lost
        )
        _rebind(protocol)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name in ("data_received", "eof_received", "connection_lost"):
            vars(self._protocol).pop(name, None)
        _rebind(self._protocol)

    def _data(self, data: bytes) -> None:
        self._protocol._buffer.extend(data)
        self._wake.set()

    async def next(self, reply_timeout: float | None) -> aiosmtplib.SMTPResponse:
        """The next reply in order; raises SMTPServerDisconnected, SMTPReadTimeoutError, or
        SMTPResponseException for a malformed or overlong reply."""
        protocol = self._protocol
        deadline = None
        while True:
            # Usually the reply is in already (pipelined replies come in one segment): no
            # timer is set up for it.
            response = protocol._read_response_from_buffer()
            if response is not None:
                return response
            if len(protocol._buffer) > MAX_RESPONSE_LENGTH:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
            if self._closed or protocol.transport is None:
                raise aiosmtplib.SMTPServerDisconnected("Unexpected EOF received")
            if deadline is None and reply_timeout is not None:
                deadline = asyncio.get_running_loop().time() + reply_timeout
            self._wake.clear()
            try:
                async with asyncio.timeout_at(deadline):  # the whole reply, as aiosmtplib's
                    await self._wake.wait()
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from None


# --------------------------------------------------------------------------------------------
# The connection
# --------------------------------------------------------------------------------------------


class _TracingSMTP(aiosmtplib.SMTP):
    """aiosmtplib.SMTP that remembers the stage in flight and logs a redacted transcript.

    Every command but DATA and STARTTLS goes through ``execute_command``, which makes it the
    one hook for both.  Credentials never reach the log: the arguments of AUTH and every
    line sent after a 334 continuation (RFC 4954 §4) are replaced by ``****``.
    """

    def __init__(
        self, settings: SmtpSettings, context: ssl.SSLContext | None, trace: logging.Logger | None
    ) -> None:
        super().__init__(
            hostname=settings.host,
            port=settings.port,
            local_hostname=settings.helo_name,
            timeout=settings.timeout,
            use_tls=settings.tls is TlsMode.IMPLICIT,
            # Never let aiosmtplib decide about STARTTLS: start_tls=None would skip it when not
            # offered.  We send it ourselves after EHLO, or fail (SmtpDeliverer.connect).
            start_tls=False,
            tls_context=context,
        )
        self.stage = SmtpStage.CONNECT
        self._trace = trace
        self._auth_continues = False

    def say(self, direction: Literal["C", "S", "--"], line: str) -> None:
        """One transcript line, at DEBUG, its control characters escaped (server text)."""
        if self._trace is not None:
            self._trace.debug("%s: %s", direction, printable(line))

    def reply(self, response: aiosmtplib.SMTPResponse) -> None:
        """Log a (possibly multi-line) reply the way it looked on the wire."""
        if self._trace is None:
            return  # no transcript: do not even format it (every message passes here)
        lines = response.message.splitlines() or [""]
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            self.say("S", f"{response.code}{sep}{line}")

    async def execute_command(
        self,
        *args: bytes,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109 (override)
    ) -> aiosmtplib.SMTPResponse:
        verb = args[0].upper() if args else b""
        if verb == b"AUTH":
            mechanism = args[1].decode("ascii", "replace") if len(args) > 1 else ""
            self.say("C", f"AUTH {mechanism} ****" if len(args) > 2 else f"AUTH {mechanism}")
        elif self._auth_continues:
            self.say("C", "****")
        elif self._trace is not None:
            self.say("C", b" ".join(args).decode("ascii", "replace"))
        self.stage = _STAGE_OF_VERB.get(verb, self.stage)
        self._auth_continues = False
        response = await super().execute_command(*args, timeout=timeout)
        self._auth_continues = response.code == 334
        self.reply(response)
        return response

    async def pipeline(
        self, commands: Sequence[tuple[SmtpStage, bytes]], *, reply_timeout: float | None
    ) -> list[aiosmtplib.SMTPResponse]:
        """Send ``commands`` in one write and read their replies in order (RFC 2920 §3.1).

        Each command is ``(stage, line without CRLF)``; the stage is the one in flight while
        its reply is awaited.  A timeout or a drop closes the connection (out of step), as
        ``execute_command`` does; so does a 421 (RFC 5321 §3.8).
        """
        protocol = self.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        if self._trace is not None:
            for _, line in commands:
                self.say("C", line.decode("ascii", "replace"))
        responses: list[aiosmtplib.SMTPResponse] = []
        try:
            with _Replies(protocol) as replies:
                protocol.write(b"".join(line + b"\r\n" for _, line in commands))
                for stage, _ in commands:
                    self.stage = stage
                    response = await replies.next(reply_timeout)
                    self.reply(response)
                    responses.append(response)
        except BaseException:
            self.close()
            raise
        if any(r.code == 421 for r in responses):
            self.close()
        return responses

    async def send_content(
        self, content: _Content, *, reply_timeout: float | None, final_timeout: float | None
    ) -> aiosmtplib.SMTPResponse:
        """After a 354: write the content, read the final reply through aiosmtplib's protocol.

        ``content`` comes from :func:`prepare_content` or :func:`prepare_wire`.  A write that
        stalls for ``reply_timeout`` raises TimeoutError; no reply to the final dot within
        ``final_timeout`` raises :class:`EndOfDataTimeout` (the connection is closed then).
        Raises SMTPDataError unless the reply is 250, aiosmtplib's errors for a drop.
        """
        self.stage = SmtpStage.DATA
        protocol = self.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        if self._trace is not None:
            self.say("C", f"<{sum(map(len, content.parts))} octets>")  # never the body (STYLE §6)
        try:
            # As SMTPProtocol.execute_data_command does: a reply is due from now on, so one
            # that arrives while we still write (a 552, a 421) is kept rather than dropped.
            protocol._response_pending = True
            await _write_content(protocol, content.pieces(), reply_timeout)
            try:
                response = await protocol.read_response(timeout=final_timeout)
            except aiosmtplib.SMTPReadTimeoutError as exc:
                raise EndOfDataTimeout(final_timeout) from exc
        except BaseException:
            # A timeout, a drop or a cancellation with half a message on the wire: the
            # stream is out of step; never reuse it (aiosmtplib's data() does the same).
            self.close()
            raise
        self.reply(response)
        if response.code == 421:  # RFC 5321 §3.8: the server is closing the session
            self.close()
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response


class EndOfDataTimeout(aiosmtplib.SMTPReadTimeoutError):
    """No reply to the end of a message's content (the final dot) within its deadline.

    The server may have taken the message: RFC 5321 §4.5.3.2.6 warns that a timeout here is
    what delivers a message more than once.  It is still a deferral (we cannot know), counted
    apart (``SmtpDeliverer.data_timeouts``, the ``smtp_data_timeouts_total`` metric).
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds if seconds is not None else float("inf")
        super().__init__(f"no reply to the end of data within {self.seconds:g}s")


class _BeforeContentFailed(Exception):
    """Carries what ``before_content`` raised past the SMTP error handling of ``deliver``."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(cause)
        self.cause = cause


# --------------------------------------------------------------------------------------------
# Evidence: does a 5xx at MAIL or RCPT depend on the message? (docs/design.md §6.2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply on one line: ``code`` and the text with its enhanced code."""

    code: int
    text: str

    @property
    def accepted(self) -> bool:
        """250, or 251 to RCPT (RFC 5321 §4.1.1.3: "user not local; will forward")."""
        return self.code in (250, 251)

    def reply_class(self, stage: SmtpStage) -> int | None:
        """The class that decides (2, 4, 5...) as a reply to ``stage``: the enhanced code's
        digit wins (RFC 3463); a 552 to RCPT counts as 452 (RFC 5321 §4.5.3.1.10)."""
        enhanced, _ = split_enhanced_code(self.text)
        return smtp_class(self.code, enhanced, stage)

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What the server answered to an envelope tested without a message (:meth:`probe`).

    ``rcpt`` holds one reply per recipient, in order; it is empty when MAIL was refused.
    """

    mail: Reply
    rcpt: Mapping[str, Reply] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What testing one refusal showed; ``probe`` the probe's reply that refused it too."""

    evidence: Evidence
    probe: Reply | None = None
    probe_sender: str = ""

    @classmethod
    def of(cls, reply: Reply, stage: SmtpStage, probe_sender: str) -> _Verdict:
        """A probe's answer (to ``stage``) as evidence about the refusal it tested."""
        if reply.accepted:
            return cls(Evidence.PROBE_ACCEPTED)
        if reply.reply_class(stage) == 5:
            return cls(Evidence.PROBE_REFUSED, reply, probe_sender)
        return cls(Evidence.PROBE_FAILED)  # 4xx, 421, or nonsense: no verdict

    def applied(self, err: DeliveryError) -> DeliveryError:
        """``err`` with this evidence; when the probe was refused too, its reply instead, at
        the same stage (a probe's 552 to MAIL is not about this message's size)."""
        tested = err
        if self.probe is not None:
            enhanced, text = split_enhanced_code(self.probe.text)
            tested = DeliveryError(
                err.stage,
                f"{text} (probe from <{self.probe_sender}>)",
                smtp_code=self.probe.code,
                enhanced_code=enhanced,
                per_message=err.per_message,
                refused=err.refused,
            )
        tested.evidence = self.evidence
        return tested


class _SessionEvidence:
    """What this SMTP session (one deliverer, one cycle) saw accepted for real messages.

    docs/design.md §6.2: a 5xx at MAIL depends on the message if another sender was accepted at
    MAIL in this session; a 5xx at RCPT of a fixed recipient, if that recipient was accepted
    for another sender.  Probes are not recorded: the circuit breaker (fetcher) must know whether a
    real message got through.  Kept across reconnects: the server and our setup are the same.

    Two distinct senders per entry are enough to always find one that differs from a refused
    sender, so memory stays small whatever the number of messages.  Addresses are compared
    without case (a domain has none; a local part rarely differs only by case, and then the
    evidence is only weaker, never taken from the very sender refused).
    """

    __slots__ = ("_mail", "_rcpt")

    def __init__(self) -> None:
        self._mail: list[str] = []  # senders accepted at MAIL, most recent first
        self._rcpt: dict[str, list[str]] = {}  # recipient (lower case) -> senders

    @staticmethod
    def _note(senders: list[str], sender: str) -> None:
        key = sender.lower()
        for i, known in enumerate(senders):
            if known.lower() == key:
                del senders[i]
                break
        senders.insert(0, sender)
        del senders[2:]

    def mail_accepted(self, sender: str) -> None:
        """A real message's sender was accepted at MAIL."""
        self._note(self._mail, sender)

    def rcpt_accepted(self, recipient: str, sender: str) -> None:
        """A fixed recipient was accepted at RCPT in a real message's transaction from sender."""
        self._note(self._rcpt.setdefault(recipient.lower(), []), sender)

    def other_sender(self, sender: str) -> bool:
        """Whether a sender other than ``sender`` was accepted at MAIL."""
        return any(s.lower() != sender.lower() for s in self._mail)

    def rcpt_other_sender(self, recipient: str, sender: str) -> bool:
        """Whether ``recipient`` was accepted for a sender other than ``sender``."""
        senders = self._rcpt.get(recipient.lower(), ())
        return any(s.lower() != sender.lower() for s in senders)

    def probe_sender(self, refused_sender: str) -> str | None:
        """Another sender to probe with: the null sender, or, when the null sender is the one
        refused, the last other sender accepted at MAIL; None when there is none."""
        if refused_sender:
            return ""
        return next((s for s in self._mail if s), None)


class SmtpDeliverer:
    """One SMTP connection reused across a cycle's messages; connects lazily, reconnects
    after a failure that closed the connection.  Raises only DeliveryError."""

    def __init__(self, settings: SmtpSettings, *, transcript: logging.Logger | None = None) -> None:
        self.settings = settings
        self._transcript = transcript
        self._context: ssl.SSLContext | None = None
        if settings.tls is not TlsMode.NONE:
            # The caller builds the context with its verification policy; a missing one gets
            # the safe default (verify against the system store), never an unverified one.
            self._context = settings.ssl_context or ssl.create_default_context()
        self._smtp: _TracingSMTP | None = None
        self._evidence = _SessionEvidence()
        self.data_timeouts = 0  # messages whose final dot got no reply in time (EndOfDataTimeout)

    async def __aenter__(self) -> SmtpDeliverer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while a set-up session is open (it may still be dropped by the server)."""
        return self._smtp is not None and self._smtp.is_connected

    async def connect(self) -> None:
        """Open and set up the session: greeting, EHLO, STARTTLS and EHLO again, AUTH.

        Does nothing if a session is open.  Raises DeliveryError at the stage that failed
        (CONNECT, TLS, EHLO or AUTH); the half-open connection is closed.
        """
        await self._session()

    async def _session(self) -> _TracingSMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        settings = self.settings
        smtp = _TracingSMTP(settings, self._context, self._transcript)
        try:
            smtp.stage = SmtpStage.CONNECT  # implicit TLS failures are found in the chain
            greeting = await smtp.connect()
            smtp.reply(greeting)
            # With start_tls=False aiosmtplib sends no EHLO on connect; we need the extension
            # list now (STARTTLS, AUTH, SIZE).
            await smtp.ehlo()
            match settings.tls:
                case TlsMode.STARTTLS:
                    smtp.stage = SmtpStage.TLS
                    if not smtp.supports_extension("starttls"):
                        # RFC 3207 §4: never fall back to plaintext when TLS is required.
                        raise DeliveryError(
                            SmtpStage.TLS,
                            "STARTTLS is required but the server does not offer it",
                            security=True,
                        )
                    smtp.say("C", "STARTTLS")
                    smtp.reply(await smtp.starttls(server_hostname=settings.host))
                    # RFC 3207 §4.2: forget what the server said before TLS; ask again.
                    await smtp.ehlo()
                case TlsMode.IMPLICIT | TlsMode.NONE:
                    pass
                case _:
                    assert_never(settings.tls)
            if settings.username is not None:
                smtp.stage = SmtpStage.AUTH
                if not smtp.supports_extension("auth"):
                    # RFC 4954 §3: no AUTH offered (often: only after STARTTLS).  Sending the
                    # mail unauthenticated could be refused or, worse, relayed differently.
                    raise DeliveryError(
                        SmtpStage.AUTH,
                        "a username is configured but the server does not offer AUTH",
                        security=True,
                    )
                await smtp.login(settings.username, settings.password or "")
        except DeliveryError as err:
            smtp.say("--", str(err))
            smtp.close()
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:
            failure = delivery_error(exc, smtp.stage)
            smtp.say("--", str(failure))
            smtp.close()
            raise failure from exc
        except BaseException:
            # Cancellation mid-handshake: drop the socket, never swallow (STYLE §4).
            smtp.close()
            raise
        self._smtp = smtp
        return smtp

    @property
    def max_size(self) -> int | None:
        """The server's SIZE limit in octets (RFC 1870), or None: not connected, no limit."""
        if self._smtp is None or not self._smtp.is_connected:
            return None
        try:
            limit = int(self._smtp.esmtp_extensions.get("size", "").split()[0])
        except (ValueError, IndexError):
            return None
        return limit or None  # RFC 1870 §4: "SIZE 0" means no fixed maximum

    def _check_envelope(self, envelope: Envelope) -> None:
        # A bad address is refused locally with the code the server would give for a syntax
        # error (RFC 3463: X.1.7 bad sender, X.1.3 bad recipient address syntax), so that
        # classify() treats it like the server's refusal.  UTF-8 is checked here like ASCII;
        # whether the server takes it (SMTPUTF8) is known only once connected (_smtputf8).
        if envelope.sender:
            problem = address_problem(envelope.sender, utf8=True)
            if problem is not None:
                raise DeliveryError(
                    SmtpStage.MAIL,
                    f"invalid envelope sender ({problem}); refused locally",
                    smtp_code=553,
                    enhanced_code="5.1.7",
                    per_message=not envelope.sender_fixed,
                    # The message's own Return-Path, refused by us: no server to test.
                    evidence=Evidence.LOCAL,
                )
        if not envelope.recipients:
            raise DeliveryError(
                SmtpStage.RCPT,
                "no recipients; refused locally",
                smtp_code=554,
                enhanced_code="5.1.3",
                per_message=not envelope.recipients_fixed,
            )
        for recipient in envelope.recipients:
            problem = address_problem(recipient, utf8=True)
            if problem is not None:
                raise DeliveryError(
                    SmtpStage.RCPT,
                    f"invalid recipient ({problem}); refused locally",
                    smtp_code=553,
                    enhanced_code="5.1.3",
                    per_message=not envelope.recipients_fixed,
                )

    @staticmethod
    def _smtputf8(smtp: _TracingSMTP, envelope: Envelope) -> bool:
        """For an internationalized message: True when the server offers SMTPUTF8.

        Otherwise an address that is not ASCII cannot be sent at all: it is refused here, as a
        server would refuse it (RFC 6531 §3.7.1, 553 5.6.7), at MAIL for the sender and at
        RCPT for a recipient, so that classify() judges it like a server's refusal (about
        this message, unless the address is the same for every message).  Header fields with
        raw UTF-8 go out without the parameter, as they did before SMTPUTF8 (Exchange takes
        them; RFC 6531 §3.7 would have us bounce or downgrade, and we change no bytes).
        """
        if smtp.supports_extension("smtputf8"):
            return True
        why = "the server does not offer SMTPUTF8 (RFC 6531); refused locally"
        if not envelope.sender.isascii():
            raise DeliveryError(
                SmtpStage.MAIL,
                f"envelope sender is not ASCII and {why}",
                smtp_code=553,
                enhanced_code="5.6.7",
                per_message=not envelope.sender_fixed,
                evidence=Evidence.LOCAL,  # this sender's own form, whatever the server takes
            )
        for recipient in envelope.recipients:
            if not recipient.isascii():
                raise DeliveryError(
                    SmtpStage.RCPT,
                    f"recipient is not ASCII and {why}",
                    smtp_code=553,
                    enhanced_code="5.6.7",
                    per_message=_per_message(SmtpStage.RCPT, envelope, recipient),
                )
        return False

    async def deliver(
        self,
        raw: bytes,
        envelope: Envelope,
        *,
        trace: bytes = b"",
        wire: bytes | None = None,
        before_content: Callable[[], Awaitable[None]] | None = None,
    ) -> Delivered:
        """Hand one message to the server; return once it answered 250 after DATA.

        ``trace`` (a ``Received:`` line, may be empty) is sent in front of ``raw`` without
        joining the two.  The bytes are sent unchanged, dot-stuffed (see the module docstring).
        ``wire``: ``raw`` as POP3 sent it (dot-stuffed, CRLF-clean, ending with CRLF; see
        :func:`prepare_wire`), written instead of stuffing ``raw`` again; None: stuff ``raw``.
        Raises DeliveryError for every failure, including session setup.

        ``before_content`` is awaited after the server's 354, right before the content goes
        out: the last moment at which this message can still not be delivered.  Whatever it
        raises ends the transaction unsent (the connection is closed, so the server cannot
        take half a message) and propagates as it is.

        Partial acceptance: when some recipients are refused and others accepted, the server
        has taken responsibility for the message (RFC 5321 §3.3), so the result is
        ``Delivered`` with ``refused`` filled in.  The message is never sent again, since a
        second transaction would duplicate it for the recipients who already have it.
        """
        self._check_envelope(envelope)
        smtp = await self._session()
        content = _content(trace, raw, wire)
        size = content.size

        limit = self.max_size
        if limit is not None and size > limit:
            # RFC 1870 §6.1: the server would answer 552 to MAIL FROM; say so without
            # sending anything.
            raise DeliveryError(
                SmtpStage.SIZE,
                f"message of {size} octets exceeds the server's SIZE limit of {limit}",
                smtp_code=552,
                enhanced_code="5.3.4",
                per_message=True,
            )

        mail_options: list[bytes] = []
        rcpt_options: list[bytes] = []
        smtputf8 = needs_smtputf8(raw, envelope) and self._smtputf8(smtp, envelope)
        if smtp.supports_extension("size"):
            mail_options.append(b"size=%d" % size)  # RFC 1870 §6
        # One fast C pass per part; dots added by stuffing are ASCII, so either form tells.
        if not all(part.isascii() for part in content.parts) and smtp.supports_extension(
            "8bitmime"
        ):
            mail_options.append(b"BODY=8BITMIME")  # RFC 6152 §3
        if smtputf8:
            mail_options.append(b"SMTPUTF8")  # RFC 6531 §3.4
        if self.settings.dsn and smtp.supports_extension("dsn"):
            # RFC 3461 §4.3 and §4.1: bounce with the full message, and only on failure.
            mail_options.append(b"RET=FULL")
            rcpt_options.append(b"NOTIFY=FAILURE")

        smtp.stage = SmtpStage.MAIL
        try:
            refused, response = await self._transaction(
                smtp, envelope, content, mail_options, rcpt_options, before_content
            )
        except _BeforeContentFailed as failed:
            # Not about SMTP at all (the caller's own failure, even an OSError such as a POP3
            # drop): the transaction is abandoned unsent, and the error goes on as it was.
            smtp.close()
            self._smtp = None
            raise failed.cause from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            if isinstance(exc, EndOfDataTimeout):
                self.data_timeouts += 1
            err = delivery_error(exc, smtp.stage, envelope)
            smtp.say("--", str(err))
            if not smtp.is_connected:
                self._smtp = None  # 421, timeout or drop: reconnect before the next message
            err = await self._tested(err, envelope, _recipient_refusals(exc))
            raise err from exc
        except BaseException:
            # Cancelled inside a transaction: the stream is out of step; drop it (STYLE §4).
            smtp.close()
            self._smtp = None
            raise
        return Delivered(
            response=f"250 {_one_line(response.message)}".rstrip(),
            refused={rcpt: f"{r.code} {_one_line(r.message)}" for rcpt, r in refused.items()},
            permanent=frozenset(
                rcpt
                for rcpt, r in refused.items()
                if smtp_class(r.code, split_enhanced_code(r.message)[0], SmtpStage.RCPT) == 5
            ),
        )

    async def _transaction(
        self,
        smtp: _TracingSMTP,
        envelope: Envelope,
        content: _Content,
        mail_options: Sequence[bytes],
        rcpt_options: Sequence[bytes],
        before_content: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], aiosmtplib.SMTPResponse]:
        """MAIL, RCPT for each recipient, DATA (RFC 5321 §3.3), raising aiosmtplib's exceptions
        as ``sendmail()`` did, and RSET after a refusal as it did.

        With PIPELINING (RFC 2920) MAIL, the RCPTs and DATA go out in one write and their
        replies are read in order; else one command at a time through ``execute_command``.
        Addresses were checked by ``_check_envelope`` (no spaces or controls), so they go out
        as they are: UTF-8 only with SMTPUTF8 (``_smtputf8``, RFC 6531 §3.3).
        """
        timeout = self.settings.timeout
        mail = b" ".join([b"MAIL FROM:<" + envelope.sender.encode() + b">", *mail_options])
        rcpts = [
            b" ".join([b"RCPT TO:<" + recipient.encode() + b">", *rcpt_options])
            for recipient in envelope.recipients
        ]
        refusals: list[aiosmtplib.SMTPRecipientRefused] = []
        try:
            if smtp.supports_extension("pipelining"):
                commands = [(SmtpStage.MAIL, mail), *((SmtpStage.RCPT, r) for r in rcpts)]
                replies = await smtp.pipeline(
                    [*commands, (SmtpStage.DATA, b"DATA")], reply_timeout=timeout
                )
                mail_reply, *rcpt_replies, data_reply = replies
            else:
                mail_reply = await smtp.execute_command(*mail.split(b" "), timeout=timeout)
                rcpt_replies = []
                if mail_reply.code == 250:
                    for line in rcpts:
                        rcpt_replies.append(await smtp.execute_command(*line.split(b" ")))
                data_reply = None
            if mail_reply.code != 250:
                self._abandon_data(smtp, data_reply)
                raise aiosmtplib.SMTPSenderRefused(
                    mail_reply.code, mail_reply.message, envelope.sender
                )
            evidence = self._evidence
            evidence.mail_accepted(envelope.sender)
            for recipient, reply in zip(envelope.recipients, rcpt_replies, strict=True):
                if reply.code in (250, 251):  # RFC 5321 §4.1.1.3
                    if envelope.is_configured(recipient):
                        evidence.rcpt_accepted(recipient, envelope.sender)
                else:
                    refusals.append(
                        aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
                    )
            ours = [
                r
                for r in refusals
                if _permanent(r)
                and envelope.is_configured(r.recipient)
                and not self._shown(envelope, r)
            ]
            if ours or len(refusals) == len(envelope.recipients):
                # A configured recipient refused permanently may be our setup's fault unless
                # this session already showed that it depends on the message (docs/design.md
                # §6.2): stop before the content goes out, so that nobody gets this message
                # now, and let deliver() test it; otherwise every recipient was refused.
                self._abandon_data(smtp, data_reply)
                raise aiosmtplib.SMTPRecipientsRefused(ours or refusals)
            if data_reply is None:
                smtp.stage = SmtpStage.DATA
                data_reply = await smtp.execute_command(b"DATA", timeout=timeout)
            if data_reply.code != 354:  # RFC 5321 §4.1.1.4: DATA itself refused
                raise aiosmtplib.SMTPDataError(data_reply.code, data_reply.message)
            if before_content is not None:
                try:
                    await before_content()
                except Exception as exc:  # noqa: BLE001 - carried out unchanged by deliver()
                    raise _BeforeContentFailed(exc) from None
            response = await smtp.send_content(
                content,
                reply_timeout=timeout,
                final_timeout=self.settings.data_termination_timeout,
            )
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
            # End the refused transaction (RFC 5321 §4.1.1.5).  A failure here is left to
            # delivery_error(), which prefers the refusal (it is this RSET's __context__).
            if smtp.is_connected:
                # A disconnect or an odd reply here changes nothing: reconnect next time.
                with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
                    await smtp.rset()
            raise
        return {r.recipient: aiosmtplib.SMTPResponse(r.code, r.message) for r in refusals}, response

    @staticmethod
    def _abandon_data(smtp: _TracingSMTP, data_reply: aiosmtplib.SMTPResponse | None) -> None:
        """A server answered a pipelined DATA with 354 although MAIL or every RCPT failed.

        RFC 2920 §3.1 suggests sending a lone dot.  We drop the connection instead, which
        aborts the transaction for certain (RFC 5321 §3.8, §4.1.1.4): a server that contradicts
        itself this way might deliver the empty message (aiosmtpd with a MAIL hook that records
        the sender before refusing it does).  The next message reconnects.
        """
        if data_reply is not None and data_reply.code == 354:
            smtp.say("--", "354 after a refused envelope; closing to abort the transaction")
            smtp.close()

    # -- evidence: does a refusal at MAIL or RCPT depend on the message? (docs/design.md §6.2)

    def _shown(self, envelope: Envelope, refusal: aiosmtplib.SMTPRecipientRefused) -> bool:
        """Whether this session already showed that a configured recipient's permanent
        refusal depends on the message: the recipient was accepted for another sender (a
        sender restriction answered at RCPT, Postfix's ``smtpd_delay_reject = yes``)."""
        return (
            not envelope.sender_fixed
            and refusal.code != AUTH_REQUIRED
            and self._evidence.rcpt_other_sender(refusal.recipient, envelope.sender)
        )

    async def probe(self, sender: str, recipients: Sequence[str] = ()) -> ProbeResult:
        """Test an envelope without sending a message: ``MAIL FROM:<sender>``, then (when it is
        accepted) ``RCPT TO`` each recipient, then RSET (RFC 5321 §4.1.1.5).  One command at a
        time, on this deliverer's connection (opened if need be).

        ``sender`` "" is the null sender.  Raises DeliveryError when the session cannot be set
        up or the connection fails; a failure of the closing RSET is not one (the answers are
        in; the connection is dropped and reopened next time).
        """
        for address in (sender, *recipients):
            problem = address_problem(address) if address else None
            if problem is not None:
                raise DeliveryError(SmtpStage.MAIL, f"cannot probe <{address}>: {problem}")
        smtp = await self._session()
        timeout = self.settings.timeout
        try:
            smtp.stage = SmtpStage.MAIL
            answer = await smtp.execute_command(
                b"MAIL", b"FROM:<" + sender.encode("ascii") + b">", timeout=timeout
            )
            mail = Reply(answer.code, _one_line(answer.message))
            rcpt: dict[str, Reply] = {}
            if mail.code == 250:
                for recipient in recipients:
                    answer = await smtp.execute_command(
                        b"RCPT", b"TO:<" + recipient.encode("ascii") + b">", timeout=timeout
                    )
                    rcpt[recipient] = Reply(answer.code, _one_line(answer.message))
        except (aiosmtplib.SMTPException, OSError) as exc:
            err = delivery_error(exc, smtp.stage)
            smtp.say("--", f"probe: {err}")
            if not smtp.is_connected:
                self._smtp = None
            raise err from exc
        except BaseException:
            smtp.close()  # cancelled mid-probe: out of step (STYLE §4)
            self._smtp = None
            raise
        if smtp.is_connected:
            try:
                await smtp.rset()
            except (aiosmtplib.SMTPException, OSError) as exc:
                smtp.say("--", f"probe: RSET failed ({_one_line(str(exc))}); closing")
                smtp.close()
        if not smtp.is_connected:
            self._smtp = None
        return ProbeResult(mail, rcpt)

    async def _tested(
        self,
        err: DeliveryError,
        envelope: Envelope,
        refusals: Sequence[aiosmtplib.SMTPRecipientRefused],
    ) -> DeliveryError:
        """``err`` with the evidence of whether it depends on the message (docs/design.md §6.2).

        Only a 5xx at MAIL of the message's own sender, or at RCPT of a recipient fixed in the
        config, is tested; never a ``530`` (RFC 4954 §6), never with a fixed envelope sender.
        The session's record comes first; failing that, a probe on the same connection (after
        the refused transaction's RSET) with another sender.  Of several fixed recipients
        refused, the one with the weakest evidence is the one reported: one that our setup
        refuses is enough to stop the cycle.  When the probe was refused too, its reply is the
        one reported: it is what the server says to every sender, so it names the setup fault
        (``User unknown`` rather than the message's ``Sender denied``).
        """
        permanent = smtp_class(err.smtp_code, err.enhanced_code, err.stage) == 5
        if not permanent or envelope.sender_fixed or err.smtp_code == AUTH_REQUIRED:
            return err
        if err.stage is SmtpStage.MAIL and err.per_message:
            verdict = await self._sender_evidence(envelope.sender)
            tested = verdict.applied(err)
        elif err.stage is SmtpStage.RCPT and not err.per_message:
            fixed = [r for r in refusals if _permanent(r) and envelope.is_configured(r.recipient)]
            if not fixed:
                return err
            found = await self._recipient_evidence([r.recipient for r in fixed], envelope.sender)
            for r in fixed:
                if r.code == AUTH_REQUIRED:
                    found[r.recipient] = _Verdict(Evidence.NONE)
            weakest = min(fixed, key=lambda r: found[r.recipient].evidence.rank)
            refused = _from_reply(
                SmtpStage.RCPT,
                weakest.code,
                weakest.message,
                envelope,
                weakest.recipient,
                err.refused,
            )
            tested = found[weakest.recipient].applied(refused)
        else:
            return err
        if self._smtp is not None:
            self._smtp.say("--", f"{err}: tested, {tested.evidence}: {tested}")
        return tested

    async def _sender_evidence(self, sender: str) -> _Verdict:
        """Whether a 5xx to ``MAIL FROM:<sender>`` depends on the sender: another sender
        accepted in this session, else a probe with the null sender."""
        if self._evidence.other_sender(sender):
            return _Verdict(Evidence.SESSION)
        probe_sender = self._evidence.probe_sender(sender)
        if probe_sender is None:
            return _Verdict(Evidence.NO_PROBE)
        try:
            result = await self.probe(probe_sender)
        except DeliveryError:
            return _Verdict(Evidence.PROBE_FAILED)
        return _Verdict.of(result.mail, SmtpStage.MAIL, probe_sender)

    async def _recipient_evidence(
        self, recipients: Sequence[str], sender: str
    ) -> dict[str, _Verdict]:
        """For each fixed recipient refused at RCPT in a transaction from ``sender``: shown by
        the session, or by one probe ``MAIL FROM:<other>`` + ``RCPT TO`` each + RSET."""
        found = {
            r: _Verdict(Evidence.SESSION)
            for r in recipients
            if self._evidence.rcpt_other_sender(r, sender)
        }
        untested = [r for r in recipients if r not in found]
        if not untested:
            return found
        probe_sender = self._evidence.probe_sender(sender)
        if probe_sender is None:
            return found | dict.fromkeys(untested, _Verdict(Evidence.NO_PROBE))
        try:
            result = await self.probe(probe_sender, untested)
        except DeliveryError:
            return found | dict.fromkeys(untested, _Verdict(Evidence.PROBE_FAILED))
        if not result.mail.accepted:
            # The probe's sender is refused at MAIL: the recipient was never asked.  A 5xx
            # counts as refused (nothing shows that the refusal depends on the message: our
            # setup), anything else as no verdict.
            return found | dict.fromkeys(
                untested, _Verdict.of(result.mail, SmtpStage.MAIL, probe_sender)
            )
        return found | {
            r: _Verdict.of(result.rcpt[r], SmtpStage.RCPT, probe_sender) for r in untested
        }

    async def close(self) -> None:
        """Send QUIT if connected and close the connection; errors here are ignored."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await smtp.quit()
        except (aiosmtplib.SMTPException, OSError) as exc:
            # The session is over either way; nothing is pending (RFC 5321 §4.1.1.10).
            log.debug("ignored error at SMTP QUIT: %s", exc)
        finally:
            smtp.close()
