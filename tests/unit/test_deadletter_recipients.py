"""The optional sixth dead-letter header line, ``X-POP3-Connector-Recipients`` (shared mailboxes).

Round trips through with/parse/strip (CRLF and LF), the unchanged five-line block of
docs/design.md §7.1 when there are no recipients, header injection through recipient text, a
message that itself starts with a Recipients line, and the Maildir store's list/get of such a
dead letter.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.deadletter import (
    DeadLetterInfo,
    dead_letter_headers,
    parse_dead_letter_headers,
    strip_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.deadletter.maildir import MaildirStore

WHEN = dt.datetime(2026, 11, 27, 15, 49, 35, tzinfo=dt.UTC)
RECIPIENTS = ("bob@firma.local", "alice@firma.local")
INFO = DeadLetterInfo("catchall", "uid-1", "rcpt", "550 5.1.1 no such user", WHEN, RECIPIENTS)
PLAIN = DeadLetterInfo("catchall", "uid-1", "rcpt", "550 5.1.1 no such user", WHEN)
MESSAGE = b"From: a@example.org\r\nTo: bob@firma.example\r\nSubject: hi\r\n\r\nbody\r\n"
# docs/design.md §7.1: the five lines, in this order, nothing else.
FIVE = (
    b"X-POP3-Connector-Account: catchall\r\n"
    b"X-POP3-Connector-UIDL: uid-1\r\n"
    b"X-POP3-Connector-Stage: rcpt\r\n"
    b"X-POP3-Connector-Response: 550 5.1.1 no such user\r\n"
    b"X-POP3-Connector-Failed-At: 2026-11-27T15:49:35Z\r\n"
)
SIXTH = b"X-POP3-Connector-Recipients: bob@firma.local, alice@firma.local\r\n"


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_round_trip_with_recipients(eol: bytes) -> None:
    raw = MESSAGE.replace(b"\r\n", eol)
    wrapped = with_dead_letter_headers(raw, INFO)
    assert wrapped == (SIXTH + FIVE).replace(b"\r\n", eol) + raw
    assert strip_dead_letter_headers(wrapped) == raw
    head = (SIXTH + FIVE).replace(b"\r\n", eol)
    assert parse_dead_letter_headers(wrapped) == (INFO, len(head))


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_without_recipients_the_block_is_exactly_the_five_lines(eol: bytes) -> None:
    raw = MESSAGE.replace(b"\r\n", eol)
    assert dead_letter_headers(PLAIN, eol) == FIVE.replace(b"\r\n", eol)
    wrapped = with_dead_letter_headers(raw, PLAIN)
    assert wrapped == FIVE.replace(b"\r\n", eol) + raw
    assert parse_dead_letter_headers(wrapped) == (PLAIN, len(FIVE.replace(b"\r\n", eol)))
    assert strip_dead_letter_headers(wrapped) == raw


def test_a_single_recipient() -> None:
    one = DeadLetterInfo("a", "u", "rcpt", "550", WHEN, ("bob@firma.local",))
    wrapped = with_dead_letter_headers(MESSAGE, one)
    assert wrapped.startswith(b"X-POP3-Connector-Recipients: bob@firma.local\r\n")
    parsed = parse_dead_letter_headers(wrapped)
    assert parsed is not None
    assert parsed[0].recipients == ("bob@firma.local",)


def test_hostile_recipient_text_cannot_inject_a_header() -> None:
    evil = DeadLetterInfo(
        "catchall",
        "uid-1",
        "rcpt",
        "550",
        WHEN,
        ("bob@firma.local\r\nBcc: victim@example.org", "x\n\r\nbody", "caf\xe9\x00"),
    )
    wrapped = with_dead_letter_headers(MESSAGE, evil)
    block = wrapped[: -len(MESSAGE)]
    assert block.count(b"\n") == 6
    assert block.count(b"\r") == 6
    assert all(0x20 <= b < 0x7F for line in block.splitlines() for b in line)
    parsed_mail = email.message_from_bytes(wrapped, policy=email.policy.default)
    assert parsed_mail["Bcc"] is None
    assert parsed_mail["Subject"] == "hi"
    assert strip_dead_letter_headers(wrapped) == MESSAGE
    parsed = parse_dead_letter_headers(wrapped)
    assert parsed is not None
    # Still one line: whatever the text was, it is a value of ours, not a header of its own.
    assert parsed[0].recipients[0] == "bob@firma.local Bcc: victim@example.org"


def test_message_starting_with_a_recipients_line_wrapped_with_recipients() -> None:
    own = b"X-POP3-Connector-Recipients: x\r\n" + MESSAGE
    wrapped = with_dead_letter_headers(own, INFO)
    assert strip_dead_letter_headers(wrapped) == own
    parsed = parse_dead_letter_headers(wrapped)
    assert parsed is not None
    assert parsed[0].recipients == RECIPIENTS
    assert wrapped[parsed[1] :] == own


def test_message_starting_with_a_recipients_line_wrapped_without_recipients() -> None:
    """docs/design.md §7.1: strip is the exact inverse of with, for any bytes.

    A message whose own first line is ``X-POP3-Connector-Recipients: ...`` (anyone can write
    such a header) wrapped with the five lines must come back whole, and its line must not be
    taken for ours: ``requeue`` would otherwise send the message to whomever it names.
    """
    own = b"X-POP3-Connector-Recipients: ceo@firma.local, all@firma.local\r\n" + MESSAGE
    wrapped = with_dead_letter_headers(own, PLAIN)
    parsed = parse_dead_letter_headers(wrapped)
    assert parsed is not None
    assert parsed[0].recipients == ()
    assert strip_dead_letter_headers(wrapped) == own


def test_requeued_dead_letter_refused_again_strips_one_layer() -> None:
    once = with_dead_letter_headers(MESSAGE, INFO)
    twice = with_dead_letter_headers(once, PLAIN)
    assert strip_dead_letter_headers(twice) == once
    assert strip_dead_letter_headers(strip_dead_letter_headers(twice)) == MESSAGE


def test_a_recipients_line_alone_is_not_ours() -> None:
    assert parse_dead_letter_headers(SIXTH + MESSAGE) is None
    assert strip_dead_letter_headers(SIXTH + MESSAGE) == SIXTH + MESSAGE
    # After the five it is the message's own first line: ours are the five, the rest stays.
    parsed = parse_dead_letter_headers(FIVE + SIXTH + MESSAGE)
    assert parsed is not None
    assert parsed[0].recipients == ()
    assert strip_dead_letter_headers(FIVE + SIXTH + MESSAGE) == SIXTH + MESSAGE


_ADDRESS = st.from_regex(r"[a-z0-9.+-]{1,20}@[a-z0-9-]{1,20}\.[a-z]{2,6}", fullmatch=True)


@given(
    raw=st.binary(max_size=500),
    recipients=st.lists(_ADDRESS, min_size=1, max_size=5).map(tuple),
    lf=st.booleans(),
)
def test_round_trip_for_any_message(raw: bytes, recipients: tuple[str, ...], lf: bool) -> None:
    if lf:
        raw = raw.replace(b"\r\n", b"\n")
    dl = DeadLetterInfo("a", "u", "rcpt", "550 5.1.1 x", WHEN, recipients)
    wrapped = with_dead_letter_headers(raw, dl)
    assert strip_dead_letter_headers(wrapped) == raw
    assert parse_dead_letter_headers(wrapped) == (dl, len(wrapped) - len(raw))


# --------------------------------------------------------------------------------------------
# Maildir store
# --------------------------------------------------------------------------------------------


async def test_maildir_list_and_get_with_recipients(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "dead-letters")
    with_rcpts = await store.put(MESSAGE, INFO)
    plain = await store.put(b"Subject: 2\n\nx\n", PLAIN)
    records = {r.id: r for r in await store.list()}
    assert set(records) == {with_rcpts, plain}
    # size is the original message's, without our six (or five) lines.
    assert records[with_rcpts].size == len(MESSAGE)
    assert records[plain].size == len(b"Subject: 2\n\nx\n")
    assert (records[with_rcpts].account, records[with_rcpts].response) == (
        "catchall",
        "550 5.1.1 no such user",
    )
    stored = await store.get(with_rcpts)
    assert stored == SIXTH + FIVE + MESSAGE
    parsed = parse_dead_letter_headers(stored)
    assert parsed is not None
    assert parsed[0].recipients == RECIPIENTS
    assert strip_dead_letter_headers(stored) == MESSAGE
    assert await store.count_by_account() == {"catchall": 2}
