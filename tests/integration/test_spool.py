"""The spool path end to end (docs/design.md §5.3): real Dovecot (POP3, and IMAP for the IMAP
dead-letter store) and aiosmtpd playing Exchange.

The awkward shapes of issue 17 (lines starting with ".", bare LF, no final newline, a
200,000-character line, a body that is only ".") arrive byte for byte through the spool as
they do through memory; a spooled message's dead letter is its bytes after our header lines
(the stores given a spool file: test_deadletter_maildir.py, test_deadletter_reconcile.py in
tests/unit, test_deadletter_imap.py here); a spool file a kill left is gone after the next start;
accounts polled together wait for the memory budget (docs/design.md §10.6) rather than exceed it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope

from connector.config import load_settings
from connector.deadletter import (
    DeadLetterInfo,
    strip_dead_letter_headers,
)
from connector.runtime import build_runtime
from connector.service import open_service
from connector.spool import READ_CHUNK
from tests.integration.conftest import Setup, strip_trace
from tests.servers import DovecotServer

pytestmark = pytest.mark.integration

WHEN = dt.datetime(2026, 11, 27, 15, 49, 35, tzinfo=dt.UTC)
INFO = DeadLetterInfo("info", "u-big", "data", "554 5.7.1 too big for us", WHEN)
LONG = b"A" * 200_000
BIG = (b"QUJD" * 19 + b"\r\n") * (5 * 1024 * 1024 // 78)  # ~5 MiB of base64


def padded(head: bytes, length: int) -> bytes:
    """``head`` and whole CRLF lines of filler, ``length`` octets in all."""
    n = length - len(head)
    lines, rest = divmod(n, 78)
    if rest == 1:  # no room for a line of its own: one line is longer
        lines, rest = lines - 1, 79
    last = b"y" * (rest - 2) + b"\r\n" if rest else b""
    out = head + (b"x" * 76 + b"\r\n") * lines + last
    assert len(out) == length
    assert out.endswith(b"\n")
    return out


# Where a spool file is cut when DATA reads it: a line starting with "." just after the cut,
# and a CRLF cut in two in a message that has a lone CR too (so its line ends are normalised
# chunk by chunk: the CR before the cut must pair with the LF after it; Dovecot sends a bare
# LF as CRLF already).
DOT_AT_THE_CUT = padded(b"Subject: a dot line at the cut\r\n\r\n", READ_CHUNK) + (
    b".starts the second chunk\r\n..\r\nend\r\n"
)
CRLF_CUT = padded(b"Subject: CRLF cut in two\r\n\r\na lone CR\rin a line\r\n", READ_CHUNK - 5) + (
    b"abcd\r\n.x\r\nend\r\n"
)
assert DOT_AT_THE_CUT[READ_CHUNK : READ_CHUNK + 1] == b"."
assert CRLF_CUT[READ_CHUNK - 1 : READ_CHUNK + 1] == b"\r\n"

# (what goes into the Maildir, what must come out of SMTP after our Received: line)
AWKWARD = [
    (b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n...\r\n", None),
    (
        b"Subject: bare LF\n\nline one\n.dot\nline two\n",
        b"Subject: bare LF\r\n\r\nline one\r\n.dot\r\nline two\r\n",
    ),
    (
        b"Subject: no final newline\r\n\r\nlast line",
        b"Subject: no final newline\r\n\r\nlast line\r\n",
    ),
    (b"Subject: long line\r\n\r\n" + LONG + b"\r\n.after\r\n" + LONG, None),
    (b"Subject: only a dot\r\n\r\n.\r\n", None),
    (b"Subject: big\r\n\r\n" + BIG, None),
    (DOT_AT_THE_CUT, None),
    (CRLF_CUT, CRLF_CUT.replace(b"lone CR\r", b"lone CR\r\n")),
]


def expected(pair: tuple[bytes, bytes | None]) -> bytes:
    stored, out = pair
    return out if out is not None else stored if stored.endswith(b"\n") else stored + b"\r\n"


def spool_dir(s: Setup) -> Path:
    return s.state_dir / "spool"


@pytest.mark.parametrize("threshold", ["1", "64KiB", "256MiB"])
def test_awkward_messages_arrive_byte_for_byte_through_the_spool_as_through_memory(
    setup_factory: Callable[..., Setup], threshold: str
) -> None:
    # "1": every message spooled; "64KiB": the long and big ones; "256MiB": none (memory).
    s = setup_factory(service_extra=f'spool_threshold = "{threshold}"')
    s.dovecot.deliver_many(s.user, [stored for stored, _ in AWKWARD])
    assert s.run("once") == 0
    got = [strip_trace(m.data) for m in s.received()]
    assert len(got) == len(AWKWARD)
    for g, pair in zip(got, AWKWARD, strict=True):
        assert g == expected(pair), (len(g), g[:40])
    assert s.upstream() == []
    assert list(spool_dir(s).iterdir()) == []


def test_a_spooled_message_keeps_its_8bit_body_and_smtputf8_header_parameters(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory(service_extra='spool_threshold = "1"')
    raw = "Subject: Grüße\r\nFrom: Jörg <j@x.example>\r\n\r\nÄÖÜ\r\n".encode()
    s.dovecot.deliver_many(s.user, [raw, b"Subject: ascii\r\n\r\n" + b"\xe4" * 10 + b"\r\n"])
    assert s.run("once") == 0
    first, second = s.received()
    assert strip_trace(first.data) == raw
    assert "BODY=8BITMIME" in first.mail_options
    assert "SMTPUTF8" in first.mail_options
    assert "BODY=8BITMIME" in second.mail_options  # the 8-bit octets are in the body only
    assert "SMTPUTF8" not in second.mail_options


def test_the_dead_letter_of_a_spooled_message_is_its_bytes_after_our_lines(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory(service_extra='spool_threshold = "64KiB"')
    raw = AWKWARD[3][0] + b"\r\n"

    def refuse(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
        return "554 5.7.1 too big for us" if stage == "data" else None

    s.sink.handler.rule = refuse
    s.dovecot.deliver_many(s.user, [raw])
    assert s.run("once") == 0
    (dead,) = s.dead_letters()
    assert strip_dead_letter_headers(dead) == raw
    assert b"X-POP3-Connector-Stage: data\r\n" in dead[: dead.index(b"Subject:")]
    assert s.upstream() == []
    assert list(spool_dir(s).iterdir()) == []


def test_a_spool_file_a_kill_left_is_gone_after_the_next_start(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory()
    spool_dir(s).mkdir(parents=True)
    (spool_dir(s) / "msg-left-by-a-kill.eml").write_bytes(b"half a message")
    assert s.run("once") == 0
    assert list(spool_dir(s).iterdir()) == []


def test_accounts_polled_together_wait_for_the_memory_budget_instead_of_growing(
    setup_factory: Callable[..., Setup], dovecot: DovecotServer
) -> None:
    # Three accounts at once, a budget that holds one 50 kB message (or one spooled one,
    # charged the threshold): each RETR waits until the message before it, whichever
    # account's, is handled.  Every message still arrives, byte for byte.
    def mail(tag: str) -> list[bytes]:
        small = [
            f"Subject: {tag} {n}\r\n\r\n".encode() + (b"%d" % n) * 50_000 + b"\r\n"
            for n in range(4)
        ]
        return [*small, f"Subject: {tag} big\r\n\r\n".encode() + BIG[: 78 * 4000]]

    users = [dovecot.add_user() for _ in range(2)]
    extra = "".join(
        f"""
