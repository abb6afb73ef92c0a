"""Every parser of message and server text, fed hostile values up to 1 MB: bounded time.

Issue 13 items 1 and 2: a ``To:`` of some hundred nested ``(`` made ``email.utils`` raise
``RecursionError`` (the process exited, and again after each restart), and the Return-Path
pattern took seconds on ``<`` and white space.  The property here: for any header value up to
1 MB, generated in the shapes that break parsers (nested and unbalanced parentheses, runs of
``<`` with white space, quotes, backslashes, long folding, commas and colons, 8-bit bytes),
each parsing function returns (or raises our own error) within :data:`BOUND` seconds, measured
per call with ``time.perf_counter``.  A ReDoS guard, not a benchmark: the bound is generous, and
a call over it is measured twice more (the best of three counts) so that a busy machine does
not fail it.

Budget: ``max_examples`` below (a few seconds in CI); ``-m slow`` runs the long version.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector import addresses, headers
from connector.cycle import duplicate_key, trace_header
from connector.deadletter import (
    DeadLetterInfo,
    parse_dead_letter_headers,
    strip_dead_letter_headers,
    with_dead_letter_headers,
)
from connector.errors import Pop3ProtocolError, split_enhanced_code
from connector.metrics import smtp_code
from connector.pop3.protocol import parse_scan_line, parse_stat
from connector.recipients import SharedMailbox, message_id, route
from connector.smtp import SenderPolicy, address_problem, envelope_sender

# Time is what these tests bound: they run without coverage's line tracer, which would slow the
# parsers they time (scripts/test measures coverage; the parsers' own tests cover them).
pytestmark = pytest.mark.no_cover

BOUND = 0.050  # seconds per call
MB = 1024 * 1024

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SHARED = SharedMailbox(domains=frozenset({"firma.example"}))

# The pieces pathological inputs are made of.
PIECES = [
    b"(",
    b")",
    b"<",
    b">",
    b" ",
    b"\t",
    b'"',
    b"\\",
    b"\r\n ",  # folding
    b"\r\n\t",
    b"\n ",
    b"@",
    b".",
    b",",
    b":",
    b";",
    b"[",
    b"]",
    b"a",
    b"x@y.test",
    b"5.1.0 ",
    b"\xc3\xa9",
    b"\xff",
    b"\x00",
    b"\r",
]


@st.composite
def hostile_values(draw: st.DrawFn) -> bytes:
    """A value of up to 1 MB: a short random head, a unit of pathological pieces repeated, a
    short random tail.  Repetition reaches the sizes where super-linear parsers show."""
    unit = b"".join(draw(st.lists(st.sampled_from(PIECES), min_size=1, max_size=6)))
    size = draw(st.sampled_from([1_000, 10_000, 100_000, MB]))
    repeat = max(1, draw(st.integers(1, size)) // len(unit))
    head = draw(st.binary(max_size=20))
    tail = draw(st.binary(max_size=20))
    value = head + unit * repeat + tail
    return value[:MB]


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


# Each parser of message or server data, on a value placed where it would meet one.
PARSERS: dict[str, Callable[[bytes], object]] = {
    "headers.bounds": headers.bounds,
    "headers.fields": lambda v: list(headers.fields(b"Subject: " + v + b"\r\n\r\nbody")),
    "headers.fields(raw)": lambda v: list(headers.fields(v)),
    "headers.header_digest": headers.header_digest,
    "envelope_sender": lambda v: envelope_sender(
        b"Return-Path: " + v + b"\r\n\r\n", SenderPolicy.RETURN_PATH
    ),
    "route(To)": lambda v: route(b"To: " + v + b"\r\n\r\n", SHARED, ("f@firma.local",)),
    "route(Delivered-To, raw)": lambda v: route(
        b"Delivered-To: " + v + b"\r\nTo: " + v, SHARED, ("f@firma.local",)
    ),
    "message_id": lambda v: message_id(b"Message-ID: " + v + b"\r\n\r\n"),
    "duplicate_key": lambda v: duplicate_key(
        message_id(b"Message-ID: " + v + b"\r\n\r\n") or "<m@x.test>",
        b"Subject: " + v + b"\r\n\r\nb",
    ),
    "trace_header": lambda v: trace_header(
        v, pop_host="pop.test", by_host="me.test", uidl=_text(v[:80]), recipients=(), now=NOW
    ),
    "addresses.reverse_path": lambda v: addresses.reverse_path(_text(v)),
    "addresses.address_list": lambda v: addresses.address_list(_text(v)),
    "address_problem": lambda v: address_problem(_text(v)),
    "dead letter write and read back": lambda v: _dead_letter_round_trip(v),
    "split_enhanced_code": lambda v: split_enhanced_code(_text(v)),
    "metrics.smtp_code": lambda v: smtp_code(_text(v)),
    "pop3 parse_stat": lambda v: _pop3(parse_stat, v),
    "pop3 parse_scan_line": lambda v: _pop3(parse_scan_line, v),
}


def _dead_letter_round_trip(value: bytes) -> None:
    info = DeadLetterInfo("info", _text(value[:100]), "error", _text(value), NOW)
    stored = with_dead_letter_headers(value, info)
    parsed = parse_dead_letter_headers(stored)
    assert parsed is not None
    assert strip_dead_letter_headers(stored) == value


def _pop3(parse: Callable[[str], object], value: bytes) -> None:
    with contextlib.suppress(Pop3ProtocolError):  # our error: allowed
        parse(_text(value))


def _timed(fn: Callable[[bytes], object], value: bytes) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn(value)
        best = min(best, time.perf_counter() - start)
        if best <= BOUND:
            break
    return best


def check_all(value: bytes) -> None:
    slow = {name: _timed(fn, value) for name, fn in PARSERS.items()}
    over = {name: f"{t * 1000:.1f} ms" for name, t in slow.items() if t > BOUND}
    assert not over, f"over {BOUND * 1000:.0f} ms on {len(value)} octets: {over}"


_FAST = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
_LONG = settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_FAST
@given(value=hostile_values())
def test_every_parser_is_bounded_on_hostile_values(value: bytes) -> None:
    check_all(value)


@pytest.mark.slow
@_LONG
@given(value=hostile_values())
def test_every_parser_is_bounded_on_hostile_values_long(value: bytes) -> None:
    check_all(value)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"(" * 2000 + b"a@firma.example", id="2000 nested parens"),
        pytest.param(b"(" * 300 + b"a@firma.example" + b")" * 300, id="300 balanced parens"),
        pytest.param(b"<" + b" " * 1400 + b"<" * 1400, id="the cubic Return-Path of issue 13"),
        pytest.param(b"<" * 2800 + b" " * 2800, id="2800 < then spaces"),
        pytest.param(b'"' + b"\\" * 100_000, id="backslashes in a quote"),
        pytest.param(b"a\r\n " * 100_000, id="100,000 folded lines"),
    ],
)
def test_the_shapes_of_the_report_are_bounded(value: bytes) -> None:
    check_all(value)


def test_nested_parens_no_longer_exceed_the_recursion_limit() -> None:
    """The message of issue 13 item 1: ``email.utils.getaddresses`` raised RecursionError."""
    depth = sys.getrecursionlimit() + 100
    raw = b"Delivered-To: " + b"(" * depth + b"\r\nTo: bob@firma.example\r\n\r\nbody\r\n"
    assert route(raw, SHARED, ("f@firma.local",)).recipients == ("bob@firma.example",)


@pytest.mark.parametrize(
    ("raw", "unread"),
    [
        (b"Delivered-To: " + b"(" * 5000 + b"\r\nTo: x@y.test\r\n\r\n", ("Delivered-To",)),
        (b"To: " + b"a@elsewhere.test, " * 2000 + b"\r\n\r\n", ("To",)),
        (b"To: <a@elsewhere.test\r\n\r\n", ("To",)),
        (
            b"".join(b"X-%d: v\r\n" % i for i in range(headers.MAX_FIELDS + 1)) + b"\r\n",
            ("header",),
        ),
        (b"X: " + b"v" * headers.MAX_HEADER_BLOCK + b"\r\n\r\n", ("header",)),
        (b"To: a@elsewhere.test (fine)\r\n\r\n", ()),
    ],
)
def test_routing_says_what_it_could_not_read(raw: bytes, unread: tuple[str, ...]) -> None:
    routing = route(raw, SHARED, ("f@firma.local",))
    assert routing.unread == unread
    assert routing.recipients == ("f@firma.local",)  # nobody readable of ours: the fallback
