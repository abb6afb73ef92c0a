"""connector.smtp.failures: every aiosmtplib, ssl and socket exception as a DeliveryError, and
one reading of whether a refusal at RCPT is permanent."""

from __future__ import annotations

import inspect
import ssl

import aiosmtplib
import aiosmtplib.errors
import pytest

from connector.errors import (
    AUTH_REQUIRED,
    DeliveryError,
    Disposition,
    SmtpStage,
    classify,
    smtp_class,
)
from connector.smtp import (
    Envelope,
    delivery_error,
)
from connector.smtp.failures import from_reply, refused_permanently

OWN = Envelope("owner@example.test", ("info@firma.local",), sender_fixed=False)
FIXED = Envelope("relay@firma.local", ("info@firma.local",), sender_fixed=True)
MULTIDROP = Envelope("", ("a@firma.local", "b@firma.local"), False, recipients_fixed=False)

# ------------------------------------------------------------------------------------------
# delivery_error: every aiosmtplib exception maps, and to the right thing
# ------------------------------------------------------------------------------------------

_AIOSMTPLIB_ERRORS = sorted(
    (
        obj
        for obj in vars(aiosmtplib.errors).values()
        if isinstance(obj, type) and issubclass(obj, aiosmtplib.SMTPException)
    ),
    key=lambda cls: cls.__name__,
)


def _instances(cls: type[aiosmtplib.SMTPException]) -> list[aiosmtplib.SMTPException]:
    """Instances of an aiosmtplib exception, built from its constructor's shape."""
    if issubclass(cls, aiosmtplib.SMTPRecipientsRefused):
        return [
            cls([]),
            cls([aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "a@x.test")]),
            cls([aiosmtplib.SMTPRecipientRefused(450, "4.2.1 later", "a@x.test")]),
        ]
    params = len(inspect.signature(cls).parameters)
    if params == 1:
        return [cls("text")]
    out: list[aiosmtplib.SMTPException] = []
    for code, message in [(421, "4.3.2 shutting down"), (451, "later"), (554, "5.7.1 no")]:
        if params == 2:
            out.append(cls(code, message))  # type: ignore[call-arg,arg-type]
        else:
            out.append(cls(code, message, "a@x.test"))  # type: ignore[call-arg,arg-type]
    return out


def test_the_guard_sees_every_aiosmtplib_exception() -> None:
    # If aiosmtplib adds exception classes, they are in the list below automatically; this
    # pins that the discovery works at all.
    names = {cls.__name__ for cls in _AIOSMTPLIB_ERRORS}
    exported = {
        name
        for name in aiosmtplib.__all__
        if isinstance(getattr(aiosmtplib, name), type)
        and issubclass(getattr(aiosmtplib, name), BaseException)
    }
    assert exported <= names
    assert len(names) >= 15


