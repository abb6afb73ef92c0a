"""What an IMAP refusal means (docs/design.md §15.4): classify() on IMAP's errors."""

from __future__ import annotations

import pytest

from connector.errors import (
    Disposition,
    ImapAuthError,
    ImapResponseError,
    Pop3AuthError,
    classify,
)


@pytest.mark.parametrize(
    ("exc", "disposition"),
    [
        (ImapAuthError("LOGIN", "no", "AUTHENTICATIONFAILED"), Disposition.PARK_ACCOUNT),
        (ImapAuthError("LOGIN", "no", "PRIVACYREQUIRED"), Disposition.PARK_ACCOUNT),
        (ImapAuthError("LOGIN", "busy", "UNAVAILABLE"), Disposition.RETRY),
        (ImapAuthError("LOGIN", "no", None), Disposition.RETRY),
        (ImapResponseError("SELECT", "gone", "NONEXISTENT"), Disposition.PARK_ACCOUNT),
        (ImapResponseError("SELECT", "ro", "NOPERM"), Disposition.PARK_ACCOUNT),
        (ImapResponseError("UID FETCH", "oops", "SERVERBUG"), Disposition.RETRY),
        (ImapResponseError("UID STORE", "locked", "INUSE"), Disposition.RETRY),
        (ImapResponseError("NOOP", "what", None, status="BAD"), Disposition.RETRY),
        # A POP3 code in an IMAP answer means nothing special.
        (ImapResponseError("LOGIN", "x", "SYS/PERM"), Disposition.RETRY),
    ],
)
def test_imap_refusals_are_classified(exc: Exception, disposition: Disposition) -> None:
    assert classify(exc) is disposition


def test_a_bare_no_at_login_counts_like_a_bare_err() -> None:
    exc = ImapAuthError("LOGIN", "Authentication failed.", None)
    assert isinstance(exc, Pop3AuthError)  # service._count_failure counts it
    assert str(exc) == "NO Authentication failed. (to LOGIN)"