[[accounts]]
name = "acct{i}"
host = "127.0.0.1"
port = {dovecot.ports["pop3"]}
tls = "none"
username = "{user}"
password = "{password}"
deliver_to = ["info@firma.test"]
"""
        for i, (user, password) in enumerate(users)
    )
    s = setup_factory(
        service_extra='spool_threshold = "64KiB"\nmessage_memory_budget = "64KiB"\n'
        "max_parallel_accounts = 3",
        dead_letter=extra,
    )
    sent = {s.user: mail(s.user)} | {user: mail(user) for user, _ in users}
    for user, raws in sent.items():
        s.dovecot.deliver_many(user, raws)
    runtime = build_runtime(load_settings(s.config))
    assert runtime.memory_budget == 64 * 1024

    async def once() -> tuple[int, int, list[int]]:
        async with open_service(runtime) as service:
            results = await service.run_once()
            return service.budget.peak, service.budget.in_use, [r.stats.delivered for r in results]

    peak, in_use, delivered = asyncio.run(asyncio.wait_for(once(), 60))
    assert delivered == [5, 5, 5]
    assert 50_000 < peak <= 64 * 1024  # charged, and never more than the budget at once
    assert in_use == 0  # all given back
    got = sorted(strip_trace(m.data) for m in s.received())
    assert got == sorted(raw for raws in sent.values() for raw in raws)
    assert list(spool_dir(s).iterdir()) == []
