"""Property tests of the POP3 core (hypothesis).

Profiles: ``dev`` (the default, fast) and ``ci`` (thorough); choose with HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import contextlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from connector.errors import Pop3ProtocolError
from connector.pop3.protocol import (
    NEED_DATA,
    Command,
    Connection,
    Event,
    Greeting,
    Listing,
    LocalProtocolError,
    Message,
    NeedData,
    Ok,
    State,
    Verb,
)

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def drain(conn: Connection) -> list[Event]:
    events: list[Event] = []
    while not isinstance(ev := conn.next_event(), NeedData):
        events.append(ev)
    return events


def stuff(lines: list[bytes]) -> bytes:
    """RFC 1939 §3, the server's side: CRLF line ends, one more dot before a leading dot."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


# Message lines: any bytes but LF (a lone CR inside a line is content and must survive).
lines_st = st.lists(st.binary(max_size=120).map(lambda b: b.replace(b"\n", b"")), max_size=30)
dotty_lines_st = st.lists(
    st.sampled_from([b"", b".", b"..", b"...", b".x", b"x.", b"\r", b".\r", b"From x"]),
    max_size=20,
)


def transaction() -> Connection:
    conn = Connection()
    conn.send(Command(Verb.USER, ("u",)))
    conn.send(Command(Verb.PASS, ("p",)))
    conn.receive_data(b"+OK hi\r\n+OK\r\n+OK\r\n")
    drain(conn)
    return conn


@settings(PROFILE)
@given(st.one_of(lines_st, dotty_lines_st))
def test_dot_stuffed_content_comes_back_exactly(lines: list[bytes]) -> None:
    conn = transaction()
    conn.send(Command(Verb.RETR, (1,)))
    conn.receive_data(b"+OK\r\n" + stuff(lines) + b".\r\n")
    assert drain(conn) == [Message(b"".join(line + b"\r\n" for line in lines))]


def transcript(messages: list[list[bytes]]) -> tuple[list[Command], list[bytes], list[Event]]:
    """A whole valid session: the commands, the server's reply to each (the greeting first),
    and the events they must give."""
    n = len(messages)
    cmds = [Command(Verb.USER, ("alice",)), Command(Verb.PASS, ("pw",)), Command(Verb.UIDL)]
    replies = [b"+OK ready <1.2@x>\r\n", b"+OK\r\n", b"+OK Logged in.\r\n"]
    replies.append(
        b"+OK\r\n" + b"".join(b"%d uid-%d\r\n" % (i, i) for i in range(1, n + 1)) + b".\r\n"
    )
    events: list[Event] = [
        Greeting("ready <1.2@x>", "<1.2@x>"),
        Ok(""),
        Ok("Logged in."),
        Listing("", tuple((i, f"uid-{i}") for i in range(1, n + 1))),
    ]
    for i, lines in enumerate(messages, 1):
        cmds += [Command(Verb.RETR, (i,)), Command(Verb.DELE, (i,))]
        replies += [b"+OK\r\n" + stuff(lines) + b".\r\n", b"+OK deleted\r\n"]
        events += [Message(b"".join(line + b"\r\n" for line in lines)), Ok("deleted")]
    cmds.append(Command(Verb.QUIT))
    replies.append(b"+OK bye\r\n")
    events.append(Ok("bye"))
    return cmds, replies, events


@settings(PROFILE)
@given(st.lists(st.one_of(lines_st, dotty_lines_st), max_size=4), st.data())
def test_any_chunking_gives_the_same_events(
    messages: list[list[bytes]], data: st.DataObject
) -> None:
    cmds, replies, expected = transcript(messages)
    wire = b"".join(replies)
    # ends[k]: where the reply to command k-1 ends (ends[0]: the greeting).
    ends = [sum(map(len, replies[: k + 1])) for k in range(len(replies))]
    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=40)))
    conn = Connection()
    events: list[Event] = []
    sent = 0
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        while start < end:
            # As a shell would: send whatever the state allows (pipelining up to the next
            # exclusive command); the server cannot answer a command not yet sent.
            while sent < len(cmds):
                try:
                    conn.send(cmds[sent])
                except LocalProtocolError:  # an exclusive command still waits for its reply
                    break
                sent += 1
            upto = min(end, ends[sent])
            assert upto > start
            conn.receive_data(wire[start:upto])
            events += drain(conn)
            start = upto
    assert events == expected
    assert conn.state is State.CLOSED


@settings(PROFILE)
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=10))
def test_random_bytes_raise_only_protocol_errors(blob: bytes, sizes: list[int]) -> None:
    conn = transaction()
    for cmd in (
        Command(Verb.RETR, (1,)),
        Command(Verb.UIDL),
        Command(Verb.LIST),
        Command(Verb.CAPA),
        Command(Verb.STAT),
        Command(Verb.TOP, (1, 0)),
    ):
        conn.send(cmd)
    pos = 0
    try:
        for size in [*sizes, len(blob)]:
            if chunk := blob[pos : pos + size]:  # b"" would mean EOF
                conn.receive_data(chunk)
            pos += size
            drain(conn)
    except Pop3ProtocolError:
        return
    assert conn.next_event() is NEED_DATA


@settings(PROFILE)
@given(st.binary(max_size=300))
def test_random_greeting_bytes_raise_only_protocol_errors(blob: bytes) -> None:
    conn = Connection()
    conn.send(Command(Verb.CAPA))
    conn.receive_data(blob + b"\r\n")  # never b"", which would mean EOF
    with contextlib.suppress(Pop3ProtocolError):
        drain(conn)
