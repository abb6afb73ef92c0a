"""The exception tree of the connector, and the one classifier that decides what a failure means.

::

    ConnectorError
    ├── ConfigError                    bad settings; the CLI exits with EX_CONFIG (78)
    ├── Pop3Error                      the mail source (POP3, or IMAP for protocol = "imap")
    │   ├── Pop3ProtocolError          the server broke RFC 1939 / 3501 (framing, caps, nonsense)
    │   ├── Pop3ResponseError          -ERR: .command, .resp_code, .text
    │   │   ├── Pop3AuthError          -ERR to USER/PASS/APOP/AUTH
    │   │   └── ImapResponseError      NO or BAD: .status, .resp_code (RFC 5530)
    │   │       └── ImapAuthError      NO to LOGIN/AUTHENTICATE (also a Pop3AuthError)
    │   ├── Pop3ConnectionError        also a ConnectionError
    │   │   └── Pop3TlsError           handshake or certificate failure
    │   └── Pop3TimeoutError           also a TimeoutError
    ├── DeliveryError                  SMTP: .stage, .smtp_code, .enhanced_code, .text,
    │                                  .per_message, .evidence
    │   └── RefusedAlikeError          the circuit breaker: every message refused alike
    ├── DeadLetterError                the store failed: .store, .reason
    ├── StateError                     the state directory cannot be used (full, read-only)
    │   └── LedgerError                SQLite failed (also: locked by another process)
    └── AlreadyRunningError            another instance holds the state directory's lock

Every module translates its library's exceptions into these at its edge, so the policy code
(``cycle``, ``service``) never sees an ``aiosmtplib`` or ``ssl`` exception.  ``str()`` of each
is short, code first, and never carries a secret or a message body.

:func:`classify` is the single place that turns an exception into a :class:`Disposition`.  It is
pure and table-driven so that it can be tested exhaustively (tests/unit/test_errors.py).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Final

# --------------------------------------------------------------------------------------------
# Text from servers, for display
# --------------------------------------------------------------------------------------------

# What a terminal or log viewer acts on instead of showing: the C0 controls, DEL and the C1
# controls (Unicode category Cc: ESC starts an ANSI sequence, CR returns to the line's start,
# U+009B is a one-character CSI), the Unicode line and paragraph separators, and the
# bidirectional embeddings, overrides and isolates (Unicode TR #9 §2), which reorder a line.
_CONTROLS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    r"""``text`` with every control character shown as an escape, for logs and output.

    Text that came from a server (a POP3 ``-ERR``, an SMTP reply, an IMAP response) is hostile:
    an ESC or CR in it could rewrite an administrator's terminal.  Each control character
    becomes ``\xNN`` (``\uNNNN`` above U+00FF); everything else, non-ASCII letters included,
    stays as it is.  Idempotent: the result holds no control character.

    >>> printable("-ERR \x1b[2Jcycle ok\r")
    '-ERR \\x1b[2Jcycle ok\\x0d'
    """
    return _CONTROLS.sub(_escape, text)


class ConnectorError(Exception):
    """Base of every error the connector raises on purpose."""


class ConfigError(ConnectorError):
    """The configuration is invalid.  ``problems`` holds one line per problem, key path first."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class UsageError(ConfigError):
    """A command-line option's value that cannot be used (``--shard 5/2``, ``once --account``
    with a name this process does not poll): one line per problem, the option first.  The CLI
    reports it as such, not as a bad config file, and exits 78 as for one (README)."""


# --------------------------------------------------------------------------------------------
# POP3
# --------------------------------------------------------------------------------------------


class Pop3Error(ConnectorError):
    """Anything that went wrong talking to a POP3 server."""


class Pop3ProtocolError(Pop3Error):
    """The server's bytes do not follow RFC 1939 (or exceed one of our caps).

    After this error the connection is out of sync and must be closed, never reused.
    """


class Pop3ResponseError(Pop3Error):
    """The server answered ``-ERR``.

    ``resp_code`` is the RFC 2449 §8 response code in upper case (``"IN-USE"``, ``"AUTH"``,
    ``"SYS/TEMP"``), or ``None`` when the server sent none.
    """

    def __init__(self, command: str, text: str, resp_code: str | None = None) -> None:
        self.command = command
        # The server's words, escaped here once: every log line and output shows them.
        self.text = printable(text)
        self.resp_code = None if resp_code is None else printable(resp_code)
        super().__init__(command, self.text, self.resp_code)

    def __str__(self) -> str:
        code = f"[{self.resp_code}] " if self.resp_code else ""
        return f"-ERR {code}{self.text} (to {self.command})"


