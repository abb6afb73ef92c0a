"""Hostile and broken input: fuzzing the POP3 core, and awkward real-world mail end to end.

Fuzzing: random and mutated server bytes, in random chunks, into
:class:`connector.pop3.protocol.Connection` with a random queue of commands in flight.  Only our
own errors may come out (``Pop3ProtocolError``; ``Pop3ConnectionError`` for EOF in the middle of a
reply), never another exception; every call returns (no hang: each ``next_event`` either
consumes input or asks for more); and the buffer never holds more than the caps allow.  Budget:
``HYPOTHESIS_PROFILE`` (``dev`` by default, ``ci`` in CI, ``long`` by hand).

Corpus: messages that break naive mail code, stored in real Dovecot, fetched and delivered (or
refused and dead-lettered) by the real CLI, and compared byte for byte.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable

import pytest
from aiosmtpd.smtp import Envelope
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.errors import Pop3ConnectionError, Pop3ProtocolError
from connector.pop3.protocol import (
    MAX_LINE,
    Closed,
    Command,
    Connection,
    NeedData,
    State,
    Verb,
)
from tests.integration.conftest import Setup, strip_trace

PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
CAP = 2048  # max_message_size for the fuzzed connections: small, so the cap is exercised

TRANSACTION_COMMANDS = [
    Command(Verb.STAT),
    Command(Verb.UIDL),
    Command(Verb.LIST),
    Command(Verb.RETR, (1,)),
    Command(Verb.TOP, (1, 0)),
    Command(Verb.DELE, (1,)),
    Command(Verb.UIDL, (1,)),
    Command(Verb.CAPA),
    Command(Verb.NOOP),
    Command(Verb.QUIT),
]

# A plausible server transcript to mutate: greeting, login, and replies to the commands above.
VALID = (
    b"+OK ready <1.2@x>\r\n+OK\r\n+OK logged in\r\n"
    b"+OK 2 320\r\n"
    b"+OK\r\n1 000000016b0a144d\r\n2 000000026b0a144d\r\n.\r\n"
    b"+OK\r\n1 120\r\n2 200\r\n.\r\n"
    b"+OK 120 octets\r\nSubject: x\r\n\r\n..dot\r\nbody\r\n.\r\n"
    b"+OK\r\nSubject: x\r\n\r\n.\r\n"
    b"+OK marked\r\n+OK 1 000000016b0a144d\r\n"
    b"+OK\r\nTOP\r\nUIDL\r\nPIPELINING\r\nSASL PLAIN\r\n.\r\n+OK\r\n+OK bye\r\n"
)

MAX_BUFFERED = CAP + MAX_LINE + 8


def logged_in() -> Connection:
    conn = Connection(max_message_size=CAP)
    conn.send(Command(Verb.USER, ("u",)))
    conn.send(Command(Verb.PASS, ("p",)))
    return conn


def feed(conn: Connection, chunks: list[bytes], commands: list[Command]) -> None:
    """Drive the core as the shell does; raise only what the server's bytes may cause."""
    queue = list(commands)
    budget = sum(map(len, chunks)) + len(commands) + 10  # every event consumes input
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            budget -= 1
            assert budget > 0, "next_event neither progressed nor asked for data"
            ev = conn.next_event()
            if isinstance(ev, NeedData):
                # Memory bound: what waits in the buffer is within the caps.
                assert conn.buffered <= MAX_BUFFERED + len(chunk)
                break
            if isinstance(ev, Closed):
                return
            if queue and conn.state is State.TRANSACTION and not conn.pending:
                conn.send(queue.pop(0))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup", "truncate", "crlf"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        match op:
            case "flip":
                if data:
                    data[at] = draw(st.integers(0, 255))
            case "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=40))
            case "delete":
                del data[at : at + draw(st.integers(1, 40))]
            case "dup":
                data[at:at] = data[at : at + draw(st.integers(1, 200))]
            case "truncate":
                del data[at:]
            case "crlf":
                data[at:at] = draw(st.sampled_from([b"\r", b"\n", b"\r\n", b".\r\n", b"\r\n."]))
    return bytes(data)


server_bytes = st.one_of(
    mutated(),
    st.binary(max_size=6000),
    st.binary(max_size=200).map(lambda b: b"+OK\r\n" + b * 40),  # long bodies: the cap
)


@PROFILE
@given(
    data=server_bytes,
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    commands=st.lists(st.sampled_from(TRANSACTION_COMMANDS), max_size=6),
)
def test_random_server_bytes_raise_only_pop3_errors(
    data: bytes, cuts: list[int], commands: list[Command]
) -> None:
    conn = logged_in()
    # The only acceptable failures; anything else fails the test.
    with contextlib.suppress(Pop3ProtocolError, Pop3ConnectionError):
        feed(conn, chunked(data, cuts), commands)


def test_greeting_with_8bit_apop_stamp_raises_only_pop3_errors() -> None:
    conn = Connection()
    conn.receive_data(b"+OK ready <\x80.2@x>\r\n")
    with contextlib.suppress(Pop3ProtocolError):
        ev = conn.next_event()
        assert not isinstance(ev, NeedData)


