"""connector.http without a socket: any request head, however malformed, is parsed or refused
with a 4xx (the endpoint on a real loopback socket: tests/component/test_http.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from connector.http import MAX_BODY, Request, RequestRefused, parse_head

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)


# -- malformed requests --------------------------------------------------------------------


# Request heads: plausible pieces, mutated, and raw bytes.
_PIECES = [
    b"GET ",
    b"POST ",
    b"/poll",
    b"/status",
    b"?account=",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"\r\n",
    b"\n",
    b"\r",
    b"Host: 127.0.0.1",
    b"Host:",
    b"Content-Length: ",
    b"Content-Type: application/json",
    b"Origin: http://127.0.0.1",
    b"Transfer-Encoding: chunked",
    b"Sec-Fetch-Site: cross-site",
    "²".encode(),
    "٣".encode(),  # ARABIC-INDIC DIGIT THREE: str.isdigit() is True
    b"-1",
    b"0",
    b"65536",
    b"9" * 5000,
    b" ",
    b"\t",
    b":",
    b"\x00",
    b"\xff",
    b"%00",
    b"[",
]
heads = st.lists(st.sampled_from(_PIECES) | st.binary(max_size=6), max_size=24).map(b"".join)


@given(head=heads)
def test_parse_head_returns_or_refuses_with_a_4xx(head: bytes) -> None:
    raw = head + b"\r\n\r\n"
    outcome: tuple[Request, int] | RequestRefused
    try:
        outcome = parse_head(raw[: raw.index(b"\r\n\r\n") + 4])
    except RequestRefused as exc:
        outcome = exc
    if isinstance(outcome, RequestRefused):
        assert 400 <= outcome.response.status.value < 500
    else:
        request, length = outcome
        assert 0 <= length <= MAX_BODY
        assert request.target.startswith("/")
        assert "host" in request.headers
