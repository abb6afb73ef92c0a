"""The smtp package without a server: envelope sender, address checks, and the exception mapping."""

from __future__ import annotations

import inspect
import ssl
import time

import aiosmtplib
import aiosmtplib.errors
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

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
    SenderPolicy,
    address_problem,
    content_pieces,
    delivery_error,
    envelope_sender,
    needs_smtputf8,
    prepare_content,
)
from connector.smtp.failures import from_reply, refused_permanently

OWN = Envelope("owner@example.test", ("info@firma.local",), sender_fixed=False)
FIXED = Envelope("relay@firma.local", ("info@firma.local",), sender_fixed=True)
MULTIDROP = Envelope("", ("a@firma.local", "b@firma.local"), False, recipients_fixed=False)

# ------------------------------------------------------------------------------------------
# envelope_sender
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "sender"),
    [
        (b"Return-Path: <a@example.test>\r\nSubject: x\r\n\r\nbody\r\n", "a@example.test"),
        (b"return-PATH:<a@example.test>\r\n\r\n", "a@example.test"),
        (b"Return-Path: <>\r\nSubject: x\r\n\r\n", ""),
        (b"Return-Path: < >\r\n\r\n", ""),
        (b"Subject: no return path\r\n\r\nReturn-Path: <body@x.test>\r\n", ""),
        # The first one counts (RFC 5321 §4.4: the delivering MTA puts it on top).
        (b"Return-Path: <first@x.test>\r\nReturn-Path: <second@x.test>\r\n\r\n", "first@x.test"),
        (b"Received: by x\r\nReturn-Path: <later@x.test>\r\n\r\n", "later@x.test"),
        # Folded (RFC 5322 §2.2.3), bare LF, a source route, a comment, no brackets.
        (b"Return-Path:\r\n <folded@x.test>\r\n\r\n", "folded@x.test"),
        (b"Return-Path: <lf@x.test>\nSubject: y\n\nbody\n", "lf@x.test"),
        (b"Return-Path: <@relay.test,@b.test:routed@x.test>\r\n\r\n", "routed@x.test"),
        (b"Return-Path: <c@x.test> (from the MTA)\r\n\r\n", "c@x.test"),
        (b"Return-Path: bare@x.test\r\n\r\n", "bare@x.test"),
        # Unparseable or unsendable: the null sender.
        (b"Return-Path: <a@x.test\r\n\r\n", ""),
        (b"Return-Path: <no-at-sign>\r\n\r\n", ""),
        (b"Return-Path: <a b@x.test>\r\n\r\n", ""),
        (b"Return-Path: <\xe9@x.test>\r\n\r\n", ""),  # Latin-1: not UTF-8, no address
        (b"Return-Path: <a@x.test> <b@x.test>\r\n\r\n", ""),
        (b'Return-Path: <"unterminated@x.test>\r\n\r\n', ""),
        (b"Return-Path: <a@x.test> trailing\r\n\r\n", ""),
        (b"Return-Path: <a@x.test> (unclosed comment\r\n\r\n", ""),
        (b"Return-Path: <@relay.test:>\r\n\r\n", ""),
        (b"Return-Path: <@relay.test x@y.test>\r\n\r\n", ""),
        # RFC 5321 §4.1.2 Quoted-string local parts, sent with the least quoting possible,
        # and RFC 6531 UTF-8 (issue 12: both were sent as <> before).
        (b'Return-Path: <"john doe"@partner.example>\r\n\r\n', '"john doe"@partner.example'),
        (b'Return-Path: <"john"@partner.example>\r\n\r\n', "john@partner.example"),
        (b'Return-Path: <"a\\"b"@x.test>\r\n\r\n', '"a\\"b"@x.test'),
        (b'Return-Path: <"a>b"@x.test>\r\n\r\n', '"a>b"@x.test'),
        (b"Return-Path: <\xc3\xa9@x.test>\r\n\r\n", "\xe9@x.test"),
        ("Return-Path: <jörg@müller.example>\r\n\r\n".encode(), "jörg@müller.example"),
        (b"Return-Path: <a@[192.0.2.1]> (literal)\r\n\r\n", "a@[192.0.2.1]"),
        (b"Return-Path: <@[192.0.2.9],@b.test:r@x.test>\r\n\r\n", "r@x.test"),
        # A header-like line after the empty line is body, not header.
        (b"\r\nReturn-Path: <body@x.test>\r\n", ""),
        (b"Return-Path-Extra: <no@x.test>\r\n\r\n", ""),
        (b"X-Return-Path: <no@x.test>\r\n\r\n", ""),
        (b"", ""),
        # No empty line at all: the whole thing is the header block.
        (b"Return-Path: <only@x.test>", "only@x.test"),
    ],
)
def test_envelope_sender_return_path(raw: bytes, sender: str) -> None:
    assert envelope_sender(raw, SenderPolicy.RETURN_PATH) == (sender, False)


