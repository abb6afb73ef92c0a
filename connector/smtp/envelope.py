"""The envelope of one message: who it is from, who it is for, and what of it we can send.

Pure functions and values, no I/O and no aiosmtplib: the cycle builds an :class:`Envelope`
per message (:func:`envelope_sender` reads the sender the ``envelope_sender`` policy asks for),
and the deliverer checks it here before a byte goes out.

An address goes on the wire exactly as given (we write MAIL and RCPT ourselves), so every
address is checked once against RFC 5321 §4.1.2 (:func:`address_problem`, on top of the
scanners of :mod:`connector.addresses`).  One we would not send is refused locally, with the
code a server gives for a syntax error, so that :func:`connector.errors.classify` judges it like
a server's refusal (:func:`check_envelope`, :func:`refuse_non_ascii`).

Which parts of an envelope are fixed by the config (the same for every message) and which are
the message's own decides whether a refusal can be about this message
(:func:`per_message`, docs/design.md §6.1).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import assert_never

from connector import headers
from connector.addresses import mailbox_problem, reverse_path
from connector.errors import DeliveryError, Evidence, SmtpStage

__all__ = [
    "Envelope",
    "SenderPolicy",
    "address_problem",
    "check_envelope",
    "envelope_sender",
    "needs_smtputf8",
    "per_message",
    "refuse_non_ascii",
]


class SenderPolicy(enum.StrEnum):
    """Where the envelope sender (MAIL FROM) comes from (the ``envelope_sender`` key,
    docs/design.md §4.1)."""

    RETURN_PATH = "return-path"
    NULL = "null"
    FIXED = "fixed"


@dataclass(frozen=True, slots=True)
class Envelope:
    """``sender`` "" is the null sender <>.  ``sender_fixed``: same for every message.

    ``recipients_fixed``: the recipients come from the config (``deliver_to``), the same for
    every message.  A shared mailbox reads them from the message instead (False); then
    ``configured`` names those of them (lower case) that still come from the config (the
    fallback, a routing rule's targets).  A permanent refusal of a configured recipient is our
    setup's fault unless testing shows that it depends on the message (docs/design.md §6.1,
    §6.2).
    """

    sender: str
    recipients: tuple[str, ...]
    sender_fixed: bool
    recipients_fixed: bool = True
    configured: frozenset[str] = frozenset()

    def is_configured(self, recipient: str) -> bool:
        """Whether ``recipient`` comes from the config rather than from the message."""
        return self.recipients_fixed or recipient.lower() in self.configured


def per_message(stage: SmtpStage, envelope: Envelope | None, recipient: str | None) -> bool:
    """Is the thing refused at ``stage`` this message's own, or the same for every message?
    (docs/design.md §6.1).  Without an envelope, MAIL and RCPT count as fixed."""
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


# --------------------------------------------------------------------------------------------
# Address checks
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
    (``SmtpDeliverer._transaction``), so what passes goes out exactly as given; aiosmtplib's
    ``parse_address`` (``email.utils.parseaddr`` and its injection check) would leave every such
    address unchanged too, quoted local parts included.  The empty string (the null sender) is
    not checked here.
    """
    if not utf8 and not address.isascii():
        return "not ASCII"
    return mailbox_problem(address)


def check_envelope(envelope: Envelope) -> None:
    """Raise the :class:`DeliveryError` a server would give when an address of ``envelope``
    cannot be sent as it is, or when there is no recipient.

    The codes are those of a syntax error (RFC 3463: X.1.7 bad sender, X.1.3 bad recipient
    address syntax), so that classify() treats the refusal like the server's.  UTF-8 is checked
    here like ASCII; whether the server takes it (SMTPUTF8) is known only once connected
    (:func:`refuse_non_ascii`).
    """
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


def needs_smtputf8(raw: bytes, envelope: Envelope) -> bool:
    """Whether the message is an internationalized one (RFC 6530 §4.2 and RFC 6531 §3.4): an
    envelope address that is not ASCII, or a header field with raw UTF-8 (RFC 6532).

    Only the header block is looked at (:func:`connector.headers.header_block`: up to the first
    empty line, within its cap): one C scan, however big the message.
    """
    if not envelope.sender.isascii() or not all(r.isascii() for r in envelope.recipients):
        return True
    return not headers.header_block(raw).isascii()


def refuse_non_ascii(envelope: Envelope) -> None:
    """For an internationalized message to a server that does not offer SMTPUTF8: raise for
    an address that is not ASCII, which cannot be sent at all.

    It is refused here as a server would refuse it (RFC 6531 §3.7.1, 553 5.6.7), at MAIL for
    the sender and at RCPT for a recipient, so that classify() judges it like a server's
    refusal (about this message, unless the address is the same for every message).  Header
    fields with raw UTF-8 go out without the parameter (Exchange takes them; RFC 6531 §3.7
    would have us bounce or downgrade, and we change no bytes): for those this returns and the
    message is sent.
    """
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
                per_message=per_message(SmtpStage.RCPT, envelope, recipient),
            )


# --------------------------------------------------------------------------------------------
# The envelope sender
# --------------------------------------------------------------------------------------------


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