@pytest.mark.parametrize("cls", _AIOSMTPLIB_ERRORS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("stage", list(SmtpStage))
def test_every_aiosmtplib_exception_maps(
    cls: type[aiosmtplib.SMTPException], stage: SmtpStage
) -> None:
    # Like httpx's test_httpcore_all_exceptions_mapped: nothing from the library is a BUG.
    for exc in _instances(cls):
        for envelope in (None, OWN, FIXED, MULTIDROP):
            err = delivery_error(exc, stage, envelope)
            assert isinstance(err, DeliveryError)
            assert classify(err) is not Disposition.BUG
            assert "\n" not in str(err)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(113, "No route to host"),
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(),
        TimeoutError(),
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        ssl.SSLCertVerificationError(1, "certificate verify failed"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("stage", list(SmtpStage))
def test_raw_socket_and_ssl_errors_map(exc: OSError, stage: SmtpStage) -> None:
    err = delivery_error(exc, stage, OWN)
    assert classify(err) is not Disposition.BUG
    assert err.smtp_code is None


@pytest.mark.parametrize(
    ("exc", "envelope", "stage", "code", "enhanced", "per_message", "disposition"),
    [
        # MAIL: own Return-Path may be about this message, but until the deliverer has tested
        # it (evidence, tests/component/test_smtp_evidence.py) it is not shown to be; a fixed
        # sender is about every message.
        (
            aiosmtplib.SMTPSenderRefused(554, "5.7.1 Sender rejected", "s@x.test"),
            OWN,
            SmtpStage.MAIL,
            554,
            "5.7.1",
            True,
            Disposition.PARK_ACCOUNT,
        ),
        (
            aiosmtplib.SMTPSenderRefused(554, "5.7.1 Sender rejected", "s@x.test"),
            FIXED,
            SmtpStage.MAIL,
            554,
            "5.7.1",
            False,
            Disposition.PARK_ACCOUNT,
        ),
        (
            aiosmtplib.SMTPSenderRefused(451, "4.7.1 Greylisted", "s@x.test"),
            FIXED,
            SmtpStage.MAIL,
            451,
            "4.7.1",
            False,
            Disposition.RETRY,
        ),
        # RFC 1870 §6.1: 552 to MAIL FROM is the size limit, about this message.
        (
            aiosmtplib.SMTPSenderRefused(552, "5.3.4 Message too big", "s@x.test"),
            FIXED,
            SmtpStage.SIZE,
            552,
            "5.3.4",
            True,
            Disposition.DEAD_LETTER,
        ),
        # RCPT of fixed vs message-derived recipients.
        (
            aiosmtplib.SMTPRecipientsRefused(
                [aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "info@firma.local")]
            ),
            FIXED,
            SmtpStage.RCPT,
            550,
            "5.1.1",
            False,
            Disposition.PARK_ACCOUNT,
        ),
        (
            aiosmtplib.SMTPRecipientsRefused(
                [
                    aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "a@firma.local"),
                    aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "b@firma.local"),
                ]
            ),
            MULTIDROP,
            SmtpStage.RCPT,
            550,
            "5.1.1",
            True,
            Disposition.DEAD_LETTER,
        ),
        # All refused, one only temporarily: the message may yet go through, so defer it.
        (
            aiosmtplib.SMTPRecipientsRefused(
                [
                    aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "a@firma.local"),
                    aiosmtplib.SMTPRecipientRefused(452, "4.2.2 full", "b@firma.local"),
                ]
            ),
            MULTIDROP,
            SmtpStage.RCPT,
            452,
            "4.2.2",
            True,
            Disposition.RETRY,
        ),
        (
            aiosmtplib.SMTPRecipientsRefused(
                [aiosmtplib.SMTPRecipientRefused(552, "too many recipients", "a@firma.local")]
            ),
            FIXED,
            SmtpStage.RCPT,
            552,
            None,
            False,
            Disposition.RETRY,
        ),
        # After DATA: always about this message, whatever the envelope.
        (
            aiosmtplib.SMTPDataError(554, "5.1.0 Sender denied"),
            FIXED,
            SmtpStage.DATA,
            554,
            "5.1.0",
            True,
            Disposition.DEAD_LETTER,
        ),
        (
            aiosmtplib.SMTPDataError(451, "4.3.0 try again"),
            FIXED,
            SmtpStage.DATA,
            451,
            "4.3.0",
            True,
            Disposition.RETRY,
        ),
        # Setup.
        (
            aiosmtplib.SMTPAuthenticationError(535, "5.7.8 Authentication credentials invalid"),
            None,
            SmtpStage.AUTH,
            535,
            "5.7.8",
            False,
            Disposition.PARK_ACCOUNT,
        ),
        (
            aiosmtplib.SMTPConnectResponseError(554, "No SMTP service here"),
            None,
            SmtpStage.CONNECT,
            554,
            None,
            False,
            Disposition.PARK_ACCOUNT,
        ),
        (
            aiosmtplib.SMTPHeloError(421, "4.3.2 closing"),
            None,
            SmtpStage.EHLO,
            421,
            "4.3.2",
            False,
            Disposition.RETRY,
        ),
        (
            aiosmtplib.SMTPConnectTimeoutError("Timed out connecting"),
            None,
            SmtpStage.CONNECT,
            None,
            None,
            False,
            Disposition.RETRY,
        ),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_mapping_cases(
    exc: aiosmtplib.SMTPException,
    envelope: Envelope | None,
    stage: SmtpStage,
    code: int | None,
    enhanced: str | None,
    per_message: bool,
    disposition: Disposition,
) -> None:
    # The passed-in stage is deliberately wrong: self-describing exceptions name their own.
    err = delivery_error(
        exc, SmtpStage.EHLO if stage is not SmtpStage.EHLO else SmtpStage.MAIL, envelope
    )
    assert (err.stage, err.smtp_code, err.enhanced_code, err.per_message) == (
        stage,
        code,
        enhanced,
        per_message,
    )
    assert classify(err) is disposition


def test_timeouts_and_drops_keep_the_stage_in_flight() -> None:
    for stage in SmtpStage:
        for exc in (
            aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"),
            aiosmtplib.SMTPServerDisconnected("Connection lost"),
        ):
            err = delivery_error(exc, stage, OWN)
            assert err.stage is stage
            assert classify(err) is Disposition.RETRY


