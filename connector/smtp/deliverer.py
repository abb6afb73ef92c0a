"""The deliverer: ``deliver(raw, envelope) -> Delivered`` over one SMTP session per cycle.

Theory of operation
-------------------

One :class:`SmtpDeliverer` serves one account's cycle.  It holds one connection
(:class:`~connector.smtp.connection.TracingSMTP`), opened lazily by the first
:meth:`SmtpDeliverer.deliver` and reused for every message after it (RFC 5321 §3.3 allows any
number of transactions per session).  A failure that closed the connection (a timeout, a 421,
a drop) leaves ``is_connected`` false, and the next message reconnects first.

Session setup is done step by step, not by aiosmtplib's ``connect()`` options, so that every
failure is pinned to its stage (CONNECT, TLS, EHLO, AUTH) and so that STARTTLS can never be
skipped silently: with ``tls = "starttls"`` a server that does not offer it is an error.

The mail transaction is ours, on aiosmtplib's connection: MAIL and RCPT go out as we write them
(aiosmtplib's ``mail()``/``rcpt()`` re-parse every address with ``email.utils``; we check
addresses once, :func:`~connector.smtp.envelope.check_envelope`), pipelined when the server
offers PIPELINING (RFC 2920), and DATA's content is written by the connection from the pieces of
:mod:`connector.smtp.content`.  MAIL carries ``SIZE=`` (RFC 1870, the octets as transmitted),
``BODY=8BITMIME`` (RFC 6152), the DSN parameters (RFC 3461), and ``SMTPUTF8`` (RFC 6531 §3.4)
for a message with a UTF-8 envelope address or raw UTF-8 in its header fields, when the server
offers it.

A refused transaction is reset with RSET, as ``sendmail()`` does.  After a timeout or a drop in
the middle of DATA the connection is closed (the stream is out of step).  A 5xx at MAIL or at
RCPT of a fixed recipient is tested before it is reported (:mod:`connector.smtp.evidence`).
Every failure leaves as a :class:`~connector.errors.DeliveryError`
(:func:`~connector.smtp.failures.delivery_error`).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import assert_never

import aiosmtplib

from connector.errors import DeliveryError, SmtpStage
from connector.smtp.connection import TracingSMTP
from connector.smtp.content import Content, StreamedContent, content_of, streamed_content
from connector.smtp.envelope import (
    Envelope,
    address_problem,
    check_envelope,
    needs_smtputf8,
    refuse_non_ascii,
)
from connector.smtp.evidence import ProbeResult, Reply, SessionEvidence, with_evidence
from connector.smtp.failures import (
    EndOfDataTimeout,
    delivery_error,
    one_line,
    recipient_refusals,
    refused_permanently,
)
from connector.spool import Spooled, head_of
from connector.tls import TlsMode

__all__ = ["Delivered", "SmtpDeliverer", "SmtpSettings"]

log = logging.getLogger(__name__)


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
    # Not compared: a reload builds a new context; what it was built from is compared instead
    # (verify_certificate, ca_file), so that settings compare by value (docs/design.md §4.3).
    ssl_context: ssl.SSLContext | None = field(compare=False)  # required unless tls is NONE
    helo_name: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    dsn: bool = True
    timeout: float = 60.0
    data_termination_timeout: float = 600.0
    verify_certificate: bool = True
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    """Accepted: ``response`` like ``250 2.0.0 Ok: queued as X``.  ``refused``: recipients
    refused while others were accepted, recipient -> response line; ``permanent``: those of
    them refused permanently (5xx; a 552 counts as 452, RFC 5321 §4.5.3.1.10)."""

    response: str
    refused: Mapping[str, str] = field(default_factory=dict)
    permanent: frozenset[str] = frozenset()


class _BeforeContentFailed(Exception):
    """Carries what ``before_content`` raised past the SMTP error handling of ``deliver``."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(cause)
        self.cause = cause


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
        self._smtp: TracingSMTP | None = None
        self._evidence = SessionEvidence()
        self.data_timeouts = 0  # messages whose final dot got no reply in time (EndOfDataTimeout)

    async def __aenter__(self) -> SmtpDeliverer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open and set up the session: greeting, EHLO, STARTTLS and EHLO again, AUTH.

        Does nothing if a session is open.  Raises DeliveryError at the stage that failed
        (CONNECT, TLS, EHLO or AUTH); the half-open connection is closed.
        """
        await self._session()

    async def _session(self) -> TracingSMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        settings = self.settings
        smtp = TracingSMTP(
            host=settings.host,
            port=settings.port,
            helo_name=settings.helo_name,
            timeout=settings.timeout,
            implicit_tls=settings.tls is TlsMode.IMPLICIT,
            context=self._context,
            trace=self._transcript,
        )
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
            # Cancellation mid-handshake: drop the socket, never swallow (docs/design.md §10.3).
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

    async def deliver(
        self,
        raw: bytes | Spooled,
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
        A spooled ``raw`` (docs/design.md §5.3) is read from its file in chunks as it goes
        out; its header block (SMTPUTF8) and what its writer recorded (size, 8-bit octets,
        line ends) stand in for scans of the whole.
        Raises DeliveryError for every failure, including session setup, and StateError when
        a spool file cannot be read (the transaction is then abandoned unsent).

        ``before_content`` is awaited after the server's 354, right before the content goes
        out: the last moment at which this message can still not be delivered.  Whatever it
        raises ends the transaction unsent (the connection is closed, so the server cannot
        take half a message) and propagates as it is.

        Partial acceptance: when some recipients are refused and others accepted, the server
        has taken responsibility for the message (RFC 5321 §3.3), so the result is
        ``Delivered`` with ``refused`` filled in.  The message is never sent again, since a
        second transaction would duplicate it for the recipients who already have it.
        """
        check_envelope(envelope)
        smtp = await self._session()
        content: Content | StreamedContent
        if isinstance(raw, bytes):
            content = content_of(trace, raw, wire)
        else:
            content = streamed_content(
                trace, raw.chunks, size=raw.size, ascii=raw.ascii, lone=raw.lone, last=raw.last
            )
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

        mail_options, rcpt_options = self._parameters(smtp, head_of(raw), envelope, content)
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
            err = await self._tested(err, envelope, recipient_refusals(exc))
            raise err from exc
        except BaseException:
            # Cancelled inside a transaction: the stream is out of step; drop it
            # (docs/design.md §10.3).
            smtp.close()
            self._smtp = None
            raise
        return Delivered(
            response=f"250 {one_line(response.message)}".rstrip(),
            refused={rcpt: f"{r.code} {one_line(r.message)}" for rcpt, r in refused.items()},
            permanent=frozenset(
                rcpt for rcpt, r in refused.items() if refused_permanently(r.code, r.message)
            ),
        )

    def _parameters(
        self,
        smtp: TracingSMTP,
        raw: bytes,
        envelope: Envelope,
        content: Content | StreamedContent,
    ) -> tuple[list[bytes], list[bytes]]:
        """MAIL's and RCPT's parameters for this message, as far as the server offers them.

        Raises DeliveryError for an address that is not ASCII when the server does not offer
        SMTPUTF8 (:func:`~connector.smtp.envelope.refuse_non_ascii`).
        """
        mail_options: list[bytes] = []
        rcpt_options: list[bytes] = []
        smtputf8 = needs_smtputf8(raw, envelope)
        if smtputf8 and not smtp.supports_extension("smtputf8"):
            refuse_non_ascii(envelope)  # raises for an address; raw UTF-8 headers go as they are
            smtputf8 = False
        if smtp.supports_extension("size"):
            mail_options.append(b"size=%d" % content.size)  # RFC 1870 §6
        if not content.ascii and smtp.supports_extension("8bitmime"):
            mail_options.append(b"BODY=8BITMIME")  # RFC 6152 §3
        if smtputf8:
            mail_options.append(b"SMTPUTF8")  # RFC 6531 §3.4
        if self.settings.dsn and smtp.supports_extension("dsn"):
            # RFC 3461 §4.3 and §4.1: bounce with the full message, and only on failure.
            mail_options.append(b"RET=FULL")
            rcpt_options.append(b"NOTIFY=FAILURE")
        return mail_options, rcpt_options

    async def _transaction(
        self,
        smtp: TracingSMTP,
        envelope: Envelope,
        content: Content | StreamedContent,
        mail_options: Sequence[bytes],
        rcpt_options: Sequence[bytes],
        before_content: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], aiosmtplib.SMTPResponse]:
        """MAIL, RCPT for each recipient, DATA (RFC 5321 §3.3), raising aiosmtplib's exceptions
        as ``sendmail()`` does, and RSET after a refusal as it does.

        MAIL, the RCPTs and DATA go out pipelined where the server allows (:meth:`_envelope`).
        Addresses were checked by ``check_envelope`` (no spaces or controls), so they go out
        as they are: UTF-8 only with SMTPUTF8 (``refuse_non_ascii``, RFC 6531 §3.3).
        """
        timeout = self.settings.timeout
        mail = b" ".join([b"MAIL FROM:<" + envelope.sender.encode() + b">", *mail_options])
        rcpts = [
            b" ".join([b"RCPT TO:<" + recipient.encode() + b">", *rcpt_options])
            for recipient in envelope.recipients
        ]
        refusals: list[aiosmtplib.SMTPRecipientRefused] = []
        try:
            mail_reply, rcpt_replies, data_reply = await self._envelope(smtp, mail, rcpts)
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
                if refused_permanently(r.code, r.message)
                and envelope.is_configured(r.recipient)
                and not self._evidence.shown(envelope, r)
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

    async def _envelope(
        self, smtp: TracingSMTP, mail: bytes, rcpts: Sequence[bytes]
    ) -> tuple[
        aiosmtplib.SMTPResponse, list[aiosmtplib.SMTPResponse], aiosmtplib.SMTPResponse | None
    ]:
        """Send MAIL and the RCPTs; return their replies, and DATA's when it went with them.

        With PIPELINING (RFC 2920) MAIL, the RCPTs and DATA go out in one write and their
        replies are read in order.  Else one command at a time, no RCPT after a refused MAIL
        (no RCPT reply then) and DATA not yet (None).
        """
        timeout = self.settings.timeout
        if smtp.supports_extension("pipelining"):
            commands = [(SmtpStage.MAIL, mail), *((SmtpStage.RCPT, r) for r in rcpts)]
            replies = await smtp.pipeline(
                [*commands, (SmtpStage.DATA, b"DATA")], reply_timeout=timeout
            )
            mail_reply, *rcpt_replies, data_reply = replies
            return mail_reply, rcpt_replies, data_reply
        mail_reply = await smtp.execute_command(*mail.split(b" "), timeout=timeout)
        rcpt_replies = []
        if mail_reply.code == 250:
            for line in rcpts:
                rcpt_replies.append(await smtp.execute_command(*line.split(b" ")))
        return mail_reply, rcpt_replies, None

    @staticmethod
    def _abandon_data(smtp: TracingSMTP, data_reply: aiosmtplib.SMTPResponse | None) -> None:
        """A server answered a pipelined DATA with 354 although MAIL or every RCPT failed.

        RFC 2920 §3.1 suggests sending a lone dot.  We drop the connection instead, which
        aborts the transaction for certain (RFC 5321 §3.8, §4.1.1.4): a server that contradicts
        itself this way might deliver the empty message (aiosmtpd with a MAIL hook that records
        the sender before refusing it does).  The next message reconnects.
        """
        if data_reply is not None and data_reply.code == 354:
            smtp.say("--", "354 after a refused envelope; closing to abort the transaction")
            smtp.close()

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
            mail = Reply(answer.code, one_line(answer.message))
            rcpt: dict[str, Reply] = {}
            if mail.code == 250:
                for recipient in recipients:
                    answer = await smtp.execute_command(
                        b"RCPT", b"TO:<" + recipient.encode("ascii") + b">", timeout=timeout
                    )
                    rcpt[recipient] = Reply(answer.code, one_line(answer.message))
        except (aiosmtplib.SMTPException, OSError) as exc:
            err = delivery_error(exc, smtp.stage)
            smtp.say("--", f"probe: {err}")
            if not smtp.is_connected:
                self._smtp = None
            raise err from exc
        except BaseException:
            smtp.close()  # cancelled mid-probe: out of step (docs/design.md §10.3)
            self._smtp = None
            raise
        if smtp.is_connected:
            try:
                await smtp.rset()
            except (aiosmtplib.SMTPException, OSError) as exc:
                smtp.say("--", f"probe: RSET failed ({one_line(str(exc))}); closing")
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
        """``err`` with the evidence of whether it depends on the message (docs/design.md §6.2;
        :func:`~connector.smtp.evidence.with_evidence`), probing on this connection."""
        tested = await with_evidence(err, envelope, refusals, self._evidence, self.probe)
        if tested is None:
            return err
        if self._smtp is not None:
            self._smtp.say("--", f"{err}: tested, {tested.evidence}: {tested}")
        return tested

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
