"""What an SMTP refusal means (docs/design.md §6): for the message, for the cycle, as text.

* :func:`verdict`: our setup, this message's (permanent), temporary, or not yet known.  The
  cycle and ``dead-letters requeue`` both decide by it.
* :func:`refusal_summary`: the refused recipients and their replies as one line, for a dead
  letter's ``Response``, the log line and ``requeue``'s output.
* :class:`Breaker`: the cycle's guard against its own misjudgement at MAIL and RCPT (§6.2).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from connector.errors import DeliveryError, Disposition, Evidence, SmtpStage, classify


class Verdict(enum.Enum):
    """What an SMTP failure of one message's transaction says."""

    OUR_SETUP = "our setup"  # every message would fare the same: stop, dead-letter nothing
    UNDECIDED = "undecided"  # the null sender refused, nothing to test another sender with yet
    PERMANENT = "permanent"  # about this message: dead-letter it
    TEMPORARY = "temporary"  # try again later (defer it)


def verdict(exc: DeliveryError) -> Verdict:
    """Decide what ``exc`` means, from :func:`~connector.errors.classify` and the stage.

    A failure before the transaction (connect, TLS, EHLO, AUTH) is our setup whatever its code:
    the next message would meet it too.  A 5xx to the null sender with no other sender accepted
    in the session to test with is undecided (docs/design.md §6.2): a later message may show
    either.  The cycle holds such a message; ``requeue`` stops its batch, as for our setup.
    """
    disposition = classify(exc)
    if disposition is Disposition.PARK_ACCOUNT and exc.evidence is Evidence.NO_PROBE:
        return Verdict.UNDECIDED
    if exc.stage.is_setup or disposition is Disposition.PARK_ACCOUNT:
        return Verdict.OUR_SETUP
    if disposition is Disposition.DEAD_LETTER:
        return Verdict.PERMANENT
    if disposition is Disposition.RETRY:
        return Verdict.TEMPORARY
    # classify() never calls an SMTP failure a bug; if it ever did, nothing here may guess.
    raise exc


def refusal_summary(refused: Mapping[str, str]) -> str:
    """``<a@x> 550 5.1.1 unknown; <b@x> 452 4.2.2 full``: recipients and their replies."""
    return "; ".join(f"<{recipient}> {reply}" for recipient, reply in refused.items())


BREAKER_THRESHOLD: Final = 5
"""The circuit breaker (docs/design.md §6.2, :class:`Breaker`) trips at the fifth message in a row
refused alike at MAIL or RCPT with only a probe to say that the refusal depends on the message.
A setup refusal that the probe misjudges then costs at most four dead letters, each repaired by
``dead-letters requeue``.  A real run of refused senders at the head of a session (spam comes in
runs) is mostly dead-lettered at once; the rest is held and decided again as soon as a message
gets through (Cycle._revisit), at the price of a second RETR each.  Higher would let a
misjudgement cost more dead letters; lower would fetch more messages twice."""


class Breaker:
    """The guard of docs/design.md §6.2 against our own misjudgement at MAIL and RCPT.

    A 5xx at MAIL or RCPT is dead-lettered when a probe with another sender was accepted
    (delivery: ``Evidence.PROBE_ACCEPTED``).  If a target refused every real sender but took
    the probe's (an Exchange connector without Accept-Any-Sender may take the null sender),
    that judgement would dead-letter a whole mailbox.  So: when :data:`BREAKER_THRESHOLD`
    messages in a row are refused at the same stage with the same code on a probe's word alone,
    and no message of this session got past MAIL and RCPT, the breaker trips.  From then on
    such refusals are *held*: left upstream untouched (no dead letter, no ledger row), and the
    cycle goes on.  A message that gets past MAIL and RCPT (delivered, or refused at or after
    DATA) resets it: the stage works, the held mail is decided again with this session's
    evidence (Cycle._revisit).  If none does, the cycle ends failing with
    :class:`~connector.errors.RefusedAlikeError` ("every message refused alike: check the SMTP
    target"), and the trip is remembered in the ledger, so the next cycles start tripped: no
    more dead letters on a probe's word until a message gets through again.

    Refusals shown by the session itself (``Evidence.SESSION``: another sender or the same
    recipient accepted for a real message) and refusals after DATA never count: a mailbox full
    of spam refused after DATA is the case this product exists for.
    """

    __slots__ = ("count", "key", "passed", "tripped")

    def __init__(self, tripped: str | None = None) -> None:
        self.tripped = tripped  # the refusal that tripped it (this cycle or an earlier one)
        self.key: tuple[SmtpStage, int | None, str | None] | None = None
        self.count = 0
        self.passed = False  # a message got past MAIL and RCPT in this session

    def holds(self, exc: DeliveryError) -> bool:
        """For a refusal at MAIL or RCPT about to be dead-lettered: hold it instead?"""
        if exc.evidence is not Evidence.PROBE_ACCEPTED:
            return False
        if self.tripped is not None:
            return True
        key = (exc.stage, exc.smtp_code, exc.enhanced_code)
        if key != self.key:
            self.key, self.count = key, 0
        self.count += 1
        if self.count < BREAKER_THRESHOLD:
            return False
        self.tripped = f"{exc.response} (at {exc.stage})"
        return True

    def through(self) -> None:
        """A message got past MAIL and RCPT: the stage works; start again."""
        self.tripped, self.key, self.count, self.passed = None, None, 0, True
