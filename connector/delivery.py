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

Messages are relayed with ``sendmail()`` and raw bytes, never ``send_message()``: the latter
re-serialises the message (it drops Bcc and refolds headers), and PRODUCT §5 says bytes pass
unchanged.  aiosmtplib normalises line endings and dot-stuffs (RFC 5321 §4.5.2) itself.
"""

from __future__ import annotations

import enum
import logging
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, assert_never

import aiosmtplib
from aiosmtplib.email import parse_address
from aiosmtplib.typing import Default

from connector.errors import DeliveryError, SmtpStage, smtp_class, split_enhanced_code
from connector.pop3.client import TlsMode

__all__ = [
    "Delivered",
    "Envelope",
    "SenderPolicy",
    "SmtpDeliverer",
    "SmtpSettings",
    "address_problem",
    "delivery_error",
    "envelope_sender",
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
    connect and every wait for a server reply (aiosmtplib's per-reply timeout).
    """

    host: str
    port: int
    tls: TlsMode
    ssl_context: ssl.SSLContext | None  # required unless tls is NONE
    helo_name: str
    username: str | None = None
    password: str | None = None
    dsn: bool = True
    timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Envelope:
    """``sender`` "" is the null sender <>.  ``sender_fixed``: same for every message."""

    sender: str
    recipients: tuple[str, ...]
    sender_fixed: bool
    recipients_fixed: bool = True


@dataclass(frozen=True, slots=True)
class Delivered:
    """Accepted: ``response`` like ``250 2.0.0 Ok: queued as X``.  ``refused``: recipients
    refused while others were accepted, recipient -> response line."""

    response: str
    refused: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Envelope sender and address checks
# --------------------------------------------------------------------------------------------

# The end of the header block: the first empty line (RFC 5322 §2.1).  Bare LF is tolerated.
_HEADER_END: Final = re.compile(rb"\r?\n\r?\n")
# The first Return-Path field with its folded continuation lines (RFC 5322 §2.2.3).
_RETURN_PATH: Final = re.compile(rb"^return-path[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)", re.I | re.M)
# RFC 5321 §4.1.2 Reverse-path: "<" [ A-d-l ":" ] Mailbox ">", or "<>".  The source route
# (A-d-l) is obsolete and MUST be ignored (RFC 5321 §4.1.1.3 / Appendix C).  A trailing
# comment, as some MTAs write, is tolerated.
_PATH: Final = re.compile(r"^<\s*(?:@[^:<>]*:)?([^<>]*?)\s*>\s*(?:\([^()]*\))?$")

# RFC 5322 §3.2.3 atext plus ".", for a dot-atom local part; quoted local parts are refused
# (rare, and aiosmtplib would re-quote them).
_LOCAL: Final = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
# RFC 5321 §4.1.2 Domain or address-literal.
_DOMAIN: Final = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[A-Za-z0-9.:-]+\])$")


def address_problem(address: str) -> str | None:
    """Why ``address`` can't be sent as an SMTP mailbox as-is, or None when it can.

    We check ourselves because aiosmtplib passes addresses through ``email.utils.parseaddr``
    and silently rewrites some bad ones (``"bad\\r\\nRCPT TO:<x@y>"`` went out as ``x@y``).
    Only ASCII is accepted: we never request SMTPUTF8 (RFC 6531).  The empty string (the null
    sender) is not checked here.
    """
    if not address.isascii():
        return "not ASCII"
    if len(address) > 254:  # RFC 5321 §4.5.3.1.3: a path is at most 256 octets with "<>"
        return "too long"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "not of the form local@domain"
    if len(local) > 64:  # RFC 5321 §4.5.3.1.1
        return "local part too long"
    if not _LOCAL.match(local) or not _DOMAIN.match(domain):
        return "invalid characters"
    try:
        unchanged = parse_address(address) == address
    except ValueError:
        unchanged = False
    if not unchanged:
        return "would be rewritten by the SMTP client"
    return None