class Pop3AuthError(Pop3ResponseError):
    """``-ERR`` to USER, PASS, APOP or AUTH: the login failed."""


class ImapResponseError(Pop3ResponseError):
    """An IMAP server answered ``NO`` or ``BAD`` (RFC 3501 §7.1).

    A mail source's refusal like a POP3 ``-ERR``: ``resp_code`` is the response code in upper
    case (RFC 5530: ``AUTHENTICATIONFAILED``, ``UNAVAILABLE``, ``NONEXISTENT``), or None.
    """

    def __init__(
        self, command: str, text: str, resp_code: str | None = None, *, status: str = "NO"
    ) -> None:
        super().__init__(command, text, resp_code)
        self.status = status

    def __str__(self) -> str:
        code = f"[{self.resp_code}] " if self.resp_code else ""
        return f"{self.status} {code}{self.text} (to {self.command})"


class ImapAuthError(ImapResponseError, Pop3AuthError):
    """``NO`` to LOGIN or AUTHENTICATE: the login failed (a bare one counts like a bare
    ``-ERR`` at login, docs/design.md §6.3)."""


class Pop3ConnectionError(Pop3Error, ConnectionError):
    """The connection could not be made, or broke."""


class Pop3TlsError(Pop3ConnectionError):
    """TLS failed: a handshake error, an untrusted certificate, or STLS not offered."""


class Pop3TimeoutError(Pop3Error, TimeoutError):
    """A deadline for a POP3 phase passed (connect, command, idle read)."""


# --------------------------------------------------------------------------------------------
# SMTP
# --------------------------------------------------------------------------------------------


class SmtpStage(enum.StrEnum):
    """Where in the SMTP dialogue a delivery failed.

    The first group is session setup: a failure there is about our own relay configuration and
    never about a message (docs/design.md §6.1).  ``SIZE`` is our own check against the
    server's SIZE limit (RFC 1870), done before anything is sent.
    """

    CONNECT = "connect"
    TLS = "tls"
    EHLO = "ehlo"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    SIZE = "size"

    @property
    def is_setup(self) -> bool:
        """True for the stages before the first transaction (connect, TLS, EHLO, AUTH)."""
        return self in _SETUP_STAGES


_SETUP_STAGES: Final = frozenset({SmtpStage.CONNECT, SmtpStage.TLS, SmtpStage.EHLO, SmtpStage.AUTH})

# RFC 3463 §2: class.subject.detail; the class digit is 2, 4 or 5.
_ENHANCED_RE: Final = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


def split_enhanced_code(text: str) -> tuple[str | None, str]:
    """Split an RFC 3463 enhanced status code off the front of an SMTP reply text.

    >>> split_enhanced_code("5.1.0 Sender denied")
    ('5.1.0', 'Sender denied')
    >>> split_enhanced_code("Sender denied")
    (None, 'Sender denied')
    """
    m = _ENHANCED_RE.match(text)
    if m is None:
        return None, text
    code = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    return code, text[m.end() :].strip()


