"""What went wrong, as facts: aiosmtplib's, ``ssl``'s and the socket's exceptions as
:class:`~connector.errors.DeliveryError`.

Every failure leaves the smtp package as a ``DeliveryError`` carrying the stage, the server's
code, enhanced code and text, and ``per_message`` (docs/design.md §6.1: does the refused thing
depend on this message?).  :func:`~connector.errors.classify` decides from those fields; this
module only reports facts, and :mod:`connector.smtp.evidence` adds what testing showed.  No
aiosmtplib, ``ssl`` or ``OSError`` exception escapes the package: :func:`delivery_error` is the
one translation, and reply texts become one printable line here (:func:`one_line`).

The connection and the deliverer raise aiosmtplib's own exceptions inside a transaction (as
``sendmail()`` does), so this mapping reads them; :class:`EndOfDataTimeout` is ours, for the
one wait whose timeout means "the server may have the message".
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import assert_never

import aiosmtplib

from connector.errors import (
    DeliveryError,
    SmtpStage,
    printable,
    smtp_class,
    split_enhanced_code,
)
from connector.smtp.envelope import Envelope, per_message
from connector.tls import tls_reason_hint

__all__ = [
    "EndOfDataTimeout",
    "delivery_error",
    "from_reply",
    "one_line",
    "recipient_refusals",
    "refused_permanently",
]


class EndOfDataTimeout(aiosmtplib.SMTPReadTimeoutError):
    """No reply to the end of a message's content (the final dot) within its deadline.

    The server may have taken the message: RFC 5321 §4.5.3.2.6 warns that a timeout here is
    what delivers a message more than once.  It is still a deferral (we cannot know), counted
    apart (``SmtpDeliverer.data_timeouts``, the ``smtp_data_timeouts_total`` metric).
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds if seconds is not None else float("inf")
        super().__init__(f"no reply to the end of data within {self.seconds:g}s")


def one_line(text: str) -> str:
    """A reply text as one printable line.

    aiosmtplib joins the lines of a multi-line reply with line breaks; log lines and header
    fields stay single-line, and the server's control characters are escaped (it chose them:
    errors.printable).
    """
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


def from_reply(
    stage: SmtpStage,
    code: int,
    message: str,
    envelope: Envelope | None,
    recipient: str | None = None,
    refused: Mapping[str, str] | None = None,
) -> DeliveryError:
    """The server's reply ``code`` ``message`` to ``stage`` as a DeliveryError; ``envelope``
    and ``recipient`` decide ``per_message``, ``refused`` names every recipient refused."""
    enhanced, text = split_enhanced_code(one_line(message))
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
        per_message=per_message(stage, envelope, recipient),
        refused=refused,
    )


def recipient_refusals(exc: BaseException) -> list[aiosmtplib.SMTPRecipientRefused]:
    """The recipients refused in ``exc`` (or in the refusal a failed RSET replaced)."""
    found = _in_chain(exc, aiosmtplib.SMTPRecipientsRefused)
    if isinstance(found, aiosmtplib.SMTPRecipientsRefused):
        return list(found.recipients)
    return []


def refused_permanently(code: int, message: str) -> bool:
    """Whether the reply ``code`` ``message`` to RCPT refuses that recipient permanently.

    The one test for every RCPT refusal (which one to report, which to test, which recipients
    get a dead-letter copy): the reply class of the DeliveryError :func:`from_reply` makes of
    it is 5, so the answer agrees with :func:`~connector.errors.classify`.  The enhanced code,
    read off the reply's one-line form, wins over the basic code (RFC 3463 §3.1); a 552 counts
    as 452 (RFC 5321 §4.5.3.1.10).
    """
    enhanced, _ = split_enhanced_code(one_line(message))
    return smtp_class(code, enhanced, SmtpStage.RCPT) == 5


def _pick_recipient_refusal(
    refusals: Sequence[aiosmtplib.SMTPRecipientRefused],
) -> aiosmtplib.SMTPRecipientRefused | None:
    # Every recipient was refused.  If any refusal is temporary the message may yet be
    # delivered to that recipient, so report the temporary one (it defers the message);
    # otherwise the first permanent one.
    for refusal in refusals:
        if not refused_permanently(refusal.code, refusal.message):
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
    decides ``per_message`` at MAIL and RCPT (docs/design.md §6.1); without one those count as
    fixed.  The text never holds a password or message bytes: it is the server's reply text or
    a short description of the local failure.

    A refused transaction is ended with RSET (as ``sendmail()`` does); if that RSET times out
    or the link drops, the RSET's exception replaces the refusal, which survives as
    ``__context__``.  The refusal is the server's word on this message, so it decides (the
    connection is reopened anyway).
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
            return from_reply(
                SmtpStage.RCPT,
                chosen.code,
                chosen.message,
                envelope,
                chosen.recipient,
                {r.recipient: f"{r.code} {one_line(r.message)}" for r in refusals},
            )
        case aiosmtplib.SMTPSenderRefused(code=code, message=message):
            return from_reply(SmtpStage.MAIL, code, message, envelope)
        case aiosmtplib.SMTPRecipientRefused(code=code, message=message, recipient=rcpt):
            return from_reply(SmtpStage.RCPT, code, message, envelope, rcpt)
        case aiosmtplib.SMTPDataError(code=code, message=message):
            return from_reply(SmtpStage.DATA, code, message, envelope)
        case aiosmtplib.SMTPAuthenticationError(code=code, message=message):
            return from_reply(SmtpStage.AUTH, code, message, envelope)
        case aiosmtplib.SMTPHeloError(code=code, message=message):
            return from_reply(SmtpStage.EHLO, code, message, envelope)
        case aiosmtplib.SMTPConnectResponseError(code=code, message=message):
            return from_reply(SmtpStage.CONNECT, code, message, envelope)
        case aiosmtplib.SMTPResponseException(code=code, message=message):
            return from_reply(stage, code, message, envelope)
        case aiosmtplib.SMTPConnectTimeoutError():
            return DeliveryError(SmtpStage.CONNECT, "timed out connecting")
        case aiosmtplib.SMTPConnectError():
            return DeliveryError(SmtpStage.CONNECT, one_line(str(exc)))
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
            return DeliveryError(stage, one_line(str(exc)) or type(exc).__name__)
        case _:
            assert_never(exc)
