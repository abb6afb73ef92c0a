"""classify(): the one place that turns a failure into a Disposition (docs/design.md §3, §6).

The SMTP table is checked against an oracle written from docs/design.md §6.1 in the words of
the spec, over every code 200-599, every stage, with and without enhanced codes, both values of
``per_message`` and every kind of evidence (what testing showed about a refusal at MAIL or
RCPT).  The POP3 rows follow RFC 2449 §8 and RFC 3206.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.errors import (
    ConfigError,
    ConnectorError,
    DeadLetterError,
    DeliveryError,
    Disposition,
    Evidence,
    LedgerError,
    Pop3AuthError,
    Pop3ConnectionError,
    Pop3Error,
    Pop3ProtocolError,
    Pop3ResponseError,
    Pop3TimeoutError,
    Pop3TlsError,
    SmtpStage,
    classify,
    smtp_class,
    split_enhanced_code,
)

SETUP = (SmtpStage.CONNECT, SmtpStage.TLS, SmtpStage.EHLO, SmtpStage.AUTH)
TRANSACTION = (SmtpStage.MAIL, SmtpStage.RCPT, SmtpStage.DATA, SmtpStage.SIZE)
ENHANCED = (None, "2.0.0", "4.7.1", "4.2.2", "5.1.0", "5.3.4", "5.7.1")


def expected(
    stage: SmtpStage,
    code: int,
    enhanced: str | None,
    per_message: bool,
    evidence: Evidence = Evidence.NONE,
) -> Disposition:
    """docs/design.md §6.1, spelled out independently of errors.py."""
    if stage is SmtpStage.RCPT and code == 552:
        code = 452  # RFC 5321 §4.5.3.1.10
    permanent = (enhanced[0] == "5") if enhanced else (500 <= code < 600)
    if not permanent:
        return Disposition.RETRY
    if stage in SETUP or code == 530:  # RFC 4954 §6: authentication required, of every sender
        return Disposition.PARK_ACCOUNT
    if stage in (SmtpStage.MAIL, SmtpStage.RCPT):
        if code == 530:  # RFC 4954 §6: authentication required, whatever the message
            return Disposition.PARK_ACCOUNT
        if stage is SmtpStage.RCPT and per_message:  # a recipient read from the message
            return Disposition.DEAD_LETTER
        if stage is SmtpStage.MAIL and not per_message:  # a fixed envelope sender
            return Disposition.PARK_ACCOUNT
        # The message's own sender, or a recipient fixed in the config: tested.
        if evidence in (Evidence.SESSION, Evidence.PROBE_ACCEPTED, Evidence.LOCAL):
            return Disposition.DEAD_LETTER
        if evidence is Evidence.PROBE_FAILED:
            return Disposition.RETRY
        return Disposition.PARK_ACCOUNT
    return Disposition.DEAD_LETTER if per_message else Disposition.PARK_ACCOUNT


# ------------------------------------------------------------------------------------------
# SMTP: the full table
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(SmtpStage))
@pytest.mark.parametrize("enhanced", ENHANCED)
@pytest.mark.parametrize("per_message", [True, False])
def test_smtp_code_table(stage: SmtpStage, enhanced: str | None, per_message: bool) -> None:
    for code, evidence in itertools.product(range(200, 600), Evidence):
        exc = DeliveryError(
            stage,
            "text",
            smtp_code=code,
            enhanced_code=enhanced,
            per_message=per_message,
            evidence=evidence,
        )
        assert classify(exc) is expected(stage, code, enhanced, per_message, evidence), (
            code,
            evidence,
            exc,
        )


@pytest.mark.parametrize("stage", SETUP)
def test_setup_stages_never_dead_letter(stage: SmtpStage) -> None:
    for code, enhanced, per_message, certificate, evidence in itertools.product(
        [None, *range(200, 600)], ENHANCED, [True, False], [True, False], Evidence
    ):
        exc = DeliveryError(
            stage,
            "x",
            smtp_code=code,
            enhanced_code=enhanced,
            per_message=per_message,
            security=certificate,
            evidence=evidence,
        )
        assert classify(exc) is not Disposition.DEAD_LETTER


@pytest.mark.parametrize(
    ("stage", "code", "enhanced", "per_message", "disposition"),
    [
        # The seed case (docs/design.md §1, §6.1): refused after DATA for a reason about the
        # message.
        (SmtpStage.DATA, 554, "5.1.0", True, Disposition.DEAD_LETTER),
        (SmtpStage.DATA, 552, "5.3.4", True, Disposition.DEAD_LETTER),
        (SmtpStage.DATA, 451, "4.3.0", True, Disposition.RETRY),
        (SmtpStage.DATA, 421, "4.4.2", True, Disposition.RETRY),
        # MAIL: untested, even the message's own Return-Path is not shown to be the cause.
        (SmtpStage.MAIL, 550, "5.7.1", True, Disposition.PARK_ACCOUNT),
        (SmtpStage.MAIL, 550, "5.7.1", False, Disposition.PARK_ACCOUNT),
        (SmtpStage.MAIL, 451, "4.7.1", False, Disposition.RETRY),
        # RCPT: a fixed deliver_to recipient refused, untested, is the account's problem.
        (SmtpStage.RCPT, 550, "5.1.1", False, Disposition.PARK_ACCOUNT),
        (SmtpStage.RCPT, 550, "5.1.1", True, Disposition.DEAD_LETTER),
        # RFC 5321 §4.5.3.1.10: 552 at RCPT counts as 452 ...
        (SmtpStage.RCPT, 552, None, True, Disposition.RETRY),
        (SmtpStage.RCPT, 552, None, False, Disposition.RETRY),
        # ... but only at RCPT.
        (SmtpStage.DATA, 552, None, True, Disposition.DEAD_LETTER),
        # RFC 3463 §3.1: the enhanced class digit wins over the basic code.
        (SmtpStage.DATA, 550, "4.2.2", True, Disposition.RETRY),
        (SmtpStage.DATA, 450, "5.2.2", True, Disposition.DEAD_LETTER),
        (SmtpStage.RCPT, 552, "5.2.2", True, Disposition.DEAD_LETTER),
        (SmtpStage.DATA, 554, "2.0.0", True, Disposition.RETRY),
        # Our own size check (RFC 1870), done before sending.
        (SmtpStage.SIZE, 552, "5.3.4", True, Disposition.DEAD_LETTER),
        # Setup: a 5xx is a wrong relay setup, never a dead letter.
        (SmtpStage.AUTH, 535, "5.7.8", True, Disposition.PARK_ACCOUNT),
        (SmtpStage.CONNECT, 554, None, False, Disposition.PARK_ACCOUNT),
        (SmtpStage.EHLO, 421, None, False, Disposition.RETRY),
        (SmtpStage.TLS, 454, "4.7.0", False, Disposition.RETRY),
    ],
)
def test_smtp_named_cases(
    stage: SmtpStage, code: int, enhanced: str | None, per_message: bool, disposition: Disposition
) -> None:
    exc = DeliveryError(stage, "t", smtp_code=code, enhanced_code=enhanced, per_message=per_message)
    assert classify(exc) is disposition


@pytest.mark.parametrize(
    ("stage", "code", "enhanced", "per_message", "evidence", "disposition"),
    [
        # MAIL with the message's own Return-Path: a dead letter only when shown.
        (SmtpStage.MAIL, 554, "5.1.0", True, Evidence.SESSION, Disposition.DEAD_LETTER),
        (SmtpStage.MAIL, 554, "5.1.0", True, Evidence.PROBE_ACCEPTED, Disposition.DEAD_LETTER),
        (SmtpStage.MAIL, 554, "5.1.0", True, Evidence.PROBE_REFUSED, Disposition.PARK_ACCOUNT),
        (SmtpStage.MAIL, 554, "5.1.0", True, Evidence.NO_PROBE, Disposition.PARK_ACCOUNT),
        (SmtpStage.MAIL, 554, "5.1.0", True, Evidence.PROBE_FAILED, Disposition.RETRY),
        (SmtpStage.MAIL, 554, "5.1.0", True, Evidence.NONE, Disposition.PARK_ACCOUNT),
        (SmtpStage.MAIL, 553, "5.1.7", True, Evidence.LOCAL, Disposition.DEAD_LETTER),
        # A fixed envelope sender: never tested, never a dead letter.
        (SmtpStage.MAIL, 554, "5.1.0", False, Evidence.PROBE_ACCEPTED, Disposition.PARK_ACCOUNT),
        # RFC 4954 §6: 530 is our setup, whatever a probe said.
        (SmtpStage.MAIL, 530, "5.7.1", True, Evidence.PROBE_ACCEPTED, Disposition.PARK_ACCOUNT),
        (SmtpStage.MAIL, 530, "5.7.0", True, Evidence.SESSION, Disposition.PARK_ACCOUNT),
        (SmtpStage.RCPT, 530, "5.7.1", False, Evidence.SESSION, Disposition.PARK_ACCOUNT),
        (SmtpStage.RCPT, 530, "5.7.1", True, Evidence.NONE, Disposition.PARK_ACCOUNT),
        # RCPT of a fixed recipient: Postfix's delay_reject sender refusal vs a wrong address.
        (SmtpStage.RCPT, 554, "5.1.0", False, Evidence.SESSION, Disposition.DEAD_LETTER),
        (SmtpStage.RCPT, 554, "5.1.0", False, Evidence.PROBE_ACCEPTED, Disposition.DEAD_LETTER),
        (SmtpStage.RCPT, 550, "5.1.1", False, Evidence.PROBE_REFUSED, Disposition.PARK_ACCOUNT),
        (SmtpStage.RCPT, 550, "5.1.1", False, Evidence.NO_PROBE, Disposition.PARK_ACCOUNT),
        (SmtpStage.RCPT, 550, "5.1.1", False, Evidence.PROBE_FAILED, Disposition.RETRY),
        # Evidence changes nothing after DATA, nor in a temporary refusal.
        (SmtpStage.DATA, 554, "5.1.0", True, Evidence.PROBE_REFUSED, Disposition.DEAD_LETTER),
        (SmtpStage.MAIL, 451, "4.7.1", True, Evidence.PROBE_ACCEPTED, Disposition.RETRY),
    ],
)
def test_smtp_evidence_cases(
    stage: SmtpStage,
    code: int,
    enhanced: str | None,
    per_message: bool,
    evidence: Evidence,
    disposition: Disposition,
) -> None:
    exc = DeliveryError(
        stage,
        "t",
        smtp_code=code,
        enhanced_code=enhanced,
        per_message=per_message,
        evidence=evidence,
    )
    assert classify(exc) is disposition


# Exchange 2016/2019 and Exchange Online as they answer (issue 12, "Exchange as it answers"):
# where the refusal comes, the reply, what the evidence is when the server refuses it for every
# sender ("alike": the probe is refused too) or for this message only ("message": the probe
# with another sender is accepted), and the disposition.  tests/integration/test_exchange.py
# drives the same replies through the fetcher.
EXCHANGE_REFUSALS: list[tuple[SmtpStage, str, Evidence, Disposition]] = [
    (
        SmtpStage.RCPT,
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        Evidence.PROBE_REFUSED,
        Disposition.PARK_ACCOUNT,
    ),
    (SmtpStage.MAIL, "554 5.1.0 Sender denied", Evidence.PROBE_ACCEPTED, Disposition.DEAD_LETTER),
    (SmtpStage.DATA, "554 5.1.0 Sender denied", Evidence.NONE, Disposition.DEAD_LETTER),
    (
        SmtpStage.DATA,
        "552 5.3.4 Message size exceeds fixed maximum message size",
        Evidence.NONE,
        Disposition.DEAD_LETTER,
    ),
    (
        SmtpStage.SIZE,
        "552 5.3.4 Message size exceeds fixed maximum message size",
        Evidence.NONE,
        Disposition.DEAD_LETTER,
    ),
    (SmtpStage.MAIL, "452 4.3.1 Insufficient system resources", Evidence.NONE, Disposition.RETRY),
    (SmtpStage.RCPT, "452 4.3.1 Insufficient system resources", Evidence.NONE, Disposition.RETRY),
    (
        SmtpStage.DATA,
        "421 4.3.2 Service not available, closing transmission channel",
        Evidence.NONE,
        Disposition.RETRY,
    ),
    (
        SmtpStage.MAIL,
        "451 4.7.0 Temporary server error. Please try again later. PRX4",
        Evidence.NONE,
        Disposition.RETRY,
    ),
    (
        SmtpStage.RCPT,
        "550 5.7.64 TenantAttribution; Relay Access Denied",
        Evidence.PROBE_REFUSED,
        Disposition.PARK_ACCOUNT,
    ),
    (
        SmtpStage.MAIL,
        "451 4.7.500 Server busy. Please try again later",
        Evidence.NONE,
        Disposition.RETRY,
    ),
    (
        SmtpStage.MAIL,
        "530 5.7.1 Client was not authenticated",
        Evidence.NONE,
        Disposition.PARK_ACCOUNT,
    ),
    (
        SmtpStage.MAIL,
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        Evidence.PROBE_REFUSED,
        Disposition.PARK_ACCOUNT,
    ),
]


@pytest.mark.parametrize(("stage", "reply", "evidence", "disposition"), EXCHANGE_REFUSALS)
def test_exchange_refusals(
    stage: SmtpStage, reply: str, evidence: Evidence, disposition: Disposition
) -> None:
    code, _, rest = reply.partition(" ")
    enhanced, text = split_enhanced_code(rest)
    per_message = stage is not SmtpStage.RCPT  # the message's own sender; deliver_to fixed
    exc = DeliveryError(
        stage,
        text,
        smtp_code=int(code),
        enhanced_code=enhanced,
        per_message=per_message,
        evidence=evidence,
    )
    assert classify(exc) is disposition
    assert exc.response == reply


def test_seed_case_many_messages_all_dead_lettered() -> None:
    # docs/design.md §6.1: many different messages, each refused "554 5.1.0 Sender denied"
    # after DATA.
    enhanced, text = split_enhanced_code("5.1.0 Sender denied")
    errors = [
        DeliveryError(SmtpStage.DATA, text, smtp_code=554, enhanced_code=enhanced, per_message=True)
        for _ in range(50)
    ]
    assert all(classify(exc) is Disposition.DEAD_LETTER for exc in errors)
    assert str(errors[0]) == "554 5.1.0 Sender denied (at data)"


@pytest.mark.parametrize("stage", list(SmtpStage))
@pytest.mark.parametrize("per_message", [True, False])
def test_no_code_is_transient_unless_certificate(stage: SmtpStage, per_message: bool) -> None:
    # Timeouts and dropped connections carry no code: always RETRY.
    assert classify(DeliveryError(stage, "timed out", per_message=per_message)) is (
        Disposition.RETRY
    )
    certificate = DeliveryError(stage, "untrusted", per_message=per_message, security=True)
    if stage in SETUP:
        assert classify(certificate) is Disposition.PARK_ACCOUNT
    else:
        assert classify(certificate) is Disposition.RETRY  # cannot happen outside setup


def test_smtp_class_helper() -> None:
    assert smtp_class(None, "5.1.1", SmtpStage.DATA) is None
    assert smtp_class(552, None, SmtpStage.RCPT) == 4
    assert smtp_class(552, None, SmtpStage.DATA) == 5
    assert smtp_class(250, "4.0.0", SmtpStage.DATA) == 4


@pytest.mark.parametrize(
    ("text", "split"),
    [
        ("5.1.0 Sender denied", ("5.1.0", "Sender denied")),
        ("4.7.1 Greylisted, try later", ("4.7.1", "Greylisted, try later")),
        ("2.0.0", ("2.0.0", "")),
        ("5.123.456 detail", ("5.123.456", "detail")),
        ("Sender denied", (None, "Sender denied")),
        ("3.0.0 not a class", (None, "3.0.0 not a class")),
        ("5.1.0x glued", (None, "5.1.0x glued")),
        ("", (None, "")),
    ],
)
def test_split_enhanced_code(text: str, split: tuple[str | None, str]) -> None:
    assert split_enhanced_code(text) == split


# ------------------------------------------------------------------------------------------
# POP3
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "disposition"),
    [
        # RFC 2449 §8.1.1 / RFC 3206 §4, §5: transient.
        (Pop3ResponseError("PASS", "mailbox locked", "IN-USE"), Disposition.RETRY),
        (Pop3AuthError("PASS", "mailbox locked", "IN-USE"), Disposition.RETRY),
        (Pop3ResponseError("STAT", "try later", "SYS/TEMP"), Disposition.RETRY),
        (Pop3AuthError("PASS", "try later", "SYS/TEMP"), Disposition.RETRY),
        (Pop3AuthError("USER", "too soon", "LOGIN-DELAY"), Disposition.RETRY),
        # RFC 3206 §4 [AUTH], §5 [SYS/PERM]: permanent for the account.
        (Pop3AuthError("PASS", "bad credentials", "AUTH"), Disposition.PARK_ACCOUNT),
        (Pop3AuthError("APOP", "bad credentials", "AUTH"), Disposition.PARK_ACCOUNT),
        (Pop3AuthError("PASS", "account disabled", "SYS/PERM"), Disposition.PARK_ACCOUNT),
        (Pop3ResponseError("RETR", "disk gone", "SYS/PERM"), Disposition.PARK_ACCOUNT),
        # A bare -ERR at login: RETRY (the service caps the attempts).
        (Pop3AuthError("PASS", "authentication failed"), Disposition.RETRY),
        (Pop3ResponseError("RETR", "no such message"), Disposition.RETRY),
        # An unknown response code is treated like none.
        (Pop3AuthError("PASS", "?", "X-VENDOR"), Disposition.RETRY),
        (Pop3ProtocolError("line too long"), Disposition.RETRY),
        (Pop3ConnectionError("reset"), Disposition.RETRY),
        (Pop3TimeoutError("idle"), Disposition.RETRY),
        (Pop3TlsError("certificate verify failed"), Disposition.PARK_ACCOUNT),
        (Pop3Error("other"), Disposition.RETRY),
    ],
    ids=repr,
)
def test_pop3(exc: Exception, disposition: Disposition) -> None:
    assert classify(exc) is disposition


# ------------------------------------------------------------------------------------------
# Storage, config, and anything else
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "disposition"),
    [
        (DeadLetterError("maildir", "disk full"), Disposition.RETRY),
        (LedgerError("database is locked"), Disposition.RETRY),
        (ConfigError(["smtp.port: bad"]), Disposition.PARK_ACCOUNT),
        (ConnectorError("a new subclass nobody classified"), Disposition.BUG),
        (ValueError("x"), Disposition.BUG),
        (KeyError("x"), Disposition.BUG),
        (OSError("raw, should have been mapped"), Disposition.BUG),
        (TimeoutError(), Disposition.BUG),
    ],
    ids=repr,
)
def test_other(exc: BaseException, disposition: Disposition) -> None:
    assert classify(exc) is disposition


# ------------------------------------------------------------------------------------------
# Totality: any member of the tree, any field values, gives a Disposition
# ------------------------------------------------------------------------------------------

_texts = st.text(max_size=30)
_resp_codes = st.one_of(
    st.none(), st.sampled_from(["IN-USE", "SYS/TEMP", "SYS/PERM", "AUTH", "LOGIN-DELAY"]), _texts
)
# The codes a DeliveryError can carry: from split_enhanced_code (RFC 3463 §2 form) or None.
_enhanced = st.one_of(
    st.none(),
    st.builds(
        lambda c, s, d: f"{c}.{s}.{d}",
        st.sampled_from("245"),
        st.integers(0, 999),
        st.integers(0, 999),
    ),
)
_errors: st.SearchStrategy[BaseException] = st.one_of(
    st.builds(
        DeliveryError,
        st.sampled_from(list(SmtpStage)),
        _texts,
        smtp_code=st.one_of(st.none(), st.integers(0, 999)),
        enhanced_code=_enhanced,
        per_message=st.booleans(),
        security=st.booleans(),
        evidence=st.sampled_from(Evidence),
    ),
    st.builds(Pop3ResponseError, _texts, _texts, _resp_codes),
    st.builds(Pop3AuthError, _texts, _texts, _resp_codes),
    st.builds(Pop3ProtocolError, _texts),
    st.builds(Pop3ConnectionError, _texts),
    st.builds(Pop3TlsError, _texts),
    st.builds(Pop3TimeoutError, _texts),
    st.builds(DeadLetterError, _texts, _texts),
    st.builds(LedgerError, _texts),
    st.builds(ConfigError, st.lists(_texts, max_size=3)),
)


@given(_errors)
def test_classify_is_total_over_the_tree(exc: BaseException) -> None:
    disposition = classify(exc)
    assert isinstance(disposition, Disposition)
    # Every member of the tree is a known failure; BUG is for things outside it.
    assert disposition is not Disposition.BUG
    if isinstance(exc, DeliveryError) and exc.stage in SETUP:
        assert disposition is not Disposition.DEAD_LETTER