class Evidence(enum.StrEnum):
    """What testing showed about a 5xx to MAIL or RCPT: does it depend on the message?

    A refusal at MAIL of the message's own sender, or at RCPT of a recipient fixed in the
    config, may be about this message (a sender restriction; Postfix's default
    ``smtpd_delay_reject = yes`` answers one at RCPT) or about our setup (authentication or
    relay not granted, a wrong ``deliver_to``), and the reply text does not say which in any
    reliable way.  The delivery module finds out by testing (docs/design.md §6.2) and reports
    what it found here; :func:`classify` decides from it.

    NONE
        Nothing to test: the stage or the refused thing is the same for every message (a
        fixed envelope sender, session setup, DATA), or a ``530`` (RFC 4954 §6: authentication
        required, our setup whatever the message).
    SESSION
        Shown by this SMTP session: another sender was accepted at MAIL, or the refused
        recipient was accepted for another sender.  The refusal depends on the message.
    PROBE_ACCEPTED
        A probe on the same connection with another sender (``MAIL FROM:<>``, and
        ``RCPT TO:<the recipient>`` for RCPT) was accepted: it depends on the message.
    PROBE_REFUSED
        The probe was refused too: the server refuses every sender alike, our setup.
    PROBE_FAILED
        The probe could not be made (timeout, dropped connection, 4xx): we do not know yet.
    NO_PROBE
        The refused sender was the null sender and no other sender was accepted in this
        session to probe with: we do not know yet.
    LOCAL
        Refused by us before anything was sent, for the message's own data (an envelope
        sender we would not send as it is).
    """

    NONE = "none"
    SESSION = "session"
    PROBE_ACCEPTED = "probe-accepted"
    PROBE_REFUSED = "probe-refused"
    PROBE_FAILED = "probe-failed"
    NO_PROBE = "no-probe"
    LOCAL = "local"

    @property
    def shows_message(self) -> bool:
        """True when the evidence shows that the refusal depends on the message."""
        return self in _SHOWS_MESSAGE

    @property
    def rank(self) -> int:
        """How strongly this evidence speaks for the message; of several recipients refused,
        the weakest decides (a single one that our setup refuses stops the cycle)."""
        return _RANK[self]


_SHOWS_MESSAGE: Final = frozenset({Evidence.SESSION, Evidence.PROBE_ACCEPTED, Evidence.LOCAL})
_RANK: Final[Mapping[Evidence, int]] = {
    Evidence.NONE: 0,
    Evidence.PROBE_REFUSED: 0,
    Evidence.NO_PROBE: 1,
    Evidence.PROBE_FAILED: 2,
    Evidence.PROBE_ACCEPTED: 3,
    Evidence.SESSION: 4,
    Evidence.LOCAL: 4,
}

# RFC 4954 §6: "530 5.7.0 Authentication required".  Whatever the message, our setup.
AUTH_REQUIRED: Final = 530


class DeliveryError(ConnectorError):
    """SMTP did not accept a message, or the session could not be set up.

    ``per_message`` says whether the refused thing is taken from this message (its own
    Return-Path at MAIL, a recipient read from a shared mailbox's message at RCPT, DATA and
    after, the size check) or is the same for every message (a fixed envelope sender, a
    recipient fixed in the config, the session setup).  At MAIL (the message's own sender)
    and at RCPT (a recipient fixed in the config) that alone does not show whether a 5xx
    depends on the message; ``evidence`` says what testing showed (:class:`Evidence`).  The
    delivery module knows both, so it sets them; :func:`classify` only reads them.

    ``smtp_code`` is ``None`` for timeouts, dropped connections and TLS failures.  ``security``
    marks a TLS or authentication failure that no retry will fix (an untrusted certificate,
    STARTTLS or AUTH required but not offered): it needs an administrator.
    """

    def __init__(
        self,
        stage: SmtpStage,
        text: str,
        *,
        smtp_code: int | None = None,
        enhanced_code: str | None = None,
        per_message: bool = False,
        security: bool = False,
        refused: Mapping[str, str] | None = None,
        evidence: Evidence = Evidence.NONE,
    ) -> None:
        self.stage = stage
        self.text = printable(text)  # the server's words: escaped once, here
        self.smtp_code = smtp_code
        self.enhanced_code = enhanced_code
        self.per_message = per_message
        self.security = security
        # At RCPT, when every recipient was refused: recipient -> "550 5.1.1 text", so that a
        # dead letter can name each of them (and ``requeue`` send it to them).
        self.refused: Mapping[str, str] = {r: printable(t) for r, t in (refused or {}).items()}
        self.evidence = evidence
        super().__init__(stage, self.text, smtp_code, enhanced_code)

    @property
    def response(self) -> str:
        """The server's answer as one line: ``554 5.1.0 Sender denied``, or our own text."""
        parts = [
            str(self.smtp_code) if self.smtp_code is not None else "",
            self.enhanced_code or "",
        ]
        parts.append(self.text)
        return " ".join(p for p in parts if p)

    def __str__(self) -> str:
        return f"{self.response} (at {self.stage})"


