"""The C helper of the POP3 parser (connector/pop3/_scan.c) against what bytes.count says, and
the parser's _unstuff with and without it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.pop3 import protocol

# Bodies made of the bytes that matter (CR, LF, dot) and one that does not.
_pieces = st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\r\n.", b"\r\n.."]))
_bodies = _pieces.map(b"".join)


def _counts(body: bytes) -> tuple[int, int, int, int, int]:
    return (
        body.count(b"\n"),
        body.count(b"\r"),
        body.count(b"\r\n"),
        body.count(b"\r\n."),
        body.count(b"\r\n.."),
    )


def test_the_c_helper_is_built() -> None:
    # scripts/test installs with a compiler; without one the parser falls back to the counts
    # (the same results, slower), and this test says the fast path went untested.
    assert protocol._fast_line_counts is not None, (
        "connector/pop3/_scan.c was not compiled: install gcc and the Python headers, reinstall"
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\r",
        b"\n",
        b"\r\n",
        b"\r\n.",
        b"\r\n..",
        b"\r\n...",
        b"\n\r",
        b"a\r\n..b\r\n.c\n\r",
        b"\r\r\n\n.",
        b"x" * 5000 + b"\r\n.." * 3,
    ],
)
def test_line_counts_examples(body: bytes) -> None:
    assert protocol._fast_line_counts is not None
    assert protocol._fast_line_counts(body) == _counts(body)


@settings(deadline=None)
@given(_bodies)
def test_line_counts_equal_bytes_count(body: bytes) -> None:
    assert protocol._fast_line_counts is not None
    assert protocol._fast_line_counts(body) == _counts(body)


@settings(deadline=None)
@given(st.binary(max_size=4096))
def test_line_counts_of_any_bytes(body: bytes) -> None:
    assert protocol._fast_line_counts is not None
    assert protocol._fast_line_counts(body) == _counts(body)


def test_line_counts_of_a_large_body_and_other_buffers() -> None:
    # Over 1 MiB the C loop releases the GIL; bytearray and memoryview are buffers too.
    body = (b"line of text\r\n..stuffed\r\n.x\r\n" + b"y" * 70 + b"\n\r") * 40_000
    assert len(body) > 2 * 1024 * 1024
    expected = _counts(body)
    assert protocol._fast_line_counts is not None
    assert protocol._fast_line_counts(body) == expected
    assert protocol._fast_line_counts(bytearray(body)) == expected  # type: ignore[arg-type]
    assert protocol._fast_line_counts(memoryview(body)) == expected  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        protocol._fast_line_counts("text")  # type: ignore[arg-type]


@settings(deadline=None)
@given(_bodies, st.booleans())
def test_unstuff_is_the_same_with_and_without_the_c_helper(body: bytes, stuffed: bool) -> None:
    body += b"\r\n"  # the parser hands _unstuff a body that ends in a line end
    fast = protocol._unstuff(body, stuffed)
    saved = protocol._fast_line_counts
    protocol._fast_line_counts = None
    try:
        slow = protocol._unstuff(body, stuffed)
    finally:
        protocol._fast_line_counts = saved
    assert fast == slow
