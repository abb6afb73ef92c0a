"""The ``Received:`` trace line a cycle adds at the top of every message it delivers."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

# RFC 1939 §7: a unique-id is 1-70 characters in 0x21-0x7E.  We put it in the Received: header only
# when it is a safe atom, so that a hostile UIDL can never break the header's syntax.
_SAFE_ATOM = re.compile(rb"^[A-Za-z0-9._+=/-]{1,70}$")


def trace_header(
    raw: bytes,
    *,
    pop_host: str,
    by_host: str,
    uidl: str,
    recipients: Sequence[str],
    now: datetime,
    protocol: str = "POP3",
) -> bytes:
    """The ``Received:`` line we add at the top (RFC 5321 §4.4), in the message's own line ending.

    It says where the message came from (the POP3 or IMAP host) and when we took it, as
    fetchmail's does, so Exchange's message trace shows the hop.  An IMAP key
    (``imap:<UIDVALIDITY>:<UID>``) appears as ``imap.<UIDVALIDITY>.<UID>``: ":" is no atom
    character (RFC 5322 §3.2.3).
    """
    nl = raw.find(b"\n")
    eol = b"\n" if nl == 0 or (nl > 0 and raw[nl - 1] != 0x0D) else b"\r\n"
    if protocol != "POP3":
        uidl = uidl.replace(":", ".")
    uid = uidl.encode("ascii", "replace")
    ident = b" id " + uid if _SAFE_ATOM.match(uid) else b""
    rcpt = (
        b" for <" + recipients[0].encode("ascii", "replace") + b">" if len(recipients) == 1 else b""
    )
    return (
        b"Received: from "
        + pop_host.encode("ascii", "replace")
        + b" by "
        + by_host.encode("ascii", "replace")
        + b" with "
        + protocol.encode("ascii", "replace")
        + b" (pop3-connector)"
        + ident
        + eol
        + b"\t"
        + (rcpt.strip() + b"; " if rcpt else b"; ")
        + _date_field(int(now.timestamp()))
        + eol
    )


@functools.lru_cache(maxsize=4)
def _date_field(second: int) -> bytes:
    """RFC 5322 §3.3 date-time of a whole second, in UTC, formatted once for every message of
    that second (formatting it per message costs CPU: bench/README.md)."""
    return format_datetime(datetime.fromtimestamp(second, UTC)).encode("ascii")
