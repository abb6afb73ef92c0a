"""connector.deadletter: the header lines of a dead letter and the Recipients field (the contract
every store passes is tests/test_deadletter_contract.py; the Maildir store's own behaviour,
tests/unit/test_deadletter_maildir.py)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.deadletter import (
    HEADER_BLOCK_MAX,
    DeadLetterInfo,
    dead_letter_headers,
    header_block_continues,
    parse_dead_letter_headers,
    strip_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.errors import DeadLetterError
from connector.smtp import address_problem
from tests.fakes import InMemoryDeadLetterStore

WHEN = dt.datetime(2026, 11, 27, 15, 49, 35, tzinfo=dt.UTC)
INFO = DeadLetterInfo("info", "00000001650a1b2c", "data", "554 5.1.0 Sender denied", WHEN)
MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody line\r\n.\r\n..dots\r\n"
EXPECTED_HEADERS = (
    b"X-POP3-Connector-Account: info\r\n"
    b"X-POP3-Connector-UIDL: 00000001650a1b2c\r\n"
    b"X-POP3-Connector-Stage: data\r\n"
    b"X-POP3-Connector-Response: 554 5.1.0 Sender denied\r\n"
    b"X-POP3-Connector-Failed-At: 2026-11-27T15:49:35Z\r\n"
)


def info(account: str = "info", uidl: str = "u1", minute: int = 0) -> DeadLetterInfo:
    return DeadLetterInfo(
        account, uidl, "data", "554 5.1.0 Sender denied", WHEN.replace(minute=minute)
    )


# ============================================================================================
# The in-memory fake of tests/fakes.py
# ============================================================================================


async def test_fake_put_failure_switch() -> None:
    store = InMemoryDeadLetterStore()
    store.fail_put = True
    with pytest.raises(DeadLetterError):
        await store.put(MESSAGE, INFO)
    assert store.put_calls == 1
    assert await store.list() == []


# ============================================================================================
# Header helpers
# ============================================================================================


def test_headers_for_a_crlf_message() -> None:
    assert with_dead_letter_headers(MESSAGE, INFO) == EXPECTED_HEADERS + MESSAGE


def test_headers_for_an_lf_message() -> None:
    raw = MESSAGE.replace(b"\r\n", b"\n")
    assert with_dead_letter_headers(raw, INFO) == EXPECTED_HEADERS.replace(b"\r\n", b"\n") + raw


@pytest.mark.parametrize("raw", [b".", b"", b"\r\n", b"\n\nbody"])
def test_headers_for_degenerate_messages(raw: bytes) -> None:
    wrapped = with_dead_letter_headers(raw, INFO)
    eol = b"\r\n" if raw.startswith(b"\r\n") else b"\n"
    assert wrapped == EXPECTED_HEADERS.replace(b"\r\n", eol) + raw
    assert strip_dead_letter_headers(wrapped) == raw


def test_header_injection_is_impossible() -> None:
    evil = DeadLetterInfo(
        account="info\r\nBcc: victim@example.org",
        uidl="u1\nX-Injected: 1",
        stage="data\r",
        response="554 denied\r\n\r\nfake body\r\n.\r\nMAIL FROM:<x>",
        failed_at=WHEN,
    )
    wrapped = with_dead_letter_headers(MESSAGE, evil)
    block = wrapped[: -len(MESSAGE)]
    assert block.count(b"\n") == 5
    assert block.count(b"\r") == 5
    parsed = email.message_from_bytes(wrapped, policy=email.policy.default)
    assert parsed["Bcc"] is None
    assert parsed["X-Injected"] is None
    assert parsed["X-POP3-Connector-Account"] == "info Bcc: victim@example.org"
    assert parsed["X-POP3-Connector-Response"] == "554 denied fake body . MAIL FROM:<x>"
    assert parsed["Subject"] == "hi"
    assert strip_dead_letter_headers(wrapped) == MESSAGE


def test_values_become_printable_ascii() -> None:
    odd = DeadLetterInfo("café\x00\x7f", "u\u2028v", "data", "550 \U0001f4a9\t too   big ", WHEN)
    block = dead_letter_headers(odd, b"\n")
    assert block.splitlines()[0] == b"X-POP3-Connector-Account: caf\\xe9\\x00\\x7f"
    assert block.splitlines()[1] == b"X-POP3-Connector-UIDL: u v"
    assert block.splitlines()[3] == b"X-POP3-Connector-Response: 550 \\U0001f4a9 too big"


def test_long_values_are_cut_to_the_line_limit() -> None:
    block = dead_letter_headers(DeadLetterInfo("a", "u", "data", "5" * 5000, WHEN), b"\r\n")
    assert max(len(line) for line in block.split(b"\r\n")) <= 998  # RFC 5322 §2.1.1
    assert block.split(b"\r\n")[3].endswith(b"...")


def test_failed_at_is_utc_and_must_be_aware() -> None:
    plus_one = dt.timezone(dt.timedelta(hours=1))
    local = DeadLetterInfo(
        "a", "u", "data", "554", dt.datetime(2026, 11, 27, 16, 49, 35, tzinfo=plus_one)
    )
    assert dead_letter_headers(local, b"\n").endswith(b"Failed-At: 2026-11-27T15:49:35Z\n")
    naive = DeadLetterInfo("a", "u", "data", "554", dt.datetime(2026, 11, 27, 15, 49, 35))
    with pytest.raises(ValueError, match="timezone-aware"):
        dead_letter_headers(naive, b"\n")


def test_strip_leaves_other_messages_alone() -> None:
    assert strip_dead_letter_headers(MESSAGE) == MESSAGE
    # Only the five lines in our order are ours: a message starting with one of them keeps it.
    own = b"X-POP3-Connector-Account: someone\r\n" + MESSAGE
    assert strip_dead_letter_headers(own) == own
    # Dead-lettered twice (requeued, refused again): one strip undoes one wrap.
    twice = with_dead_letter_headers(with_dead_letter_headers(MESSAGE, INFO), info("x"))
    assert strip_dead_letter_headers(twice) == with_dead_letter_headers(MESSAGE, INFO)


def test_parse_needs_all_five_lines() -> None:
    wrapped = with_dead_letter_headers(MESSAGE, INFO)
    assert parse_dead_letter_headers(wrapped) == (INFO, len(EXPECTED_HEADERS))
    assert parse_dead_letter_headers(MESSAGE) is None
    assert parse_dead_letter_headers(wrapped.replace(b"2026-11-27T", b"2026-13-27T")) is None
    assert parse_dead_letter_headers(EXPECTED_HEADERS[:-60]) is None


@given(
    raw=st.binary(max_size=2000),
    values=st.tuples(st.text(), st.text(), st.text(), st.text()),
    when=st.datetimes(min_value=dt.datetime(1970, 1, 1), timezones=st.just(dt.UTC)),
)
def test_strip_undoes_with_for_any_bytes(
    raw: bytes, values: tuple[str, str, str, str], when: dt.datetime
) -> None:
    dl_info = DeadLetterInfo(*values, failed_at=when)
    wrapped = with_dead_letter_headers(raw, dl_info)
    assert wrapped.endswith(raw)
    assert strip_dead_letter_headers(wrapped) == raw
    head = wrapped[: len(wrapped) - len(raw)]
    lines = head.splitlines()
    assert len(lines) == 5
    assert all(all(0x20 <= b < 0x7F for b in line) for line in lines)
    parsed = parse_dead_letter_headers(wrapped)
    assert parsed is not None
    assert parsed[1] == len(head)
    assert parsed[0].failed_at == when.replace(microsecond=0)


# ============================================================================================
# The Recipients field: never cut, folded when long (RFC 5322 §2.2.3)
# ============================================================================================

# RFC 5321 §4.5.3.1: a 64-octet local part and a domain of 189, 254 octets in all.
LONGEST = "l" * 64 + "@" + "a" * 63 + "." + "b" * 63 + "." + "c" * 61


def addresses(n: int) -> tuple[str, ...]:
    """``n`` distinct addresses of 30 octets, the middle one replaced by a 254-octet one."""
    out = [f"user{i:04d}@department{i:03d}.example" for i in range(n)]
    out[n // 2] = LONGEST
    return tuple(out)


def recipients_info(recipients: tuple[str, ...]) -> DeadLetterInfo:
    return DeadLetterInfo("catchall", "u1", "rcpt", "550 5.1.1 no such user", WHEN, recipients)


def physical_lines(head: bytes, eol: bytes) -> list[bytes]:
    assert head.endswith(eol)
    lines = head[: -len(eol)].split(eol)
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    return lines


def test_the_test_addresses_could_go_on_an_smtp_envelope() -> None:
    assert len(LONGEST) == 254
    assert all(address_problem(a) is None for a in addresses(200))
    assert len(addresses(40)[0]) == 30


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
@pytest.mark.parametrize("n", [1, 2, 40, 200])
def test_recipients_round_trip_whole(n: int, eol: bytes) -> None:
    raw = MESSAGE.replace(b"\r\n", eol)
    dl = recipients_info(addresses(n))
    wrapped = with_dead_letter_headers(raw, dl)
    head = wrapped[: len(wrapped) - len(raw)]
    assert wrapped[len(head) :] == raw
    lines = physical_lines(head, eol)
    assert max(len(line) for line in lines) <= 998  # RFC 5322 §2.1.1
    assert lines[0].startswith(b"X-POP3-Connector-Recipients: ")
    assert lines[-5:] == physical_lines(dead_letter_headers(recipients_info(()), eol), eol)
    assert parse_dead_letter_headers(wrapped) == (dl, len(head))
    assert strip_dead_letter_headers(wrapped) == raw
    assert not header_block_continues(wrapped)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_a_long_list_is_folded_after_commas(eol: bytes) -> None:
    recipients = addresses(40)
    lines = physical_lines(dead_letter_headers(recipients_info(recipients), eol), eol)
    field = lines[:-5]
    assert len(field) > 1
    # Continuation lines start with a space; every line but the field's last ends in a comma.
    assert all(line.startswith(b" ") for line in field[1:])
    assert all(line.endswith(b",") for line in field[:-1])
    assert not field[-1].endswith(b",")
    # At most 78 octets (RFC 5322 §2.1.1 SHOULD), but for the line the 254-octet address is on.
    assert [len(line) <= 78 for line in field].count(False) == 1
    assert max(len(line) for line in field) == len(" " + LONGEST + ",")
    # Unfolding (RFC 5322 §2.2.3: remove the line ends) gives the one-line form.
    assert b"".join(field) == b"X-POP3-Connector-Recipients: " + ", ".join(recipients).encode()
    # And Python's email parser reads the same list.
    wrapped = with_dead_letter_headers(MESSAGE.replace(b"\r\n", eol), recipients_info(recipients))
    parsed = email.message_from_bytes(wrapped, policy=email.policy.default)
    value = str(parsed["X-POP3-Connector-Recipients"])
    assert tuple(a.strip() for a in value.split(",")) == recipients


def test_a_list_that_fits_stays_one_line() -> None:
    recipients = addresses(29)  # 28 * 32 + 254 + 29 octets: 1179 with the longest address
    recipients = tuple(a for a in recipients if a != LONGEST)  # 28 * 32 - 2 + 29 = 923
    block = dead_letter_headers(recipients_info(recipients), b"\r\n")
    assert block.count(b"\r\n") == 6
    assert block.startswith(b"X-POP3-Connector-Recipients: user0000@department000.example, ")


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
@pytest.mark.parametrize("own_first", [b" starts with a space", b"\tstarts with a tab"])
def test_a_message_starting_with_white_space_keeps_its_first_line(
    eol: bytes, own_first: bytes
) -> None:
    # Such a line after our block must never be unfolded into one of our fields.
    raw = own_first + eol + MESSAGE.replace(b"\r\n", eol)
    for dl in (recipients_info(addresses(40)), recipients_info(("a@b",)), INFO):
        wrapped = with_dead_letter_headers(raw, dl)
        assert parse_dead_letter_headers(wrapped) == (dl, len(wrapped) - len(raw))
        assert strip_dead_letter_headers(wrapped) == raw


def test_a_message_starting_with_a_folded_recipients_field_is_not_ours() -> None:
    own = dead_letter_headers(recipients_info(addresses(40)), b"\r\n")[:-1000] + MESSAGE
    assert own.startswith(b"X-POP3-Connector-Recipients: ")
    assert parse_dead_letter_headers(own) is None
    assert strip_dead_letter_headers(own) == own
    # Wrapped without recipients: ours are the five, its field is the message's own.
    wrapped = with_dead_letter_headers(own, INFO)
    assert parse_dead_letter_headers(wrapped) == (INFO, len(EXPECTED_HEADERS))
    assert strip_dead_letter_headers(wrapped) == own
    # Wrapped with recipients: ours are read, its own are not.
    dl = recipients_info(("a@b", "c@d"))
    wrapped = with_dead_letter_headers(own, dl)
    assert parse_dead_letter_headers(wrapped) == (dl, len(wrapped) - len(own))
    assert strip_dead_letter_headers(wrapped) == own


def test_a_head_cut_inside_the_recipients_field() -> None:
    wrapped = with_dead_letter_headers(MESSAGE, recipients_info(addresses(300)))
    assert len(wrapped) > HEADER_BLOCK_MAX
    head = wrapped[:HEADER_BLOCK_MAX]
    assert parse_dead_letter_headers(head) is None
    assert strip_dead_letter_headers(head) == head
    assert header_block_continues(head)
    # Cut in the middle of a continuation line, or right after one.
    for cut in (head.rfind(b"\n") + 1, head.rfind(b"\n") + 3):
        assert header_block_continues(wrapped[:cut])
    assert not header_block_continues(MESSAGE)
    assert not header_block_continues(wrapped)
    assert not header_block_continues(with_dead_letter_headers(MESSAGE, INFO)[:100])


def _address(local: str, local_len: int, domain_len: int) -> str:
    labels = ["d" * 63] * (domain_len // 64) + ["e" * (domain_len % 64 or 1)]
    return (local * local_len)[:local_len] + "@" + ".".join(labels)


# Addresses of any length an SMTP envelope allows, drawn by length (a regex strategy is too
# slow for 200 of them): a local part of 1-64 octets, a domain of up to 189, 254 in all.
_ADDRESS = st.builds(
    _address,
    st.sampled_from(["a", "B", "0", "x.y", "!#$%&'*+/=?^_`{|}~-"]),
    st.integers(1, 64),
    st.integers(1, 189),
)


@given(
    raw=st.binary(max_size=300),
    # The size drawn first: left to itself, st.lists stays short, below any folding.
    recipients=st.integers(1, 200).flatmap(
        lambda n: st.lists(_ADDRESS, min_size=n, max_size=n).map(tuple)
    ),
    eol=st.sampled_from([b"\r\n", b"\n"]),
)
def test_recipients_round_trip_for_any_list(
    raw: bytes, recipients: tuple[str, ...], eol: bytes
) -> None:
    raw = eol + raw if eol == b"\r\n" else b"x\n" + raw  # fixes the message's line end
    dl = recipients_info(recipients)
    wrapped = with_dead_letter_headers(raw, dl)
    head = wrapped[: len(wrapped) - len(raw)]
    assert max(len(line) for line in physical_lines(head, eol)) <= 998
    assert parse_dead_letter_headers(wrapped) == (dl, len(head))
    assert strip_dead_letter_headers(wrapped) == raw