def test_envelope_sender_null_and_fixed() -> None:
    raw = b"Return-Path: <a@example.test>\r\n\r\nx\r\n"
    assert envelope_sender(raw, SenderPolicy.NULL) == ("", True)
    assert envelope_sender(raw, SenderPolicy.NULL, "ignored@x.test") == ("", True)
    assert envelope_sender(raw, SenderPolicy.FIXED, "relay@firma.local") == (
        "relay@firma.local",
        True,
    )
    with pytest.raises(ValueError, match="fixed_address"):
        envelope_sender(raw, SenderPolicy.FIXED)


def test_envelope_sender_reads_only_the_header_block() -> None:
    # A 30 MB body after the headers must not be scanned line by line or parsed.
    raw = b"Return-Path: <big@x.test>\r\nSubject: big\r\n\r\n" + b"A" * 30_000_000
    start = time.perf_counter()
    for _ in range(100):
        assert envelope_sender(raw, SenderPolicy.RETURN_PATH) == ("big@x.test", False)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------
# address_problem
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "a@example.test",
        "first.last+tag@sub.example.test",
        "o'brien@x.test",
        "postmaster@localhost",
        "a@[192.0.2.1]",
        "a@[IPv6:2001:db8::1]",
        "x_y-z=1@x-y.test",
        '"quoted local"@x.test',  # RFC 5321 §4.1.2 Quoted-string
        '"a\\"b"@x.test',
        '"needless"@x.test',
        "\xe9@x.test",  # RFC 6531 §3.3
        "a@ex\xe4mple.test",
        "a..b@x.test",  # outside RFC 5321, but real and taken by MTAs
    ],
)
def test_address_ok(address: str) -> None:
    assert address_problem(address, utf8=True) is None
    # Without utf8 only ASCII passes: UTF-8 needs SMTPUTF8 (RFC 6531 §3.3).
    assert (address_problem(address) is None) == address.isascii()


@pytest.mark.parametrize(
    "address",
    [
        "no-at",
        "@x.test",
        "a@",
        "a b@x.test",
        "a@x .test",
        "<a@x.test>",
        "Name <a@x.test>",
        "bad\r\nRCPT TO:<x@y.test>",  # aiosmtplib would silently send x@y.test
        "a@x.test\r\n",
        '"quoted@x.test',
        '"a"b"@x.test',
        '"tab\there"@x.test',
        '"nul\x00"@x.test',
        "\udce9@x.test",  # an 8-bit byte that was not UTF-8 (surrogate escape)
        "a\u00a0b@x.test",  # a no-break space
        "a@x\u200b.test",  # a zero-width space
        "a,b@x.test",
        "a@x..test",
        "a@-x_y.test",
        "x" * 65 + "@x.test",
        "a@" + "d" * 260 + ".test",
    ],
)
def test_address_refused(address: str) -> None:
    assert address_problem(address, utf8=True) is not None


@pytest.mark.parametrize(
    "address",
    ["jürgen@bücher.example", "δοκιμή@παράδειγμα.δοκιμή", "用户@例子.广告", "a@exämple.test"],
)
def test_utf8_address_ok_only_where_utf8_is_allowed(address: str) -> None:
    """RFC 6531 §3.3: UTF-8 in a Mailbox, for an envelope (SMTPUTF8); never by default."""
    assert address_problem(address, utf8=True) is None
    assert address_problem(address) == "not ASCII"


@pytest.mark.parametrize(
    "address",
    [
        "j\u0085@x.test",  # a C1 control (NEL)
        "a\u2028b@x.test",  # LINE SEPARATOR
        "a\u00a0b@x.test",  # NO-BREAK SPACE
        "ü" * 33 + "@x.test",  # 66 octets: over RFC 5321 §4.5.3.1.1's 64
        "ü@x..test",
        "<ü@x.test>",
    ],
)
def test_utf8_address_refused(address: str) -> None:
    assert address_problem(address, utf8=True) is not None