@PROFILE
@given(size=st.integers(CAP + 1, 4 * CAP), chunk=st.integers(1, 997))
def test_endless_message_stops_at_the_cap(size: int, chunk: int) -> None:
    """A RETR reply that never ends: refused once it exceeds max_message_size, never truncated,
    and the buffer never grows past the cap plus one chunk."""
    conn = logged_in()
    conn.receive_data(b"+OK\r\n+OK\r\n+OK\r\n")
    while not isinstance(conn.next_event(), NeedData):
        pass
    conn.send(Command(Verb.RETR, (1,)))
    conn.receive_data(b"+OK\r\n")
    body = (b"a" * 70 + b"\r\n") * (size // 72 + 1)

    def pour() -> None:
        for i in range(0, len(body), chunk):
            conn.receive_data(body[i : i + chunk])
            assert isinstance(conn.next_event(), NeedData)
            assert conn.buffered <= CAP + chunk + 8

    with pytest.raises(Pop3ProtocolError):
        pour()


def test_status_line_without_end_is_refused_at_max_line() -> None:
    conn = Connection()

    def pour() -> None:
        for _ in range(100):
            conn.receive_data(b"+OK " + b"x" * 1000)
            assert isinstance(conn.next_event(), NeedData)

    with pytest.raises(Pop3ProtocolError, match="longer than"):
        pour()
    assert conn.buffered < 2 * MAX_LINE


# --------------------------------------------------------------------------------------------
# Awkward real-world messages, end to end through Dovecot
# --------------------------------------------------------------------------------------------


def mime_tree(depth: int, width: int) -> bytes:
    """A deeply nested multipart message with many leaves (~1 MiB)."""
    parts = [b"Content-Type: text/plain\r\n\r\nleaf\r\n"]
    for level in range(depth):
        b = f"b{level}".encode()
        inner = b"".join(b"--" + b + b"\r\n" + p for p in parts * (width if level == 0 else 1))
        parts = [
            b'Content-Type: multipart/mixed; boundary="'
            + b
            + b'"\r\n\r\n'
            + inner
            + b"--"
            + b
            + b"--\r\n"
        ]
    return b"Subject: enormous MIME tree\r\nMIME-Version: 1.0\r\n" + parts[0]


CORPUS: dict[str, bytes] = {
    "nul_bytes": b"Subject: NUL\r\n\r\nbefore\x00after\r\n\x00\x00\r\n",
    "bare_cr": b"Subject: bare CR\r\n\r\none\rtwo\r\n",
    "one_mib_header_line": b"Subject: long\r\nX-Long: " + b"h" * (1 << 20) + b"\r\n\r\nbody\r\n",
    "no_header_body_separator": b"Subject: no separator\r\nX-Other: y\r\n",
    "invalid_8bit": b"Subject: \xff\xfe\xc3\x28 broken\r\n\r\n\x80\x81\xc0\xaf body\r\n",
    "enormous_mime_tree": mime_tree(depth=200, width=5000),
    "dots_in_the_body": b"Subject: dots\r\n\r\n.\r\n..\r\n.\r\n. \r\n",
}
# SMTP has no bare CR (RFC 5321 §2.3.8): it travels as a line break, as aiosmtplib sends it.
EXPECTED = {"bare_cr": b"Subject: bare CR\r\n\r\none\r\ntwo\r\n"}
REFUSE = {"nul_bytes", "invalid_8bit", "dots_in_the_body", "enormous_mime_tree"}


@pytest.mark.integration
def test_awkward_messages_delivered_or_dead_lettered_intact(
    setup_factory: Callable[..., Setup],
) -> None:
    s = setup_factory()
    names = list(CORPUS)
    raws = [CORPUS[n] + b"X-Corpus: " + n.encode() + b"\r\n" for n in names]
    s.dovecot.deliver_many(s.user, raws)

    def refuse(stage: str, envelope: Envelope, data: bytes | None) -> str | None:
        if stage == "data" and data is not None:
            name = data.rsplit(b"X-Corpus: ", 1)[1].strip().decode()
            if name in REFUSE:
                return "554 5.6.0 Message content rejected"
        return None

    s.sink.handler.rule = refuse
    assert s.run("once") == 0
    expected = {n: EXPECTED.get(n, CORPUS[n]) + b"X-Corpus: " + n.encode() + b"\r\n" for n in names}
    got = {
        strip_trace(m.data).rsplit(b"X-Corpus: ", 1)[1].strip().decode(): strip_trace(m.data)
        for m in s.received()
    }
    assert sorted(got) == sorted(set(names) - REFUSE)
    for name, data in got.items():
        assert data == expected[name], name
    dead = s.dead_letters()
    assert len(dead) == len(REFUSE)
    for d in dead:
        name = d.rsplit(b"X-Corpus: ", 1)[1].strip().decode()
        assert name in REFUSE
        _, _, rest = d.partition(b"X-POP3-Connector-Failed-At: ")
        assert rest.split(b"\r\n", 1)[1] == expected[name], name
    assert s.upstream() == []


@pytest.mark.integration
def test_message_that_is_only_a_dot_is_not_lost(setup_factory: Callable[..., Setup]) -> None:
    """Messages whose first line starts with "." (the corpus's "only a dot"), then a normal one.

    Dovecot 2.3 does not dot-stuff a message's first line (RFC 1939 §3 says it must): the
    client must still deliver each of them intact, never an empty or shortened message.
    """
    s = setup_factory()
    raws = [b".\r\n", b"..two dots\r\nx\r\n", b".one dot\r\nbar\r\n", b".\r\n.\r\n"]
    # Stored without a final line end: Dovecot counts one octet for "." but sends ".\r\n".
    raws += [b".", b"..x", b"Subject: after\r\n\r\nbody\r\n"]
    s.dovecot.deliver_many(s.user, raws)
    assert s.run("once") == 0
    # SMTP carries every line with its CRLF (RFC 5321 §4.1.1.4): the two get one at the end.
    expected = [r if r.endswith(b"\n") else r + b"\r\n" for r in raws]
    assert [strip_trace(m.data) for m in s.received()] == expected
    assert s.upstream() == []
