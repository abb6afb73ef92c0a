"""Does a 5xx at MAIL or RCPT depend on the message?  Found out by testing (docs/design.md §6.2).

A refusal at MAIL of the message's own sender, or at RCPT of a recipient fixed in the config,
may be about this message (a sender restriction; Postfix's ``smtpd_delay_reject = yes`` answers
one at RCPT) or about our setup (relay not granted, a wrong ``deliver_to``), and the reply text
does not say which in any reliable way.  So:

* :class:`SessionEvidence` records what the session saw accepted for real messages: a sender
  at MAIL, a fixed recipient at RCPT for a given sender.  Another sender accepted, or the same
  recipient accepted for another sender, shows that the refusal depends on the message.
* Failing that, a probe on the same connection (``MAIL FROM:<>``, or another sender when the
  null sender is the one refused; ``RCPT TO`` each refused recipient; RSET) asks the server
  what it says to someone else (:func:`with_evidence`, with the deliverer's ``probe``).
* The answer goes into the error as :class:`~connector.errors.Evidence`; ``classify`` decides.

Nothing here does I/O itself: the probe is a callable the deliverer passes in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import aiosmtplib

from connector.errors import (
    AUTH_REQUIRED,
    DeliveryError,
    Evidence,
    SmtpStage,
    smtp_class,
    split_enhanced_code,
)
from connector.smtp.envelope import Envelope
from connector.smtp.failures import from_reply, refused_permanently

__all__ = ["Probe", "ProbeResult", "Reply", "SessionEvidence", "Verdict", "with_evidence"]


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
    """What the server answered to an envelope tested without a message
    (:meth:`~connector.smtp.deliverer.SmtpDeliverer.probe`).

    ``rcpt`` holds one reply per recipient, in order; it is empty when MAIL was refused.
    """

    mail: Reply
    rcpt: Mapping[str, Reply] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What testing one refusal showed; ``probe`` the probe's reply that refused it too."""

    evidence: Evidence
    probe: Reply | None = None
    probe_sender: str = ""

    @classmethod
    def of(cls, reply: Reply, stage: SmtpStage, probe_sender: str) -> Verdict:
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


class SessionEvidence:
    """What this SMTP session (one deliverer, one cycle) saw accepted for real messages.

    docs/design.md §6.2: a 5xx at MAIL depends on the message if another sender was accepted at
    MAIL in this session; a 5xx at RCPT of a fixed recipient, if that recipient was accepted
    for another sender.  Probes are not recorded: the circuit breaker (cycle.refusal) must know
    whether a real message got through.  Kept across reconnects: the server and our setup are
    the same.

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

    def shown(self, envelope: Envelope, refusal: aiosmtplib.SMTPRecipientRefused) -> bool:
        """Whether this session already showed that a configured recipient's permanent
        refusal depends on the message: the recipient was accepted for another sender (a
        sender restriction answered at RCPT, Postfix's ``smtpd_delay_reject = yes``)."""
        return (
            not envelope.sender_fixed
            and refusal.code != AUTH_REQUIRED
            and self.rcpt_other_sender(refusal.recipient, envelope.sender)
        )


Probe = Callable[[str, Sequence[str]], Awaitable[ProbeResult]]
"""``probe(sender, recipients)``: MAIL, RCPT each, RSET on the session's connection, without a
message (``SmtpDeliverer.probe``); raises DeliveryError when it cannot be made."""


async def with_evidence(
    err: DeliveryError,
    envelope: Envelope,
    refusals: Sequence[aiosmtplib.SMTPRecipientRefused],
    session: SessionEvidence,
    probe: Probe,
) -> DeliveryError | None:
    """``err`` with the evidence of whether it depends on the message, or None when there is
    nothing to test.

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
        return None
    if err.stage is SmtpStage.MAIL and err.per_message:
        verdict = await _sender_evidence(session, envelope.sender, probe)
        return verdict.applied(err)
    if err.stage is not SmtpStage.RCPT or err.per_message:
        return None
    fixed = [
        r
        for r in refusals
        if refused_permanently(r.code, r.message) and envelope.is_configured(r.recipient)
    ]
    if not fixed:
        return None
    found = await _recipient_evidence(session, [r.recipient for r in fixed], envelope.sender, probe)
    for r in fixed:
        if r.code == AUTH_REQUIRED:
            found[r.recipient] = Verdict(Evidence.NONE)
    weakest = min(fixed, key=lambda r: found[r.recipient].evidence.rank)
    refused = from_reply(
        SmtpStage.RCPT,
        weakest.code,
        weakest.message,
        envelope,
        weakest.recipient,
        err.refused,
    )
    return found[weakest.recipient].applied(refused)


async def _sender_evidence(session: SessionEvidence, sender: str, probe: Probe) -> Verdict:
    """Whether a 5xx to ``MAIL FROM:<sender>`` depends on the sender: another sender
    accepted in this session, else a probe with the null sender."""
    if session.other_sender(sender):
        return Verdict(Evidence.SESSION)
    probe_sender = session.probe_sender(sender)
    if probe_sender is None:
        return Verdict(Evidence.NO_PROBE)
    try:
        result = await probe(probe_sender, ())
    except DeliveryError:
        return Verdict(Evidence.PROBE_FAILED)
    return Verdict.of(result.mail, SmtpStage.MAIL, probe_sender)


async def _recipient_evidence(
    session: SessionEvidence, recipients: Sequence[str], sender: str, probe: Probe
) -> dict[str, Verdict]:
    """For each fixed recipient refused at RCPT in a transaction from ``sender``: shown by
    the session, or by one probe ``MAIL FROM:<other>`` + ``RCPT TO`` each + RSET."""
    found = {
        r: Verdict(Evidence.SESSION) for r in recipients if session.rcpt_other_sender(r, sender)
    }
    untested = [r for r in recipients if r not in found]
    if not untested:
        return found
    probe_sender = session.probe_sender(sender)
    if probe_sender is None:
        return found | dict.fromkeys(untested, Verdict(Evidence.NO_PROBE))
    try:
        result = await probe(probe_sender, untested)
    except DeliveryError:
        return found | dict.fromkeys(untested, Verdict(Evidence.PROBE_FAILED))
    if not result.mail.accepted:
        # The probe's sender is refused at MAIL: the recipient was never asked.  A 5xx
        # counts as refused (nothing shows that the refusal depends on the message: our
        # setup), anything else as no verdict.
        return found | dict.fromkeys(
            untested, Verdict.of(result.mail, SmtpStage.MAIL, probe_sender)
        )
    return found | {r: Verdict.of(result.rcpt[r], SmtpStage.RCPT, probe_sender) for r in untested}
