"""connector.headers: the bounded header reader."""

from __future__ import annotations

import time

import pytest

from connector import headers


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"A: b\r\n\r\nbody", (4, 8)),
        (b"A: b\n\nbody", (4, 6)),
        (b"A: b\n\r\nbody", (4, 7)),
        (b"\r\nbody", (0, 2)),
        (b"\nbody", (0, 1)),
        (b"A: b\r\n", None),
        (b"", None),
    ],
)
def test_bounds(raw: bytes, expected: tuple[int, int] | None) -> None:
    assert headers.bounds(raw) == expected


def test_bounds_looks_only_within_the_cap() -> None:
    raw = b"X: " + b"a" * headers.MAX_HEADER_BLOCK + b"\r\n\r\nbody"
    assert headers.bounds(raw) is None
    assert headers.header_block(raw) == raw[: headers.MAX_HEADER_BLOCK]


def test_a_long_value_is_cut_and_marked() -> None:
    raw = b"To: " + b"a@x.test, " * 10_000 + b"\r\nSubject: s\r\n\r\n"
    to, subject = headers.fields(raw)
    assert to.cut
    assert headers.MAX_VALUE - 1 <= len(to.value) <= headers.MAX_VALUE
    assert subject == headers.Field("subject", b"s")


def test_fields_stop_at_the_caps() -> None:
    raw = b"".join(b"X-%d: v\r\n" % i for i in range(headers.MAX_FIELDS + 10)) + b"\r\n"
    assert len(list(headers.fields(raw))) == headers.MAX_FIELDS
    start = time.perf_counter()
    list(headers.fields(b"x\r\n" * 100_000))  # lines that are not fields
    assert time.perf_counter() - start < 1.0


def test_header_digest_is_the_same_for_retr_and_top() -> None:
    raw = b"From: a@x.test\r\nSubject: s\r\n\r\nbody\r\nmore\r\n"
    top = b"From: a@x.test\r\nSubject: s\r\n\r\n"  # TOP n 0 (RFC 1939 §7)
    assert headers.header_digest(raw) == headers.header_digest(top)
    assert headers.header_digest(raw) != headers.header_digest(b"From: b@x.test\r\n\r\n")
    headers_only = b"From: a@x.test\r\nSubject: s\r\n"
    assert headers.header_digest(headers_only) == headers.header_digest(headers_only)


def test_header_fields_unfolds_and_lowercases() -> None:
    raw = (
        b"Subject: one\r\n two\r\n\tthree\r\n"
        b"not a field line\r\n"
        b" orphan continuation\r\n"
        b"X-A:  v  \r\n"
        b"\r\n"
        b"To: body@x.test\r\n"
    )
    assert [(f.name, f.text) for f in headers.fields(raw)] == [
        ("subject", "one two three"),
        ("x-a", "v"),
    ]


def test_header_fields_surrogate_escapes_eight_bit() -> None:
    ((name, value),) = [(f.name, f.text) for f in headers.fields(b"Subject: caf\xe9\r\n\r\n")]
    assert name == "subject"
    assert value.encode("ascii", "surrogateescape") == b"caf\xe9"