class RefusedAlikeError(DeliveryError):
    """The circuit breaker (docs/design.md §6.2) held mail upstream: messages were refused alike
    at MAIL or RCPT, one after another, and no message got past that stage; only probes said that
    the refusals were about the messages.  A guard against our own misjudgement: the account is
    marked failing (``per_message`` is False: PARK_ACCOUNT) and an administrator looks at the
    SMTP target.  ``last`` is the latest refusal; ``held`` counts the messages left upstream.
    """

    def __init__(self, last: DeliveryError, held: int) -> None:
        super().__init__(
            last.stage,
            last.text,
            smtp_code=last.smtp_code,
            enhanced_code=last.enhanced_code,
            refused=last.refused,
        )
        self.held = held

    def __str__(self) -> str:
        return (
            f"every message refused alike: check the SMTP target ({self.response} at "
            f"{self.stage}; {self.held} message(s) left upstream)"
        )


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


class DeadLetterError(ConnectorError):
    """The dead-letter store could not take a message durably; the message stays upstream."""

    def __init__(self, store: str, reason: str) -> None:
        self.store = store
        self.reason = printable(reason)  # may quote the IMAP server: escaped once, here
        super().__init__(store, self.reason)

    def __str__(self) -> str:
        return f"dead-letter store {self.store}: {self.reason}"


class StateError(ConnectorError):
    """The state directory cannot be used: its file system is full or read-only, or a file in
    it cannot be written.  The text names the file and what to check; at start the CLI exits
    with EX_IOERR (74) and that one line, no traceback."""


class LedgerError(StateError):
    """The SQLite ledger failed (disk full, read-only, locked by another process, corrupt)."""


class AlreadyRunningError(ConnectorError):
    """Another pop3-connector holds the state directory: two would deliver every message twice."""


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


class Disposition(enum.Enum):
    """What to do about a failure.

    RETRY
        Transient.  For an SMTP transaction: defer this message and reconnect for the next.
        Anywhere else: end the account's cycle and try again at the next interval, with backoff.
    DEAD_LETTER
        Permanent, and about this message only: move it to the dead-letter store.
    PARK_ACCOUNT
        Permanent for the account (credentials, relay setup, a fixed recipient refused): end
        the cycle, mark the account failing, retry at a slower pace, never dead-letter.
    BUG
        Not a failure we know: log it with its traceback and let it propagate.
    """

    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    PARK_ACCOUNT = "park_account"
    BUG = "bug"


# RFC 2449 §8.1.2 / RFC 3206: these codes say "try again later".
_POP3_TRANSIENT_CODES: Final = frozenset({"SYS/TEMP", "IN-USE", "LOGIN-DELAY"})
# RFC 3206 §4 and §5: credentials wrong, or a permanent system problem.
_POP3_PERMANENT_CODES: Final = frozenset({"AUTH", "SYS/PERM"})
# RFC 5530 §3: what an administrator must fix (credentials, permissions, a folder that does not
# exist, TLS the server insists on), for an IMAP account; every other NO or BAD is RETRY, as
# a bare -ERR (UNAVAILABLE, INUSE, LIMIT, SERVERBUG say so outright).
_IMAP_PERMANENT_CODES: Final = frozenset(
    {
        "AUTHENTICATIONFAILED",
        "AUTHORIZATIONFAILED",
        "EXPIRED",
        "PRIVACYREQUIRED",
        "CONTACTADMIN",
        "NOPERM",
        "NONEXISTENT",
    }
)


