"""The POP3 core's streaming mode (``send(RETR, stream=True)``): byte tables and properties.

A streamed RETR must give, chunk by chunk, exactly the message the whole-message path gives
(``Message.raw``), for any body and any way the bytes arrive, while its buffer stays bounded by a
chunk and one read however long the message or its lines (docs/design.md §5.3).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.errors import Pop3ProtocolError
from connector.pop3.protocol import (
    STREAM_CHUNK,
    Command,
    Connection,
    Event,
    Message,
    MessageChunk,
    MessageEnd,
    NeedData,
    Verb,
    retr_cap,
)

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def transaction() -> Connection:
    conn = Connection()
    conn.send(Command(Verb.USER, ("u",)))
    conn.send(Command(Verb.PASS, ("p",)))
    conn.receive_data(b"+OK hi\r\n+OK\r\n+OK\r\n")
    while not isinstance(conn.next_event(), NeedData):
        pass
    return conn


def stuff(body: bytes) -> bytes:
    """RFC 1939 §3, the server's side, line ends as they are: one more dot before a leading
    dot on every line."""
    lines = body.split(b"\n")
    return b"\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def retrieve(
    reply: bytes, reads: list[int], *, stream: bool, expect: int | None = None
) -> tuple[bytes, list[Event], int]:
    """Feed a RETR ``reply`` in reads of the given sizes (the rest at the end); return the
    message, the events, and the most octets the core held at once."""
    conn = transaction()
    conn.send(Command(Verb.RETR, (1,)), expect=expect, stream=stream)
    events: list[Event] = []
    pos, most = 0, 0
    for size in [*reads, len(reply)]:
        if pos >= len(reply):
            break
        conn.receive_data(reply[pos : pos + size])
        pos += size
        most = max(most, conn.buffered)
        while not isinstance(ev := conn.next_event(), NeedData):
            events.append(ev)
            most = max(most, conn.buffered)
    if not stream:
        (message,) = events
        assert isinstance(message, Message)
        return message.raw, events, most
    chunks = [ev.data for ev in events if isinstance(ev, MessageChunk)]
    end = events[-1]
    assert isinstance(end, MessageEnd)
    assert all(isinstance(ev, MessageChunk) for ev in events[:-1])
    raw = end.prefix + b"".join(chunks)
    assert len(raw) == end.size
    return raw, events, most


def both(reply: bytes, reads: list[int], expect: int | None = None) -> bytes:
    whole, _, _ = retrieve(reply, [], stream=False, expect=expect)
    streamed, _, _ = retrieve(reply, reads, stream=True, expect=expect)
    assert streamed == whole
    return streamed


# The awkward shapes of issue 17: lines starting with ".", bare LF, no final newline (which a
# server sends with a CRLF), a 200,000-character line, a body that is only ".".
AWKWARD = [
    pytest.param(b"Subject: x\r\n\r\n.\r\n..\r\n.x\r\n...y\r\n", id="dots"),
    pytest.param(b"Subject: x\n\nbare\nLF\nlines\n", id="bare-lf"),
    pytest.param(b"Subject: x\r\n\r\nno final newline\r\n", id="no-final-newline"),
    pytest.param(b"Subject: x\r\n\r\n" + b"A" * 200_000 + b"\r\nend\r\n", id="long-line"),
    pytest.param(b".\r\n", id="only-a-dot"),
    pytest.param(b"a\rlone CR\r\n\r\n\r\r\n", id="lone-cr"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("body", AWKWARD)
@pytest.mark.parametrize("reads", [[], [1] * 40, [7, 3, 100_000, 1, 2], [STREAM_CHUNK + 1]])
def test_a_streamed_message_is_the_message_the_whole_path_gives(
    body: bytes, reads: list[int]
) -> None:
    raw = both(b"+OK\r\n" + stuff(body) + b".\r\n", reads)
    assert raw == body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_a_streamed_message_comes_in_chunks_and_the_buffer_stays_small() -> None:
    body = b"".join(b"line %07d .\r\n" % i for i in range(200_000)) + b"x" * 3_000_000 + b"\r\n"
    reply = b"+OK\r\n" + stuff(body) + b".\r\n"
    raw, events, most = retrieve(reply, [256 * 1024] * 100, stream=True)
    assert raw == body
    chunks = [ev for ev in events if isinstance(ev, MessageChunk)]
    assert len(chunks) > 20
    assert max(len(ev.data) for ev in chunks) <= STREAM_CHUNK + 256 * 1024
    assert most <= STREAM_CHUNK + 2 * 256 * 1024  # never the message


def test_a_line_longer_than_a_chunk_is_cut_inside_and_a_cr_before_the_cut_is_kept() -> None:
    # The cut must not separate a CR from its LF, nor take ".\r" for the end.
    body = b"x" * (STREAM_CHUNK - 1) + b"\r\n.\r\n" + b"y" * (3 * STREAM_CHUNK) + b"\r\r\n"
    for first in range(STREAM_CHUNK - 3, STREAM_CHUNK + 4):
        assert both(b"+OK\r\n" + stuff(body) + b".\r\n", [first, 1, 1, 1, STREAM_CHUNK]) == body


@pytest.mark.parametrize(
    ("wire", "announced", "message"),
    [
        # Dovecot 2.3 does not stuff a first line: "..x" with a count that fits it is "..x"
        # (the prefix the end brings), and "." is content when octets were announced.
        (b"..x\r\n", 5, b"..x\r\n"),
        (b"..x\r\n", 4, b".x\r\n"),
        (b".\r\n", 3, b".\r\n"),
    ],
)
def test_the_first_line_quirk_is_decided_at_the_end(
    wire: bytes, announced: int, message: bytes
) -> None:
    reply = b"+OK %d octets\r\n" % announced + wire + b".\r\n"
    assert retrieve(reply, [1] * 20, stream=True)[0] == message
    raw, events, _ = retrieve(reply, [], stream=True)
    assert raw == message == retrieve(reply, [], stream=False)[0]
    end = events[-1]
    assert isinstance(end, MessageEnd)
    assert end.prefix == (b"." if message.startswith(b"..") else b"")


def test_a_dot_first_line_that_does_not_add_up_is_refused_as_on_the_whole_path() -> None:
    reply = b"+OK 9 octets\r\n.\r\n.\r\n"
    with pytest.raises(Pop3ProtocolError):
        retrieve(reply, [], stream=False)
    with pytest.raises(Pop3ProtocolError):
        retrieve(reply, [], stream=True)


def test_a_streamed_retr_longer_than_list_said_is_refused_before_it_is_all_read() -> None:
    listed = 1_000_000
    body = b"z" * 100 + b"\r\n"
    reply = b"+OK\r\n" + body * (2 * retr_cap(listed) // len(body)) + b".\r\n"
    conn = transaction()
    conn.send(Command(Verb.RETR, (1,)), expect=listed, stream=True)
    conn.receive_data(b"+OK\r\n")
    handed_out = [0]

    def feed() -> None:
        for i in range(5, len(reply), 64 * 1024):
            conn.receive_data(reply[i : i + 64 * 1024])
            while isinstance(ev := conn.next_event(), MessageChunk):
                handed_out[0] += len(ev.data)

    with pytest.raises(Pop3ProtocolError, match="LIST announced"):
        feed()
    assert handed_out[0] <= retr_cap(listed)


def test_only_retr_streams() -> None:
    conn = transaction()
    with pytest.raises(ValueError, match="only RETR"):
        conn.send(Command(Verb.TOP, (1, 0)), stream=True)


def test_replies_after_a_streamed_one_are_read_as_usual() -> None:
    conn = transaction()
    conn.send(Command(Verb.RETR, (1,)), stream=True)
    conn.send(Command(Verb.RETR, (2,)))
    conn.send(Command(Verb.NOOP))
    conn.receive_data(b"+OK\r\nfirst\r\n.\r\n+OK\r\nsecond\r\n.\r\n+OK\r\n")
    events = []
    while not isinstance(ev := conn.next_event(), NeedData):
        events.append(ev)
    assert [type(ev).__name__ for ev in events] == ["MessageChunk", "MessageEnd", "Message", "Ok"]
    assert events[0] == MessageChunk(b"first\r\n")
    assert events[2] == Message(b"second\r\n")


lines_st = st.lists(
    st.one_of(
        st.sampled_from([b"", b".", b"..", b".x", b"\r", b".\r", b"x\r", b"From x"]),
        st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),
        st.integers(1, 3).map(lambda n: b"L" * (n * STREAM_CHUNK // 2)),
    ),
    max_size=25,
)


@settings(PROFILE)
@given(
    lines=lines_st,
    bare_lf=st.booleans(),
    reads=st.lists(st.sampled_from([1, 2, 3, 5, 64, 4096, STREAM_CHUNK, 300_000]), max_size=30),
)
def test_any_body_in_any_reads_streams_to_the_whole_paths_message(
    lines: list[bytes], bare_lf: bool, reads: list[int]
) -> None:
    eol = b"\n" if bare_lf else b"\r\n"
    body = b"".join(line + eol for line in lines)
    raw = both(b"+OK\r\n" + stuff(body) + b".\r\n", reads)
    assert raw == body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