def envelope_sender(
    raw: bytes, policy: SenderPolicy, fixed_address: str | None = None
) -> tuple[str, bool]:
    """The envelope sender for ``raw`` and whether it is the same for every message.

    Returns ``(sender, sender_fixed)``; ``sender`` "" is the null sender ``<>``.

    * ``RETURN_PATH``: the message's own ``Return-Path`` (the first one: RFC 5321 §4.4 has the
      final delivery MTA put it on top).  ``<>``, a missing header, and a header we cannot
      parse or that holds an address we would not send (see :func:`address_problem`) all give
      the null sender "" (an unparseable Return-Path is treated as no Return-Path).
      ``sender_fixed`` is False.
    * ``NULL``: ``("", True)``, as the SBS connector did.
    * ``FIXED``: ``(fixed_address, True)``; ``fixed_address`` must be given.

    Only the header block (up to the first empty line) is looked at, on bytes, without
    parsing the message.
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
    if raw.startswith((b"\r\n", b"\n")):
        return ""  # an empty header block
    end = _HEADER_END.search(raw)
    headers = raw if end is None else raw[: end.start()]
    m = _RETURN_PATH.search(headers)
    if m is None:
        return ""
    value_bytes = re.sub(rb"\r?\n", b"", m.group(1)).strip()
    if not value_bytes.isascii():
        return ""
    value = value_bytes.decode("ascii")
    p = _PATH.match(value)
    address = p.group(1) if p else value  # some MTAs omit the angle brackets
    if not address or address_problem(address) is not None:
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
    # aiosmtplib joins multi-line replies with "\n"; keep log lines and headers single-line.
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _in_chain(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _per_message(stage: SmtpStage, envelope: Envelope | None) -> bool:
    """PRODUCT §6: is a refusal at ``stage`` about this message, or about every message?"""
    match stage:
        case SmtpStage.CONNECT | SmtpStage.TLS | SmtpStage.EHLO | SmtpStage.AUTH:
            return False
        case SmtpStage.MAIL:
            return envelope is not None and not envelope.sender_fixed
        case SmtpStage.RCPT:
            return envelope is not None and not envelope.recipients_fixed
        case SmtpStage.DATA | SmtpStage.SIZE:
            return True
        case _:
            assert_never(stage)


def _from_reply(
    stage: SmtpStage, code: int, message: str, envelope: Envelope | None
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
        per_message=_per_message(stage, envelope),
    )


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
            return DeliveryError(SmtpStage.TLS, f"TLS handshake failed: {reason}")
        return DeliveryError(stage, f"connection lost (TLS: {reason})")

    match exc:
        case aiosmtplib.SMTPRecipientsRefused(recipients=refusals):
            chosen = _pick_recipient_refusal(refusals)
            if chosen is None:
                return DeliveryError(SmtpStage.RCPT, "all recipients refused")
            return _from_reply(SmtpStage.RCPT, chosen.code, chosen.message, envelope)
        case aiosmtplib.SMTPSenderRefused(code=code, message=message):
            return _from_reply(SmtpStage.MAIL, code, message, envelope)
        case aiosmtplib.SMTPRecipientRefused(code=code, message=message):
            return _from_reply(SmtpStage.RCPT, code, message, envelope)
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
        """One transcript line, at DEBUG."""
        if self._trace is not None:
            self._trace.debug("%s: %s", direction, line)

    def reply(self, response: aiosmtplib.SMTPResponse) -> None:
        """Log a (possibly multi-line) reply the way it looked on the wire."""
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
        else:
            self.say("C", b" ".join(args).decode("ascii", "replace"))
        self.stage = _STAGE_OF_VERB.get(verb, self.stage)
        self._auth_continues = False
        response = await super().execute_command(*args, timeout=timeout)
        self._auth_continues = response.code == 334
        self.reply(response)
        return response

    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109 (override)
    ) -> aiosmtplib.SMTPResponse:
        self.stage = SmtpStage.DATA
        self.say("C", "DATA")
        self.say("C", f"<{len(message)} octets>")  # never the body (STYLE §6)
        try:
            response = await super().data(message, timeout=timeout)
        except aiosmtplib.SMTPResponseException as exc:
            self.reply(aiosmtplib.SMTPResponse(exc.code, exc.message))
            raise
        self.reply(response)
        return response


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
        # classify() treats it like the server's refusal.
        if envelope.sender:
            problem = address_problem(envelope.sender)
            if problem is not None:
                raise DeliveryError(
                    SmtpStage.MAIL,
                    f"invalid envelope sender ({problem}); refused locally",
                    smtp_code=553,
                    enhanced_code="5.1.7",
                    per_message=not envelope.sender_fixed,
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
            problem = address_problem(recipient)
            if problem is not None:
                raise DeliveryError(
                    SmtpStage.RCPT,
                    f"invalid recipient ({problem}); refused locally",
                    smtp_code=553,
                    enhanced_code="5.1.3",
                    per_message=not envelope.recipients_fixed,
                )

    async def deliver(self, raw: bytes, envelope: Envelope) -> Delivered:
        """Hand one message to the server; return once it answered 250 after DATA.

        ``raw`` is sent byte for byte (aiosmtplib only normalises line endings and
        dot-stuffs).  Raises DeliveryError for every failure, including session setup.

        Partial acceptance: when some recipients are refused and others accepted, the server
        has taken responsibility for the message (RFC 5321 §3.3), so the result is
        ``Delivered`` with ``refused`` filled in.  The message is never sent again, since a
        second transaction would duplicate it for the recipients who already have it.
        """
        self._check_envelope(envelope)
        smtp = await self._session()

        limit = self.max_size
        if limit is not None and len(raw) > limit:
            # RFC 1870 §6.1: the server would answer 552 to MAIL FROM; say so without
            # sending anything.  (aiosmtplib adds SIZE= to MAIL itself.)
            raise DeliveryError(
                SmtpStage.SIZE,
                f"message of {len(raw)} octets exceeds the server's SIZE limit of {limit}",
                smtp_code=552,
                enhanced_code="5.3.4",
                per_message=True,
            )

        mail_options: list[str] = []
        rcpt_options: list[str] = []
        if not raw.isascii() and smtp.supports_extension("8bitmime"):
            mail_options.append("BODY=8BITMIME")  # RFC 6152 §3
        if self.settings.dsn and smtp.supports_extension("dsn"):
            # RFC 3461 §4.3 and §4.1: bounce with the full message, and only on failure.
            mail_options.append("RET=FULL")
            rcpt_options.append("NOTIFY=FAILURE")

        smtp.stage = SmtpStage.MAIL
        try:
            refused, message = await smtp.sendmail(
                envelope.sender,
                list(envelope.recipients),
                raw,
                mail_options=mail_options,
                rcpt_options=rcpt_options,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            err = delivery_error(exc, smtp.stage, envelope)
            smtp.say("--", str(err))
            if not smtp.is_connected:
                self._smtp = None  # 421, timeout or drop: reconnect before the next message
            raise err from exc
        except BaseException:
            # Cancelled inside a transaction: the stream is out of step; drop it (STYLE §4).
            smtp.close()
            self._smtp = None
            raise
        return Delivered(
            response=f"250 {_one_line(message)}".rstrip(),
            refused={rcpt: f"{r.code} {_one_line(r.message)}" for rcpt, r in refused.items()},
        )

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