ASCII_ENVELOPE = Envelope("a@x.test", ("b@x.test",), sender_fixed=False)


@pytest.mark.parametrize(
    ("raw", "needed"),
    [
        (b"Subject: K\xc3\xb6ln\r\n\r\nbody\r\n", True),
        (b"Subject: x\r\nX-Raw: \xff\r\n\r\n", True),  # 8-bit, not even UTF-8: still 8-bit
        (b"Subject: x\r\nX: \xc3\xb6", True),  # headers only, no empty line
        (b"Subject: x\r\n\r\nK\xc3\xb6ln\r\n", False),  # 8-bit body only: 8BITMIME
        (b"Subject: x\n\nK\xc3\xb6ln\n", False),  # bare LF
        (b"\r\nSubject: K\xc3\xb6ln\r\n", False),  # no header block at all
        (b"Subject: x\r\n\r\n", False),
    ],
)
def test_needs_smtputf8_looks_at_the_header_block(raw: bytes, needed: bool) -> None:
    assert needs_smtputf8(raw, ASCII_ENVELOPE) is needed


def test_needs_smtputf8_for_any_utf8_envelope_address() -> None:
    raw = b"Subject: x\r\n\r\n"
    assert needs_smtputf8(raw, Envelope("jü@x.test", ("b@x.test",), sender_fixed=False))
    assert needs_smtputf8(raw, Envelope("", ("b@x.test", "zoë@x.test"), sender_fixed=True))


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


# ------------------------------------------------------------------------------------------
# DATA content: what we write instead of aiosmtplib's sendmail()
# ------------------------------------------------------------------------------------------


def aiosmtplib_content(message: bytes) -> bytes:
    """What aiosmtplib 5.1 writes after DATA's 354 (SMTPProtocol.execute_data_command)."""
    normalised = normalize_message_line_endings(message)
    return PERIOD_REGEX.sub(b"..", normalised) + b".\r\n"


def our_content(trace: bytes, raw: bytes) -> tuple[bytes, int]:
    parts, size = prepare_content((trace, raw))
    return b"".join(content_pieces(parts)), size


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b".",
        b".\r\n",
        b"..\r\n.\r\n",
        b"Subject: x\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast",
        b"no final line end",
        b"bare LF\nand .dot after it\n",
        b"bare CR\rand CRLF\r\n.x\r",
        b"\r\n\r\n",
        b"\n.\n",
        b"x\r",
        b"trailing CR then dot\r.\r\n",
    ],
)
@pytest.mark.parametrize("trace", [b"", b"Received: from a by b; now\r\n", b"Odd: bare\n"])
def test_content_matches_aiosmtplib(trace: bytes, raw: bytes) -> None:
    content, size = our_content(trace, raw)
    assert content == aiosmtplib_content(trace + raw)
    # RFC 1870 SIZE: aiosmtplib counted the normalised message, final CRLF included.
    assert size == len(normalize_message_line_endings(trace + raw))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"\xff", b" "])).map(
        b"".join
    ),
    st.lists(st.sampled_from([b"\r\n", b".", b"R"])).map(b"".join),
)
def test_content_matches_aiosmtplib_for_any_bytes(raw: bytes, trace: bytes) -> None:
    content, size = our_content(trace, raw)
    assert content == aiosmtplib_content(trace + raw)
    assert size == len(normalize_message_line_endings(trace + raw))


def test_crlf_content_is_sliced_not_copied() -> None:
    # Three 1 MiB runs between dot lines, plus a tail: every piece of the message is a view
    # of it (no copy), at most 1 MiB long; the inserted dots are the only new bytes.
    chunk = b"x" * (1024 * 1024 - 2) + b"\r\n"
    raw = b"Subject: big\r\n\r\n" + (chunk + b".dot\r\n") * 3 + chunk * 2
    parts, size = prepare_content((b"Received: x\r\n", raw))
    assert parts[1] is raw
    assert size == len(raw) + len(b"Received: x\r\n")
    pieces = list(content_pieces(parts))
    views = [p for p in pieces if isinstance(p, memoryview)]
    assert all(v.obj is raw or v.obj is parts[0] for v in views)
    assert max(len(p) for p in pieces) <= 1024 * 1024
    assert [p for p in pieces if isinstance(p, bytes)] == [b".", b".", b".", b".\r\n"]
    assert b"".join(pieces) == aiosmtplib_content(b"Received: x\r\n" + raw)