def classify(exc: BaseException) -> Disposition:
    """Decide what a failure means.  Pure: depends only on the exception's type and fields.

    The rules are docs/design.md §6.1.  In short:

    * POP3: ``[SYS/TEMP]``, ``[IN-USE]``, ``[LOGIN-DELAY]``, protocol errors, timeouts and broken
      connections are RETRY; ``[AUTH]``, ``[SYS/PERM]`` and certificate failures are
      PARK_ACCOUNT.  A bare ``-ERR`` at login is RETRY; the service caps how often in a row.
      IMAP alike: ``NO [AUTHENTICATIONFAILED]`` and the other codes of RFC 5530 that need an
      administrator are PARK_ACCOUNT, any other ``NO``/``BAD`` RETRY.
    * SMTP setup (connect, TLS, EHLO, AUTH): a 5xx, a ``security`` failure or a refused login is
      PARK_ACCOUNT; anything transient there is RETRY.  Neither ever dead-letters.
    * SMTP transaction: a 552 to RCPT counts as 452 (RFC 5321 §4.5.3.1.10); the class digit of an
      enhanced code (RFC 3463 §3.1) wins over the basic code; 4xx, timeouts and drops are RETRY;
      5xx is DEAD_LETTER when the refused thing is about this message, else PARK_ACCOUNT.  At
      MAIL and RCPT "about this message" must be shown by testing (``evidence``, see
      :class:`Evidence` and :func:`_classify_envelope`); a ``530`` never is.
    * Dead-letter store and ledger failures are RETRY: the message stays upstream.
    """
    match exc:
        case ImapResponseError(resp_code=code) if code in _IMAP_PERMANENT_CODES:
            return Disposition.PARK_ACCOUNT
        case ImapResponseError():
            return Disposition.RETRY
        case Pop3AuthError(resp_code=code) if code in _POP3_PERMANENT_CODES:
            return Disposition.PARK_ACCOUNT
        case Pop3ResponseError(resp_code=code) if code in _POP3_TRANSIENT_CODES:
            return Disposition.RETRY
        case Pop3ResponseError(resp_code="SYS/PERM"):
            return Disposition.PARK_ACCOUNT
        case Pop3TlsError():
            return Disposition.PARK_ACCOUNT
        case Pop3Error():
            return Disposition.RETRY
        case DeliveryError():
            return _classify_delivery(exc)
        case DeadLetterError() | StateError():
            return Disposition.RETRY
        case ConfigError():
            return Disposition.PARK_ACCOUNT
        case _:
            return Disposition.BUG


def smtp_class(code: int | None, enhanced_code: str | None, stage: SmtpStage) -> int | None:
    """The reply class (2, 3, 4 or 5) that decides an SMTP answer, or None without a code.

    RFC 5321 §4.5.3.1.10: a 552 to RCPT was historically "too many recipients", to be treated
    as 452.  RFC 3463 §3.1: the enhanced code's class digit is the more specific statement.
    """
    if code is None:
        return None
    if stage is SmtpStage.RCPT and code == 552:
        code = 452
    if enhanced_code and _ENHANCED_RE.match(enhanced_code):
        return int(enhanced_code[0])
    return code // 100


def _classify_delivery(exc: DeliveryError) -> Disposition:
    cls = smtp_class(exc.smtp_code, exc.enhanced_code, exc.stage)
    if exc.stage.is_setup:
        # A wrong relay setup refuses every message alike: never a dead letter
        # (docs/design.md §6.1).
        if exc.security or cls == 5:
            return Disposition.PARK_ACCOUNT
        return Disposition.RETRY
    if cls == 5 and exc.smtp_code == AUTH_REQUIRED:
        # RFC 4954 §6: "530 5.7.0 Authentication required" (Exchange: "530 5.7.1 Client was not
        # authenticated") is what every sender gets, whatever the message (docs/design.md §6.1).
        return Disposition.PARK_ACCOUNT
    if cls == 5 and exc.stage in (SmtpStage.MAIL, SmtpStage.RCPT):
        return _classify_envelope(exc)
    if cls == 5:
        return Disposition.DEAD_LETTER if exc.per_message else Disposition.PARK_ACCOUNT
    # 4xx, 421, timeouts, drops, and any odd 2xx/3xx where a final answer was due: transient.
    return Disposition.RETRY


def _classify_envelope(exc: DeliveryError) -> Disposition:
    """A 5xx to MAIL or RCPT: a dead letter only when it depends on the message (docs/design.md
    §6.2).

    ``530`` is our setup whatever else is known (RFC 4954 §6).  A recipient read from the
    message is the message's own; a fixed envelope sender refused at MAIL would refuse every
    message.  Otherwise the evidence decides: shown to depend on the message, a dead letter;
    a probe that could not be made, a retry (the message is deferred); refused alike for
    another sender, or nothing to test with, our setup.
    """
    if exc.smtp_code == AUTH_REQUIRED:
        return Disposition.PARK_ACCOUNT
    if exc.per_message and exc.stage is SmtpStage.RCPT:
        return Disposition.DEAD_LETTER
    if not exc.per_message and exc.stage is SmtpStage.MAIL:
        return Disposition.PARK_ACCOUNT
    if exc.evidence.shows_message:
        return Disposition.DEAD_LETTER
    if exc.evidence is Evidence.PROBE_FAILED:
        return Disposition.RETRY
    return Disposition.PARK_ACCOUNT
