"""connector.cycle.trace: the Received: line at the top of a delivered message."""

from __future__ import annotations

from datetime import UTC, datetime

from connector.cycle import trace_header


def test_trace_header_uses_the_message_line_ending_and_is_safe() -> None:
    when = datetime(2026, 11, 27, 15, 49, 35, tzinfo=UTC)
    crlf = trace_header(
        b"Subject: x\r\n\r\n",
        pop_host="pop.example",
        by_host="me",
        uidl="abc",
        recipients=["a@b"],
        now=when,
    )
    assert crlf == (
        b"Received: from pop.example by me with POP3 (pop3-connector) id abc\r\n"
        b"\tfor <a@b>; Fri, 27 Nov 2026 15:49:35 +0000\r\n"
    )
    lf = trace_header(
        b"Subject: x\n\n",
        pop_host="p",
        by_host="me",
        uidl="a;b\r\nX: y",
        recipients=["a@b", "c@d"],
        now=when,
    )
    expected = b"Received: from p by me with POP3 (pop3-connector)\n"
    assert lf == expected + b"\t; Fri, 27 Nov 2026 15:49:35 +0000\n"
    # The date is of the second the message was taken, whatever was formatted before.
    for now, text in [
        (when.replace(microsecond=999_999), b"15:49:35"),
        (datetime(2026, 11, 27, 15, 49, 36, 1, tzinfo=UTC), b"15:49:36"),
        (when, b"15:49:35"),
    ]:
        line = trace_header(
            b"x\r\n", pop_host="p", by_host="me", uidl="a", recipients=["a@b"], now=now
        )
        assert line.endswith(b"Fri, 27 Nov 2026 " + text + b" +0000\r\n")