def test_certificate_failure_found_in_the_cause_chain() -> None:
    # Implicit TLS: aiosmtplib wraps the handshake's OSError in SMTPConnectError.
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "unable to get local issuer certificate"
    wrapped = aiosmtplib.SMTPConnectError("Error connecting to h on port 465")
    wrapped.__cause__ = cert
    for exc in (cert, wrapped):
        err = delivery_error(exc, SmtpStage.CONNECT)
        assert err.stage is SmtpStage.TLS
        assert err.security
        assert "unable to get local issuer certificate" in err.text
        assert classify(err) is Disposition.PARK_ACCOUNT


def test_tls_error_mid_transaction_is_a_drop_not_a_tls_stage() -> None:
    err = delivery_error(ssl.SSLEOFError(8, "EOF"), SmtpStage.DATA, OWN)
    assert err.stage is SmtpStage.DATA
    assert not err.security
    assert classify(err) is Disposition.RETRY
    err = delivery_error(ssl.SSLError(1, "handshake failure"), SmtpStage.CONNECT)
    assert err.stage is SmtpStage.TLS
    assert classify(err) is Disposition.RETRY


def test_multiline_reply_is_one_line() -> None:
    err = delivery_error(
        aiosmtplib.SMTPDataError(554, "5.6.0 first line\nsecond line"), SmtpStage.DATA, OWN
    )
    assert err.enhanced_code == "5.6.0"
    assert err.response == "554 5.6.0 first line second line"


def test_refusal_wins_over_a_failed_rset() -> None:
    # sendmail() RSETs after a refusal; a timeout there must not hide the 554.
    refusal = aiosmtplib.SMTPDataError(554, "5.1.0 Sender denied")
    timeout = aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response")
    timeout.__context__ = refusal
    err = delivery_error(timeout, SmtpStage.DATA, OWN)
    assert err.response == "554 5.1.0 Sender denied"
    assert classify(err) is Disposition.DEAD_LETTER
    # A timeout with no refusal behind it stays a timeout.
    lone = aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response")
    lone.__context__ = KeyError("unrelated")
    assert classify(delivery_error(lone, SmtpStage.DATA, OWN)) is Disposition.RETRY


# One reading of "is this RCPT refusal permanent" (refused_permanently) decides which refusal
# is reported, which is tested and which recipients get a dead-letter copy; it must agree with
# the DeliveryError that from_reply() makes of the same reply, which classify() reads.  A tab
# after the enhanced code is where readings of the raw text and of its one-line form differ.
RCPT_REPLIES = [
    (550, "5.1.1 User unknown"),
    (450, "4.2.2 Mailbox full"),
    (550, "4.2.2 the enhanced class wins"),
    (450, "5.2.2 the enhanced class wins"),
    (552, "too many recipients"),  # 452 at RCPT
    (552, "5.2.3 over quota"),
    (530, "5.7.0 Authentication required"),
    (450, "5.1.1\tover quota"),
    (550, "4.2.2\tfull"),
    (451, "first line\n5.1.1 second line"),
]


@pytest.mark.parametrize(("code", "message"), RCPT_REPLIES)
def test_refused_permanently_agrees_with_the_error_classify_reads(code: int, message: str) -> None:
    err = from_reply(SmtpStage.RCPT, code, message, MULTIDROP, "a@firma.local")
    assert refused_permanently(code, message) is (
        smtp_class(err.smtp_code, err.enhanced_code, err.stage) == 5
    ), err
    if code != AUTH_REQUIRED:  # 530: our setup whatever the class (docs/design.md §6.1)
        assert refused_permanently(code, message) is (classify(err) is Disposition.DEAD_LETTER)


def test_of_all_recipients_refused_a_temporary_one_is_reported_by_the_same_reading() -> None:
    # "450 5.1.1<TAB>..." is temporary as its DeliveryError reads it (the enhanced code is not
    # followed by a space), so the message is deferred, not dead-lettered for the 550.
    exc = aiosmtplib.SMTPRecipientsRefused(
        [
            aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "a@firma.local"),
            aiosmtplib.SMTPRecipientRefused(450, "5.1.1\tover quota", "b@firma.local"),
        ]
    )
    err = delivery_error(exc, SmtpStage.RCPT, MULTIDROP)
    assert err.smtp_code == 450
    assert classify(err) is Disposition.RETRY
